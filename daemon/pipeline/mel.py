"""Whisper's log-Mel spectrogram, computed window by window: memory follows the window, not the file.

whisper's `transcribe()` computes the spectrogram of the whole file before decoding its first
window: about 2 GB of memory per hour of audio (the STFT, the Mel filter bank output, the log),
so a 10-hour recording would not fit a 24 GB server. `LazyMel` stands in for that tensor: it
has its shape and answers `mel[:, a:b]` by computing just those frames from the samples (a
file on disk), with the same numbers whisper computes for the whole file:

- each frame is the same STFT window (whisper's centred STFT reflects the first samples at the
  start; the end is the 30 s of zeros whisper pads);
- whisper floors every value at 8 (log10 units, 80 dB) below the loudest value of the whole
  spectrogram: `global_max` finds that maximum in one streaming pass, window by window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from daemon.pipeline.extract import Samples

if TYPE_CHECKING:
    import torch

N_FFT = 400
HOP = 160
PAD = 30 * 16000  # whisper pads 30 s of zeros after the audio ("for slicing")
CHUNK_FRAMES = 3000  # frames computed at a time in the streaming pass (30 s)
SILENT_LOG = -10.0  # log10 of the 1e-10 clamp: what a frame of digital silence gives


@dataclass
class LazyMel:
    """The log-Mel spectrogram of samples (padded with 30 s of zeros), computed on demand per slice."""

    samples: Samples  # mono 16 kHz: the extracted audio's file, read a slice at a time
    n_mels: int
    padding: int = PAD
    loudest: float | None = field(default=None, repr=False)  # global_max, when found ahead (or once here)
    _filters: Any = field(default=None, repr=False)
    _window: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """Return (n_mels, frames) as whisper's tensor would have it."""
        return (self.n_mels, (len(self.samples) + self.padding) // HOP)

    def __getitem__(self, index: tuple[slice, slice]) -> torch.Tensor:
        """Return `mel[:, a:b]` (only this form is supported: it is the one whisper uses)."""
        rows, cols = index
        if rows != slice(None) or cols.step not in (None, 1):
            raise TypeError("LazyMel supports mel[:, a:b] only")
        frames = self.shape[1]
        start, stop, _ = cols.indices(frames)
        log_spec = self.log10_frames(start, max(stop, start))
        floor = self.global_max() - 8.0
        return (log_spec.clamp(min=floor) + 4.0) / 4.0

    def silence(self) -> float:
        """Return the value a frame of digital silence has in this spectrogram (after the floor)."""
        return (max(SILENT_LOG, self.global_max() - 8.0) + 4.0) / 4.0

    def global_max(self) -> float:
        """Return the loudest log10 Mel value of the whole padded spectrogram (computed once, streaming)."""
        if self.loudest is None:
            frames = self.shape[1]
            loudest = SILENT_LOG if self.padding > 0 else -np.inf
            content = min(frames, -(-len(self.samples) // HOP) + N_FFT // HOP + 1)  # frames that see samples
            for first in range(0, content, CHUNK_FRAMES):
                block = self.log10_frames(first, min(first + CHUNK_FRAMES, frames))
                loudest = max(loudest, float(block.max()))
            self.loudest = loudest
        return self.loudest

    def log10_frames(self, start: int, stop: int) -> torch.Tensor:
        """Return log10 of the Mel power of frames [start, stop), before whisper's floor and scaling."""
        import torch
        from whisper.audio import mel_filters

        if self._filters is None:
            self._filters = mel_filters("cpu", self.n_mels)
            self._window = torch.hann_window(N_FFT)
        if stop <= start:
            return torch.empty(self.n_mels, 0)
        signal = torch.from_numpy(self._padded(start * HOP - N_FFT // 2, (stop - 1) * HOP + N_FFT // 2 + 1))
        stft = torch.stft(signal, N_FFT, HOP, window=self._window, center=False, return_complex=True)
        power = stft.abs() ** 2
        mel = self._filters @ power
        return torch.clamp(mel, min=1e-10).log10()

    def _padded(self, first: int, end: int) -> npt.NDArray[np.float32]:
        """Return samples [first, end) of the audio padded like whisper's STFT sees it.

        Left of the first sample: a reflection of the audio (torch's centred STFT); right of the
        last: the zeros whisper appends, and their reflection (zeros too).
        """
        n = len(self.samples)
        total = n + self.padding
        out = np.zeros(end - first, dtype=np.float32)
        lo, hi = max(first, 0), min(end, n)
        if hi > lo:
            out[lo - first : hi - first] = self.samples[lo:hi]
        if first < 0:  # reflect: x[-k] = x[k]
            count = -first
            head = np.zeros(count + 1, dtype=np.float32)
            avail = min(count + 1, n)
            head[:avail] = self.samples[:avail]
            out[:count] = head[1 : count + 1][::-1]
        if end > total:  # only zeros lie past the padding's end, and reflect to zeros
            pass
        return out


def transcribe_patch(lazy: LazyMel) -> Any:
    """Return a stand-in for whisper.transcribe's `log_mel_spectrogram` that hands out `lazy`."""

    def log_mel_spectrogram(audio: Any, n_mels: int = 80, padding: int = 0, device: Any = None) -> LazyMel:
        if n_mels != lazy.n_mels or padding != lazy.padding:
            raise ValueError(f"expected n_mels={lazy.n_mels}, padding={lazy.padding}")
        return lazy

    return log_mel_spectrogram
