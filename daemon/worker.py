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
import errno
import os
import random
import shutil
import stat
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import structlog

from daemon import fsutil, layout, names
from daemon.config import Config, Folder, Rule
from daemon.control import Isolation, JobControl
from daemon.crashpoints import crash_point
from daemon.errors import (
    Failure,
    FileChanged,
    GpuFault,
    JobCancelled,
    JobError,
    MediaError,
    ModelError,
    TransientError,
    UnsafePath,
)
from daemon.fsutil import Place
from daemon.health import Health
from daemon.instances import default_owner
from daemon.journal import Job, JobState, Journal
from daemon.pipeline import process_file
from daemon.pipeline.source import Source
from daemon.pipeline.transcribe import WhisperEngine
from daemon.retry import retry_delay

log = structlog.get_logger(__name__)

PROGRESS_EVERY_S = 1.0  # journal writes for progress, at most this often
CRASH_LIMIT = 3  # after this many deaths during one file, one isolated attempt; one more and it is set aside
MODEL_RETRY_S = 30.0  # when a model failed to load but the registry gave no retry time
# Write errors that say something about where whisperd writes, not about the file being processed.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


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
        health: Health | None = None,
        isolation: Isolation | None = None,
        only: frozenset[str] | None = None,
    ) -> None:
        self.config = config
        self.only = only  # claim from these folders alone (the HTTP API's reserved worker); None: any
        self.journal = journal
        self.engine = engine
        self.owner = owner or default_owner()
        self.clock = clock
        self.jitter = jitter
        self.on_retry = on_retry  # told (job, due) so the service can schedule a wake-up
        self.health = health or Health()  # folders the environment pauses (a full outbox, a lost share)
        # Shared by the workers of one daemon (jobs_in_flight): a job that crashed whisperd before
        # gets its last attempt with nothing else in flight.
        self.isolation = isolation or Isolation()
        self.control = JobControl()
        self._current_lock = threading.Lock()  # a client's cancel must reach the job it names, no other
        self.current: Job | None = None
        self.progress: float | None = None  # the current job's fraction done, for status lines
        # Told (job, audio seconds, stage timings) once a job's outputs are durable: the HTTP API's metrics.
        self.on_published: Callable[[Job, float, dict[str, float]], None] | None = None

    def cancel(self) -> None:
        """Ask the running job to stop at its next safe point; it goes back to the queue."""
        self.control.cancel()

    def cancel_job(self, job_id: int) -> bool:
        """Return True when job_id runs here: it then stops at its next check and ends as cancelled
        (its original removed: an HTTP API job's client no longer wants it)."""
        with self._current_lock:
            if self.current is None or self.current.id != job_id:
                return False
            self.control.drop_job()
            return True

    def claimable_folders(self, now: float | None = None) -> list[str]:
        """Return the folders whose jobs may be claimed now: not paused by a fault or the operator."""
        config = self.config()
        paused = self.health.paused(config, self.clock() if now is None else now)
        held = self.journal.pauses()  # an operator's `whisperd pause`
        if "*" in held:
            return []
        return [name for name in config.folders
                if name not in paused and name not in held and (self.only is None or name in self.only)]

    def run_once(self, now: float | None = None) -> Job | None:
        """Claim and process the next due job; return it, or None when nothing was due."""
        config = self.config()
        now = self.clock() if now is None else now
        folders = self.claimable_folders(now)
        if not folders:
            return None
        job = self.journal.claim(folders, now=now, owner=self.owner)
        if job is None:
            return None
        crash_point("claimed")
        with self._current_lock:
            self.control.next_job()
            self.current, self.progress = job, 0.0
        last_chance = job.crashes == CRASH_LIMIT and job.published_at is None
        gate = self.isolation.alone if last_chance else self.isolation.shared
        try:
            with gate(self.control.beat):
                self._process(config, job)
        except (GpuFault, JobCancelled):
            raise
        except Exception as err:
            self._handling_failed(config, job, err)
        finally:
            with self._current_lock:
                self.current, self.progress = None, None
        return self.journal.get(job.id) or job

    def _handling_failed(self, config: Config, job: Job, err: Exception) -> None:
        """Handling the outcome failed too (failed/ unwritable, disk full): retry that, within max_attempts.

        Never leave the job RUNNING under a live owner, where nothing would pick it up again, and
        never retry forever: after the last attempt the job ends as failed where the original lies.
        """
        if self._postponed_by_environment(config, job, err):
            return
        attempts = job.attempts + 1
        try:
            rule = config.rule_for(job.folder, job.rel_path)
            max_attempts = rule.with_overrides(job.overrides).max_attempts if job.overrides else rule.max_attempts
        except (KeyError, ValueError):  # the folder left the config meanwhile
            max_attempts = 1
        if attempts >= max_attempts:
            where = job.processing_path or f"the inbox ({job.rel_path})"
            reason = f"{_reason(err)}; the original could not be moved to the failed folder and stays in {where}"
            self.journal.mark_failed(job.id, reason, "worker", None, now=self.clock())
            log.error("job_failed", job_id=job.id, folder=job.folder, file=job.rel_path, error=reason,
                      stage="worker", attempts=attempts, exc_info=not isinstance(err, (JobError, OSError)))
            return
        log.error("job_handling_failed", job_id=job.id, folder=job.folder, file=job.rel_path, error=_reason(err),
                  attempts=attempts, max_attempts=max_attempts, exc_info=not isinstance(err, (JobError, OSError)))
        delay = retry_delay(attempts, 30.0, 3600.0, self.jitter()) + 1.0
        self.journal.mark_retry(job.id, _reason(err), "worker", now=self.clock(), due=self.clock() + delay)

    # -- one job ------------------------------------------------------------------------------

    def _process(self, config: Config, job: Job) -> None:
        folder = config.folders[job.folder]
        rule = config.rule_for(job.folder, job.rel_path)
        if job.overrides:
            rule = rule.with_overrides(job.overrides)
        bound = log.bind(job_id=job.id, folder=job.folder, file=job.rel_path, attempt=job.attempts + 1)
        base = layout.processing_base(folder, config.settings.state_dir)
        ensure_area(folder, base)
        taken: _Taken | None = None
        refused_at: Place | None = None
        try:
            if job.published_at is None:
                # The model first: while it cannot be loaded the file stays in the inbox, untouched.
                with self.control.keepalive():  # a first use may download or convert it: no checks meanwhile
                    self.engine.registry.get(rule.model)
            try:
                taken = self._take(job, folder, base, bound)
            except _Refused as refused:
                refused_at = refused.place
                raise MediaError(f"refused: {refused.why}", path=job.rel_path, stage="claim") from None
            if taken is None:
                return
            crash_point("taken")
            if job.crashes > CRASH_LIMIT and job.published_at is None:
                raise MediaError(
                    f"whisperd stopped {job.crashes} times while processing this file (killed, out of "
                    "memory, watchdog or GPU fault), the last time in an attempt of its own; it is set "
                    "aside so the others can flow", path=job.rel_path, stage="crash",
                )
            if job.crashes == CRASH_LIMIT and job.published_at is None:
                # One more attempt, with nothing else in flight (run_once's isolation gate), so a
                # crash now is this file's doing and not a coincidence.
                bound.warning("isolated_attempt", crashes=job.crashes,
                              reason="whisperd died while processing this file before; if it dies again, the "
                                     "file is set aside")
            if job.published_at is None:
                bound.info("job_started", model=rule.model, task=rule.task)
                # Found before the work, not after: an outbox that cannot take files pauses the folder.
                fsutil.probe_writable(layout.outbox_dir(folder, job.rel_path))
                result = process_file(
                    taken.source, rule, self.engine, config.settings,
                    target_dir=layout.outbox_dir(folder, job.rel_path),
                    # The original's own bytes: a player matches subtitles to a video by its exact name.
                    stem=names.unescape(PurePosixPath(job.rel_path).stem),
                    progress=self._progress_reporter(job),
                    control=self.control,
                    work_dir=layout.work_dir(config.settings.state_dir, job.id),
                    on_stage=lambda stage: self.journal.set_stage(job.id, stage, now=self.clock()),
                    name=job.rel_path,  # every event names the file as the job events do
                )  # fmt: skip
                self.journal.mark_published(job.id, [names.escape(str(p)) for p in result.outputs],
                                            result.timings, now=self.clock(), warning=result.warning,
                                            audio_s=result.transcript.audio_duration_s)
                self.health.worked(job.folder)
                crash_point("published")
                audio_s = result.transcript.audio_duration_s
                total = sum(result.timings.values())
                bound.info("job_published", outputs=len(result.outputs), audio_s=round(audio_s, 2),
                           duration_s=round(total, 2), rtf=round(total / audio_s, 4) if audio_s else None)
                if self.on_published is not None:
                    self.on_published(job, audio_s, result.timings)
            disposed = self._dispose(job, folder, rule, taken.place)
            crash_point("disposed")
            self.journal.mark_done(job.id, disposed.display if disposed else None, now=self.clock(),
                                   stays=rule.on_success == "keep")
            bound.info("job_done", on_success=rule.on_success, original=disposed.display if disposed else None)
        except JobCancelled:
            if self.control.dropped and job.published_at is None:
                # Its client cancelled it: the original goes (an upload nobody waits for) and the job ends.
                if taken is not None:
                    taken.source.close()
                    fsutil.unlink(taken.place)
                    fsutil.remove_empty_dirs(taken.place.parent, _area_of(job, taken.place))
                    taken = None
                self.journal.mark_cancelled(job.id, "cancelled by its client", now=self.clock(),
                                            states=(JobState.RUNNING,))
                bound.info("job_cancelled", reason="cancelled by its client")
            else:
                self.journal.requeue(job.id, now=self.clock())
                bound.info("job_requeued", reason="shutdown")
        except FileChanged:
            # Still arriving (a copy that paused longer than the stability delay): discard the work,
            # put it back where its writer and the watcher expect it, and let it settle again.
            if taken is not None:
                taken.source.close()
                back = fsutil.move_to_free_name(taken.place, layout.inbox_place(folder, job.rel_path))
                fsutil.remove_empty_dirs(taken.place.parent, _area_of(job, taken.place))
                taken = None
                self.journal.drop(job.id)
                bound.info("file_changed", reason="it changed while it was processed: still being written; back "
                           "in the inbox to settle again (not counted as an attempt)", original=back.display)
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
            self._fail(job, folder, rule, refused_at or (taken.place if taken else None), err, bound)
        except FileNotFoundError as err:
            # The original disappeared from under us (someone removed it mid-job): nothing to keep.
            self.journal.drop(job.id)
            bound.warning("file_vanished", error=str(err))
        except Exception as err:  # transient by type, or unexpected: retry, then give up
            if self._postponed_by_environment(config, job, err):
                return
            attempts = job.attempts + 1
            if attempts >= rule.max_attempts:
                self._fail(job, folder, rule, taken.place if taken else None, err, bound)
                return
            delay = retry_delay(attempts, rule.retry_base_delay, rule.retry_max_delay, self.jitter())
            if isinstance(err, TransientError) and err.delay_s is not None:
                delay = err.delay_s  # the cause knows better (e.g. a service asking to come back later)
            due = self.clock() + delay
            self.journal.mark_retry(job.id, _reason(err), getattr(err, "stage", None), now=self.clock(), due=due)
            level = bound.warning if isinstance(err, (TransientError, OSError)) else bound.error
            level("job_retry", error=_reason(err), stage=getattr(err, "stage", None),
                  retry_in_s=round(delay, 1), attempts=attempts, max_attempts=rule.max_attempts,
                  exc_info=not isinstance(err, (JobError, OSError)))
            if self.on_retry is not None:
                self.on_retry(job, due)
        finally:
            if taken is not None:
                taken.source.close()
            ended = self.journal.get(job.id)
            if ended is None or ended.state not in JobState.active():
                # A transcript kept for a retry of the publish is of no use once the job is over.
                shutil.rmtree(layout.work_dir(config.settings.state_dir, job.id), ignore_errors=True)

    def _postponed_by_environment(self, config: Config, job: Job, err: Exception) -> bool:
        """Return True when the environment explains a failure (the folder is now paused): the job then
        waits, queued, with no attempt counted."""
        if not isinstance(err, (TransientError, OSError)) or job.folder not in config.folders:
            return False
        cause = err if isinstance(err, OSError) else err.__cause__
        problem: str | None
        if isinstance(cause, OSError) and cause.errno in ENVIRONMENT_ERRNOS:
            # Seen by the job, not by the checks (a quota, a disk the outputs filled): pause all the same.
            problem = f"{cause.strerror or cause} ({_reason(err)})"
            self.health.force_pause(job.folder, problem, self.clock())
        else:
            problem = self.health.recheck(config, job.folder, self.clock())
        if problem is None:
            return False
        due = self.health.retry_at(job.folder) or self.clock() + MODEL_RETRY_S
        self.journal.requeue(job.id, now=self.clock(), due=due)
        log.warning("job_postponed", job_id=job.id, folder=job.folder, file=job.rel_path, reason=problem,
                    error=_reason(err), consequence="not counted as an attempt; the folder is paused")
        if self.on_retry is not None:
            self.on_retry(job, due)
        return True

    def _take(self, job: Job, folder: Folder, base: Place, bound: structlog.typing.FilteringBoundLogger) -> (
        _Taken | None
    ):
        """Return the original, opened once and checked, in the processing area (moving it there if needed).

        None means the job is over without processing: the file vanished or changed before it
        was taken (dropped), or an earlier run already disposed of it (finished now). An entry
        that is not a plain file of its own (a link, a FIFO, a device, a hard link, something
        planted in the processing area) raises _Refused once it is out of the inbox.
        """
        disposed = self._disposed_place(folder, job)
        if job.processing_path:
            place = layout.recorded_processing(folder, job.processing_path, job.id, job.rel_path)
            st = self._lstat_or_refuse(place)
            if st is not None and not self._same_entry(st, disposed):
                taken = self._reopen(job, place, st)
                self._finish_copy(job, folder, taken)
                return taken
            if st is not None:
                # A crash came between linking the original into its destination and unlinking it
                # here: both names are the one file. Finish the move; never copy it twice.
                fsutil.unlink(place)
                fsutil.remove_empty_dirs(place.parent, base.rel)
        if disposed is not None and fsutil.exists(disposed):
            # A crash came after the original was disposed of but before the journal said so.
            if job.published_at is not None:
                self.journal.mark_done(job.id, disposed.display, now=self.clock(),
                                       stays=disposed.root == folder.inbox)
                bound.info("job_done", recovered=True)
            else:
                self.journal.mark_failed(job.id, job.last_error or "failed (recorded after a restart)",
                                         job.last_stage, disposed.display, now=self.clock())
                bound.info("job_failed", recovered=True)
            return None
        if job.published_at is not None and job.disposed_path is None:
            # Published, no disposal target recorded, original gone: it was deleted on success.
            self.journal.mark_done(job.id, None, now=self.clock())
            return None
        inbox = layout.inbox_place(folder, job.rel_path)
        try:
            st = fsutil.lstat(inbox)
            fd = fsutil.open_read(inbox) if st is not None and stat.S_ISREG(st.st_mode) else None
        except UnsafePath as err:
            # A folder on the way (or the file itself) became a link after it was queued: not
            # followed, nothing moved. The link itself is seen, and refused, by the next scan.
            self.journal.drop(job.id)
            bound.warning("file_refused", reason=str(err), consequence="not followed; nothing was moved")
            return None
        if st is None:
            self.journal.drop(job.id)
            bound.info("file_vanished", reason="gone from the inbox before it was taken")
            return None
        place = layout.processing_place(base, job.id, job.rel_path)
        mode = os.fstat(fd).st_mode if fd is not None else st.st_mode
        if not stat.S_ISREG(mode):  # never opened, or swapped for a FIFO or device since the look
            if fd is not None:
                os.close(fd)
            # Take it out of the inbox all the same (a rename moves a link, never its target), so
            # _fail can put it in the failed folder with its reason, and rescans stop seeing it.
            why = f"{_kind(mode)}, not a regular file; whisperd does not follow or read it"
            self.journal.set_processing(job.id, place.display, now=self.clock())
            try:
                fsutil.move(inbox, place)
            except OSError as err:
                if err.errno != errno.EXDEV:
                    raise
                self._refused_in_place(job, why, bound)
                return None
            raise _Refused(place, why)
        assert fd is not None
        source = Source.from_fd(fd, Path(inbox.display))
        try:
            return self._move_in(job, inbox, place, source, bound)
        except BaseException:
            source.close()
            raise

    def _move_in(
        self, job: Job, inbox: Place, place: Place, source: Source, bound: structlog.typing.FilteringBoundLogger
    ) -> _Taken | None:
        """Return the opened original, moved from the inbox to the processing area and checked on the way."""
        if (source.size, source.mtime_ns) != (job.size, job.mtime_ns):
            # Rewritten since it settled: this arrival is obsolete, the watcher will enqueue the new one.
            source.close()
            self.journal.drop(job.id)
            bound.info("file_changed", reason="changed after it was queued; waiting for it to settle again")
            return None
        links = os.fstat(source.fd).st_nlink
        hard_link = (f"a hard link ({links} names share this file's content, some possibly outside the inbox); "
                     "whisperd does not read it")
        with fsutil.opened_dir(place.parent, create=True) as area_fd:
            elsewhere = os.fstat(area_fd).st_dev != source.device
            if elsewhere and links > 1:
                source.close()
                self._refused_in_place(job, hard_link, bound)
                return None
            if elsewhere and links == 1:
                # The processing area is on another file system: copy from the descriptor that was
                # checked, record the copy's inode before it takes its name, then drop the inbox's.
                def record(copy: os.stat_result) -> None:
                    self.journal.set_processing(job.id, place.display, now=self.clock(),
                                                device=copy.st_dev, inode=copy.st_ino)

                copied = fsutil.copy_fd_into(source.fd, area_fd, place.name, before_rename=record)
                fsutil.unlink(inbox)
                source.close()
                return self._reopen(replace(job, file_device=copied.st_dev, file_inode=copied.st_ino), place, copied)
        self.journal.set_processing(job.id, place.display, now=self.clock(), device=source.device,
                                    inode=source.inode)
        fsutil.move(inbox, place)
        if links > 1:
            source.close()
            raise _Refused(place, hard_link)
        moved = fsutil.lstat(place)
        if moved is None or (moved.st_dev, moved.st_ino) != (source.device, source.inode):
            source.close()
            raise _Refused(place, "the file was replaced by another while it was being taken")
        return _Taken(place, source)

    def _refused_in_place(self, job: Job, why: str, bound: structlog.typing.FilteringBoundLogger) -> None:
        """End a job whose entry cannot leave the inbox safely (it would have to be copied): failed, left
        where it is, and recorded, so rescans do not report it again."""
        reason = f"refused: {why}; it cannot be moved to another file system safely and stays in the inbox"
        self.journal.mark_failed(job.id, reason, "claim", None, now=self.clock(), failure=Failure.REFUSED)
        bound.error("job_failed", error=reason, stage="claim", attempts=job.attempts + 1, original=None,
                    permanent=True)

    def _finish_copy(self, job: Job, folder: Folder, taken: _Taken) -> None:
        """Remove the inbox's name of an original that a crash left behind after copying it to a
        processing area on another file system (it would be queued again once this job is done)."""
        inbox = layout.inbox_place(folder, job.rel_path)
        try:
            st = fsutil.lstat(inbox)
        except UnsafePath:
            return
        if (st is not None and stat.S_ISREG(st.st_mode) and st.st_dev != taken.source.device
                and (st.st_size, st.st_mtime_ns) == (job.size, job.mtime_ns)):
            fsutil.unlink(inbox)

    @staticmethod
    def _same_entry(st: os.stat_result, other: Place | None) -> bool:
        """Return True when `other` exists and is the very file whose status is st."""
        there = fsutil.lstat(other) if other is not None else None
        return there is not None and (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino)

    def _reopen(self, job: Job, place: Place, st: os.stat_result) -> _Taken:
        """Return the original found in the processing area (status st), if it is the very file that was taken.

        Checked before it is opened (a socket or device is never opened), and again through the
        descriptor: a regular file with one name, the inode, size and mtime recorded when it was taken.
        """
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = f"{_kind(st.st_mode)} was found in the processing area in place of the file"
        else:
            try:
                fd = fsutil.open_read(place)
            except UnsafePath:  # a link planted since the look
                raise _Refused(place, "a symbolic link was found in the processing area in place of the file; "
                                      "whisperd does not read it") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                problem = f"{_kind(st.st_mode)} was found in the processing area in place of the file"
            elif st.st_nlink > 1:
                problem = "a hard link was found in the processing area in place of the file"
            elif job.file_inode is not None and (
                (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                != (job.file_device, job.file_inode, job.size, job.mtime_ns)
            ):  # an inode number alone can be reused at once by a file created after a deletion
                problem = "another file was found in the processing area in place of the one taken"
            if problem is None:
                display = layout.inbox_place(self.config().folders[job.folder], job.rel_path).display
                return _Taken(place, Source.from_fd(fd, Path(display)))
            os.close(fd)
        raise _Refused(place, f"{problem}; whisperd does not read it")

    def _lstat_or_refuse(self, place: Place) -> os.stat_result | None:
        try:
            return fsutil.lstat(place)
        except UnsafePath:
            raise _Refused(place, "a symbolic link was planted in the processing area; it is not followed") from None

    @staticmethod
    def _disposed_place(folder: Folder, job: Job) -> Place | None:
        """Return the place the journal recorded as the original's destination, below its root."""
        if not job.disposed_path:
            return None
        return layout.recorded_place(folder, job.disposed_path, (folder.archive, folder.failed, folder.inbox))

    def _progress_reporter(self, job: Job) -> Callable[[float], None]:
        last = [0.0]

        def report(fraction: float) -> None:
            crash_point("window")
            self.progress = fraction
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or fraction >= 1.0:
                last[0] = now
                self.journal.set_progress(job.id, fraction, now=self.clock())

        return report

    def _dispose(self, job: Job, folder: Folder, rule: Rule, source: Place) -> Place | None:
        """Return where the original went after success (None when deleted)."""
        if rule.on_success == "delete":
            fsutil.unlink(source)
            fsutil.remove_empty_dirs(source.parent, _area_of(job, source))
            return None
        if rule.on_success == "archive":
            wanted = layout.archive_place(folder, job.rel_path)
        else:  # keep: back where it came from, unchanged, so rescans see a known, done identity
            wanted = layout.inbox_place(folder, job.rel_path)
        recorded = self._disposed_place(folder, job)
        if recorded is not None and recorded.parent == wanted.parent:
            wanted = recorded  # resume the move a crash interrupted
        target = fsutil.free_name(wanted)
        self.journal.set_disposal(job.id, target.display, now=self.clock())
        moved = fsutil.move_to_free_name(source, target)
        if moved != target:  # another process took the name meanwhile
            self.journal.set_disposal(job.id, moved.display, now=self.clock())
        fsutil.remove_empty_dirs(source.parent, _area_of(job, source))
        return moved

    def _fail(
        self, job: Job, folder: Folder, rule: Rule, source: Place | None, err: Exception,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """Move the original to the failed folder with an error report beside it; end the job."""
        attempts = job.attempts + 1
        target: Place | None = None
        if source is not None and fsutil.exists(source):
            target = fsutil.free_name(layout.failed_place(folder, job.rel_path))
            # The report first: a crash between the two steps leaves a report, never a bare original.
            report = error_report(job, folder, rule, err, attempts, target, now=self.clock())
            fsutil.atomic_write_text(layout.error_file(target), lambda handle: print(report, end="", file=handle))
            self.journal.set_disposal(job.id, target.display, now=self.clock())
            try:
                moved = fsutil.move_to_free_name(source, target)
            except OSError as move_err:
                if move_err.errno != errno.EXDEV:
                    raise
                # Only a plain file can be copied to another file system: a refused link or FIFO stays
                # where it is, recorded, with no report left without its original.
                fsutil.unlink(layout.error_file(target))
                reason = (f"{_reason(err)}; it cannot be moved to the failed folder (another file system) "
                          f"and stays in {source.display}")
                self.journal.mark_failed(job.id, reason, getattr(err, "stage", None), None, now=self.clock(),
                                         failure=_failure(err))
                bound.error("job_failed", error=reason, stage=getattr(err, "stage", None), attempts=attempts,
                            original=None, permanent=isinstance(err, MediaError))
                return
            if moved != target:  # another process took the name meanwhile: the report follows
                fsutil.move(layout.error_file(target), layout.error_file(moved))
                self.journal.set_disposal(job.id, moved.display, now=self.clock())
                target = moved
            fsutil.remove_empty_dirs(source.parent, _area_of(job, source))
        self.journal.mark_failed(job.id, _reason(err), getattr(err, "stage", None),
                                 target.display if target else None, now=self.clock(), failure=_failure(err))
        bound.error("job_failed", error=_reason(err), stage=getattr(err, "stage", None),
                    attempts=attempts, original=target.display if target else None,
                    permanent=isinstance(err, MediaError))


def _failure(err: Exception) -> Failure:
    """Return why a job that ends with err failed: the file's fault (MediaError), else retries spent."""
    return err.failure if isinstance(err, MediaError) else Failure.GAVE_UP


@dataclass(frozen=True)
class _Taken:
    """The original in the processing area, and the descriptor every tool reads it through."""

    place: Place
    source: Source


class _Refused(Exception):
    """Control flow inside the worker: the entry was taken out of the inbox but will not be read."""

    def __init__(self, place: Place, why: str) -> None:
        super().__init__(why)
        self.place = place
        self.why = why


def ensure_area(folder: Folder, base: Place) -> None:
    """Make a processing area hidden in the inbox a private folder of whisperd's (0700), unblocked.

    Share users can write there: a file or link planted in its way (`.whisperd`, or
    `.whisperd/processing`) would stop every take. It is moved, as it is, never followed, into the
    failed folder (or, if it cannot cross to it, its name removed), with a warning.
    """
    if base.root != folder.inbox:
        return  # under the state directory, or configured outside the inbox: not the share's
    rel = PurePosixPath()
    for part in base.rel.parts:
        rel /= part
        place = Place(folder.inbox, rel)
        st = fsutil.lstat(place)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            try:
                aside = fsutil.move_to_free_name(place, layout.failed_place(folder, names.escape(rel.as_posix())))
                where = aside.display
            except OSError:
                fsutil.unlink(place)
                where = "removed"
            log.warning("processing_area_unblocked", folder=folder.name, entry=place.display, moved_to=where,
                        reason=f"{_kind(st.st_mode)} stood where whisperd keeps its processing area")
        with fsutil.opened_dir(place, create=True, mode=0o700) as fd, contextlib.suppress(OSError):
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o700)


def _area_of(job: Job, place: Place) -> PurePosixPath:
    """Return the processing area a job's place lies in (`<area>/<job id>/<relative path>`)."""
    return place.rel.parents[len(layout.safe_relative(job.rel_path).parts)]


def _kind(mode: int) -> str:
    """Return what a non-regular entry is, in words."""
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
    return next((text for test, text in kinds if test(mode)), "a special file")


def _reason(err: BaseException) -> str:
    return err.reason if isinstance(err, JobError) else f"{type(err).__name__}: {err}"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def error_report(
    job: Job, folder: Folder, rule: Rule, err: BaseException, attempts: int, target: Place, *, now: float
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
        f"To try again: fix the cause, then run `whisperd retry {job.id}` (or move {names.escape(target.name)}",
        f"back into the inbox as {layout.inbox_place(folder, job.rel_path).display} and delete this report).",
        "",
    ]
    return "\n".join(names.printable(line) for line in lines)  # a name can hold terminal escapes
