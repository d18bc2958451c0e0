"""Command start time: how long `whisperd --help`, `check-config`, `status` and `jobs` take.

Each run is a fresh `python -m daemon …` process (what an operator's shell starts), timed from
spawn to exit; the best of N is printed, with the heavy packages the command imported. These
commands only read a config and the journal: torch and whisper (2 s to import) have no place
in them. The config names an OpenAI model and a whisper `.pt` checkpoint, so both kinds of
model check run.

    .venv/bin/python bench/cli_start.py            # best of 5
    .venv/bin/python bench/cli_start.py --repeat 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "whisper", "numpy", "tiktoken")

# Runs the command as `python -m daemon` does, then says which heavy packages it imported.
CHILD = r"""
import json, runpy, sys
heavy = sys.argv[1].split(",")
sys.argv = ["whisperd", *sys.argv[2:]]
try:
    runpy.run_module("daemon", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    print(json.dumps(sorted(h for h in heavy if h in sys.modules)), file=sys.stderr)
"""


def prepare(root: Path) -> Path:
    """Return a config under root with two folders, a `.pt` model rule and a journal with a job."""
    # This checkout's daemon, as the measured commands use: an installed whisperd may be another
    # version, with another journal schema.
    sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
    from make_test_checkpoint import make_checkpoint

    from daemon.journal import FileIdentity, open_journal

    checkpoint = make_checkpoint(root / "tiny.pt", seed=0)
    folders = []
    for name in ("lectures", "camera"):
        base = root / name
        for role in ("inbox", "outbox", "archive", "failed"):
            (base / role).mkdir(parents=True)
        folders.append({"name": name, **{role: str(base / role) for role in ("inbox", "outbox", "archive", "failed")}})
    folders[0]["rules"] = [{"match": "french/*", "model": str(checkpoint), "language": "fr"}]
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(root / "state"), "model_dir": str(root / "models"),
        "defaults": {"model": "base"}, "folders": folders,
    }))  # fmt: skip
    journal = open_journal(root / "state")
    journal.enqueue(FileIdentity("lectures", "talk.mp4", 1, 1), priority=0, now=time.time(), skip_if_done=False)
    return config


def measure(argv: list[str]) -> tuple[float, list[str]]:
    """Return the seconds one command took, spawn to exit, and the heavy packages it imported."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(HEAVY), *argv],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    elapsed = time.perf_counter() - started
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("["):
        raise SystemExit(f"whisperd {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr}")
    imported: list[str] = json.loads(lines[-1])
    return elapsed, imported


def _python_alone() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = str(prepare(Path(tmp)))
        commands = {
            "--help": ["--help"],
            "transcribe --help": ["transcribe", "--help"],
            "check-config": ["check-config", config],
            "status": ["status", "--config", config],
            "jobs": ["jobs", "--config", config],
        }
        baseline = min(_python_alone() for _ in range(args.repeat))
        print(f"{'command':<20} {'best s':>7} {'median s':>9}  imports")
        for label, argv in commands.items():
            runs = [measure(argv) for _ in range(args.repeat)]
            times = sorted(t for t, _ in runs)
            imported = ", ".join(runs[-1][1]) or "none of " + "/".join(HEAVY)
            print(f"{label:<20} {times[0]:7.3f} {times[len(times) // 2]:9.3f}  {imported}")
        print(f"(python alone, `python -c pass`: {baseline:.3f} s)")


if __name__ == "__main__":
    main()
