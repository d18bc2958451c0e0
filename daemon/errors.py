"""The exception tree. The worker decides retry or fail by an exception's type, never its message.

WhisperdError
├── ConfigError          the configuration is invalid: every problem, each with its location
├── UsageError           a command line asks for what cannot be done (exit 2, one line)
├── ToolError            an external program (ffmpeg, ffprobe) failed: argv, exit code, stderr tail
│   └── ToolTimeout      … or ran past its wall-clock limit
├── ToolMissing          ffmpeg or ffprobe is not installed: the daemon refuses to start
├── JobError             one file could not be processed; carries what an operator needs
│   ├── MediaError       permanent: not media, no audio, refused input. Retrying cannot help.
│   └── TransientError   worth another attempt later: disk full, timeout, GPU out of memory
├── UnsafePath           a path below a root leads through a symlink (also an OSError)
├── ModelError           a model cannot be found or loaded
├── GpuFault             the CUDA context is poisoned: only a new process recovers
├── JobCancelled         control flow: the running job was asked to stop (shutdown); requeue it
└── FileChanged          control flow: the original changed while it was processed (still arriving)
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class WhisperdError(Exception):
    """Base of every error whisperd raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One mistake in a config file: where (`folders[1].rules[0].task`) and what."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class ConfigError(WhisperdError):
    """The configuration is invalid; `problems` lists every mistake found, not just the first."""

    def __init__(self, problems: Sequence[ConfigProblem], source: str | Path | None = None) -> None:
        self.problems = tuple(problems)
        self.source = str(source) if source is not None else None
        where = f" in {self.source}" if self.source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class UsageError(WhisperdError):
    """A command line asks for what cannot be done: an unknown folder, a language or model that does
    not exist. Reported in one line before any file is touched; the command exits 2."""


class ListenerError(WhisperdError):
    """The HTTP API cannot start: its address is taken or refused, or its tokens file cannot be read."""


class RequestRefused(WhisperdError):
    """An HTTP API request cannot be answered with a transcript; `status` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after  # seconds, for a Retry-After header (503: try again later)


class ToolError(WhisperdError):
    """An external program failed. Keeps the argv and the last lines of its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr_tail: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        last = stderr_tail.strip().splitlines()[-1] if stderr_tail.strip() else "no error output"
        # No exit code: the program never started (not installed, or a wrapper could not exec it).
        outcome = f"exited with code {returncode}" if returncode is not None else "could not run"
        super().__init__(f"{self.argv[0]} {outcome}: {last}")

    @property
    def abnormal(self) -> bool:
        """Return True when the tool did not run or was killed by a signal: no verdict on the file."""
        return self.returncode is None or self.returncode < 0

    @property
    def command(self) -> str:
        """Return the command line as one string, for error files and logs."""
        import shlex

        return shlex.join(self.argv)


class ToolTimeout(ToolError):
    """An external program ran past its wall-clock limit and was killed with its process group."""

    def __init__(self, argv: Sequence[str], timeout_s: float, stderr_tail: str) -> None:
        super().__init__(argv, None, stderr_tail)
        self.timeout_s = timeout_s
        self.args = (f"{self.argv[0]} did not finish within {timeout_s:g} s and was killed",)


class ToolMissing(WhisperdError):
    """ffmpeg or ffprobe is not installed: the daemon refuses to start rather than fail every file."""


class JobError(WhisperdError):
    """Processing one file failed. Carries the file, the stage and, for tools, the command."""

    def __init__(
        self,
        reason: str,
        *,
        path: Path | str | None = None,
        stage: str | None = None,
        command: str | None = None,
        stderr_tail: str | None = None,
    ) -> None:
        self.reason = reason
        self.path = Path(path) if path is not None else None
        self.stage = stage
        self.command = command
        self.stderr_tail = stderr_tail
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

    @classmethod
    def from_tool(
        cls, reason: str, err: ToolError, *, path: Path | str, stage: str
    ) -> JobError:
        """Return this error class wrapping a failed tool run, keeping its command and stderr."""
        return cls(reason, path=path, stage=stage, command=err.command, stderr_tail=err.stderr_tail)


class Failure(str, enum.Enum):
    """Why a job ended as failed, in the journal: what the HTTP API answers a client from."""

    REFUSED = "refused"  # the file as it is cannot be processed: the sender's to fix
    TOO_LONG = "too_long"  # it lasts longer than the folder's max_duration
    GAVE_UP = "gave_up"  # every attempt failed for a reason the file may not be to blame for
    CANCELLED = "cancelled"  # its client cancelled it (an HTTP API job)


class MediaError(JobError):
    """Permanent: the file cannot be processed as it is (not media, no audio, refused input)."""

    failure = Failure.REFUSED


class TooLong(MediaError):
    """Permanent: the file lasts longer than its folder's max_duration."""

    failure = Failure.TOO_LONG


class TransientError(JobError):
    """Worth retrying later; `delay_s` overrides the backoff when the cause knows better."""

    def __init__(self, reason: str, *, delay_s: float | None = None, **kwargs: object) -> None:
        super().__init__(reason, **kwargs)  # type: ignore[arg-type]
        self.delay_s = delay_s


class UnsafePath(WhisperdError, OSError):
    """A folder on the way to a file is a symbolic link (or not a folder): whisperd does not follow it.

    Also an OSError, so a writer that treats I/O failures as the environment's does the same here;
    the worker tells the inbox's case (the file is refused) from the others by its place.
    """

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


class ModelError(WhisperdError):
    """A model cannot be found or loaded; the message lists what is available."""


class GpuFault(WhisperdError):
    """A CUDA error that poisons the context (illegal memory access, ECC error): every later call
    fails too, so the job goes back to the queue and the process exits for systemd to restart it."""


class JobCancelled(WhisperdError):
    """The running job was asked to stop (shutdown): it goes back to the queue, no attempt counted."""


class FileChanged(WhisperdError):
    """The original changed while it was being processed: it is still arriving (a copy that paused).

    Not the file's fault and not an attempt: the work is discarded, the original goes back to the
    inbox and waits to settle again.
    """
