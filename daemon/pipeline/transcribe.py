"""Whisper on extracted audio with a Rule's options → a typed Transcript.

The engine takes audio, not files, so a batched engine can later decode windows of several
files at once behind the same `transcribe` call.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

from daemon.config import Rule
from daemon.errors import GpuFault, TransientError
from daemon.languages import language_from_tag
from daemon.models import ModelRegistry
from daemon.pipeline.extract import Audio
from daemon.pipeline.mel import LazyMel, transcribe_patch
from daemon.pipeline.silence import speech_spans
from daemon.pipeline.turns import DeviceTurns

STAGE = "transcribe"

Progress = Callable[[float], None]  # fraction of the audio done, 0.0 … 1.0; may raise to cancel


class Reported:
    """A job's progress callback that remembers the fraction it last reported: `again` reports it once
    more, the job's heartbeat while it waits for the device (its progress neither moves nor resets)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.fraction = 0.0

    def __call__(self, fraction: float) -> None:
        self.fraction = fraction
        self.progress(fraction)

    def again(self) -> None:
        self.progress(self.fraction)


@dataclass(frozen=True)
class Word:
    """One word with its timing (present when word_timestamps is on)."""

    start: float
    end: float
    word: str
    probability: float


@dataclass(frozen=True)
class Segment:
    """One decoded segment, times on the container's timeline."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: tuple[Word, ...] | None = None


@dataclass(frozen=True)
class Transcript:
    """The result of transcribing (or translating) one audio stream."""

    text: str
    language: str  # the spoken language, detected or given (for translate too)
    segments: tuple[Segment, ...]
    task: str
    model: str
    audio_duration_s: float
    audio_offset_s: float = 0.0  # where the audio starts on the container's timeline (a delayed track)

    @property
    def end_s(self) -> float:
        """Return where the audio ends on the container's timeline: no cue may end later."""
        return self.audio_offset_s + self.audio_duration_s

    def to_whisper_result(self) -> dict[str, Any]:
        """Return whisper's own result dict, the shape its writers and its JSON output use."""
        segments = []
        for s in self.segments:
            seg: dict[str, Any] = {
                "id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text,
                "tokens": list(s.tokens), "temperature": s.temperature,
                "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }  # fmt: skip
            if s.words is not None:
                seg["words"] = [
                    {"word": w.word, "start": w.start, "end": w.end, "probability": w.probability}
                    for w in s.words
                ]
            segments.append(seg)
        return {"text": self.text, "segments": segments, "language": self.language}

    def to_dict(self) -> dict[str, Any]:
        """Return the transcript as plain data (kept between attempts, see `from_dict`)."""
        return {**self.to_whisper_result(), "task": self.task, "model": self.model,
                "audio_duration_s": self.audio_duration_s, "audio_offset_s": self.audio_offset_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transcript:
        """Return the transcript `to_dict` gave."""
        return cls(text=str(data["text"]), language=str(data["language"]),
                   segments=tuple(_segment(raw, 0.0) for raw in data["segments"]), task=str(data["task"]),
                   model=str(data["model"]), audio_duration_s=float(data["audio_duration_s"]),
                   audio_offset_s=float(data.get("audio_offset_s", 0.0)))


def _segment(raw: dict[str, Any], offset: float) -> Segment:
    words = None
    if "words" in raw:
        words = tuple(
            Word(start=round(w["start"] + offset, 3), end=round(w["end"] + offset, 3),
                 word=w["word"], probability=float(w["probability"]))
            for w in raw["words"]
        )
    return Segment(
        id=int(raw["id"]), seek=int(raw["seek"]),
        start=round(float(raw["start"]) + offset, 3), end=round(float(raw["end"]) + offset, 3),
        text=str(raw["text"]), tokens=tuple(int(t) for t in raw["tokens"]),
        temperature=float(raw["temperature"]), avg_logprob=float(raw["avg_logprob"]),
        compression_ratio=float(raw["compression_ratio"]),
        no_speech_prob=float(raw["no_speech_prob"]), words=words,
    )  # fmt: skip


def decode_options(rule: Rule, audio: Audio, *, fp16: bool) -> dict[str, Any]:
    """Return the keyword arguments for whisper.transcribe that a rule asks for."""
    if rule.language == "auto":
        language = None
    elif rule.language == "track":
        language = language_from_tag(audio.stream.language)  # None: untagged, so detect
    else:
        language = rule.language
    temperature = rule.temperature[0] if len(rule.temperature) == 1 else tuple(rule.temperature)
    options: dict[str, Any] = {
        "task": rule.task,
        "language": language,
        "temperature": temperature,
        "compression_ratio_threshold": rule.compression_ratio_threshold,
        "logprob_threshold": rule.logprob_threshold,
        "no_speech_threshold": rule.no_speech_threshold,
        "condition_on_previous_text": rule.condition_on_previous_text,
        "initial_prompt": rule.initial_prompt,
        "word_timestamps": rule.word_timestamps,
        "hallucination_silence_threshold": rule.hallucination_silence_threshold,
        "beam_size": rule.beam_size,
        "best_of": rule.best_of,
        "fp16": fp16,
        "verbose": None,  # whisper prints nothing; progress comes through our callback
    }
    if rule.sample_len is not None:
        options["sample_len"] = rule.sample_len
    return options


def is_cuda_fault(err: BaseException) -> bool:
    """Return True for a CUDA runtime error; torch reports those as RuntimeError("CUDA error: …")."""
    accelerator_error = getattr(__import__("torch"), "AcceleratorError", None)
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return True
    text = str(err)
    if "out of memory" in text:
        return False  # an allocation failure leaves the context usable: retried like OutOfMemoryError
    return "CUDA error" in text or "CUBLAS_STATUS" in text or "CUDNN_STATUS" in text


@contextlib.contextmanager
def device_faults_mapped() -> Iterator[None]:
    """Turn the device's failures into whisperd's: out of memory is transient (the job is retried
    later, the memory freed now); a CUDA fault leaves the context unusable (GpuFault: the process exits)."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        raise TransientError(f"GPU out of memory: {err}", stage=STAGE) from err
    except RuntimeError as err:
        if is_cuda_fault(err):
            raise GpuFault(f"CUDA error while transcribing: {err}") from err
        if "CUDA" in str(err) and "out of memory" in str(err):
            raise TransientError(f"GPU out of memory: {err}", stage=STAGE) from err
        raise


class _ProgressBar:
    """Stands in for the tqdm bar inside whisper.transcribe: forwards frames done as a fraction, and
    between two windows passes the device's turn to a job waiting for it."""

    # Set by the engine for the next bar: the job's progress, the turn passing, and what puts
    # whisper's module globals back.
    pending: tuple[Progress | None, Callable[[], None], Callable[[], None]] | None = None

    def __init__(self, total: int = 0, **_: Any) -> None:
        self.total = max(int(total), 1)
        self.done = 0
        assert _ProgressBar.pending is not None, "made outside WhisperEngine.transcribe"
        self.progress, self.pass_turn, restore = _ProgressBar.pending
        _ProgressBar.pending = None
        # whisper has its spectrogram and its bar by now: its globals go back at once, so another
        # job may run whisper.transcribe in the turns this one passes.
        restore()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if self.progress is not None:
            self.progress(min(self.done / self.total, 1.0))
        self.pass_turn()


def detect_language(model: Any, mel: LazyMel, *, start_s: float, fp16: bool) -> str:
    """Return the language whisper detects in the 30 s of audio from start_s (as transcribe does it)."""
    import torch
    import whisper
    from whisper.audio import FRAMES_PER_SECOND, N_FRAMES

    if not model.is_multilingual:
        return "en"
    first = round(start_s * FRAMES_PER_SECOND)
    segment = whisper.pad_or_trim(mel[:, first : first + N_FRAMES], N_FRAMES)
    _, probs = model.detect_language(segment.to(model.device).to(torch.float16 if fp16 else torch.float32))
    return str(max(probs, key=probs.get))


class WhisperEngine:
    """Runs whisper's transcribe on resident models, one call at a time."""

    def __init__(self, registry: ModelRegistry) -> None:
        from daemon.pipeline.batched import BatchedEngine
        from daemon.pipeline.gather import BatchGatherer

        self.registry = registry
        # One job's work on the device at a time, in turns of a window or a batch (both engines).
        self.turns = DeviceTurns(on_take=registry.claim_threads)
        self.batched = BatchedEngine(registry, turns=self.turns)
        # Jobs running side by side (jobs_in_flight) share the batched engine's batches.
        self.gatherer = BatchGatherer(self.batched.transcribe_many)

    @staticmethod
    def _clips(audio: Audio, rule: Rule) -> list[float] | None:
        """Return whisper's clip_timestamps (start, end, start, end, …) around long silences.

        Empty when there is nothing to skip; None when there is nothing but silence: whisper would
        invent a word or two there ("you"), whatever its no-speech guard says.
        """
        if rule.skip_silence <= 0:
            return []
        spans = speech_spans(audio.samples, min_silence_s=rule.skip_silence, threshold_db=rule.silence_threshold_db)
        if not spans:
            return None
        if len(spans) == 1 and spans[0].start == 0 and spans[0].end >= audio.duration_s:
            return []
        clips = [t for span in spans for t in (span.start, span.end)]
        if spans[-1].end >= audio.duration_s - 0.01:
            # An odd count lets whisper end the last clip at its own last frame: an end even 10 ms
            # past it leaves whisper decoding empty windows forever (whisper 20250625).
            clips.pop()
        return clips

    def _silent(
        self, model: Any, mel: LazyMel, audio: Audio, rule: Rule, language: str | None, progress: Progress | None
    ) -> Transcript:
        """Return the empty transcript of audio that holds nothing but silence (nothing is decoded)."""
        if language is None:  # the outputs still carry a language; detect it as whisper would
            with self.turns.hold():
                language = detect_language(model, mel, start_s=0.0, fp16=self.registry.fp16)
        if progress is not None:
            progress(1.0)
        return Transcript(text="", language=language, segments=(), task=rule.task, model=rule.model,
                          audio_duration_s=audio.duration_s)

    def transcribe(self, audio: Audio, rule: Rule, progress: Progress | None = None) -> Transcript:
        """Return the transcript of the audio under the rule; GPU out-of-memory is transient."""
        import whisper

        from daemon.models.graphed_decoder import release as release_decoder_caches
        from daemon.pipeline.batched import find_speech, uses_batched

        if uses_batched(rule, audio.duration_s):
            # Found here, in the job's own thread, before it waits for the device: this CPU work
            # (VAD, a spectrogram pass) overlaps other jobs' decoding instead of holding the device.
            speech = find_speech(audio, rule, self.registry.get(rule.model).dims.n_mels)
            return self.gatherer.transcribe(replace(audio, speech=speech), rule, progress)
        model = self.registry.get(rule.model)
        options = decode_options(rule, audio, fp16=self.registry.fp16)
        # The spectrogram, a window at a time (whisper would compute the whole file's up front).
        mel = LazyMel(audio.samples, model.dims.n_mels)
        clips = self._clips(audio, rule)
        if clips is None:
            return self._silent(model, mel, audio, rule, options["language"], progress)
        if clips:
            options["clip_timestamps"] = clips
        module = sys.modules["whisper.transcribe"]  # the module, not the function of that name
        reported = Reported(progress) if progress is not None else None
        with self.turns.hold(heartbeat=reported.again if reported else None):
            saved = module.tqdm, module.log_mel_spectrogram

            def restore() -> None:
                module.tqdm, module.log_mel_spectrogram = saved  # type: ignore[attr-defined]

            module.tqdm = SimpleNamespace(tqdm=_ProgressBar)  # type: ignore[attr-defined]
            module.log_mel_spectrogram = transcribe_patch(mel)  # type: ignore[attr-defined]
            _ProgressBar.pending = (reported, self.turns.pass_turn, restore)
            try:
                with device_faults_mapped():
                    if options["language"] is None:
                        # Detected here, as whisper would, but where the speech starts (whisper listens
                        # to the file's first 30 s, which may be silence), and on the window's spectrogram.
                        options["language"] = detect_language(model, mel, start_s=clips[0] if clips else 0.0,
                                                              fp16=self.registry.fp16)
                    result = whisper.transcribe(model, audio.samples, **options)
            finally:
                restore()  # whisper failed before making its bar, if it has not been done
                _ProgressBar.pending = None
                release_decoder_caches(model)  # (CUDA) the decoder's caches go when the file is done
        if progress is not None:
            progress(1.0)
        segments = tuple(_segment(raw, audio.offset_s) for raw in result["segments"])
        return Transcript(
            text=str(result["text"]).strip(),
            language=str(result["language"]),
            segments=segments,
            task=rule.task,
            model=rule.model,
            audio_duration_s=audio.duration_s,
        )
