"""The daemon under a real NOTIFY_SOCKET, as systemd would run it: READY, STATUS, WATCHDOG, RELOADING,
STOPPING; two instances sharing one journal; and a CUDA fault ending the process."""

from __future__ import annotations

import itertools
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import media
import pytest
import torch
from conftest import MediaSet, enqueue_file
from daemon_harness import Daemon, drop_file, files_under

from daemon.config import Config
from daemon.errors import GpuFault, TransientError
from daemon.journal import JobState
from daemon.journal.sqlite import SqliteJournal
from daemon.pipeline.transcribe import WhisperEngine
from daemon.worker import Worker

pytestmark = pytest.mark.slow


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket; records every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        """Return the messages that carry this key."""
        return [(t, m) for t, m in list(self.messages) if key in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    """A notify socket in tmp_path."""
    sock = NotifyListener(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_ready_status_reload_and_stopping_reach_systemd(
    make_daemon: Callable[..., Daemon], listener: NotifyListener, media_set: MediaSet, checkpoint: Path
) -> None:
    """READY=1 comes after the preloaded model is in memory; STATUS follows a job; SIGHUP and SIGTERM are announced."""
    daemon = make_daemon(preload_models=[str(checkpoint)])
    daemon.start(env={"NOTIFY_SOCKET": str(listener.path)})
    daemon.wait_for(lambda: listener.with_key("READY"), 10, "READY=1")
    loaded = daemon.event("model_loaded")
    ready_log = daemon.event("ready")
    assert loaded is not None and ready_log is not None and loaded["timestamp"] <= ready_log["timestamp"]
    first_ready = listener.with_key("READY")[0][1]
    assert first_ready["STATUS"] == "idle · 0 queued"

    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "talks" / "talk.mp4")
    daemon.wait_done(1)
    daemon.wait_for(lambda: listener.with_key("STATUS")[-1][1]["STATUS"] == "idle · 0 queued"
                    and any("transcribing" in m["STATUS"] for _, m in listener.with_key("STATUS")), 10,
                    "a transcribing status, then idle again")
    statuses = [m["STATUS"] for _, m in listener.with_key("STATUS")]
    assert any(s.startswith("transcribing media/talks/talk.mp4 ") and s.endswith("· 0 queued") for s in statuses)

    before = len(listener.messages)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(lambda: any("READY" in m for _, m in listener.messages[before:]), 10, "READY after reload")
    after = [m for _, m in listener.messages[before:]]
    reloading = next(i for i, m in enumerate(after) if "RELOADING" in m)
    assert int(after[reloading]["MONOTONIC_USEC"]) > 0
    assert reloading < next(i for i, m in enumerate(after) if "READY" in m)

    assert daemon.stop() == 0
    assert listener.with_key("STOPPING")


def test_watchdog_pings_stop_when_the_worker_hangs(
    make_daemon: Callable[..., Daemon], listener: NotifyListener, tmp_path: Path
) -> None:
    """With WatchdogSec=1 s pings come twice a second, stop while the worker hangs, and resume after."""
    hang = tmp_path / "hang"
    daemon = make_daemon()
    daemon.start(env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000",
                      "WHISPERD_TEST_HANG_FILE": str(hang)})
    time.sleep(3)
    pings = listener.with_key("WATCHDOG")
    assert 4 <= len(pings) <= 8, len(pings)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.9

    hang.touch()
    # The worker reaches the hang within one idle wait; a whole WatchdogSec later the beat is stale.
    daemon.wait_for(lambda: daemon.event("worker_stalled"), 10, "the stall to be noticed")
    stalled_at = time.monotonic()
    time.sleep(2)
    assert [t for t, _ in listener.with_key("WATCHDOG") if t > stalled_at] == []

    hang.unlink()
    resumed_at = time.monotonic()
    daemon.wait_for(lambda: [t for t, _ in listener.with_key("WATCHDOG") if t > resumed_at], 5, "pings again")
    assert daemon.stop() == 0


def test_status_json_shows_the_running_job_its_progress_and_the_queue(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """`whisperd status --json` beside a busy daemon shows the running job with progress and ETA, and the queue."""
    import json
    import subprocess
    import sys

    long_clip = media.tone_wav(tmp_path / "long.wav", seconds=600)  # runs far longer than `status` starts
    daemon = make_daemon()
    daemon.data["defaults"]["sample_len"] = 224  # a job of several seconds
    daemon.write_config(daemon.data)
    daemon.start()
    for name in ("a.wav", "b.wav", "c.wav"):
        drop_file(long_clip, daemon.folder("inbox") / name)
    daemon.wait_for(lambda: any(j.state == JobState.RUNNING and (j.progress or 0) > 0 for j in daemon.jobs())
                    and len(daemon.jobs()) == 3, 60, "one job running with progress, two queued")
    proc = subprocess.run([sys.executable, "-m", "daemon", "status", "--json", "--config", str(daemon.config_path)],
                          capture_output=True, text=True, timeout=30, check=True)
    report: dict[str, Any] = json.loads(proc.stdout)
    [running] = report["running"]
    assert running["path"] in ("a.wav", "b.wav", "c.wav") and 0 < running["progress"] < 1
    assert running["eta_s"] is None or running["eta_s"] >= 0
    assert report["queued"] == 2 and len(report["queue"]) == 2
    assert report["folders"]["media"]["running"] == 1 and report["folders"]["media"]["queued"] == 2
    text = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(daemon.config_path)],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    assert text.startswith("daemon: running (") and "\nmedia: 2 queued, 1 running" in text
    assert "\nrunning: " in text and "\nqueued: " in text
    assert report["daemon"]["state"] == "running" and report["daemon"]["instances"][0]["pid"] == daemon.pid
    daemon.signal(signal.SIGKILL)


def test_two_instances_on_one_journal_never_take_the_same_job(
    make_daemon: Callable[..., Daemon], media_set: MediaSet, tmp_path: Path
) -> None:
    """Two daemons (whisperd@0 and @1) on one config and journal: 30 files, each processed exactly once."""
    clip = media.tone_wav(tmp_path / "clip.wav", seconds=0.5)
    first = make_daemon()
    second = Daemon(tmp_path, first.data)
    second.log_path = tmp_path / "daemon2.log"
    first.start()
    second.start()
    names = [f"batch/clip{i:02d}.wav" for i in range(30)]
    for name in names:
        (first.folder("inbox") / name).parent.mkdir(parents=True, exist_ok=True)
        media.audio_file(first.folder("inbox") / name, clip)
    jobs = first.wait_done(30, timeout=120)
    assert sorted(j.rel_path for j in jobs) == sorted(names) and {j.state for j in jobs} == {JobState.DONE}
    owners = {j.owner for j in jobs}
    assert len(owners) == 2, owners  # both instances took work
    assert files_under(first.folder("archive")) == sorted(names)  # no "clip (1).wav": nothing twice
    assert len(files_under(first.folder("outbox"))) == 60
    started = first.events("job_started", all_runs=True) + second.events("job_started", all_runs=True)
    assert sorted(e["job_id"] for e in started) == sorted(j.id for j in jobs)
    assert first.stop() == 0 and second.stop() == 0


def test_a_cuda_fault_requeues_the_job_and_ends_the_worker(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """A poisoned CUDA context (faked: no GPU here) sends the job back to the queue and raises GpuFault."""
    config = config_factory()
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    path = Path(shutil.copyfile(media_set.speech_mp4, folder.inbox / "talk.mp4"))
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    job_id = enqueue_file(journal, path, "talk.mp4", now=0)
    model = engine.registry.get(config.rule_for("media", "talk.mp4").model)

    def fake_gpu_fault(*_: object) -> None:  # FAKE: stands in for a CUDA kernel fault, no GPU here
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered") \
            if hasattr(torch, "AcceleratorError") else RuntimeError("CUDA error: an illegal memory access")

    handle = model.decoder.register_forward_pre_hook(fake_gpu_fault)
    try:
        with pytest.raises(GpuFault, match="illegal memory access"):
            Worker(lambda: config, journal, engine, owner="test:1", clock=lambda: 10.0).run_once()
    finally:
        handle.remove()
    requeued = journal.get(job_id)
    assert requeued is not None and (requeued.state, requeued.attempts, requeued.crashes) == (JobState.QUEUED, 0, 1)


@pytest.mark.parametrize(
    ("raised", "becomes"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), TransientError),
        (RuntimeError("CUDA out of memory (caching allocator)"), TransientError),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), GpuFault),
        (RuntimeError("shape mismatch"), RuntimeError),
    ],
)
def test_both_engines_map_the_devices_failures_alike(raised: BaseException, becomes: type[BaseException]) -> None:
    """Out of memory is worth a retry, a CUDA fault ends the process, anything else stays what it is
    (faked errors: no GPU here); the sequential and the batched engine share this one mapping."""
    from daemon.pipeline.transcribe import device_faults_mapped

    with pytest.raises(becomes) as caught, device_faults_mapped():
        raise raised
    assert (type(caught.value) is RuntimeError) == (becomes is RuntimeError)
