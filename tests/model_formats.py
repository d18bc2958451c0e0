"""Writing whisper weights in the other formats users hold, with the real writers of those formats.

A Hugging Face folder is written by transformers itself (`WhisperForConditionalGeneration` +
`save_pretrained`), from a whisper checkpoint through a mapping written here by hand (transformers
5 no longer ships its `convert_openai_to_hf.py`). A CTranslate2 folder is written by
CTranslate2's own converter from that Hugging Face folder, the way faster-whisper's models are
made. `rewrite_ct2` re-serialises a model.bin with changes, for the refusal tests.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# whisper name piece → transformers name piece, written independently of daemon/models/hf.py.
_BLOCK = {
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "attn_ln": "self_attn_layer_norm",
    "cross_attn.query": "encoder_attn.q_proj",
    "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj",
    "cross_attn.out": "encoder_attn.out_proj",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}
_TOP = {
    "encoder.positional_embedding": "model.encoder.embed_positions.weight",
    "encoder.ln_post.weight": "model.encoder.layer_norm.weight",
    "encoder.ln_post.bias": "model.encoder.layer_norm.bias",
    "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight",
    "decoder.positional_embedding": "model.decoder.embed_positions.weight",
    "decoder.ln.weight": "model.decoder.layer_norm.weight",
    "decoder.ln.bias": "model.decoder.layer_norm.bias",
}


def hf_name(name: str) -> str:
    """Return transformers' name for one of whisper's tensors."""
    if name in _TOP:
        return _TOP[name]
    if name.startswith(("encoder.conv", )):
        return "model." + name
    side, _, index, rest = name.split(".", 3)
    piece, kind = rest.rsplit(".", 1)
    return f"model.{side}.layers.{index}.{_BLOCK[piece]}.{kind}"


def write_hf(checkpoint: Path, folder: Path, *, tokenizer_json: Path | None = None,
             alignment_heads: list[list[int]] | None = None) -> Path:
    """Write a whisper `.pt` checkpoint as a transformers Whisper folder; return the folder."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    dims, state = raw["dims"], raw["model_state_dict"]
    config = WhisperConfig(
        vocab_size=dims["n_vocab"], num_mel_bins=dims["n_mels"], d_model=dims["n_audio_state"],
        encoder_layers=dims["n_audio_layer"], encoder_attention_heads=dims["n_audio_head"],
        decoder_layers=dims["n_text_layer"], decoder_attention_heads=dims["n_text_head"],
        encoder_ffn_dim=4 * dims["n_audio_state"], decoder_ffn_dim=4 * dims["n_text_state"],
        max_source_positions=dims["n_audio_ctx"], max_target_positions=dims["n_text_ctx"],
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config)
    converted = {hf_name(k): v.float() for k, v in state.items()}
    converted["proj_out.weight"] = converted["model.decoder.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and not [m for m in missing if m != "proj_out.weight"], (missing, unexpected)
    if alignment_heads is not None:
        model.generation_config.alignment_heads = alignment_heads
    model.save_pretrained(folder)
    if tokenizer_json is not None:
        shutil.copy(tokenizer_json, folder / "tokenizer.json")
    return folder


def write_ct2(hf_folder: Path, out: Path, quantization: str | None = None) -> Path:
    """Convert a transformers Whisper folder with CTranslate2's own converter; return the folder."""
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_folder), load_as_float16=False).convert(str(out), quantization=quantization)
    return out


# -- model.bin surgery, for the refusal tests ----------------------------------------------------

_DTYPE_IDS = {"<f4": 0, "i1": 1, "<i2": 2, "<i4": 3, "<f2": 4}


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def rewrite_ct2(source: Path, target: Path, change: Callable[[dict[str, np.ndarray]], None],
                *, spec: str = "WhisperSpec") -> Path:
    """Copy a CTranslate2 folder, changing model.bin's tensors through `change(tensors)`; return target."""
    from daemon.models.ct2 import parse_model_bin

    data = (source / "model.bin").read_bytes()
    model = parse_model_bin(source / "model.bin", data)
    tensors: dict[str, np.ndarray] = {}
    for name, var in model.variables.items():
        raw = np.frombuffer(data, dtype=np.uint8, count=var.nbytes, offset=var.offset)
        tensors[name] = raw.view(var.dtype).reshape(var.shape).copy()
    change(tensors)
    out = bytearray(struct.pack("<I", model.binary_version) + _string(spec) + struct.pack("<I", model.revision))
    out += struct.pack("<I", len(tensors))
    for name, array in tensors.items():
        body = np.ascontiguousarray(array).tobytes()
        out += _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<B", _DTYPE_IDS[array.dtype.str if array.dtype.str != "|i1" else "i1"])
        out += struct.pack("<I", len(body)) + body
    out += struct.pack("<I", len(model.aliases))
    for alias, name in model.aliases.items():
        out += _string(alias) + _string(name)
    target.mkdir(parents=True, exist_ok=True)
    (target / "model.bin").write_bytes(bytes(out))
    for extra in source.iterdir():
        if extra.name != "model.bin":
            shutil.copy(extra, target / extra.name)
    return target


def config_json(folder: Path) -> dict[str, Any]:
    """Return a folder's config.json."""
    return dict(json.loads((folder / "config.json").read_text(encoding="utf-8")))
