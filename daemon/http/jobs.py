"""An upload as a journal job: written into the API folder's inbox, queued with per-job overrides,
waited for, and answered from the outputs the worker published; then its files are removed.

Nothing here knows HTTP beyond the status a refusal carries. The worker treats an API job like any
other: the same claim (at the API's priority), the same crash-safe steps, the same model registry.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from daemon import fsutil
from daemon.config import API_FOLDER, Config, Folder
from daemon.errors import RequestRefused
from daemon.health import Health
from daemon.journal import Job, JobState, Journal
from daemon.models import ModelRegistry
from daemon.operations import override_problems, queue_file

PCM_RATE = 16000  # whisper-asr-webservice's encode=false: raw signed 16-bit mono at 16 kHz
_SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
COPY_CHUNK = 1 << 20


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
    ) -> None:
        self.config = config
        self.journal = journal
        self.registry = registry
        self.health = health
        self.wake = wake
        self.stopping = stopping

    @property
    def folder(self) -> Folder:
        """Return the API's folder in the running config."""
        return self.config().folders[API_FOLDER]

    def sweep(self, *, older_than: float) -> int:
        """Remove the API's files last changed before `older_than` (nobody waits for them); return how many."""
        return sweep_area(self.folder, older_than=older_than)

    def submit(self, upload: BinaryIO, suffix: str, ask: Ask, *, raw_pcm: bool = False) -> tuple[Job, str]:
        """Return the queued job and the upload's stem; raise RequestRefused for a request that cannot be queued."""
        config = self.config()
        folder = config.folders[API_FOLDER]
        stem = uuid.uuid4().hex
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

    def finished(self, job: Job, stem: str) -> Finished:
        """Return a finished job's outputs, read from the API's outbox."""
        if job.state != JobState.DONE:
            return Finished(job)
        outputs: dict[str, str] = {}
        for fmt in job.overrides.get("output_formats", ()):  # every API job names its formats
            path = self.folder.outbox / f"{stem}.{fmt}"
            if path.is_file():
                outputs[fmt] = path.read_text(encoding="utf-8")
        return Finished(job, outputs)

    def abandon(self, stem: str) -> None:
        """Give up on a request: its upload leaves the inbox (a job not yet taken is then dropped)."""
        self.discard(stem, (self.folder.inbox,))

    def discard(self, stem: str, dirs: tuple[Path, ...] | None = None) -> None:
        """Remove the upload's files: the original if still there, its outputs, a failed copy and its error file."""
        folder = self.folder
        for path in dirs or (folder.inbox, folder.outbox, folder.failed):
            try:
                entries = list(os.scandir(path))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith(stem + ".") and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

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


def prepare_area(folder: Folder) -> None:
    """Create the API's folders (private to the daemon) and empty them: no request of an earlier process waits."""
    for path in (folder.inbox, folder.outbox, folder.failed):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    sweep_area(folder, older_than=None)


def sweep_area(folder: Folder, *, older_than: float | None) -> int:
    """Remove the API folder's files last changed before `older_than` (all with None); return how many.

    A request that timed out, or a process that stopped while requests waited, leaves them behind;
    a queued job whose upload is gone is dropped by the worker as a vanished file.
    """
    removed = 0
    for path in (folder.inbox, folder.outbox, folder.failed):
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            continue
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
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
