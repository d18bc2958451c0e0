"""ffprobe → typed media facts; and which audio stream a rule selects."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Rule
from daemon.control import JobControl
from daemon.errors import MediaError, ToolError
from daemon.languages import language_from_tag
from daemon.pipeline.source import Source
from daemon.pipeline.tools import input_args, run_on_file

STAGE = "probe"


@dataclass(frozen=True)
class AudioStream:
    """One audio stream of a container."""

    index: int  # ffprobe's stream index within the file (what `-map 0:N` takes)
    position: int  # 0 for the first audio stream, 1 for the second, …
    codec: str
    channels: int
    language: str | None  # the container's tag as written, e.g. 'fra', or None
    start_time: float  # seconds, on the container's timeline
    default: bool


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe found in a file."""

    source: Source
    format_name: str
    duration_s: float | None
    start_time: float  # the container's own start; stream start times are relative to it
    audio_streams: tuple[AudioStream, ...]

    @property
    def path(self) -> Path:
        """Return the file's name, for messages."""
        return self.source.display


def probe_argv(source: Source) -> tuple[str, ...]:
    """Return ffprobe's argv for an open file: its descriptor, allowed containers only, JSON out."""
    return (
        "ffprobe", "-v", "error", "-hide_banner",
        "-print_format", "json", "-show_format", "-show_streams",
        *input_args(source),
    )  # fmt: skip


def _float(value: object, default: float | None = None) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def parse_probe(source: Source, data: dict) -> MediaInfo:  # type: ignore[type-arg]
    """Return MediaInfo from ffprobe's JSON; raise MediaError when there is no audio."""
    path = source.display
    fmt = data.get("format") or {}
    container_start = _float(fmt.get("start_time"), 0.0) or 0.0
    audio: list[AudioStream] = []
    for stream in data.get("streams") or []:
        if stream.get("codec_type") != "audio":
            continue
        tags = {k.lower(): v for k, v in (stream.get("tags") or {}).items()}
        audio.append(AudioStream(
            index=int(stream["index"]),
            position=len(audio),
            codec=str(stream.get("codec_name", "unknown")),
            channels=int(stream.get("channels") or 0),
            language=(tags.get("language") or None),
            start_time=_float(stream.get("start_time"), container_start) or 0.0,
            default=bool((stream.get("disposition") or {}).get("default")),
        ))
    info = MediaInfo(
        source=source,
        format_name=str(fmt.get("format_name", "unknown")),
        duration_s=_float(fmt.get("duration")),
        start_time=container_start,
        audio_streams=tuple(audio),
    )
    if not info.audio_streams:
        raise MediaError(
            f"no audio stream in this {info.format_name} file; nothing to transcribe",
            path=path, stage=STAGE,
        )
    return info


def probe(source: Source, *, timeout_s: float = 60.0, control: JobControl | None = None) -> MediaInfo:
    """Return the media facts of an open file; raise MediaError when it is empty, unreadable or silent."""
    path = source.display
    if source.size == 0:
        raise MediaError("the file is empty (0 bytes)", path=path, stage=STAGE)
    result = run_on_file(probe_argv(source), source=source, stage=STAGE, timeout_s=timeout_s, control=control,
                         reason=_unreadable)
    try:
        data = json.loads(result.stdout or b"{}")
    except json.JSONDecodeError as err:
        raise MediaError(f"ffprobe printed unreadable JSON: {err}", path=path, stage=STAGE) from err
    return parse_probe(source, data)


def _unreadable(err: ToolError) -> str:
    last = err.stderr_tail.strip().splitlines()[-1] if err.stderr_tail.strip() else ""
    return "not a media file ffprobe can read" + (f" ({last})" if last else "")


def select_stream(info: MediaInfo, rule: Rule) -> AudioStream:
    """Return the audio stream a rule asks for; a language tag with no match falls back to default."""
    streams = info.audio_streams
    choice = rule.audio_track
    if isinstance(choice, int):
        if choice >= len(streams):
            raise MediaError(
                f"audio_track {choice} asked for, but the file has {len(streams)} audio stream(s)",
                path=info.path, stage=STAGE,
            )
        return streams[choice]
    if isinstance(choice, str) and choice != "default":
        wanted = language_from_tag(choice) or choice.lower()
        for stream in streams:
            tag = stream.language
            if tag and (tag.lower() == choice.lower() or language_from_tag(tag) == wanted):
                return stream
    return next((s for s in streams if s.default), streams[0])
