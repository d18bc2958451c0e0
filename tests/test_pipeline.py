"""The file → subtitles pipeline with real ffmpeg and real whisper code on a tiny checkpoint."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import MediaSet
from whisper.tokenizer import get_tokenizer

from daemon.config import Rule, Settings
from daemon.errors import MediaError, TransientError
from daemon.fsutil import atomic_write_text
from daemon.pipeline import process_file
from daemon.pipeline.extract import SAMPLE_RATE, extract
from daemon.pipeline.probe import probe, select_stream
from daemon.pipeline.publish import publish
from daemon.pipeline.source import open_path
from daemon.pipeline.transcribe import WhisperEngine

SETTINGS = Settings()
SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)$")
VTT_TIME = re.compile(r"^(?:(\d\d):)?(\d\d):(\d\d)\.(\d\d\d) --> (?:(\d\d):)?(\d\d):(\d\d)\.(\d\d\d)$")


def _seconds(h: str | None, m: str, s: str, ms: str) -> float:
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def _cue_times(text: str, pattern: re.Pattern[str]) -> list[tuple[float, float]]:
    cues = []
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            g = m.groups()
            cues.append((_seconds(*g[:4]), _seconds(*g[4:])))
    return cues


def _assert_well_formed(cues: list[tuple[float, float]]) -> None:
    assert cues, "no cues"
    for (start, end), (next_start, _) in zip(cues, [*cues[1:], (float("inf"), 0.0)], strict=True):
        assert 0 <= start <= end <= next_start


@pytest.mark.parametrize("source", ["speech_mp4", "speech_mkv", "speech_mp3"])
def test_every_format_is_written_and_parses(
    source: str, media_set: MediaSet, engine: WhisperEngine, fast_rule: Callable[..., Rule], tmp_path: Path
) -> None:
    """txt, srt, vtt, tsv and json all appear, parse, and no temporary file is left behind."""
    result = process_file(getattr(media_set, source), fast_rule(), engine, SETTINGS, target_dir=tmp_path)
    stem = getattr(media_set, source).stem
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{stem}.{ext}" for ext in ("txt", "srt", "vtt", "tsv", "json")
    )
    srt = (tmp_path / f"{stem}.srt").read_text()
    _assert_well_formed(_cue_times(srt, SRT_TIME))
    assert srt.startswith("1\n")
    vtt = (tmp_path / f"{stem}.vtt").read_text()
    assert vtt.startswith("WEBVTT\n")
    _assert_well_formed(_cue_times(vtt, VTT_TIME))
    doc = json.loads((tmp_path / f"{stem}.json").read_text())
    assert {"text", "segments", "language"} <= set(doc)
    assert doc["language"] == result.transcript.language
    assert len(doc["segments"]) == len(result.transcript.segments) >= 1
    assert (tmp_path / f"{stem}.tsv").read_text().startswith("start\tend\ttext\n")
    assert (tmp_path / f"{stem}.txt").read_text().strip() == "\n".join(
        s.text.strip() for s in result.transcript.segments
    )


def test_output_name_template_and_formats(
    media_set: MediaSet, engine: WhisperEngine, fast_rule: Callable[..., Rule], tmp_path: Path
) -> None:
    """`{stem}.{lang}.{ext}` with two formats writes exactly those two names."""
    rule = fast_rule(output_formats=["srt", "vtt"], output_name="{stem}.{lang}.{ext}", language="en")
    process_file(media_set.speech_mp4, rule, engine, SETTINGS, target_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.en.srt", "speech.en.vtt"]


def test_layout_options_reach_whispers_writer(
    media_set: MediaSet, engine: WhisperEngine, fast_rule: Callable[..., Rule], tmp_path: Path
) -> None:
    """max_words_per_line splits cues into lines of at most that many words, as whisper's CLI does."""
    rule = fast_rule(word_timestamps=True, max_words_per_line=2, output_formats=["srt"])
    process_file(media_set.speech_mp4, rule, engine, SETTINGS, target_dir=tmp_path)
    lines = [line for line in (tmp_path / "speech.srt").read_text().splitlines()
             if line and not line.isdigit() and "-->" not in line]
    assert lines and all(len(line.split()) <= 2 for line in lines)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    """A writer that fails halfway leaves the previous file intact and no temp file behind."""
    target = tmp_path / "talk.txt"
    target.write_text("old transcript\n")

    def half_then_crash(handle: Any) -> None:
        handle.write("partial")
        raise RuntimeError("disk pulled")

    with pytest.raises(RuntimeError):
        atomic_write_text(target, half_then_crash)
    assert target.read_text() == "old transcript\n"
    assert [p.name for p in tmp_path.iterdir()] == ["talk.txt"]


def test_unwritable_outbox_is_transient(
    media_set: MediaSet, engine: WhisperEngine, fast_rule: Callable[..., Rule], tmp_path: Path
) -> None:
    """An outbox that cannot be written is a TransientError naming the folder (root ignores modes)."""
    blocker = tmp_path / "outbox"
    blocker.write_text("a file where the outbox directory should be")
    with pytest.raises(TransientError, match="cannot write outputs") as caught:
        process_file(media_set.speech_mp4, fast_rule(), engine, SETTINGS, target_dir=blocker / "sub")
    assert caught.value.stage == "publish"


def test_translate_reaches_the_model_as_the_translate_task(
    media_set: MediaSet, engine: WhisperEngine, fast_rule: Callable[..., Rule], tmp_path: Path
) -> None:
    """With task translate, the decoder's prompt carries whisper's <|translate|> token."""
    model = engine.registry.get(fast_rule().model)
    tokenizer = get_tokenizer(multilingual=True, num_languages=model.num_languages)
    prompts: list[list[int]] = []

    def record(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        prompts.append(args[0][0].tolist())

    for task, token in (("translate", tokenizer.translate), ("transcribe", tokenizer.transcribe)):
        prompts.clear()
        handle = model.decoder.register_forward_pre_hook(record)
        try:
            result = process_file(media_set.speech_mp4, fast_rule(task=task, language="fr"), engine,
                                  SETTINGS, target_dir=tmp_path)
        finally:
            handle.remove()
        first = prompts[0][:4]
        assert first[:3] == [tokenizer.sot, tokenizer.to_language_token("fr"), token]
        assert result.transcript.task == task


def _dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)[spectrum.argmax()])


@pytest.mark.parametrize(
    ("audio_track", "expected_hz", "expected_tag"),
    [("fra", 880, "fra"), ("eng", 440, "eng"), ("default", 440, "eng"), (1, 880, "fra"), ("deu", 440, "eng")],
)
def test_audio_track_selection(
    media_set: MediaSet, fast_rule: Callable[..., Rule], audio_track: object, expected_hz: float,
    expected_tag: str, tmp_path: Path,
) -> None:
    """A language-tag rule picks that track (440 Hz eng, 880 Hz fra); an absent tag falls back."""
    info = probe(open_path(media_set.two_tracks))
    stream = select_stream(info, fast_rule(audio_track=audio_track))
    assert stream.language == expected_tag
    audio = extract(info, stream, work_dir=tmp_path)
    assert abs(_dominant_hz(np.asarray(audio.samples)) - expected_hz) < 5


def test_track_index_out_of_range_is_a_media_error(
    media_set: MediaSet, fast_rule: Callable[..., Rule]
) -> None:
    """audio_track: 5 on a two-track file fails permanently with the count in the message."""
    with pytest.raises(MediaError, match="2 audio stream"):
        select_stream(probe(open_path(media_set.two_tracks)), fast_rule(audio_track=5))


def test_start_delay_is_measured_by_extract(media_set: MediaSet, tmp_path: Path) -> None:
    """A track starting 2 s into the container is decoded with a 2 s offset."""
    info = probe(open_path(media_set.delayed))
    audio = extract(info, info.audio_streams[0], work_dir=tmp_path)
    assert audio.offset_s == pytest.approx(2.0, abs=0.05)
    plain = probe(open_path(media_set.speech_mp4))
    plain_audio = extract(plain, plain.audio_streams[0], work_dir=tmp_path / "plain")
    assert plain_audio.offset_s == pytest.approx(0.0, abs=0.05)


def test_start_delay_shifts_every_segment_by_the_offset(
    media_set: MediaSet, engine: WhisperEngine, fast_rule: Callable[..., Rule], tmp_path: Path
) -> None:
    """The same audio placed 2 s later yields the same segments, each 2 s later."""
    info = probe(open_path(media_set.speech_mp4))
    audio = extract(info, info.audio_streams[0], work_dir=tmp_path)
    rule = fast_rule(word_timestamps=True)
    plain = engine.transcribe(audio, rule)
    delayed = engine.transcribe(dataclasses.replace(audio, offset_s=2.0), rule)
    assert [s.text for s in plain.segments] == [s.text for s in delayed.segments]
    for a, b in zip(plain.segments, delayed.segments, strict=True):
        assert b.start - a.start == pytest.approx(2.0, abs=0.002)
        assert b.end - a.end == pytest.approx(2.0, abs=0.002)
        for wa, wb in zip(a.words or (), b.words or (), strict=True):
            assert wb.start - wa.start == pytest.approx(2.0, abs=0.002)


def test_delayed_file_end_to_end_has_no_cue_before_the_audio(
    media_set: MediaSet, engine: WhisperEngine, fast_rule: Callable[..., Rule], tmp_path: Path
) -> None:
    """Subtitles of a file whose audio starts at 2 s begin no earlier than 2 s."""
    process_file(media_set.delayed, fast_rule(output_formats=["srt"]), engine, SETTINGS, target_dir=tmp_path)
    cues = _cue_times((tmp_path / "delayed.srt").read_text(), SRT_TIME)
    assert cues and cues[0][0] >= 1.95


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("no_audio", "no audio stream"),
        ("not_media", "not a media file"),
        ("zero_byte", "empty (0 bytes)"),
    ],
)
def test_bad_inputs_raise_media_error_naming_file_and_reason(
    source: str, reason: str, media_set: MediaSet, engine: WhisperEngine,
    fast_rule: Callable[..., Rule], tmp_path: Path,
) -> None:
    """No audio, not media and empty files are permanent errors that say which file and why."""
    path = getattr(media_set, source)
    with pytest.raises(MediaError) as caught:
        process_file(path, fast_rule(), engine, SETTINGS, target_dir=tmp_path)
    err = caught.value
    assert reason in err.reason
    assert err.path == path and str(path) in str(err)
    assert err.stage == "probe"
    assert list(tmp_path.iterdir()) == []
    if source == "not_media":
        assert err.command and err.command.startswith("ffprobe") and err.stderr_tail


def test_missing_ffprobe_is_transient_not_the_files_fault(
    media_set: MediaSet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without ffprobe on PATH the file is not declared broken: the error is transient."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TransientError, match="program not found"):
        probe(open_path(media_set.speech_mp4))


def test_progress_is_reported_up_to_one(
    media_set: MediaSet, engine: WhisperEngine, fast_rule: Callable[..., Rule], tmp_path: Path
) -> None:
    """The progress callback sees increasing fractions ending at 1.0."""
    seen: list[float] = []
    process_file(media_set.speech_mp4, fast_rule(), engine, SETTINGS, target_dir=tmp_path,
                 progress=seen.append)
    assert seen and seen[-1] == 1.0
    assert seen == sorted(seen)


def test_publish_overwrites_previous_outputs_in_place(
    media_set: MediaSet, engine: WhisperEngine, fast_rule: Callable[..., Rule], tmp_path: Path
) -> None:
    """Publishing twice leaves one set of outputs, the newer one (never two copies)."""
    rule = fast_rule(output_formats=["txt"])
    result = process_file(media_set.speech_mp4, rule, engine, SETTINGS, target_dir=tmp_path)
    (tmp_path / "speech.txt").write_text("stale")
    publish(result.transcript, rule, tmp_path, "speech")
    assert [p.name for p in tmp_path.iterdir()] == ["speech.txt"]
    assert (tmp_path / "speech.txt").read_text() != "stale"


def test_every_pipeline_event_names_the_file_as_the_caller_does(
    media_set: MediaSet, fast_rule: Callable[..., Rule], engine: WhisperEngine, tmp_path: Path
) -> None:
    """The stage events carry the caller's name for the file (the worker's inbox-relative path), so
    `journalctl FILE=talks/talk.mp4` finds them all; without one, the path it was opened by."""
    from structlog.testing import capture_logs

    rule = fast_rule(output_formats=["txt"])
    with capture_logs() as named:
        process_file(media_set.speech_mp4, rule, engine, SETTINGS, target_dir=tmp_path / "a", name="talks/talk.mp4")
    with capture_logs() as unnamed:
        process_file(media_set.speech_mp4, rule, engine, SETTINGS, target_dir=tmp_path / "b")
    stages = ["probed", "extracted", "transcribed", "published"]
    assert [(e["event"], e["file"]) for e in named if e["event"] in stages] == [(s, "talks/talk.mp4") for s in stages]
    assert [(e["event"], e["file"]) for e in unnamed if e["event"] in stages] == [
        (s, str(media_set.speech_mp4)) for s in stages
    ]
