"""Long silences in extracted audio, so that whisper decodes only the stretches around speech.

whisper starts a 30 s window's first segment at most 1 s into the window (its decoder's
max_initial_timestamp), so speech that follows a long silence gets a cue that starts up to 29 s
too early; and over long silences it tends to invent text. Decoding only the stretches between
long silences (whisper's own `clip_timestamps`, which keeps every time on the audio's timeline)
fixes both and saves the model the work.

Only near-digital silence counts (by default below -60 dBFS for at least 3 s): a room's noise
floor, music or quiet speech is far louder, so nothing that might be speech is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from daemon.pipeline.extract import SAMPLE_RATE, Samples

FRAME_S = 0.02  # loudness is measured per 20 ms (one whisper encoder frame)
EDGE_S = 0.3  # silence kept next to speech, so soft onsets and endings reach the model
_CHUNK_FRAMES = 1 << 12  # frames measured at a time (82 s, 10 MB as float64): memory follows this, not the file


@dataclass(frozen=True)
class Span:
    """A stretch of the audio, in seconds from its first sample."""

    start: float
    end: float


def loud_frames(samples: Samples, threshold_db: float, sample_rate: int = SAMPLE_RATE) -> (
    npt.NDArray[np.bool_]
):
    """Return, per FRAME_S frame, whether its RMS level is at or above threshold_db (dBFS)."""
    frame = round(FRAME_S * sample_rate)
    count = math.ceil(len(samples) / frame)
    threshold_power = 10.0 ** (threshold_db / 10.0)  # RMS in dB is 10·log10 of the mean square
    loud = np.zeros(count, dtype=bool)
    for first in range(0, count, _CHUNK_FRAMES):
        block = samples[first * frame : (first + _CHUNK_FRAMES) * frame].astype(np.float64)
        frames = len(block) // frame
        power = np.mean(np.square(block[: frames * frame]).reshape(frames, frame), axis=1)
        loud[first : first + frames] = power >= threshold_power
        if len(block) > frames * frame:  # the last, partial frame
            loud[first + frames] = float(np.mean(np.square(block[frames * frame :]))) >= threshold_power
    return loud


def speech_spans(
    samples: Samples, *, min_silence_s: float, threshold_db: float, sample_rate: int = SAMPLE_RATE
) -> tuple[Span, ...]:
    """Return the stretches to decode: everything but silences of at least min_silence_s.

    Each skipped silence keeps EDGE_S next to the speech on either side. One span covering the
    whole audio means there is nothing to skip; no span at all means the audio is silent.
    """
    duration = len(samples) / sample_rate
    loud = loud_frames(samples, threshold_db, sample_rate)
    if not loud.any():
        return ()
    # Runs of quiet frames: where `quiet` steps up (a run starts) and down (it ends).
    quiet = np.concatenate(([0], (~loud).astype(np.int8), [0]))
    steps = np.diff(quiet)
    starts, ends = np.flatnonzero(steps == 1), np.flatnonzero(steps == -1)
    spans = []
    cursor = 0.0
    for first, last in zip(starts, ends, strict=True):
        if (last - first) * FRAME_S < min_silence_s:
            continue
        silent_from = 0.0 if first == 0 else first * FRAME_S + EDGE_S
        silent_to = duration if last == len(loud) else last * FRAME_S - EDGE_S
        if silent_to <= silent_from:  # too short to skip once the edges are kept
            continue
        if silent_from > cursor:
            spans.append(Span(round(float(cursor), 3), round(float(silent_from), 3)))
        cursor = silent_to
    if cursor < duration:
        spans.append(Span(round(float(cursor), 3), duration))
    return tuple(spans)
