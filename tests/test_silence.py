"""Finding long silences to skip: daemon.pipeline.silence on real sample arrays."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from daemon.pipeline import silence
from daemon.pipeline.silence import EDGE_S, Span, speech_spans

RATE = 16000


def tone(seconds: float, level_db: float = -20.0) -> npt.NDArray[np.float32]:
    """Return a 440 Hz sine whose RMS is level_db dBFS."""
    t = np.arange(int(seconds * RATE)) / RATE
    amplitude = np.sqrt(2) * 10 ** (level_db / 20)
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def quiet(seconds: float, level_db: float | None = None) -> npt.NDArray[np.float32]:
    """Return digital silence, or white noise at level_db dBFS RMS."""
    n = int(seconds * RATE)
    if level_db is None:
        return np.zeros(n, dtype=np.float32)
    rng = np.random.default_rng(7)
    return (rng.standard_normal(n) * 10 ** (level_db / 20)).astype(np.float32)


def spans(*parts: npt.NDArray[np.float32], min_silence_s: float = 3.0) -> tuple[Span, ...]:
    return speech_spans(np.concatenate(parts), min_silence_s=min_silence_s, threshold_db=-60.0)


def test_a_long_pause_between_two_utterances_is_skipped_but_its_edges_kept() -> None:
    """2 s of sound, 6 s of silence, 2 s of sound: the pause less 0.3 s at each side is skipped."""
    found = spans(tone(2), quiet(6), tone(2))
    assert found == (Span(0.0, 2.0 + EDGE_S), Span(8.0 - EDGE_S, 10.0))


def test_a_lead_in_and_a_tail_of_silence_are_skipped() -> None:
    """Silence before the first sound and after the last is skipped up to the edge margin."""
    found = spans(quiet(20), tone(1.5), quiet(10))
    assert found == (Span(20.0 - EDGE_S, 21.5 + EDGE_S),)


def test_pauses_shorter_than_the_minimum_are_kept() -> None:
    """Pauses of 2.9 s with a 3 s minimum: one span, the whole audio."""
    found = spans(tone(1), quiet(2.9), tone(1), quiet(2.9), tone(1))
    assert found == (Span(0.0, 8.8),)


def test_a_noise_floor_above_the_threshold_is_never_skipped() -> None:
    """A room's hiss at -50 dBFS is not silence at the -60 dBFS default: nothing is skipped."""
    found = spans(tone(1), quiet(10, level_db=-50), tone(1))
    assert found == (Span(0.0, 12.0),)
    audio = np.concatenate([tone(1), quiet(10, level_db=-50), tone(1)])
    louder_threshold = speech_spans(audio, min_silence_s=3.0, threshold_db=-40.0)
    assert louder_threshold == (Span(0.0, 1.0 + EDGE_S), Span(11.0 - EDGE_S, 12.0))


def test_hiss_below_the_threshold_counts_as_silence() -> None:
    """Near-digital hiss at -75 dBFS (a codec's rounding noise) is skipped like zeros."""
    found = spans(quiet(10, level_db=-75), tone(1))
    assert found == (Span(10.0 - EDGE_S, 11.0),)


def test_all_silence_has_no_span() -> None:
    """Nothing but silence: no stretch to decode (the caller leaves the file to whisper's guards)."""
    assert spans(quiet(30)) == ()


def test_measuring_in_chunks_gives_the_same_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long files are measured a chunk at a time; chunk edges (and a partial last frame) change nothing."""
    audio = np.concatenate([quiet(7.3), tone(2.01), quiet(5.5), tone(0.77), quiet(4.013)])
    whole = speech_spans(audio, min_silence_s=3.0, threshold_db=-60.0)
    monkeypatch.setattr(silence, "_CHUNK_FRAMES", 7)
    assert speech_spans(audio, min_silence_s=3.0, threshold_db=-60.0) == whole
    assert len(whole) == 2
