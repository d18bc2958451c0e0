"""Logging: JSON lines in pipes, journald's native protocol under systemd (a real datagram socket)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from daemon import log as logsetup


def _parse_datagram(data: bytes) -> dict[str, str]:
    """Return the fields of a journald native-protocol datagram (both plain and binary forms)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        newline = data.index(b"\n", pos)
        line = data[pos:newline]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            fields[name.decode()] = value.decode()
            pos = newline + 1
        else:
            (length,) = struct.unpack("<Q", data[newline + 1:newline + 9])
            start = newline + 9
            fields[line.decode()] = data[start:start + length].decode()
            pos = start + length + 1
    return fields


def test_json_lines_when_not_under_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without JOURNAL_STREAM each event is one JSON object per line with its key/value fields."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    with open(tmp_path / "out.log", "w") as stream:
        logsetup.configure("auto", "info", stream)
        structlog.get_logger().info("job_done", job_id=7, folder="lectures", rtf=0.12)
        structlog.get_logger().debug("not shown at info")
    [line] = (tmp_path / "out.log").read_text().splitlines()
    event = json.loads(line)
    assert (event["event"], event["job_id"], event["folder"], event["level"]) == ("job_done", 7, "lectures", "info")


def test_events_go_to_journald_as_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under systemd every event arrives at journald's socket as its own fields; nothing goes to stderr."""
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal.sock"))
    journal.settimeout(5)
    with open(tmp_path / "stderr.log", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.setenv(logsetup.JOURNAL_SOCKET_ENV, str(tmp_path / "journal.sock"))
        logsetup.configure("auto", "info", stream)
        structlog.get_logger().error("job_failed", job_id=3, file="talks/a b.mp4", attempts=2,
                                     error="ffprobe said:\nInvalid data")
    fields = _parse_datagram(journal.recv(65536))
    assert fields["PRIORITY"] == "3" and fields["SYSLOG_IDENTIFIER"] == "whisperd"
    assert (fields["EVENT"], fields["JOB_ID"], fields["ATTEMPTS"]) == ("job_failed", "3", "2")
    assert fields["FILE"] == "talks/a b.mp4"
    assert fields["ERROR"] == "ffprobe said:\nInvalid data"  # the binary form keeps the newline
    assert fields["MESSAGE"].startswith("job_failed job_id=3 file=talks/a b.mp4")
    assert (tmp_path / "stderr.log").read_text() == ""
    journal.close()


def test_inherited_journal_stream_is_ignored_when_stderr_is_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JOURNAL_STREAM that does not name our stderr (inherited by a shell) leaves JSON on stderr."""
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    with open(tmp_path / "out.log", "w") as stream:
        assert logsetup.journal_socket_for(stream) is None
        logsetup.configure("auto", "info", stream)
        structlog.get_logger().info("ready")
    assert json.loads((tmp_path / "out.log").read_text())["event"] == "ready"


def test_journald_away_falls_back_to_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If journald's socket cannot be reached the event is kept as a JSON line on stderr."""
    with open(tmp_path / "stderr.log", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.setenv(logsetup.JOURNAL_SOCKET_ENV, str(tmp_path / "missing.sock"))
        logsetup.configure("auto", "info", stream)
        structlog.get_logger().warning("job_retry", job_id=1)
    assert json.loads((tmp_path / "stderr.log").read_text())["event"] == "job_retry"


def _pty_stream() -> tuple[TextIO, int]:
    """Return a text stream on a pseudo-terminal's slave side (a real terminal), and the master fd."""
    master, slave = os.openpty()
    return open(slave, "w", buffering=1, encoding="utf-8"), master


def _read_all(master: int) -> str:
    os.set_blocking(master, False)
    chunks = []
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(master, 65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def test_console_colours_only_on_a_terminal_and_never_with_no_color(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Console lines are coloured on a terminal; redirected to a file, or with NO_COLOR set, they are plain."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    with open(tmp_path / "console.log", "w") as stream:
        logsetup.configure("console", "info", stream)
        structlog.get_logger().info("job_done", job_id=1)
    plain = (tmp_path / "console.log").read_text()
    assert "job_done" in plain and "\x1b[" not in plain

    for no_color, coloured in ((None, True), ("1", False)):
        if no_color is None:
            monkeypatch.delenv("NO_COLOR", raising=False)
        else:
            monkeypatch.setenv("NO_COLOR", no_color)
        terminal, master = _pty_stream()
        with terminal:
            logsetup.configure("auto", "info", terminal)
            structlog.get_logger().info("job_done", job_id=1)
        shown = _read_all(master)
        os.close(master)
        assert "job_done" in shown and ("\x1b[" in shown) == coloured, (no_color, shown)


def test_library_warnings_go_through_structlog(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """APScheduler's "Run time of job … was missed" and Python warnings arrive as JSON events, not raw lines."""
    from apscheduler.schedulers.background import BackgroundScheduler

    with open(tmp_path / "out.log", "w") as stream:
        logsetup.configure("json", "info", stream)
        scheduler = BackgroundScheduler(timezone=timezone.utc)
        # A wake-up whose time passed while the process was down, as at a restart.
        scheduler.add_job(print, "date", run_date=datetime.now(timezone.utc) - timedelta(seconds=30),
                          misfire_grace_time=1)
        scheduler.start()
        deadline = time.monotonic() + 10
        while "was missed" not in (tmp_path / "out.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        scheduler.shutdown()
        warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
    events = [json.loads(line) for line in (tmp_path / "out.log").read_text().splitlines()]
    missed = [e for e in events if "was missed" in e.get("message", "")]
    assert [(e["event"], e["level"], e["logger"]) for e in missed] == [
        ("library_log", "warning", "apscheduler.executors.default")
    ]
    assert any(e["logger"] == "py.warnings" and "a library's deprecation" in e["message"] for e in events)
    # Their routine INFO lines ("Adding job", "Scheduler started") stay out, as before.
    assert all(e["level"] != "info" for e in events if e["event"] == "library_log")
    captured = capfd.readouterr()
    assert "was missed" not in captured.err + captured.out
