"""sd_notify(3) without libsystemd: tell systemd that whisperd is ready, reloading, stopping or alive.

Under a `Type=notify` unit systemd passes a datagram socket in `$NOTIFY_SOCKET`; each message is one
datagram of newline-separated `KEY=value` lines. Outside systemd the variable is unset and every call
here is a no-op, so the daemon runs the same in a terminal, a container or the tests.

Typical use::

    notifier = Notifier.from_environment()
    notifier.ready("watching 3 folders")
    interval = watchdog_interval()      # ping at this rate, or not at all when None
    ...
    notifier.watchdog()
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)

# A send blocks only when systemd's receive queue is full, i.e. systemd itself is stuck. Waiting a
# little keeps a READY=1 from being dropped by a momentary backlog; never waiting forever keeps a stuck
# systemd from hanging the daemon's stop or its watchdog thread.
SEND_TIMEOUT_S = 2.0


def _socket_address(value: str) -> bytes | None:
    """Return $NOTIFY_SOCKET as an AF_UNIX address for sendto(), or None when it is not one."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@"):
        # Linux abstract namespace: systemd writes the leading NUL byte as '@'.
        return b"\0" + os.fsencode(value[1:])
    return None  # e.g. vsock:CID:PORT (systemd ≥ 254, for VMs): not for a daemon on the host


def _one_line(value: object) -> str:
    """Return value as text with no newline, which would end the field and start a bogus one."""
    return str(value).replace("\r", " ").replace("\n", " ")


class Notifier:
    """Sends sd_notify messages to systemd; a harmless no-op when not started by systemd."""

    def __init__(self, address: bytes | None) -> None:
        """Target the AF_UNIX address given as bytes (abstract names start with NUL); None disables."""
        self.address = address
        self._lock = threading.Lock()  # one socket shared by the main, worker and watchdog threads
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Return a Notifier for $NOTIFY_SOCKET (a path, or @name for an abstract socket); no-op if unset."""
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        if not value:
            return cls(None)
        address = _socket_address(value)
        if address is None:
            log.warning("notify_socket_unsupported", notify_socket=value,
                        consequence="systemd will not hear READY=1 or watchdog pings")
        return cls(address)

    @property
    def enabled(self) -> bool:
        """Return True when messages go to systemd, False when this notifier is a no-op."""
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Return True when the lines went to systemd as one datagram; False when disabled or on error.

        Never raises: losing a status line must not stop a transcription. Failures are logged at
        debug level (systemd gone during shutdown, a stale socket path in a copied environment).
        """
        if self.address is None or not lines:
            return False
        message = "\n".join(lines).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    # Python creates sockets close-on-exec: ffmpeg children never inherit it.
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(SEND_TIMEOUT_S)
                self._sock.sendto(message, self.address)
            except OSError as err:
                log.debug("sd_notify_failed", message=lines[0], error=str(err))
                return False
        return True

    def notify(self, **fields: object) -> bool:
        """Return send()'s result for KEY=value lines, e.g. notify(READY=1, STATUS="idle")."""
        return self.send(*(f"{key}={_one_line(value)}" for key, value in fields.items()))

    def ready(self, status: str | None = None) -> bool:
        """Return send()'s result for READY=1: start-up (or a reload) is complete."""
        return self.send("READY=1", *self._status_line(status))

    def status(self, text: str) -> bool:
        """Return send()'s result for STATUS=…, the line `systemctl status` shows."""
        return self.send(*self._status_line(text))

    def reloading(self, status: str | None = None) -> bool:
        """Return send()'s result for RELOADING=1; call ready() when the reload is over, even if it failed.

        MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) match this to the reload it asked
        for; older systemd ignores it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status_line(status))

    def stopping(self, status: str | None = None) -> bool:
        """Return send()'s result for STOPPING=1: shutdown has begun (the unit shows "deactivating")."""
        return self.send("STOPPING=1", *self._status_line(status))

    def watchdog(self) -> bool:
        """Return send()'s result for WATCHDOG=1, the keep-alive ping WatchdogSec= waits for."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Return send()'s result for EXTEND_TIMEOUT_USEC: allow `seconds` more from now to start or stop.

        It moves the deadline to now + seconds (not added to what is left), so a long model
        download can call it repeatedly, each time for the next stretch.
        """
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    @staticmethod
    def _status_line(text: str | None) -> tuple[str, ...]:
        return () if text is None else (f"STATUS={_one_line(text)}",)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Return how often to call watchdog(), in seconds (half of WatchdogSec=), or None when it is off.

    Reads $WATCHDOG_USEC. $WATCHDOG_PID, when set, names the process the watchdog is for: any other
    process (a child that inherited the environment) gets None.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    # Half the timeout, as sd_watchdog_enabled(3) recommends: one late ping is not yet fatal.
    return int(usec) / 2 / 1_000_000
