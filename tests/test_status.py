"""`whisperd status` tells the truth about the daemon, and `pause`/`resume`/idle unload do what they say.

Real daemons on real folders and journals; the commands run as a sysadmin runs them, in a shell
pipeline too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import media
import pytest
from conftest import MediaSet
from daemon_harness import ROOT, Daemon, drop_file

from daemon.journal import FileIdentity, JobState, open_journal
from daemon.journal.sqlite import SqliteJournal
from daemon.operations import NOT_RESPONDING_AFTER_S, STOPPED_AFTER_S, daemon_state


def whisperd(daemon: Daemon, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Return a finished `whisperd <argv> --config <the daemon's config>`."""
    return subprocess.run([sys.executable, "-m", "daemon", *argv, "--config", str(daemon.config_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=check)


def status(daemon: Daemon) -> tuple[str, dict[str, Any]]:
    """Return `whisperd status` as text and as JSON."""
    return whisperd(daemon, "status").stdout, json.loads(whisperd(daemon, "status", "--json").stdout)


def busy_daemon(make_daemon: Callable[..., Daemon], tmp_path: Path, **top: Any) -> Daemon:
    """Return a started daemon working on a 600 s clip (decoded far longer than any check here takes)."""
    daemon = make_daemon(**top)
    daemon.data["defaults"]["sample_len"] = 224
    daemon.write_config(daemon.data)
    daemon.start()
    drop_file(media.tone_wav(tmp_path / "long.wav", seconds=600), daemon.folder("inbox") / "long.wav")
    daemon.wait_for(lambda: any(j.state == JobState.RUNNING for j in daemon.jobs()), 60, "the long job to run")
    return daemon


@pytest.mark.slow
def test_status_says_running_then_stopped_after_kill_9_and_never_shows_a_dead_daemons_job_running(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """kill -9 leaves a running job and a heartbeat behind: status says stopped, the job interrupted."""
    daemon = busy_daemon(make_daemon, tmp_path)
    text, report = status(daemon)
    assert text.startswith(f"daemon: running ({daemon.owner} since "), text
    assert "\nrunning: #1 media/long.wav" in text
    assert report["daemon"]["state"] == "running" and report["daemon"]["instances"][0]["pid"] == daemon.pid
    assert [j["path"] for j in report["running"]] == ["long.wav"]
    daemon.kill()
    text, report = status(daemon)
    assert text.startswith("daemon: stopped\n"), text
    assert "\nmedia: 0 queued, 0 running, 0 retrying, 1 interrupted, 0 done and 0 failed in 24 h\n" in text
    assert "\nrunning: nothing" in text and "\nrunning: #" not in text
    assert ("\ninterrupted: #1 media/long.wav (its daemon is gone or not responding; it is tried again when "
            "whisperd starts again on that host)") in text
    assert report["daemon"] == {"state": "stopped", "instances": []}
    assert report["running"] == [] and [j["path"] for j in report["interrupted"]] == ["long.wav"]


def test_a_daemon_whose_beat_stopped_is_not_responding_since_its_last_beat(tmp_path: Path) -> None:
    """A live process that stopped beating (a hung worker stops the beat) is `not responding since …`."""
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    me = f"{socket.gethostname()}:{os.getpid()}"
    journal.beat_instance(me, now=1000.0, started_at=900.0, models=["base"])
    assert daemon_state(journal, 1000.0 + 5)["state"] == "running"
    late = daemon_state(journal, 1000.0 + NOT_RESPONDING_AFTER_S + 1)
    assert late["state"] == "not_responding" and late["since"] == "1970-01-01T00:16:40+00:00"
    gone = subprocess.Popen(["true"])
    gone.wait()
    other = SqliteJournal(tmp_path / "other.sqlite3")
    other.beat_instance(f"{socket.gethostname()}:{gone.pid}", now=1000.0, started_at=900.0, models=[])
    assert daemon_state(other, 1001.0) == {"state": "stopped", "instances": []}
    # Killed but not yet reaped by its parent (a zombie): gone, not running.
    zombie = subprocess.Popen(["true"])
    time.sleep(0.5)  # it has exited; nobody has waited for it yet
    unreaped = SqliteJournal(tmp_path / "zombie.sqlite3")
    unreaped.beat_instance(f"{socket.gethostname()}:{zombie.pid}", now=1000.0, started_at=900.0, models=[])
    assert daemon_state(unreaped, 1001.0)["state"] == "stopped"
    zombie.wait()
    # Another host's daemon cannot be asked by pid: silent for STOPPED_AFTER_S, it is taken as gone.
    remote = SqliteJournal(tmp_path / "remote.sqlite3")
    remote.beat_instance("elsewhere.example:4242", now=1000.0, started_at=900.0, models=[])
    assert daemon_state(remote, 1000.0 + 60)["state"] == "not_responding"
    assert daemon_state(remote, 1000.0 + STOPPED_AFTER_S + 1)["state"] == "stopped"


@pytest.mark.slow
def test_pause_stops_claiming_while_files_are_still_queued_and_resume_lets_them_through(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """`whisperd pause` (all, or one folder): new files queue but wait; `resume` lets them through."""
    daemon = make_daemon()
    daemon.start()
    assert whisperd(daemon, "pause").stdout == "paused every folder: no new file is started; the running one finishes\n"
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "a.mp4")
    daemon.wait_for(lambda: daemon.jobs(), 20, "the file to be queued")
    time.sleep(3)
    [job] = daemon.jobs()
    assert job.state == JobState.QUEUED
    text, report = status(daemon)
    assert "; paused: paused by the operator (whisperd resume)" in text, text
    assert report["folders"]["media"]["paused"] == "paused by the operator (whisperd resume)"
    assert report["operator_paused"] == ["*"]
    assert whisperd(daemon, "pause").stdout == "every folder was already paused\n"
    result = whisperd(daemon, "resume", "--folder", "media")
    assert "every folder is still paused" in result.stdout  # the whole-daemon pause is lifted as a whole
    assert whisperd(daemon, "resume").stdout == "resumed every folder\n"
    daemon.wait_done(1, timeout=60)
    # One folder: the same, and its name is checked before anything is written.
    assert whisperd(daemon, "pause", "--folder", "media").stdout.startswith("paused folder media")
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "b.mp4")
    daemon.wait_for(lambda: len(daemon.jobs()) == 2, 20, "the second file to be queued")
    time.sleep(3)
    assert daemon.jobs([JobState.QUEUED])
    refused = whisperd(daemon, "pause", "--folder", "nosuch", check=False)
    assert refused.returncode == 2 and "no folder named nosuch" in refused.stderr
    assert whisperd(daemon, "resume", "--folder", "media").stdout == "resumed folder media\n"
    daemon.wait_done(2, timeout=60)
    assert daemon.stop() == 0


@pytest.mark.slow
def test_an_idle_model_is_unloaded_shown_so_and_loaded_again_for_the_next_file(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """model_idle_unload: after a file and the idle time, the model leaves memory; the next file reloads it.

    While paused, queued files do not keep it in memory either.
    """
    daemon = make_daemon(model_idle_unload=2)
    daemon.start()
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "a.mp4")
    daemon.wait_done(1, timeout=60)
    daemon.wait_for(lambda: daemon.event("model_unloaded"), 20, "the idle model to be unloaded")
    daemon.wait_for(lambda: "no model in memory" in whisperd(daemon, "status").stdout, 20, "status to say so")
    loads = len(daemon.events("model_loaded"))
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "b.mp4")
    daemon.wait_done(2, timeout=60)
    assert len(daemon.events("model_loaded")) == loads + 1
    # Paused (the GPU lent to another service): a file waiting in the queue does not hold the model.
    whisperd(daemon, "pause")
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "c.mp4")
    daemon.wait_for(lambda: len(daemon.jobs()) == 3, 20, "the third file to be queued")
    unloads = len(daemon.events("model_unloaded"))
    daemon.wait_for(lambda: len(daemon.events("model_unloaded")) > unloads, 20, "the paused daemon's model to go")
    assert daemon.jobs([JobState.QUEUED])
    whisperd(daemon, "resume")
    daemon.wait_done(3, timeout=60)
    assert len(daemon.events("model_loaded")) == loads + 2
    assert daemon.stop() == 0


def test_status_into_a_pipe_closed_early_ends_quietly(make_daemon: Callable[..., Daemon]) -> None:
    """`whisperd status | head`, `whisperd jobs | head` with 3000 jobs: no BrokenPipeError traceback."""
    daemon = make_daemon()
    journal = open_journal(Path(daemon.data["state_dir"]))
    for n in range(3000):  # a report longer than a pipe's buffer
        journal.enqueue(FileIdentity("media", f"queued/file{n:04d}.wav", 1, n), priority=0, now=float(n),
                        skip_if_done=False)
    for command, first in (("status --json", '{\n  "daemon'), ("jobs", "    ID  STA")):
        shell = subprocess.run(
            f"{sys.executable} -m daemon {command} --config {daemon.config_path} | head -c 11",
            shell=True, capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
        assert shell.stdout == first and shell.stderr == "", (command, shell.stdout, shell.stderr)
