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

from daemon import operations
from daemon.journal import FileIdentity, JobState, open_journal

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

    again = whisperd(daemon, "retry", str(done.id))  # a job that is not failed: its state, not "no match"
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f"not retried: #{done.id} media/talks/talk.mp4: not failed: it is done (to process it again: "
        "whisperd enqueue FILE)"
    ]
    listed = whisperd(daemon, "jobs").stdout.splitlines()
    assert listed[0].split() == ["ID", "STATE", "UPDATED", "TRIES", "FILE"]
    # The try that succeeded counts: done at the first try after the retry is 1, not 0.
    assert listed[1].split()[:2] == [str(done.id), "done"] and listed[1].split()[4:] == ["1", "media/talks/talk.mp4"]
    assert json.loads(whisperd(daemon, "jobs", "--json").stdout)[0]["attempts"] == 1
    assert daemon.stop() == 0


def test_retry_names_what_it_cannot_find(make_daemon: Callable[..., Daemon]) -> None:
    """Retrying a job that does not exist fails with a message and changes nothing."""
    daemon = make_daemon().start()
    result = whisperd(daemon, "retry", "999")
    assert result.returncode == 1 and "no job matches: 999" in result.stderr
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


def test_enqueue_queues_the_valid_paths_and_lists_the_others(
    make_daemon: Callable[..., Daemon], media_set: MediaSet, tmp_path: Path
) -> None:
    """Among bad items (an unknown language, a missing file, a file outside every inbox) the valid one is
    queued all the same; each bad one is listed with its reason, and the command exits 1."""
    daemon = make_daemon({"stability_delay": 3600}).start()  # only `enqueue` queues here, not the watcher
    assert whisperd(daemon, "jobs").stdout == "no jobs in the journal yet\n"
    outside = Path(shutil.copyfile(media_set.speech_mp4, tmp_path / "outside.mp4"))
    good, klingon = (daemon.folder("inbox") / name for name in ("good.mp4", "klingon.mp4"))
    for path in (good, klingon):
        shutil.copyfile(media_set.speech_mp4, path)
    listing = json.dumps({"path": str(klingon), "language": "klingon"})
    result = whisperd(daemon, "enqueue", str(tmp_path / "missing.mp4"), str(outside), str(good), "--list", "-",
                      stdin=listing)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"not queued: {tmp_path / 'missing.mp4'}: not a regular file",
        f"not queued: {outside}: outside every inbox; give --folder NAME to copy it into one",
        f"not queued: {klingon}: language: unknown language 'klingon'; did you mean lingala, ukrainian, "
        "mongolian? use 'auto', 'track', a code like 'en' or 'fr', or one of whisper's language names like 'english'",
    ]
    assert result.stdout.startswith("queued: #") and result.stdout.rstrip().endswith("media/good.mp4")
    [job] = daemon.wait_done(1)
    assert (job.rel_path, job.state) == ("good.mp4", JobState.DONE)
    assert whisperd(daemon, "jobs", "--state", "failed").stdout == "no jobs match these filters\n"
    assert daemon.stop() == 0


def test_tries_count_as_they_happened_and_an_earlier_error_is_named_so(tmp_path: Path) -> None:
    """`jobs` shows the try a job is on or succeeded at; while it runs, the last try's error is
    `previous_error`, not its error."""
    journal = open_journal(tmp_path / "state")
    journal.enqueue(FileIdentity("media", "talk.mp4", 1, 1), priority=0, now=1.0, skip_if_done=False)
    job = journal.claim(["media"], now=2.0, owner="host:1")
    assert job is not None and operations.job_view(job, 2.0)["attempts"] == 1  # the first try, running
    journal.mark_retry(job.id, "ffmpeg timed out", "extract", now=3.0, due=4.0)
    waiting = operations.job_view(journal.get(job.id), 3.0)  # type: ignore[arg-type]
    assert (waiting["state"], waiting["attempts"], waiting["error"]) == ("retry_wait", 1, "ffmpeg timed out")
    again = journal.claim(["media"], now=5.0, owner="host:1")
    assert again is not None
    running = operations.job_view(again, 5.0)
    assert (running["attempts"], running["previous_error"], running["previous_stage"]) == (2, "ffmpeg timed out",
                                                                                            "extract")
    assert "error" not in running
    journal.mark_done(again.id, None, now=6.0)
    done = journal.get(again.id)
    assert done is not None and operations.job_view(done, 6.0)["attempts"] == 2  # succeeded at the second try
    assert operations.format_jobs([done]).splitlines()[1].split()[4] == "2"
