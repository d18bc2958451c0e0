"""The decoder's token steps on pre-allocated key/value caches, replayed as CUDA graphs.

whisper's `PyTorchInference` grows each layer's key/value cache by concatenation at every token
and launches every kernel of every layer from Python: on a GPU a token step of large-v3 (32
layers, about 500 kernels) costs 17 ms whatever the batch, the device mostly idle between
launches (measured on an H200, `bench/gpu.py`). Here the caches are allocated once per run of an
engine, as large as its largest decoding needs, each new token's keys and values are written in
place at its position, and one token step for a given number of rows is captured once per run as
a CUDA graph and then replayed: one launch per token.

`StaticCacheInference` is a drop-in for whisper's `Inference` (the object `DecodingTask` asks for
logits, and beam search asks to reorder the cache), so whisper's decoding loop, logit filters
and beam search run unchanged around it. The numbers are whisper's: the first call (the prompt
and start-of-transcript tokens) runs whisper's own causal attention; each later step attends over
the cache with the positions not yet written masked out. Without CUDA (`graphs=False`) the same
steps run eagerly: that is how the tests check it against whisper on a CPU.

Both engines use it on CUDA: the batched engine through `decode_batch`, the sequential one because
the registry gives each CUDA model this module's `decode` (whisper's `transcribe()` calls
`model.decode` for every window). The caches are freed when an engine's run ends.

Cross-attention keys are kept once per window (the candidates of beam search share them, as in
`attention.GroupedCrossAttention`).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from whisper.model import Whisper

log = structlog.get_logger(__name__)

ENABLED = True  # on CUDA; bench/gpu.py turns it off to measure whisper's own steps beside it
MAX_GRAPHS = 8  # captured step graphs kept per model (one per number of rows; each holds its own memory)


class DecoderBuffers:
    """One model's pre-allocated caches and captured step graphs (kept on the model until the engine's run ends)."""

    def __init__(self, model: Whisper, rows: int, windows: int, length: int, dtype: torch.dtype) -> None:
        dims = model.dims
        device = model.device
        layers, state = dims.n_text_layer, dims.n_text_state
        self.rows, self.windows, self.length, self.dtype = rows, windows, length, dtype
        self.keys = torch.zeros(layers, rows, length, state, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.audio_keys = torch.zeros(layers, windows, dims.n_audio_ctx, state, dtype=dtype, device=device)
        self.audio_values = torch.zeros_like(self.audio_keys)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)  # the step's input
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # where the step's token goes
        self.positions = torch.arange(length, device=device)
        self.graphs: OrderedDict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()

    def fits(self, rows: int, windows: int, length: int, dtype: torch.dtype) -> bool:
        return rows <= self.rows and windows <= self.windows and length <= self.length and dtype == self.dtype


def uses_static_cache(model: Whisper) -> bool:
    """Return True where the static-cache steps run by default: on CUDA (graphed), unless turned off."""
    return ENABLED and model.device.type == "cuda"


@functools.cache
def decoding_task(static_cache: bool) -> type:
    """Return whisper's DecodingTask, or with `static_cache` one whose token steps run on the static caches
    (graphed on CUDA) and whose timestamp rules apply to the whole batch at once."""
    from whisper.decoding import ApplyTimestampRules, BeamSearchDecoder, DecodingTask

    if not static_cache:
        return DecodingTask  # type: ignore[no-any-return]

    class StaticCacheDecodingTask(DecodingTask):  # type: ignore[misc]
        def __init__(self, model: Whisper, options: Any) -> None:
            super().__init__(model, options)
            start = len(self.initial_tokens)
            self.inference = StaticCacheInference(model, start, start + self.sample_len,
                                                  graphs=model.device.type == "cuda")
            if isinstance(self.decoder, BeamSearchDecoder):
                self.decoder.inference = self.inference  # beam search reorders the caches it holds
            # whisper's timestamp rules, applied to the whole batch without a host sync per row
            filters: list[Any] = self.logit_filters  # type: ignore[has-type]
            self.logit_filters = [
                timestamp_rules(f.tokenizer, f.sample_begin, f.max_initial_timestamp_index)
                if type(f) is ApplyTimestampRules else f for f in filters
            ]  # fmt: skip

    return StaticCacheDecodingTask


def decode(model: Whisper, mel: torch.Tensor, options: Any = None, **kwargs: Any) -> Any:
    """whisper's `decode` (what `Whisper.decode` and so `transcribe()` call for every window), with
    the static-cache steps where `uses_static_cache`: the registry installs it on CUDA models, so the
    sequential engine's windows get the graphed steps too."""
    import dataclasses

    import whisper

    options = options if options is not None else whisper.DecodingOptions()
    if not uses_static_cache(model):
        return whisper.decoding.decode(model, mel, options, **kwargs)
    single = mel.ndim == 2
    if single:
        mel = mel.unsqueeze(0)
    if kwargs:
        options = dataclasses.replace(options, **kwargs)
    with torch.no_grad():
        result = decoding_task(True)(model, options).run(mel)
    return result[0] if single else result


_graphs_failed = False  # a capture failed once in this process: every later decoding runs its steps eagerly


def _give_up_graphs(err: Exception) -> None:
    global _graphs_failed
    _graphs_failed = True
    log.warning("cuda_graphs_unavailable", error=f"{type(err).__name__}: {err}",
                consequence="the decoder's token steps run kernel by kernel: slower, the same results")


def release(model: Whisper) -> None:
    """Free the model's caches and graphs (the engine calls it when a run ends: idle, the model holds no
    more device memory than its weights; the next run allocates and captures again, tens of ms)."""
    if getattr(model, "_whisperd_decoder_buffers", None) is not None:
        model._whisperd_decoder_buffers = None
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


def buffers_for(model: Whisper, rows: int, windows: int, length: int, dtype: torch.dtype) -> DecoderBuffers:
    """Return the model's buffers, (re)allocated when this decoding needs more rows, windows or tokens."""
    found: DecoderBuffers | None = getattr(model, "_whisperd_decoder_buffers", None)
    if found is not None and found.fits(rows, windows, length, dtype):
        return found
    if found is not None:  # grow to what both need, so alternating sizes do not reallocate each time
        rows, windows, length = max(rows, found.rows), max(windows, found.windows), max(length, found.length)
        model._whisperd_decoder_buffers = None  # free the old ones first
        del found
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    buffers = DecoderBuffers(model, rows, windows, length, dtype)
    model._whisperd_decoder_buffers = buffers
    return buffers


class StaticCacheInference:
    """whisper's `Inference` (logits, rearrange_kv_cache, cleanup_caching) on pre-allocated caches."""

    def __init__(self, model: Whisper, initial_token_length: int, longest: int, *, graphs: bool) -> None:
        self.model = model
        self.initial_token_length = initial_token_length
        self.longest = min(longest, model.dims.n_text_ctx)  # tokens the decoding can reach
        self.graphs = graphs
        self.buffers: DecoderBuffers | None = None
        self.filled = 0  # positions of the cache holding this decoding's tokens

    # -- whisper's Inference ----------------------------------------------------------------------

    def logits(self, tokens: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        outside = not torch.is_inference_mode_enabled()
        with torch.inference_mode():  # the caches are inference tensors, whoever calls
            if self.buffers is None or tokens.shape[-1] <= self.initial_token_length:
                logits = self._first(tokens, audio_features)
            elif tokens.shape[-1] != self.filled + 1:
                raise RuntimeError(f"decoder cache holds {self.filled} tokens, asked for {tokens.shape[-1]}")
            else:
                logits = self._next(tokens[:, -1:], windows=audio_features.shape[0])
        # whisper's logit filters change the logits in place; under transcribe()'s no_grad (not
        # inference mode) they must be an ordinary tensor.
        return logits.clone() if outside else logits

    def rearrange_kv_cache(self, source_indices: list[int]) -> None:
        if source_indices == list(range(len(source_indices))) or self.buffers is None:
            return
        with torch.inference_mode():
            b = self.buffers
            order = torch.tensor(source_indices, device=b.keys.device)
            rows, filled = len(source_indices), self.filled
            b.keys[:, :rows, :filled] = b.keys[:, :rows, :filled].index_select(1, order)
            b.values[:, :rows, :filled] = b.values[:, :rows, :filled].index_select(1, order)

    def cleanup_caching(self) -> None:
        self.filled = 0  # the buffers stay with the model for the run's next decoding

    # -- the steps ----------------------------------------------------------------------------------

    def _first(self, tokens: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """The prompt and start tokens: whisper's causal attention, the caches filled as it goes."""
        decoder = self.model.decoder
        rows, count = tokens.shape
        windows = audio.shape[0]
        self.buffers = b = buffers_for(self.model, rows, windows, self.longest, audio.dtype)
        x = (decoder.token_embedding(tokens) + decoder.positional_embedding[:count]).to(audio.dtype)
        for layer, block in enumerate(decoder.blocks):
            h = block.attn_ln(x)
            keys, values = block.attn.key(h), block.attn.value(h)
            b.keys[layer, :rows, :count] = keys
            b.values[layer, :rows, :count] = values
            x = x + block.attn.out(_attend(block.attn.query(h), keys, values, block.attn.n_head, causal=count > 1))
            b.audio_keys[layer, :windows] = block.cross_attn.key(audio)
            b.audio_values[layer, :windows] = block.cross_attn.value(audio)
            x = x + self._cross(block, x, layer, windows)
            x = x + block.mlp(block.mlp_ln(x))
        self.filled = count
        return self._logits(x)

    def _next(self, token: torch.Tensor, *, windows: int) -> torch.Tensor:
        """One token per row at the next position: a replayed graph on CUDA, else the same step eagerly."""
        b = self.buffers
        assert b is not None
        rows = token.shape[0]
        if self.filled >= b.length:
            raise RuntimeError(f"decoder cache of {b.length} tokens is full")
        b.token[:rows].copy_(token)
        b.position.fill_(self.filled)
        logits = None
        if self.graphs and not _graphs_failed:
            try:
                # A graph's output tensor is overwritten by its next replay: the caller gets a copy.
                logits = self._replay(rows, windows).clone()
            except RuntimeError as err:  # a capture this GPU or torch cannot do: the same steps, eagerly
                _give_up_graphs(err)
        if logits is None:
            logits = self._step(rows, windows)
        self.filled += 1
        return logits

    def _replay(self, rows: int, windows: int) -> torch.Tensor:
        b = self.buffers
        assert b is not None
        key = (rows, windows)
        if key not in b.graphs:
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (it writes this same position)
                self._step(rows, windows)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA work (a model loading for another rule) does not break it
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._step(rows, windows)
            b.graphs[key] = (graph, out)
            while len(b.graphs) > MAX_GRAPHS:
                b.graphs.popitem(last=False)
        b.graphs.move_to_end(key)
        graph, out = b.graphs[key]
        graph.replay()
        return out

    def _step(self, rows: int, windows: int) -> torch.Tensor:
        """The token in `b.token[:rows]` at `b.position`: attend to the cache up to it, write its keys there."""
        b = self.buffers
        assert b is not None
        decoder = self.model.decoder
        position = b.position
        x = (decoder.token_embedding(b.token[:rows]) + decoder.positional_embedding.index_select(0, position))
        x = x.to(b.dtype)
        visible = (b.positions <= position).view(1, 1, 1, -1)  # the cache's written positions, this one too
        for layer, block in enumerate(decoder.blocks):
            h = block.attn_ln(x)
            b.keys[layer, :rows].index_copy_(1, position, block.attn.key(h))
            b.values[layer, :rows].index_copy_(1, position, block.attn.value(h))
            x = x + block.attn.out(_attend(block.attn.query(h), b.keys[layer, :rows], b.values[layer, :rows],
                                           block.attn.n_head, mask=visible))
            x = x + self._cross(block, x, layer, windows)
            x = x + block.mlp(block.mlp_ln(x))
        return self._logits(x)

    def _cross(self, block: Any, x: torch.Tensor, layer: int, windows: int) -> torch.Tensor:
        """Cross-attention; a window's candidates (rows next to one another) share its audio keys."""
        b = self.buffers
        assert b is not None
        q = block.cross_attn.query(block.cross_attn_ln(x))
        rows, count, state = q.shape
        grouped = q.reshape(windows, (rows // windows) * count, state)
        out = _attend(grouped, b.audio_keys[layer, :windows], b.audio_values[layer, :windows], block.cross_attn.n_head)
        projected: torch.Tensor = block.cross_attn.out(out.reshape(rows, count, state))
        return projected

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        decoder = self.model.decoder
        x = decoder.ln(x)
        logits: torch.Tensor = (x @ torch.transpose(decoder.token_embedding.weight.to(x.dtype), 0, 1)).float()
        return logits


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, causal: bool = False,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention as whisper's MultiHeadAttention computes it with SDPA."""
    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], heads, -1).permute(0, 2, 1, 3)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, is_causal=causal)
    return out.permute(0, 2, 1, 3).flatten(start_dim=2)


def timestamp_rules(tokenizer: Any, sample_begin: int, max_initial_timestamp_index: int | None) -> Any:
    """Return whisper's timestamp rules as one logit filter for the whole batch, without a host sync.

    whisper's `ApplyTimestampRules` loops over the rows in Python and reads each one back
    (`tolist()`, a comparison of two tensors): at every token, a device-to-host copy per row. With
    64 windows of large-v3 that loop cost 3.3 s of 10.6 s (`bench/gpu.py`, H200). Here the same
    rules are masks over the batch: the same logits out (a test compares them with whisper's).
    """
    from whisper.decoding import ApplyTimestampRules

    class BatchTimestampRules(ApplyTimestampRules):  # type: ignore[misc]
        def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
            begin, eot = self.tokenizer.timestamp_begin, self.tokenizer.eot
            if self.tokenizer.no_timestamps is not None:
                logits[:, self.tokenizer.no_timestamps] = -torch.inf
            sampled = tokens[:, self.sample_begin :]
            count = sampled.shape[1]
            vocab = torch.arange(logits.shape[-1], device=logits.device)
            if count:
                is_time = sampled >= begin
                last = is_time[:, -1]
                penultimate = is_time[:, -2] if count >= 2 else torch.ones_like(last)
                # Timestamps come in pairs, except directly before end-of-text.
                logits.masked_fill_((last & penultimate)[:, None] & (vocab >= begin), -torch.inf)
                logits.masked_fill_((last & ~penultimate)[:, None] & (vocab < eot), -torch.inf)
                # Timestamps never decrease, and a segment is never empty: nothing below the last one
                # (below the one after it, unless it opens a segment).
                where = torch.where(is_time, torch.arange(count, device=tokens.device), -1).max(dim=1).values
                latest = sampled.gather(1, where.clamp(min=0)[:, None])[:, 0]
                latest = latest + (~(last & ~penultimate)).long()
                below = (vocab >= begin) & (vocab < latest[:, None])
                logits.masked_fill_((where >= 0)[:, None] & below, -torch.inf)
            else:
                logits[:, :begin] = -torch.inf  # the first token is a timestamp
                if self.max_initial_timestamp_index is not None:
                    logits[:, begin + self.max_initial_timestamp_index + 1 :] = -torch.inf
            # A timestamp when their total probability is above any single text token's.
            logprobs = F.log_softmax(logits.float(), dim=-1)
            timestamp = logprobs[:, begin:].logsumexp(dim=-1) > logprobs[:, :begin].max(dim=-1).values
            logits.masked_fill_(timestamp[:, None] & (vocab < begin), -torch.inf)

    return BatchTimestampRules(tokenizer, sample_begin, max_initial_timestamp_index)
