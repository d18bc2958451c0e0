"""Cross-attention that lets a window's candidates share its audio keys: beam search on a batch.

Beam search (and best-of sampling) decodes several candidate texts per window: the decoder runs
`windows × candidates` rows, each window's candidates next to one another. whisper 20250625 repeats
the text rows by the group but not the audio features, so on a batch of several windows the rows
no longer match (its PR #1483 regression; with one window broadcasting hid it). Repeating the
features would also repeat their keys and values in every layer, five times the largest tensors
of a decoding. Here the candidates' queries are folded into their window's row instead: queries
(windows × candidates, tokens, state) are attended as (windows, candidates × tokens, state)
against the window's own keys and values, which are computed and kept once. Cross-attention has
no mask, so each query row is attended exactly as it would be alone.

Imported only where a model is loaded (the registry).
"""

from __future__ import annotations

import torch
from whisper.model import MultiHeadAttention, Whisper


class GroupedCrossAttention(MultiHeadAttention):  # type: ignore[misc]
    """whisper's cross-attention, taking several query rows per window of keys."""

    def qkv_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, n_ctx, n_state = q.shape
        windows = k.shape[0]
        groups = rows // windows
        if groups <= 1:
            return self.attend(q, k, v, mask)
        wv, qk = self.attend(q.reshape(windows, groups * n_ctx, n_state), k, v, mask)
        if qk is not None:  # (windows, head, candidates × tokens, frames) back to one row per candidate
            qk = qk.reshape(windows, qk.shape[1], groups, n_ctx, -1).transpose(1, 2).flatten(0, 1)
        return wv.reshape(rows, n_ctx, -1), qk

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the attention of q over k and v, rows matched one to one (whisper's own kernel)."""
        out: tuple[torch.Tensor, torch.Tensor | None] = super().qkv_attention(q, k, v, mask)
        return out


def share_audio_keys(model: Whisper) -> Whisper:
    """Return the model (changed in place) with every decoder block's cross-attention grouped."""
    for block in model.decoder.blocks:
        if type(block.cross_attn) is MultiHeadAttention:
            block.cross_attn.__class__ = GroupedCrossAttention
    return model
