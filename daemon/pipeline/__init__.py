"""The pipeline for one file: probe → extract → transcribe → publish.

Each stage is a module with typed inputs and outputs; this function only sequences them, times
them and logs one event per stage. The CLI and the daemon's worker both call `process_file`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from daemon import names
from daemon.config import Rule, Settings
from daemon.control import JobControl
from daemon.crashpoints import crash_point
from daemon.errors import FileChanged, JobError, TransientError
from daemon.fsutil import Place, atomic_write_text
from daemon.pipeline.extract import Audio, SampleFile, extract
from daemon.pipeline.probe import AudioStream, MediaInfo, probe, select_stream
from daemon.pipeline.publish import publish
from daemon.pipeline.source import Source, open_path
from daemon.pipeline.transcribe import Progress, Transcript, WhisperEngine

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FileResult:
    """What processing one file produced."""

    source: Path
    media: MediaInfo
    stream: AudioStream
    transcript: Transcript
    outputs: tuple[Path, ...]
    timings: dict[str, float] = field(default_factory=dict)  # stage → seconds
    warning: str | None = None  # something the user should know about the result (a short decode)


def _checked(progress: Progress | None, control: JobControl | None) -> Progress | None:
    """Return a progress callback that also checks the job control after every whisper window."""
    if control is None:
        return progress

    def report(fraction: float) -> None:
        control.check()
        if progress is not None:
            progress(fraction)

    return report


def process_file(
    source: Path | Source,
    rule: Rule,
    engine: WhisperEngine,
    settings: Settings,
    *,
    target_dir: Path | Place,
    stem: str | None = None,
    progress: Progress | None = None,
    control: JobControl | None = None,
    work_dir: Path | None = None,
    on_stage: Callable[[str], None] | None = None,
    name: str | None = None,
) -> FileResult:
    """Return the result of running the whole pipeline on one file; outputs go to target_dir.

    `source` is a file already opened (the worker's, checked) or a path to open (the command line).
    The decoded audio is kept in `work_dir` (a temporary folder by default) while it is needed. When
    publishing fails for a reason that may pass (a full outbox), the transcript stays there, and the
    next attempt on the same file and rule publishes it instead of transcribing again; otherwise the
    folder is removed at the end.

    `name` is what every event calls the file, so its events share one `file` with the caller's
    (the worker's inbox-relative path); by default the name the source is known by.
    Raises MediaError (permanent) or TransientError (retry later) with the stage filled in, and
    JobCancelled once `control` is cancelled (tools are killed; whisper stops between windows).
    """
    opened = open_path(source) if isinstance(source, Path) else source
    work = work_dir if work_dir is not None else Path(tempfile.mkdtemp(prefix="whisperd-"))
    keep = False
    try:
        return _run_stages(opened, rule, engine, settings, target_dir, stem, progress, control, work,
                           on_stage or (lambda _stage: None),
                           name if name is not None else names.escape(str(opened.display)))
    except JobError as err:
        if err.path is None:
            err.path = opened.display  # stages deeper down (publish, transcribe) do not know the file
        keep = isinstance(err, TransientError) and err.stage == "publish" and work_dir is not None
        raise
    finally:
        if opened is not source:
            opened.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _run_stages(
    source: Source,
    rule: Rule,
    engine: WhisperEngine,
    settings: Settings,
    target_dir: Path | Place,
    stem: str | None,
    progress: Progress | None,
    control: JobControl | None,
    work_dir: Path,
    on_stage: Callable[[str], None],
    name: str,
) -> FileResult:
    stem = stem if stem is not None else source.display.stem
    timings: dict[str, float] = {}
    bound = log.bind(file=name)

    on_stage("probe")
    started = time.monotonic()
    media = probe(source, timeout_s=settings.probe_timeout, control=control)
    stream = select_stream(media, rule)
    timings["probe"] = time.monotonic() - started
    bound.debug("probed", stage="probe", format=media.format_name, duration_s=media.duration_s,
                audio_streams=len(media.audio_streams), stream=stream.index, track_language=stream.language)

    kept = _kept_transcript(work_dir, source, rule)
    if kept is not None:
        transcript, warning = kept
        bound.info("transcript_reused", stage="transcribe", reason="transcribed by an attempt whose publishing failed")
        return _publish(source, media, stream, transcript, rule, target_dir, stem, timings, warning, bound, on_stage)

    on_stage("extract")
    started = time.monotonic()
    audio: Audio = extract(media, stream, work_dir=work_dir, timeout_s=settings.extract_timeout, control=control,
                           max_duration_s=rule.max_duration)
    timings["extract"] = time.monotonic() - started
    bound.debug("extracted", stage="extract", duration_s=round(timings["extract"], 3),
                audio_s=round(audio.duration_s, 3), offset_s=audio.offset_s)
    crash_point("extracted")
    if audio.warning:
        bound.warning("audio_warning", stage="extract", warning=audio.warning)
    _still_the_same(source)

    on_stage("transcribe")
    started = time.monotonic()
    try:
        transcript = replace(engine.transcribe(audio, rule, _checked(progress, control)),
                             audio_offset_s=audio.offset_s)
    finally:
        if isinstance(audio.samples, SampleFile):
            audio.samples.close()
            audio.samples.path.unlink(missing_ok=True)
    timings["transcribe"] = time.monotonic() - started
    bound.info("transcribed", stage="transcribe", model=rule.model, task=rule.task,
               language=transcript.language, segments=len(transcript.segments),
               duration_s=round(timings["transcribe"], 3), audio_s=round(audio.duration_s, 3),
               rtf=round(timings["transcribe"] / audio.duration_s, 4) if audio.duration_s else None)

    _still_the_same(source)  # never publish the transcript of a file that went on growing
    _keep_transcript(work_dir, source, rule, transcript, audio.warning)
    return _publish(source, media, stream, transcript, rule, target_dir, stem, timings, audio.warning, bound,
                    on_stage)


def _publish(
    source: Source, media: MediaInfo, stream: AudioStream, transcript: Transcript, rule: Rule,
    target_dir: Path | Place, stem: str, timings: dict[str, float], warning: str | None,
    bound: Any, on_stage: Callable[[str], None],
) -> FileResult:
    on_stage("publish")
    started = time.monotonic()
    outputs = publish(transcript, rule, target_dir, stem, end_s=transcript.end_s)
    timings["publish"] = time.monotonic() - started
    bound.debug("published", stage="publish", outputs=[names.escape(str(p)) for p in outputs],
                duration_s=round(timings["publish"], 3))
    return FileResult(source.display, media, stream, transcript, outputs, timings, warning)


KEPT = "transcript.json"


def _fingerprint(source: Source, rule: Rule) -> str:
    """Return what a kept transcript must match: the very file, unchanged, and the same rule."""
    return json.dumps([source.device, source.inode, source.size, source.mtime_ns, rule.model_dump(mode="json")],
                      sort_keys=True)


def _keep_transcript(work_dir: Path, source: Source, rule: Rule, transcript: Transcript, warning: str | None) -> None:
    """Write the transcript beside the work, so a failed publish does not cost the transcription again."""
    with contextlib.suppress(OSError):  # a full state disk: the next attempt transcribes again, that is all
        atomic_write_text(work_dir / KEPT, lambda handle: json.dump(
            {"key": _fingerprint(source, rule), "transcript": transcript.to_dict(), "warning": warning}, handle))


def _kept_transcript(work_dir: Path, source: Source, rule: Rule) -> tuple[Transcript, str | None] | None:
    """Return the transcript an earlier attempt kept for this file and rule, if there is one."""
    try:
        data = json.loads((work_dir / KEPT).read_text(encoding="utf-8"))
        if data["key"] != _fingerprint(source, rule):
            return None
        return Transcript.from_dict(data["transcript"]), data.get("warning")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _still_the_same(source: Source) -> None:
    """Raise FileChanged when the original changed since it was opened (its writer went on)."""
    if source.changed():
        raise FileChanged(f"{source.display} changed while it was processed: it is still being written")
