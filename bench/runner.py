"""One variant in a fresh process: load the model, transcribe the files, write the timings and texts as JSON.

    python bench/runner.py SPEC.json

`compare.py` writes the spec (variant, files, weights, decoding, threads, where the result goes)
and reads the result; it measures the process's peak memory itself (wait4). Timings here:
`import_s` (torch and the tool), `load_s` (the model, to ready), `transcribe_s` (every file, one
after the other or in one call for the batched engine, from the path to the text).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTED = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.variants import (  # noqa: E402  (after the path: bench/ is run as a script)
    Decoding,
    faster_whisper_options,
    whisper_options,
    whisperd_extra_options,
    whisperd_rule,
)

Result = dict[str, Any]


class NotAvailable(Exception):
    """The variant cannot run here (a module missing); the table says so."""


def _timed_files(files: list[str], one: Callable[[str], str]) -> Result:
    texts, seconds = [], []
    started = time.monotonic()
    for path in files:
        t = time.monotonic()
        texts.append(one(path))
        seconds.append(time.monotonic() - t)
    return {"texts": texts, "per_file_s": seconds, "transcribe_s": time.monotonic() - started}


def _torch_peak(device: str) -> Result:
    if device != "cuda" or "torch" not in sys.modules:
        return {}
    import torch

    return {"torch_peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def run_whisper(spec: Result, d: Decoding) -> Result:
    """openai-whisper: load_model once, transcribe() each file."""
    import torch
    import whisper

    torch.set_num_threads(spec["threads"])
    imported = time.monotonic()
    model = whisper.load_model(spec["weights"]["pt"], device=spec["device"])
    loaded = time.monotonic()
    options = whisper_options(d, fp16=spec["device"] == "cuda")
    if spec.get("load_only"):
        return {"import_s": imported - STARTED, "load_s": loaded - imported, "texts": [], "transcribe_s": 0.0}
    done = _timed_files(spec["files"], lambda path: str(whisper.transcribe(model, path, **options)["text"]).strip())
    return {"import_s": imported - STARTED, "load_s": loaded - imported, **done}


def run_faster_whisper(spec: Result, d: Decoding, *, batched: bool) -> Result:
    """faster-whisper: one WhisperModel (and a BatchedInferencePipeline over it), each file in turn."""
    try:
        from faster_whisper import BatchedInferencePipeline, WhisperModel
    except ImportError as err:
        raise NotAvailable(f"faster-whisper is not installed ({err})") from err
    imported = time.monotonic()
    model = WhisperModel(spec["weights"]["ct2"], device=spec["device"], compute_type=spec["variant"]["dtype"],
                         cpu_threads=spec["threads"], num_workers=1)
    pipeline: Any = BatchedInferencePipeline(model=model) if batched else model
    loaded = time.monotonic()
    options = faster_whisper_options(d, batched=batched)

    def one(path: str) -> str:
        segments, _info = pipeline.transcribe(path, **options)
        return "".join(segment.text for segment in segments).strip()

    return {"import_s": imported - STARTED, "load_s": loaded - imported, **_timed_files(spec["files"], one)}


def _whisperd_registry(spec: Result, d: Decoding) -> Any:
    import torch  # noqa: F401  (imported before the load is timed, as the other variants do)
    import whisper  # noqa: F401

    from daemon import log
    from daemon.models import ModelRegistry

    log.configure("json", "warning")
    extra = whisperd_extra_options(d)
    if extra:
        # Random weights: whisper options a Rule has no field for (a fixed token budget), added here
        # to whisperd's own, the same as every other variant gets.
        import daemon.pipeline.transcribe as transcribe

        own = transcribe.decode_options
        transcribe.decode_options = lambda *a, **k: {**own(*a, **k), **extra}  # type: ignore[assignment]
    # On a CPU the variant's dtype is whisperd's cpu_dtype (float32, or bfloat16/int8 for the -bf16/-int8 variants).
    cpu_dtype = spec["variant"]["dtype"] if spec["device"] == "cpu" else "auto"
    return ModelRegistry(Path(spec["weights"]["model_dir"]), device=spec["device"], torch_threads=spec["threads"],
                         cpu_dtype=cpu_dtype)


def _whisperd_setup(spec: Result, d: Decoding, engine: str) -> tuple[Any, Any, Any, float, float]:
    """Return whisperd's registry (the model loaded), settings and rule, and when the imports and load ended."""
    from daemon.config import Rule, Settings

    registry = _whisperd_registry(spec, d)
    imported = time.monotonic()
    setting = spec["weights"]["ct2"]
    registry.get(setting)
    loaded = time.monotonic()
    work = Path(spec["work"])
    settings = Settings(state_dir=work / "state", model_dir=Path(spec["weights"]["model_dir"]),
                        device=spec["device"], torch_threads=spec["threads"])
    return registry, settings, Rule(**whisperd_rule(d, setting, engine)), imported, loaded


def run_whisperd(spec: Result, d: Decoding, engine: str) -> Result:
    """whisperd's pipeline in-process, file after file: probe, extract, transcribe (by `engine`), publish txt."""
    from daemon.pipeline import process_file
    from daemon.pipeline.transcribe import WhisperEngine

    registry, settings, rule, imported, loaded = _whisperd_setup(spec, d, engine)
    whisper_engine = WhisperEngine(registry)
    whisper_engine.batched.batch_size = d.batch_size
    out = Path(spec["work"]) / "out"
    out.mkdir(parents=True, exist_ok=True)

    def one(path: str) -> str:
        return process_file(Path(path), rule, whisper_engine, settings, target_dir=out).transcript.text

    origin = registry.info()[0].origin
    return {"import_s": imported - STARTED, "load_s": loaded - imported, "model_origin": origin,
            **_timed_files(spec["files"], one)}


def run_whisperd_batched(spec: Result, d: Decoding) -> Result:
    """whisperd's batched engine on the whole set: every file probed and extracted, then one transcribe_many."""
    from daemon.pipeline.batched import BatchedEngine
    from daemon.pipeline.extract import SampleFile, extract
    from daemon.pipeline.probe import probe, select_stream
    from daemon.pipeline.source import open_path

    registry, settings, rule, imported, loaded = _whisperd_setup(spec, d, "batched")
    engine = BatchedEngine(registry, batch_size=d.batch_size)
    started = time.monotonic()
    audios = []
    for i, path in enumerate(spec["files"]):
        work_dir = Path(spec["work"]) / "extract" / str(i)
        work_dir.mkdir(parents=True, exist_ok=True)
        source = open_path(Path(path))
        try:
            media = probe(source, timeout_s=settings.probe_timeout)
            audios.append(extract(media, select_stream(media, rule), work_dir=work_dir,
                                  timeout_s=settings.extract_timeout))
        finally:
            source.close()
    extracted = time.monotonic()
    try:
        transcripts = engine.transcribe_many([(audio, rule, None) for audio in audios])
    finally:
        for audio in audios:
            if isinstance(audio.samples, SampleFile):
                audio.samples.close()
    return {"import_s": imported - STARTED, "load_s": loaded - imported,
            "texts": [t.text.strip() for t in transcripts], "extract_s": extracted - started,
            "transcribe_s": time.monotonic() - started}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    d = Decoding(**spec["decoding"])
    kind = spec["variant"]["kind"]
    runners: dict[str, Callable[[], Result]] = {
        "whisper": lambda: run_whisper(spec, d),
        "faster-whisper": lambda: run_faster_whisper(spec, d, batched=False),
        "faster-whisper-batched": lambda: run_faster_whisper(spec, d, batched=True),
        "whisperd-sequential": lambda: run_whisperd(spec, d, "sequential"),
        "whisperd": lambda: run_whisperd(spec, d, "auto"),
        "whisperd-batched": lambda: run_whisperd_batched(spec, d),
    }
    try:
        result = {"status": "ok", **runners[kind](), **_torch_peak(spec["device"])}
    except NotAvailable as err:
        result = {"status": "not available", "reason": str(err)}
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
