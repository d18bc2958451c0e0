"""Where the speech is: Silero VAD's model, run by whisperd's own code, and windows cut at pauses.

The batched engine decodes independent windows of at most 30 s. Cutting them at pauses, not in
the middle of a word, and skipping what holds no speech, is what keeps its transcripts as good as
whisper's sequential decoding. Silero VAD (MIT) ships its weights in its PyPI wheel; they are
read from the wheel's safetensors file into the small network below (the architecture of the
wheel's own reference port), so nothing is unpickled or run as TorchScript. It is a 128-unit LSTM
over 32 ms frames: the convolutions run on blocks of frames at once, the LSTM in one call per
block, so a 10-hour file takes seconds and little memory.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daemon.pipeline.extract import SAMPLE_RATE, Samples

if TYPE_CHECKING:
    import torch

FRAME = 512  # samples per probability (32 ms at 16 kHz)
CONTEXT = 64  # samples of the previous frame each frame also sees
BLOCK = 4096  # frames computed at a time (about 2 minutes of audio)
FRAME_S = FRAME / SAMPLE_RATE
WINDOW_S = 30.0  # whisper's window


PACK_GAP_S = 2.0  # silence left between stretches of speech packed into one window (1 s changed words)


@dataclass(frozen=True)
class Window:
    """Speech decoded as one 30 s window: one stretch of the audio, or several packed together.

    `pieces` are (start, end) in seconds from the first sample, in order. Stretches separated by a
    long silence are packed back to back with PACK_GAP_S of silence between them: each would
    otherwise be padded to 30 s alone, and the encoder's work is per window, not per second of
    speech. Times the model gives in the window map back through `to_source`.
    """

    pieces: tuple[tuple[float, float], ...]

    @property
    def start(self) -> float:
        """Return where the window's first piece starts in the audio."""
        return self.pieces[0][0]

    @property
    def end(self) -> float:
        """Return where the window's last piece ends in the audio."""
        return self.pieces[-1][1]

    @property
    def length(self) -> float:
        """Return the window's length as decoded: the pieces and the gaps between them."""
        return packed_length(self.pieces)

    def span_to_source(self, start: float, end: float) -> tuple[float, float]:
        """Return where a stretch of the window (a segment, a word) lies in the audio, never ending
        before it starts: one that lies wholly in a gap between pieces becomes a point at the next piece."""
        source_start = self.to_source(start)
        return source_start, max(self.to_source(end, end=True), source_start)

    def to_source(self, t: float, *, end: bool = False) -> float:
        """Return where a time in the window (seconds from its start) lies in the audio.

        A time in a gap between pieces goes to the end of the piece before it when it ends
        something (`end`), else to the start of the next one.
        """
        position = 0.0
        for i, (a, b) in enumerate(self.pieces):
            if t <= position + (b - a):
                if t >= position:
                    return a + (t - position)
                return self.pieces[i - 1][1] if end and i > 0 else a
            position += (b - a) + PACK_GAP_S
        return self.end


def packed_length(pieces: Sequence[Sequence[float]]) -> float:
    """Return how long pieces last packed back to back with PACK_GAP_S between them."""
    return sum(b - a for a, b in pieces) + PACK_GAP_S * max(len(pieces) - 1, 0)


def weights_path() -> Path:
    """Return the Silero VAD weights inside the installed `silero-vad` wheel.

    Found without importing the package: importing `silero_vad` runs `torch.set_num_threads(1)`,
    which would leave the importing thread, and every thread that starts torch work after it, on
    one core for the rest of the process (the model's encoder included).
    """
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("silero-vad is not installed: its wheel carries the VAD weights")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad_16k.safetensors"


_model: Any = None
_lock = threading.Lock()


def _network() -> Any:
    """Return the VAD network with Silero's weights (built once per process)."""
    global _model
    with _lock:
        if _model is None:
            from safetensors.torch import load_file
            from torch import nn

            class SileroVad(nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
                    self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
                    self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
                    self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
                    self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
                    self.lstm = nn.LSTM(128, 128, batch_first=True)
                    self.final_conv = nn.Conv1d(128, 1, 1)

                def forward(self, frames: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
                    # frames: (n, CONTEXT + FRAME), consecutive; state: the LSTM's (h, c) or None
                    x = nn.functional.pad(frames, (0, 64), mode="reflect").unsqueeze(1)
                    x = self.stft_conv(x)
                    x = (x[:, :129, :] ** 2 + x[:, 129:, :] ** 2).sqrt()
                    for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
                        x = conv(x).relu()
                    x = x.squeeze(-1)  # (n, 128): one vector per frame
                    h, state = self.lstm(x.unsqueeze(0), state)  # the frames are the LSTM's sequence
                    x = self.final_conv(h.squeeze(0).relu().unsqueeze(-1)).sigmoid()
                    return x.squeeze(-1).squeeze(-1), state

            raw = load_file(str(weights_path()))
            state = {k: v for k, v in raw.items() if not k.startswith("lstm_cell.")}
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                state[f"lstm.{name}_l0"] = raw[f"lstm_cell.{name}"]
            network = SileroVad()
            network.load_state_dict(state, strict=True)
            _model = network.eval()
        return _model


def speech_probabilities(samples: Samples) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Return the probability of speech for every 32 ms frame of the audio."""
    import torch

    network = _network()
    frames = -(-len(samples) // FRAME)
    out = np.zeros(frames, dtype=np.float32)
    state = None
    context = np.zeros(CONTEXT, dtype=np.float32)
    with torch.inference_mode():
        for first in range(0, frames, BLOCK):
            count = min(BLOCK, frames - first)
            block = np.zeros(count * FRAME, dtype=np.float32)
            chunk = samples[first * FRAME : (first + count) * FRAME]
            block[: len(chunk)] = chunk
            # Each frame with the last CONTEXT samples before it, as Silero's model expects.
            padded = np.concatenate((context, block))
            idx = np.arange(count)[:, None] * FRAME + np.arange(CONTEXT + FRAME)[None, :]
            probs, state = network(torch.from_numpy(padded[idx]), state)
            out[first : first + count] = probs.numpy()
            context = block[-CONTEXT:]
    return out


def speech_windows(
    samples: Samples,
    *,
    threshold: float = 0.5,
    min_silence_s: float = 0.3,
    min_speech_s: float = 0.25,
    pad_s: float = 0.2,
    window_s: float = WINDOW_S,
    max_gap_s: float | None = None,
) -> list[Window]:
    """Return the windows to decode: the speech, in windows of at most `window_s` cut at pauses.

    Speech starts above `threshold` and ends once the probability stays below threshold - 0.15
    for `min_silence_s`; each stretch keeps `pad_s` of its surroundings; stretches next to one
    another are joined into one window while it stays within `window_s` and the silence between
    them is shorter than `max_gap_s` (whisper tends to stop at a long silence, taking what follows
    it in the same window for nothing); a longer stretch is cut at its quietest frame in the last
    third of the window.
    """
    probs = speech_probabilities(samples)
    duration = len(samples) / SAMPLE_RATE
    spans = _speech_spans(probs, threshold, min_silence_s, min_speech_s)
    windows: list[Window] = []
    current: list[list[float]] = []  # the open window's pieces

    def close() -> None:
        if current:
            windows.append(Window(tuple((round(a, 3), round(b, 3)) for a, b in current)))
            current.clear()

    for start_f, end_f in spans:
        start = max(start_f * FRAME_S - pad_s, 0.0)
        end = min(end_f * FRAME_S + pad_s, duration)
        while end - start > window_s:  # one stretch too long for a window: cut at its quietest point
            cut = _quietest(probs, start + window_s * 2 / 3, start + window_s)
            close()
            windows.append(Window(((round(start, 3), round(cut, 3)),)))
            start = cut
        if current:
            long_gap = max_gap_s is not None and start - current[-1][1] >= max_gap_s
            if not long_gap and packed_length(current) + (end - current[-1][1]) <= window_s:
                current[-1][1] = end  # a short pause stays inside the piece
                continue
            if long_gap and start - current[-1][1] <= PACK_GAP_S:
                long_gap = False  # shorter than the gap packing leaves: nothing to gain
                if packed_length(current) + (end - current[-1][1]) <= window_s:
                    current[-1][1] = end
                    continue
            if long_gap and packed_length(current) + PACK_GAP_S + (end - start) <= window_s:
                current.append([start, end])  # a long silence is left out: packed after a short gap
                continue
            close()
        current.append([start, end])
    close()
    return _reach_the_ends(windows, duration, window_s, max_gap_s)


def _reach_the_ends(windows: list[Window], duration: float, window_s: float, max_gap_s: float | None) -> list[Window]:
    """Return the windows with the first starting at the audio's start and the last ending at its end,
    where the silence there is shorter than `max_gap_s` and the window stays within `window_s`.

    Decoded as whisper decodes it, from the file's first sample: a short file is then one window
    exactly as the sequential engine sees it. Cut tight at the speech, the model heard some words
    differently: on the bench's 20 espeak-ng passages (greedy, float32) 99 word errors against
    whisper's 94, and the same 94 with the ends reached; espeak-ng French lost "votre attention".
    """
    if not windows:
        return windows

    def fits(pieces: list[list[float]]) -> bool:
        return packed_length(pieces) <= window_s

    first = [list(p) for p in windows[0].pieces]
    if first[0][0] > 0.0 and (max_gap_s is None or first[0][0] < max_gap_s):
        widened = [[0.0, first[0][1]], *first[1:]]
        if fits(widened):
            windows[0] = Window(tuple((a, b) for a, b in widened))
    last = [list(p) for p in windows[-1].pieces]
    if last[-1][1] < duration and (max_gap_s is None or duration - last[-1][1] < max_gap_s):
        widened = [*last[:-1], [last[-1][0], round(duration, 3)]]
        if fits(widened):
            windows[-1] = Window(tuple((a, b) for a, b in widened))
    return windows


def _speech_spans(
    probs: np.ndarray[Any, np.dtype[np.float32]], threshold: float, min_silence_s: float, min_speech_s: float
) -> list[tuple[int, int]]:
    """Return [start, end) frame ranges of speech, with hysteresis."""
    low = threshold - 0.15
    quiet_needed = max(1, round(min_silence_s / FRAME_S))
    spans, start, quiet = [], None, 0
    for i, p in enumerate(probs):
        if start is None:
            if p >= threshold:
                start, quiet = i, 0
        elif p < low:
            quiet += 1
            if quiet >= quiet_needed:
                spans.append((start, i - quiet + 1))
                start = None
        else:
            quiet = 0
    if start is not None:
        spans.append((start, len(probs)))
    return [(a, b) for a, b in spans if (b - a) * FRAME_S >= min_speech_s]


def _quietest(probs: np.ndarray[Any, np.dtype[np.float32]], from_s: float, to_s: float) -> float:
    """Return the time of the least speech-like frame in [from_s, to_s)."""
    a, b = int(from_s / FRAME_S), max(int(to_s / FRAME_S), int(from_s / FRAME_S) + 1)
    segment = probs[a:b]
    return float(a + int(np.argmin(segment))) * FRAME_S if len(segment) else to_s
