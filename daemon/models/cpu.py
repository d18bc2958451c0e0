"""Faster Whisper on a CPU: the same network, the kernels that suit a CPU's memory.

Profiled on a 2-core AVX-512 server, decoding a batch of 8 windows with base: a third of the
time went to cross-attention (every token reads the 1,500 audio keys and values of every
window, 49 MB per layer in float32, through SDPA's kernel, which is slow for one query), a
fifth to the final projection onto the 51,865-token vocabulary (106 MB of float32 weights read
per token), a fifth to projecting the audio into those keys and values, and the encoder took
twice the decoder. Three changes, applied to a loaded model:

- `cpu_dtype: float32` (exact): the vocabulary projection reads float16 weights through
  FBGEMM's fp16 GEMM (it computes in float32; OpenAI's checkpoints are float16, so the weights
  are the checkpoint's own), and cross-attention uses the plain matmul-softmax-matmul path.
- `cpu_dtype: bfloat16` adds: the encoder's convolutions and linear layers run in bfloat16
  (LayerNorm stays float32, as whisper does for float16), and the cross-attention keys and values
  are projected and kept in bfloat16, halving what every token reads. About 1.8x faster where the
  CPU has AVX-512 BF16 or AMX, but not exact: the encoder's 8-bit mantissa changed a few words of
  espeak-ng French ("votre attention" heard as "vos tensions"), so it is a choice, not the default.
- `cpu_dtype: int8` adds to float32's: the linear layers of the encoder and of the decoder's
  attention and MLP multiply int8 by int8 (AVX-512 VNNI), as CTranslate2 does. Weights are
  quantised once at load, per output channel; activations at run time, **per row** (one scale per
  token of each window), never per tensor as torch's `quantize_dynamic` does. LayerNorm,
  attention, GELU, the convolutions and the vocabulary projection stay as float32 has them.

Each window's result depends only on that window: no int8 activation scale is shared across a
batch (a row's scale is its own), and int8 products are summed exactly in int32, so a window's
encoder output is bit for bit the same alone or among others.
"""

from __future__ import annotations

import contextlib
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from whisper.model import AudioEncoder, MultiHeadAttention, TextDecoder, Whisper

from daemon.models.attention import GroupedCrossAttention

# Imported only where a model is loaded (the registry): commands that load none never import torch.

log = structlog.get_logger(__name__)

CPU_DTYPES = ("float32", "bfloat16", "int8")


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return []


def bf16_is_native() -> bool:
    """Return True when this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX), where it pays."""
    return any(flag in _cpu_flags() for flag in ("avx512_bf16", "amx_bf16"))


def int8_is_native() -> bool:
    """Return True when this CPU has int8 dot-product instructions (VNNI or AMX), where int8 pays."""
    return any(flag in _cpu_flags() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def optimise_for_cpu(model: Whisper, dtype: str) -> Whisper:
    """Return the model (changed in place) with the CPU kernels of `dtype` ('float32', 'bfloat16' or 'int8')."""
    half = torch.bfloat16 if dtype == "bfloat16" else None
    if half is not None and not bf16_is_native():
        log.warning("cpu_dtype_slow", cpu_dtype=dtype,
                    reason="this CPU has no AVX-512 BF16 or AMX: bfloat16 is emulated, slower than float32")
    int8 = _int8_kernel() if dtype == "int8" else None
    if dtype == "int8" and int8 is None:
        log.warning("cpu_dtype_unavailable", cpu_dtype=dtype, consequence="float32 kernels",
                    reason="no int8 matrix product on this CPU sums exactly (without VNNI both oneDNN's and "
                           "torch._int_mm saturate 16-bit pair sums): int8 would change words")
    if int8 is not None:
        if not int8_is_native():
            log.warning("cpu_dtype_slow", cpu_dtype=dtype,
                        reason="this CPU has no VNNI or AMX int8 instructions: int8 may be slower than float32")
        # The decoder's too: a token step reads every weight for a few rows, so a quarter of the
        # bytes pays there as well (decoding 8 windows: 1.37 s -> 1.07 s).
        for block in [*model.encoder.blocks, *model.decoder.blocks]:
            for attention, names in ((block.attn, ("query", "key", "value", "out")),
                                     (block.cross_attn, ("query", "out"))):  # its key and value: below
                for name in names if attention is not None else ():
                    setattr(attention, name, _Int8Linear(getattr(attention, name), int8))
            block.mlp[0] = _Int8Linear(block.mlp[0], int8)
            block.mlp[1] = _GeluInPlace()  # on _Int8Linear's fresh output
            block.mlp[2] = _Int8Linear(block.mlp[2], int8)
    if half is not None:
        for module in model.encoder.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                module.to(half)  # whisper's Linear/Conv1d cast their input to their weight's dtype
        model.encoder.__class__ = _Encoder
    for block in model.decoder.blocks:
        attention = block.cross_attn
        if isinstance(attention, MultiHeadAttention):
            kept = half or torch.float32
            attention.key = _HeadMajor(attention.key, kept, attention.n_head, int8)
            attention.value = _HeadMajor(attention.value, kept, attention.n_head, int8)
            attention.__class__ = _CrossAttention
    weight = model.decoder.token_embedding.weight
    # Exact only when the weights are float16 values already (OpenAI's and most CTranslate2
    # checkpoints); a float32 fine-tune keeps whisper's own float32 projection.
    exact = bool(torch.equal(weight, weight.half().float()))
    packed = _pack_fp16(weight) if exact else None
    if packed is not None:
        model.decoder.vocabulary_packed = packed
        model.decoder.__class__ = _Decoder
    return model


def _pack_fp16(weight: torch.Tensor) -> Any:
    """Return the vocabulary weights packed for FBGEMM's fp16 GEMM, or None where it is missing (ARM)."""
    with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
        return torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), None)
    log.info("cpu_kernel_unavailable", kernel="fbgemm fp16", consequence="the vocabulary projection stays float32")
    return None


class _HeadMajor(torch.nn.Module):
    """The cross-attention key or value projection, returned as (batch, head, frame, dim) in `dtype`.

    whisper's key/value cache keeps what this returns; laid out by head, every token's attention
    reads it in place (whisper's (batch, frame, state) layout made each token copy it first).
    """

    def __init__(self, linear: Any, dtype: torch.dtype, n_head: int, int8: str | None = None) -> None:
        super().__init__()
        self.n_head = n_head
        self.dtype = dtype  # of what it returns
        self.int8 = None if int8 is None else _Int8Linear(linear, int8)
        # The float weights only where they are used: with int8 they would be kept twice (420 MB for large-v3).
        self.weight = None if int8 is not None else torch.nn.Parameter(linear.weight.detach().to(dtype),
                                                                       requires_grad=False)
        bias = linear.bias if int8 is None else None
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            projected: torch.Tensor = self.int8(x)
        else:
            assert self.weight is not None
            projected = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return projected.view(*projected.shape[:2], self.n_head, -1).transpose(1, 2).contiguous()


_ROUND = 128.5  # activations become uint8 around 128: x/scale + 128.5, truncated, is x/scale rounded, + 128


def _quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return x (2-D) as uint8 with zero point 128, and each row's scale: its largest magnitude / 127."""
    # amax and amin apart: torch.aminmax along rows is ten times slower than both together.
    scale = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_()).clamp_min_(1e-30)
    scale.div_(127.0)
    return torch.addcmul(x.new_tensor(_ROUND), x, scale.reciprocal()).to(torch.uint8), scale


def _int8_kernel() -> str | None:
    """Return the int8 matrix product that sums exactly on this CPU: 'onednn' (oneDNN's int8 linear,
    the faster), else 'int_mm' (torch._int_mm); None when neither does.

    Without VNNI (or AMX) both go through instructions that add pairs of products in 16 bits and
    saturate: a row of loud activations against large weights then sums wrong, silently. Each is
    tried once on exactly such rows and kept only if every sum is exact.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 256), dtype=torch.uint8, generator=generator)
    w = torch.randint(-127, 128, (64, 256), dtype=torch.int8, generator=generator)
    x[:, :8], w[:, :8] = 255, 127  # where a 16-bit pair sum would saturate
    x[:4], w[:4] = 255, 127  # whole rows of it: 127 × 127 × 256 needs all 32 bits
    exact = (x.long() - 128) @ w.long().t()
    with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
        got = _onednn(x, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(64))
        if torch.equal(got.long(), exact):
            return "onednn"
    log.info("cpu_kernel_unavailable", kernel="onednn int8", reason="missing or inexact on this CPU")
    with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
        if torch.equal(torch._int_mm((x.to(torch.int16) - 128).to(torch.int8), w.t()).long(), exact):
            return "int_mm"
    log.info("cpu_kernel_unavailable", kernel="torch._int_mm", reason="missing or inexact on this CPU")
    return None


def _onednn(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return (x - 128) @ W^T × scale (per output channel) in float32, through oneDNN's int8 linear."""
    zero = torch.zeros(scale.shape[0], dtype=torch.long)
    out: torch.Tensor = torch.ops.onednn.qlinear_pointwise(x, 1.0, 128, packed, scale, zero, None, 1.0, 0,
                                                           torch.float32, "none", [], "")
    return out


class _Int8Linear(torch.nn.Module):
    """A linear layer in int8: weights per output channel (once), activations per row (each call).

    A row's result depends on that row alone; int32 sums are exact, so however many rows, windows
    or threads share the call, every row gets the same bits.
    """

    def __init__(self, linear: Any, kernel: str) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.kernel = kernel
        self.scale = weight.abs().amax(dim=1).clamp_min(1e-30).div(127.0)
        quantised = torch.round(weight / self.scale[:, None]).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(quantised, None) if kernel == "onednn" else None
        # (in, out), column-major: what _int_mm reads fastest.
        self.transposed = quantised.t() if self.packed is None else None
        bias = linear.bias
        self.bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float()
        self.in_features = weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        quantised, row_scale = _quantise_rows(rows)
        if self.packed is not None:
            product = _onednn(quantised, self.packed, self.scale)
        else:
            assert self.transposed is not None
            # _int_mm takes int8 by int8: the rows back around zero.
            centred = (quantised.to(torch.int16) - 128).to(torch.int8)
            product = torch._int_mm(centred, self.transposed).float().mul_(self.scale)
        # In place: a fresh output this size costs more in page faults than the arithmetic.
        torch.addcmul(self.bias, product, row_scale, out=product)
        return product.view(*x.shape[:-1], -1)


class _GeluInPlace(torch.nn.Module):
    """GELU written over its input (whisper's allocates the MLP's widest tensor anew)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.aten.gelu_(x)
        return out


class _CrossAttention(GroupedCrossAttention):
    """Cross-attention by matmul, softmax, matmul on head-major keys and values: for one query per
    window, faster than SDPA on a CPU; in the keys' dtype (bfloat16 when they are), the softmax in
    float32, the output float32. A window's beam candidates share its keys (GroupedCrossAttention)."""

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        head_dim = k.shape[-1]
        # Scaled on q alone: scaling k would copy every key for every token.
        q = (q * head_dim**-0.5).to(k.dtype).view(*q.shape[:2], self.n_head, -1).transpose(1, 2)
        qk = (q @ k.transpose(-1, -2)).float()
        w = F.softmax(qk, dim=-1).to(v.dtype)
        out = (w @ v).transpose(1, 2).flatten(start_dim=2).float()
        # whisper's word timing reads the weights (it turns SDPA off to get them).
        return out, (None if MultiHeadAttention.use_sdpa else qk.detach())


class _Encoder(AudioEncoder):  # type: ignore[misc]
    """The encoder with bfloat16 weights; its output is float32, as whisper's decoding expects."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded: torch.Tensor = super().forward(x.to(self.conv1.weight.dtype))
        return encoded.float()


class _Decoder(TextDecoder):  # type: ignore[misc]
    """whisper's TextDecoder.forward, the vocabulary projection through FBGEMM's fp16 GEMM."""

    vocabulary_packed: Any

    def forward(self, x: torch.Tensor, xa: torch.Tensor, kv_cache: dict[Any, Any] | None = None) -> torch.Tensor:
        offset = next(iter(kv_cache.values())).shape[1] if kv_cache else 0
        x = self.token_embedding(x) + self.positional_embedding[offset : offset + x.shape[-1]]
        x = x.to(xa.dtype)
        for block in self.blocks:
            x = block(x, xa, mask=self.mask, kv_cache=kv_cache)
        x = self.ln(x)
        shape = x.shape
        logits = torch.ops.quantized.linear_dynamic_fp16(x.float().reshape(-1, shape[-1]), self.vocabulary_packed)
        reshaped: torch.Tensor = logits.reshape(*shape[:-1], -1)
        return reshaped
