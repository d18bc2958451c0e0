"""What a `model:` setting names, and what can be known about it without loading any weights.

A setting is one of four kinds of source:
  named        an OpenAI name (tiny … large-v3, turbo): downloaded into model_dir on first use
  checkpoint   a whisper `.pt` file
  hf           a Hugging Face transformers Whisper folder (config.json + model.safetensors …)
  ct2          a CTranslate2 Whisper folder (model.bin + config.json), as faster-whisper uses
Paths are told from names by a '/' or a `.pt` ending; a folder's kind is told by its files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from daemon.errors import ModelError

Kind = Literal["named", "checkpoint", "hf", "ct2"]

# Dimensions of OpenAI's turbo (large-v3-turbo): 32 encoder layers, 4 decoder layers. Fine-tunes of it
# keep them, and none of them was trained to translate.
TURBO_LAYERS = (32, 4)
MULTILINGUAL_VOCAB = 51865  # whisper's own test: English-only models have 51864 tokens


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from."""

    setting: str  # as written in the config (a path already made absolute)
    kind: Kind
    path: Path | None  # the file or folder; None for a named model

    def describe(self) -> str:
        """Return a short human description: 'OpenAI base', 'CTranslate2 folder /srv/…'."""
        return {
            "named": f"OpenAI {self.setting}",
            "checkpoint": f"whisper checkpoint {self.path}",
            "hf": f"Hugging Face folder {self.path}",
            "ct2": f"CTranslate2 folder {self.path}",
        }[self.kind]


@dataclass(frozen=True)
class ModelFacts:
    """What decides which tasks and languages a model can serve."""

    multilingual: bool
    translates: bool  # False for turbo: it was not trained to translate


def is_path_setting(setting: str) -> bool:
    """Return True when a model setting names a file or folder rather than an OpenAI model."""
    return setting.endswith(".pt") or "/" in setting


# whisper.available_models() (whisper 20250625), copied so that validating a config imports neither
# whisper nor torch; tests/test_languages.py checks the copy against the installed whisper.
NAMED_MODELS = (
    "tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium",
    "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo",
)  # fmt: skip


def named_models() -> list[str]:
    """Return the OpenAI model names whisper knows."""
    return list(NAMED_MODELS)


def identify(setting: str) -> ModelSource:
    """Return the source a setting names; raise ModelError saying what is wrong with it."""
    if not is_path_setting(setting):
        if setting in named_models():
            return ModelSource(setting, "named", None)
        raise ModelError(
            f"unknown model {setting!r}; available: {', '.join(named_models())}, or a path to a whisper "
            ".pt file, a Hugging Face Whisper folder or a CTranslate2 Whisper folder"
        )
    path = Path(setting)
    if path.is_file():
        from daemon.models.ptdims import looks_like_checkpoint

        if not looks_like_checkpoint(path):
            raise ModelError(f"{path}: not a whisper checkpoint torch can read: not a file torch wrote "
                             "(neither its zip format nor a pickle)")
        return ModelSource(setting, "checkpoint", path)
    if path.is_dir():
        from daemon.models.hf import is_hf_folder

        if (path / "model.bin").is_file():
            return ModelSource(setting, "ct2", path)
        if is_hf_folder(path):
            return ModelSource(setting, "hf", path)
        raise ModelError(
            f"{path} is a folder but holds no whisper model: expected model.bin (CTranslate2) or "
            "config.json with model.safetensors or pytorch_model.bin (Hugging Face)"
        )
    if setting.endswith(".pt"):
        raise ModelError(f"checkpoint file not found: {setting}")
    raise ModelError(f"model folder or file not found: {setting}")


def source_problem(setting: str) -> str | None:
    """Return why a model setting cannot work (unknown name, missing path), or None if it can."""
    try:
        identify(setting)
    except ModelError as err:
        return str(err)
    return None


def facts(setting: str) -> ModelFacts | None:
    """Return what a model can do, read cheaply (names, config files, headers); None if unknowable."""
    try:
        source = identify(setting)
    except ModelError:
        return None
    if source.kind == "named":
        return ModelFacts(multilingual=not setting.endswith(".en"), translates="turbo" not in setting)
    assert source.path is not None
    stat = source.path.stat()
    try:
        return _path_facts(str(source.path), source.kind, stat.st_size, stat.st_mtime_ns)
    except Exception:  # not a checkpoint (torch raises RuntimeError, UnpicklingError …): loading will
        return None  # report what is wrong, with more detail


@lru_cache(maxsize=64)
def _path_facts(path_text: str, kind: Kind, _size: int, _mtime_ns: int) -> ModelFacts:
    path = Path(path_text)
    if kind == "ct2":
        from daemon.models.ct2 import header, layer_count

        model = header(path)
        vocab = model.variables["decoder/embeddings/weight"].shape[0]
        layers = tuple(layer_count(model, side) for side in ("encoder", "decoder"))
    elif kind == "hf":
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        vocab = int(config["vocab_size"])
        layers = (int(config["encoder_layers"]), int(config["decoder_layers"]))
    else:
        from daemon.models.ptdims import read_dims

        dims = read_dims(path)  # without importing torch: config checks must start fast
        if dims is None:
            import torch

            dims = torch.load(path, map_location="meta", weights_only=True, mmap=True)["dims"]
        vocab = int(dims["n_vocab"])
        layers = (int(dims["n_audio_layer"]), int(dims["n_text_layer"]))
    return ModelFacts(multilingual=vocab >= MULTILINGUAL_VOCAB, translates=layers != TURBO_LAYERS)


def task_problems(setting: str, task: str, language: str) -> list[str]:
    """Return why a model cannot serve a task and language (English-only, turbo translating)."""
    known = facts(setting)
    if known is None:
        return []
    found = []
    if task == "translate" and not known.translates:
        found.append(f"task 'translate' with model {setting!r}: the turbo model is not trained to translate; "
                     "use 'medium' or 'large-v3' for translation")
    if not known.multilingual:
        if task == "translate":
            found.append(f"model {setting!r} is English-only and cannot translate")
        if language not in ("auto", "track", "en"):
            found.append(f"model {setting!r} is English-only; language must be 'en' or 'auto'")
    return found
