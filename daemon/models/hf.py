"""Hugging Face transformers Whisper folders (config.json + model.safetensors) → a `Checkpoint`.

The format fine-tuned Whispers are published in on the Hub: `config.json` with
`model_type: whisper`, the weights in `model.safetensors` or `pytorch_model.bin` (or shards listed
in a `*.index.json`), and often a `generation_config.json` whose `alignment_heads` word timestamps
need. Names map one to one onto whisper's (`model.encoder.layers.0.self_attn.q_proj` is
`encoder.blocks.0.attn.query`); `proj_out` must be the token embedding itself, as in whisper.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.errors import ModelError
from daemon.models.checkpoint import AlignmentHeads, Checkpoint, check_state

if TYPE_CHECKING:
    import torch

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)

# Hugging Face name → whisper name, per piece of a layer's path.
_LAYER_PARTS = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
_TOP = {
    "encoder.conv1.weight": "encoder.conv1.weight",
    "encoder.conv1.bias": "encoder.conv1.bias",
    "encoder.conv2.weight": "encoder.conv2.weight",
    "encoder.conv2.bias": "encoder.conv2.bias",
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "encoder.layer_norm.weight": "encoder.ln_post.weight",
    "encoder.layer_norm.bias": "encoder.ln_post.bias",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.layer_norm.weight": "decoder.ln.weight",
    "decoder.layer_norm.bias": "decoder.ln.bias",
}
_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_folder(folder: Path) -> bool:
    """Return True when a folder holds a transformers model (config.json naming a model_type)."""
    config = folder / "config.json"
    if not config.is_file() or not any((folder / name).is_file() for name in WEIGHT_FILES):
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def read_config(folder: Path) -> dict[str, Any]:
    """Return the folder's config.json, refusing a model that is not a Whisper."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not readable JSON: {err}") from err
    if not isinstance(config, dict) or config.get("model_type") != "whisper":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise ModelError(f"{path}: model_type is {kind!r}, not 'whisper'")
    for key, wanted in (("activation_function", "gelu"), ("scale_embedding", False)):
        if key in config and config[key] != wanted:
            raise ModelError(f"{path}: {key} is {config[key]!r}; whisper's architecture needs {wanted!r}")
    return config


def dims_from_config(config: dict[str, Any], path: Path) -> Any:
    """Return whisper's ModelDimensions for a transformers Whisper config."""
    from whisper.model import ModelDimensions

    try:
        return ModelDimensions(
            n_mels=int(config.get("num_mel_bins", 80)),
            n_audio_ctx=int(config.get("max_source_positions", 1500)),
            n_audio_state=int(config["d_model"]),
            n_audio_head=int(config["encoder_attention_heads"]),
            n_audio_layer=int(config["encoder_layers"]),
            n_vocab=int(config["vocab_size"]),
            n_text_ctx=int(config.get("max_target_positions", 448)),
            n_text_state=int(config["d_model"]),
            n_text_head=int(config["decoder_attention_heads"]),
            n_text_layer=int(config["decoder_layers"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{path / 'config.json'}: lacks whisper's dimensions ({err})") from err


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Return every tensor of the folder's weight files, by Hugging Face name."""
    import torch
    from safetensors.torch import load_file

    def load_one(path: Path) -> dict[str, torch.Tensor]:
        try:
            if path.suffix == ".safetensors":
                return dict(load_file(str(path), device="cpu"))
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated download, a pickle with code in it
            raise ModelError(f"{path}: cannot read the weights: {err}") from err
        if not isinstance(loaded, dict):
            raise ModelError(f"{path}: not a state dict")
        return dict(loaded)

    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as err:
                raise ModelError(f"{path}: not a shard index: {err}") from err
            weights: dict[str, torch.Tensor] = {}
            for shard in shards:
                if "/" in shard or shard.startswith("."):
                    raise ModelError(f"{path}: shard name {shard!r} leaves the folder")
                weights |= load_one(folder / shard)
            return weights
        return load_one(path)
    raise ModelError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)})")


def whisper_name(hf_name: str) -> str | None:
    """Return whisper's name for a transformers Whisper tensor, or None for one whisper has no place for."""
    name = hf_name.removeprefix("model.")
    if name in _TOP:
        return _TOP[name]
    match = _LAYER.match(name)
    if match and match.group(3) in _LAYER_PARTS:
        side, index, part, kind = match.groups()
        return f"{side}.blocks.{index}.{_LAYER_PARTS[part]}.{kind}"
    return None


def _alignment_heads(folder: Path) -> AlignmentHeads | None:
    path = folder / "generation_config.json"
    if not path.is_file():
        return None
    try:
        heads = json.loads(path.read_text(encoding="utf-8")).get("alignment_heads")
        return tuple((int(layer), int(head)) for layer, head in heads) if heads else None
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ModelError(f"{path}: alignment_heads is not a list of [layer, head]: {err}") from err


def read_hf(folder: Path) -> Checkpoint:
    """Return the whisper checkpoint held in a transformers Whisper folder; refuse what does not fit."""
    import torch

    config = read_config(folder)
    dims = dims_from_config(config, folder)
    weights = _load_weights(folder)
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for hf_name, tensor in weights.items():
        if hf_name.removeprefix("model.") == "proj_out.weight" or hf_name == "proj_out.weight":
            continue  # checked below
        name = whisper_name(hf_name)
        if name is None:
            unknown.append(hf_name)
        else:
            state[name] = tensor
    if unknown:
        raise ModelError(f"{folder}: {len(unknown)} tensor(s) whisper has no place for: "
                         f"{', '.join(sorted(unknown)[:5])}{' …' if len(unknown) > 5 else ''}")
    projection = weights.get("proj_out.weight")
    embedding = state.get("decoder.token_embedding.weight")
    if projection is not None and embedding is not None and not torch.equal(projection, embedding):
        raise ModelError(f"{folder}: proj_out differs from the token embedding; whisper ties the two")
    checkpoint = Checkpoint(dims, state, _alignment_heads(folder))
    check_state(checkpoint, folder)
    return checkpoint
