"""The worker: claims a job, runs the pipeline, and maps the outcome onto the journal and the disk.

The order of steps is what makes a crash at any instant safe:
  1. journal: claim (RUNNING), then record the processing path;
  2. move the original from the inbox into the processing area (users and rescans see it taken);
  3. run the pipeline; outputs are published atomically under fixed names (a rerun overwrites,
     never duplicates);
  4. journal: published (outputs durable);
  5. journal: the disposal target; then move the original to archive / back to inbox, or delete;
  6. journal: done.
A restart requeues RUNNING jobs; the claim then resumes from whatever step the disk shows.
"""

from __future__ import annotations

import contextlib
import os
import random
import stat
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import structlog

from daemon import layout
from daemon.config import Config, Folder, Rule
from daemon.control import JobControl
from daemon.errors import GpuFault, JobCancelled, JobError, MediaError, ModelError, TransientError
from daemon.fsutil import atomic_write_text, durable_move, free_name, move_to_free_name
from daemon.instances import default_owner
from daemon.journal import Job, Journal
from daemon.pipeline import process_file
from daemon.pipeline.transcribe import WhisperEngine
from daemon.retry import retry_delay

log = structlog.get_logger(__name__)

PROGRESS_EVERY_S = 1.0  # journal writes for progress, at most this often
CRASH_LIMIT = 3  # a file during which the process died this often is set aside in the failed folder
MODEL_RETRY_S = 30.0  # when a model failed to load but the registry gave no retry time


class Worker:
    """Processes one due job per `run_once` call; the service runs it in a loop on a thread."""

    def __init__(
        self,
        config: Callable[[], Config],
        journal: Journal,
        engine: WhisperEngine,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        on_retry: Callable[[Job, float], None] | None = None,
    ) -> None:
        self.config = config
        self.journal = journal
        self.engine = engine
        self.owner = owner or default_owner()
        self.clock = clock
        self.jitter = jitter
        self.on_retry = on_retry  # told (job, due) so the service can schedule a wake-up
        self.control = JobControl()
        self.current: Job | None = None
        self.progress: float | None = None  # the current job's fraction done, for status lines

    def cancel(self) -> None:
        """Ask the running job to stop at its next safe point; it goes back to the queue."""
        self.control.cancel()

    def run_once(self, now: float | None = None) -> Job | None:
        """Claim and process the next due job; return it, or None when nothing was due."""
        config = self.config()
        now = self.clock() if now is None else now
        job = self.journal.claim(list(config.folders), now=now, owner=self.owner)
        if job is None:
            return None
        self.current, self.progress = job, 0.0
        try:
            self._process(config, job)
        except (GpuFault, JobCancelled):
            raise
        except Exception as err:
            # Handling the outcome failed too (failed/ unwritable, disk full): never leave the job
            # RUNNING under a live owner, where nothing would pick it up again.
            log.exception("job_handling_failed", job_id=job.id, folder=job.folder, file=job.rel_path)
            delay = retry_delay(job.attempts + 1, 30.0, 3600.0, self.jitter()) + 1.0
            self.journal.mark_retry(job.id, _reason(err), "worker", now=self.clock(), due=self.clock() + delay)
        finally:
            self.current, self.progress = None, None
        return self.journal.get(job.id) or job

    # -- one job ------------------------------------------------------------------------------

    def _process(self, config: Config, job: Job) -> None:
        folder = config.folders[job.folder]
        rule = config.rule_for(job.folder, job.rel_path)
        if job.overrides:
            rule = rule.with_overrides(job.overrides)
        bound = log.bind(job_id=job.id, folder=job.folder, file=job.rel_path, attempt=job.attempts + 1)
        source: Path | None = None
        try:
            if job.published_at is None:
                # The model first: while it cannot be loaded the file stays in the inbox, untouched.
                with self.control.keepalive():  # a first use may download or convert it: no checks meanwhile
                    self.engine.registry.get(rule.model)
            try:
                source = self._take(job, folder, bound)
            except _Refused as refused:
                source = refused.path
                raise MediaError("refused: not a regular file (symlink, FIFO or device)",
                                 path=job.rel_path, stage="claim") from None
            if source is None:
                return
            if job.crashes >= CRASH_LIMIT and job.published_at is None:
                raise MediaError(
                    f"whisperd stopped {job.crashes} times while processing this file (killed, out of "
                    "memory, watchdog or GPU fault); it is set aside so the others can flow",
                    path=job.rel_path, stage="crash",
                )
            if job.published_at is None:
                bound.info("job_started", model=rule.model, task=rule.task)
                result = process_file(
                    source, rule, self.engine, config.settings,
                    target_dir=layout.outbox_dir(folder, job.rel_path),
                    stem=Path(job.rel_path).stem,
                    progress=self._progress_reporter(job),
                    control=self.control,
                )  # fmt: skip
                self.journal.mark_published(job.id, result.outputs, result.timings, now=self.clock())
                audio_s = result.transcript.audio_duration_s
                total = sum(result.timings.values())
                bound.info("job_published", outputs=len(result.outputs), audio_s=round(audio_s, 2),
                           duration_s=round(total, 2), rtf=round(total / audio_s, 4) if audio_s else None)
            disposed = self._dispose(job, folder, rule, source)
            self.journal.mark_done(job.id, disposed, now=self.clock())
            bound.info("job_done", on_success=rule.on_success, original=str(disposed) if disposed else None)
        except JobCancelled:
            self.journal.requeue(job.id, now=self.clock())
            bound.info("job_requeued", reason="shutdown")
        except ModelError as err:
            # The environment's fault (no network for a download, a model path that is wrong), never
            # the file's: no attempt is counted, and the job waits until the model is tried again.
            wait = self.engine.registry.retry_in(rule.model) or MODEL_RETRY_S
            self.journal.requeue(job.id, now=self.clock(), due=self.clock() + wait)
            bound.info("job_postponed", reason=f"model {rule.model!r} is unavailable", retry_in_s=round(wait),
                       error=str(err))
            if self.on_retry is not None:
                self.on_retry(job, self.clock() + wait)
        except GpuFault as err:
            self.journal.requeue(job.id, now=self.clock(), crashed=True)
            bound.critical("gpu_fault", error=str(err), consequence="job requeued; the process exits to recover")
            raise
        except MediaError as err:
            self._fail(job, folder, rule, source, err, bound)
        except FileNotFoundError as err:
            # The original disappeared from under us (someone removed it mid-job): nothing to keep.
            self.journal.drop(job.id)
            bound.warning("file_vanished", error=str(err))
        except Exception as err:  # transient by type, or unexpected: retry, then give up
            attempts = job.attempts + 1
            if attempts >= rule.max_attempts:
                self._fail(job, folder, rule, source, err, bound)
                return
            delay = retry_delay(attempts, rule.retry_base_delay, rule.retry_max_delay, self.jitter())
            if isinstance(err, TransientError) and err.delay_s is not None:
                delay = err.delay_s  # the cause knows better (e.g. a service asking to come back later)
            due = self.clock() + delay
            self.journal.mark_retry(job.id, _reason(err), getattr(err, "stage", None), now=self.clock(), due=due)
            level = bound.warning if isinstance(err, TransientError) else bound.error
            level("job_retry", error=_reason(err), stage=getattr(err, "stage", None),
                  retry_in_s=round(delay, 1), attempts=attempts, max_attempts=rule.max_attempts,
                  exc_info=not isinstance(err, JobError))
            if self.on_retry is not None:
                self.on_retry(job, due)

    def _take(self, job: Job, folder: Folder, bound: structlog.typing.FilteringBoundLogger) -> Path | None:
        """Return the original's path in the processing area, moving it there if needed.

        None means the job is over without processing: the file vanished or changed before it
        was taken (dropped), or an earlier run already disposed of it (finished now).
        """
        target = job.processing or layout.processing_path(folder, job.id, job.rel_path)
        if os.path.lexists(target):
            if not stat.S_ISREG(os.lstat(target).st_mode):
                raise _Refused(target)  # something was planted in the processing area
            return target
        if job.disposed_path and os.path.lexists(job.disposed_path):
            # A crash came after the original was disposed of but before the journal said so.
            if job.published_at is not None:
                self.journal.mark_done(job.id, Path(job.disposed_path), now=self.clock())
                bound.info("job_done", recovered=True)
            else:
                self.journal.mark_failed(job.id, job.last_error or "failed (recorded after a restart)",
                                         job.last_stage, Path(job.disposed_path), now=self.clock())
                bound.info("job_failed", recovered=True)
            return None
        if job.published_at is not None and job.disposed_path is None:
            # Published, no disposal target recorded, original gone: it was deleted on success.
            self.journal.mark_done(job.id, None, now=self.clock())
            return None
        inbox_file = layout.inbox_path(folder, job.rel_path)
        try:
            st = os.lstat(inbox_file)
        except FileNotFoundError:
            self.journal.drop(job.id)
            bound.info("file_vanished", reason="gone from the inbox before it was taken")
            return None
        if not stat.S_ISREG(st.st_mode):
            # Take it out of the inbox all the same (rename moves a link, never its target),
            # so _fail can put it in the failed folder with its reason.
            self.journal.set_processing(job.id, target, now=self.clock())
            durable_move(inbox_file, target)
            raise _Refused(target)
        if (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns):
            # Rewritten since it settled: this arrival is obsolete, the watcher will enqueue the new one.
            self.journal.drop(job.id)
            bound.info("file_changed", reason="changed after it was queued; waiting for it to settle again")
            return None
        self.journal.set_processing(job.id, target, now=self.clock())
        durable_move(inbox_file, target)
        return target

    def _progress_reporter(self, job: Job) -> Callable[[float], None]:
        last = [0.0]

        def report(fraction: float) -> None:
            self.progress = fraction
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or fraction >= 1.0:
                last[0] = now
                self.journal.set_progress(job.id, fraction, now=self.clock())

        return report

    def _dispose(self, job: Job, folder: Folder, rule: Rule, source: Path) -> Path | None:
        """Return where the original went after success (None when deleted)."""
        if rule.on_success == "delete":
            source.unlink()
            _cleanup_empty_dirs(source.parent, layout.processing_root(folder))
            return None
        if rule.on_success == "archive":
            wanted = layout.archive_path(folder, job.rel_path)
        else:  # keep: back where it came from, unchanged, so rescans see a known, done identity
            wanted = layout.inbox_path(folder, job.rel_path)
        if job.disposed_path and Path(job.disposed_path).parent == wanted.parent:
            wanted = Path(job.disposed_path)  # resume the move a crash interrupted
        target = free_name(wanted)
        self.journal.set_disposal(job.id, target, now=self.clock())
        moved = move_to_free_name(source, target)
        if moved != target:  # another process took the name meanwhile
            self.journal.set_disposal(job.id, moved, now=self.clock())
        _cleanup_empty_dirs(source.parent, layout.processing_root(folder))
        return moved

    def _fail(
        self, job: Job, folder: Folder, rule: Rule, source: Path | None, err: Exception,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """Move the original to the failed folder with an error report beside it; end the job."""
        attempts = job.attempts + 1
        target: Path | None = None
        if source is not None and os.path.lexists(source):
            target = free_name(layout.failed_path(folder, job.rel_path))
            target.parent.mkdir(parents=True, exist_ok=True)
            # The report first: a crash between the two steps leaves a report, never a bare original.
            report = error_report(job, folder, rule, err, attempts, target, now=self.clock())
            atomic_write_text(layout.error_file(target), lambda handle: print(report, end="", file=handle))
            self.journal.set_disposal(job.id, target, now=self.clock())
            moved = move_to_free_name(source, target)
            if moved != target:  # another process took the name meanwhile: the report follows
                os.replace(layout.error_file(target), layout.error_file(moved))
                self.journal.set_disposal(job.id, moved, now=self.clock())
                target = moved
            _cleanup_empty_dirs(source.parent, layout.processing_root(folder))
        self.journal.mark_failed(job.id, _reason(err), getattr(err, "stage", None), target, now=self.clock())
        bound.error("job_failed", error=_reason(err), stage=getattr(err, "stage", None),
                    attempts=attempts, original=str(target) if target else None,
                    permanent=isinstance(err, MediaError))


class _Refused(Exception):
    """Control flow inside the worker: the inbox entry was taken but is not a regular file."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path


def _reason(err: BaseException) -> str:
    return err.reason if isinstance(err, JobError) else f"{type(err).__name__}: {err}"


def _cleanup_empty_dirs(directory: Path, stop: Path) -> None:
    """Remove now-empty directories from directory up to (not including) stop."""
    with contextlib.suppress(OSError):
        while directory != stop and stop in directory.parents:
            directory.rmdir()
            directory = directory.parent


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def error_report(
    job: Job, folder: Folder, rule: Rule, err: BaseException, attempts: int, target: Path, *, now: float
) -> str:
    """Return the text of `<name>.error.txt`: what failed, where, why, and what to do next."""
    stage = getattr(err, "stage", None) or "unknown"
    kind = (
        "This file cannot be processed as it is; trying again will not help."
        if isinstance(err, MediaError)
        else f"Every attempt failed ({attempts} of {rule.max_attempts}); the cause may be temporary."
    )
    lines = [
        "whisperd could not process this file.",
        "",
        f"File:        {job.rel_path}",
        f"Folder:      {folder.name} (inbox {folder.inbox})",
        f"Reason:      {_reason(err)}",
        f"Stage:       {stage}",
        f"Attempts:    {attempts} of {rule.max_attempts}",
        f"First seen:  {_utc(job.created_at)}",
        f"Failed at:   {_utc(now)}",
        f"Job:         {job.id}",
        "",
        kind,
    ]
    command = getattr(err, "command", None)
    if command:
        lines += ["", "Command:", f"  {command}"]
    stderr_tail = getattr(err, "stderr_tail", None)
    if stderr_tail:
        lines += ["", "Last lines of the tool's error output:"]
        lines += [f"  {line}" for line in stderr_tail.splitlines()]
    if not isinstance(err, JobError):
        lines += ["", "Traceback (for a bug report):"]
        lines += ["  " + line for line in "".join(traceback.format_exception(err)).splitlines()]
    lines += [
        "",
        f"To try again: fix the cause, then run `whisperd retry {job.id}` (or move {target.name}",
        f"back into the inbox as {layout.inbox_path(folder, job.rel_path)} and delete this report).",
        "",
    ]
    return "\n".join(lines)
