"""ffmpeg → 16 kHz mono float32 samples of one audio stream, in a file, placed on the container's timeline.

The samples go to a raw file in the job's work folder (local disk, never the share) and are read
back a window at a time (`SampleFile`), so memory follows the window, not the recording: a 10-hour
file costs what a 10-minute one does. The file is removed when the job ends.

How much ffmpeg may write is capped: the duration the container declares (plus a margin), or the
rule's `max_duration`, or DEFAULT_MAX_S; a file declaring more than `max_duration` is refused
before it is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from daemon.control import JobControl
from daemon.errors import MediaError, TooLong
from daemon.pipeline.probe import AudioStream, MediaInfo
from daemon.pipeline.source import Source
from daemon.pipeline.tools import TOOL_LIMITS, input_args, run_on_file

if TYPE_CHECKING:
    from daemon.pipeline.batched import Speech

STAGE = "extract"
SAMPLE_RATE = 16000  # what whisper's feature extractor expects
BYTES_PER_SECOND = SAMPLE_RATE * 4  # float32 mono
DEFAULT_MAX_S = 48 * 3600.0  # a file that declares no duration is decoded up to this, at most
DECLARED_MARGIN = 1.05  # containers round and estimate: allow a little more than declared …
DECLARED_SLACK_S = 60.0  # … and a minute


class SampleFile:
    """Mono float32 samples in a raw file, read a slice at a time (nothing is mapped or cached).

    Supports `len()` and `samples[a:b]` (a fresh float32 array), which is all the pipeline uses.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._len = os.fstat(self._fd).st_size // 4

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: slice) -> npt.NDArray[np.float32]:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("SampleFile supports samples[a:b] only")
        start, stop, _ = index.indices(self._len)
        count = max(stop - start, 0)
        data = os.pread(self._fd, count * 4, start * 4)
        return np.frombuffer(data, dtype="<f4").astype(np.float32, copy=True)

    def __array__(self, dtype: Any = None, copy: Any = None) -> npt.NDArray[np.float32]:
        """Return every sample (for small files and tests; the pipeline reads slices)."""
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def chunks(self, size: int) -> Iterator[npt.NDArray[np.float32]]:
        """Yield the samples `size` at a time."""
        for first in range(0, self._len, size):
            yield self[first : first + size]

    def close(self) -> None:
        """Close the file (its removal is the work folder's owner's)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


Samples = SampleFile | npt.NDArray[np.float32]


@dataclass(frozen=True)
class Audio:
    """Decoded audio ready for the model."""

    samples: Samples  # mono, SAMPLE_RATE Hz, in [-1, 1]
    offset_s: float  # where the first sample lies on the container's timeline
    stream: AudioStream
    warning: str | None = None  # e.g. the decoded audio is much shorter than the file declares
    speech: Speech | None = None  # where the speech is, found before the batched engine's turn (its own job)

    @property
    def duration_s(self) -> float:
        """Return the decoded audio's length in seconds."""
        return len(self.samples) / SAMPLE_RATE


def duration_cap(declared_s: float | None, max_duration_s: float | None) -> float:
    """Return how many seconds of audio ffmpeg may write: never more than max_duration."""
    cap = DEFAULT_MAX_S if declared_s is None else declared_s * DECLARED_MARGIN + DECLARED_SLACK_S
    return min(cap, max_duration_s) if max_duration_s else cap


def extract_argv(source: Source, stream: AudioStream, target: Path, cap_s: float) -> tuple[str, ...]:
    """Return ffmpeg's argv that decodes one stream of an open file to raw mono float32 in target."""
    return (
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        *input_args(source),
        "-map", f"0:{stream.index}",
        "-vn", "-sn", "-dn",
        "-ac", "1", "-ar", str(SAMPLE_RATE),
        "-t", f"{cap_s:.3f}",
        "-f", "f32le", f"file:{target}",
    )  # fmt: skip


def extract(
    info: MediaInfo,
    stream: AudioStream,
    *,
    work_dir: Path,
    timeout_s: float = 3600.0,
    control: JobControl | None = None,
    max_duration_s: float | None = None,
) -> Audio:
    """Return the stream's audio, decoded into work_dir; raise MediaError when ffmpeg cannot decode it."""
    if max_duration_s and info.duration_s and info.duration_s > max_duration_s:
        raise TooLong(
            f"refused: it lasts {_hms(info.duration_s)}, longer than this folder's max_duration "
            f"({_hms(max_duration_s)})", path=info.path, stage=STAGE,
        )
    cap = duration_cap(info.duration_s, max_duration_s)
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / "audio.f32"
    argv = extract_argv(info.source, stream, target, cap)
    # The file-size limit backs up `-t`: a decoder that ignored it is stopped by the kernel.
    limits = replace(TOOL_LIMITS, file_size_bytes=int(cap * BYTES_PER_SECOND) + (1 << 20))
    result = run_on_file(argv, source=info.source, stage=STAGE, timeout_s=timeout_s, control=control,
                         limits=limits, reason=lambda _: f"ffmpeg could not decode audio stream {stream.index}")
    samples = SampleFile(target)
    if len(samples) == 0:
        samples.close()
        raise MediaError(
            f"audio stream {stream.index} decodes to no samples", path=info.path, stage=STAGE,
            command=" ".join(argv), stderr_tail=result.stderr_tail,
        )
    # A stream that starts after the container (a start delay) would shift every subtitle
    # early; whisper sees the audio from its first sample, so its times are moved by this.
    offset = max(0.0, stream.start_time - info.start_time)
    return Audio(samples=samples, offset_s=offset, stream=stream,
                 warning=duration_warning(info.duration_s, len(samples) / SAMPLE_RATE, cap))


SHORT_FRACTION = 0.9  # decoded audio shorter than this share of the declared duration …
SHORT_SLACK_S = 2.0  # … by more than this is worth a warning: a cut file, a broken stream


def duration_warning(declared_s: float | None, decoded_s: float, cap_s: float) -> str | None:
    """Return a warning when the decoded audio is much shorter than declared, or was cut at the cap."""
    if decoded_s >= cap_s - 0.05:
        return f"decoding stopped at {_hms(cap_s)}: the file holds more audio than it declares or may hold"
    if declared_s and decoded_s < declared_s * SHORT_FRACTION - SHORT_SLACK_S:
        return (f"only {_hms(decoded_s)} of audio decoded, but the file declares {_hms(declared_s)}: it may be "
                "cut short (a copy that stopped early) or damaged")
    return None


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
