"""Peak memory of whisperd for long recordings: does it follow the window, or the file?

Makes recordings of the given lengths (Opus, a few MB even for 10 hours) of silence and of noise
(noise is decoded window after window; silence is skipped), runs `whisperd transcribe` on each in
a fresh process with a small random-weight model and a fixed token budget (the model is not what
is measured), and prints the process's peak resident memory (its children, ffmpeg, included),
the wall time, and whether anything was left in the temporary folder.

    .venv/bin/python bench/memory.py                 # 1 h and 10 h, silence and noise
    .venv/bin/python bench/memory.py --hours 0.5 2

Target (issue "Faults and limits"): at most 1.5 GB for a 10-hour file on CPU, whatever its content.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def make_recording(path: Path, hours: float, content: str) -> Path:
    """Write an Opus file of silence or noise lasting `hours`."""
    source = "anullsrc=r=16000:cl=mono" if content == "silence" else "anoisesrc=r=16000:c=pink:a=0.05"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", source,
                    "-t", str(int(hours * 3600)), "-c:a", "libopus", "-b:a", "6k", str(path)], check=True)
    return path


def write_config(root: Path, model: Path) -> Path:
    """Write a config whose defaults decode fast: greedy, 8 tokens a window, no fallback."""
    folder = {name: str(root / name) for name in ("inbox", "outbox", "archive", "failed")}
    for path in folder.values():
        Path(path).mkdir(exist_ok=True)
    config = {
        "state_dir": str(root / "state"), "model_dir": str(root / "models"), "device": "cpu", "torch_threads": 1,
        "defaults": {"model": str(model), "temperature": 0, "beam_size": None, "best_of": None, "sample_len": 8,
                     "no_speech_threshold": None, "logprob_threshold": None, "compression_ratio_threshold": None,
                     "output_formats": ["txt"]},
        "folders": [{"name": "bench", **folder}],
    }
    path = root / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def run(recording: Path, config: Path, out: Path, work: Path) -> tuple[float, float]:
    """Return (peak RSS in MB, wall seconds) of one `whisperd transcribe` run."""
    argv = [sys.executable, "-m", "daemon", "transcribe", str(recording), "--config", str(config),
            "-o", str(out), "--log-format", "json"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "TMPDIR": str(work)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"transcribe failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else status}")
    return usage.ru_maxrss / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--content", nargs="+", default=["silence", "noise"], choices=["silence", "noise"])
    args = parser.parse_args()
    from make_test_checkpoint import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = write_config(root, make_checkpoint(root / "tiny.pt", seed=0))
        print(f"{'recording':<22} {'size':>8} {'peak RSS':>10} {'wall':>8}  temp files left")
        for hours in args.hours:
            for content in args.content:
                recording = make_recording(root / f"{content}-{hours:g}h.opus", hours, content)
                work = root / f"work-{content}-{hours:g}"
                work.mkdir()
                peak, wall = run(recording, config, root / "out", work)
                left = sorted(p.name for p in work.rglob("*"))
                size = recording.stat().st_size / 2**20
                print(f"{recording.name:<22} {size:6.1f}MB {peak:8.0f}MB {wall:7.0f}s  {left or 'none'}")
        print(f"(this script itself: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
