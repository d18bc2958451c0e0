"""Logging: JSON lines in pipes, journald's native protocol under systemd (a real datagram socket)."""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

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
