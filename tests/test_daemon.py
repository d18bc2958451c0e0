"""The daemon end to end: `whisperd run` as a subprocess on real folders, ffmpeg and whisper code."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import media
import pytest
from conftest import DAEMON_OUTPUTS as OUTPUTS
from conftest import MediaSet, enqueue_file
from daemon_harness import ROOT, Daemon, drop_file, files_under

from daemon.journal import JobState, open_journal
from daemon.worker import CRASH_LIMIT

pytestmark = pytest.mark.slow



def _inotify_instances(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == "anon_inode:inotify":
                count += 1
        except OSError:
            continue
    return count


def test_slow_writer_makes_one_job_after_the_writes_stop(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """A file appended to every 50 ms for 10 s becomes exactly one job, started after the last write."""
    daemon = make_daemon().start()
    data = media_set.speech_mp4.read_bytes()
    target = daemon.folder("inbox") / "slow.mp4"
    chunks = 200
    step = len(data) // chunks + 1
    with open(target, "wb") as handle:
        for i in range(0, len(data), step):
            handle.write(data[i:i + step])
            handle.flush()
            time.sleep(0.05)
    last_write = time.time()
    jobs = daemon.wait_done(1)
    assert len(daemon.jobs()) == 1
    job = jobs[0]
    assert job.state == JobState.DONE and job.size == len(data)
    assert job.created_at >= last_write - 0.05
    assert files_under(daemon.folder("outbox")) == ["slow.srt", "slow.txt"]
    assert daemon.stop() == 0


def test_part_file_renamed_into_place_is_processed_once(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """A copy written as name.part and renamed to name.mp4 yields one job for name.mp4 only."""
    daemon = make_daemon().start()
    inbox = daemon.folder("inbox")
    part = inbox / "talk.mp4.part"
    shutil.copyfile(media_set.speech_mp4, part)
    time.sleep(1.5)  # three stability delays: a .part must never be picked up however long it sits
    assert daemon.jobs() == []
    os.rename(part, inbox / "talk.mp4")
    daemon.wait_done(1)
    assert [(j.rel_path, j.state) for j in daemon.jobs()] == [("talk.mp4", JobState.DONE)]
    assert files_under(daemon.folder("archive")) == ["talk.mp4"]
    assert daemon.stop() == 0


def test_two_hundred_files_in_nested_folders(
    make_daemon: Callable[..., Daemon], media_set: MediaSet, tmp_path: Path
) -> None:
    """200 files dropped at once into subfolders: 200 done jobs, mirrored outputs and archives, no duplicates."""
    clip = media.tone_wav(tmp_path / "clip.wav", seconds=0.5)
    daemon = make_daemon().start()
    inbox = daemon.folder("inbox")
    names = [f"group{i % 5}/day{i % 3}/clip{i:03d}.wav" for i in range(200)]
    for name in names:
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip, inbox / name)
    jobs = daemon.wait_done(200, timeout=400)
    assert len(daemon.jobs()) == 200
    assert {j.state for j in jobs} == {JobState.DONE}
    assert sorted(j.rel_path for j in jobs) == sorted(names)
    expected_outputs = sorted(n.removesuffix(".wav") + f".{ext}" for n in names for ext in OUTPUTS)
    assert files_under(daemon.folder("outbox")) == expected_outputs
    assert files_under(daemon.folder("archive")) == sorted(names)
    assert files_under(inbox) == []  # the processing area is emptied too
    assert daemon.stop() == 0


def test_poll_mode_uses_no_inotify_and_rescan_finds_missed_files(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """Poll mode processes new files with no inotify instance; a file present at start is found by the rescan."""
    daemon = make_daemon({"watch": "poll", "poll_interval": 0.3})
    shutil.copyfile(media_set.speech_mp4, daemon.folder("inbox") / "before-start.mp4")
    daemon.start()
    assert _inotify_instances(daemon.pid) == 0
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "sub" / "while-running.mp4")
    daemon.wait_done(2)
    assert sorted(j.rel_path for j in daemon.jobs()) == ["before-start.mp4", "sub/while-running.mp4"]
    assert _inotify_instances(daemon.pid) == 0
    assert daemon.stop() == 0


def test_periodic_rescan_picks_up_what_no_watcher_reported(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """With the poller effectively off (1 h interval), the periodic rescan still finds a new file."""
    daemon = make_daemon({"watch": "poll", "poll_interval": 3600}, rescan_interval=1).start()
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "missed.mp4")
    daemon.wait_done(1, timeout=30)
    assert files_under(daemon.folder("outbox")) == ["missed.srt", "missed.txt"]
    assert daemon.stop() == 0


def test_kill_9_mid_job_then_restart_completes_once(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """kill -9 while a job runs; after a restart it completes once: one output set, one archived original."""
    long_clip = media.tone_wav(tmp_path / "long.wav", seconds=75)
    daemon = make_daemon()
    daemon.data["defaults"]["sample_len"] = 32
    daemon.write_config(daemon.data)
    daemon.start()
    drop_file(long_clip, daemon.folder("inbox") / "lecture.wav")
    daemon.wait_for(
        lambda: any(j.state == JobState.RUNNING and j.processing_path for j in daemon.jobs()),
        30, "the job to be running",
    )
    daemon.kill()
    [job] = daemon.jobs()
    assert job.state == JobState.RUNNING  # what a crash leaves behind
    daemon.start()
    [done] = daemon.wait_done(1)
    assert (done.id, done.state, done.attempts) == (job.id, JobState.DONE, 0)
    assert daemon.event("job_requeued")["job_id"] == job.id  # type: ignore[index]
    assert files_under(daemon.folder("outbox")) == ["lecture.srt", "lecture.txt"]
    assert (daemon.folder("outbox") / "lecture.srt").read_text().startswith("1\n")
    assert files_under(daemon.folder("archive")) == ["lecture.wav"]
    assert files_under(daemon.folder("inbox")) == []
    assert daemon.stop() == 0


def test_an_orphan_in_the_processing_area_returns_to_the_inbox(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """A file left in a processing area with no job (a lost journal) goes back to the inbox and is processed."""
    daemon = make_daemon()
    orphan = daemon.folder("inbox") / ".whisperd" / "processing" / "41" / "sub" / "talk.mp4"
    orphan.parent.mkdir(parents=True)
    shutil.copyfile(media_set.speech_mp4, orphan)
    daemon.start()
    [job] = daemon.wait_done(1)
    assert (job.rel_path, job.state) == ("sub/talk.mp4", JobState.DONE)
    assert daemon.event("returned_to_inbox")["file"] == "sub/talk.mp4"  # type: ignore[index]
    assert files_under(daemon.folder("inbox")) == []
    assert daemon.stop() == 0


def test_not_media_fails_on_first_attempt_while_others_flow(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """A text file named .mp4 goes to failed/ with an error file at once; a good file beside it is done."""
    daemon = make_daemon().start()
    inbox = daemon.folder("inbox")
    drop_file(media_set.not_media, inbox / "docs" / "notes.mp4")
    drop_file(media_set.speech_mp4, inbox / "docs" / "talk.mp4")
    jobs = {j.rel_path: j for j in daemon.wait_done(2)}
    bad, good = jobs["docs/notes.mp4"], jobs["docs/talk.mp4"]
    assert (bad.state, bad.attempts, bad.last_stage) == (JobState.FAILED, 1, "probe")
    assert good.state == JobState.DONE
    assert files_under(daemon.folder("failed")) == ["docs/notes.mp4", "docs/notes.mp4.error.txt"]
    report = (daemon.folder("failed") / "docs" / "notes.mp4.error.txt").read_text()
    assert "Reason:      not a media file ffprobe can read" in report
    assert "Stage:       probe" in report and "Attempts:    1 of 5" in report
    assert "ffprobe" in report and "Invalid data found" in report
    assert (daemon.folder("failed") / "docs" / "notes.mp4").read_bytes() == media_set.not_media.read_bytes()
    assert daemon.stop() == 0


def test_an_unusable_outbox_pauses_the_folder_and_fails_no_file(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """With the outbox unusable the folder pauses (reason in the journal for `status`, one event); the file
    waits in the inbox untouched, no attempt counted, and is done once the outbox is back."""
    daemon = make_daemon()
    # Root can write to read-only directories, so make the outbox unusable for anyone: a file
    # stands where the outbox directory should be.
    outbox = daemon.folder("outbox")
    outbox.write_text("not a directory")
    daemon.start()
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "talk.mp4")
    daemon.wait_for(lambda: daemon.jobs(), 20, "the file to be queued")
    time.sleep(2)
    [paused] = daemon.events("folder_paused")
    assert paused["folder"] == "media" and f"the outbox {outbox} is not a folder" in paused["reason"]
    [waiting] = daemon.jobs()
    assert (waiting.state, waiting.attempts) == (JobState.QUEUED, 0)
    assert files_under(daemon.folder("inbox")) == ["talk.mp4"]  # never taken
    status = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(daemon.config_path)],
                            capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert ("\nmedia: 1 queued, 0 running, 0 retrying, 0 done and 0 failed in 24 h; "
            f"paused: the outbox {outbox} is not a folder") in status
    outbox.unlink()
    [done] = daemon.wait_done(1, timeout=60)
    assert (done.state, done.attempts) == (JobState.DONE, 0)
    assert daemon.event("folder_resumed") is not None and not daemon.events("job_retry")
    assert files_under(outbox) == ["talk.srt", "talk.txt"]
    assert daemon.stop() == 0


def test_transient_fault_exhausts_attempts_into_failed(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """After max_attempts transient failures of the file's own (ffmpeg past its timeout) it lands in failed/."""
    daemon = make_daemon({"max_attempts": 2}, extract_timeout=0.001)
    daemon.start()
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "talk.mp4")
    [job] = daemon.wait_done(1, timeout=30)
    assert (job.state, job.attempts) == (JobState.FAILED, 2)
    report = (daemon.folder("failed") / "talk.mp4.error.txt").read_text()
    assert "Attempts:    2 of 2" in report and "did not finish within 0.001 s" in report
    assert daemon.stop() == 0


def test_sighup_adds_a_folder_and_a_broken_config_keeps_the_old_one(
    make_daemon: Callable[..., Daemon], media_set: MediaSet, tmp_path: Path
) -> None:
    """SIGHUP with a new folder starts watching it; SIGHUP with a broken config logs every error and runs on."""
    daemon = make_daemon().start()
    data = daemon.data
    second = {**data["folders"][0], "name": "second"}
    for role in ("inbox", "outbox", "archive", "failed"):
        second[role] = str(tmp_path / "second" / role)
    data["folders"].append(second)
    daemon.write_config(data)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(lambda: daemon.event("reloaded"), 20, "the reload")
    drop_file(media_set.speech_mp4, daemon.folder("inbox", "second") / "new.mp4")
    daemon.wait_done(1)
    assert files_under(daemon.folder("outbox", "second")) == ["new.srt", "new.txt"]

    broken = {**data, "device": "gpu", "folders": [*data["folders"], {"name": "x"}]}
    daemon.write_config(broken)
    daemon.signal(signal.SIGHUP)
    failure = daemon.wait_for(lambda: daemon.event("reload_failed"), 20, "the failed reload")
    assert any(p.startswith("device:") for p in failure["problems"])
    assert any(p.startswith("folders[2].inbox") for p in failure["problems"])
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "still-working.mp4")
    daemon.wait_done(2)
    assert "still-working.srt" in files_under(daemon.folder("outbox"))
    assert daemon.stop() == 0


def test_sigterm_during_a_job_exits_zero_and_loses_nothing(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """SIGTERM mid-job exits 0 within the grace period; the job is queued again and done after a restart."""
    long_clip = media.tone_wav(tmp_path / "long.wav", seconds=150)
    daemon = make_daemon(shutdown_grace=0.5)
    daemon.data["defaults"]["sample_len"] = 224  # every window decodes its longest: a job of several seconds
    daemon.write_config(daemon.data)
    daemon.start()
    drop_file(long_clip, daemon.folder("inbox") / "long.wav")
    daemon.wait_for(lambda: any(j.state == JobState.RUNNING and (j.progress or 0) > 0 for j in daemon.jobs()),
                    60, "the job to make progress")
    started = time.monotonic()
    assert daemon.stop(timeout=30) == 0
    assert time.monotonic() - started < 15
    [job] = daemon.jobs()
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)  # handed back, not counted as a failure
    # Cancelled between two windows, or handed back while a window ran on: either way, given back.
    assert daemon.event("job_requeued")["reason"].startswith("shutdown")  # type: ignore[index]
    daemon.start()
    [done] = daemon.wait_done(1, timeout=90)
    assert done.state == JobState.DONE
    assert files_under(daemon.folder("outbox")) == ["long.srt", "long.txt"]
    assert files_under(daemon.folder("archive")) == ["long.wav"]
    assert daemon.stop() == 0


def test_keep_leaves_the_original_and_does_not_reprocess_it(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """on_success: keep leaves the file in the inbox; rescans and restarts do not process it again."""
    daemon = make_daemon({"on_success": "keep"}, rescan_interval=0.5).start()
    drop_file(media_set.speech_mp4, daemon.folder("inbox") / "talk.mp4")
    daemon.wait_done(1)
    time.sleep(2)  # several rescans see the file again
    assert daemon.stop() == 0
    daemon.start()
    time.sleep(2)
    assert [j.state for j in daemon.jobs()] == [JobState.DONE]
    assert files_under(daemon.folder("inbox")) == ["talk.mp4"]
    # A changed file (new size and mtime) is a new arrival.
    with open(daemon.folder("inbox") / "talk.mp4", "ab") as handle:
        handle.write(b"\0" * 16)
    daemon.wait_for(lambda: len(daemon.jobs()) == 2, 20, "the changed file's job")
    assert daemon.stop() == 0


@pytest.mark.slow
def test_sigterm_during_a_window_that_cannot_be_interrupted_exits_zero(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A whisper window far longer than the grace period: the job is handed back and whisperd exits 0,
    never an abort, and no crash is counted against the file."""
    from make_test_checkpoint import make_checkpoint

    slow = make_checkpoint(tmp_path / "slow.pt", seed=1, n_state=512, n_head=8, n_layer=6)  # seconds per window
    long_clip = media.tone_wav(tmp_path / "long.wav", seconds=120)
    daemon = make_daemon(shutdown_grace=0.2)
    daemon.data["defaults"] |= {"model": str(slow), "sample_len": 224}
    daemon.write_config(daemon.data)
    daemon.start()
    drop_file(long_clip, daemon.folder("inbox") / "long.wav")
    daemon.wait_for(lambda: any(j.state == JobState.RUNNING for j in daemon.jobs())
                    and daemon.event("job_started"), 60, "the job to start")
    time.sleep(1.0)  # inside a window now (model load and extraction are quick)
    started = time.monotonic()
    assert daemon.stop(timeout=30) == 0
    assert time.monotonic() - started < 10
    [job] = daemon.jobs()
    assert (job.state, job.attempts, job.crashes, job.owner) == (JobState.QUEUED, 0, 0, None)
    requeued = daemon.event("job_requeued")
    assert requeued is not None and "could not be interrupted" in requeued["reason"], daemon.tail()
    assert "terminate called" not in daemon.tail()


def test_files_in_flight_together_share_the_batched_engines_batches(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """jobs_in_flight: 3 files dropped at once are prepared side by side and decoded in shared batches;
    each still ends as its own job, with its own outputs and archived original."""
    daemon = make_daemon(jobs_in_flight=3)
    daemon.data["defaults"] |= {"engine": "batched", "condition_on_previous_text": False}
    daemon.write_config(daemon.data)
    daemon.start()
    for name in ("a", "b", "c"):
        shutil.copy(media_set.speech_mp4, daemon.folder("inbox") / f".{name}.part")
    for name in ("a", "b", "c"):  # all three appear at once: the three workers claim them together
        os.rename(daemon.folder("inbox") / f".{name}.part", daemon.folder("inbox") / f"{name}.mp4")
    done = daemon.wait_done(3, timeout=120)
    assert {job.state for job in done} == {JobState.DONE}
    gathered = daemon.events("batch_gathered")
    assert gathered and max(event["files"] for event in gathered) >= 2, gathered
    assert files_under(daemon.folder("outbox")) == sorted(f"{n}.{ext}" for n in "abc" for ext in OUTPUTS)
    assert files_under(daemon.folder("archive")) == ["a.mp4", "b.mp4", "c.mp4"]
    assert daemon.stop() == 0


def test_a_file_that_crashed_whisperd_before_runs_alone_among_jobs_in_flight(
    make_daemon: Callable[..., Daemon], media_set: MediaSet
) -> None:
    """jobs_in_flight 3: a file during which whisperd died CRASH_LIMIT times gets its last attempt with
    nothing else in flight (so a death now is its doing): no other file is transcribed between its
    start and its end; the other files still flow, before or after it."""
    daemon = make_daemon(jobs_in_flight=3)
    daemon.data["defaults"] |= {"engine": "batched", "condition_on_previous_text": False}
    daemon.write_config(daemon.data)
    inbox = daemon.folder("inbox")
    # Long enough (a minute of speech) that the other files would be transcribed beside it, ungated.
    long, _ = media.joined_with_silence(daemon.root / "long.wav", [media_set.speech_wav] * 16, gap_s=1.0)
    shutil.copy(long, inbox / "poison.wav")
    journal = open_journal(Path(daemon.data["state_dir"]))
    try:  # what CRASH_LIMIT deaths while transcribing it, and restarts, leave behind
        job_id = enqueue_file(journal, inbox / "poison.wav", "poison.wav", now=time.time() - 60)
        for n in range(CRASH_LIMIT):
            assert journal.claim(["media"], now=time.time() - 50 + n, owner="gone:1") is not None
            journal.set_stage(job_id, "transcribe", now=time.time() - 50 + n)
            journal.recover(lambda owner: True, now=time.time() - 50 + n)
    finally:
        journal.close()
    for name in "abcd":
        shutil.copy(media_set.speech_mp4, inbox / f".{name}.part")
        os.rename(inbox / f".{name}.part", inbox / f"{name}.mp4")
    daemon.start()
    done = daemon.wait_done(5, timeout=180)
    assert {job.state for job in done} == {JobState.DONE}, done
    isolated = daemon.event("isolated_attempt")
    assert isolated is not None and isolated["file"] == "poison.wav"

    def span(name: str) -> tuple[str, str]:
        [started] = [e["timestamp"] for e in daemon.events("job_started") if e["file"] == name]
        [ended] = [e["timestamp"] for e in daemon.events("job_done") if e["file"] == name]
        return started, ended  # ISO 8601 in UTC, same width: they compare as text

    alone = span("poison.wav")
    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        other = span(name)
        assert other[1] <= alone[0] or other[0] >= alone[1], (name, other, alone)
    assert daemon.stop() == 0
