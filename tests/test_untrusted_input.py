"""Untrusted input, step by step: the pieces the hostile corpus relies on, and the races it cannot time.

The worker runs in-process with an injected clock, so a subfolder can be swapped for a link
exactly between queueing and claiming, and a link planted exactly during a retry wait.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from conftest import MediaSet, enqueue_file

from daemon import fsutil, names, proc
from daemon.config import Config, Folder, Rule, Settings
from daemon.errors import MediaError, UnsafePath
from daemon.fsutil import Place
from daemon.journal import JobState
from daemon.journal.sqlite import SqliteJournal
from daemon.pipeline import process_file
from daemon.pipeline.transcribe import WhisperEngine
from daemon.worker import Worker


def _worker(
    tmp_path: Path, config: Config | Callable[[], Config], engine: WhisperEngine, clock: list[float]
) -> tuple[Worker, SqliteJournal]:
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    current = config if callable(config) else (lambda: config)
    return Worker(current, journal, engine, owner="test:1", clock=lambda: clock[0], jitter=lambda: 1.0), journal


def _outputs(folder: Path) -> list[Path]:
    """Return the files in an outbox (its folders may exist: whisperd checks it is writable first)."""
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_tools_run_under_resource_limits_and_low_priority() -> None:
    """ffmpeg and ffprobe run with an address-space, file-size and CPU limit, niced, at idle-ish I/O priority."""
    limits = proc.Limits(address_space_bytes=1 << 31, file_size_bytes=1 << 20, cpu_seconds=7)
    out = proc.run(["sh", "-c", "ulimit -v; ulimit -f; ulimit -t; nice; ionice -p $$"], timeout_s=10,
                   limits=limits).stdout.decode().split("\n")
    assert out[:4] == [str((1 << 31) // 1024), str((1 << 20) // 512), "7", "10"]
    assert out[4] == "best-effort: prio 7"


def test_a_tool_writing_past_its_file_size_limit_is_stopped(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stops a tool that writes more than it may (a decoder told to write a huge file)."""
    target = tmp_path / "big"
    with pytest.raises(proc.ToolError):
        proc.run(["sh", "-c", f"head -c 3000000 /dev/zero > {target}"], timeout_s=10,
                 limits=proc.Limits(file_size_bytes=1 << 20))
    assert target.stat().st_size == 1 << 20


def test_playlist_is_refused_with_the_format_named(
    tmp_path: Path, engine: WhisperEngine, fast_rule: Callable[..., Rule], media_set: MediaSet
) -> None:
    """An HLS playlist named .mp4 is a permanent failure naming the refused format and why.

    (That its segment is never opened is shown by strace in the hostile corpus.)
    """
    segment = tmp_path / "outside" / "secret.mp3"
    segment.parent.mkdir()
    shutil.copy(media_set.speech_mp3, segment)
    playlist = tmp_path / "talk.mp4"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3.0,\n{segment}\n#EXT-X-ENDLIST\n")
    with pytest.raises(MediaError) as caught:
        process_file(playlist, fast_rule(), engine, Settings(), target_dir=tmp_path / "out")
    assert caught.value.reason.startswith("refused: a hls file; whisperd opens only media containers")
    assert "playlists (hls), concat lists, image sequences and subtitles open other files" in caught.value.reason
    assert caught.value.stage == "probe" and "-format_whitelist" in (caught.value.command or "")
    assert not (tmp_path / "out").exists()


def test_no_step_follows_a_link_below_a_root(tmp_path: Path) -> None:
    """Reading and writing below a root refuse a link at any level; a planted link is replaced, not written through."""
    root = tmp_path / "outbox"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("outside")
    root.mkdir()
    (root / "sub").symlink_to(outside)
    with pytest.raises(UnsafePath, match="sub is a symbolic link or not a folder"):
        fsutil.atomic_write_text(Place(root, PurePosixPath("sub/new.txt")), lambda h: h.write("x"))
    with pytest.raises(UnsafePath):
        fsutil.open_read(Place(root, PurePosixPath("sub/keep.txt")))
    (root / "out.txt").symlink_to(outside / "keep.txt")
    fsutil.atomic_write_text(Place(root, PurePosixPath("out.txt")), lambda h: h.write("new"))
    assert not (root / "out.txt").is_symlink() and (root / "out.txt").read_text() == "new"
    assert (outside / "keep.txt").read_text() == "outside" and sorted(os.listdir(outside)) == ["keep.txt"]
    with pytest.raises(UnsafePath):
        fsutil.open_read(Place(root, PurePosixPath("sub")))


@pytest.mark.parametrize("raw", [b"caf\xe9.mp4", b"back\\slash\\x41.mp4", b"plain.mp4", b"\xff\xfe\\xff"])
def test_names_that_are_not_utf8_round_trip_through_their_printable_form(raw: bytes) -> None:
    """Undecodable bytes show as \\xNN, a backslash doubles, and the printable form turns back into the bytes."""
    fs_text = os.fsdecode(raw)
    shown = names.escape(fs_text)
    shown.encode("utf-8")  # printable: it fits a log line and SQLite
    assert os.fsencode(names.unescape(shown)) == raw
    if raw == b"caf\xe9.mp4":
        assert shown == "caf\\xe9.mp4"


def test_long_names_are_shortened_within_the_limit_and_stay_distinct() -> None:
    """A name that would pass 255 bytes keeps its start and tail, with a hash that tells long names apart."""
    first, second = "é" * 125 + "x", "é" * 125 + "y"  # 251 bytes each, the same for their first 250
    short = [names.fit(stem, ".error.txt") for stem in (first, second)]
    assert all(names.byte_length(s) <= 255 and s.endswith(".error.txt") and "~" in s for s in short)
    assert short[0] != short[1]
    assert names.fit("talk", ".srt") == "talk.srt"


def test_a_subfolder_swapped_for_a_link_after_queueing_is_not_followed(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """A subfolder replaced by a link to an outside folder holding a same-named file: nothing is moved or read."""
    config = config_factory()
    folder = config.folders["media"]
    (folder.inbox / "sub").mkdir(parents=True)
    queued = folder.inbox / "sub" / "talk.mp4"
    shutil.copyfile(media_set.speech_mp4, queued)
    worker, journal = _worker(tmp_path, config, engine, [10.0])
    job_id = enqueue_file(journal, queued, "sub/talk.mp4", now=0)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(media_set.speech_mp4, outside / "talk.mp4")
    shutil.copystat(queued, outside / "talk.mp4")  # same size and mtime as queued
    inode = os.stat(outside / "talk.mp4").st_ino
    shutil.rmtree(folder.inbox / "sub")
    (folder.inbox / "sub").symlink_to(outside)
    worker.run_once()
    assert journal.get(job_id) is None  # dropped: the queued file is no longer in the inbox
    assert os.stat(outside / "talk.mp4").st_ino == inode and sorted(os.listdir(outside)) == ["talk.mp4"]
    assert not folder.outbox.exists() and not (folder.archive or tmp_path).exists()


@dataclass
class Waiting:
    """A job whose original waits in a processing area inside the share, between two attempts."""

    worker: Worker
    journal: SqliteJournal
    folder: Folder
    job_id: int
    original: Path  # where it waits
    resume: Callable[[], None]  # make the next attempt due, with a config that lets it succeed


def _waiting(tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media: Path) -> Waiting:
    """Return a job taken into `<inbox>/.proc` whose first attempt failed (ffmpeg past a tiny timeout)."""
    config = config_factory({"processing": str(tmp_path / "inbox" / ".proc")})
    current = [config_factory({"processing": str(tmp_path / "inbox" / ".proc")}, extract_timeout=0.001)]
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    shutil.copyfile(media, folder.inbox / "talk.mp4")
    clock = [10.0]
    worker, journal = _worker(tmp_path, lambda: current[0], engine, clock)
    job_id = enqueue_file(journal, folder.inbox / "talk.mp4", "talk.mp4", now=0)
    worker.run_once()
    job = journal.get(job_id)
    assert job is not None and job.state == JobState.RETRY_WAIT

    def resume() -> None:
        current[0] = config
        clock[0] = job.next_attempt_at

    return Waiting(worker, journal, folder, job_id, tmp_path / "inbox" / ".proc" / str(job_id) / "talk.mp4", resume)


def test_a_link_planted_during_a_retry_wait_is_refused(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """With the processing area in the share, a link swapped in for the waiting original goes to failed/ unread."""
    waiting = _waiting(tmp_path, config_factory, engine, media_set.speech_mp4)
    secret = tmp_path / "secret.wav"
    shutil.copyfile(media_set.speech_wav, secret)
    waiting.original.unlink()
    waiting.original.symlink_to(secret)
    waiting.resume()
    waiting.worker.run_once()
    job = waiting.journal.get(waiting.job_id)
    assert job is not None and job.state == JobState.FAILED
    assert "symbolic link was found in the processing area" in (job.last_error or "")
    assert (waiting.folder.failed / "talk.mp4").is_symlink() and _outputs(waiting.folder.outbox) == []
    assert secret.read_bytes() == media_set.speech_wav.read_bytes()


def test_a_different_file_planted_in_the_processing_area_is_refused(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """A regular file swapped in for the waiting original (another inode) is not transcribed."""
    waiting = _waiting(tmp_path, config_factory, engine, media_set.speech_mp4)
    waiting.original.unlink()
    shutil.copyfile(media_set.speech_mp3, waiting.original)
    waiting.resume()
    waiting.worker.run_once()
    job = waiting.journal.get(waiting.job_id)
    folder = waiting.folder
    assert job is not None and job.state == JobState.FAILED
    assert "another file was found in the processing area" in (job.last_error or "")
    assert _outputs(folder.outbox) == []


def test_failing_to_report_a_failure_is_bounded_by_max_attempts(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """When even the failed folder cannot take the original (a link planted in it), the job ends failed
    after max_attempts, not never."""
    config = config_factory({"max_attempts": 3})
    folder = config.folders["media"]
    (folder.inbox / "sub").mkdir(parents=True)
    folder.failed.mkdir()
    (folder.failed / "sub").symlink_to(tmp_path)
    shutil.copyfile(media_set.not_media, folder.inbox / "sub" / "notes.mp4")
    clock = [10.0]
    worker, journal = _worker(tmp_path, config, engine, clock)
    job_id = enqueue_file(journal, folder.inbox / "sub" / "notes.mp4", "sub/notes.mp4", now=0)
    for _ in range(10):
        if worker.run_once(now=1e12) is None:
            break
    job = journal.get(job_id)
    assert job is not None and (job.state, job.attempts) == (JobState.FAILED, 3)
    assert "could not be moved to the failed folder" in (job.last_error or "")
    assert journal.claim(["media"], now=1e13, owner="x:1") is None  # nothing left to retry


def test_a_hard_link_is_refused_and_its_other_name_untouched(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """A hard link to a file elsewhere goes to failed/ as such; it is never probed or archived as media."""
    config = config_factory()
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.mp4"
    shutil.copyfile(media_set.speech_mp4, elsewhere)
    os.link(elsewhere, folder.inbox / "talk.mp4")
    worker, journal = _worker(tmp_path, config, engine, [10.0])
    job_id = enqueue_file(journal, folder.inbox / "talk.mp4", "talk.mp4", now=0)
    worker.run_once()
    job = journal.get(job_id)
    assert job is not None and job.state == JobState.FAILED and "a hard link" in (job.last_error or "")
    assert not folder.outbox.exists() and not (folder.archive or tmp_path / "none").exists()
    assert elsewhere.read_bytes() == media_set.speech_mp4.read_bytes()


def test_strace_is_available_where_ci_runs_as_root() -> None:
    """The corpus's strace check runs in CI (root): strace is installed and can trace a child."""
    if os.geteuid() != 0:
        pytest.skip("strace's check applies where tests run as root")
    out = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "cat", "/dev/null"],
                         capture_output=True, text=True, check=True)
    assert "/dev/null" in out.stderr


def test_a_crash_between_archive_link_and_unlink_finishes_the_job_once(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """The original found under both names (archive and processing area) after a crash: done, archived once."""
    config = config_factory()
    current = [config_factory(extract_timeout=0.001)]  # the first attempt stops after the take
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    shutil.copyfile(media_set.speech_mp4, folder.inbox / "talk.mp4")
    worker, journal = _worker(tmp_path, lambda: current[0], engine, [10.0])
    job_id = enqueue_file(journal, folder.inbox / "talk.mp4", "talk.mp4", now=0)
    worker.run_once()
    current[0] = config
    job = journal.get(job_id)
    assert job is not None and job.processing_path is not None
    waiting = Path(names.unescape(job.processing_path))
    # What the crashed run did: published, recorded the archive name, linked, and died before the unlink.
    journal.mark_published(job_id, [], {}, now=11)
    folder.archive.mkdir()  # type: ignore[union-attr]
    os.link(waiting, folder.archive / "talk.mp4")  # type: ignore[operator]
    journal.set_disposal(job_id, str(folder.archive / "talk.mp4"), now=12)  # type: ignore[operator]
    journal.requeue(job_id, now=13)
    worker.run_once(now=1e12)
    job = journal.get(job_id)
    assert job is not None and job.state == JobState.DONE, job
    assert sorted(os.listdir(folder.archive)) == ["talk.mp4"] and not waiting.exists()  # type: ignore[arg-type]
    assert not folder.failed.exists()


def test_a_configured_area_in_the_inbox_swapped_for_a_link_is_not_followed(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """A processing area hidden in the inbox and replaced by a link to an outside folder: nothing there is touched."""
    config = config_factory({"processing": str(tmp_path / "inbox" / ".proc"), "max_attempts": 2})
    current = [config_factory({"processing": str(tmp_path / "inbox" / ".proc"), "max_attempts": 2},
                              extract_timeout=0.001)]
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    shutil.copyfile(media_set.speech_mp4, folder.inbox / "talk.mp4")
    clock = [10.0]
    worker, journal = _worker(tmp_path, lambda: current[0], engine, clock)  # the first attempt times out
    job_id = enqueue_file(journal, folder.inbox / "talk.mp4", "talk.mp4", now=0)
    worker.run_once()
    outside = tmp_path / "hr"
    (outside / str(job_id)).mkdir(parents=True)
    shutil.copyfile(media_set.speech_wav, outside / str(job_id) / "talk.mp4")
    before = {p.name: p.read_bytes() for p in (outside / str(job_id)).iterdir()}
    shutil.rmtree(tmp_path / "inbox" / ".proc")
    (tmp_path / "inbox" / ".proc").symlink_to(outside)
    current[0] = config
    for _ in range(4):
        worker.run_once(now=1e12)
    assert journal.get(job_id) is None  # its original went with the folder the link replaced: nothing to do
    assert (folder.failed / ".proc").is_symlink()  # the link was moved aside, as a link, unfollowed
    assert {p.name: p.read_bytes() for p in (outside / str(job_id)).iterdir()} == before
    assert _outputs(folder.outbox) == []


def test_a_processing_area_on_another_file_system_copies_only_what_was_checked(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """Across file systems the take copies from the checked descriptor (mode kept); a hard link is never copied."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    area = Path(shm / f"whisperd-test-{os.getpid()}-{tmp_path.name}")
    try:
        config = config_factory({"processing": str(area)})
        folder = config.folders["media"]
        folder.inbox.mkdir(parents=True)
        shutil.copyfile(media_set.speech_mp4, folder.inbox / "talk.mp4")
        os.chmod(folder.inbox / "talk.mp4", 0o640)
        secret = tmp_path / "secret.mp4"
        shutil.copyfile(media_set.speech_mp4, secret)
        os.chmod(secret, 0o600)
        os.link(secret, folder.inbox / "hard.mp4")
        worker, journal = _worker(tmp_path, config, engine, [10.0])
        good = enqueue_file(journal, folder.inbox / "talk.mp4", "talk.mp4", now=0)
        hard = enqueue_file(journal, folder.inbox / "hard.mp4", "hard.mp4", now=0)
        worker.run_once()
        worker.run_once()
        assert journal.get(good).state == JobState.DONE  # type: ignore[union-attr]
        assert stat_mode(folder.archive / "talk.mp4") == 0o640  # type: ignore[operator]
        hard_job = journal.get(hard)
        assert hard_job is not None and hard_job.state == JobState.FAILED
        assert "a hard link" in (hard_job.last_error or "")
        assert not list(area.rglob("hard.mp4"))  # never copied out of the share
        assert secret.stat().st_nlink == 2 and (folder.inbox / "hard.mp4").exists()  # left, as it could not move
    finally:
        shutil.rmtree(area, ignore_errors=True)


def stat_mode(path: Path) -> int:
    """Return a file's permission bits."""
    return os.stat(path).st_mode & 0o777


def test_walking_a_share_never_enters_a_link_or_blocks_on_a_fifo(tmp_path: Path) -> None:
    """The walk yields links (to files and folders) and FIFOs as entries; it never enters or opens them."""
    root = tmp_path / "inbox"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.mp4").write_text("a")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.mp4").write_text("s")
    (root / "linkdir").symlink_to(outside)
    os.mkfifo(root / "pipe.mp4")
    found = sorted(p.rel.as_posix() for p, _ in fsutil.walk_files(Place(root, PurePosixPath())))
    assert found == ["linkdir", "pipe.mp4", "sub/a.mp4"]


def test_names_fit_with_a_prefix_and_a_long_extension() -> None:
    """A template that puts text before the stem, and an absurdly long extension, still give ≤ 255 bytes."""
    assert names.byte_length(names.fit("s" * 251, ".mp4", "en-")) <= 255
    weird = names.fit("x (1)", "." + "y" * 253)  # the free name for a 255-byte "x.yyy…"
    assert names.byte_length(weird) <= 255 and "~" in weird


def test_the_hidden_processing_area_stays_private_between_jobs(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """Finishing a job removes its own folders only, up to the processing area: the area (0700) stays."""
    config = config_factory({"processing": str(tmp_path / "inbox" / ".proc")})
    folder = config.folders["media"]
    (tmp_path / "inbox" / ".proc").mkdir(parents=True, mode=0o700)
    (folder.inbox / "sub").mkdir(parents=True)
    shutil.copyfile(media_set.speech_mp4, folder.inbox / "sub" / "talk.mp4")
    worker, journal = _worker(tmp_path, config, engine, [10.0])
    enqueue_file(journal, folder.inbox / "sub" / "talk.mp4", "sub/talk.mp4", now=0)
    worker.run_once()
    assert os.listdir(tmp_path / "inbox" / ".proc") == []
    assert stat_mode(tmp_path / "inbox" / ".proc") == 0o700


def test_a_file_planted_where_the_hidden_area_goes_does_not_block_the_folder(
    tmp_path: Path, config_factory: Callable[..., Config], engine: WhisperEngine, media_set: MediaSet
) -> None:
    """A file or link named `.whisperd` in the inbox is moved aside (to failed/); files flow on, none fails."""
    config = config_factory({"processing": str(tmp_path / "inbox" / ".whisperd" / "processing")})
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    (folder.inbox / ".whisperd").write_text("in the way")
    shutil.copyfile(media_set.speech_mp4, folder.inbox / "talk.mp4")
    worker, journal = _worker(tmp_path, config, engine, [10.0])
    job_id = enqueue_file(journal, folder.inbox / "talk.mp4", "talk.mp4", now=0)
    worker.run_once()
    job = journal.get(job_id)
    assert job is not None and job.state == JobState.DONE
    assert (folder.failed / ".whisperd").read_text() == "in the way"
    assert (folder.inbox / ".whisperd").is_dir() and stat_mode(folder.inbox / ".whisperd") == 0o700


def test_names_with_terminal_escapes_are_shown_inert(tmp_path: Path) -> None:
    """`whisperd jobs` and `status` never write a file name's escape sequences or newlines to the terminal."""
    from daemon import operations
    from daemon.journal import FileIdentity

    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    evil = "\x1b]0;owned\x07\x1b[31mred\nFake: 99 done.mp4"
    journal.enqueue(FileIdentity("media", evil, 1, 1), priority=0, now=0, skip_if_done=False)
    text = operations.format_jobs(journal.jobs())
    header, line = text.split("\n")  # the header, and one line for the job: its newline is shown as \x0a
    assert "\x1b" not in text and "\x07" not in text and header.split()[0] == "ID"
    assert "\\x1b]0;owned\\x07\\x1b[31mred\\x0aFake: 99 done.mp4" in line
