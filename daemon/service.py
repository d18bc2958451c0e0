"""The long-running service: start-up and stop ordering, signals, reload.

Threads: the main thread waits for signals and runs reloads; APScheduler's thread runs the
stability tick, rescans and retry wake-ups; watchdog runs one observer thread per folder; one
worker thread processes jobs (one GPU runs one model's work well). With `http:` configured, uvicorn
serves the HTTP API on a thread of its own; its requests are jobs in the same journal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import stat
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from daemon import fsutil, layout, names
from daemon import log as logsetup
from daemon.config import API_FOLDER, Config, Folder, load_config
from daemon.control import Isolation
from daemon.errors import ConfigError, GpuFault, ModelError
from daemon.health import Health
from daemon.http.jobs import ApiJobs, is_request, prepare_area, spool_dir
from daemon.instances import default_owner, owner_is_dead
from daemon.journal import FileIdentity, Job, JobState, open_journal
from daemon.models import ModelRegistry
from daemon.pipeline.transcribe import WhisperEngine
from daemon.systemd import Notifier, watchdog_interval
from daemon.watcher import FolderWatcher, ReadyFile
from daemon.worker import Worker, ensure_area

log = structlog.get_logger("whisperd")

EXIT_GPU_FAULT = 3

TICK_S = 0.25  # how often settled files are handed from the watchers to the journal
IDLE_POLL_S = 2.0  # an idle worker looks at the journal at least this often (other instances)
HEARTBEAT_IDLE_S = 0.25  # an idle worker still beats this often
STATUS_EVERY_S = 1.0  # how often systemd's STATUS= line is refreshed (sent only when it changed)
INSTANCE_BEAT_S = 5.0  # how often this process tells the journal it is alive (and its models)
WORKER_STALE_S = 120.0  # a worker without a heartbeat this long is not responding (no beat is recorded)
CANCEL_WAIT_S = 5.0  # after shutdown_grace, at most this long for the job to reach a safe point
API_FAILED_SWEEP_S = 5.0  # how often the HTTP API's failed uploads are removed
API_SWEEP_S = 600.0  # how often, at most, the HTTP API's files are swept (sooner when what is kept is kept briefly)
PRUNE_EVERY_S = 6 * 3600.0  # finished jobs past the retention are removed this often (and at start)
IDLE_UNLOAD_CHECK_S = 15.0  # how often idle models are looked for (model_idle_unload)
MODEL_LOAD_EXTENSION_S = 900  # EXTEND_TIMEOUT_USEC granted per model loaded before READY=1
# Test-only switch: while the file named here exists, the worker loop hangs without a heartbeat,
# the way a wedged GPU call would, so tests can watch the watchdog pings stop.
# The state disk or the journal failing (full, read-only, locked): the environment's fault, logged in
# one line and retried; any other exception in the loops is a bug and keeps its traceback.
ENVIRONMENT_FAULTS = (OSError, sqlite3.OperationalError)
TEST_HANG_FILE_ENV = "WHISPERD_TEST_HANG_FILE"


def cancel_wait(grace_s: float) -> float:
    """Return how long a cancelled job may take to reach its next check before the process leaves anyway."""
    return min(max(grace_s, 0.5), CANCEL_WAIT_S)


class _Wakeup:
    """Wakes every idle worker at once (an Event cleared by the first would keep the others asleep)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.generation = 0

    def set(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait_after(self, seen: int, timeout: float) -> bool:
        """Return True once woken after generation `seen`; False after `timeout`."""
        with self._cond:
            return self._cond.wait_for(lambda: self.generation != seen, timeout)


class Service:
    """whisperd's daemon: watchers → journal → worker, until a signal says stop."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.owner = default_owner()
        self.watchers: dict[str, FolderWatcher] = {}
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = _Wakeup()
        self._signals = 0
        self._worker_threads: list[threading.Thread] = []
        self.notifier = Notifier.from_environment()
        self.exit_code = 0
        self._last_status: str | None = None
        self._test_hang_file = os.environ.get(TEST_HANG_FILE_ENV)
        self._stale_after = float("inf")
        self._watchers_lock = threading.Lock()  # reload and rescan both change observers
        self.api_jobs: ApiJobs | None = None
        self.api_server: Any = None  # daemon.http.server.ApiServer, imported only when the API is on

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the journal, recover, load models, start watching and working."""
        settings = self.config.settings
        logsetup.configure(settings.log_format, settings.log_level)
        log.info("starting", config=str(self.config_path), folders=list(self.config.folders), owner=self.owner)
        self.journal = open_journal(settings.state_dir)
        now = time.time()
        # Our own owner token can only be a leftover (a container restarted with the same pid).
        for job in self.journal.recover(lambda owner: owner == self.owner or owner_is_dead(owner), now=now):
            log.info("job_requeued", job_id=job.id, folder=job.folder, file=job.rel_path,
                     reason="left running by a process that is gone")
        for instance in self.journal.instances():  # killed while idle: its beat would linger in status
            if instance.owner != self.owner and owner_is_dead(instance.owner):
                self.journal.remove_instance(instance.owner)
        api_socket = None
        if settings.http is not None:
            # Before anything runs: a taken port or an unreadable tokens file stops the start here.
            from daemon.http.server import bind

            api_socket = bind(settings.http.listen)
            # No request of an earlier process waits any more: its jobs would be transcribed for nobody.
            for job in self.journal.jobs(JobState.active()):
                if job.folder == API_FOLDER and is_request(job.rel_path):
                    self.journal.drop(job.id)
                    log.info("api_job_dropped", job_id=job.id, reason="its request ended with the last process")
        self._reconcile_processing_areas()  # their copies go back to the API's inbox …
        if settings.http is not None:
            prepare_area(self.config.folders[API_FOLDER])  # … which is emptied here
            # FastAPI spools an upload over 1 MB to a temporary file before whisperd copies it: in the
            # API's own private folder on the state disk (watched for space), not a shared /tmp.
            tempfile.tempdir = str(spool_dir(self.config.folders[API_FOLDER]))

        self.registry = ModelRegistry(settings.model_dir, settings.device, settings.torch_threads,
                                      cpu_dtype=settings.cpu_dtype, mirror=settings.model_mirror)
        self.started_at = now
        self.registry.on_change = self._beat_instance
        self._beat_instance()
        for name in settings.preload_models:
            # A large model (or its first download) can outlast TimeoutStartSec: ask for more time.
            self.notifier.extend_timeout(MODEL_LOAD_EXTENSION_S)
            self.notifier.status(f"loading model {name} …")
            with contextlib.suppress(ModelError):  # logged by the registry; its files wait, the rest flow
                self.registry.get(name)
        self.health = Health()
        self.health.on_change = self._health_changed
        engine = WhisperEngine(self.registry)
        isolation = Isolation()
        # jobs_in_flight workers side by side, one engine: their batched files share batches.
        self.workers = [Worker(lambda: self.config, self.journal, engine, owner=self.owner,
                               on_retry=self._schedule_wakeup, health=self.health, isolation=isolation)
                        for _ in range(settings.jobs_in_flight)]
        if settings.http is not None and settings.http.reserved_worker:
            # A request must not wait for folder files already being transcribed: one more worker,
            # on the same engine and model, takes API jobs alone (the others take them too, first).
            self.workers.append(Worker(lambda: self.config, self.journal, engine, owner=self.owner,
                                       on_retry=self._schedule_wakeup, health=self.health, isolation=isolation,
                                       only=frozenset({API_FOLDER})))
        engine.gatherer.expected = lambda: sum(1 for w in self.workers if w.current is not None)
        if api_socket is not None:
            self.api_server = self._api_server(api_socket)
        # Without ffmpeg every file would fail: its folders pause until it is installed (said at start too).
        self.health.paused(self.config, time.time())

        self.scheduler = BackgroundScheduler(timezone=timezone.utc)
        self.scheduler.add_job(self._tick, "interval", seconds=TICK_S, id="tick",
                               max_instances=1, coalesce=True)
        self.scheduler.add_job(self.rescan, "interval", seconds=settings.rescan_interval, id="rescan",
                               max_instances=1, coalesce=True, next_run_time=datetime.now(timezone.utc))
        self.scheduler.add_job(self._update_status, "interval", seconds=STATUS_EVERY_S, id="status",
                               max_instances=1, coalesce=True)
        self.scheduler.add_job(self._beat_instance, "interval", seconds=INSTANCE_BEAT_S, id="instance",
                               max_instances=1, coalesce=True)
        self.scheduler.add_job(self._prune, "interval", seconds=PRUNE_EVERY_S, id="prune", max_instances=1,
                               coalesce=True, next_run_time=datetime.now(timezone.utc))
        if self.api_jobs is not None:
            self.scheduler.add_job(self._drop_failed_uploads, "interval", seconds=API_FAILED_SWEEP_S,
                                   id="api_failed", max_instances=1, coalesce=True)
            self.scheduler.add_job(self._sweep_api, "interval", seconds=self._api_sweep_every(), id="api_sweep",
                                   max_instances=1, coalesce=True)
        idle_s = self.config.settings.model_idle_unload
        unload_every = min(IDLE_UNLOAD_CHECK_S, max(idle_s / 2, 1.0)) if idle_s > 0 else IDLE_UNLOAD_CHECK_S
        self.scheduler.add_job(self._unload_idle_models, "interval", seconds=unload_every, id="unload",
                               max_instances=1, coalesce=True)
        ping_every = watchdog_interval()
        if ping_every is not None:
            # A stale heartbeat (no progress for a whole WatchdogSec) stops the pings.
            self._stale_after = 2 * ping_every
            self.scheduler.add_job(self._watchdog, "interval", seconds=ping_every, id="watchdog",
                                   max_instances=1, coalesce=True, next_run_time=datetime.now(timezone.utc))
        due = self.journal.next_due_at(list(self.config.folders))
        if due is not None:
            self._schedule_wakeup(None, due)
        for folder in self.config.watched.values():  # API jobs are queued by their requests
            self._start_watcher(folder.name)
        self.scheduler.start()
        for i, worker in enumerate(self.workers):
            thread = threading.Thread(target=self._work, args=(worker,), name=f"worker-{i}", daemon=True)
            self._worker_threads.append(thread)
            thread.start()
        if self.api_server is not None:
            self.api_server.start()
        log.info("ready", folders=len(self.config.folders), models=self.registry.loaded())
        self.notifier.ready(self.status_line())

    def _api_server(self, sock: socket.socket) -> Any:
        """Return the HTTP API's server on a bound socket, sharing this process's journal and models."""
        from daemon.http.app import create_app
        from daemon.http.limits import BodyLimit, LoopbackHostsOnly, is_loopback_listen
        from daemon.http.metrics import Metrics
        from daemon.http.server import ApiServer
        from daemon.http.tokens import read_tokens

        http = self.config.settings.http
        assert http is not None
        try:
            tokens = read_tokens(http.tokens_file) if http.tokens_file is not None else None
        except Exception:
            sock.close()
            raise
        self.api_jobs = ApiJobs(lambda: self.config, self.journal, self.registry, self.health,
                                wake=self._wake.set, stopping=self._stop, cancel_running=self.cancel_job)
        metrics = Metrics(lambda: self.config, self.journal, self.registry)
        for worker in self.workers:  # the real-time factor of each job, as it is published
            worker.on_published = metrics.job_published
        app: Any = BodyLimit(create_app(self.api_jobs, tokens=tokens, timeout_s=http.timeout,
                                        keep_results_s=http.keep_results, metrics=metrics,
                                        metrics_open=http.metrics_open), http.max_upload)
        if tokens is None and is_loopback_listen(http.listen):
            app = LoopbackHostsOnly(app)  # no token to stop a web page's DNS rebinding: the Host must be ours
        return ApiServer(app, http.listen, sock)

    def cancel_job(self, job_id: int) -> bool:
        """Return True when a worker runs job_id: it ends at its next check, cancelled (an API client's)."""
        return any(worker.cancel_job(job_id) for worker in self.workers)

    def _drop_failed_uploads(self) -> None:
        """Remove the API's failed uploads soon: only their reason matters, and it is in the journal."""
        if self.api_jobs is not None:
            with contextlib.suppress(OSError):
                self.api_jobs.drop_failed_uploads()

    def _api_sweep_every(self) -> float:
        """Return how often the API's files are swept: every 10 minutes, or more often for short keeps."""
        http = self.config.settings.http
        assert http is not None
        return min(API_SWEEP_S, max(1.0, min(http.timeout, http.keep_results) / 4))

    def _sweep_api(self) -> None:
        """Remove the API's files that no request waits for any more (timed out, or left by a stop)."""
        http = self.config.settings.http
        if self.api_jobs is None or http is None:
            return
        now, margin = time.time(), self._api_sweep_every()
        removed = self.api_jobs.sweep(requests_before=now - http.timeout - margin,
                                      results_before=now - http.keep_results - margin)
        if removed:
            log.info("api_files_removed", files=removed, reason="no request waits for them any more")

    def _start_watcher(self, name: str) -> None:
        watcher = FolderWatcher(self.config.folders[name], clock=time.monotonic)
        self.watchers[name] = watcher
        try:
            watcher.start()
        except OSError as err:
            # An unmounted share must not stop the other folders; the rescan retries it.
            log.warning("watch_failed", folder=name, inbox=str(watcher.folder.inbox), error=str(err))

    def _reconcile_processing_areas(self) -> None:
        """Return originals that no active job owns from processing areas to their inboxes.

        What else is found there is never read or followed: a link, a FIFO, a hard link (planted
        where share users can write) is removed, only that name. Hidden temporary files that a
        killed write left in the outputs' folders are removed too.
        """
        now = time.time()
        self._remove_stale_work()
        for folder in self.config.folders.values():
            if not folder.inbox.is_dir():
                # Not mounted yet (--allow-missing): creating the area would create the inbox on the
                # local disk beneath the mount point. The folder is paused until its inbox is back.
                log.warning("processing_area_skipped", folder=folder.name, inbox=str(folder.inbox),
                            reason="the inbox is missing or not a folder")
                continue
            current = layout.processing_base(folder, self.config.settings.state_dir)
            hidden = fsutil.Place(folder.inbox, layout.HIDDEN_PROCESSING)
            if current == hidden:
                try:
                    ensure_area(folder, hidden)
                except OSError as err:
                    log.warning("processing_area_unusable", folder=folder.name, area=hidden.display, error=str(err))
                else:
                    self._warn_if_shared(folder, hidden)
            for area in dict.fromkeys((current, hidden)):  # the hidden one may hold an older version's jobs
                try:
                    self._reconcile_area(folder, area)
                except OSError as err:  # an unmounted share: its jobs wait, the others start
                    log.warning("processing_area_unreadable", folder=folder.name, area=area.display, error=str(err))
            for root in (folder.outbox, folder.archive, folder.failed, current.root):
                if root is None:
                    continue
                try:
                    removed = fsutil.remove_stale_temp_files(fsutil.Place(root, PurePosixPath()), now=now)
                except OSError as err:
                    log.warning("folder_unreadable", folder=folder.name, path=str(root), error=str(err))
                    continue
                for place in removed:
                    log.info("temp_file_removed", file=place.display, reason="left by a write that was interrupted")

    def _remove_stale_work(self) -> None:
        """Remove the work folders of jobs that are over (a crash left them); active ones keep theirs."""
        root = self.config.settings.state_dir / "work"
        if not root.is_dir():
            return
        for entry in root.iterdir():
            job = self.journal.get(int(entry.name)) if entry.name.isdigit() else None
            if job is not None and job.state in JobState.active():
                continue  # another instance's running job, or a transcript kept for a retry
            shutil.rmtree(entry, ignore_errors=True)
            log.info("work_removed", path=str(entry), reason="decoded audio of a job that no longer runs")

    @staticmethod
    def _warn_if_shared(folder: Folder, area: fsutil.Place) -> None:
        """Say so once at start when the share does not keep the hidden processing area private."""
        with fsutil.opened_dir(area) as fd:
            st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            log.warning("processing_area_shared", folder=folder.name, area=area.display,
                        reason="the share lets other users write there (it ignores modes or owners); whisperd "
                               "checks every file it finds there by inode and never follows links")

    def _reconcile_area(self, folder: Folder, area: fsutil.Place) -> None:
        for place, st in list(fsutil.walk_files(area)):
            parts = place.rel.relative_to(area.rel).parts
            if not parts[0].isdigit():
                continue  # not ours: left alone
            # Asked afresh for each entry: a worker records its claim before it creates the folder,
            # so another instance's job that started a moment ago is seen as active.
            job = self.journal.get(int(parts[0]))
            if job is not None and job.state in JobState.active():
                continue
            rel = names.escape(PurePosixPath(*parts[1:]).as_posix()) if len(parts) > 1 else ""
            try:
                if rel and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    fsutil.move_to_free_name(place, layout.inbox_place(folder, rel))
                    log.warning("returned_to_inbox", folder=folder.name, file=rel,
                                reason="found in the processing area with no job")
                else:
                    fsutil.unlink(place)  # the link, FIFO or extra name itself; nothing it points to
                    log.warning("processing_entry_removed", folder=folder.name, file=place.display,
                                reason="not a file whisperd took (a link, FIFO, device or hard link planted "
                                       "there); not followed, only its name removed")
            except OSError as err:
                log.warning("processing_entry_left", folder=folder.name, file=place.display, error=str(err))
                continue
            fsutil.remove_empty_dirs(place.parent, area.rel)

    # -- the loops -----------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        for watcher in list(self.watchers.values()):
            for ready in watcher.poll(now):
                try:
                    self.enqueue(ready)
                except ENVIRONMENT_FAULTS as err:  # the state disk or the journal: the next rescan retries
                    log.warning("enqueue_failed", folder=ready.folder, file=ready.rel_path, error=str(err))
                except Exception:  # a bug; one unqueueable name must not hold up the others settled with it
                    log.exception("enqueue_failed", folder=ready.folder, file=ready.rel_path)

    def enqueue(self, ready: ReadyFile) -> Job | None:
        """Put a settled file into the journal (idempotent) and wake the worker."""
        config = self.config
        folder = config.folders.get(ready.folder)
        if folder is None:
            return None
        keep = config.rule_for(ready.folder, ready.rel_path).on_success == "keep"
        job = self.journal.enqueue(
            FileIdentity(ready.folder, ready.rel_path, ready.size, ready.mtime_ns),
            priority=folder.priority, now=time.time(), skip_if_done=keep,
        )
        if job is not None:
            log.info("job_queued", job_id=job.id, folder=job.folder, file=job.rel_path, size=job.size)
            self._wake.set()
        return job

    def rescan(self) -> None:
        """Scan every inbox in full (watchers miss files) and restart observers that died."""
        for name, watcher in list(self.watchers.items()):
            with self._watchers_lock:
                if self.watchers.get(name) is not watcher:
                    continue  # removed or replaced by a reload meanwhile
                if not watcher.watching:
                    with contextlib.suppress(OSError):
                        watcher.start()
            try:
                seen = watcher.scan()
            except OSError as err:
                log.warning("rescan_failed", folder=name, error=str(err))  # the folder is paused meanwhile
                continue
            log.debug("rescanned", folder=name, files=seen)

    def status_line(self) -> str:
        """Return the one-line state for `systemctl status`: the running job, queue and retries."""
        counts = self.journal.counts()
        queued = sum(c.get(JobState.QUEUED.value, 0) for c in counts.values())
        retrying = sum(c.get(JobState.RETRY_WAIT.value, 0) for c in counts.values())
        running = [f"{w.current.folder}/{w.current.rel_path} {round((w.progress or 0) * 100)}%"
                   for w in self.workers if w.current is not None]
        parts = [f"transcribing {', '.join(running)}" if running else "idle", f"{queued} queued"]
        if retrying:
            parts.append(f"{retrying} retrying")
        for name in self.registry.unavailable():
            parts.append(f"model {name} unavailable, next try in {round(self.registry.retry_in(name) or 0)} s")
        for folder, reason in self.health.reasons().items():
            parts.append(f"{folder} paused: {reason}")
        held = self.journal.pauses()
        if held:
            parts.append("paused by the operator: " + ("every folder" if "*" in held else ", ".join(sorted(held))))
        if self.config.settings.model_idle_unload > 0 and not self.registry.loaded():
            parts.append("no model in memory (idle)")
        return " · ".join(parts)

    def _health_changed(self) -> None:
        """A folder paused or resumed: say so in the status line and the journal now, not at the next beat.

        An inbox that is back (a share mounted late, a folder added by a reload before it existed)
        is watched and scanned now, not at the next rescan.
        """
        self._beat_instance()
        self._update_status()
        if any(not w.watching and w.folder.inbox.is_dir() for w in list(self.watchers.values())):
            with contextlib.suppress(Exception):  # the scheduler may be shutting down
                self.scheduler.modify_job("rescan", next_run_time=datetime.now(timezone.utc))

    def _unload_idle_models(self) -> None:
        """Free idle models' memory (`model_idle_unload`) while nothing is queued or running."""
        idle_s = self.config.settings.model_idle_unload
        if idle_s <= 0 or any(w.current is not None for w in self.workers):
            return
        # Work waiting in paused folders does not hold the model: a pause is how the GPU is lent.
        claimable = set(self.workers[0].claimable_folders())
        counts = self.journal.counts()
        if any(by_state.get(state.value, 0) for folder, by_state in counts.items() if folder in claimable
               for state in JobState.active()):
            return
        if self.registry.unload_idle(idle_s):
            self._health_changed()  # status and the STATUS line say the memory is free now

    def _prune(self) -> None:
        """Remove finished jobs older than the retention from the journal."""
        retention = self.config.settings.retention
        if retention <= 0:
            return
        try:
            removed = self.journal.prune(before=time.time() - retention)
        except Exception as err:  # a busy or full disk: tried again next time
            log.warning("prune_failed", error=f"{type(err).__name__}: {err}")
            return
        if removed:
            log.info("journal_pruned", jobs=removed, older_than_days=round(retention / 86400, 1))

    def _beat_instance(self) -> None:
        """Tell the journal this process is alive and which models it holds (`whisperd models`).

        Only while the worker beats too: a process whose worker hangs is "not responding" in status.
        """
        if hasattr(self, "workers") and time.monotonic() - self._oldest_beat() > WORKER_STALE_S:
            return
        with contextlib.suppress(Exception):  # a busy journal must not break a model load or the scheduler
            paused = self.health.reasons() if hasattr(self, "health") else {}
            paused |= {f"model {name}": reason for name, reason in self.registry.unavailable().items()}
            self.journal.beat_instance(self.owner, now=time.time(), started_at=self.started_at,
                                       models=self.registry.loaded(), paused=paused)

    def _update_status(self) -> None:
        line = self.status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    def _oldest_beat(self) -> float:
        """Return the heartbeat of the worker that beat least recently (every worker must be alive)."""
        return min(w.control.last_beat for w in self.workers)

    def _watchdog(self) -> None:
        if time.monotonic() - self._oldest_beat() < self._stale_after:
            self.notifier.watchdog()
        else:
            log.error("worker_stalled", seconds_since_heartbeat=round(time.monotonic() - self._oldest_beat()),
                      consequence="watchdog pings withheld; systemd will restart the service")

    def _schedule_wakeup(self, job: Job | None, due: float) -> None:
        if due <= time.time():
            self._wake.set()  # due already: a date job in the past would only be reported as missed
            return
        when = datetime.fromtimestamp(due, tz=timezone.utc)
        with contextlib.suppress(Exception):  # the scheduler may already be shut down
            self.scheduler.add_job(self._wake.set, "date", run_date=when)

    def _work(self, worker: Worker) -> None:
        while not self._stop.is_set():
            worker.control.beat()
            while self._test_hang_file and os.path.exists(self._test_hang_file):
                time.sleep(0.05)  # test-only: a hang with no heartbeat
            try:
                job = worker.run_once()
            except GpuFault:
                # Every later CUDA call would fail too: exit non-zero so systemd restarts the process.
                self.exit_code = EXIT_GPU_FAULT
                self._stop.set()
                return
            except ENVIRONMENT_FAULTS as err:  # the state disk or the journal, not a bug: no traceback
                log.warning("worker_error", error=f"{type(err).__name__}: {err}")
                job = None
                self._stop.wait(1.0)
            except Exception:
                log.exception("worker_error")
                job = None
                self._stop.wait(1.0)
            if job is None and not self._stop.is_set():
                self._idle(worker, self._until_due(worker))

    def _until_due(self, worker: Worker) -> float:
        """Return how long the idle worker may wait: until the next due job of a folder it may claim."""
        try:
            # Paused folders' due jobs do not count: the worker would spin on jobs it may not claim.
            due = self.journal.next_due_at(worker.claimable_folders())
        except ENVIRONMENT_FAULTS as err:
            log.warning("worker_error", error=f"{type(err).__name__}: {err}")
            return IDLE_POLL_S
        return IDLE_POLL_S if due is None else min(max(due - time.time(), 0.01), IDLE_POLL_S)

    def _idle(self, worker: Worker, seconds: float) -> None:
        """Wait for work (a wake-up or `seconds`), beating meanwhile: an idle worker is a live one."""
        deadline = time.monotonic() + seconds
        seen = self._wake.generation
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            worker.control.beat()
            if self._wake.wait_after(seen, min(left, HEARTBEAT_IDLE_S)):
                break

    # -- signals, reload, stop -----------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
            return
        self._signals += 1
        if self._signals > 1:
            # A second request: stop at once. A job left RUNNING is requeued on the next start.
            os._exit(128 + signum)
        self._stop.set()

    def reload(self) -> bool:
        """Re-read the config file; apply it if valid, else log every problem and keep the old one."""
        self.notifier.reloading("reloading configuration")
        try:
            applied = self._apply_new_config()
        finally:
            self.notifier.ready(self.status_line())  # also after a failed reload: the old config runs on
        return applied

    def _apply_new_config(self) -> bool:
        try:
            new = reread = load_config(self.config_path)
        except ConfigError as err:
            log.error("reload_failed", config=str(self.config_path),
                      problems=[str(p) for p in err.problems], keeping="the running configuration")
            return False
        old = self.config
        if new.settings.http != old.settings.http:
            # The listener, its tokens and the API's folder stay as they started until a restart.
            settings = new.settings.model_copy(update={"http": old.settings.http})
            new = Config(settings, new.defaults, new.watched.values(), new.source)
        with self._watchers_lock:
            for name, watcher in list(self.watchers.items()):
                if name not in new.watched or new.watched[name] != old.folders.get(name):
                    watcher.stop()
                    del self.watchers[name]
            self.config = new
            logsetup.configure(new.settings.log_format, new.settings.log_level)
            for name in new.watched:
                if name not in self.watchers:
                    self._start_watcher(name)
                    with contextlib.suppress(OSError):
                        self.watchers[name].scan()
        restart_only = ("state_dir", "device", "cpu_dtype", "jobs_in_flight")
        changed = [key for key in restart_only if getattr(new.settings, key) != getattr(old.settings, key)]
        changed += ["http"] if reread.settings.http != old.settings.http else []
        if changed:
            log.warning("restart_needed", settings=changed, reason="these settings apply after a restart")
        log.info("reloaded", folders=list(new.folders))
        self._wake.set()
        return True

    def stop(self) -> None:
        """Stop watching and claiming; let the current job finish within the grace period, else requeue it."""
        grace = self.config.settings.shutdown_grace
        self.notifier.stopping("stopping: finishing or handing back the running job")
        log.info("stopping", grace_s=grace, running_jobs=[w.current.id for w in self.workers if w.current])
        self._stop.set()
        self._wake.set()
        with contextlib.suppress(Exception):
            self.scheduler.shutdown(wait=False)
        for watcher in self.watchers.values():
            watcher.stop()
        if self.api_server is not None:
            self.api_server.stop()  # waiting requests are answered 503: _stop is set
        with contextlib.suppress(Exception):
            # Recorded first: if this stop ends in SIGKILL (TimeoutStopSec), the next start knows the
            # job it interrupted did not crash whisperd.
            self.journal.mark_stopping(self.owner, now=time.time())
        deadline = time.monotonic() + grace
        for thread in self._worker_threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.0))
        if any(thread.is_alive() for thread in self._worker_threads):
            for worker in self.workers:
                if worker.current is not None:
                    log.info("cancelling_job", job_id=worker.current.id)
                worker.cancel()  # the job stops at its next check: between whisper windows, or ffmpeg killed
            deadline = time.monotonic() + cancel_wait(grace)
            for thread in self._worker_threads:
                thread.join(timeout=max(deadline - time.monotonic(), 0.0))
        if any(thread.is_alive() for thread in self._worker_threads):
            self._leave_mid_window()
        with contextlib.suppress(Exception):
            self.journal.remove_instance(self.owner)
        self.journal.close()
        log.info("stopped")

    def _leave_mid_window(self) -> None:
        """Hand the running job back and exit 0 while a whisper window that cannot be interrupted runs on.

        Returning normally would finalise the interpreter under torch's running thread, which aborts
        the process ("terminate called without an active exception", exit 134).
        """
        for job in [w.current for w in self.workers if w.current is not None]:
            with contextlib.suppress(Exception):
                self.journal.requeue(job.id, now=time.time())
            log.info("job_requeued", job_id=job.id, folder=job.folder, file=job.rel_path,
                     reason="shutdown: its whisper window could not be interrupted in time; it starts over next time")
        with contextlib.suppress(Exception):
            self.journal.remove_instance(self.owner)
            self.journal.close()
        log.info("stopped", exit_code=self.exit_code)
        sys.stderr.flush()
        os._exit(self.exit_code)

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; SIGHUP reloads. Return the exit code (non-zero after a GPU fault)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        self.start()
        while not self._stop.is_set():
            self._stop.wait(0.5)
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
        self.stop()
        return self.exit_code
