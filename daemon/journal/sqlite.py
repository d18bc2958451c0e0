"""The SQLite journal: WAL mode on local disk, immediate transactions for claims, versioned schema.

Several processes may share one file (one whisperd instance per GPU): every write runs in a
`BEGIN IMMEDIATE` transaction, so two workers can never claim the same job.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon.journal import FileIdentity, Instance, Job, JobState

# Each entry migrates the schema from version i to i + 1; never edit a released entry.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        folder TEXT NOT NULL,
        rel_path TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        last_error TEXT,
        last_stage TEXT,
        processing_path TEXT,
        published_at REAL,
        outputs TEXT NOT NULL DEFAULT '[]',
        disposed_path TEXT,
        progress REAL,
        owner TEXT,
        timings TEXT NOT NULL DEFAULT '{}'
    );
    -- Idempotent enqueue: one active job per file identity, however often it is seen.
    CREATE UNIQUE INDEX jobs_active_identity ON jobs (folder, rel_path, size, mtime_ns)
        WHERE state IN ('queued', 'running', 'retry_wait');
    CREATE INDEX jobs_due ON jobs (state, next_attempt_at);
    CREATE INDEX jobs_identity ON jobs (folder, rel_path, size, mtime_ns);
    """,
    # 2: per-job rule overrides (`whisperd enqueue --list` items with their own task or language).
    """
    ALTER TABLE jobs ADD COLUMN overrides TEXT NOT NULL DEFAULT '{}';
    """,
    # 3: how often the process died while a job ran (kill -9, OOM, watchdog, GPU fault). Not an
    # attempt (the file may be fine), but a file that keeps killing whisperd must be set aside.
    """
    ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: the daemon processes and the models resident in each (`whisperd models`).
    """
    CREATE TABLE instances (
        owner TEXT PRIMARY KEY,
        started_at REAL NOT NULL,
        beat_at REAL NOT NULL,
        models TEXT NOT NULL DEFAULT '[]'
    );
    """,
    # 5: the inode of the original as it was taken: what is found in the processing area later
    # (after a restart, during a retry) must be that very file, not one planted in its place.
    # Paths are kept in names.escape's form from now on, where a backslash is doubled.
    """
    ALTER TABLE jobs ADD COLUMN file_device INTEGER;
    ALTER TABLE jobs ADD COLUMN file_inode INTEGER;
    UPDATE jobs SET rel_path = replace(rel_path, '\\', '\\\\'),
        processing_path = replace(processing_path, '\\', '\\\\'),
        disposed_path = replace(disposed_path, '\\', '\\\\')
        WHERE instr(rel_path || coalesce(processing_path, '') || coalesce(disposed_path, ''), '\\') > 0;
    """,
    # 6: what the user should know about a result (a file that decoded much shorter than it declares).
    """
    ALTER TABLE jobs ADD COLUMN warning TEXT;
    """,
    # 7: when a daemon was asked to stop: a job it left running then (killed at TimeoutStopSec, or a
    # second signal) was interrupted by an operator, not crashed by its file.
    """
    ALTER TABLE instances ADD COLUMN stopping_at REAL;
    """,
    # 8: history that does not slow the daemon down. Counts per folder and state live in a small
    # table kept by triggers (the status line reads it every second); finished jobs are pruned
    # after the retention, except those whose original stays in the inbox (kept, or failed in place):
    # their row is what stops the file from being queued again. Pending disposals by finish time.
    """
    ALTER TABLE jobs ADD COLUMN stays INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET stays = 1 WHERE state = 'failed' AND disposed_path IS NULL;
    CREATE TABLE job_counts (
        folder TEXT NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (folder, state)
    ) WITHOUT ROWID;
    INSERT INTO job_counts SELECT folder, state, COUNT(*) FROM jobs GROUP BY folder, state;
    CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (folder, state, n) VALUES (NEW.folder, NEW.state, 1)
            ON CONFLICT (folder, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE folder = OLD.folder AND state = OLD.state;
    END;
    CREATE TRIGGER job_counts_update AFTER UPDATE OF state, folder ON jobs
        WHEN OLD.state IS NOT NEW.state OR OLD.folder IS NOT NEW.folder BEGIN
        UPDATE job_counts SET n = n - 1 WHERE folder = OLD.folder AND state = OLD.state;
        INSERT INTO job_counts (folder, state, n) VALUES (NEW.folder, NEW.state, 1)
            ON CONFLICT (folder, state) DO UPDATE SET n = n + 1;
    END;
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state IN ('done', 'failed') AND stays = 0;
    """,
    # 9: the folders a daemon has paused, and why (a full outbox, a lost share), for `whisperd status`.
    """
    ALTER TABLE instances ADD COLUMN paused TEXT NOT NULL DEFAULT '{}';
    """,
    # 10: the stage a running job is in. A process that dies while whisper decodes a file's audio
    # may have been killed by that file; dying while it is claimed, moved or published is not its doing.
    """
    ALTER TABLE jobs ADD COLUMN running_stage TEXT;
    """,
    # 11: folders an operator paused (`whisperd pause`; '*' is every folder): no new work is claimed
    # from them, by any instance, until `whisperd resume`. And the audio each job held, for throughput.
    """
    CREATE TABLE pauses (
        folder TEXT PRIMARY KEY,
        since REAL NOT NULL
    );
    ALTER TABLE jobs ADD COLUMN audio_s REAL;
    CREATE INDEX jobs_finished_at ON jobs (finished_at);
    """,
    # 12: why a failed job failed (refused input, too long, retries spent, cancelled): the HTTP API
    # answers 400, 422, 500 or "cancelled" from it. NULL for jobs that failed before this column.
    """
    ALTER TABLE jobs ADD COLUMN failure TEXT;
    """,
)


def statements(script: str) -> list[str]:
    """Return the SQL statements of a script; a trigger's body (BEGIN … END) stays one statement."""
    found, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip().rstrip(";").strip():
                found.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        found.append(buffer.strip())
    return found

ACTIVE = tuple(s.value for s in JobState.active())
# The stages in which whisperd's own process works on a file's content (ffmpeg runs apart): a death
# there counts as a crash against the file.
CRASH_STAGES = ("transcribe",)


class SqliteJournal:
    """The job store in one SQLite file; safe to use from several threads and processes."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a finished job must survive a power cut
        self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        self._migrate()

    @property
    def schema_version(self) -> int:
        """Return the schema version of the open file."""
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._write():
            version = self.schema_version
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} has journal schema {version}, newer than this whisperd knows "
                    f"({len(MIGRATIONS)}); upgrade whisperd"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements(script):
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: no two processes interleave a read-then-claim.
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        data = dict(row)
        data["state"] = JobState(data["state"])
        data["outputs"] = tuple(json.loads(data["outputs"] or "[]"))
        data["timings"] = json.loads(data["timings"] or "{}")
        data["overrides"] = json.loads(data["overrides"] or "{}")
        return Job(**data)

    def enqueue(
        self, identity: FileIdentity, *, priority: int, now: float, skip_if_done: bool,
        overrides: Mapping[str, Any] | None = None,
    ) -> Job | None:
        """Return a new queued job, or None when this identity is active (or done, if asked)."""
        with self._write() as db:
            states = ACTIVE + (("done",) if skip_if_done else ())
            marks = ",".join("?" * len(states))
            # A failed job whose original could not be moved out of the inbox (no disposed_path)
            # still owns the identity: otherwise every rescan would fail the same file again.
            known = db.execute(
                f"SELECT 1 FROM jobs WHERE folder=? AND rel_path=? AND size=? AND mtime_ns=? "
                f"AND (state IN ({marks}) OR (state='failed' AND disposed_path IS NULL)) LIMIT 1",
                (identity.folder, identity.rel_path, identity.size, identity.mtime_ns, *states),
            ).fetchone()
            if known:
                return None
            cursor = db.execute(
                "INSERT INTO jobs (folder, rel_path, size, mtime_ns, state, priority, next_attempt_at,"
                " created_at, updated_at, overrides) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (identity.folder, identity.rel_path, identity.size, identity.mtime_ns, priority, now, now, now,
                 json.dumps(dict(overrides or {}))),
            )
            row = db.execute("SELECT * FROM jobs WHERE id=?", (cursor.lastrowid,)).fetchone()
        return self._job(row)

    def claim(self, folders: Collection[str], *, now: float, owner: str) -> Job | None:
        """Return the next due job of these folders, now RUNNING and owned by owner, or None."""
        if not folders:
            return None
        marks = ",".join("?" * len(folders))
        with self._write() as db:
            row = db.execute(
                f"SELECT id FROM jobs WHERE state IN ('queued', 'retry_wait') AND next_attempt_at <= ?"
                f" AND folder IN ({marks}) ORDER BY priority DESC, created_at, id LIMIT 1",
                (now, *folders),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', owner=?, started_at=?, updated_at=?, progress=0, running_stage=NULL"
                " WHERE id=?",
                (owner, now, now, row["id"]),
            )
            claimed = db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return self._job(claimed)

    def get(self, job_id: int) -> Job | None:
        """Return one job by id."""
        rows = self._read("SELECT * FROM jobs WHERE id=?", (job_id,))
        return self._job(rows[0]) if rows else None

    def jobs(
        self, states: Collection[JobState] | None = None, *, limit: int | None = None, newest_first: bool = False
    ) -> list[Job]:
        """Return jobs, optionally only those in the given states, oldest first (or latest changed, at most limit)."""
        where, params = "", []
        if states is not None:
            params = [JobState(s).value for s in states]
            where = f"WHERE state IN ({','.join('?' * len(params))})"
        # Newest: the latest changed (a failure retried by hand fails again under its old id).
        order = "updated_at DESC, id DESC" if newest_first else "id"
        tail = f" LIMIT {int(limit)}" if limit is not None else ""
        rows = self._read(f"SELECT * FROM jobs {where} ORDER BY {order}{tail}", params)
        return [self._job(r) for r in rows]

    def finished_since(self, since: float) -> list[Job]:
        """Return the jobs that ended (done or failed) at or after `since`, oldest first."""
        rows = self._read("SELECT * FROM jobs WHERE finished_at >= ? AND state IN ('done', 'failed')"
                          " ORDER BY finished_at", (since,))
        return [self._job(r) for r in rows]

    def _update(self, job_id: int, sql: str, params: Sequence[Any]) -> None:
        with self._write() as db:
            db.execute(f"UPDATE jobs SET {sql} WHERE id=?", (*params, job_id))

    def set_processing(
        self, job_id: int, path: str, *, now: float, device: int | None = None, inode: int | None = None
    ) -> None:
        """Record where the original will be moved while the job owns it, and which inode it is."""
        self._update(job_id, "processing_path=?, file_device=?, file_inode=?, updated_at=?",
                     (str(path), device, inode, now))

    def set_stage(self, job_id: int, stage: str, *, now: float) -> None:
        """Record which stage a running job has reached (probe, extract, transcribe, publish)."""
        self._update(job_id, "running_stage=?, updated_at=?", (stage, now))

    def set_progress(self, job_id: int, fraction: float, *, now: float) -> None:
        """Record how far a running job is."""
        self._update(job_id, "progress=?, updated_at=?", (fraction, now))

    def mark_published(
        self, job_id: int, outputs: Sequence[str], timings: dict[str, float], *, now: float,
        warning: str | None = None, audio_s: float | None = None,
    ) -> None:
        """Record that outputs are durable (and what the user should know); only the disposal is left."""
        self._update(
            job_id, "published_at=?, outputs=?, timings=?, warning=?, audio_s=?, progress=1, updated_at=?",
            (now, json.dumps(list(outputs)), json.dumps(timings), warning, audio_s, now),
        )

    def mark_done(self, job_id: int, disposed_path: str | None, *, now: float, stays: bool = False) -> None:
        """Finish a job successfully; `stays`: the original stays in the inbox (on_success: keep)."""
        self._update(
            job_id, "state='done', disposed_path=?, finished_at=?, updated_at=?, last_error=NULL, stays=?",
            (disposed_path, now, now, int(stays)),
        )

    def mark_retry(self, job_id: int, error: str, stage: str | None, *, now: float, due: float) -> None:
        """Count a failed attempt and make the job due again at `due`."""
        self._update(
            job_id, "state='retry_wait', attempts=attempts+1, last_error=?, last_stage=?,"
            " next_attempt_at=?, updated_at=?, progress=NULL",
            (error, stage, due, now),
        )

    def mark_failed(
        self, job_id: int, error: str, stage: str | None, disposed_path: str | None, *, now: float,
        failure: str = "gave_up",
    ) -> None:
        """Count a failed attempt and end the job as failed (in place, when disposed_path is None)."""
        self._update(
            job_id, "state='failed', attempts=attempts+1, last_error=?, last_stage=?, disposed_path=?,"
            " finished_at=?, updated_at=?, progress=NULL, stays=?, failure=?",
            (error, stage, disposed_path, now, now, int(disposed_path is None),
             getattr(failure, "value", failure)),  # a Failure member is stored as its value
        )

    def mark_cancelled(
        self, job_id: int, reason: str, *, now: float,
        states: Collection[JobState] = (JobState.QUEUED, JobState.RETRY_WAIT),
    ) -> bool:
        """End a job in one of `states` as cancelled; False when it is in none (one statement: no
        worker's claim can come between the look and the change)."""
        marks = ", ".join("?" for _ in states)
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET state='failed', last_error=?, last_stage='cancel', finished_at=?, updated_at=?,"
                f" progress=NULL, stays=0, failure='cancelled' WHERE id=? AND state IN ({marks})",
                (reason, now, now, job_id, *(JobState(s).value for s in states)),
            )
            return cursor.rowcount == 1

    def requeue(self, job_id: int, *, now: float, crashed: bool = False, due: float | None = None) -> None:
        """Return a running job to the queue without counting an attempt; `crashed` counts a crash.

        `due` (default now) is when it may be claimed again.
        """
        self._update(
            job_id,
            "state='queued', owner=NULL, progress=NULL, next_attempt_at=?, updated_at=?, crashes=crashes+?",
            (now if due is None else due, now, int(crashed)),
        )

    def drop(self, job_id: int) -> None:
        """Forget a job whose file vanished or changed before it was taken."""
        with self._write() as db:
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    def set_disposal(self, job_id: int, path: str, *, now: float) -> None:
        """Record where the original is about to go (archive, failed, back to the inbox)."""
        self._update(job_id, "disposed_path=?, updated_at=?", (path, now))

    def recover(self, is_dead: Callable[[str | None], bool], *, now: float) -> list[Job]:
        """Return jobs left RUNNING by workers that are gone, queued again.

        A crash is counted against the job only when its worker died while transcribing it, and had
        not been asked to stop (an operator's restart that ended in SIGKILL is not the file's doing).
        The dead workers' records go.
        """
        with self._write() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state='running'").fetchall()
            stale = [r for r in rows if is_dead(r["owner"])]
            for row in stale:
                stopping = db.execute("SELECT 1 FROM instances WHERE owner=? AND stopping_at IS NOT NULL",
                                      (row["owner"],)).fetchone()
                crashed = row["running_stage"] in CRASH_STAGES and not stopping
                db.execute(
                    "UPDATE jobs SET state='queued', owner=NULL, progress=NULL, running_stage=NULL,"
                    " next_attempt_at=?, updated_at=?, crashes=crashes+? WHERE id=?",
                    (now, now, int(crashed), row["id"]),
                )
            for owner in {r["owner"] for r in stale if r["owner"]}:
                db.execute("DELETE FROM instances WHERE owner=?", (owner,))
            recovered = [db.execute("SELECT * FROM jobs WHERE id=?", (r["id"],)).fetchone() for r in stale]
        return [self._job(r) for r in recovered]

    def requeue_failed(self, job_id: int, *, now: float) -> bool:
        """Return True when a failed job is queued again as new (attempts reset); False if it cannot be.

        False when the job is not failed, or when the same file already has an active job.
        """
        try:
            with self._write() as db:
                cursor = db.execute(
                    "UPDATE jobs SET state='queued', attempts=0, crashes=0, next_attempt_at=?, updated_at=?,"
                    " owner=NULL,"
                    " processing_path=NULL, file_device=NULL, file_inode=NULL, published_at=NULL,"
                    " disposed_path=NULL, finished_at=NULL, failure=NULL,"
                    " progress=NULL WHERE id=? AND state='failed'",
                    (now, now, job_id),
                )
                return cursor.rowcount == 1
        except sqlite3.IntegrityError:
            return False  # the file is already queued again (it was moved back by hand)

    def counts(self) -> dict[str, dict[str, int]]:
        """Return the number of jobs per folder and state (from the counts table: no scan of the jobs)."""
        counts: dict[str, dict[str, int]] = {}
        for row in self._read("SELECT folder, state, n FROM job_counts WHERE n > 0"):
            counts.setdefault(row["folder"], {})[row["state"]] = int(row["n"])
        return counts

    def prune(self, *, before: float, batch: int = 5000) -> int:
        """Delete finished jobs that ended before `before`, except those whose original stays in the
        inbox; return how many. In batches: a long delete must not hold the write lock for seconds."""
        total = 0
        while True:
            with self._write() as db:
                deleted = db.execute(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state IN ('done', 'failed')"
                    " AND stays = 0 AND finished_at < ? LIMIT ?)", (before, batch),
                ).rowcount
            total += deleted
            if deleted < batch:
                return total

    def next_due_at(self, folders: Collection[str]) -> float | None:  # uses the jobs_due index
        """Return when the earliest waiting job of these folders is due, or None."""
        if not folders:
            return None
        marks = ",".join("?" * len(folders))
        rows = self._read(
            f"SELECT MIN(next_attempt_at) FROM jobs WHERE state IN ('queued', 'retry_wait')"
            f" AND folder IN ({marks})",
            tuple(folders),
        )
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None

    def beat_instance(
        self, owner: str, *, now: float, started_at: float, models: Sequence[str],
        paused: Mapping[str, str] | None = None,
    ) -> None:
        """Record that a daemon process is alive, which models it holds and which folders it paused."""
        with self._write() as db:
            db.execute(
                "INSERT INTO instances (owner, started_at, beat_at, models, paused) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET beat_at=excluded.beat_at, models=excluded.models,"
                " started_at=excluded.started_at, paused=excluded.paused",
                (owner, started_at, now, json.dumps(list(models)), json.dumps(dict(paused or {}))),
            )

    def pause(self, folder: str, *, now: float) -> bool:
        """Stop claiming from a folder ('*': every folder); return False if it was paused already."""
        with self._write() as db:
            return db.execute("INSERT OR IGNORE INTO pauses (folder, since) VALUES (?, ?)", (folder, now)).rowcount == 1

    def resume(self, folder: str) -> bool:
        """Claim from a folder again ('*': lift the pause of every folder); return False if it was not paused."""
        with self._write() as db:
            return db.execute("DELETE FROM pauses WHERE folder=?", (folder,)).rowcount == 1

    def pauses(self) -> dict[str, float]:
        """Return the folders an operator paused ('*' for all), and since when."""
        return {r["folder"]: float(r["since"]) for r in self._read("SELECT folder, since FROM pauses")}

    def mark_stopping(self, owner: str, *, now: float) -> None:
        """Record that a daemon process was asked to stop."""
        with self._write() as db:
            db.execute("UPDATE instances SET stopping_at=? WHERE owner=?", (now, owner))

    def remove_instance(self, owner: str) -> None:
        """Forget a daemon process that stopped cleanly."""
        with self._write() as db:
            db.execute("DELETE FROM instances WHERE owner=?", (owner,))

    def instances(self) -> list[Instance]:
        """Return the daemon processes that reported themselves, most recent beat first."""
        rows = self._read("SELECT * FROM instances ORDER BY beat_at DESC")
        return [Instance(r["owner"], r["started_at"], r["beat_at"], tuple(json.loads(r["models"])), r["stopping_at"],
                         json.loads(r["paused"])) for r in rows]

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
