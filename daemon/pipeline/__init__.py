"""The pipeline for one file: probe → extract → transcribe → publish.

Each stage is a module with typed inputs and outputs; this function only sequences them, times
them and logs one event per stage. The CLI and the daemon's worker both call `process_file`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon import names
from daemon.config import Rule, Settings
from daemon.control import JobControl
from daemon.errors import JobError
from daemon.fsutil import Place
from daemon.pipeline.extract import Audio, extract
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
    name: str | None = None,
) -> FileResult:
    """Return the result of running the whole pipeline on one file; outputs go to target_dir.

    `source` is a file already opened (the worker's, checked) or a path to open (the command line).
    `name` is what every event calls the file, so its events share one `file` with the caller's
    (the worker's inbox-relative path); by default the name the source is known by.
    Raises MediaError (permanent) or TransientError (retry later) with the stage filled in, and
    JobCancelled once `control` is cancelled (tools are killed; whisper stops between windows).
    """
    opened = open_path(source) if isinstance(source, Path) else source
    try:
        return _run_stages(opened, rule, engine, settings, target_dir, stem, progress, control,
                           name if name is not None else names.escape(str(opened.display)))
    except JobError as err:
        if err.path is None:
            err.path = opened.display  # stages deeper down (publish, transcribe) do not know the file
        raise
    finally:
        if opened is not source:
            opened.close()


def _run_stages(
    source: Source,
    rule: Rule,
    engine: WhisperEngine,
    settings: Settings,
    target_dir: Path | Place,
    stem: str | None,
    progress: Progress | None,
    control: JobControl | None,
    name: str,
) -> FileResult:
    stem = stem if stem is not None else source.display.stem
    timings: dict[str, float] = {}
    bound = log.bind(file=name)

    started = time.monotonic()
    media = probe(source, timeout_s=settings.probe_timeout, control=control)
    stream = select_stream(media, rule)
    timings["probe"] = time.monotonic() - started
    bound.debug("probed", stage="probe", format=media.format_name, duration_s=media.duration_s,
                audio_streams=len(media.audio_streams), stream=stream.index, track_language=stream.language)

    started = time.monotonic()
    audio: Audio = extract(media, stream, timeout_s=settings.extract_timeout, control=control)
    timings["extract"] = time.monotonic() - started
    bound.debug("extracted", stage="extract", duration_s=round(timings["extract"], 3),
                audio_s=round(audio.duration_s, 3), offset_s=audio.offset_s)

    started = time.monotonic()
    transcript = engine.transcribe(audio, rule, _checked(progress, control))
    timings["transcribe"] = time.monotonic() - started
    bound.info("transcribed", stage="transcribe", model=rule.model, task=rule.task,
               language=transcript.language, segments=len(transcript.segments),
               duration_s=round(timings["transcribe"], 3), audio_s=round(audio.duration_s, 3),
               rtf=round(timings["transcribe"] / audio.duration_s, 4) if audio.duration_s else None)

    started = time.monotonic()
    outputs = publish(transcript, rule, target_dir, stem, end_s=audio.offset_s + audio.duration_s)
    timings["publish"] = time.monotonic() - started
    bound.debug("published", stage="publish", outputs=[names.escape(str(p)) for p in outputs],
                duration_s=round(timings["publish"], 3))
    return FileResult(source.display, media, stream, transcript, outputs, timings)
