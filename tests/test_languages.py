"""whisperd's copies of whisper's tables, and reading a checkpoint's dims without torch."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import whisper
import whisper.tokenizer

from daemon.config import parse_config
from daemon.errors import ConfigError
from daemon.languages import LANGUAGES, TO_LANGUAGE_CODE, normalize_language
from daemon.models.ptdims import read_dims
from daemon.models.sources import NAMED_MODELS

FIXTURE = Path(__file__).parent / "fixtures" / "speech-tiny.pt"


def test_language_table_is_whispers_own() -> None:
    """Every language code and name whisper accepts is accepted, and no other (the copy is current)."""
    assert LANGUAGES == whisper.tokenizer.LANGUAGES
    assert list(LANGUAGES) == list(whisper.tokenizer.LANGUAGES)  # order: whisper's language tokens
    assert TO_LANGUAGE_CODE == whisper.tokenizer.TO_LANGUAGE_CODE


def test_model_names_are_whispers_own() -> None:
    """`model:` accepts exactly the names whisper.available_models() lists."""
    assert list(NAMED_MODELS) == whisper.available_models()


def test_an_unknown_language_suggests_the_closest_names() -> None:
    """A misspelt language is refused with the closest names whisper knows."""
    with pytest.raises(ValueError, match=r"unknown language 'frensh'; did you mean french, "):
        normalize_language("frensh")
    with pytest.raises(ConfigError, match=r"defaults.language: unknown language 'portugese'; did you mean portuguese"):
        parse_config({"defaults": {"language": "portugese"}})
    assert normalize_language("Castilian") == "es"  # whisper's other names count too


@pytest.mark.parametrize("path", ["checkpoint", "fixture"])
def test_checkpoint_dims_match_torch(path: str, checkpoint: Path) -> None:
    """The dims read without torch are the ones torch reads from the same checkpoint."""
    file = checkpoint if path == "checkpoint" else FIXTURE
    expected = torch.load(file, map_location="meta", weights_only=True)["dims"]
    assert read_dims(file) == expected


def test_reading_dims_runs_nothing_in_the_file(tmp_path: Path) -> None:
    """A checkpoint whose pickle would run a command is read as data: the command never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"dims": {"n_vocab": 51865}, "x": Payload()}))
    assert read_dims(evil) == {"n_vocab": 51865}
    assert not marker.exists()
    assert read_dims(tmp_path / "missing.pt") is None
    (tmp_path / "text.pt").write_text("not a zip")
    assert read_dims(tmp_path / "text.pt") is None
