"""Transcribing only some stretches of a file (whisper's `--clip_timestamps`).

Each stretch is cut from the extracted audio and transcribed on its own, placed on the file's
timeline, and the transcripts are joined: the engine's silence skipping and start-delay
compensation apply inside each stretch exactly as they do to a whole file. The language is
detected (when asked) in the first stretch and kept for the rest, as whisper does for one file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from daemon.config import Rule
from daemon.errors import MediaError
from daemon.models import ModelRegistry
from daemon.pipeline.extract import SAMPLE_RATE, Audio
from daemon.pipeline.transcribe import STAGE, Progress, Segment, Transcript, WhisperEngine

HOP = 160  # whisper's mel frame: 10 ms of 16 kHz audio; a segment's `seek` counts these


def spans(times: Sequence[float], offset_s: float, duration_s: float) -> list[tuple[int, int]]:
    """Return the sample ranges of whisper's clip list (start, end, start, …; a last end may be missing).

    Times are on the file's timeline; the audio's first sample lies at offset_s. Stretches
    outside the audio are dropped, and those that overlap it are cut to it.
    """
    bounds = list(times) + ([offset_s + duration_s] if len(times) % 2 else [])
    total = round(duration_s * SAMPLE_RATE)
    found = []
    for start, end in zip(bounds[::2], bounds[1::2], strict=True):
        first = max(0, round((start - offset_s) * SAMPLE_RATE))
        last = min(total, round((end - offset_s) * SAMPLE_RATE))
        if last > first:
            found.append((first, last))
    return found


class ClippedEngine(WhisperEngine):
    """A WhisperEngine that transcribes only the given stretches of each file's audio."""

    def __init__(self, registry: ModelRegistry, times: Sequence[float]) -> None:
        super().__init__(registry)
        self.times = tuple(times)

    def transcribe(self, audio: Audio, rule: Rule, progress: Progress | None = None) -> Transcript:
        """Return the transcript of the chosen stretches, times on the file's timeline."""
        ranges = spans(self.times, audio.offset_s, audio.duration_s)
        if not ranges:
            end = audio.offset_s + audio.duration_s
            raise MediaError(f"no clip of --clip_timestamps lies within the audio ({audio.offset_s:g}–{end:g} s)",
                             stage=STAGE)
        total = sum(last - first for first, last in ranges) or 1
        segments: list[Segment] = []
        texts: list[str] = []
        language: str | None = None
        done = 0
        for first, last in ranges:
            piece = Audio(samples=audio.samples[first:last], offset_s=audio.offset_s + first / SAMPLE_RATE,
                          stream=audio.stream)
            piece_rule = rule if language is None else rule.with_overrides({"language": language})
            result = super().transcribe(piece, piece_rule, _scaled(progress, done / total, (last - first) / total))
            done += last - first
            language = language or result.language
            segments += [replace(s, id=len(segments) + n, seek=s.seek + first // HOP)
                         for n, s in enumerate(result.segments)]  # fmt: skip
            if result.text:
                texts.append(result.text)
        if progress is not None:
            progress(1.0)
        assert language is not None  # at least one stretch was transcribed
        return Transcript(text=" ".join(texts), language=language, segments=tuple(segments),
                          task=rule.task, model=rule.model, audio_duration_s=audio.duration_s)


def _scaled(progress: Progress | None, start: float, share: float) -> Progress | None:
    if progress is None:
        return None

    def report(fraction: float) -> None:
        progress(start + fraction * share)

    return report
