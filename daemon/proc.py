"""The one place that starts subprocesses: an argv tuple, a wall-clock timeout, stderr kept.

Stages build argv as data and call `run`; nothing here knows about ffmpeg's options.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from daemon.control import JobControl
from daemon.errors import ToolError, ToolTimeout

STDERR_TAIL_LINES = 20
CANCEL_POLL_S = 0.5


@dataclass(frozen=True)
class Completed:
    """A finished process: what it wrote to stdout and the last lines of its stderr."""

    argv: tuple[str, ...]
    stdout: bytes
    stderr_tail: str


def tail(text: bytes, lines: int = STDERR_TAIL_LINES) -> str:
    """Return the last `lines` lines of a process's output, decoded leniently."""
    decoded = text.decode("utf-8", errors="replace").rstrip()
    return "\n".join(decoded.splitlines()[-lines:])


def run(argv: Sequence[str], *, timeout_s: float, control: JobControl | None = None) -> Completed:
    """Return the output of argv run to completion; raise ToolError, ToolTimeout or JobCancelled.

    The child gets its own process group so a timeout kills everything it started, and no
    stdin so it can never wait for a terminal. A cancelled `control` kills it within half a second;
    while it runs, each poll counts as the worker's heartbeat.
    """
    argv = tuple(argv)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError as err:
        raise ToolError(argv, None, f"{argv[0]}: program not found; is it installed?") from err
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            try:
                # Retrying communicate() after a timeout loses no output (documented).
                stdout, stderr = proc.communicate(timeout=max(min(remaining, CANCEL_POLL_S), 0))
                break
            except subprocess.TimeoutExpired:
                if control is not None:
                    control.check()  # raises JobCancelled; the except below kills the tool
                if time.monotonic() >= deadline:
                    _kill_group(proc)
                    _, stderr = proc.communicate()
                    raise ToolTimeout(argv, timeout_s, tail(stderr)) from None
    except ToolTimeout:
        raise
    except BaseException:
        # Interrupted (a cancelled job, a second SIGTERM): never leave an orphan decoder running.
        _kill_group(proc)
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise ToolError(argv, proc.returncode, tail(stderr))
    return Completed(argv, stdout, tail(stderr))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
