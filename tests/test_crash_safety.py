"""Crash injection: whisperd killed (SIGKILL) at every step boundary of a job, restarted each time.

The test-only crash points (daemon/crashpoints.py) make the daemon kill itself at a named step:
after the claim, after the take, after extraction, during transcription (after a window), during
publishing after k of the outputs, after publishing before the disposal, between the archive's
hard link and the unlink, and after the disposal before `done`. Each lifetime of the daemon is
both the recovery from the previous kill and the next trial. At the end every dropped file must
be accounted for exactly once: done, with one complete set of outputs and one archived original;
no hidden temporary file anywhere; the journal's integrity check clean.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import media
import pytest
from conftest import SUMMARY
from daemon_harness import Daemon, drop_file, files_under

from daemon.journal import JobState

POINTS = ("claimed", "taken", "extracted", "window", "output:1", "output:2", "published", "linked", "disposed")
TRIALS = 54  # kills; each point several times, at different files and jobs
FILES = 14


def _leftovers(*roots: Path) -> list[str]:
    """Return hidden temporary files, decoded audio and originals left in processing areas."""
    found = []
    for root in roots:
        if root.exists():
            found += [str(p) for p in root.rglob("*") if p.is_file() and p.name.startswith(".whisperd-")]
    return found


@pytest.mark.slow
def test_kills_at_every_step_lose_nothing_and_duplicate_nothing(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """54 kills at the 8 step boundaries of a job: every file done once, one output set, one archived copy."""
    clips = []
    for i in range(FILES):
        clips.append(media.tone_wav(tmp_path / "clips" / f"clip{i:02d}.wav", freq=300 + 40 * i, seconds=1.0))
    daemon = make_daemon({"stability_delay": 0.2})
    inbox, outbox, archive = daemon.folder("inbox"), daemon.folder("outbox"), daemon.folder("archive")
    state = Path(daemon.data["state_dir"])
    dropped: dict[str, bytes] = {}
    kills = 0
    next_file = 0
    for trial in range(TRIALS):
        if next_file < FILES and (trial % 3 == 0 or not any(j.state in JobState.active() for j in daemon.jobs())):
            for clip in clips[next_file : next_file + 2]:  # keep work in the queue for the next crash
                drop_file(clip, inbox / clip.name)
                dropped[clip.name] = clip.read_bytes()
            next_file += 2
        point = POINTS[trial % len(POINTS)]
        daemon.start(env={"WHISPERD_TEST_CRASH_AT": point}, wait_ready=False)  # it may die before `ready`
        assert daemon.proc is not None
        try:
            daemon.proc.wait(timeout=60)
        except Exception:  # nothing left that reaches this point: stop it and go on
            daemon.stop()
            continue
        if daemon.proc.returncode == -9:
            kills += 1
        # At every instant: no original archived twice, nothing failed.
        assert [n for n in files_under(archive) if " (" in n] == [], files_under(archive)
        assert files_under(daemon.folder("failed")) == []
    for clip in clips[next_file:]:
        drop_file(clip, inbox / clip.name)
        dropped[clip.name] = clip.read_bytes()
    daemon.start()
    jobs = daemon.wait_done(len(dropped), timeout=180)
    daemon.stop()

    done = {j.rel_path: j for j in jobs if j.state == JobState.DONE}
    lost = sorted(set(dropped) - set(done))
    duplicated = [n for n in files_under(archive) if " (" in n] + [
        name for name in dropped if sum(j.rel_path == name for j in jobs) > 1
    ]
    partial = [
        name for name in dropped
        if sorted(p for p in files_under(outbox) if Path(p).stem == Path(name).stem) != [
            f"{Path(name).stem}.srt", f"{Path(name).stem}.txt"]
        or (archive / name).read_bytes() != dropped[name]
    ]  # fmt: skip
    leftovers = _leftovers(inbox, outbox, archive, state) + [
        str(p) for p in (state / "work").rglob("*") if p.is_file()
    ] + [str(p) for p in (state / "processing").rglob("*") if p.is_file()]  # fmt: skip
    with sqlite3.connect(state / "journal.sqlite3") as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    SUMMARY.append(f"crash trials: {kills}, lost: {len(lost)}, duplicated: {len(duplicated)}, "
                   f"partial outputs: {len(partial)}, leftover temp files: {len(leftovers)}")
    assert kills >= 50, kills
    assert lost == [] and duplicated == [] and partial == [] and leftovers == []
    assert files_under(inbox) == [] and integrity == "ok"
    assert sorted(files_under(archive)) == sorted(dropped)
