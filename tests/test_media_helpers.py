"""Prove the test-media helpers (tests/media.py) and the tiny-checkpoint tool do what they claim."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import make_test_checkpoint
import media
import pytest

CONTAINERS = [".mp4", ".mkv"]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Return short English and French speech WAVs shared by this module's tests."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is needed to make speech")
    root = tmp_path_factory.mktemp("speech")
    return {
        "eng": media.speech_wav(root / "eng.wav", "Hello, this is the English track."),
        "fra": media.speech_wav(root / "fra.wav", "Bonjour, voici la piste française.", voice="fr"),
    }


def _streams_of(path: Path, kind: str) -> list[dict[str, Any]]:
    """Return ffprobe's streams of one codec_type ("audio" or "video") in ``path``."""
    return [s for s in media.ffprobe_streams(path) if s["codec_type"] == kind]


@pytest.mark.parametrize("suffix", CONTAINERS)
def test_two_track_video_has_eng_then_fra_audio(
    tmp_path: Path, speech: dict[str, Path], suffix: str
) -> None:
    """A two-track video has one video stream and two audio streams tagged eng then fra."""
    path = media.video_with_tracks(
        tmp_path / f"two{suffix}", [(speech["eng"], "eng"), (speech["fra"], "fra")]
    )
    assert len(_streams_of(path, "video")) == 1
    audio = _streams_of(path, "audio")
    assert [s.get("tags", {}).get("language") for s in audio] == ["eng", "fra"]


@pytest.mark.parametrize("suffix", CONTAINERS)
def test_video_with_audio_tags_language(
    tmp_path: Path, speech: dict[str, Path], suffix: str
) -> None:
    """A single-track video carries exactly one audio stream, tagged with the given language."""
    path = media.video_with_audio(tmp_path / f"one{suffix}", speech["eng"], language="eng")
    audio = _streams_of(path, "audio")
    assert len(audio) == 1
    assert audio[0]["tags"]["language"] == "eng"


@pytest.mark.parametrize("suffix", CONTAINERS)
def test_delayed_audio_starts_two_seconds_after_video(
    tmp_path: Path, speech: dict[str, Path], suffix: str
) -> None:
    """The delayed video's audio start_time is 2.0±0.1 s while its video starts at ≈0."""
    path = media.video_with_delayed_audio(tmp_path / f"late{suffix}", speech["eng"], delay_s=2.0)
    (video,) = _streams_of(path, "video")
    (audio,) = _streams_of(path, "audio")
    assert float(video["start_time"]) == pytest.approx(0.0, abs=0.02)
    # Not exact: the encoder's priming/pre-skip samples are taken off the
    # start (about 22 ms for AAC in mp4, 9-13 ms for Opus in mkv).
    assert float(audio["start_time"]) == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("suffix", CONTAINERS)
def test_video_without_audio_has_no_audio_stream(tmp_path: Path, suffix: str) -> None:
    """The no-audio video has a video stream and no audio stream."""
    path = media.video_without_audio(tmp_path / f"mute{suffix}")
    assert len(_streams_of(path, "video")) == 1
    assert _streams_of(path, "audio") == []


@pytest.mark.parametrize(
    ("suffix", "codec"),
    [
        (".mp3", "mp3"),
        (".m4a", "aac"),
        (".ogg", "vorbis"),
        (".flac", "flac"),
        (".wav", "pcm_s16le"),
    ],
)
def test_audio_file_uses_codec_for_suffix(
    tmp_path: Path, speech: dict[str, Path], suffix: str, codec: str
) -> None:
    """audio_file transcodes to the one-audio-stream format its suffix names."""
    path = media.audio_file(tmp_path / f"speech{suffix}", speech["eng"])
    assert [s["codec_name"] for s in media.ffprobe_streams(path)] == [codec]


def test_non_media_files_are_what_they_claim(tmp_path: Path) -> None:
    """text_as_media writes readable text under a media name and zero_byte writes an empty file."""
    text = media.text_as_media(tmp_path / "notes.mp4")
    assert text.suffix == ".mp4" and "plain text" in text.read_text(encoding="utf-8")
    assert media.zero_byte(tmp_path / "empty.mkv").stat().st_size == 0


def test_checkpoint_loads_as_tiny_multilingual_whisper(tmp_path: Path) -> None:
    """make_checkpoint writes a file whisper.load_model loads as a 64-wide multilingual model."""
    whisper = pytest.importorskip("whisper")
    path = make_test_checkpoint.make_checkpoint(tmp_path / "tiny.pt")
    model = whisper.load_model(str(path), device="cpu")
    assert model.dims.n_text_state == 64
    assert model.dims.n_audio_state == 64
    assert model.is_multilingual
    # Every weight must be a sane number (whisper leaves one tensor uninitialised).
    assert all(t.isfinite().all() and t.abs().max() < 100 for t in model.state_dict().values())
    # The atomic write must not leave its temp file behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]


def test_checkpoint_weights_depend_only_on_seed(tmp_path: Path) -> None:
    """Two checkpoints with the same seed have identical tensors and a different seed differs."""
    torch = pytest.importorskip("torch")

    def state(name: str, seed: int) -> dict[str, Any]:
        """Return the saved state dict of a freshly made checkpoint."""
        path = make_test_checkpoint.make_checkpoint(tmp_path / name, seed=seed)
        tensors: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)[
            "model_state_dict"
        ]
        return tensors

    first, again, other = state("a.pt", 0), state("b.pt", 0), state("c.pt", 1)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_checkpoint_cli_honours_width_and_layers(tmp_path: Path) -> None:
    """The command-line entry point writes a checkpoint with the requested width and depth."""
    torch = pytest.importorskip("torch")
    out = tmp_path / "cli.pt"
    argv = [str(out), "--seed", "3", "--width", "32", "--layers", "1"]
    assert make_test_checkpoint.main(argv) == 0
    dims = torch.load(out, map_location="cpu", weights_only=True)["dims"]
    assert (dims["n_text_state"], dims["n_audio_layer"], dims["n_vocab"]) == (32, 1, 51865)
