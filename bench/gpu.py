"""The GPU bench: whisperd's batched engine against whisper's `transcribe()` on one CUDA device, and the
CUDA path checked against the CPU's.

    python bench/gpu.py --pack                  # here, with ffmpeg: the bench's audio as 16 kHz PCM
    python bench/gpu.py --out DIR               # on the GPU machine (the `device` tool), see RESULTS.md

Why a script apart from `compare.py`: a lent GPU machine has no network and no ffmpeg, runs its own
torch, and takes at most 64 MiB with each command. So the audio travels decoded (the bench's 23
short files and its 3-minute one, `--pack`), weights are made there, and every stage writes its
figures to DIR at once (`gpu.json`, `gpu.md`), so a run cut short still reports what it measured.

Stages:

1. **facts**: the device, torch and CUDA, and whether faster-whisper's CUDA libraries are there
   (CTranslate2's wheel loads CUDA 12's `libcublas.so.12`).
2. **equivalence on CUDA** with the trained test model (`tests/fixtures/speech-tiny.pt`): the
   batched engine's tokens with one window per batch against eight (fp32, TF32 off; and fp16),
   the CUDA tokens against the CPU's, beam search on a batch (`decode_batch`) against whisper's
   own `decode` of each window alone, the graphed token steps against whisper's own (trained and
   random weights, greedy, timestamps, beams, 200 tokens), and the sequential engine on CUDA at all.
3. **speed** for each random-weight shape (`--shapes`, large-v3 and turbo by default): whisper's
   checkpoint made on the machine, then
   - the encoder's and the decoder's time apart on one batch of 32 windows, with whisper's own
     token steps and with the graphed ones (`daemon.models.graphed_decoder`);
   - whisperd's batched engine (`BatchedEngine.transcribe_many`, fp16, the model from whisperd's
     registry) on the clips repeated to `--hours` of audio, once per `--runs` entry
     (`STEPS:BATCH[:attributed][:timestamps]`: whisper's steps or the graphed ones, the batch size,
     the seconds spent in VAD, spectrograms, encoder and decoder, timestamps on); VAD (CPU),
     spectrograms, encoder and decoder all inside the timed call;
   - whisper's `transcribe()` (`whisper.load_model`, `fp16=True`) file after file, until `--cap-s`.
   Both decode exactly `--token-budget` tokens per window (end-of-text suppressed, no fallback, no
   conditioning, no timestamps unless asked), as `compare.py` does with random weights. RTFx = audio
   seconds / wall seconds. Random weights show speed only: their text is noise.

Measured runs are in `bench/RESULTS.md`. To run it through the `device` tool: wheels of what the
machine lacks (openai-whisper, structlog, pydantic and its core, annotated-types,
typing-inspection, silero-vad, more-itertools) in an ignored `.whl/`, carried with
`bench/.cache/gpu`; RESULTS.md gives the command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.variants import EOT, Decoding, whisper_options  # noqa: E402
from bench.weights import SHAPES, VOCAB, random_state  # noqa: E402

PACKED = ROOT / "bench" / ".cache" / "gpu" / "audio.npz"
FIXTURE = ROOT / "tests" / "fixtures" / "speech-tiny.pt"
RATE = 16000


# -- here: the audio, decoded once ---------------------------------------------------------------


def pack(target: Path) -> None:
    """Decode the bench's inputs (compare.py's short set and long file) to int16 PCM in one file."""
    import whisper

    from bench.inputs import generated_items, real_items

    cache = ROOT / "bench" / ".cache"
    made_short, made_long = generated_items(cache / "audio", 20, long_count=1, long_minutes=3.0)
    items = real_items((ROOT.parent / "shared" / "audio").resolve()) + made_short + made_long
    arrays = {}
    for item in items:
        samples = whisper.load_audio(str(item.path))
        arrays[item.path.name] = np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, **arrays)
    seconds = sum(len(a) for a in arrays.values()) / RATE
    print(f"{target}: {len(arrays)} files, {seconds:.0f} s, {target.stat().st_size / 2**20:.1f} MiB")


# -- there: the stages ---------------------------------------------------------------------------


class Report:
    """The figures so far, written to DIR after every stage (a run cut short keeps them)."""

    def __init__(self, out: Path, deadline: float) -> None:
        self.out = out
        self.deadline = deadline
        self.data: dict[str, Any] = {"command": "bench/gpu.py " + " ".join(sys.argv[1:]), "stages": {}}

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, run: Callable[[], dict[str, Any]], *, needs_s: float = 0.0) -> None:
        if self.left_s() < needs_s:
            self.data["stages"][name] = {"skipped": f"{self.left_s():.0f} s left, needs about {needs_s:.0f}"}
        else:
            started = time.monotonic()
            print(f"== {name}", flush=True)
            try:
                self.data["stages"][name] = {**run(), "stage_s": round(time.monotonic() - started, 1)}
            except Exception as err:  # one stage's failure is a finding; the next stage still runs
                self.data["stages"][name] = {"error": f"{type(err).__name__}: {err}",
                                             "traceback": traceback.format_exc()[-3000:]}
        print(json.dumps(self.data["stages"][name], default=str)[:2000], flush=True)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "gpu.md").write_text(markdown(self.data))


def facts() -> dict[str, Any]:
    """Return the machine, the software, and which peers' libraries are present."""
    import torch

    found = []
    for pattern in ("/usr/local/cuda*/lib64/libcublas.so*", "/usr/lib/x86_64-linux-gnu/libcublas.so*",
                    f"{sys.prefix}/lib/python3*/site-packages/nvidia/*/lib/libcublas.so*",
                    "/usr/local/lib/python3*/dist-packages/nvidia/*/lib/libcublas.so*"):
        found += [os.path.basename(p) for p in glob.glob(pattern)]
    smi = shutil.which("nvidia-smi")
    gpu = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if smi else None
    from importlib.metadata import version

    cuda = torch.cuda.is_available()
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if cuda else None,
            "capability": torch.cuda.get_device_capability(0) if cuda else None,
            "cpu_cores": os.cpu_count(), "python": sys.version.split()[0], "whisper": version("openai-whisper"),
            "ffmpeg": shutil.which("ffmpeg"), "libcublas": sorted(set(found))}


def clips(path: Path) -> dict[str, np.ndarray]:
    """Return the packed audio as float32 samples by file name."""
    with np.load(path) as packed:
        return {name: packed[name].astype(np.float32) / 32767 for name in packed.files}


def audio_of(samples: np.ndarray) -> Any:
    from daemon.pipeline.extract import Audio
    from daemon.pipeline.probe import AudioStream

    stream = AudioStream(index=0, position=0, codec="pcm_s16le", channels=1, language=None, start_time=0.0,
                         default=True)
    return Audio(samples=samples, offset_s=0.0, stream=stream)


def registry(model_dir: Path, device: str, *, fp16: bool = True) -> Any:
    """Return whisperd's registry on `device`; `fp16=False` keeps float32 on CUDA (for the equivalence)."""
    from daemon.models import ModelRegistry

    if fp16 or device == "cpu":
        return ModelRegistry(model_dir, device=device, torch_threads=8)

    class Float32Registry(ModelRegistry):
        @property
        def fp16(self) -> bool:
            return False

    return Float32Registry(model_dir, device=device, torch_threads=8)


def tokens(transcripts: list[Any]) -> list[list[tuple[int, ...]]]:
    return [[segment.tokens for segment in t.segments] for t in transcripts]


def same_share(a: list[Any], b: list[Any]) -> float:
    """Return the share of files whose tokens are identical in a and b."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def equivalence(audio: dict[str, np.ndarray], work: Path, device: str) -> dict[str, Any]:
    """The trained test model on CUDA: batched against alone, CUDA against CPU, beams against whisper's."""
    import torch
    import whisper
    from whisper.model import ModelDimensions

    from daemon.config import Rule
    from daemon.models.attention import share_audio_keys
    from daemon.models.checkpoint import Checkpoint, build_model
    from daemon.pipeline.batched import BatchedEngine, decode_batch
    from daemon.pipeline.transcribe import WhisperEngine

    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here (the convolutions default to TF32)
    torch.backends.cuda.matmul.allow_tf32 = False
    names = sorted(audio)[:12]
    items_audio = [audio_of(audio[name]) for name in names]
    rule = Rule.model_validate({"model": str(FIXTURE), "engine": "batched", "temperature": 0, "beam_size": None,
                                "condition_on_previous_text": False, "language": "en", "sample_len": 48})
    items = [(a, rule, None) for a in items_audio]
    result: dict[str, Any] = {"files": len(names)}
    cpu = BatchedEngine(registry(work / "cpu", "cpu"), batch_size=8).transcribe_many(items)
    fp32 = registry(work / "cuda32", device, fp16=False)
    alone = BatchedEngine(fp32, batch_size=1).transcribe_many(items)
    together = BatchedEngine(fp32, batch_size=8).transcribe_many(items)
    result["fp32_batch8_vs_batch1_same_tokens"] = same_share(tokens(together), tokens(alone))
    result["fp32_cuda_vs_cpu_same_tokens"] = same_share(tokens(together), tokens(cpu))
    fp16 = registry(work / "cuda16", device)
    alone16 = BatchedEngine(fp16, batch_size=1).transcribe_many(items)
    together16 = BatchedEngine(fp16, batch_size=8).transcribe_many(items)
    result["fp16_batch8_vs_batch1_same_tokens"] = same_share(tokens(together16), tokens(alone16))
    result["fp16_vs_cpu_fp32_same_text"] = same_share([t.text for t in together16], [t.text for t in cpu])
    result["example_text"] = {"cpu": cpu[0].text[:120], "cuda_fp32": together[0].text[:120],
                              "cuda_fp16": together16[0].text[:120]}
    # Beam search on a batch: each window's beams as whisper's own decode gives them alone.
    for label, reg in (("fp32", fp32), ("fp16", fp16)):
        model = reg.get(str(FIXTURE))
        dtype = torch.float16 if reg.fp16 else torch.float32
        mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(a.samples), model.dims.n_mels)
                            for a in items_audio[:6]]).to(model.device).to(dtype)
        options = whisper.DecodingOptions(language="en", beam_size=3, fp16=reg.fp16, sample_len=24)
        with torch.inference_mode():
            features = model.embed_audio(mels)
            batched = decode_batch(model, features, options)
            single = [whisper.decode(model, features[i : i + 1], options)[0] for i in range(len(features))]
        result[f"beam3_{label}_batch_vs_whisper_alone_same_tokens"] = same_share(
            [r.tokens for r in batched], [r.tokens for r in single])
    # The decoder's steps on static caches replayed as CUDA graphs against whisper's own steps, same model.
    noise_dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=256, n_audio_head=4, n_audio_layer=2,
                                 n_vocab=VOCAB, n_text_ctx=448, n_text_state=256, n_text_head=4, n_text_layer=4)
    noise_state = random_state(noise_dims, scale=0.05)
    endless = f"-1,{EOT}"
    cases = {
        "trained_greedy": ({}, False), "trained_no_timestamps": ({"without_timestamps": True}, False),
        "trained_beam3": ({"beam_size": 3, "sample_len": 24}, False),
        "random_greedy_200_tokens": ({"suppress_tokens": endless, "sample_len": 200}, True),
        "random_timestamps_120_tokens": ({"sample_len": 120}, True),
        "random_beam4_60_tokens": ({"suppress_tokens": endless, "sample_len": 60, "beam_size": 4}, True),
    }
    for label, reg in (("fp32", fp32), ("fp16", fp16)) if device == "cuda" else (("fp32", fp32),):
        # On a CPU (a dry run of this script) the registry's model has CPU kernels: whisper's modules instead.
        trained = reg.get(str(FIXTURE)) if device == "cuda" else share_audio_keys(whisper.load_model(str(FIXTURE)))
        noise = share_audio_keys(build_model(Checkpoint(noise_dims, noise_state), device=device, half=reg.fp16))
        dtype = torch.float16 if reg.fp16 else torch.float32
        for case, (overrides, random) in cases.items():
            model = noise if random else trained
            try:
                mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(a.samples), model.dims.n_mels)
                                    for a in items_audio[:8]]).to(device).to(dtype)
                options = whisper.DecodingOptions(language="en", fp16=reg.fp16, **overrides)
                with torch.inference_mode():
                    features = model.embed_audio(mels)
                    own = decode_batch(model, features, options, static_cache=False)
                    graphed = decode_batch(model, features, options, static_cache=True)
                    graphed = decode_batch(model, features, options, static_cache=True)  # the captured graphs again
                outcome: Any = same_share([r.tokens for r in graphed], [r.tokens for r in own])
            except Exception as err:  # a finding; the other cases still run
                outcome = f"{type(err).__name__}: {err}"
            result[f"graphs_{label}_{case}_same_tokens"] = outcome
    # The sequential engine (whisper's transcribe with whisperd's turns and progress) on CUDA at all.
    sequential = Rule.model_validate({"model": str(FIXTURE), "engine": "sequential", "temperature": 0,
                                      "language": "en", "sample_len": 48})
    long_name = max(audio, key=lambda n: len(audio[n]))
    t = WhisperEngine(fp16).transcribe(audio_of(audio[long_name]), sequential)
    result["sequential_on_cuda"] = {"file": long_name, "segments": len(t.segments), "text": t.text[:120]}
    return result


def random_checkpoint(target: Path, shape: str, device: str) -> Path:
    """Write whisper's checkpoint of random float16 weights with the named shape (made on the GPU: fast)."""
    from whisper.model import ModelDimensions

    from daemon.models.checkpoint import Checkpoint, write_checkpoint

    dims = ModelDimensions(n_vocab=VOCAB, n_audio_ctx=1500, n_text_ctx=448, **SHAPES[shape])
    target.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(Checkpoint(dims, random_state(dims, device=device)), target)
    return target


BUDGET = {"timestamps": False}  # True: timestamps on (whisper's timestamp rules run at every step)


def token_budget(tokens_per_window: int) -> None:
    """Make the batched engine decode exactly `tokens_per_window` per window, as compare.py's variants do."""
    import daemon.pipeline.batched as batched

    own = batched.decode_batch

    def budgeted(model: Any, features: Any, options: Any) -> list[Any]:
        options = dataclasses.replace(options, suppress_tokens=f"-1,{EOT}", sample_len=tokens_per_window,
                                      without_timestamps=not BUDGET["timestamps"])
        return own(model, features, options)

    batched.decode_batch = budgeted  # type: ignore[assignment]


def speed(shape: str, audio: dict[str, np.ndarray], args: argparse.Namespace, work: Path,
          report: Report) -> dict[str, Any]:
    """One random-weight shape: whisperd batched on `--hours` of audio, whisper's transcribe() until the cap."""
    import torch
    import whisper

    from daemon.config import Rule
    from daemon.pipeline.batched import BatchedEngine
    from daemon.pipeline.vad import speech_windows

    result: dict[str, Any] = {"shape": shape, "token_budget": args.token_budget}
    started = time.monotonic()
    pt = random_checkpoint(work / f"random-{shape}.pt", shape, args.device)
    result["checkpoint_s"] = round(time.monotonic() - started, 1)
    reg = registry(work / f"models-{shape}", args.device)
    started = time.monotonic()
    reg.get(str(pt))
    result["whisperd_load_s"] = round(time.monotonic() - started, 1)
    from daemon.models import graphed_decoder

    for steps in ("whisper", "graphs"):
        graphed_decoder.ENABLED = steps == "graphs"
        result[f"phases_{steps}_steps"] = phases(reg.get(str(pt)), args)
    graphed_decoder.ENABLED = True
    names = sorted(audio)
    one_pass = sum(len(audio[n]) for n in names) / RATE
    repeat = max(1, round(args.hours * 3600 / one_pass))
    files = [audio_of(audio[n]) for _ in range(repeat) for n in names]
    seconds = sum(a.duration_s for a in files)
    result.update(files=len(files), audio_s=round(seconds, 1))
    rule = Rule.model_validate({"model": str(pt), "engine": "batched", "temperature": 0, "beam_size": None,
                                "condition_on_previous_text": False, "language": "en",
                                "sample_len": args.token_budget, "no_speech_threshold": None,
                                "logprob_threshold": None, "compression_ratio_threshold": None})
    started = time.monotonic()
    windows = sum(len(speech_windows(audio[n])) for n in names) * repeat
    result["vad_s_one_pass_x_repeat"] = round((time.monotonic() - started) * repeat, 2)
    result["windows"] = windows
    BatchedEngine(reg, batch_size=8).transcribe_many([(a, rule, None) for a in files[:8]])  # warm-up
    runs = []
    for spec in args.runs.split(","):
        steps, batch_size, *extra = spec.split(":")
        if report.left_s() < 45:
            runs.append({"run": spec, "skipped": "time"})
            continue
        graphed_decoder.ENABLED = steps == "graphs"
        BUDGET["timestamps"] = "timestamps" in extra
        timers = Attribution(args.device) if "attributed" in extra else None
        sync(args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.monotonic()
        with timers or contextlib.nullcontext():
            out = BatchedEngine(reg, batch_size=int(batch_size)).transcribe_many([(a, rule, None) for a in files])
        sync(args.device)
        wall = time.monotonic() - started
        peak = round(torch.cuda.max_memory_allocated() / 2**20) if args.device == "cuda" else None
        runs.append({"run": spec, "steps": steps, "batch_size": int(batch_size), "wall_s": round(wall, 2),
                     "rtfx": round(seconds / wall, 1), "windows_per_s": round(windows / wall, 1),
                     "tokens": sum(len(s.tokens) for t in out for s in t.segments), "peak_torch_mb": peak,
                     **({"attributed_s": timers.seconds()} if timers else {})})
        print(f"   whisperd batched {shape} {spec}: {runs[-1]}", flush=True)
    graphed_decoder.ENABLED, BUDGET["timestamps"] = True, False
    result["whisperd_batched"] = runs
    del reg
    sync(args.device, free=True)
    # whisper's transcribe(), file after file, as its users run it (load_model, fp16=True).
    started = time.monotonic()
    model = whisper.load_model(str(pt), device=args.device)
    result["whisper_load_s"] = round(time.monotonic() - started, 1)
    budget = Decoding.token_budget(args.token_budget, beam_size=None, batch_size=1)
    options = whisper_options(budget, fp16=args.device == "cuda")
    whisper.transcribe(model, audio[names[0]], **options)  # warm-up
    done_s, done_files, token_count = 0.0, 0, 0
    started = time.monotonic()
    cap = min(args.cap_s, max(report.left_s() - 30, 5))
    for a in files:
        r = whisper.transcribe(model, a.samples, **options)
        token_count += sum(len(s["tokens"]) for s in r["segments"])
        done_s += a.duration_s
        done_files += 1
        if time.monotonic() - started > cap:
            break
    sync(args.device)
    wall = time.monotonic() - started
    result["whisper_sequential"] = {"files": done_files, "audio_s": round(done_s, 1), "wall_s": round(wall, 2),
                                    "rtfx": round(done_s / wall, 1), "tokens": token_count}
    best = max((r for r in runs if "rtfx" in r and "timestamps" not in r["run"]), key=lambda r: r["rtfx"], default=None)
    if best:
        result["batched_over_sequential"] = round(best["rtfx"] / (done_s / wall), 1)
    del model
    sync(args.device, free=True)
    return result


class Attribution:
    """Seconds spent in each part of the batched engine during one run (the device synchronised around each)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.spent: dict[str, float] = {}
        self.undo: list[Callable[[], None]] = []

    def __enter__(self) -> Attribution:
        import daemon.pipeline.batched as batched
        from daemon.pipeline.mel import LazyMel

        self._wrap(batched, "speech_windows", "vad")
        self._wrap(batched, "_window_mel", "mel")
        self._wrap(LazyMel, "global_max", "mel_loudest")
        self._wrap(batched, "decode_batch", "decode")
        self._wrap(batched.BatchedEngine, "_collect", "collect", method=True)
        self._wrap(batched.BatchedEngine, "_encode", "encode", static=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for undo in reversed(self.undo):
            undo()

    def seconds(self) -> dict[str, float]:
        return {name: round(value, 2) for name, value in self.spent.items()}

    def _wrap(self, owner: Any, name: str, label: str, *, method: bool = False, static: bool = False) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        function = original.__func__ if static else original

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            started = time.monotonic()
            try:
                return function(*args, **kwargs)
            finally:
                sync(self.device)
                self.spent[label] = self.spent.get(label, 0.0) + time.monotonic() - started

        setattr(owner, name, staticmethod(timed) if static else timed)
        self.undo.append(lambda: setattr(owner, name, original))


def phases(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Time the encoder and the decoder apart on one batch of 32 windows (where a faster engine must gain)."""
    import torch
    import whisper

    import daemon.pipeline.batched as batched

    fp16 = args.device == "cuda"
    mels = torch.randn(32, model.dims.n_mels, 3000, device=args.device).to(torch.float16 if fp16 else torch.float32)
    options = whisper.DecodingOptions(language="en", fp16=fp16, sample_len=args.token_budget)
    found: dict[str, Any] = {"windows": 32, "token_budget": args.token_budget}
    with torch.inference_mode():
        for repeat in range(3):  # the first is a warm-up
            sync(args.device)
            started = time.monotonic()
            features = model.embed_audio(mels)
            sync(args.device)
            encoded = time.monotonic()
            batched.decode_batch(model, features, options)
            sync(args.device)
            if repeat:
                found["encoder_ms_per_window"] = round((encoded - started) * 1000 / 32, 2)
                found["decoder_ms_per_step"] = round((time.monotonic() - encoded) * 1000 / args.token_budget, 2)
    return found


def sync(device: str, *, free: bool = False) -> None:
    """Wait for the device's queued work (a timer stopped before it would lie); optionally free its cache."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        if free:
            torch.cuda.empty_cache()


def markdown(data: dict[str, Any]) -> str:
    """Return the figures as a markdown summary."""
    lines = [f"`{data['command']}`", ""]
    stages = data["stages"]
    if "facts" in stages:
        lines += ["facts: " + json.dumps(stages["facts"], default=str), ""]
    if "equivalence" in stages:
        lines += ["equivalence (trained test model on CUDA): " + json.dumps(stages["equivalence"], default=str), ""]
    lines += ["| shape | engine | batch | files | audio s | wall s | RTFx | tokens | peak MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, stage in stages.items():
        if not name.startswith("speed-"):
            continue
        if "error" in stage or "skipped" in stage:
            lines.append(f"| {name[6:]} | {stage.get('error') or stage.get('skipped')} | | | | | | | |")
            continue
        for run in stage.get("whisperd_batched", []):
            if "rtfx" in run:
                lines.append(f"| {stage['shape']} | whisperd batched, {run['run']} | {run['batch_size']} | "
                             f"{stage['files']} | "
                             f"{stage['audio_s']} | {run['wall_s']} | {run['rtfx']} | {run['tokens']} | "
                             f"{run['peak_torch_mb']} |")
        seq = stage.get("whisper_sequential")
        if seq:
            lines.append(f"| {stage['shape']} | whisper transcribe() | 1 | {seq['files']} | {seq['audio_s']} | "
                         f"{seq['wall_s']} | {seq['rtfx']} | {seq['tokens']} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", action="store_true", help="decode the bench's audio into --audio (here)")
    parser.add_argument("--audio", type=Path, default=PACKED)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu")
    parser.add_argument("--shapes", default="large-v3,turbo")
    parser.add_argument("--hours", type=float, default=1.0, help="audio for the batched engine, the clips repeated")
    parser.add_argument("--runs", default="whisper:64,whisper:64:timestamps,graphs:32,graphs:64,graphs:64:timestamps",
                        help="batched-engine runs, each STEPS:BATCH[:attributed][:timestamps]; STEPS: whisper (its "
                             "own token steps) or graphs (static caches, CUDA graphs)")
    parser.add_argument("--token-budget", type=int, default=64)
    parser.add_argument("--cap-s", type=float, default=45.0, help="seconds of whisper's transcribe() per shape")
    parser.add_argument("--budget-s", type=float, default=400.0, help="stop starting stages after this long")
    parser.add_argument("--skip-equivalence", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (shape tiny)")
    args = parser.parse_args()
    if args.pack:
        pack(args.audio)
        return
    report = Report(args.out, time.monotonic() + args.budget_s)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "whisperd-gpu-bench"
    shutil.rmtree(work, ignore_errors=True)
    from daemon import log

    log.configure("json", "warning")
    audio = clips(args.audio)
    report.stage("facts", facts)
    if not args.skip_equivalence:
        report.stage("equivalence", lambda: equivalence(audio, work / "eq", args.device), needs_s=60)
    token_budget(args.token_budget)  # after the equivalence, which decodes as whisperd does
    for shape in args.shapes.split(","):
        report.stage(f"speed-{shape}", lambda shape=shape: speed(shape, audio, args, work / shape, report),
                     needs_s=90)
        shutil.rmtree(work / shape, ignore_errors=True)


if __name__ == "__main__":
    main()
