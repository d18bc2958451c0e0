"""Operator commands beside a running daemon: retry, enqueue, jobs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import MediaSet
from daemon_harness import Daemon, drop_file, files_under

from daemon.journal import JobState

pytestmark = pytest.mark.slow


def whisperd(daemon: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a whisperd command against the daemon's config, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args, "--config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=60, input=stdin,
    )


def test_retry_requeues_a_failed_file_once_its_cause_is_fixed(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """A file failed by a too tight extract_timeout goes back to the inbox with `whisperd retry JOB` and is done."""
    daemon = make_daemon({"max_attempts": 1}, extract_timeout=0.001)
    daemon.start()
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "talks" / "talk.mp4")
    [failed] = daemon.wait_done(1)
    assert failed.state == JobState.FAILED
    listed = json.loads(whisperd(daemon, "jobs", "--state", "failed", "--json").stdout)
    assert [(j["id"], j["path"], j["stage"]) for j in listed] == [(failed.id, "talks/talk.mp4", "extract")]

    daemon.write_config({**daemon.data, "extract_timeout": 3600})  # the operator fixes the cause …
    daemon.signal(signal.SIGHUP)  # … and reloads
    daemon.wait_for(lambda: daemon.event("reloaded"), 20, "the reload")
    result = whisperd(daemon, "retry", str(failed.id))
    assert result.returncode == 0, result.stderr
    assert f"queued again: #{failed.id} media/talks/talk.mp4" in result.stdout
    [done] = daemon.wait_done(1)
    assert (done.id, done.state, done.attempts) == (failed.id, JobState.DONE, 0)
    assert files_under(daemon.folder("failed")) == []
    assert files_under(daemon.folder("outbox")) == ["talks/talk.srt", "talks/talk.txt"]
    assert daemon.stop() == 0


def test_retry_names_what_it_cannot_find(make_daemon: Callable[..., Daemon]) -> None:
    """Retrying a job that does not exist fails with a message and changes nothing."""
    daemon = make_daemon().start()
    result = whisperd(daemon, "retry", "999")
    assert result.returncode == 1 and "no failed job matches: 999" in result.stderr
    result = whisperd(daemon, "retry")
    assert result.returncode == 1 and "--folder NAME" in result.stderr
    assert daemon.stop() == 0


def test_enqueue_list_with_per_item_language_and_task(
    make_daemon: Callable[..., Daemon], media_set: MediaSet, tmp_path: Path
) -> None:
    """JSON lines give each file its own language or task; files outside the inbox are copied in."""
    daemon = make_daemon({"output_formats": ["json"]}).start()
    batch = tmp_path / "batch"
    batch.mkdir()
    for name in ("one.mp4", "two.mp4", "three.mp4"):
        shutil.copyfile(media_set.speech_mp4, batch / name)
    listing = "\n".join([
        json.dumps({"path": str(batch / "one.mp4"), "language": "fr"}),
        json.dumps({"path": str(batch / "two.mp4"), "task": "translate", "language": "de"}),
        str(batch / "three.mp4"),
        "# comments and blank lines are skipped",
        "",
    ])  # fmt: skip
    result = whisperd(daemon, "enqueue", "--list", "-", "--folder", "media", stdin=listing)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("queued: #") == 3
    jobs = {j.rel_path: j for j in daemon.wait_done(3)}
    assert jobs["one.mp4"].overrides == {"language": "fr"}
    assert jobs["two.mp4"].overrides == {"task": "translate", "language": "de"}
    outbox = daemon.folder("outbox")
    languages: dict[str, Any] = {p.stem: json.loads(p.read_text())["language"] for p in outbox.iterdir()}
    assert languages["one"] == "fr" and languages["two"] == "de"
    assert sorted(files_under(batch)) == ["one.mp4", "three.mp4", "two.mp4"]  # copies were taken, not these
    assert daemon.stop() == 0


def test_enqueue_refuses_bad_items_and_queues_nothing(
    make_daemon: Callable[..., Daemon], media_set: MediaSet, tmp_path: Path
) -> None:
    """An unknown language or a file outside every inbox without --folder: every problem reported, nothing queued."""
    daemon = make_daemon().start()
    outside = Path(shutil.copyfile(media_set.speech_mp4, tmp_path / "outside.mp4"))
    listing = json.dumps({"path": str(outside), "language": "klingon"})
    result = whisperd(daemon, "enqueue", "--list", "-", str(tmp_path / "missing.mp4"), stdin=listing)
    assert result.returncode == 1
    assert "missing.mp4: not a regular file" in result.stderr
    assert "outside.mp4: outside every inbox" in result.stderr
    result = whisperd(daemon, "enqueue", "--list", "-", "--folder", "media", stdin=listing)
    assert result.returncode == 1 and "unknown language 'klingon'" in result.stderr
    assert daemon.jobs() == [] and files_under(daemon.folder("inbox")) == []
    assert daemon.stop() == 0
