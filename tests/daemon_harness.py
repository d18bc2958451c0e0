"""Runs `whisperd run` as a real subprocess on a config in tmp_path, and waits on what it does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from daemon.journal import Job, JobState
from daemon.journal.sqlite import SqliteJournal

ROOT = Path(__file__).resolve().parents[1]


class Daemon:
    """One whisperd process with its config, log file and folders under `root`."""

    def __init__(self, root: Path, data: dict[str, Any]) -> None:
        self.root = root
        self.data = data
        self.config_path = root / "config.yaml"
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(data)

    def write_config(self, data: dict[str, Any]) -> None:
        """Write (or rewrite, before a SIGHUP) the config file."""
        self.data = data
        self.config_path.write_text(yaml.safe_dump(data))

    def folder(self, role: str, name: str = "media") -> Path:
        """Return a configured folder path (inbox, outbox, archive, failed) of a folder."""
        entry = next(f for f in self.data["folders"] if f["name"] == name)
        return Path(entry[role])

    def start(self, *, wait_ready: bool = True, env: dict[str, str] | None = None) -> Daemon:
        """Start the daemon; by default wait until it logs `ready`."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )  # fmt: skip
        log.close()
        if wait_ready:
            self.wait_for(lambda: self.event("ready") is not None, 60, "the daemon to be ready")
        return self

    @property
    def pid(self) -> int:
        """Return the running daemon's pid."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def owner(self) -> str:
        """Return the running daemon's owner token (host:pid), as the journal records it."""
        import socket

        return f"{socket.gethostname()}:{self.pid}"

    def events(self, name: str | None = None, *, all_runs: bool = False) -> list[dict[str, Any]]:
        """Return the JSON log events of this run (or all runs), optionally only one kind."""
        if not self.log_path.exists():
            return []
        raw = self.log_path.read_bytes()[0 if all_runs else self._log_offset:]
        found = []
        for line in raw.decode("utf-8", "replace").splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if name is None or event.get("event") == name:
                    found.append(event)
        return found

    def event(self, name: str) -> dict[str, Any] | None:
        """Return the first event of this kind in this run, or None."""
        events = self.events(name)
        return events[0] if events else None

    def jobs(self, states: tuple[JobState, ...] | None = None) -> list[Job]:
        """Return the journal's jobs (read through a separate connection, as an operator would)."""
        path = Path(self.data["state_dir"]) / "journal.sqlite3"
        if not path.exists():
            return []
        journal = SqliteJournal(path)
        try:
            return journal.jobs(states)
        finally:
            journal.close()

    def wait_for(self, condition: Callable[[], object], timeout: float, what: str) -> Any:
        """Return condition()'s first truthy value; fail with the log tail after timeout seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}\n{self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.tail()}")

    def wait_done(self, count: int, timeout: float = 60) -> list[Job]:
        """Wait until `count` jobs are finished (done or failed) and none is active."""
        def finished() -> list[Job] | None:
            jobs = self.jobs()
            ended = [j for j in jobs if j.state in (JobState.DONE, JobState.FAILED)]
            active = [j for j in jobs if j.state in JobState.active()]
            return ended if len(ended) >= count and not active else None

        return self.wait_for(finished, timeout, f"{count} finished jobs")  # type: ignore[no-any-return]

    def signal(self, signum: int) -> None:
        """Send a signal to the daemon."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM the daemon and return its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """kill -9 the daemon, as a crash or the OOM killer would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def tail(self, lines: int = 40) -> str:
        """Return the end of the daemon's log, for failure messages."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def files_under(root: Path) -> list[str]:
    """Return every file below root as sorted relative posix paths (hidden ones included)."""
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def drop_file(source: Path, target: Path) -> Path:
    """Copy a file into an inbox the way a copy tool does: to a .part name, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    shutil.copyfile(source, part)
    os.rename(part, target)
    return target
