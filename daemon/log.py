"""structlog set-up: journald's native protocol under systemd, JSON lines in pipes, colours on a terminal.

Libraries that log through the standard library (APScheduler, watchdog) and Python warnings are
routed through structlog too, so no line bypasses the chosen format. Colours only on a terminal,
and never when NO_COLOR is set.

Under systemd (`$JOURNAL_STREAM` names our stderr) each event goes to journald as its own fields,
so `journalctl -u whisperd -o json` shows JOB_ID, FOLDER, FILE, STAGE, RTF … and
`journalctl -u whisperd FOLDER=lectures` filters on them. Elsewhere events are JSON lines on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Collection, MutableMapping
from typing import Any, TextIO

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_SOCKET_ENV = "WHISPERD_JOURNAL_SOCKET"  # another socket path, for tests
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_FIELD = re.compile(r"[^A-Z0-9_]")


def journal_socket_for(stream: TextIO) -> str | None:
    """Return journald's socket when `stream` is the journal stream systemd gave us, else None."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return None
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    if f"{st.st_dev}:{st.st_ino}" != expected:
        return None  # stderr was redirected elsewhere: the variable was merely inherited
    return os.environ.get(JOURNAL_SOCKET_ENV, JOURNAL_SOCKET)


def _field_name(key: str) -> str:
    name = _FIELD.sub("_", key.upper()).lstrip("_")
    return name or "FIELD"


def journal_datagram(event_dict: MutableMapping[str, Any]) -> bytes:
    """Return one journald native-protocol datagram for a structlog event."""
    fields = dict(event_dict)
    level = str(fields.pop("level", "info"))
    fields.pop("timestamp", None)  # journald stamps each entry itself
    event = str(fields.get("event", ""))
    summary = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("event", "exception"))
    entries = {
        "MESSAGE": f"{event} {summary}".strip() + (f"\n{fields['exception']}" if "exception" in fields else ""),
        "PRIORITY": str(_PRIORITY.get(level, 6)),
        "SYSLOG_IDENTIFIER": "whisperd",
    }
    for key, value in fields.items():
        entries.setdefault(_field_name(key), value if isinstance(value, str) else json.dumps(value, default=str))
    out = bytearray()
    for name, text in entries.items():
        data = text.encode("utf-8", "replace")
        if b"\n" in data:
            # Values with newlines use the binary form: name, newline, 64-bit little-endian length, data.
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournaldRenderer:
    """The last structlog processor under systemd: sends the event to journald, falls back to JSON."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fallback = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        try:
            self.sock.sendto(journal_datagram(event_dict), self.address)
        except OSError:
            return str(self.fallback(logger, method, event_dict))  # journald away: keep the line on stderr
        raise structlog.DropEvent


def colours_wanted(stream: TextIO) -> bool:
    """Return True when console lines may carry ANSI colours: a terminal, and no NO_COLOR set."""
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return terminal and not os.environ.get("NO_COLOR")  # https://no-color.org: any non-empty value


class _Forward(logging.Handler):
    """Hands records of libraries that log through stdlib logging (APScheduler, watchdog, warnings)
    to structlog, so every line whisperd writes has one format and reaches journald as fields."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            method = getattr(structlog.get_logger(), level if level in _PRIORITY else "info")
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            method("library_log", **fields)
        except Exception:
            self.handleError(record)


def route_stdlib_logging(level: str) -> None:
    """Send stdlib logging and Python warnings through structlog from now on (once per process)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Forward)]:
        root.removeHandler(handler)
    root.addHandler(_Forward())
    # Libraries speak at INFO of their own routine (APScheduler: "Running job …" four times a
    # second); as before any routing, only their warnings and errors are worth a line.
    root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    logging.captureWarnings(True)


def unroute_stdlib_logging() -> None:
    """Undo route_stdlib_logging (tests)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Forward)]:
        root.removeHandler(handler)
    logging.captureWarnings(False)


def _drop(events: frozenset[str]) -> Any:
    def processor(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event_dict.get("event") in events:
            raise structlog.DropEvent
        return event_dict

    return processor


def configure(
    fmt: str = "auto", level: str = "info", stream: TextIO | None = None, *, quiet: Collection[str] = ()
) -> None:
    """Configure structlog once for the process; fmt is auto, json or console.

    `quiet` names events not to write: a command that reports them in its own words.
    """
    stream = stream if stream is not None else sys.stderr
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if quiet:
        processors.insert(0, _drop(frozenset(quiet)))
    journal = None if console else journal_socket_for(stream)
    if console:
        processors.append(structlog.dev.ConsoleRenderer(colors=colours_wanted(stream)))
    elif journal is not None:
        processors += [structlog.processors.format_exc_info, JournaldRenderer(journal)]
    else:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    route_stdlib_logging(level)
