"""uvicorn on a thread of the daemon process, on a socket whisperd binds itself.

Binding here (not in uvicorn) reports a taken port or a bad socket path before the daemon says it
is ready, and gives a unix socket the mode whisperd chooses (uvicorn would make it 0666).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import structlog
import uvicorn

from daemon.errors import ListenerError

log = structlog.get_logger("whisperd")

STARTUP_WAIT_S = 10.0
STOP_GRACE_S = 5  # requests still waiting when the daemon stops are answered 503 within this
SOCKET_MODE = 0o660  # the service's user and group; others reach it only through a group or a proxy


def bind(listen: str) -> socket.socket:
    """Return a socket bound to `host:port` or `unix:/path`; raise ListenerError when it cannot be."""
    if listen.startswith("unix:"):
        return _bind_unix(Path(listen[len("unix:"):]))
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ListenerError(f"cannot listen on {listen}: {err.strerror or err}") from err
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ListenerError(f"cannot listen on {listen}: {err.strerror or err}") from err
    return sock


def _bind_unix(path: Path) -> socket.socket:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ListenerError(f"cannot listen on unix:{path}: {err.strerror or err}") from err
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"cannot listen on unix:{path}: something that is not a socket is there")
        if _answers(path):
            raise ListenerError(f"cannot listen on unix:{path}: another process listens on it")
        os.unlink(path)  # left by a process that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Created with no access for others from the start (bind honours the umask), then given its mode:
    # never a moment when any local user could connect. Binding comes before any thread starts.
    previous = os.umask(0o177)
    try:
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
    except OSError as err:
        sock.close()
        raise ListenerError(f"cannot listen on unix:{path}: {err.strerror or err}") from err
    finally:
        os.umask(previous)
    return sock


def _answers(path: Path) -> bool:
    """Return True when a process accepts connections on the unix socket at path (a live daemon)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False  # refused: nobody listens (a killed process's leftover)
    finally:
        probe.close()
    return True


class ApiServer:
    """The API's uvicorn server, running on its own thread until stop()."""

    def __init__(self, app: Any, listen: str, sock: socket.socket) -> None:  # an ASGI app
        self.listen = listen
        self.sock = sock  # bound by bind(), early in the daemon's start
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                                timeout_graceful_shutdown=STOP_GRACE_S)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="http", daemon=True)

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except Exception:  # a bug in the server: the daemon's folders keep working
            log.exception("http_failed", listen=self.listen)

    def start(self) -> None:
        """Start serving; raise ListenerError when the server does not come up."""
        self.thread.start()
        deadline = time.monotonic() + STARTUP_WAIT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ListenerError(f"the HTTP server did not start on {self.listen}")
            time.sleep(0.02)
        log.info("http_listening", listen=self.listen)

    def stop(self) -> None:
        """Stop accepting requests, let the waiting ones answer, and remove a unix socket."""
        self.server.should_exit = True
        self.thread.join(timeout=STOP_GRACE_S + 2)
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.listen.startswith("unix:"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen[len("unix:"):])
