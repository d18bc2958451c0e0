"""End to end with a model that really recognises speech: tests/fixtures/speech-tiny.pt.

The fixture is a tiny whisper trained on espeak-ng speech of a closed set of phrases (see
tests/fixtures/README.md and tools/train_test_model.py). The voices here are espeak-ng variants it
never heard in training. Decoding is greedy at temperature 0 (fast and deterministic); the
hallucination guards (no_speech_threshold, logprob_threshold, compression_ratio_threshold) stay
at their defaults.
"""

from __future__ import annotations

import json
import re
import subprocess
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import media
import numpy as np
import pytest
from daemon_harness import Daemon, drop_file, files_under

from daemon.config import Rule, Settings
from daemon.pipeline import FileResult, process_file
from daemon.pipeline.transcribe import WhisperEngine

FIXTURE = Path(__file__).parent / "fixtures" / "speech-tiny.pt"

ENGLISH = "Where is the train station?"
FRENCH = "Le chat dort sur le lit."
FRENCH_MEANING = "The cat sleeps on the bed."
# Held-out espeak-ng voices: these variants were never used in training.
EN_VOICE = "en-us+m7"
FR_VOICE = "fr-fr+f4"

GREEDY: dict[str, Any] = {"temperature": 0, "beam_size": None, "best_of": None,
                          "condition_on_previous_text": False}
TOLERANCE_S = 0.5

pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason="tests/fixtures/speech-tiny.pt is missing")


def normalize(text: str) -> str:
    """Return text lowercased with punctuation stripped and whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def speech_span(wav: Path) -> tuple[float, float]:
    """Return (first, last) second of a WAV where the speech is louder than 2% of its peak."""
    with wave.open(str(wav)) as handle:
        rate = handle.getframerate()
        samples = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2").astype(np.float32)
    loud = np.flatnonzero(np.abs(samples) > 0.02 * np.abs(samples).max())
    return float(loud[0]) / rate, float(loud[-1]) / rate


@dataclass(frozen=True)
class Cue:
    """One srt cue."""

    start: float
    end: float
    text: str


def srt_cues(path: Path) -> list[Cue]:
    """Return the cues of an srt file."""
    def seconds(stamp: str) -> float:
        h, m, rest = stamp.split(":")
        s, ms = rest.split(",")
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    cues = []
    for block in path.read_text(encoding="utf-8").strip().split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) < 2:
            continue
        start, end = lines[1].split(" --> ")
        cues.append(Cue(seconds(start), seconds(end), " ".join(lines[2:])))
    return cues


@dataclass(frozen=True)
class Media:
    """Held-out-voice speech and the files made from it, once per module."""

    en_wav: Path
    fr_wav: Path
    en_mp4: Path
    fr_mp4: Path
    tracks_mp4: Path
    late_wav: Path
    late_french_wav: Path
    delayed_mp4: Path
    silence_mp4: Path
    noise_mp4: Path


def after_silence(speech: Path, seconds: float, target: Path) -> Path:
    """Write target: seconds of digital silence in the speech's own format, then the speech."""
    gap = target.with_name(f"gap-{seconds:g}.wav")
    subprocess.run(["sox", "-n", "-r", "22050", "-c", "1", "-b", "16", str(gap), "trim", "0", str(seconds)],
                   check=True)
    subprocess.run(["sox", str(gap), str(speech), str(target)], check=True)
    return target


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Media:
    """The module's media: an English and a French phrase in held-out voices, in several forms."""
    root = tmp_path_factory.mktemp("speech")
    en_wav = media.speech_wav(root / "en.wav", ENGLISH, voice=EN_VOICE, speed=160)
    fr_wav = media.speech_wav(root / "fr.wav", FRENCH, voice=FR_VOICE, speed=160)
    late_wav = after_silence(en_wav, 20.0, root / "late.wav")
    late_french_wav = after_silence(fr_wav, 35.0, root / "late-fr.wav")
    return Media(
        en_wav=en_wav,
        fr_wav=fr_wav,
        en_mp4=media.video_with_audio(root / "en.mp4", en_wav, language="eng"),
        fr_mp4=media.video_with_audio(root / "fr.mp4", fr_wav, language="fra"),
        tracks_mp4=media.video_with_tracks(root / "tracks.mp4", [(en_wav, "eng"), (fr_wav, "fra")]),
        late_wav=late_wav,
        late_french_wav=late_french_wav,
        delayed_mp4=media.video_with_delayed_audio(root / "delayed.mp4", en_wav, delay_s=2.0),
        silence_mp4=media.video_with_audio(root / "silence.mp4", media.silence_wav(root / "silence.wav",
                                                                                   seconds=4.0)),
        noise_mp4=media.video_with_audio(root / "noise.mp4", media.noise_wav(root / "noise.wav", seconds=4.0)),
    )


@pytest.fixture
def run(engine: WhisperEngine, tmp_path: Path) -> Callable[..., FileResult]:
    """Return a function that runs the real pipeline on a file with the fixture model and a rule."""
    settings = Settings()

    def go(source: Path, **rule: Any) -> FileResult:
        checked = Rule.model_validate({"model": str(FIXTURE), **GREEDY, "output_formats": ["srt", "json", "txt"],
                                       **rule})
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        return process_file(source, checked, engine, settings, target_dir=out, stem="result")

    return go


def output(result: FileResult, ext: str) -> Path:
    """Return the path of one output format."""
    return next(p for p in result.outputs if p.suffix == f".{ext}")


def test_english_phrase_in_mp4_gives_its_words_at_its_time(run: Callable[..., FileResult], clips: Media) -> None:
    """An English video gets subtitles with the spoken words, shown while they are spoken."""
    result = run(clips.en_mp4)
    cues = srt_cues(output(result, "srt"))
    assert [normalize(c.text) for c in cues] == [normalize(ENGLISH)]
    start, end = speech_span(clips.en_wav)
    assert abs(cues[0].start - start) <= TOLERANCE_S, (cues[0], start)
    assert abs(cues[0].end - end) <= TOLERANCE_S, (cues[0], end)


def test_audio_track_choice_picks_the_language(run: Callable[..., FileResult], clips: Media) -> None:
    """With English and French tracks, `audio_track: fra` subtitles the French one, the default the English."""
    french = run(clips.tracks_mp4, audio_track="fra")
    english = run(clips.tracks_mp4)
    assert normalize(french.transcript.text) == normalize(FRENCH)
    assert normalize(english.transcript.text) == normalize(ENGLISH)


def test_translate_gives_english_meaning_transcribe_gives_french(
    run: Callable[..., FileResult], clips: Media
) -> None:
    """`task: translate` on French speech gives its English meaning; `transcribe` keeps it French."""
    translated = run(clips.tracks_mp4, audio_track="fra", language="fr", task="translate")
    transcribed = run(clips.tracks_mp4, audio_track="fra", language="fr", task="transcribe")
    assert normalize(translated.transcript.text) == normalize(FRENCH_MEANING)
    assert normalize(transcribed.transcript.text) == normalize(FRENCH)


def test_auto_language_detects_french_and_records_it(run: Callable[..., FileResult], clips: Media) -> None:
    """`language: auto` on a French track finds French, and the json output says so."""
    result = run(clips.tracks_mp4, audio_track="fra", language="auto")
    assert result.transcript.language == "fr"
    assert json.loads(output(result, "json").read_text(encoding="utf-8"))["language"] == "fr"
    assert normalize(result.transcript.text) == normalize(FRENCH)


def test_phrase_after_long_silence_is_recognised(run: Callable[..., FileResult], clips: Media) -> None:
    """A phrase after 20 s of silence is still subtitled with its words (the silence does not hide it)."""
    result = run(clips.late_wav)
    assert [normalize(c.text) for c in srt_cues(output(result, "srt")) if c.text.strip()] == [normalize(ENGLISH)]


def test_phrase_after_long_silence_is_timed_where_it_is_said(run: Callable[..., FileResult], clips: Media) -> None:
    """A phrase after 20 s of silence gets its cue at 20 s, not at the start of whisper's window.

    whisper alone would start the window's first cue within 1 s of the window's start (its
    max_initial_timestamp); `skip_silence` (on by default) decodes from the end of the silence.
    """
    result = run(clips.late_wav)
    cues = [c for c in srt_cues(output(result, "srt")) if c.text.strip()]
    start, end = speech_span(clips.en_wav)
    assert [normalize(c.text) for c in cues] == [normalize(ENGLISH)]
    assert abs(cues[0].start - (20.0 + start)) <= TOLERANCE_S, cues[0]
    assert abs(cues[0].end - (20.0 + end)) <= TOLERANCE_S, cues[0]


def test_language_is_detected_where_the_speech_is(run: Callable[..., FileResult], clips: Media) -> None:
    """French after 35 s of silence is detected as French: whisper alone would listen to the silence."""
    result = run(clips.late_french_wav, language="auto")
    assert result.transcript.language == "fr"
    assert normalize(result.transcript.text) == normalize(FRENCH)
    cues = [c for c in srt_cues(output(result, "srt")) if c.text.strip()]
    start, _ = speech_span(clips.fr_wav)
    assert abs(cues[0].start - (35.0 + start)) <= TOLERANCE_S, cues[0]


def test_delayed_audio_track_shifts_cues(run: Callable[..., FileResult], clips: Media) -> None:
    """An audio track that starts 2 s into the video gets cues 2 s later, in sync with the picture."""
    result = run(clips.delayed_mp4)
    cues = srt_cues(output(result, "srt"))
    start, end = speech_span(clips.en_wav)
    assert [normalize(c.text) for c in cues] == [normalize(ENGLISH)]
    assert abs(cues[0].start - (2.0 + start)) <= TOLERANCE_S, cues[0]
    assert abs(cues[0].end - (2.0 + end)) <= TOLERANCE_S, cues[0]


@pytest.mark.parametrize("which", ["silence_mp4", "noise_mp4"])
def test_silence_and_noise_invent_no_text(run: Callable[..., FileResult], clips: Media, which: str) -> None:
    """A file with only silence or only noise gives empty subtitles, not invented words."""
    result = run(getattr(clips, which))
    assert result.transcript.text == ""
    assert [c.text for c in srt_cues(output(result, "srt")) if c.text.strip()] == []
    assert output(result, "txt").read_text(encoding="utf-8").strip() == ""


@pytest.mark.slow
def test_daemon_follows_folder_rules_on_real_speech(make_daemon: Callable[..., Daemon], clips: Media) -> None:
    """Videos dropped into an inbox get the words they say; a `rules:` entry translates its subfolder.

    The folder's rule sends `french/*` to `task: translate` with `language: fr`; everything else is
    transcribed with the language detected. The outbox mirrors the inbox's subfolders, and the
    English cue is timed with the speech.
    """
    daemon = make_daemon({"rules": [{"match": "french/*", "language": "fr", "task": "translate"}]})
    data = dict(daemon.data)
    data["defaults"] = {**data["defaults"], "model": str(FIXTURE), **GREEDY, "sample_len": None,
                        "no_speech_threshold": 0.6, "logprob_threshold": -1.0, "compression_ratio_threshold": 2.4}
    daemon.write_config(data)
    daemon.start()
    inbox, outbox = daemon.folder("inbox"), daemon.folder("outbox")
    drop_file(clips.en_mp4, inbox / "station.mp4")
    drop_file(clips.fr_mp4, inbox / "french" / "chat.mp4")
    drop_file(clips.fr_mp4, inbox / "chat.mp4")
    daemon.wait_done(3, timeout=90)
    assert files_under(outbox) == ["chat.srt", "chat.txt", "french/chat.srt", "french/chat.txt",
                                   "station.srt", "station.txt"]
    assert normalize((outbox / "french" / "chat.txt").read_text(encoding="utf-8")) == normalize(FRENCH_MEANING)
    assert normalize((outbox / "chat.txt").read_text(encoding="utf-8")) == normalize(FRENCH)
    cues = srt_cues(outbox / "station.srt")
    assert [normalize(c.text) for c in cues] == [normalize(ENGLISH)]
    start, end = speech_span(clips.en_wav)
    assert abs(cues[0].start - start) <= TOLERANCE_S and abs(cues[0].end - end) <= TOLERANCE_S, cues[0]
    daemon.stop()
