"""Idle cost of the daemon with a long history: CPU used while nothing arrives, with N journal rows.

Fills a journal with N finished jobs (done and failed, across folders), starts `whisperd run` on
it with nothing to do, lets it settle, then reads its CPU time (user + system, /proc/PID/stat)
over a measuring window and prints the share of one core.

    .venv/bin/python bench/idle.py                  # 1,000,000 rows, 60 s
    .venv/bin/python bench/idle.py --rows 12000 --seconds 30

Target (issue "Faults and limits"): below 1 % of a core with 1,000,000 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fill(state: Path, rows: int) -> None:
    """Write `rows` finished jobs into a fresh journal under state."""
    from daemon.journal.sqlite import SqliteJournal

    journal = SqliteJournal(state / "journal.sqlite3")
    now = time.time()
    with journal._write() as db:
        db.executemany(
            "INSERT INTO jobs (folder, rel_path, size, mtime_ns, state, next_attempt_at, created_at, updated_at,"
            " finished_at, disposed_path) VALUES (?, ?, 1000, ?, ?, ?, ?, ?, ?, ?)",
            ((f"folder{i % 4}", f"old/{i}.mp4", i, "done" if i % 10 else "failed", now, now, now, now - i,
              f"/archive/{i}.mp4") for i in range(rows)),
        )
    journal.close()


def cpu_seconds(pid: int) -> float:
    """Return a process's user + system CPU time so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=15.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "state").mkdir()
        started = time.monotonic()
        fill(root / "state", args.rows)
        print(f"journal with {args.rows:,} rows written in {time.monotonic() - started:.0f} s")
        folders = []
        for i in range(4):
            paths = {role: str(root / f"f{i}" / role) for role in ("inbox", "outbox", "archive", "failed")}
            for path in paths.values():
                Path(path).mkdir(parents=True)
            folders.append({"name": f"folder{i}", **paths})
        config = {"state_dir": str(root / "state"), "model_dir": str(root / "models"), "device": "cpu",
                  "log_format": "json", "defaults": {"model": "tiny"}, "folders": folders}
        (root / "config.yaml").write_text(json.dumps(config))
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(root / "config.yaml")],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(root / "log", "wb"))  # noqa: SIM115
        try:
            time.sleep(args.settle)
            if proc.poll() is not None:
                raise SystemExit((root / "log").read_text()[-3000:])
            before, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.seconds)
            used, wall = cpu_seconds(proc.pid) - before, time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        print(f"idle CPU with {args.rows:,} rows: {used:.2f} s of CPU in {wall:.0f} s = {100 * used / wall:.2f} % "
              "of one core")


if __name__ == "__main__":
    main()
