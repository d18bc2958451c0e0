"""The HTTP API under load, on loopback: a short clip through the API against `whisperd transcribe`,
and requests per second for /healthz and GET /v1/jobs/{id}.

    .venv/bin/python bench/http_load.py                       # real base, CPU, jfk.flac
    .venv/bin/python bench/http_load.py --clips 10 --seconds 10 --clients 16 --out /tmp/http

A real daemon (`whisperd run`, its own process) with the HTTP API on 127.0.0.1 and a bearer token,
on OpenAI's base (from the test packages, bench/weights.py) with the bench's decoding (greedy,
temperature 0, English: bench/variants.py). Measured:

  latency   the clip through POST /v1/audio/transcriptions, --clips times one after another (the
            model resident: what a client waits), against `whisperd transcribe CLIP` --cli-runs
            times (a process per run: interpreter, imports and model load included, as a script
            that calls the CLI per file pays them)
  rps       --clients threads, each on its own keep-alive connection, send GET /healthz, then GET
            /v1/jobs/{id} of a finished async job, for --seconds each or --max-requests in all,
            whichever comes first: requests per second, p50 and p99 latency, non-200 answers

Bounded in count and time; the daemon is stopped at the end. Prints a markdown table; --out PATH
also writes PATH.md and PATH.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from variants import Decoding, whisperd_rule  # noqa: E402

TOKEN = "bench-" + uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _multipart(fields: dict[str, str], name: str, path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Api:
    """One keep-alive connection to the daemon's API."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.headers = {"Authorization": f"Bearer {TOKEN}"}

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, dict[str, str], bytes]:
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def start_daemon(
    work: Path, model: str, model_dir: Path, threads: int, device: str
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start `whisperd run` with the API on a free port; return it, the port and its config file."""
    port = _free_port()
    for sub in ("inbox", "outbox", "failed"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    (work / "tokens").write_text(TOKEN + "\n")
    config = {
        "state_dir": str(work / "state"), "model_dir": str(model_dir), "device": device, "torch_threads": threads,
        "log_format": "json", "preload_models": [model],
        "http": {"listen": f"127.0.0.1:{port}", "tokens_file": str(work / "tokens")},
        "defaults": {**whisperd_rule(Decoding(), model), "output_formats": ["txt", "srt", "json"]},
        "folders": [{"name": "media", "inbox": str(work / "inbox"), "outbox": str(work / "outbox"),
                     "failed": str(work / "failed"), "on_success": "delete"}],
    }  # fmt: skip
    path = work / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    log = (work / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(path)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited {proc.returncode}:\n{(work / 'daemon.log').read_text()[-3000:]}")
        try:
            if Api(port).request("GET", "/readyz")[0] == 200:
                return proc, port, path
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the daemon did not become ready in 300 s")


def api_latency(port: int, clip: Path, runs: int) -> list[float]:
    """Return the wall time of each transcription of the clip through the API (text answer)."""
    api = Api(port)
    body, content_type = _multipart({"response_format": "text"}, "file", clip)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        status, _, answer = api.request("POST", "/v1/audio/transcriptions", body, content_type)
        times.append(time.perf_counter() - start)
        if status != 200:
            raise SystemExit(f"the API answered {status}: {answer[:300]!r}")
    return times


def cli_latency(config: Path, clip: Path, runs: int, work: Path) -> list[float]:
    """Return the wall time of each `whisperd transcribe CLIP` (a process each: imports and load included)."""
    times = []
    for i in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "daemon", "transcribe", str(clip), "--config", str(config),
                        "-o", str(work / f"cli-{i}"), "--output_format", "txt"], cwd=ROOT, check=True,
                       capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def hammer(port: int, path: str, clients: int, seconds: float, max_requests: int) -> dict[str, Any]:
    """Return requests per second, latency percentiles and failures for GET path from `clients` threads."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    budget = threading.Semaphore(max_requests)
    start_gate = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def client(i: int) -> None:
        api = Api(port)
        start_gate.wait()
        while time.perf_counter() < stop_at[0] and budget.acquire(blocking=False):
            began = time.perf_counter()
            try:
                status, _, _ = api.request("GET", path)
            except (OSError, http.client.HTTPException):
                status = 0
                api = Api(port)
            latencies[i].append(time.perf_counter() - began)
            if status != 200:
                failures[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at.append(time.perf_counter() + seconds)
    began = time.perf_counter()
    start_gate.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    every = sorted(t for per in latencies for t in per)
    return {"path": path, "clients": clients, "requests": len(every), "wall_s": round(wall, 2),
            "rps": round(len(every) / wall, 1), "p50_ms": round(1000 * every[len(every) // 2], 2),
            "p99_ms": round(1000 * every[int(len(every) * 0.99)], 2), "failures": sum(failures)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, default=ROOT.parent / "shared" / "audio" / "jfk.flac")
    parser.add_argument("--clips", type=int, default=5, help="API transcriptions of the clip (default 5)")
    parser.add_argument("--cli-runs", type=int, default=3, help="`whisperd transcribe` runs (default 3)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent connections for the rps runs")
    parser.add_argument("--seconds", type=float, default=5.0, help="each rps run lasts at most this long")
    parser.add_argument("--max-requests", type=int, default=20000, help="each rps run sends at most this many")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the daemon")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache",
                        help="converted models, made once (default bench/.cache, as compare.py)")
    parser.add_argument("--out", type=Path, help="also write OUT.md and OUT.json")
    args = parser.parse_args(argv)

    weights = subprocess.run([sys.executable, str(ROOT / "bench" / "weights.py"), "base", str(args.cache)],
                             capture_output=True, text=True, cwd=ROOT, check=True)
    found = json.loads(weights.stdout.strip().splitlines()[-1])
    model, model_dir = found["ct2"], Path(found["model_dir"])
    with tempfile.TemporaryDirectory(prefix="whisperd-http-load-") as tmp:
        work = Path(tmp)
        proc, port, config = start_daemon(work, model, model_dir, args.threads, args.device)
        try:
            api_times = api_latency(port, args.clip, args.clips)
            api = Api(port)
            body, content_type = _multipart({}, "file", args.clip)
            _, _, answer = api.request("POST", "/v1/jobs", body, content_type)
            job_id = json.loads(answer)["id"]
            while json.loads(api.request("GET", f"/v1/jobs/{job_id}")[2])["state"] not in ("done", "failed"):
                time.sleep(0.1)
            rps = [hammer(port, "/healthz", args.clients, args.seconds, args.max_requests),
                   hammer(port, f"/v1/jobs/{job_id}", args.clients, args.seconds, args.max_requests)]
        finally:
            proc.terminate()
            proc.wait(60)
        cli_times = cli_latency(config, args.clip, args.cli_runs, work)

    result = {
        "clip": args.clip.name, "device": args.device, "threads": args.threads,
        "model": "base (OpenAI's, CTranslate2 → whisperd)",
        "api_s": [round(t, 3) for t in api_times], "api_median_s": round(statistics.median(api_times), 3),
        "cli_s": [round(t, 3) for t in cli_times], "cli_median_s": round(statistics.median(cli_times), 3),
        "rps": rps, "cpus": os.cpu_count(),
    }  # fmt: skip
    lines = [
        f"HTTP API on loopback, {result['model']}, {args.device}, {args.threads} torch threads, {os.cpu_count()} CPUs",
        "",
        "| latency of one clip | median s | runs (s) |",
        "|---|---:|---|",
        f"| POST /v1/audio/transcriptions ({args.clip.name}, model resident) | {result['api_median_s']} | "
        f"{', '.join(map(str, result['api_s']))} |",
        f"| `whisperd transcribe {args.clip.name}` (a process per run) | {result['cli_median_s']} | "
        f"{', '.join(map(str, result['cli_s']))} |",
        "",
        "| endpoint | clients | requests | rps | p50 ms | p99 ms | non-200 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| GET {r['path'].split('/v1/jobs/')[0] or '/v1/jobs/{id}'} | {r['clients']} | {r['requests']} | "
          f"{r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['failures']} |" for r in rps],
        "",
        f"The API answers {result['cli_median_s'] / result['api_median_s']:.1f}x sooner than the CLI per clip.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.with_suffix(".md").write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
