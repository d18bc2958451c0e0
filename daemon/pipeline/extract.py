"""ffmpeg → 16 kHz mono float32 samples of one audio stream, placed on the container's timeline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from daemon.control import JobControl
from daemon.errors import MediaError
from daemon.pipeline.probe import AudioStream, MediaInfo
from daemon.pipeline.source import Source
from daemon.pipeline.tools import input_args, run_on_file

STAGE = "extract"
SAMPLE_RATE = 16000  # what whisper's feature extractor expects


@dataclass(frozen=True)
class Audio:
    """Decoded audio ready for the model."""

    samples: npt.NDArray[np.float32]  # mono, SAMPLE_RATE Hz, in [-1, 1]
    offset_s: float  # where the first sample lies on the container's timeline
    stream: AudioStream

    @property
    def duration_s(self) -> float:
        """Return the decoded audio's length in seconds."""
        return len(self.samples) / SAMPLE_RATE


def extract_argv(source: Source, stream: AudioStream) -> tuple[str, ...]:
    """Return ffmpeg's argv that decodes one stream of an open file to raw mono float32 on stdout."""
    return (
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error",
        *input_args(source),
        "-map", f"0:{stream.index}",
        "-vn", "-sn", "-dn",
        "-ac", "1", "-ar", str(SAMPLE_RATE),
        "-f", "f32le", "pipe:1",
    )  # fmt: skip


def extract(
    info: MediaInfo, stream: AudioStream, *, timeout_s: float = 3600.0, control: JobControl | None = None
) -> Audio:
    """Return the stream's audio; raise MediaError when ffmpeg cannot decode it."""
    argv = extract_argv(info.source, stream)
    result = run_on_file(argv, source=info.source, stage=STAGE, timeout_s=timeout_s, control=control,
                         reason=lambda _: f"ffmpeg could not decode audio stream {stream.index}")
    # A writable copy: torch refuses to wrap read-only buffers without a warning.
    samples = np.frombuffer(result.stdout, dtype="<f4").astype(np.float32, copy=True)
    if samples.size == 0:
        raise MediaError(
            f"audio stream {stream.index} decodes to no samples", path=info.path, stage=STAGE,
            command=" ".join(argv), stderr_tail=result.stderr_tail,
        )
    # A stream that starts after the container (a start delay) would shift every subtitle
    # early; whisper sees the audio from its first sample, so its times are moved by this.
    offset = max(0.0, stream.start_time - info.start_time)
    return Audio(samples=samples, offset_s=offset, stream=stream)
