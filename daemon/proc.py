"""The one place that starts subprocesses: an argv tuple, a wall-clock timeout, limits, stderr kept.

Stages build argv as data and call `run`; nothing here knows about ffmpeg's options. A tool that
reads untrusted input runs under resource limits (address space, file size, CPU seconds) and at a
lowered CPU and I/O priority: util-linux's `prlimit`, coreutils' `nice` and util-linux's `ionice`
exec into it one after the other, so the limits are in place before the tool reads a byte, with
no Python code between fork and exec (`preexec_fn` can deadlock in a threaded process).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from daemon.control import JobControl
from daemon.errors import ToolError, ToolMissing, ToolTimeout

STDERR_TAIL_LINES = 20
CANCEL_POLL_S = 0.5
# prlimit, nice and ionice exit 127 when the program they should exec is not found (126: not
# executable); ffmpeg itself never exits with these.
MISSING_EXIT_CODES = (126, 127)


@dataclass(frozen=True)
class Limits:
    """Resource limits and priority for a tool that reads untrusted input."""

    address_space_bytes: int = 4 << 30  # RLIMIT_AS: a decoder bomb hits this, not the server's memory
    file_size_bytes: int = 1 << 30  # RLIMIT_FSIZE: the most any file the tool writes may grow
    cpu_seconds: int = 3600  # RLIMIT_CPU: a decoder spinning in a loop is killed by the kernel
    nice: int = 10  # below the daemon, so the GPU worker is never starved of CPU by a decode
    io_priority: int = 7  # best-effort class, lowest priority: a decode yields the disk to others

    def wrap(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        """Return argv run under these limits (the tool keeps the pid: each wrapper execs the next)."""
        return (
            "prlimit", f"--as={self.address_space_bytes}", f"--fsize={self.file_size_bytes}",
            f"--cpu={self.cpu_seconds}", "--",
            "nice", "-n", str(self.nice),
            "ionice", "-c", "2", "-n", str(self.io_priority),
            *argv,
        )  # fmt: skip


LIMIT_TOOLS = ("prlimit", "nice", "ionice")  # what `Limits.wrap` needs installed
PIPELINE_TOOLS = ("ffmpeg", "ffprobe", *LIMIT_TOOLS)  # what processing any file needs


def require_tools(tools: Sequence[str] = PIPELINE_TOOLS) -> None:
    """Raise ToolMissing naming every tool not on PATH, with how to install it."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise ToolMissing(f"{' and '.join(missing)} not found on PATH; install ffmpeg (apt-get install "
                          "ffmpeg); prlimit and ionice come with util-linux, nice with coreutils")


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


def run(
    argv: Sequence[str],
    *,
    timeout_s: float,
    control: JobControl | None = None,
    limits: Limits | None = None,
    pass_fds: Sequence[int] = (),
) -> Completed:
    """Return the output of argv run to completion; raise ToolError, ToolTimeout or JobCancelled.

    The child gets its own process group so a timeout kills everything it started, and no
    stdin so it can never wait for a terminal. A cancelled `control` kills it within half a second;
    while it runs, each poll counts as the worker's heartbeat. `limits` runs it under resource
    limits; `pass_fds` are descriptors it inherits (it reads an input as /proc/self/fd/N).
    Errors name the tool's own argv, not the wrappers.
    """
    argv = tuple(argv)
    try:
        proc = subprocess.Popen(
            limits.wrap(argv) if limits is not None else argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as err:
        raise ToolError(argv, None, f"{err.filename or argv[0]}: program not found; is it installed?") from err
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
        if limits is not None and proc.returncode in MISSING_EXIT_CODES:
            # A wrapper could not exec the next program: say which, as Popen would for the first.
            missing = tail(stderr).splitlines()[-1:] or ["a program the limits need is missing"]
            raise ToolError(argv, None, f"{missing[0]}; is it installed?")
        raise ToolError(argv, proc.returncode, tail(stderr))
    return Completed(argv, stdout, tail(stderr))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
