"""Faults and limits: audio that does not live in memory, and copies that are still arriving."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import media
import numpy as np
import pytest
import whisper
from conftest import MediaSet, enqueue_file
from whisper.audio import N_SAMPLES, log_mel_spectrogram

from daemon.config import Config, Rule, Settings
from daemon.errors import MediaError
from daemon.journal import JobState
from daemon.journal.sqlite import SqliteJournal
from daemon.pipeline import process_file
from daemon.pipeline.extract import Audio
from daemon.pipeline.mel import LazyMel
from daemon.pipeline.transcribe import Progress, Transcript, WhisperEngine
from daemon.watcher import StabilityTracker
from daemon.worker import Worker

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("seconds", [0.005, 3.7, 11.0, 61.3])
def test_spectrogram_window_by_window_is_whispers_own(seconds: float) -> None:
    """Each slice of the lazy spectrogram equals, bit for bit, whisper's spectrogram of the whole file."""
    jfk = whisper.load_audio(str(FIXTURES / "jfk.flac"))
    samples = np.resize(jfk, round(seconds * 16000)).astype(np.float32)
    full = log_mel_spectrogram(samples, 80, padding=N_SAMPLES)
    lazy = LazyMel(samples, 80)
    assert lazy.shape == tuple(full.shape)
    frames = full.shape[1]
    for start, stop in [(0, 3000), (1, 1), (frames - 3000, frames), (frames // 2, frames // 2 + 700), (0, frames)]:
        assert np.array_equal(lazy[:, start:stop].numpy(), full[:, start:stop].numpy()), (start, stop)


def test_decoded_audio_is_read_from_disk_and_removed_afterwards(
    tmp_path: Path, engine: WhisperEngine, fast_rule: Callable[..., Rule], media_set: MediaSet
) -> None:
    """The samples live in the job's work folder while it runs (not in memory) and are gone when it ends."""
    seen: list[Any] = []

    class Watching(WhisperEngine):
        def transcribe(self, audio: Audio, rule: Rule, progress: Progress | None = None) -> Transcript:
            seen.append((type(audio.samples).__name__, sorted(p.name for p in work.iterdir())))
            return super().transcribe(audio, rule, progress)

    work = tmp_path / "work" / "7"
    process_file(media_set.speech_mp4, fast_rule(output_formats=["txt"]), Watching(engine.registry), Settings(),
                 target_dir=tmp_path / "out", work_dir=work)
    assert seen == [("SampleFile", ["audio.f32"])]
    assert not work.exists()
    with pytest.raises(MediaError):
        process_file(media_set.not_media, fast_rule(), engine, Settings(), target_dir=tmp_path / "out", work_dir=work)
    assert not work.exists()


def test_a_file_longer_than_max_duration_is_refused_before_it_is_decoded(
    tmp_path: Path, engine: WhisperEngine, fast_rule: Callable[..., Rule], media_set: MediaSet
) -> None:
    """`max_duration` refuses a longer file with its length and the limit, and decodes nothing."""
    with pytest.raises(MediaError, match=r"refused: it lasts 0m02s, longer than this folder's max_duration \(0m01s\)"):
        process_file(media_set.speech_mp4, fast_rule(max_duration=1), engine, Settings(), target_dir=tmp_path,
                     work_dir=tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_a_file_cut_short_gets_a_warning_in_its_record(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine
) -> None:
    """A faststart m4a cut in half (a copy that stopped) still declares its whole length: it is transcribed,
    and its record says how much was decoded of how much declared."""
    config = config_factory()
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    speech = media.speech_wav(tmp_path / "whole.wav", "one two three four five six seven eight nine ten " * 3)
    whole = tmp_path / "whole.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(speech), "-c:a", "aac",
                    "-movflags", "+faststart", str(whole)], check=True)
    data = whole.read_bytes()
    (folder.inbox / "cut.m4a").write_bytes(data[: len(data) // 2])  # the index up front still declares all
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    worker = Worker(lambda: config, journal, engine, owner="test:1", clock=lambda: 10.0)
    job_id = enqueue_file(journal, folder.inbox / "cut.m4a", "cut.m4a", now=0)
    worker.run_once()
    job = journal.get(job_id)
    assert job is not None and job.state == JobState.DONE
    assert job.warning is not None and "of audio decoded, but the file declares" in job.warning


def test_a_copy_that_changes_while_processed_goes_back_to_settle(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """A writer that goes on writing while its file is transcribed: nothing is published, no attempt is counted,
    and the file is back in the inbox to settle again."""
    config = config_factory()
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    shutil.copyfile(media_set.speech_wav, folder.inbox / "talk.wav")
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    job_id = enqueue_file(journal, folder.inbox / "talk.wav", "talk.wav", now=0)

    class WriterGoesOn(WhisperEngine):
        """The real engine; meanwhile the file's writer (who kept it open) appends more audio."""

        def transcribe(self, audio: Audio, rule: Rule, progress: Progress | None = None) -> Transcript:
            job = journal.get(job_id)
            assert job is not None and job.processing_path
            with open(job.processing_path, "ab") as writer:
                writer.write(b"\0" * 32000)
            return super().transcribe(audio, rule, progress)

    worker = Worker(lambda: config, journal, WriterGoesOn(engine.registry), owner="test:1", clock=lambda: 10.0)
    worker.run_once()
    assert journal.get(job_id) is None  # this arrival is over; the grown file is a new one
    assert (folder.inbox / "talk.wav").stat().st_size == media_set.speech_wav.stat().st_size + 32000
    assert not [p for p in folder.outbox.rglob("*") if p.is_file()] and not folder.failed.exists()


def test_a_quiet_file_still_open_for_writing_is_not_taken(tmp_path: Path) -> None:
    """A copy that paused longer than the stability delay, its writer still holding it open, is not ready."""
    path = tmp_path / "talk.wav"
    writer = subprocess.Popen([sys.executable, "-c", f"f = open({str(path)!r}, 'ab'); f.write(b'x'); f.flush(); "
                               "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not path.exists() or path.stat().st_size == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        tracker = StabilityTracker(delay_s=1, root=tmp_path)
        tracker.touch(path, now=0)
        assert tracker.poll(now=5) == []
        assert tracker.poll(now=50) == []
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=10)
    assert [p for p, _ in tracker.poll(now=100)] == [path]


def test_a_folder_pauses_while_its_environment_is_broken_and_resumes_by_itself(
    tmp_path: Path, config_factory: Callable[..., Config]
) -> None:
    """A full disk or a lost outbox pauses a folder (one event, a growing wait between checks), then it resumes."""
    from structlog.testing import capture_logs

    from daemon.health import Health

    config = config_factory()
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    folder.outbox.write_text("a file where the outbox should be")
    health = Health()
    with capture_logs() as logs:
        assert health.paused(config, now=0) == {"media": f"the outbox {folder.outbox} is not a folder"}
        assert health.paused(config, now=4) == {"media": f"the outbox {folder.outbox} is not a folder"}
        assert health.paused(config, now=6) and health.retry_at("media") == 16  # checked again: 10 s now
    assert [e["event"] for e in logs] == ["folder_paused"]
    folder.outbox.unlink()
    with capture_logs() as logs:
        assert health.paused(config, now=15) != {}  # not due yet
        assert health.paused(config, now=16) == {}
    assert [e["event"] for e in logs] == ["folder_resumed"]
    full = config_factory(min_free_space="1000000T")
    assert "free, below min_free_space" in Health().paused(full, now=0)["media"]


def test_a_set_of_outputs_is_written_whole_or_not_at_all(
    tmp_path: Path, engine: WhisperEngine, fast_rule: Callable[..., Rule], media_set: MediaSet
) -> None:
    """When one output cannot be written (here a folder stands at its name), the ones already written go too."""
    from daemon.errors import TransientError

    out = tmp_path / "out"
    (out / "speech.srt").mkdir(parents=True)  # txt is written first, then srt fails
    with pytest.raises(TransientError, match="cannot write outputs"):
        process_file(media_set.speech_wav, fast_rule(output_formats=["txt", "srt"]), engine, Settings(),
                     target_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["speech.srt"] and not any((out / "speech.srt").iterdir())


def test_a_full_outbox_pauses_the_folder_and_the_transcript_is_not_made_twice(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """ENOSPC while publishing (a disk the checks saw as fine): the folder pauses, no attempt counted; once
    there is room, the transcript kept from the first attempt is published, not made again."""
    from structlog.testing import capture_logs

    outbox = tmp_path / "outbox"
    outbox.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(outbox)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        config = config_factory({"output_formats": ["txt", "srt", "json"]}, min_free_space=0)
        folder = config.folders["media"]
        folder.inbox.mkdir(parents=True)
        shutil.copyfile(media_set.speech_wav, folder.inbox / "talk.wav")
        (outbox / "filler").write_bytes(b"\0" * (64 * 1024 - 4096 * 2))  # room for a probe, not for outputs
        clock = [10.0]
        journal = SqliteJournal(tmp_path / "journal.sqlite3")
        worker = Worker(lambda: config, journal, engine, owner="test:1", clock=lambda: clock[0], jitter=lambda: 1.0)
        job_id = enqueue_file(journal, folder.inbox / "talk.wav", "talk.wav", now=0)
        with capture_logs() as logs:
            worker.run_once()
        job = journal.get(job_id)
        assert job is not None and (job.state, job.attempts) == (JobState.QUEUED, 0)
        assert [e["event"] for e in logs if e["event"] in ("folder_paused", "job_postponed")] == [
            "folder_paused", "job_postponed"]
        assert [p.name for p in outbox.iterdir()] == ["filler"]  # all or nothing: no half set of outputs
        (outbox / "filler").unlink()
        clock[0] = job.next_attempt_at
        with capture_logs() as logs:
            worker.run_once()
            worker.run_once()
        events = [e["event"] for e in logs]
        assert "transcript_reused" in events and "transcribed" not in events, events
        assert journal.get(job_id).state == JobState.DONE  # type: ignore[union-attr]
        assert sorted(p.name for p in outbox.iterdir()) == ["talk.json", "talk.srt", "talk.txt"]
    finally:
        subprocess.run(["umount", str(outbox)], check=False)
