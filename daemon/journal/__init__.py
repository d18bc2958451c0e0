"""The journal: the single source of truth about every file whisperd has seen.

One row per job. A job is one arrival of one file: its identity is (folder, relative path, size,
mtime), and enqueueing is idempotent on it while the job is active. The interface is small so a
PostgreSQL journal for several hosts can stand beside the SQLite one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class JobState(str, enum.Enum):
    """Where a job stands. Active states hold the file's identity; the others are history."""

    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # claimed by a worker (the original sits in the processing area)
    RETRY_WAIT = "retry_wait"  # failed transiently; due again at next_attempt_at
    DONE = "done"  # outputs published, original disposed of
    FAILED = "failed"  # original moved to the failed folder with an error file

    @classmethod
    def active(cls) -> tuple[JobState, ...]:
        """Return the states in which a job still owns its file."""
        return (cls.QUEUED, cls.RUNNING, cls.RETRY_WAIT)


@dataclass(frozen=True)
class FileIdentity:
    """What makes two sightings of a file the same arrival."""

    folder: str
    rel_path: str  # posix path relative to the folder's inbox
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Job:
    """One row of the journal."""

    id: int
    folder: str
    rel_path: str
    size: int
    mtime_ns: int
    state: JobState
    priority: int
    attempts: int  # failed attempts so far
    next_attempt_at: float
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    last_error: str | None = None
    last_stage: str | None = None
    processing_path: str | None = None  # where the original lies while the job owns it (escaped text)
    published_at: float | None = None  # outputs are durable; only disposal of the original is left
    outputs: tuple[str, ...] = ()
    disposed_path: str | None = None  # archive or failed location of the original (escaped text)
    progress: float | None = None
    owner: str | None = None  # host:pid of the worker that claimed it
    timings: dict[str, float] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # rule fields set for this job alone
    crashes: int = 0  # times the process died while this job ran
    file_device: int | None = None  # the original's inode as it was taken (st_dev, st_ino) …
    file_inode: int | None = None  # … so a file planted in its place is told apart
    warning: str | None = None  # what the user should know about the result (a short decode)
    stays: int = 0  # 1 when the original stays in the inbox (kept, or failed in place): never pruned
    running_stage: str | None = None  # while running: probe, extract, transcribe or publish
    audio_s: float | None = None  # seconds of audio transcribed (for throughput)
    failure: str | None = None  # when failed: why, as a daemon.errors.Failure value

    @property
    def identity(self) -> FileIdentity:
        """Return the identity this job was enqueued under."""
        return FileIdentity(self.folder, self.rel_path, self.size, self.mtime_ns)



@dataclass(frozen=True)
class Instance:
    """A running whisperd process as it last reported itself."""

    owner: str  # host:pid, as in Job.owner
    started_at: float
    beat_at: float  # the last time it said it was alive
    models: tuple[str, ...]  # the models resident in it
    stopping_at: float | None = None  # when it was asked to stop, if it was
    paused: dict[str, str] = field(default_factory=dict)  # folder → why the environment paused it


def open_journal(state_dir: Path, *, create: bool = True) -> Journal:
    """Return the journal kept under the state directory (the one place that picks its backend).

    With create=False a missing journal raises FileNotFoundError (operator commands must not
    create an empty journal beside a daemon configured elsewhere).
    """
    from daemon.journal.sqlite import SqliteJournal

    path = state_dir / "journal.sqlite3"
    if not create and not path.exists():
        raise FileNotFoundError(path)
    return SqliteJournal(path)


class Journal(Protocol):
    """What the daemon needs from a job store."""

    def enqueue(
        self, identity: FileIdentity, *, priority: int, now: float, skip_if_done: bool,
        overrides: Mapping[str, Any] | None = None,
    ) -> Job | None:
        """Return a new queued job, or None when this identity is active (or done, if asked)."""
        ...

    def claim(self, folders: Collection[str], *, now: float, owner: str) -> Job | None:
        """Return the next due job of these folders, now RUNNING and owned by owner, or None."""
        ...

    def get(self, job_id: int) -> Job | None:
        """Return one job by id."""
        ...

    def jobs(
        self, states: Collection[JobState] | None = None, *, limit: int | None = None, newest_first: bool = False
    ) -> list[Job]:
        """Return jobs, optionally only those in the given states, oldest first (or latest changed, at most limit)."""
        ...

    def finished_since(self, since: float) -> list[Job]:
        """Return the jobs that ended (done or failed) at or after `since`, oldest first."""
        ...

    def set_processing(
        self, job_id: int, path: str, *, now: float, device: int | None = None, inode: int | None = None
    ) -> None:
        """Record where the original will be moved while the job owns it, and which inode it is."""
        ...

    def set_stage(self, job_id: int, stage: str, *, now: float) -> None:
        """Record which stage a running job has reached (probe, extract, transcribe, publish)."""
        ...

    def set_progress(self, job_id: int, fraction: float, *, now: float) -> None:
        """Record how far a running job is."""
        ...

    def mark_published(
        self, job_id: int, outputs: Sequence[str], timings: dict[str, float], *, now: float,
        warning: str | None = None, audio_s: float | None = None,
    ) -> None:
        """Record that outputs are durable (and what the user should know); only the disposal is left."""
        ...

    def mark_done(self, job_id: int, disposed_path: str | None, *, now: float, stays: bool = False) -> None:
        """Finish a job successfully; `stays`: the original stays in the inbox (on_success: keep)."""
        ...

    def mark_retry(self, job_id: int, error: str, stage: str | None, *, now: float, due: float) -> None:
        """Count a failed attempt and make the job due again at `due`."""
        ...

    def mark_failed(
        self, job_id: int, error: str, stage: str | None, disposed_path: str | None, *, now: float,
        failure: str = "gave_up",
    ) -> None:
        """Count a failed attempt and end the job as failed; `failure` says why (a daemon.errors.Failure)."""
        ...

    def mark_cancelled(
        self, job_id: int, reason: str, *, now: float,
        states: Collection[JobState] = (JobState.QUEUED, JobState.RETRY_WAIT),
    ) -> bool:
        """End a job in one of `states` as failed, cancelled by its client (its original is gone, so it
        is pruned like any finished job); return False when it was in none of them (a worker claimed
        a waiting one meanwhile, or it ended)."""
        ...

    def requeue(self, job_id: int, *, now: float, crashed: bool = False, due: float | None = None) -> None:
        """Return a running job to the queue without counting an attempt; `crashed` counts a crash.

        `due` (default now) is when it may be claimed again.
        """
        ...

    def drop(self, job_id: int) -> None:
        """Forget a job whose file vanished or changed before it was taken."""
        ...

    def set_disposal(self, job_id: int, path: str, *, now: float) -> None:
        """Record where the original is about to go (archive, failed, back to the inbox)."""
        ...

    def recover(self, is_dead: Callable[[str | None], bool], *, now: float) -> list[Job]:
        """Return jobs left RUNNING by workers that are gone, queued again; a crash is counted unless
        the worker had been asked to stop."""
        ...

    def requeue_failed(self, job_id: int, *, now: float) -> bool:
        """Return True when a failed job is queued again as new (attempts reset)."""
        ...

    def counts(self) -> dict[str, dict[str, int]]:
        """Return the number of jobs per folder and state (without scanning the jobs)."""
        ...

    def prune(self, *, before: float, batch: int = 5000) -> int:
        """Delete finished jobs that ended before `before`, except those whose original stays in the
        inbox; return how many."""
        ...

    def next_due_at(self, folders: Collection[str]) -> float | None:
        """Return when the earliest waiting job of these folders is due, or None."""
        ...

    def beat_instance(
        self, owner: str, *, now: float, started_at: float, models: Sequence[str],
        paused: Mapping[str, str] | None = None,
    ) -> None:
        """Record that a daemon process is alive, which models it holds and which folders it paused."""
        ...

    def pause(self, folder: str, *, now: float) -> bool:
        """Stop claiming from a folder ('*': every folder); return False if it was paused already."""
        ...

    def resume(self, folder: str) -> bool:
        """Claim from a folder again ('*': lift the pause of every folder); return False if it was not paused."""
        ...

    def pauses(self) -> dict[str, float]:
        """Return the folders an operator paused ('*' for all), and since when."""
        ...

    def mark_stopping(self, owner: str, *, now: float) -> None:
        """Record that a daemon process was asked to stop."""
        ...

    def remove_instance(self, owner: str) -> None:
        """Forget a daemon process that stopped cleanly."""
        ...

    def instances(self) -> list[Instance]:
        """Return the daemon processes that reported themselves, most recent beat first."""
        ...

    def close(self) -> None:
        """Release the store."""
        ...
