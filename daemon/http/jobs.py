"""An upload as a journal job: written into the API folder's inbox, queued with per-job overrides,
waited for, and answered from the outputs the worker published; then its files are removed.

Nothing here knows HTTP beyond the status a refusal carries. The worker treats an API job like any
other: the same claim (at the API's priority), the same crash-safe steps, the same model registry.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from daemon import fsutil, layout
from daemon.config import API_FOLDER, Config, Folder
from daemon.errors import Failure, RequestRefused
from daemon.health import Health
from daemon.journal import Job, JobState, Journal
from daemon.models import ModelRegistry
from daemon.operations import override_problems, queue_file

PCM_RATE = 16000  # whisper-asr-webservice's encode=false: raw signed 16-bit mono at 16 kHz
_SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
COPY_CHUNK = 1 << 20
# An upload's name says who waits for it: a request holding its connection (gone with the process
# that served it) or an async job (POST /v1/jobs), which outlives a restart and is fetched later.
REQUEST_PREFIX = "req-"
ASYNC_PREFIX = "job-"
UPLOAD_NAME = re.compile(r"(?:req|job)-[0-9a-f]{32}(?:\.[a-z0-9]+)?")  # an upload's stored name, in any text
ASYNC_FORMATS = ("txt", "srt", "vtt", "tsv", "json")  # an async job's result is fetched later in any of them
UNREADY_RETRY_S = 30  # Retry-After when the API cannot take work now
CANCEL_TRIES = 20
FULL_RETRY_S = 10  # Retry-After when http.max_waiting API jobs wait already
# The HTTP status a failed job's request is answered with, by daemon.errors.Failure.
FAILURE_STATUS = {Failure.REFUSED: 400, Failure.TOO_LONG: 422, Failure.GAVE_UP: 500, Failure.CANCELLED: 410}


def safe_suffix(filename: str | None) -> str:
    """Return the upload's extension if it is short and plain (`.mp3`), else "": a request names no path."""
    suffix = PurePosixPath(filename or "").suffix.lower()
    return suffix if 1 < len(suffix) <= 9 and set(suffix[1:]) <= _SUFFIX_CHARS else ""


@dataclass(frozen=True)
class Ask:
    """What a request asks of the transcription: the rule fields it sets for its job alone."""

    formats: tuple[str, ...]
    task: str = "transcribe"
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    word_timestamps: bool = False
    model: str | None = None  # used only when it is a model the config already uses

    def overrides(self, config: Config) -> dict[str, Any]:
        """Return the per-job overrides: only what the request set, so the rest comes from `defaults:`."""
        found: dict[str, Any] = {"task": self.task, "output_formats": list(self.formats)}
        if self.language:
            found["language"] = self.language
        if self.prompt:
            found["initial_prompt"] = self.prompt
        if self.temperature is not None:
            found["temperature"] = self.temperature
        if self.word_timestamps:
            found["word_timestamps"] = True
        # A client names a model ("whisper-1" for OpenAI's): honoured when the config already uses it,
        # so a request never makes whisperd download or load a model an operator did not choose.
        if self.model and self.model in config.models_in_use():
            found["model"] = self.model
        return found


@dataclass
class Finished:
    """A job that ended: the outputs it published (format → text), or why it failed."""

    job: Job
    outputs: dict[str, str] = field(default_factory=dict)

    def refusal(self) -> RequestRefused | None:
        """Return why a failed job's client gets no transcript (None when it is done)."""
        if self.job.state != JobState.FAILED:
            return None
        failure = Failure(self.job.failure) if self.job.failure in Failure._value2member_map_ else Failure.REFUSED
        # A file whisperd refuses (not media, no audio) is the client's to fix; spent retries are whisperd's.
        return RequestRefused(FAILURE_STATUS[failure], self.job.last_error or "whisperd could not process the upload")


def failure_of(job: Job) -> str | None:
    """Return a failed job's failure kind as clients see it (a daemon.errors.Failure value)."""
    return (job.failure or Failure.REFUSED.value) if job.state == JobState.FAILED else None


class ApiJobs:
    """The API's side of the journal: queue uploads, wait for them, read and remove their files."""

    def __init__(
        self,
        config: Callable[[], Config],
        journal: Journal,
        registry: ModelRegistry,
        health: Health,
        wake: Callable[[], None],
        stopping: threading.Event,
        cancel_running: Callable[[int], bool] = lambda _job_id: False,
    ) -> None:
        self.config = config
        self.journal = journal
        self.registry = registry
        self.health = health
        self.wake = wake
        self.stopping = stopping
        self.cancel_running = cancel_running  # asks the worker running a job to end it as cancelled
        self._admission = threading.Lock()
        self._arriving = 0  # admitted uploads still being copied, not yet in the journal

    @property
    def folder(self) -> Folder:
        """Return the API's folder in the running config."""
        return self.config().folders[API_FOLDER]

    def sweep(self, *, requests_before: float, results_before: float) -> int:
        """Remove the API's files nobody waits for any more; return how many: a request's last changed
        before `requests_before` (its client gave up long ago), an async job's before `results_before`
        (http.keep_results passed). An async job's upload stays while its job waits, however long the queue."""
        waiting = {job.rel_path for job in self.journal.jobs(JobState.active()) if job.folder == API_FOLDER}
        removed = sweep_area(self.folder, older_than=requests_before, only=is_request)
        return removed + sweep_area(self.folder, older_than=results_before,
                                    only=lambda name: not is_request(name) and name not in waiting)

    def submit(
        self, upload: BinaryIO, suffix: str, ask: Ask, *, raw_pcm: bool = False, asynchronous: bool = False
    ) -> tuple[Job, str]:
        """Return the queued job and the upload's stem; raise RequestRefused for a request that cannot be queued.

        A request that waits for its answer is refused at once (503) when the API cannot take work
        now (paused, its model failing); an async job is queued all the same and waits like a
        folder's file. Both are refused while more than http.max_waiting API jobs wait.
        """
        config = self.config()
        if self.stopping.is_set():
            raise RequestRefused(503, "whisperd is stopping; send the request again", retry_after=UNREADY_RETRY_S)
        if not asynchronous and (reason := self.unready()) is not None:
            raise RequestRefused(503, f"the API cannot take work now: {reason}", retry_after=UNREADY_RETRY_S)
        with self._admitting(config):
            return self._queue(upload, suffix, ask, config, raw_pcm=raw_pcm, asynchronous=asynchronous)

    @contextlib.contextmanager
    def _admitting(self, config: Config) -> Iterator[None]:
        """Admit one more API job within http.max_waiting, counting uploads still being copied: requests
        that arrive together cannot all pass the check before any of them is queued."""
        limit = config.settings.http.max_waiting if config.settings.http else 0
        with self._admission:
            counts = self.journal.counts().get(API_FOLDER, {})
            waiting = sum(counts.get(state.value, 0) for state in JobState.active()) + self._arriving
            if limit and waiting >= limit:
                raise RequestRefused(503, f"{waiting} API jobs wait already (http.max_waiting); send it again later",
                                     retry_after=FULL_RETRY_S)
            self._arriving += 1
        try:
            yield
        finally:
            with self._admission:
                self._arriving -= 1

    def _queue(
        self, upload: BinaryIO, suffix: str, ask: Ask, config: Config, *, raw_pcm: bool, asynchronous: bool
    ) -> tuple[Job, str]:
        folder = config.folders[API_FOLDER]
        stem = (ASYNC_PREFIX if asynchronous else REQUEST_PREFIX) + uuid.uuid4().hex
        # Always a suffix: every file of the request is found by "<stem>." when it is cleaned up.
        name = stem + (".wav" if raw_pcm else suffix or ".bin")
        overrides = ask.overrides(config)
        refused = override_problems(config, API_FOLDER, name, overrides)
        if refused:
            raise RequestRefused(400, "; ".join(refused))
        place = fsutil.Place(folder.inbox, PurePosixPath(name))
        # Written under a hidden name, fsynced, then renamed: the worker never sees half an upload.
        fsutil.atomic_write_binary(place, lambda out: (_pcm_as_wav if raw_pcm else _copy)(upload, out))
        job = queue_file(self.journal, folder, name, place.path, overrides)
        if job is None:  # a fresh random name cannot be active already
            raise RequestRefused(500, "the upload could not be queued")
        self.wake()
        return job, stem

    def state(self, job_id: int) -> Job | None:
        """Return the job as the journal has it now (None: dropped, its upload vanished)."""
        return self.journal.get(job_id)

    def finished(self, job: Job, stem: str, formats: tuple[str, ...] | None = None) -> Finished:
        """Return a finished job's outputs (all it made, or these formats), read from the API's outbox."""
        if job.state != JobState.DONE:
            return Finished(job)
        outputs: dict[str, str] = {}
        for fmt in formats or job.overrides.get("output_formats", ()):  # every API job names its formats
            path = self.folder.outbox / f"{stem}.{fmt}"
            if path.is_file():
                outputs[fmt] = path.read_text(encoding="utf-8")
        return Finished(job, outputs)

    @staticmethod
    def public_id(job: Job, stem: str) -> str:
        """Return the id an async job is known by: the journal's number and the upload's random stem,
        so ids cannot be guessed (another client's job is out of reach) yet need no table of their own."""
        return f"{job.id}-{stem.removeprefix(ASYNC_PREFIX)}"

    def lookup(self, public_id: str) -> tuple[Job, str] | None:
        """Return the async job and its upload's stem for an id from public_id(), or None."""
        number, _, secret = public_id.partition("-")
        if not (number.isascii() and number.isdigit() and len(number) <= 18) or len(secret) != 32 \
                or not set(secret) <= _SUFFIX_CHARS:
            return None  # (ASCII digits only: "١" is a digit to Python; 18 of them fit SQLite's integer)
        job = self.journal.get(int(number))
        stem = ASYNC_PREFIX + secret
        if job is None or job.folder != API_FOLDER or not job.rel_path.startswith(stem + "."):
            return None
        return job, stem

    def cancel(self, job: Job, stem: str) -> Job | None:
        """Cancel a job: a queued one ends at once, a running one at its next check (between windows).
        A finished one's results are removed and it is forgotten (None). Return the job as it is now."""
        self.abandon(stem)  # not yet taken: its upload leaves the inbox, and a worker that claims it drops it
        for _ in range(CANCEL_TRIES):
            if self.cancel_running(job.id):  # a worker runs it: it ends at its next check
                return self.journal.get(job.id)
            now = self.journal.get(job.id)
            if now is None:
                return None
            if now.state in (JobState.QUEUED, JobState.RETRY_WAIT):
                if not self.journal.mark_cancelled(job.id, "cancelled by its client", now=time.time()):
                    continue  # claimed meanwhile: a worker has it now
                # A job waiting to retry keeps its original in the processing area, maybe decoded
                # audio in its work folder, and outputs it published before a later step failed.
                self._remove_taken_original(now)
                shutil.rmtree(layout.work_dir(self.config().settings.state_dir, job.id), ignore_errors=True)
                self.discard(stem)
                return self.journal.get(job.id)
            if now.state != JobState.RUNNING:
                self.discard(stem)  # finished: its results go, and the job is forgotten
                self.journal.drop(job.id)
                return None
            time.sleep(0.05)  # claimed a moment ago, not yet the worker's current job: look again
        return self.journal.get(job.id)

    def abandon(self, stem: str) -> None:
        """Give up on a request: its upload leaves the inbox (a job not yet taken is then dropped)."""
        self.discard(stem, (self.folder.inbox,))

    def discard(self, stem: str, dirs: tuple[Path, ...] | None = None) -> None:
        """Remove the upload's files: the original if still there, its outputs, a failed copy and its error file."""
        sweep_area(self.folder, older_than=None, only=lambda name: name.startswith(stem + "."), dirs=dirs)

    def _remove_taken_original(self, job: Job) -> None:
        """Remove the original a job that waits to retry left in the processing area, and its folder."""
        if not job.processing_path:
            return
        place = layout.recorded_processing(self.folder, job.processing_path, job.id, job.rel_path)
        with contextlib.suppress(FileNotFoundError):
            fsutil.unlink(place)
        fsutil.remove_empty_dirs(place.parent, place.rel.parent.parent)

    def drop_failed_uploads(self) -> int:
        """Remove the failed copies of uploads (nobody fetches them: a client reads the reason from the
        journal); return how many. Left for later, junk posted again and again would fill the disk."""
        # Uploads and their error reports only: not the worker's temporary file of a report it is writing.
        return sweep_area(self.folder, older_than=None, dirs=(self.folder.failed,),
                          only=lambda name: UPLOAD_NAME.match(name) is not None)

    def unready(self) -> str | None:
        """Return why the API cannot take work now (stopping, paused, its model unavailable), or None."""
        if self.stopping.is_set():
            return "whisperd is stopping"
        held = self.journal.pauses()
        if "*" in held or API_FOLDER in held:
            return "paused by the operator (whisperd resume)"
        reason = self.health.reasons().get(API_FOLDER)
        if reason:
            return reason
        model = self.config().rule_for(API_FOLDER, "upload").model
        failed = self.registry.unavailable().get(model)
        if failed:
            return f"model {model} is unavailable: {failed}"
        return None

    def wait_step(self, job_id: int, deadline: float) -> Job | None:
        """Return the job once it ended, None while it runs; raise RequestRefused on timeout, stop or loss."""
        job = self.state(job_id)
        if job is None:
            raise RequestRefused(503, "the upload was dropped before it was processed; send it again")
        if job.state in (JobState.DONE, JobState.FAILED):
            return job
        if self.stopping.is_set():
            raise RequestRefused(503, "whisperd is stopping; send the request again")
        if time.monotonic() >= deadline:
            raise RequestRefused(504, "no transcript within http.timeout; the request was given up")
        return None


def is_request(rel_path: str) -> bool:
    """Return True for an upload whose client held its connection (gone with the process that served it)."""
    return rel_path.startswith(REQUEST_PREFIX)


def prepare_area(folder: Folder) -> None:
    """Create the API's folders (private to the daemon) and empty them of requests' files: no request of
    an earlier process waits. Async jobs' uploads and results stay, to be fetched after the restart."""
    for path in (folder.inbox, folder.outbox, folder.failed, spool_dir(folder)):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    sweep_area(folder, older_than=None, only=is_request)


def spool_dir(folder: Folder) -> Path:
    """Return where uploads are spooled while they arrive (beside the API's inbox, private to whisperd)."""
    return folder.inbox.parent / "spool"


def sweep_area(
    folder: Folder, *, older_than: float | None, only: Callable[[str], bool] | None = None,
    dirs: tuple[Path, ...] | None = None,
) -> int:
    """Remove the API folder's files last changed before `older_than` (all with None); return how many.

    A request that timed out, or a process that stopped while requests waited, leaves them behind,
    and async jobs' results stay until http.keep_results has passed; a queued job whose upload is
    gone is dropped by the worker as a vanished file.
    """
    removed = 0
    for path in dirs or (folder.inbox, folder.outbox, folder.failed):
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            continue
        for entry in entries:
            if not entry.is_file(follow_symlinks=False) or (only is not None and not only(entry.name)):
                continue
            if older_than is None or entry.stat(follow_symlinks=False).st_mtime < older_than:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _copy(upload: BinaryIO, out: BinaryIO) -> None:
    while chunk := upload.read(COPY_CHUNK):
        out.write(chunk)


def _pcm_as_wav(upload: BinaryIO, out: BinaryIO) -> None:
    """Write raw 16-bit 16 kHz mono samples (Bazarr's encode=false) as a WAV file ffprobe can read."""
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(PCM_RATE)
        carry = b""
        while chunk := upload.read(COPY_CHUNK):
            chunk = carry + chunk
            whole = len(chunk) - len(chunk) % 2
            wav.writeframesraw(chunk[:whole])
            carry = chunk[whole:]
