"""The batched engine: 30 s windows of several files decoded together, with whisper's own model code.

whisper's `transcribe()` decodes one window at a time, each after the previous one (it needs the
previous text as a prompt, and the previous window's last timestamp to know where the next one
starts). Here each file's speech is first cut into windows of at most 30 s at pauses (Silero VAD:
daemon/pipeline/vad.py), and what holds no speech is skipped. The windows of every file given are
then decoded in batches: one encoder pass for a batch of spectrograms (`model.embed_audio`), then
whisper's own decoding on the batch (`decode_batch`: whisper's DecodingTask on the encoder output,
which it reuses rather than encoding again; greedy, or beam search with each window's candidates
sharing its audio keys, which whisper 20250625's own batched beam search gets wrong). A window
that fails whisper's quality checks (compression ratio, average log-probability) is decoded again
at the next temperature (best-of sampling), in a batch with the others that failed, from the same
encoder output. Segment and word timestamps are placed on each file's own
timeline; the no-speech guard applies per window.

Differences from the sequential engine, by design: windows do not see the previous window's text
(no `condition_on_previous_text`; the initial prompt primes every window), and
`hallucination_silence_threshold` is left to the sequential engine. `Rule.engine: auto` picks
this engine when neither is asked for, and for files no longer than one window (`uses_batched`).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from daemon.config import Rule
from daemon.languages import language_from_tag
from daemon.models import ModelRegistry
from daemon.pipeline.extract import Audio
from daemon.pipeline.mel import LazyMel
from daemon.pipeline.transcribe import (
    Progress,
    Reported,
    Segment,
    Transcript,
    Word,
    device_faults_mapped,
)
from daemon.pipeline.turns import DeviceTurns
from daemon.pipeline.vad import PACK_GAP_S, Window, speech_windows

if TYPE_CHECKING:
    import torch

FRAMES_PER_SECOND = 100
BATCH_CPU = 8  # windows per batch on a CPU (the decoder's per-token work amortises; memory is small)
BATCH_CUDA = 32  # windows per batch on a GPU (fp16 base … large-v3 fit easily at 30 s each)
ONE_WINDOW_S = 30.0  # whisper's window: a file this short has no previous window to condition on


@dataclass(frozen=True)
class Speech:
    """Where a file's speech is, as the batched engine decodes it: found on the CPU before the job
    waits for the device, so that work overlaps other jobs' decoding instead of holding the device."""

    key: tuple[float | None, int]  # what it was found for: the rule's skip_silence, the model's mel bands
    windows: tuple[Window, ...]  # the windows to decode (what holds no speech is never decoded)
    loudest: float  # the spectrogram's loudest value, which whisper floors every frame against

    @staticmethod
    def key_for(rule: Rule, n_mels: int) -> tuple[float | None, int]:
        return (rule.skip_silence or None, n_mels)


def find_speech(audio: Audio, rule: Rule, n_mels: int) -> Speech:
    """Return where the speech is: windows cut at pauses (whisper would invent a word or two over what
    holds none, whatever its no-speech guard says) and the spectrogram's loudest value (a pass over
    the whole file)."""
    key = Speech.key_for(rule, n_mels)
    windows = speech_windows(audio.samples, max_gap_s=key[0])
    return Speech(key, tuple(windows), LazyMel(audio.samples, n_mels).global_max())


def can_batch(rule: Rule) -> bool:
    """Return True when a rule's decoding can run on the batched engine."""
    return not rule.condition_on_previous_text and rule.hallucination_silence_threshold is None


def uses_batched(rule: Rule, duration_s: float | None = None) -> bool:
    """Return True when a file (lasting `duration_s`, where known) is decoded by the batched engine.

    `engine: auto` picks it wherever its quality holds: for rules that need nothing from the
    previous window (can_batch), and, whatever the rule, for a file no longer than one window,
    where there is no previous window's text to condition on. Measured on the bench's short files
    with whisperd's default decoding (5 beams): the same 93 word errors as sequential, 1.2x faster
    when several files' windows share batches (1.6x with cpu_dtype int8), as fast file after file.
    On a 3-minute file conditioning on the previous text was 1.4 points better (55 errors against
    59), so longer files stay sequential under conditioned rules.
    """
    if rule.engine != "auto":
        return rule.engine == "batched"
    if can_batch(rule):
        return True
    one_window = duration_s is not None and duration_s <= ONE_WINDOW_S
    return one_window and rule.hallucination_silence_threshold is None


@dataclass
class _File:
    """One file's part in a batched run."""

    audio: Audio
    rule: Rule
    mel: LazyMel
    windows: list[Window]
    progress: Progress | None
    language: str | None = None
    done: int = 0
    segments: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Item:
    """One window of one file."""

    file: _File
    index: int
    window: Window
    first_frame: int  # where the window's spectrogram starts (10 ms frames): its time base
    mel: torch.Tensor | None = None  # (n_mels, 3000) on the model's device, while its batch runs
    features: torch.Tensor | None = None  # the encoder's output, kept for the retries
    result: Any = None  # whisper's DecodingResult


class BatchedEngine:
    """Transcribes files by batches of windows on the resident models; one run at a time per engine."""

    def __init__(
        self, registry: ModelRegistry, batch_size: int | None = None, turns: DeviceTurns | None = None
    ) -> None:
        self.registry = registry
        self.batch_size = batch_size or (BATCH_CUDA if registry.device.startswith("cuda") else BATCH_CPU)
        # One job's work on the device at a time, a batch per turn: shared with the sequential engine.
        self._turns = turns or DeviceTurns(on_take=registry.claim_threads)

    def transcribe(self, audio: Audio, rule: Rule, progress: Progress | None = None) -> Transcript:
        """Return the transcript of one file's audio (its windows still decoded in batches)."""
        return self.transcribe_many([(audio, rule, progress)])[0]

    def transcribe_many(self, items: Sequence[tuple[Audio, Rule, Progress | None]]) -> list[Transcript]:
        """Return the transcripts of several files, their windows decoded together where the rules allow."""
        reported = [(audio, rule, Reported(progress) if progress else None) for audio, rule, progress in items]

        def heartbeat() -> None:  # waiting for the device: every file's job is still alive (and may be cancelled)
            for _, _, progress in reported:
                if progress is not None:
                    progress.again()

        with self._turns.hold(heartbeat=heartbeat), device_faults_mapped():
            return self._run(reported)

    # -- the run ------------------------------------------------------------------------------

    def _run(self, items: Sequence[tuple[Audio, Rule, Progress | None]]) -> list[Transcript]:
        files = []
        models = {}
        for audio, rule, progress in items:
            model = models[rule.model] = self.registry.get(rule.model)
            speech = audio.speech
            if speech is None or speech.key != Speech.key_for(rule, model.dims.n_mels):
                speech = find_speech(audio, rule, model.dims.n_mels)  # not found ahead: here, in the turn
            mel = LazyMel(audio.samples, model.dims.n_mels, loudest=speech.loudest)
            files.append(_File(audio, rule, mel, list(speech.windows), progress))
        # Windows of files with the same model and decoding options go into the same batches.
        groups: dict[tuple[Any, ...], list[_File]] = {}
        for f in files:
            groups.setdefault(self._group_key(f.rule), []).append(f)
        try:
            for group in groups.values():
                self._decode_group(group)
        finally:
            from daemon.models.graphed_decoder import release

            for model in models.values():  # the decoder's caches (CUDA) go when the run ends
                release(model)
        transcripts = []
        for f in files:
            segments = [_segment(i, raw, f.audio.offset_s) for i, raw in enumerate(f.segments)]
            if f.progress is not None:
                f.progress(1.0)
            transcripts.append(Transcript(
                text="".join(s.text for s in segments).strip(), language=f.language or "en",
                segments=tuple(segments), task=f.rule.task, model=f.rule.model,
                audio_duration_s=f.audio.duration_s,
            ))  # fmt: skip
        return transcripts

    @staticmethod
    def _group_key(rule: Rule) -> tuple[Any, ...]:
        return (rule.model, rule.task, tuple(rule.temperature), rule.best_of, rule.sample_len,
                rule.initial_prompt, rule.word_timestamps, rule.compression_ratio_threshold,
                rule.logprob_threshold, rule.no_speech_threshold)

    def _decode_group(self, group: list[_File]) -> None:
        import torch
        import whisper

        rule = group[0].rule
        model = self.registry.get(rule.model)
        dtype = torch.float16 if self.registry.fp16 else torch.float32
        pending = [_Item(f, index, window, round(window.start * FRAMES_PER_SECOND))
                   for f in group for index, window in enumerate(f.windows)]
        for f in group:
            f.language = self._given_language(model, f)
        with torch.inference_mode():
            for first in range(0, len(pending), self.batch_size):
                batch = pending[first : first + self.batch_size]
                for item in batch:  # spectrograms a batch at a time: memory stays bounded on long files
                    mel = whisper.pad_or_trim(_window_mel(item.file.mel, item.window), whisper.audio.N_FRAMES)
                    item.mel = mel.to(model.device).to(dtype)
                self._encode(model, batch)
                # A file's language, when not given, is detected on its first window with speech
                # (whisper listens to the first 30 s, which may be silence), from the encoder output.
                firsts = [item for item in batch if item.file.language is None and item.index == 0]
                if firsts:
                    features = torch.stack([item.features for item in firsts])  # type: ignore[misc]
                    for item, language in zip(firsts, _detect(model, features), strict=True):
                        item.file.language = language
                self._decode_with_fallback(model, rule, batch)
                for item in batch:
                    self._collect(model, rule, item)
                    item.features = item.mel = None  # the batch's tensors are no longer needed
                    item.file.done += 1
                    self._beat([item])
                self._turns.pass_turn()  # a job waiting for the device goes before the next batch
        for f in group:
            f.segments.sort(key=lambda seg: seg["start"])

    def _given_language(self, model: Any, f: _File) -> str | None:
        """Return a file's language when the rule, the track or the model tells it (None: detect it)."""
        import torch

        chosen = f.rule.language
        if chosen == "track":
            chosen = language_from_tag(f.audio.stream.language) or "auto"
        if chosen != "auto":
            return chosen
        if not model.is_multilingual:
            return "en"
        if not f.windows:  # nothing but silence: the outputs still carry a language; whisper's guess
            with torch.inference_mode():
                return _detect(model, self._first_mel(model, f)[None])[0]
        return None

    def _first_mel(self, model: Any, f: _File) -> torch.Tensor:
        import torch
        import whisper

        dtype = torch.float16 if self.registry.fp16 else torch.float32
        mel: torch.Tensor = whisper.pad_or_trim(f.mel[:, 0 : whisper.audio.N_FRAMES], whisper.audio.N_FRAMES)
        return mel.to(model.device).to(dtype)

    @staticmethod
    def _encode(model: Any, batch: list[_Item]) -> None:
        import torch

        features = model.embed_audio(torch.stack([item.mel for item in batch]))  # type: ignore[misc]
        for item, row in zip(batch, features, strict=True):
            item.features = row

    def _decode_with_fallback(self, model: Any, rule: Rule, batch: list[_Item]) -> None:
        """Decode every window; those failing the quality checks again at the next temperature."""
        import torch
        import whisper

        todo = batch
        temperatures = list(rule.temperature)
        for n, temperature in enumerate(temperatures):
            by_language: dict[str, list[_Item]] = {}
            for item in todo:
                by_language.setdefault(item.file.language or "en", []).append(item)
            for language, items in by_language.items():
                # As whisper's transcribe: beams at temperature 0, best-of samples above it.
                options = whisper.DecodingOptions(
                    task=rule.task, language=language, temperature=temperature,
                    sample_len=rule.sample_len, best_of=rule.best_of if temperature > 0 else None,
                    beam_size=rule.beam_size if temperature == 0 else None,
                    prompt=rule.initial_prompt, fp16=self.registry.fp16, without_timestamps=False,
                )  # fmt: skip
                features = torch.stack([item.features for item in items])  # type: ignore[misc]
                for item, result in zip(items, decode_batch(model, features, options), strict=True):
                    item.result = result
                self._beat(items)  # a batch with fallbacks can take long: the watchdog hears of each pass
            last = n == len(temperatures) - 1
            todo = [item for item in todo if not last and _needs_fallback(rule, item.result)]
            if not todo:
                return

    @staticmethod
    def _beat(items: list[_Item]) -> None:
        """Report each file's progress so far: the job's heartbeat, and where a cancellation is honoured."""
        for f in {id(item.file): item.file for item in items}.values():
            if f.progress is not None and f.windows:
                f.progress(min(f.done / len(f.windows), 0.999))

    def _collect(self, model: Any, rule: Rule, item: _Item) -> None:
        """Turn one window's decoded tokens into segments on the file's timeline (and word timings)."""
        import whisper
        from whisper.timing import add_word_timestamps

        result = item.result
        silent = rule.no_speech_threshold is not None and result.no_speech_prob > rule.no_speech_threshold
        if silent and (rule.logprob_threshold is None or result.avg_logprob <= rule.logprob_threshold):
            return  # whisper's no-speech guard: nothing said in this window
        tokenizer = whisper.tokenizer.get_tokenizer(
            model.is_multilingual, num_languages=model.num_languages, language=item.file.language, task=rule.task)
        # Times in the window first (whisper's alignment counts from the window's start, seek 0),
        # then on the file's timeline, through the window's pieces.
        window = item.window
        segments = _split(tokenizer, result, window.length)
        if not segments:
            return
        if rule.word_timestamps:
            frames = max(round(window.length * FRAMES_PER_SECOND), 1)
            add_word_timestamps(segments=segments, model=model, tokenizer=tokenizer, mel=item.mel,
                                num_frames=frames, last_speech_timestamp=0.0)
        for segment in segments:
            segment["seek"] = item.first_frame
            segment["start"], segment["end"] = window.span_to_source(segment["start"], segment["end"])
            for word in segment.get("words", ()):
                word["start"], word["end"] = window.span_to_source(word["start"], word["end"])
        item.file.segments.extend(segments)


def decode_batch(model: Any, features: torch.Tensor, options: Any, *, static_cache: bool | None = None) -> list[Any]:
    """Return whisper's DecodingResult for each window's encoder output in a batch.

    whisper's own `decode`, except that
    - beam search and best-of sampling work on several windows at once (whisper 20250625 breaks
      there): the candidates of each window share its keys in the model's cross-attention
      (daemon.models.attention), so the features go in once per window;
    - on CUDA the decoder's token steps run on pre-allocated caches, replayed as CUDA graphs
      (daemon.models.graphed_decoder). `static_cache=True` runs those steps on a CPU too, eagerly
      (the tests compare them with whisper's); False keeps whisper's own.
    """
    from daemon.models import graphed_decoder

    if static_cache is None:
        static_cache = graphed_decoder.uses_static_cache(model)
    if (options.beam_size or options.best_of or 1) == 1:
        return list(graphed_decoder.decoding_task(static_cache)(model, options).run(features))
    results: list[Any] = _candidates_task(static_cache)(model, options).run(features)
    return results


@functools.cache
def _candidates_task(static_cache: bool) -> type:
    """Return the DecodingTask with `run` kept but for the features of the candidates."""
    from whisper.decoding import DecodingResult, compression_ratio

    from daemon.models.graphed_decoder import decoding_task

    class CandidatesDecodingTask(decoding_task(static_cache)):  # type: ignore[misc]
        def run(self, mel: torch.Tensor) -> list[DecodingResult]:
            # whisper 20250625's DecodingTask.run, but for two lines: the audio features are not
            # repeated for each candidate, and so are not taken back one row in n_group afterwards.
            import torch

            self.decoder.reset()
            tokenizer = self.tokenizer
            n_audio: int = mel.shape[0]
            audio_features = self._get_audio_features(mel)  # the encoder's output, given
            tokens = torch.tensor([self.initial_tokens]).repeat(n_audio, 1)
            languages, _ = self._detect_language(audio_features, tokens)
            tokens = tokens.repeat_interleave(self.n_group, dim=0).to(audio_features.device)
            tokens, sum_logprobs, no_speech_probs = self._main_loop(audio_features, tokens)
            no_speech_probs = no_speech_probs[:: self.n_group]
            tokens = tokens.reshape(n_audio, self.n_group, -1)
            sum_logprobs = sum_logprobs.reshape(n_audio, self.n_group)
            candidates, candidate_logprobs = self.decoder.finalize(tokens, sum_logprobs)
            candidates = [[t[self.sample_begin : (t == tokenizer.eot).nonzero()[0, 0]] for t in s]
                          for s in candidates]
            selected = self.sequence_ranker.rank(candidates, candidate_logprobs)
            chosen = [t[i].tolist() for i, t in zip(selected, candidates, strict=True)]
            logprobs = [lp[i] for i, lp in zip(selected, candidate_logprobs, strict=True)]
            results = []
            for i, window_tokens in enumerate(chosen):
                text = tokenizer.decode(window_tokens).strip()
                results.append(DecodingResult(
                    audio_features=audio_features[i], language=languages[i], tokens=window_tokens, text=text,
                    avg_logprob=logprobs[i] / (len(window_tokens) + 1), no_speech_prob=no_speech_probs[i],
                    temperature=self.options.temperature, compression_ratio=compression_ratio(text),
                ))  # fmt: skip
            return results

    return CandidatesDecodingTask


def _detect(model: Any, batch: torch.Tensor) -> list[str]:
    """Return the most likely language of each spectrogram or encoder output in a batch."""
    _, probs = model.detect_language(batch)
    return [str(max(p, key=p.get)) for p in probs]


def _needs_fallback(rule: Rule, result: Any) -> bool:
    """Return True when a window failed whisper's quality checks and is worth a hotter try."""
    too_repetitive = (rule.compression_ratio_threshold is not None
                      and result.compression_ratio > rule.compression_ratio_threshold)
    too_unsure = rule.logprob_threshold is not None and result.avg_logprob < rule.logprob_threshold
    silent = rule.no_speech_threshold is not None and result.no_speech_prob > rule.no_speech_threshold
    # As whisper's transcribe: a likely silence (unsure and no speech) is never retried, repetitive or not.
    return (too_repetitive or too_unsure) and not (silent and too_unsure)


def _split(tokenizer: Any, result: Any, window_end: float) -> list[dict[str, Any]]:
    """Return whisper-style segment dicts for one window's tokens, times from the window's start.

    The tokens carry timestamps (0.02 s each): each pair of them closes a segment. The last
    segment may lack its closing timestamp (the window was cut at a pause, so whatever follows
    belongs to it): it ends with the window.
    """
    begin = tokenizer.timestamp_begin
    # Text and timestamp tokens (timestamps are numbered above every special token).
    tokens = [t for t in result.tokens if t < tokenizer.eot or t >= begin]
    segments: list[dict[str, Any]] = []
    current: list[int] = []
    start: float | None = None

    def close(end: float) -> None:
        text = tokenizer.decode([t for t in current if t < begin])
        if text.strip():
            segments.append(_raw(result, 0, start if start is not None else 0.0, end, current, text))

    for token in tokens:
        if token >= begin:
            time = round((token - begin) * 0.02, 3)
            if start is None:
                start = time
                current = [token]
            else:
                current.append(token)
                close(min(time, window_end))
                start, current = None, []
        else:
            if start is None:
                start = 0.0
            current.append(token)
    if current:
        close(window_end)
    return segments


def _raw(result: Any, seek: int, start: float, end: float, tokens: list[int], text: str) -> dict[str, Any]:
    return {
        "seek": seek, "start": start, "end": max(end, start), "text": text, "tokens": tokens,
        "temperature": result.temperature, "avg_logprob": result.avg_logprob,
        "compression_ratio": _compression_ratio(text), "no_speech_prob": result.no_speech_prob,
    }  # fmt: skip


def _window_mel(mel: LazyMel, window: Window) -> torch.Tensor:
    """Return a window's spectrogram: its pieces' frames with PACK_GAP_S of silence between them."""
    import torch

    parts = []
    for i, (start, end) in enumerate(window.pieces):
        if i:
            parts.append(torch.full((mel.n_mels, round(PACK_GAP_S * FRAMES_PER_SECOND)), mel.silence()))
        first = round(start * FRAMES_PER_SECOND)
        parts.append(mel[:, first : max(round(end * FRAMES_PER_SECOND), first + 1)])
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / max(len(zlib.compress(data)), 1)


def _segment(index: int, raw: dict[str, Any], offset: float) -> Segment:
    words = None
    if "words" in raw:
        words = tuple(Word(start=round(w["start"] + offset, 3), end=round(w["end"] + offset, 3),
                           word=w["word"], probability=float(w["probability"])) for w in raw["words"])
    return Segment(
        id=index, seek=int(raw["seek"]), start=round(raw["start"] + offset, 3), end=round(raw["end"] + offset, 3),
        text=str(raw["text"]), tokens=tuple(int(t) for t in raw["tokens"]), temperature=float(raw["temperature"]),
        avg_logprob=float(raw["avg_logprob"]), compression_ratio=float(raw["compression_ratio"]),
        no_speech_prob=float(raw["no_speech_prob"]), words=words,
    )  # fmt: skip
