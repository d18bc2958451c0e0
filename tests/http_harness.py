"""The HTTP API's test harness: a daemon with the API on, and a small HTTP client for TCP or a unix socket."""

from __future__ import annotations

import http.client
import socket
import uuid
from pathlib import Path
from typing import Any

from conftest import DAEMON_OUTPUTS, FAST_DECODE, config_data
from daemon_harness import Daemon


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a connected AF_UNIX socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class Client:
    """A minimal HTTP client for one listener: `host:port` or `unix:/path`, with an optional token."""

    def __init__(self, listen: str, token: str | None = None) -> None:
        self.listen = listen
        self.token = token

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.listen.startswith("unix:"):
            return _UnixConnection(self.listen[len("unix:"):], timeout)
        host, _, port = self.listen.rpartition(":")
        return http.client.HTTPConnection(host, int(port), timeout=timeout)

    def request(self, method: str, path: str, *, fields: dict[str, str] | None = None,
                files: dict[str, tuple[str, bytes]] | None = None, token: str | None = None,
                timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        """Return status, headers and body; a multipart/form-data body when fields or files are given."""
        headers: dict[str, str] = {}
        body = None
        if fields is not None or files is not None:
            boundary = uuid.uuid4().hex
            parts = []
            for name, value in (fields or {}).items():
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                             .encode())
            for name, (filename, data) in (files or {}).items():
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                             f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                             + data + b"\r\n")
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        given = token if token is not None else self.token
        if given is not None:
            headers["Authorization"] = f"Bearer {given}"
        conn = self._connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def upload(self, path: str, source: Path, *, name: str = "file", **fields: str) -> tuple[int, bytes]:
        """POST a file as multipart `name`, with form fields; return status and body."""
        status, _, body = self.request("POST", path, fields=fields, files={name: (source.name, source.read_bytes())})
        return status, body


def api_daemon(root: Path, checkpoint: Path, http: dict[str, Any]) -> Daemon:
    """Return a daemon (not started) with folder 'media' and the HTTP API, as make_daemon configures one."""
    data = config_data(root, checkpoint, {"stability_delay": 0.5}, log_format="json", rescan_interval=3600,
                       shutdown_grace=10, http=http)
    data["defaults"] |= {**FAST_DECODE, "sample_len": 8, "output_formats": list(DAEMON_OUTPUTS),
                         "retry_base_delay": 0.3, "retry_max_delay": 2}
    Path(data["folders"][0]["inbox"]).mkdir(parents=True, exist_ok=True)
    daemon = Daemon(root, data)
    CREATED.append(daemon)
    return daemon


CREATED: list[Daemon] = []  # every daemon api_daemon made: a test that fails before stopping its own leaves it


def kill_leftovers() -> None:
    """Kill the daemons api_daemon made that still run (their tests failed before stopping them)."""
    for daemon in CREATED:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
