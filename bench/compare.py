"""Side by side, one run, the same audio and the same weights: whisper's CLI, whisper, faster-whisper, whisperd.

    .venv/bin/python bench/compare.py                      # real base, CPU: 23 short files + a 3-minute one
    .venv/bin/python bench/compare.py --quick              # 3 real + 5 generated short files, no long ones
    .venv/bin/python bench/compare.py --beam-size 5        # beam search instead of greedy, for every variant
    .venv/bin/python bench/compare.py --device cuda --model random-large-v3 --token-budget 64
    .venv/bin/python bench/compare.py --variants whisper,fw-int8,whisperd-batched --out /tmp/run

Writes a markdown table and the JSON behind it (`--out PATH` → PATH.md and PATH.json; default
bench/results/<time>.{md,json}), and prints the table and a summary of ratios.

Variants (each run in a fresh process per set of files, so peak memory is its own):
  whisper-cli       `python -m whisper FILE --model <the .pt>`, one process per file (what users of the
                    seeds did); its load time is measured once in a separate process, and every file pays it
  whisper           openai-whisper `load_model` once, `transcribe()` file after file
  fw-int8, fw-fp32  faster-whisper `WhisperModel` (CPU, int8 / float32), file after file
  fw-*-batched      faster-whisper `BatchedInferencePipeline` over the same model (its silero VAD cuts each
                    file into ≤ 30 s chunks; it batches the chunks of one file)
  fw-fp16[-batched] the same on CUDA, float16 (replace the CPU ones with --device cuda)
  whisperd-seq      whisperd in-process with `engine: sequential` (whisper's transcribe()), file after file
  whisperd          whisperd in-process with `engine: auto`: `ModelRegistry` + `pipeline.process_file` for each file
                    (probe, extract with ffmpeg, transcribe, publish txt: what the daemon does per file)
  whisperd-cli      `whisperd transcribe FILE…`: one process for the set, the model loaded once
  whisperd-batched  whisperd's batched engine on the whole set: windows of several files in one batch

Same audio: the real recordings in --audio-dir (reference texts from its README) and espeak-ng
speech of Harvard sentences with silence and noise between phrases (bench/inputs.py), made once
into --cache. Same weights: OpenAI's base from the test packages as a CTranslate2 folder, which
faster-whisper reads, and whisperd's own conversion of that folder, which whisper loads
(bench/weights.py). Same decoding: greedy (or --beam-size) at temperature 0 with no fallback,
English, whisper's thresholds, timestamps on; the threads set to --threads everywhere
(torch.set_num_threads / whisper's --threads, CTranslate2's cpu_threads, OMP/MKL variables).

Measured per variant and set: load s (the model, to ready; imports not counted), transcribe s
(every file from its path to its text, model loaded), RTFx = audio s / transcribe s, cold RTFx =
audio s / the process's whole wall time (interpreter, imports, load), CPU s (user + system of the
process tree: less sensitive than wall time to other work on the machine), peak RSS (wait4's
ru_maxrss: the largest single process of the tree), peak device memory on CUDA (nvidia-smi's used
memory above the idle baseline, sampled every 0.2 s, and torch's max_memory_allocated where torch
runs), and the word error rate against the reference texts (whisper's EnglishTextNormalizer on both
sides; errors summed over words summed).

Random weights (--model random-large-v3 | random-turbo | random-tiny): the dimensions of those
models with random weights, for speed on a GPU. Every 30 s window decodes exactly --token-budget
tokens (end-of-text suppressed, no timestamps, no conditioning, no thresholds), so every variant
does the same work. They say nothing about quality: their text is noise and their WER is not
reported. whisper's CLI and whisperd-cli cannot express a token budget and are marked so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402  (after the path: bench/ is run as a script)
from bench.inputs import Item, generated_items, real_items  # noqa: E402
from bench.variants import (  # noqa: E402
    Decoding,
    Variant,
    catalog,
    whisper_cli_args,
    whisperd_extra_options,
    whisperd_rule,
)
from bench.weights import Weights, describe  # noqa: E402


@dataclass
class Run:
    """One variant on one set of files: what it measured, or why it did not run."""

    variant: Variant
    set_name: str
    items: list[Item]
    status: str = "ok"  # 'ok', 'not available', 'not applicable', 'skipped', 'failed', 'timed out'
    reason: str = ""
    load_s: float | None = None
    import_s: float | None = None
    transcribe_s: float | None = None
    wall_s: float | None = None  # the whole process (for whisper-cli: all of them), spawn to exit
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    device_peak_mb: float | None = None
    torch_peak_mb: float | None = None
    texts: list[str] = field(default_factory=list)
    per_file_s: list[float] = field(default_factory=list)
    load_avg: tuple[float, float] | None = None  # 1-minute load average before and after
    notes: list[str] = field(default_factory=list)

    @property
    def audio_s(self) -> float:
        """Return the seconds of audio in the set."""
        return sum(item.duration_s for item in self.items)


@dataclass(frozen=True)
class Measured:
    """A finished process: exit status, wall time, CPU time and peak RSS of its tree."""

    code: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    device_peak_mb: float | None
    timed_out: bool


class DeviceSampler:
    """Samples the GPU's used memory (nvidia-smi) while a process runs; reports the peak above the start."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak = self.baseline = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def used_mb() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True).stdout
        return float(out.split()[0])

    def __enter__(self) -> DeviceSampler:
        if self.enabled:
            self.baseline = self.peak = self.used_mb()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.used_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def result(self) -> float | None:
        """Return the peak above the baseline in MB, or None when not sampled."""
        return self.peak - self.baseline if self.enabled else None


def measure(argv: list[str], *, env: dict[str, str], timeout_s: float, log: Path, cuda: bool,
            cwd: Path = ROOT) -> Measured:
    """Run argv in its own process group and return what it cost; past timeout_s the group is killed."""
    started = time.monotonic()
    with open(log, "ab") as out, DeviceSampler(cuda) as sampler:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # rusage: the child and the descendants it waited for
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(proc.returncode, time.monotonic() - started, usage.ru_utime + usage.ru_stime,
                    usage.ru_maxrss / 1024, sampler.result, killed.is_set())


class Bench:
    """Runs every chosen variant on every set and collects the runs."""

    def __init__(self, args: argparse.Namespace, weights: Weights, decoding: Decoding, work: Path) -> None:
        self.args = args
        self.weights = weights
        self.decoding = decoding
        self.work = work
        self.cuda = args.device == "cuda"
        threads = str(args.threads)
        self.env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                    "OPENBLAS_NUM_THREADS": threads, "TQDM_DISABLE": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.counter = 0

    def _dir(self, run: Run) -> Path:
        self.counter += 1
        path = self.work / f"{self.counter:02d}-{run.variant.name}-{run.set_name}"
        path.mkdir(parents=True)
        return path

    def run(self, variant: Variant, set_name: str, items: list[Item]) -> Run:
        """Return the fastest of --repeat runs of one variant on one set of files."""
        if set_name != "short" and variant.kind.endswith("-cli") and not self.args.cli_on_long:
            return Run(variant, set_name, items, status="skipped",
                       reason="a CLI on one long file measures what the resident variant does, plus one load "
                       "(--cli-on-long runs it)")
        runs = [self._once(variant, set_name, items) for _ in range(self.args.repeat)]
        ok = [r for r in runs if r.status == "ok" and r.transcribe_s is not None]
        if not ok:
            return runs[-1]
        best = min(ok, key=lambda r: r.transcribe_s or 0.0)
        if len(runs) > 1:
            best.notes.append("best of " + ", ".join(f"{r.transcribe_s:.1f}" if r.transcribe_s else r.status
                                                      for r in runs) + " s")
        return best

    def _once(self, variant: Variant, set_name: str, items: list[Item]) -> Run:
        run = Run(variant, set_name, items)
        before = os.getloadavg()[0]
        try:
            if variant.kind == "whisper-cli":
                self._whisper_cli(run)
            elif variant.kind == "whisperd-cli":
                self._whisperd_cli(run)
            else:
                self._child(run)
        except Exception as err:  # one variant failing must not lose the others' figures
            run.status, run.reason = "failed", f"{type(err).__name__}: {err}"
        run.load_avg = (before, os.getloadavg()[0])
        return run

    def _spec(self, run: Run, work: Path, **extra: Any) -> Path:
        spec = {"variant": vars(run.variant), "files": [str(item.path) for item in run.items],
                "weights": {"ct2": str(self.weights.ct2), "pt": str(self.weights.pt),
                            "model_dir": str(self.weights.model_dir)},
                "decoding": self.decoding.to_dict(), "threads": self.args.threads, "device": self.args.device,
                "work": str(work), "result": str(work / "result.json"),
                **extra}  # fmt: skip
        path = work / "spec.json"
        path.write_text(json.dumps(spec, indent=1))
        return path

    def _child(self, run: Run) -> None:
        work = self._dir(run)
        spec = self._spec(run, work)
        m = measure([sys.executable, str(ROOT / "bench" / "runner.py"), str(spec)], env=self.env,
                    timeout_s=self.args.timeout, log=work / "log.txt", cuda=self.cuda)
        self._take(run, m, work)
        if run.status != "ok":
            return
        result = json.loads((work / "result.json").read_text())
        if result["status"] != "ok":
            run.status, run.reason = result["status"], result.get("reason", "")
            return
        run.texts, run.per_file_s = result["texts"], result.get("per_file_s", [])
        run.load_s, run.import_s, run.transcribe_s = result["load_s"], result["import_s"], result["transcribe_s"]
        run.torch_peak_mb = result.get("torch_peak_mb")
        if result.get("model_origin") not in (None, "cache"):
            run.notes.append(f"model origin {result['model_origin']!r}")

    def _take(self, run: Run, m: Measured, work: Path) -> None:
        run.wall_s, run.cpu_s, run.peak_rss_mb, run.device_peak_mb = m.wall_s, m.cpu_s, m.peak_rss_mb, m.device_peak_mb
        if m.timed_out:
            run.status, run.reason = "timed out", f"after {self.args.timeout:.0f} s (log: {work / 'log.txt'})"
        elif m.code != 0:
            tail = (work / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
            run.status, run.reason = "failed", f"exit {m.code}: {' / '.join(tail)} (log: {work / 'log.txt'})"

    def _whisper_cli(self, run: Run) -> None:
        args = whisper_cli_args(self.decoding, device=self.args.device, threads=self.args.threads)
        if isinstance(args, str):
            run.status, run.reason = "not applicable", args
            return
        work = self._dir(run)
        # Load time: one process that only imports whisper and loads the model (every file pays this).
        spec = self._spec(run, work, load_only=True, variant={**vars(run.variant), "kind": "whisper"})
        probe = measure([sys.executable, str(ROOT / "bench" / "runner.py"), str(spec)], env=self.env,
                        timeout_s=self.args.timeout, log=work / "log.txt", cuda=self.cuda)
        self._take(run, probe, work)
        if run.status != "ok":
            return
        loaded = json.loads((work / "result.json").read_text())
        run.load_s, run.import_s = loaded["load_s"], loaded["import_s"]
        total = cpu = peak = 0.0
        device_peak: float | None = None
        for item in run.items:
            out = work / "out"
            m = measure([sys.executable, "-m", "whisper", str(item.path), "--model", str(self.weights.pt),
                         "--output_dir", str(out), *args], env=self.env, timeout_s=self.args.timeout,
                        log=work / "log.txt", cuda=self.cuda, cwd=work)
            if m.timed_out or m.code != 0:
                self._take(run, m, work)
                return
            total, cpu, peak = total + m.wall_s, cpu + m.cpu_s, max(peak, m.peak_rss_mb)
            if m.device_peak_mb is not None:
                device_peak = max(device_peak or 0.0, m.device_peak_mb)
            run.per_file_s.append(m.wall_s)
            run.texts.append(" ".join((out / f"{item.path.stem}.txt").read_text().split()))
        run.transcribe_s = run.wall_s = total
        run.cpu_s, run.peak_rss_mb, run.device_peak_mb = cpu, peak, device_peak
        run.notes.append(f"load s: one process's model load; each of the {len(run.items)} processes pays it "
                         f"and {run.import_s:.1f} s of imports, inside transcribe s")

    def _whisperd_cli(self, run: Run) -> None:
        if whisperd_extra_options(self.decoding):
            run.status = "not applicable"
            run.reason = "whisperd's config has no without_timestamps or suppress_tokens: no fixed token budget"
            return
        work = self._dir(run)
        config = {"state_dir": str(work / "state"), "model_dir": str(self.weights.model_dir),
                  "device": self.args.device, "torch_threads": self.args.threads, "log_format": "json",
                  "defaults": whisperd_rule(self.decoding, str(self.weights.ct2))}
        if self.args.device == "cpu":
            config["cpu_dtype"] = run.variant.dtype
        (work / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
        out = work / "out"
        m = measure([sys.executable, "-m", "daemon", "transcribe", *[str(item.path) for item in run.items],
                     "--config", str(work / "config.yaml"), "-o", str(out)], env=self.env,
                    timeout_s=self.args.timeout, log=work / "log.txt", cuda=self.cuda)
        self._take(run, m, work)
        if run.status != "ok":
            return
        events = [json.loads(line) for line in (work / "log.txt").read_text().splitlines() if line.startswith("{")]
        times = {e["event"]: datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")) for e in events
                 if e.get("event") in ("model_loading", "model_loaded")}
        done = [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")) for e in events
                if e.get("event") == "transcribed"]
        loaded = [e for e in events if e.get("event") == "model_loaded"]
        if loaded and done and "model_loaded" in times:
            run.load_s = float(loaded[0]["duration_s"])
            # From its log: the model was loaded before the first file's probe, so the files took
            # from then until the last file's 'transcribed' (its publish, a few ms, not counted).
            run.transcribe_s = (max(done) - times["model_loaded"]).total_seconds()
        run.texts = [" ".join((out / f"{item.path.stem}.txt").read_text().split()) for item in run.items]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base",
                        help="base (default), random-large-v3, random-turbo, random-tiny, or a CTranslate2 folder")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for every variant (default: all cores)")
    parser.add_argument("--beam-size", type=int, default=None, help="beam search width (default: greedy)")
    parser.add_argument("--batch-size", type=int, default=8, help="for the batched variants (default 8)")
    parser.add_argument("--token-budget", type=int, default=64, help="tokens per 30 s window with random weights")
    parser.add_argument("--audio-dir", type=Path, default=ROOT.parent / "shared" / "audio",
                        help="real recordings and the README with their reference texts (default ../shared/audio)")
    parser.add_argument("--generated", type=int, default=20, help="short espeak-ng files (default 20)")
    parser.add_argument("--long", type=int, default=1, help="long espeak-ng files (default 1)")
    parser.add_argument("--long-minutes", type=float, default=3.0, help="length of each long file (default 3)")
    parser.add_argument("--quick", action="store_true", help="5 generated short files, no long ones")
    parser.add_argument("--variants", help="comma-separated names to run (default: all for the device)")
    parser.add_argument("--skip", default="", help="comma-separated names not to run")
    parser.add_argument("--out", type=Path, help="PATH: writes PATH.md and PATH.json (default bench/results/<time>)")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache",
                        help="generated audio and converted models, made once (default bench/.cache)")
    parser.add_argument("--repeat", type=int, default=1, help="run each variant this often per set, keep the fastest")
    parser.add_argument("--cli-on-long", action="store_true", help="run the CLI variants on the long files too")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one variant may take on one set")
    parser.add_argument("--keep-work", action="store_true", help="keep the per-run folders (logs, outputs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.generated, args.long = 5, 0
    if args.device == "auto":
        args.device = "cuda" if cuda_available() else "cpu"
    return args


def prepare(name: str, cache: Path) -> Weights:
    """Return the model's weights, prepared in a child process (see bench/weights.py's main)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "weights.py"), name, str(cache)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"preparing the weights failed:\n{out.stderr[-3000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return Weights(**{key: Path(value) if key in ("ct2", "pt", "model_dir") else value for key, value in data.items()})


def cuda_available() -> bool:
    """Return True when torch sees a CUDA device (asked in a child: torch in this process would weigh on
    every child's peak RSS)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def choose(args: argparse.Namespace) -> list[Variant]:
    """Return the variants to run, in the table's order."""
    variants = catalog(args.device)
    names = {v.name for v in variants}
    wanted = set(args.variants.split(",")) if args.variants else names
    skipped = set(filter(None, args.skip.split(",")))
    unknown = (wanted | skipped) - names
    if unknown:
        raise SystemExit(f"unknown variants for {args.device}: {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(v.name for v in variants)}")
    return [v for v in variants if v.name in wanted - skipped]


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Return facts about the machine and the software, for the report."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("openai-whisper", "torch", "faster-whisper", "ctranslate2", "onnxruntime"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = None
    if args.device == "cuda" and shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader",
                              "-i", "0"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "versions": versions, "load_avg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "bench/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = datetime.now(timezone.utc)
    out = args.out or ROOT / "bench" / "results" / started.strftime("%Y%m%d-%H%M%S")
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = args.cache.resolve()
    variants = choose(args)

    print(f"preparing inputs and weights in {cache} …", flush=True)
    short = real_items(args.audio_dir.resolve())
    made_short, made_long = generated_items(cache / "audio", args.generated, long_count=args.long,
                                            long_minutes=args.long_minutes)
    sets = {"short": short + made_short, "long": made_long}
    sets = {name: items for name, items in sets.items() if items}
    weights = prepare(args.model, cache / "models")
    if weights.trained:
        decoding = Decoding(beam_size=args.beam_size, batch_size=args.batch_size)
    else:
        decoding = Decoding.token_budget(args.token_budget, beam_size=args.beam_size, batch_size=args.batch_size)
    env = environment(args)

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="whisperd-bench-") as tmp:
        work = Path(tmp)
        bench = Bench(args, weights, decoding, work)
        for set_name, items in sets.items():
            audio = sum(item.duration_s for item in items)
            print(f"\n{set_name}: {len(items)} files, {audio:.0f} s of audio", flush=True)
            for variant in variants:
                print(f"  {variant.name:<18}", end=" ", flush=True)
                run = bench.run(variant, set_name, items)
                runs.append(run)
                print(report.one_line(run), flush=True)
        if args.keep_work:
            kept = out.parent / f"{out.name}-work"
            shutil.copytree(work, kept)
            print(f"per-run folders kept in {kept}")

    meta = {"command": command, "started": started.isoformat(timespec="seconds"), "device": args.device,
            "harness_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # before scoring
            "threads": args.threads, "model": describe(weights), "decoding": decoding.to_dict(),
            "environment": {**env, "load_avg_end": os.getloadavg()},
            "inputs": {name: [item.to_dict() for item in items] for name, items in sets.items()}}
    markdown = report.markdown(meta, runs)
    md, js = Path(f"{out}.md"), Path(f"{out}.json")
    md.write_text(markdown)
    js.write_text(json.dumps(report.as_json(meta, runs), indent=1))
    print("\n" + markdown)
    print(f"written: {md} and {js}")


if __name__ == "__main__":
    main()
