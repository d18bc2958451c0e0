"""What the benchmark compares: each variant, and one set of decoding settings said the way each tool says it.

Pure data and pure functions (no torch, no whisper imported here): the parent process decides
from these what to run, and `runner.py` runs one variant in a fresh child process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

EOT = 50257  # whisper's end-of-text token in every multilingual vocabulary


@dataclass(frozen=True)
class Decoding:
    """The decoding settings every variant gets, the same for all."""

    language: str | None = "en"
    beam_size: int | None = None  # None: greedy
    temperature: float = 0.0  # one temperature: no fallback
    condition_on_previous_text: bool = True
    no_speech_threshold: float | None = 0.6  # whisper's defaults, which faster-whisper shares
    logprob_threshold: float | None = -1.0
    compression_ratio_threshold: float | None = 2.4
    without_timestamps: bool = False  # timestamps on: subtitles need them
    sample_len: int | None = None  # most tokens per 30 s window; None: whisper's 224
    suppress_eot: bool = False  # random weights: never stop early, so every window costs sample_len tokens
    batch_size: int = 8  # for the batched variants

    @classmethod
    def token_budget(cls, tokens: int, *, beam_size: int | None, batch_size: int) -> Decoding:
        """Return settings for random weights: exactly `tokens` tokens per 30 s window, nothing skipped."""
        return cls(language="en", beam_size=beam_size, condition_on_previous_text=False, no_speech_threshold=None,
                   logprob_threshold=None, compression_ratio_threshold=None, without_timestamps=True,
                   sample_len=tokens, suppress_eot=True, batch_size=batch_size)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as plain data."""
        return asdict(self)


@dataclass(frozen=True)
class Variant:
    """One way of turning the files into text."""

    name: str
    kind: str  # 'whisper-cli', 'whisper', 'faster-whisper', 'faster-whisper-batched', 'whisperd', …
    device: str  # 'cpu' or 'cuda'
    dtype: str  # as the tool names it
    what: str  # one line for the table's notes


def catalog(device: str) -> list[Variant]:
    """Return every variant that runs on `device`, in the table's order."""
    torch_dtype = "float16" if device == "cuda" else "float32"
    fw = ("float16",) if device == "cuda" else ("int8", "float32")
    variants = [
        Variant("whisper-cli", "whisper-cli", device, torch_dtype,
                "`python -m whisper FILE --model base.pt`: one process per file, the model loaded each time"),
        Variant("whisper", "whisper", device, torch_dtype,
                "openai-whisper `transcribe()`, one resident model, file after file"),
    ]
    for compute_type in fw:
        short = {"float16": "fp16", "float32": "fp32"}.get(compute_type, compute_type)
        variants += [
            Variant(f"fw-{short}", "faster-whisper", device, compute_type,
                    "faster-whisper `WhisperModel.transcribe`, file after file"),
            Variant(f"fw-{short}-batched", "faster-whisper-batched", device, compute_type,
                    "faster-whisper `BatchedInferencePipeline` (its silero VAD cuts each file; batches within a file)"),
        ]
    variants += [
        Variant("whisperd-seq", "whisperd-sequential", device, torch_dtype,
                "whisperd in-process, `engine: sequential`: `ModelRegistry` + `pipeline.process_file` (probe, "
                "extract, whisper's `transcribe()`, publish txt), file after file"),
        Variant("whisperd", "whisperd", device, torch_dtype,
                "whisperd in-process, `engine: auto` (batched where the decoding allows): `process_file` file "
                "after file, each file's windows decoded in batches"),
        Variant("whisperd-cli", "whisperd-cli", device, torch_dtype,
                "`whisperd transcribe FILE…`: one process, the model loaded once"),
        Variant("whisperd-batched", "whisperd-batched", device, torch_dtype,
                "whisperd's batched engine on the whole set: every file probed and extracted, then "
                "`BatchedEngine.transcribe_many` decodes windows of several files in one batch"),
    ]
    if device == "cpu":
        variants.append(Variant("whisperd-batched-bf16", "whisperd-batched", device, "bfloat16",
                                "the same with `cpu_dtype: bfloat16` (encoder and cross-attention keys in bfloat16)"))
        variants.append(Variant("whisperd-batched-int8", "whisperd-batched", device, "int8",
                                "the same with `cpu_dtype: int8` (encoder linear layers and cross-attention key/value "
                                "projections int8 by int8, activations scaled per token)"))
    return variants


def whisper_options(d: Decoding, *, fp16: bool) -> dict[str, Any]:
    """Return keyword arguments for `whisper.transcribe`."""
    options: dict[str, Any] = {
        "language": d.language, "temperature": d.temperature, "beam_size": d.beam_size, "best_of": None,
        "condition_on_previous_text": d.condition_on_previous_text, "no_speech_threshold": d.no_speech_threshold,
        "logprob_threshold": d.logprob_threshold, "compression_ratio_threshold": d.compression_ratio_threshold,
        "without_timestamps": d.without_timestamps, "fp16": fp16, "verbose": None,
    }  # fmt: skip
    if d.sample_len is not None:
        options["sample_len"] = d.sample_len
    if d.suppress_eot:
        options["suppress_tokens"] = f"-1,{EOT}"
    return options


def whisper_cli_args(d: Decoding, *, device: str, threads: int) -> list[str] | str:
    """Return whisper CLI options for the settings, or why the CLI cannot express them."""
    if d.sample_len is not None or d.without_timestamps:
        return "whisper's CLI has no sample_len or without_timestamps option: a fixed token budget cannot be set"

    def opt(value: object) -> str:
        return "None" if value is None else str(value)

    return [
        "--device", device, "--fp16", str(device == "cuda"), "--threads", str(threads),
        "--language", opt(d.language), "--temperature", str(d.temperature),
        "--temperature_increment_on_fallback", "None",  # else --temperature 0 still falls back to 0.2 … 1.0
        "--beam_size", opt(d.beam_size), "--best_of", "None",
        "--condition_on_previous_text", str(d.condition_on_previous_text),
        "--no_speech_threshold", opt(d.no_speech_threshold), "--logprob_threshold", opt(d.logprob_threshold),
        "--compression_ratio_threshold", opt(d.compression_ratio_threshold),
        "--suppress_tokens", f"-1,{EOT}" if d.suppress_eot else "-1",
        "--output_format", "txt", "--verbose", "False",
    ]  # fmt: skip


def faster_whisper_options(d: Decoding, *, batched: bool) -> dict[str, Any]:
    """Return keyword arguments for faster-whisper's `transcribe` (sequential or batched)."""
    options: dict[str, Any] = {
        "language": d.language, "temperature": d.temperature, "beam_size": d.beam_size or 1, "best_of": 1,
        "condition_on_previous_text": d.condition_on_previous_text, "no_speech_threshold": d.no_speech_threshold,
        "log_prob_threshold": d.logprob_threshold, "compression_ratio_threshold": d.compression_ratio_threshold,
        "without_timestamps": d.without_timestamps,
        "suppress_tokens": [-1, EOT] if d.suppress_eot else [-1],
    }  # fmt: skip
    if d.sample_len is not None:
        options["max_new_tokens"] = d.sample_len
    if batched:
        # The batched pipeline never conditions on previous text (it has no such option).
        del options["condition_on_previous_text"]
        options["batch_size"] = d.batch_size
    return options


def whisperd_rule(d: Decoding, model: str, engine: str = "auto") -> dict[str, Any]:
    """Return whisperd `Rule` fields for the settings (only txt is written; the rest is whisperd's default)."""
    fields: dict[str, Any] = {
        "model": model, "engine": engine, "language": d.language or "auto", "temperature": (d.temperature,),
        "beam_size": d.beam_size, "best_of": None, "condition_on_previous_text": d.condition_on_previous_text,
        "no_speech_threshold": d.no_speech_threshold, "logprob_threshold": d.logprob_threshold,
        "compression_ratio_threshold": d.compression_ratio_threshold, "output_formats": ["txt"],
    }  # fmt: skip
    if d.sample_len is not None:
        fields["sample_len"] = d.sample_len
    return fields


def whisperd_extra_options(d: Decoding) -> dict[str, Any]:
    """Return whisper options a whisperd Rule has no field for; the bench adds them to whisperd's own."""
    extra: dict[str, Any] = {}
    if d.without_timestamps:
        extra["without_timestamps"] = True
    if d.suppress_eot:
        extra["suppress_tokens"] = f"-1,{EOT}"
    return extra
