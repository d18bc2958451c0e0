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

Each window's result depends only on that window: no int8 activation scale is shared across a
batch, so a window gives the same tokens alone or among others.
"""

from __future__ import annotations

import contextlib
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from whisper.model import AudioEncoder, MultiHeadAttention, TextDecoder, Whisper

# Imported only where a model is loaded (the registry): commands that load none never import torch.

log = structlog.get_logger(__name__)

CPU_DTYPES = ("float32", "bfloat16")


def bf16_is_native() -> bool:
    """Return True when this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX), where it pays."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def optimise_for_cpu(model: Whisper, dtype: str) -> Whisper:
    """Return the model (changed in place) with the CPU kernels of `dtype` ('float32' or 'bfloat16')."""
    half = torch.bfloat16 if dtype == "bfloat16" else None
    if half is not None and not bf16_is_native():
        log.warning("cpu_dtype_slow", cpu_dtype=dtype,
                    reason="this CPU has no AVX-512 BF16 or AMX: bfloat16 is emulated, slower than float32")
    if half is not None:
        for module in model.encoder.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                module.to(half)  # whisper's Linear/Conv1d cast their input to their weight's dtype
        model.encoder.__class__ = _Encoder
    for block in model.decoder.blocks:
        attention = block.cross_attn
        if isinstance(attention, MultiHeadAttention):
            kept = half or torch.float32
            attention.key = _HeadMajor(attention.key, kept, attention.n_head)
            attention.value = _HeadMajor(attention.value, kept, attention.n_head)
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

    def __init__(self, linear: Any, dtype: torch.dtype, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.weight = torch.nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return projected.view(*projected.shape[:2], self.n_head, -1).transpose(1, 2).contiguous()


class _CrossAttention(MultiHeadAttention):  # type: ignore[misc]
    """Cross-attention by matmul, softmax, matmul on head-major keys and values: for one query per
    window, faster than SDPA on a CPU; in the keys' dtype (bfloat16 when they are), the softmax in
    float32, the output float32."""

    def qkv_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
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
