"""CTranslate2 Whisper folders (`model.bin` + `config.json`, as faster-whisper uses) → a `Checkpoint`.

The file format, from CTranslate2's loader (`src/models/model.cc`) and its Whisper spec
(`python/ctranslate2/specs/whisper_spec.py`, `transformer_spec.py`):

    uint32 binary version (4 … 6 here), string spec name, uint32 spec revision, uint32 variable count
    per variable: string name, uint8 rank, uint32 × rank dims, uint8 dtype, uint32 byte count, data
    uint32 alias count, per alias: string alias, string target

Strings are a uint16 length that counts a trailing NUL, then the bytes. Attention is stored fused:
self-attention `linear_0` is q, k, v stacked (3d × d; the key bias is stored as zeros, whisper's
key has none), cross-attention has `linear_0` = q and `linear_1` = k, v stacked, and the output
projection is the last linear. int8/int16 weights carry a `weight_scale` to divide by.

Every tensor in the file must be used, and every scalar of the spec must say what whisper does;
anything else is refused with a message naming the file, so a model that would decode subtly
wrong never loads.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.errors import ModelError
from daemon.models.checkpoint import AlignmentHeads, Checkpoint, check_state

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

SPEC_NAME = "WhisperSpec"
KNOWN_REVISIONS = (2, 3)  # revision 3 added alignment_heads to the spec's config; the weights are the same
BINARY_VERSIONS = (4, 5, 6)  # 4 introduced the dtype byte this reader relies on
DTYPES = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "bfloat16"}
# common_spec.Activation: GELU is 3. Converters before the exact GELU existed wrote 1 (GELUTanh
# today) for the same weights; every whisper was trained with the exact GELU whisper's module runs.
GELU_VALUES = (3, 1)

# Scalars of the spec and the value that means "what whisper does". Anything else would change
# how the model computes, and whisper's module cannot follow.
EXPECTED_SCALARS: dict[str, tuple[int, ...]] = {
    "decoder/activation": GELU_VALUES,
    "decoder/alibi": (0,),
    "decoder/pre_norm": (1,),
    "decoder/scale_embeddings": (0,),
    "decoder/start_from_zero_embedding": (0,),
}
# Read elsewhere (the heads), informational (alignment heads come from config.json), or meaningful
# only with ALiBi, which is refused above.
CONSUMED_SCALARS = (
    "encoder/num_heads", "decoder/num_heads", "decoder/alignment_heads", "decoder/alignment_layer",
    "decoder/alibi_use_positive_positions", "decoder/scale_alibi",
)


@dataclass(frozen=True)
class Variable:
    """One tensor of model.bin, still in the file."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # of the data in the file
    nbytes: int


@dataclass(frozen=True)
class ModelBin:
    """The parsed header of a model.bin: what it holds and where, nothing loaded yet."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, Variable]
    aliases: dict[str, str]  # alias → variable name


class _Reader:
    def __init__(self, data: Any, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ModelError(f"{self.path}: truncated CTranslate2 model (ends inside the header at byte {self.pos})")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<H")
        raw = bytes(self.data[self.pos : self.pos + length])
        if len(raw) != length:
            raise ModelError(f"{self.path}: truncated CTranslate2 model (a name runs past the end)")
        self.pos += length
        return raw.rstrip(b"\0").decode("utf-8", errors="replace")

    def skip(self, nbytes: int) -> None:
        if self.pos + nbytes > len(self.data):
            raise ModelError(f"{self.path}: truncated CTranslate2 model (a tensor runs past the end)")
        self.pos += nbytes


def parse_model_bin(path: Path, data: Any) -> ModelBin:
    """Return the header of a model.bin held in `data` (bytes or a memory map)."""
    reader = _Reader(data, path)
    version = reader.take("<I")
    if version not in BINARY_VERSIONS:
        raise ModelError(f"{path}: CTranslate2 binary version {version} is not supported "
                         f"(this whisperd reads {BINARY_VERSIONS[0]}–{BINARY_VERSIONS[-1]})")
    spec = reader.string()
    revision = reader.take("<I")
    if spec != SPEC_NAME:
        raise ModelError(f"{path}: a CTranslate2 {spec or 'unnamed'} model, not a Whisper one ({SPEC_NAME})")
    if revision not in KNOWN_REVISIONS:
        raise ModelError(f"{path}: {SPEC_NAME} revision {revision} is unknown to this whisperd "
                         f"(it reads revisions {', '.join(map(str, KNOWN_REVISIONS))})")
    variables: dict[str, Variable] = {}
    for _ in range(reader.take("<I")):
        name = reader.string()
        rank = reader.take("<B")
        shape = tuple(reader.take("<I") for _ in range(rank))
        type_id = reader.take("<B")
        nbytes = reader.take("<I")
        if type_id not in DTYPES:
            raise ModelError(f"{path}: tensor {name} has data type {type_id}, which this whisperd cannot read")
        variables[name] = Variable(name, shape, DTYPES[type_id], reader.pos, nbytes)
        reader.skip(nbytes)
    aliases = {}
    for _ in range(reader.take("<I")):
        alias = reader.string()
        aliases[alias] = reader.string()
    if reader.pos != len(data):
        raise ModelError(f"{path}: {len(data) - reader.pos} bytes follow the model's last entry")
    return ModelBin(path, version, spec, revision, variables, aliases)


def _array(data: Any, var: Variable) -> npt.NDArray[Any]:
    import numpy as np

    raw = np.frombuffer(data, dtype=np.uint8, count=var.nbytes, offset=var.offset)
    if var.dtype == "bfloat16":
        # numpy has no bfloat16: widen the 16 bits into the top half of a float32.
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(var.shape)
    array = raw.view(var.dtype)
    if array.size != _numel(var.shape):
        raise ModelError(f"tensor {var.name}: {var.nbytes} bytes do not hold shape {list(var.shape)}")
    return array.reshape(var.shape)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class _Tensors:
    """Takes tensors out of a model.bin by name, remembering which were used."""

    def __init__(self, model: ModelBin, data: Any) -> None:
        self.model = model
        self.data = data
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.model.variables

    def scalar(self, name: str) -> int:
        var = self._var(name)
        if var.shape:
            raise ModelError(f"{self.model.path}: {name} should be a scalar, has shape {list(var.shape)}")
        return int(_array(self.data, var).reshape(()))

    def float_tensor(self, name: str, float_dtype: torch.dtype) -> torch.Tensor:
        """Return a float tensor (a copy, detached from the file); dequantise int8/int16 weights."""
        import torch

        var = self._var(name)
        array = _array(self.data, var)
        if var.dtype in ("i1", "<i2"):
            scale_name = name + "_scale"
            if not self.has(scale_name):
                raise ModelError(f"{self.model.path}: quantised tensor {name} has no {scale_name}")
            scale = torch.from_numpy(_array(self.data, self._var(scale_name)).astype("<f4"))
            values = torch.from_numpy(array.astype("<f4"))
            # CTranslate2 stores round(w × scale): one scale per output row for int8, one for int16.
            scale = scale.reshape(-1, *([1] * (values.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
            return (values / scale).to(float_dtype)
        if var.dtype in ("<i4",):
            raise ModelError(f"{self.model.path}: tensor {name} is int32, not weights")
        return torch.from_numpy(array.copy()).to(float_dtype)

    def _var(self, name: str) -> Variable:
        var = self.model.variables.get(name)
        if var is None:
            raise ModelError(f"{self.model.path}: tensor {name} is missing")
        self.used.add(name)
        return var

    def unused(self) -> list[str]:
        return sorted(set(self.model.variables) - self.used)


def _float_dtype(model: ModelBin) -> torch.dtype:
    """Return the dtype the converted weights keep: the file's own float type (fp16 stays fp16)."""
    import torch

    var = model.variables.get("decoder/embeddings/weight")
    if var is not None and var.dtype == "<f4":
        return torch.float32
    # fp16, bf16 and int8 models: fp16 holds them at half the size of fp32 (bf16's range is never
    # needed by whisper's weights; int8 weights dequantise into fp16 without loss of their 8 bits).
    return torch.float16


def layer_count(model: ModelBin, side: str) -> int:
    count = 0
    while f"{side}/layer_{count}/ffn/linear_0/weight" in model.variables:
        count += 1
    return count


def read_config(folder: Path) -> dict[str, Any]:
    """Return the folder's config.json (alignment heads, suppress ids), or {} when absent."""
    path = folder / "config.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not readable JSON: {err}") from err
    return data if isinstance(data, dict) else {}


def header(folder: Path) -> ModelBin:
    """Return the parsed header of the folder's model.bin (reads the index, not the weights)."""
    path = folder / "model.bin"
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return parse_model_bin(path, data)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}") from err


def read_ct2(folder: Path) -> Checkpoint:
    """Return the whisper checkpoint held in a CTranslate2 Whisper folder; refuse what does not fit."""
    path = folder / "model.bin"
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            model = parse_model_bin(path, data)
            tensors = _Tensors(model, data)
            checkpoint = _convert(model, tensors, read_config(folder))
            unused = tensors.unused()
    except (OSError, ValueError) as err:  # unreadable, or empty (mmap refuses a zero-length file)
        raise ModelError(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}") from err
    if unused:
        raise ModelError(f"{path}: {len(unused)} tensor(s) this whisperd does not know how to use: "
                         f"{', '.join(unused[:5])}{' …' if len(unused) > 5 else ''}")
    check_state(checkpoint, path)
    return checkpoint


def _convert(model: ModelBin, tensors: _Tensors, config: dict[str, Any]) -> Checkpoint:
    from whisper.model import ModelDimensions

    path = model.path
    for name, expected in EXPECTED_SCALARS.items():
        if tensors.has(name) and tensors.scalar(name) not in expected:
            raise ModelError(f"{path}: {name} is {tensors.scalar(name)}, whisper's architecture needs "
                             f"{' or '.join(map(str, expected))}")
    for name in CONSUMED_SCALARS:
        if tensors.has(name):
            tensors.scalar(name)
    projection = model.aliases.get("decoder/projection/weight")
    if tensors.has("decoder/projection/weight") or projection not in (None, "decoder/embeddings/weight"):
        # whisper computes logits with the token embedding itself; a separate projection cannot load.
        raise ModelError(f"{path}: the output projection is not tied to the token embedding, as whisper's is")
    unknown_aliases = set(model.aliases) - {"decoder/projection/weight"}
    if unknown_aliases:
        raise ModelError(f"{path}: unknown aliases {sorted(unknown_aliases)}")

    dtype = _float_dtype(model)

    def get(name: str) -> torch.Tensor:
        return tensors.float_tensor(name, dtype)

    embeddings = get("decoder/embeddings/weight")
    enc_layers, dec_layers = layer_count(model, "encoder"), layer_count(model, "decoder")
    conv1 = get("encoder/conv1/weight")
    enc_pos = get("encoder/position_encodings/encodings")
    dec_pos = get("decoder/position_encodings/encodings")
    n_audio_state, n_text_state = enc_pos.shape[1], dec_pos.shape[1]
    dims = ModelDimensions(
        n_mels=conv1.shape[1], n_audio_ctx=enc_pos.shape[0], n_audio_state=n_audio_state,
        n_audio_head=_heads(tensors, "encoder", n_audio_state), n_audio_layer=enc_layers,
        n_vocab=embeddings.shape[0], n_text_ctx=dec_pos.shape[0], n_text_state=n_text_state,
        n_text_head=_heads(tensors, "decoder", n_text_state), n_text_layer=dec_layers,
    )  # fmt: skip

    state: dict[str, torch.Tensor] = {
        "encoder.conv1.weight": conv1,
        "encoder.conv1.bias": get("encoder/conv1/bias"),
        "encoder.conv2.weight": get("encoder/conv2/weight"),
        "encoder.conv2.bias": get("encoder/conv2/bias"),
        "encoder.positional_embedding": enc_pos,
        "encoder.ln_post.weight": get("encoder/layer_norm/gamma"),
        "encoder.ln_post.bias": get("encoder/layer_norm/beta"),
        "decoder.token_embedding.weight": embeddings,
        "decoder.positional_embedding": dec_pos,
        "decoder.ln.weight": get("decoder/layer_norm/gamma"),
        "decoder.ln.bias": get("decoder/layer_norm/beta"),
    }
    for side, count in (("encoder", enc_layers), ("decoder", dec_layers)):
        for i in range(count):
            src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            state |= _layer_norm(get, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
            state |= _fused(get, path, f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"))
            state |= _linear(get, f"{src}/self_attention/linear_1", f"{dst}.attn.out")
            if side == "decoder":
                state |= _layer_norm(get, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
                state |= _linear(get, f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
                state |= _fused(get, path, f"{src}/attention/linear_1", f"{dst}.cross_attn", ("key", "value"))
                state |= _linear(get, f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
            state |= _layer_norm(get, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
            state |= _linear(get, f"{src}/ffn/linear_0", f"{dst}.mlp.0")
            state |= _linear(get, f"{src}/ffn/linear_1", f"{dst}.mlp.2")
    return Checkpoint(dims, state, _alignment_heads(config, path))


def _heads(tensors: _Tensors, side: str, n_state: int) -> int:
    name = f"{side}/num_heads"
    if not tensors.has(name):
        raise ModelError(f"{tensors.model.path}: {name} is missing")
    heads = tensors.scalar(name)
    if heads <= 0 or n_state % heads:
        raise ModelError(f"{tensors.model.path}: {heads} heads do not divide the width {n_state}")
    return heads


def _layer_norm(get: Any, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": get(f"{src}/gamma"), f"{dst}.bias": get(f"{src}/beta")}


def _linear(get: Any, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": get(f"{src}/weight"), f"{dst}.bias": get(f"{src}/bias")}


def _fused(get: Any, path: Path, src: str, dst: str, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Return the separate projections of a fused q/k/v (or k/v) linear; the key has no bias."""
    weight, bias = get(f"{src}/weight"), get(f"{src}/bias")
    if weight.shape[0] % len(parts) or bias.shape[0] != weight.shape[0]:
        raise ModelError(f"{path}: {src} has shape {list(weight.shape)}, not {len(parts)} stacked projections")
    out: dict[str, Any] = {}
    for part, w, b in zip(parts, weight.chunk(len(parts)), bias.chunk(len(parts)), strict=True):
        out[f"{dst}.{part}.weight"] = w.clone()
        if part == "key":
            if b.abs().max().item() != 0:
                raise ModelError(f"{path}: {src} has a non-zero key bias; whisper's key projection has none")
        else:
            out[f"{dst}.{part}.bias"] = b.clone()
    return out


def _alignment_heads(config: dict[str, Any], path: Path) -> AlignmentHeads | None:
    heads = config.get("alignment_heads")
    if heads is None:
        return None
    try:
        return tuple((int(layer), int(head)) for layer, head in heads)
    except (TypeError, ValueError) as err:
        raise ModelError(f"{path.parent / 'config.json'}: alignment_heads is not a list of [layer, head]") from err
