"""Whisper's own checkpoint format, and building a `Whisper` module from weights without waste.

Every source format (an OpenAI `.pt`, a Hugging Face folder, a CTranslate2 folder) is read into
one typed value, `Checkpoint`: the model's dimensions, a state dict in whisper's names, and the
cross-attention heads that word timestamps use. `build_model` turns it into the module the
pipeline runs, skipping whisper's random initialisation (18 s for large-v3 on a CPU, thrown away
the moment the real weights arrive) by leaving the module's parameters unfilled and assigning the
loaded tensors in their place.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.errors import ModelError

if TYPE_CHECKING:
    import torch
    from whisper.model import ModelDimensions, Whisper

AlignmentHeads = tuple[tuple[int, int], ...]  # (decoder layer, head) pairs, as Hugging Face writes them


@dataclass(frozen=True)
class Checkpoint:
    """A whisper model's weights in whisper's own names, from whatever format they came in."""

    dims: ModelDimensions
    state: dict[str, torch.Tensor]
    alignment_heads: AlignmentHeads | None = None  # None: whisper's default (the last half of the layers)

    @property
    def nbytes(self) -> int:
        """Return the size of the weights in bytes."""
        return sum(t.numel() * t.element_size() for t in self.state.values())


def expected_shapes(dims: ModelDimensions) -> dict[str, tuple[int, ...]]:
    """Return every persistent tensor of a Whisper module with these dimensions, and its shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.conv1.weight": (dims.n_audio_state, dims.n_mels, 3),
        "encoder.conv1.bias": (dims.n_audio_state,),
        "encoder.conv2.weight": (dims.n_audio_state, dims.n_audio_state, 3),
        "encoder.conv2.bias": (dims.n_audio_state,),
        "encoder.positional_embedding": (dims.n_audio_ctx, dims.n_audio_state),
        "encoder.ln_post.weight": (dims.n_audio_state,),
        "encoder.ln_post.bias": (dims.n_audio_state,),
        "decoder.token_embedding.weight": (dims.n_vocab, dims.n_text_state),
        "decoder.positional_embedding": (dims.n_text_ctx, dims.n_text_state),
        "decoder.ln.weight": (dims.n_text_state,),
        "decoder.ln.bias": (dims.n_text_state,),
    }
    for side, layers, width in (("encoder", dims.n_audio_layer, dims.n_audio_state),
                                ("decoder", dims.n_text_layer, dims.n_text_state)):
        attentions = ("attn", "cross_attn") if side == "decoder" else ("attn",)
        for i in range(layers):
            block = f"{side}.blocks.{i}"
            for attn in attentions:
                for proj in ("query", "key", "value", "out"):
                    shapes[f"{block}.{attn}.{proj}.weight"] = (width, width)
                    if proj != "key":  # whisper's key projection has no bias
                        shapes[f"{block}.{attn}.{proj}.bias"] = (width,)
                shapes |= {f"{block}.{attn}_ln.weight": (width,), f"{block}.{attn}_ln.bias": (width,)}
            shapes |= {
                f"{block}.mlp.0.weight": (4 * width, width), f"{block}.mlp.0.bias": (4 * width,),
                f"{block}.mlp.2.weight": (width, 4 * width), f"{block}.mlp.2.bias": (width,),
                f"{block}.mlp_ln.weight": (width,), f"{block}.mlp_ln.bias": (width,),
            }  # fmt: skip
    return shapes


def check_state(checkpoint: Checkpoint, source: Path | str) -> None:
    """Raise ModelError naming the source when the weights do not fit whisper's module exactly."""
    wanted = expected_shapes(checkpoint.dims)
    got = {name: tuple(t.shape) for name, t in checkpoint.state.items()}
    problems = [f"missing tensor {name}" for name in sorted(wanted.keys() - got.keys())]
    problems += [f"unexpected tensor {name}" for name in sorted(got.keys() - wanted.keys())]
    problems += [
        f"{name} has shape {list(got[name])}, expected {list(shape)}"
        for name, shape in sorted(wanted.items()) if name in got and got[name] != shape
    ]
    if checkpoint.alignment_heads:
        bad = [(layer, head) for layer, head in checkpoint.alignment_heads
               if not (0 <= layer < checkpoint.dims.n_text_layer and 0 <= head < checkpoint.dims.n_text_head)]
        if bad:
            problems.append(f"alignment heads {bad} lie outside the decoder's layers and heads")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ModelError(f"{source}: not a whisper model whisperd can load: {'; '.join(problems[:5])}{more}")


def read_checkpoint(path: Path) -> Checkpoint:
    """Return the checkpoint in a whisper `.pt` file, its tensors mapped from disk, not copied."""
    import torch
    from whisper.model import ModelDimensions

    try:
        # weights_only: a checkpoint is data, never code (a pickle could run anything). mmap: the
        # tensors stay in the page cache until they are moved to the device, never copied twice.
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            raw = torch.load(path, map_location="cpu", weights_only=True)  # torch's legacy file format
    except Exception as err:  # not a zip, a truncated download, a pickle with code in it
        raise ModelError(f"{path}: not a whisper checkpoint torch can read: {err}") from err
    if not isinstance(raw, dict) or "dims" not in raw or "model_state_dict" not in raw:
        raise ModelError(f"{path}: not a whisper checkpoint (no 'dims' and 'model_state_dict' in it)")
    try:
        dims = ModelDimensions(**raw["dims"])
    except TypeError as err:
        raise ModelError(f"{path}: the checkpoint's dims are not whisper's: {err}") from err
    heads = raw.get("alignment_heads")
    checkpoint = Checkpoint(dims, dict(raw["model_state_dict"]),
                            tuple((int(a), int(b)) for a, b in heads) if heads else None)
    check_state(checkpoint, path)
    return checkpoint


def write_checkpoint(checkpoint: Checkpoint, target: Path) -> None:
    """Write a checkpoint in whisper's format (loadable by `whisper.load_model` too), atomically."""
    import torch

    from daemon.fsutil import atomic_write_binary

    data: dict[str, Any] = {"dims": asdict(checkpoint.dims), "model_state_dict": checkpoint.state}
    if checkpoint.alignment_heads is not None:
        data["alignment_heads"] = [list(pair) for pair in checkpoint.alignment_heads]
    atomic_write_binary(target, lambda handle: torch.save(data, handle))


_construct_lock = threading.Lock()


@contextlib.contextmanager
def _parameters_left_uninitialised() -> Iterator[None]:
    """Within: torch's layers allocate their parameters but do not fill them with random values.

    whisper's constructor initialises every weight randomly (18 s for large-v3 on a CPU), only for
    the checkpoint's weights to replace them. Without the fill, the allocation is untouched memory
    that the loaded tensors replace at once. (The meta device would avoid even the allocation, but
    whisper's constructor computes its positional table and mask there, and meta tensors make
    torch import its compiler: a second and a half of start-up.)
    """
    from torch import nn

    layers: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Embedding, nn.LayerNorm)
    with _construct_lock:
        saved = [cls.reset_parameters for cls in layers]  # type: ignore[attr-defined]
        for cls in layers:
            cls.reset_parameters = lambda self: None  # type: ignore[attr-defined]
        try:
            yield
        finally:
            for cls, original in zip(layers, saved, strict=True):
                cls.reset_parameters = original  # type: ignore[attr-defined]


def _empty_module(dims: ModelDimensions) -> Whisper:
    """Return whisper's own module with these dimensions, its parameters allocated but not filled."""
    from whisper.model import Whisper

    with _parameters_left_uninitialised():
        return Whisper(dims)


def _is_layer_norm(name: str) -> bool:
    # attn_ln, cross_attn_ln, mlp_ln, ln_post (encoder) and ln (decoder)
    parts = name.split(".")
    return len(parts) >= 2 and (parts[-2].endswith("_ln") or parts[-2] in ("ln", "ln_post"))


def weight_dtype(name: str, half: bool) -> torch.dtype:
    """Return the dtype a tensor is kept in: fp16 on CUDA except LayerNorm (fp32 keeps it stable)."""
    import torch

    return torch.float16 if half and not _is_layer_norm(name) else torch.float32


def build_model(checkpoint: Checkpoint, *, device: str, half: bool) -> Whisper:
    """Return a ready Whisper module on `device` holding the checkpoint's weights.

    With `half`, weights stay float16 (LayerNorm float32): an fp16 checkpoint never passes through
    an fp32 copy. Otherwise every weight is float32, which CPU kernels need.
    """
    dims = checkpoint.dims
    module = _empty_module(dims)
    state = {}
    for name, tensor in checkpoint.state.items():
        # Move first, then convert: on a GPU the conversion runs there, and fp16 stays fp16 in transit.
        state[name] = tensor.to(device=device, dtype=weight_dtype(name, half) if tensor.is_floating_point()
                                else tensor.dtype)
    # assign: the module takes these tensors as they are (device, dtype) instead of copying into its own.
    module.load_state_dict(state, strict=True, assign=True)
    module.register_buffer("alignment_heads", alignment_mask(dims, checkpoint.alignment_heads), persistent=False)
    return module.to(device).eval()  # moves what the checkpoint does not hold: the mask and the heads


def alignment_mask(dims: ModelDimensions, heads: AlignmentHeads | None) -> torch.Tensor:
    """Return whisper's sparse (layer, head) mask of the cross-attention heads used for word timing."""
    import torch

    mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
    if heads:
        for layer, head in heads:
            mask[layer, head] = True
    else:
        mask[dims.n_text_layer // 2 :] = True  # whisper's default when a model names none
    return mask.to_sparse()


def heads_from_whisper_dump(dims: ModelDimensions, dump: bytes) -> AlignmentHeads | None:
    """Return the (layer, head) pairs of one of whisper's base85 alignment-head dumps.

    None when the dump does not fit the model's decoder (a file that is not the named model).
    """
    import base64
    import gzip

    import numpy as np

    flat = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool)
    if flat.size != dims.n_text_layer * dims.n_text_head:
        return None
    array = flat.reshape(dims.n_text_layer, dims.n_text_head)
    return tuple((int(a), int(b)) for a, b in zip(*np.nonzero(array), strict=True))


def model_nbytes(module: torch.nn.Module) -> int:
    """Return the bytes a module's parameters and buffers occupy."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_sparse)
