"""The stability gate, retry timing and the worker, driven with an injected clock (no sleeping)."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MediaSet, enqueue_file

from daemon.config import Config
from daemon.journal import JobState
from daemon.journal.sqlite import SqliteJournal
from daemon.pipeline.transcribe import WhisperEngine
from daemon.retry import backoff_window, retry_delay
from daemon.watcher import FolderWatcher, StabilityTracker
from daemon.worker import Worker


def test_tracker_waits_for_quiet_and_an_unchanged_stat(tmp_path: Path) -> None:
    """A file is ready only after `delay` without touches and with the size and mtime seen before."""
    path = tmp_path / "talk.mp4"
    path.write_bytes(b"x" * 10)
    tracker = StabilityTracker(delay_s=5)
    tracker.touch(path, now=0)
    assert tracker.poll(now=4.9) == []
    tracker.touch(path, now=3)  # an event: the wait starts again
    assert tracker.poll(now=7.9) == []
    [(ready, st)] = tracker.poll(now=8)
    assert ready == path and st.st_size == 10
    assert tracker.poll(now=100) == []  # handed on once


def test_tracker_restarts_the_wait_when_a_file_grows_without_events(tmp_path: Path) -> None:
    """On a network share writes raise no event: a changed size at check time restarts the wait."""
    path = tmp_path / "talk.mp4"
    path.write_bytes(b"x" * 10)
    tracker = StabilityTracker(delay_s=5)
    tracker.touch(path, now=0)
    with open(path, "ab") as handle:
        handle.write(b"more")
    assert tracker.poll(now=6) == []
    assert tracker.poll(now=10.9) == []
    assert [p for p, _ in tracker.poll(now=11)] == [path]


def test_tracker_has_no_limit_on_arrival_time(tmp_path: Path) -> None:
    """A copy that keeps growing for hours is never abandoned; it is ready once it stops."""
    path = tmp_path / "huge.mkv"
    path.write_bytes(b"")
    tracker = StabilityTracker(delay_s=5)
    tracker.touch(path, now=0)
    for hour in range(1, 100):
        with open(path, "ab") as handle:
            handle.write(b"x")
        os.utime(path, ns=(hour * 10**9, hour * 10**9))
        assert tracker.poll(now=hour * 3600) == []
    assert len(tracker.poll(now=100 * 3600)) == 1


def test_tracker_hands_on_a_symlink_unfollowed_and_forgets_vanished_files(tmp_path: Path) -> None:
    """A settled symlink is handed on as the link itself (for the worker to refuse and report);
    a deleted file is dropped."""
    target = tmp_path / "secret"
    target.write_text("x" * 1000)
    link = tmp_path / "link.mp4"
    link.symlink_to(target)
    gone = tmp_path / "gone.mp4"
    gone.write_text("x")
    tracker = StabilityTracker(delay_s=1)
    tracker.touch(link, now=0)
    tracker.touch(gone, now=0)
    gone.unlink()
    [(path, st)] = tracker.poll(now=5)
    assert path == link and stat.S_ISLNK(st.st_mode) and st.st_size != 1000
    assert len(tracker) == 0


def test_rescan_skips_junk_and_prunes_ignored_folders(
    tmp_path: Path, config_factory: Callable[..., Config]
) -> None:
    """A scan touches media files, not partial downloads, dotfiles or @eaDir/.whisperd contents."""
    config = config_factory({"include": ["*.mp4"]})
    folder = config.folders["media"]
    inbox = folder.inbox
    for name in ("a.mp4", "sub/b.mp4", "c.mp4.part", ".d.mp4", "@eaDir/e.mp4", ".whisperd/processing/1/f.mp4",
                 "notes.txt"):
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        (inbox / name).write_text("x")
    watcher = FolderWatcher(folder, clock=lambda: 0.0)
    assert watcher.scan() == 2
    ready = watcher.poll(now=100)
    assert sorted(r.rel_path for r in ready) == ["a.mp4", "sub/b.mp4"]


@pytest.mark.parametrize(("attempt", "window"), [(1, 30), (2, 60), (3, 120), (4, 240), (8, 3600), (30, 3600)])
def test_backoff_window_doubles_up_to_the_cap(attempt: int, window: float) -> None:
    """The retry window doubles with each failure and stops at the cap."""
    assert backoff_window(attempt, base_s=30, cap_s=3600) == window


def test_retry_delay_is_fully_jittered_within_the_window() -> None:
    """Full jitter: a draw of 0 retries at once, a draw near 1 waits nearly the whole window."""
    assert retry_delay(3, 30, 3600, jitter=0.0) == 0
    assert retry_delay(3, 30, 3600, jitter=0.5) == 60
    assert retry_delay(3, 30, 3600, jitter=0.999) == pytest.approx(119.88)


def _worker_setup(
    tmp_path: Path, config: Config, engine: WhisperEngine, clock: list[float]
) -> tuple[Worker, SqliteJournal]:
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    worker = Worker(lambda: config, journal, engine, owner="test:1",
                    clock=lambda: clock[0], jitter=lambda: 1.0)
    return worker, journal


def test_worker_retries_with_growing_delays_then_fails(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """With ffmpeg past its timeout each retry waits twice as long (no jitter), then the file goes to failed/."""
    config = config_factory({"max_attempts": 4, "retry_base_delay": 10, "retry_max_delay": 25}, extract_timeout=0.001)
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    shutil.copyfile(media_set.speech_mp4, folder.inbox / "talk.mp4")
    clock = [1000.0]
    worker, journal = _worker_setup(tmp_path, config, engine, clock)
    job_id = enqueue_file(journal, folder.inbox / "talk.mp4", "talk.mp4", now=clock[0])

    waits = []
    for _ in range(3):
        assert worker.run_once() is not None
        job = journal.get(job_id)
        assert job is not None and job.state == JobState.RETRY_WAIT
        waits.append(job.next_attempt_at - clock[0])
        clock[0] = job.next_attempt_at - 0.001
        assert worker.run_once() is None  # not due yet
        clock[0] = job.next_attempt_at
    assert waits == [10, 20, 25]
    worker.run_once()
    job = journal.get(job_id)
    assert job is not None and (job.state, job.attempts) == (JobState.FAILED, 4)
    assert (folder.failed / "talk.mp4").exists()
    assert "Attempts:    4 of 4" in (folder.failed / "talk.mp4.error.txt").read_text()


def test_worker_drops_a_file_that_vanished_before_its_claim(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """A queued file deleted from the inbox is forgotten with a log line, not an error."""
    config = config_factory()
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    path = Path(shutil.copyfile(media_set.speech_mp4, folder.inbox / "talk.mp4"))
    worker, journal = _worker_setup(tmp_path, config, engine, [0.0])
    enqueue_file(journal, path, "talk.mp4", now=0)
    path.unlink()
    assert worker.run_once() is not None
    assert journal.jobs() == []
    assert not folder.failed.exists()


def test_worker_keeps_each_archived_original_under_a_free_name(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """The same name archived twice is kept twice: talk.mp4 and talk (1).mp4."""
    config = config_factory({"output_formats": ["txt"]})
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    worker, journal = _worker_setup(tmp_path, config, engine, [10.0])
    for n in range(2):
        path = Path(shutil.copyfile(media_set.speech_mp4, folder.inbox / "talk.mp4"))
        os.utime(path, ns=(n * 10**9, n * 10**9))
        enqueue_file(journal, path, "talk.mp4", now=n)
        assert worker.run_once() is not None
    assert sorted(p.name for p in folder.archive.iterdir()) == ["talk (1).mp4", "talk.mp4"]
    assert [p.name for p in folder.outbox.iterdir()] == ["talk.txt"]


def test_a_file_that_keeps_crashing_the_process_is_set_aside(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """After three crashes of the daemon during one file (kill -9, OOM, GPU fault), and a fourth in the
    isolated attempt that follows, it goes to failed/."""
    config = config_factory()
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    shutil.copyfile(media_set.speech_mp4, folder.inbox / "poison.mp4")
    worker, journal = _worker_setup(tmp_path, config, engine, [10.0])
    job_id = enqueue_file(journal, folder.inbox / "poison.mp4", "poison.mp4", now=0)
    for n in range(4):  # what four deaths while transcribing it, and restarts, leave behind
        assert journal.claim(["media"], now=n + 1, owner="gone:1") is not None
        journal.set_stage(job_id, "transcribe", now=n + 1)
        journal.recover(lambda owner: True, now=n + 1)
    assert worker.run_once() is not None
    job = journal.get(job_id)
    assert job is not None and (job.state, job.crashes, job.last_stage) == (JobState.FAILED, 4, "crash")
    assert "stopped 4 times while processing this file" in (folder.failed / "poison.mp4.error.txt").read_text()
    assert not folder.outbox.exists()  # never transcribed again


def test_a_symlink_planted_in_the_processing_area_is_refused(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine
) -> None:
    """A link swapped in for a waiting original is not followed: it goes to failed/, its target untouched."""
    config = config_factory()
    folder = config.folders["media"]
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    worker, journal = _worker_setup(tmp_path, config, engine, [10.0])
    folder.inbox.mkdir(parents=True)
    (folder.inbox / "talk.mp4").write_text("placeholder")
    job_id = enqueue_file(journal, folder.inbox / "talk.mp4", "talk.mp4", now=0)
    planted = folder.inbox / ".whisperd" / "processing" / str(job_id) / "talk.mp4"
    planted.parent.mkdir(parents=True)
    planted.symlink_to(secret)
    journal.set_processing(job_id, str(planted), now=0)
    worker.run_once()
    job = journal.get(job_id)
    assert job is not None and job.state == JobState.FAILED and "symbolic link" in (job.last_error or "")
    assert (folder.failed / "talk.mp4").is_symlink() and secret.read_text() == "private"
    assert not folder.outbox.exists()


def test_a_published_job_resumes_with_the_disposal_only(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """A crash after publishing: the restart archives the original and does not transcribe again."""
    config = config_factory()
    folder = config.folders["media"]
    worker, journal = _worker_setup(tmp_path, config, engine, [10.0])
    folder.inbox.mkdir(parents=True)
    waiting = folder.inbox / ".whisperd" / "processing" / "1" / "talk.mp4"
    waiting.parent.mkdir(parents=True)
    shutil.copyfile(media_set.speech_mp4, waiting)
    job_id = enqueue_file(journal, waiting, "talk.mp4", now=0)
    journal.claim(["media"], now=1, owner="gone:1")
    journal.set_processing(job_id, str(waiting), now=1)
    journal.mark_published(job_id, [str(folder.outbox / "talk.srt")], {}, now=2)
    journal.recover(lambda owner: True, now=3)
    worker.run_once()
    job = journal.get(job_id)
    assert job is not None and job.state == JobState.DONE
    assert (folder.archive / "talk.mp4").read_bytes() == media_set.speech_mp4.read_bytes()
    assert not folder.outbox.exists()  # nothing was transcribed a second time


def test_a_job_whose_original_already_reached_the_archive_is_finished(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine
) -> None:
    """A crash between archiving and the journal's 'done': the restart marks it done and moves nothing."""
    config = config_factory()
    folder = config.folders["media"]
    worker, journal = _worker_setup(tmp_path, config, engine, [10.0])
    folder.inbox.mkdir(parents=True)
    folder.archive.mkdir(parents=True)
    archived = folder.archive / "talk.mp4"
    archived.write_text("x")
    job_id = enqueue_file(journal, archived, "talk.mp4", now=0)
    journal.claim(["media"], now=1, owner="gone:1")
    journal.set_processing(job_id, str(folder.inbox / ".whisperd" / "processing" / str(job_id) / "talk.mp4"), now=1)
    journal.mark_published(job_id, [], {}, now=2)
    journal.set_disposal(job_id, str(archived), now=3)
    journal.recover(lambda owner: True, now=4)
    worker.run_once()
    job = journal.get(job_id)
    assert job is not None and job.state == JobState.DONE and job.disposed_path == str(archived)
    assert [p.name for p in folder.archive.iterdir()] == ["talk.mp4"]


def test_an_operator_pause_stops_claiming_until_resumed(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """`whisperd pause` (one folder, or every one) leaves queued files queued; `resume` lets them run."""
    config = config_factory()
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    shutil.copyfile(media_set.speech_mp4, folder.inbox / "talk.mp4")
    worker, journal = _worker_setup(tmp_path, config, engine, [10.0])
    job_id = enqueue_file(journal, folder.inbox / "talk.mp4", "talk.mp4", now=0)
    for held in ("media", "*"):
        assert journal.pause(held, now=5) and not journal.pause(held, now=6)
        assert worker.run_once() is None
        assert journal.resume(held) and not journal.resume(held)
    assert worker.run_once() is not None
    assert journal.get(job_id).state == JobState.DONE  # type: ignore[union-attr]


def test_a_job_that_must_run_alone_waits_for_the_others_and_keeps_new_ones_out() -> None:
    """The isolation gate of jobs_in_flight: an isolated attempt starts only when the jobs beside it
    are done, and no job starts while it runs; every waiting side keeps beating."""
    import threading
    import time

    from daemon.control import Isolation

    gate, order, beats = Isolation(), [], []
    first_in = threading.Event()
    release_first = threading.Event()

    def shared_job(name: str, hold: threading.Event | None) -> None:
        with gate.shared(lambda: beats.append(name)):
            order.append(f"{name} in")
            if hold is not None:
                first_in.set()
                hold.wait(5)
            order.append(f"{name} out")

    def lonely_job() -> None:
        with gate.alone(lambda: beats.append("alone")):
            order.append("alone in")
            time.sleep(0.3)
            order.append("alone out")

    first = threading.Thread(target=shared_job, args=("first", release_first))
    first.start()
    first_in.wait(5)
    lonely = threading.Thread(target=lonely_job)
    lonely.start()
    time.sleep(0.6)
    assert "alone in" not in order and "alone" in beats  # waiting, and beating while it waits
    release_first.set()
    time.sleep(0.1)  # the isolated job is in now
    late = threading.Thread(target=shared_job, args=("late", None))
    late.start()
    for thread in (first, lonely, late):
        thread.join(5)
    assert order == ["first in", "first out", "alone in", "alone out", "late in", "late out"]
