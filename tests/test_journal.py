"""The SQLite journal: idempotent enqueue, claim order, exclusive claims, recovery, schema."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from daemon.journal import FileIdentity, JobState
from daemon.journal.sqlite import MIGRATIONS, SqliteJournal


def _id(rel: str = "a.mp4", size: int = 10, mtime_ns: int = 1, folder: str = "f") -> FileIdentity:
    return FileIdentity(folder, rel, size, mtime_ns)


@pytest.fixture
def journal(tmp_path: Path) -> SqliteJournal:
    """A fresh journal file."""
    return SqliteJournal(tmp_path / "journal.sqlite3")


def test_enqueue_is_idempotent_on_the_file_identity(journal: SqliteJournal) -> None:
    """An event, a rescan and a NAS touching the same file make one job; a changed file makes another."""
    assert journal.enqueue(_id(), priority=0, now=1, skip_if_done=False) is not None
    assert journal.enqueue(_id(), priority=0, now=2, skip_if_done=False) is None
    assert journal.enqueue(_id(), priority=0, now=3, skip_if_done=True) is None
    assert journal.enqueue(_id(size=11), priority=0, now=4, skip_if_done=False) is not None
    assert len(journal.jobs()) == 2


def test_done_identity_is_skipped_only_when_asked(journal: SqliteJournal) -> None:
    """A done file seen again is skipped for on_success keep, and is a new arrival otherwise."""
    job = journal.enqueue(_id(), priority=0, now=1, skip_if_done=False)
    assert job is not None
    journal.claim(["f"], now=2, owner="h:1")
    journal.mark_done(job.id, None, now=3)
    assert journal.enqueue(_id(), priority=0, now=4, skip_if_done=True) is None
    again = journal.enqueue(_id(), priority=0, now=5, skip_if_done=False)
    assert again is not None and again.id != job.id


def test_a_file_that_failed_in_place_is_not_queued_again(journal: SqliteJournal) -> None:
    """A failed job whose original could not leave the inbox keeps its identity: rescans do not refail it."""
    job = journal.enqueue(_id(), priority=0, now=1, skip_if_done=False)
    assert job is not None
    journal.claim(["f"], now=2, owner="h:1")
    journal.mark_failed(job.id, "inbox is read-only", "claim", None, now=3)
    assert journal.enqueue(_id(), priority=0, now=4, skip_if_done=False) is None
    moved = journal.enqueue(_id("b.mp4"), priority=0, now=5, skip_if_done=False)
    assert moved is not None
    journal.claim(["f"], now=6, owner="h:1")
    journal.mark_failed(moved.id, "not media", "probe", "/failed/b.mp4", now=7)
    assert journal.enqueue(_id("b.mp4"), priority=0, now=8, skip_if_done=False) is not None  # dropped again


def test_claim_takes_priority_then_age_and_only_due_jobs(journal: SqliteJournal) -> None:
    """Higher folder priority first, then the oldest; retry_wait jobs wait for their time."""
    old = journal.enqueue(_id("old.mp4"), priority=0, now=1, skip_if_done=False)
    new = journal.enqueue(_id("new.mp4"), priority=0, now=2, skip_if_done=False)
    urgent = journal.enqueue(_id("urgent.mp4", folder="g"), priority=5, now=3, skip_if_done=False)
    assert old and new and urgent
    assert journal.claim(["f", "g"], now=10, owner="h:1").id == urgent.id  # type: ignore[union-attr]
    first = journal.claim(["f", "g"], now=10, owner="h:1")
    assert first is not None and first.id == old.id and first.state == JobState.RUNNING
    journal.mark_retry(first.id, "disk full", "publish", now=11, due=100)
    assert journal.claim(["f"], now=20, owner="h:1").id == new.id  # type: ignore[union-attr]
    assert journal.claim(["f"], now=50, owner="h:1") is None
    retried = journal.claim(["f"], now=100, owner="h:1")
    assert retried is not None and retried.id == old.id and retried.attempts == 1
    assert journal.claim(["other"], now=1000, owner="h:1") is None


def test_concurrent_claims_never_take_the_same_job(tmp_path: Path) -> None:
    """Four workers with their own connections claim 100 jobs: each job exactly once."""
    path = tmp_path / "journal.sqlite3"
    setup = SqliteJournal(path)
    for i in range(100):
        setup.enqueue(_id(f"{i}.mp4"), priority=0, now=i, skip_if_done=False)
    claimed: list[int] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        mine = SqliteJournal(path)
        while (job := mine.claim(["f"], now=1000, owner=owner)) is not None:
            with lock:
                claimed.append(job.id)
        mine.close()

    threads = [threading.Thread(target=work, args=(f"h:{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(j.id for j in setup.jobs())
    assert len(claimed) == len(set(claimed)) == 100


def test_recover_requeues_only_dead_owners_without_counting_an_attempt(journal: SqliteJournal) -> None:
    """Jobs left running by a dead process return to the queue; a live owner's job stays running."""
    for name in ("dead.mp4", "alive.mp4"):
        journal.enqueue(_id(name), priority=0, now=1, skip_if_done=False)
    dead = journal.claim(["f"], now=2, owner="h:111")
    alive = journal.claim(["f"], now=2, owner="h:222")
    assert dead and alive
    journal.set_stage(dead.id, "transcribe", now=2)  # it died with the file's audio in whisper
    recovered = journal.recover(lambda owner: owner == "h:111", now=3)
    assert [(j.id, j.state, j.attempts, j.crashes) for j in recovered] == [(dead.id, JobState.QUEUED, 0, 1)]
    assert journal.get(alive.id).state == JobState.RUNNING  # type: ignore[union-attr]


def test_a_job_interrupted_by_a_stop_request_is_not_a_crash(journal: SqliteJournal) -> None:
    """A daemon killed after it was asked to stop (TimeoutStopSec, a second Ctrl-C) counts no crash."""
    journal.enqueue(_id("a.mp4"), priority=0, now=1, skip_if_done=False)
    journal.enqueue(_id("b.mp4"), priority=0, now=1, skip_if_done=False)
    stopped = journal.claim(["f"], now=2, owner="h:111")
    killed = journal.claim(["f"], now=2, owner="h:222")
    assert stopped and killed
    for owner, job in (("h:111", stopped), ("h:222", killed)):
        journal.beat_instance(owner, now=2, started_at=1, models=[])
        journal.set_stage(job.id, "transcribe", now=2)
    journal.mark_stopping("h:111", now=3)
    recovered = journal.recover(lambda owner: True, now=4)
    assert {j.id: j.crashes for j in recovered} == {stopped.id: 0, killed.id: 1}
    assert journal.instances() == []  # the dead processes' records go


def test_schema_is_versioned_and_reopening_keeps_data(tmp_path: Path) -> None:
    """A new file gets the latest schema version; reopening migrates nothing and loses nothing."""
    path = tmp_path / "journal.sqlite3"
    first = SqliteJournal(path)
    first.enqueue(_id(), priority=0, now=1, skip_if_done=False)
    assert first.schema_version == len(MIGRATIONS)
    first.close()
    again = SqliteJournal(path)
    assert len(again.jobs()) == 1
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A journal written by a newer whisperd is not silently used by an older one."""
    path = tmp_path / "journal.sqlite3"
    SqliteJournal(path).close()
    sqlite3.connect(path).execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this whisperd knows"):
        SqliteJournal(path)


def test_paths_with_backslashes_are_escaped_by_the_migration(tmp_path: Path) -> None:
    """Rows written before names were escaped keep meaning the same files: their backslashes are doubled."""
    path = tmp_path / "journal.sqlite3"
    old = sqlite3.connect(path)
    for script in MIGRATIONS[:4]:
        for statement in script.split(";"):
            if statement.strip():
                old.execute(statement)
    old.execute("PRAGMA user_version=4")
    old.execute("INSERT INTO jobs (folder, rel_path, size, mtime_ns, state, next_attempt_at, created_at, updated_at,"
                " disposed_path) VALUES ('f', 'a\\x41.mp4', 1, 1, 'done', 0, 0, 0, '/arch/a\\x41.mp4')")
    old.commit()
    old.close()
    [job] = SqliteJournal(path).jobs()
    assert (job.rel_path, job.disposed_path) == ("a\\\\x41.mp4", "/arch/a\\\\x41.mp4")
    from daemon import names

    assert names.unescape(job.rel_path) == "a\\x41.mp4"


def _counted(journal: SqliteJournal) -> dict[str, dict[str, int]]:
    counted: dict[str, dict[str, int]] = {}
    for row in journal._read("SELECT folder, state, COUNT(*) AS n FROM jobs GROUP BY folder, state"):
        counted.setdefault(row["folder"], {})[row["state"]] = int(row["n"])
    return counted


def test_only_a_death_while_transcribing_counts_against_the_file(journal: SqliteJournal) -> None:
    """Killed while a file is claimed, moved, probed or published: no crash counted; while whisper decodes it: one."""
    stages = ("probe", "extract", "transcribe", "publish")
    for stage in (None, *stages):
        job = journal.enqueue(_id(f"{stage}.mp4"), priority=0, now=1, skip_if_done=False)
        assert job is not None
        journal.claim(["f"], now=2, owner="h:1")
        if stage:
            journal.set_stage(job.id, stage, now=2)
    recovered = journal.recover(lambda owner: True, now=3)
    assert {j.rel_path: j.crashes for j in recovered} == {
        "None.mp4": 0, "probe.mp4": 0, "extract.mp4": 0, "transcribe.mp4": 1, "publish.mp4": 0}


def test_counts_follow_every_change_without_scanning_the_jobs(journal: SqliteJournal) -> None:
    """The per-folder counts the status line reads every second stay equal to a full count of the jobs."""
    ids = [journal.enqueue(_id(f"{i}.mp4"), priority=0, now=1, skip_if_done=False).id for i in range(6)]  # type: ignore[union-attr]
    journal.claim(["f"], now=2, owner="h:1")
    journal.mark_done(ids[0], None, now=3)
    journal.claim(["f"], now=2, owner="h:1")
    journal.mark_failed(ids[1], "no", "probe", "/failed/1.mp4", now=3)
    journal.claim(["f"], now=2, owner="h:1")
    journal.mark_retry(ids[2], "busy", "publish", now=3, due=9)
    journal.drop(ids[3])
    assert journal.counts() == _counted(journal) == {"f": {"done": 1, "failed": 1, "retry_wait": 1, "queued": 2}}


def test_pruning_removes_old_history_but_never_a_file_that_stays(journal: SqliteJournal) -> None:
    """Finished jobs past the retention go; those whose original stays in the inbox, and recent or active ones, stay."""
    ids = [journal.enqueue(_id(f"{i}.mp4"), priority=0, now=1, skip_if_done=False).id for i in range(5)]  # type: ignore[union-attr]
    for _ in ids:
        journal.claim(["f"], now=1, owner="h:1")
    journal.mark_done(ids[0], "/archive/0.mp4", now=10)  # old: pruned
    journal.mark_failed(ids[1], "no", "probe", "/failed/1.mp4", now=10)  # old: pruned
    journal.mark_done(ids[2], "/inbox/2.mp4", now=10, stays=True)  # kept in the inbox: its row stops a requeue
    journal.mark_failed(ids[3], "cannot move", "claim", None, now=10)  # failed in place: the same
    journal.mark_done(ids[4], None, now=1000)  # recent
    assert journal.prune(before=500, batch=1) == 2
    assert sorted(j.id for j in journal.jobs()) == ids[2:]
    assert journal.counts() == _counted(journal)
    assert journal.enqueue(_id("2.mp4"), priority=0, now=2000, skip_if_done=True) is None  # still known
