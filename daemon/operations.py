"""Operator commands that work beside a running daemon: they read and write its journal.

`status`, `jobs`, `retry` and `enqueue` share the daemon's journal file (SQLite in WAL mode lets a
reader in while the daemon writes; writes take the same immediate transactions as the daemon's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon import fsutil, layout, names
from daemon.config import Config, Folder, apply_overrides
from daemon.errors import ConfigError, WhisperdError
from daemon.instances import owner_is_dead
from daemon.journal import FileIdentity, Job, JobState, Journal, open_journal

RECENT_FAILURES = 10
QUEUE_SHOWN = 20
# A daemon beats every 5 s (service.INSTANCE_BEAT_S), and stops beating when its worker hangs: a beat
# older than this means it is not responding. Kept here so that status imports no service code.
NOT_RESPONDING_AFTER_S = 30.0
STOPPED_AFTER_S = 600.0  # another host's daemon silent this long is taken as gone (its pid cannot be asked)
DAY_S = 86400.0
HOUR_S = 3600.0


class OperationError(WhisperdError):
    """An operator command cannot do what was asked; the message says why."""


def open_daemon_journal(config: Config) -> Journal:
    """Return the daemon's journal; raise OperationError if the daemon never created one."""
    try:
        return open_journal(config.settings.state_dir, create=False)
    except FileNotFoundError as err:
        raise OperationError(f"no journal at {err}: has whisperd run with this config?") from None


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds") if ts else None


def attempts_made(job: Job) -> int:
    """Return how many times the job was tried, the one running or the one that succeeded included.

    The journal counts failed attempts only: a job done at the first try has 0 there, 1 here.
    """
    return job.attempts + (1 if job.state in (JobState.RUNNING, JobState.DONE) else 0)


def job_view(job: Job, now: float) -> dict[str, Any]:
    """Return a job as plain JSON-able data, with elapsed time and ETA while it runs."""
    view: dict[str, Any] = {
        "id": job.id, "folder": job.folder, "path": job.rel_path, "state": job.state.value,
        "attempts": attempts_made(job), "created_at": _iso(job.created_at), "updated_at": _iso(job.updated_at),
    }  # fmt: skip
    if job.state == JobState.RUNNING:
        elapsed = max(now - (job.started_at or now), 0.0)
        progress = job.progress or 0.0
        view |= {"progress": round(progress, 3), "elapsed_s": round(elapsed, 1), "owner": job.owner,
                 "eta_s": round(elapsed / progress * (1 - progress), 1) if progress >= 0.02 else None}
    if job.state == JobState.RETRY_WAIT:
        view["next_attempt_at"] = _iso(job.next_attempt_at)
    if job.last_error and job.state in (JobState.RETRY_WAIT, JobState.FAILED):
        view |= {"error": job.last_error, "stage": job.last_stage}
    elif job.last_error:  # an earlier attempt's, not the state the job is in now
        view |= {"previous_error": job.last_error, "previous_stage": job.last_stage}
    if job.state == JobState.FAILED:
        view |= {"original": job.disposed_path, "finished_at": _iso(job.finished_at)}
    if job.state == JobState.DONE:
        view |= {"outputs": list(job.outputs), "original": job.disposed_path, "finished_at": _iso(job.finished_at)}
    if job.warning:
        view["warning"] = job.warning
    return view


def daemon_state(journal: Journal, now: float) -> dict[str, Any]:
    """Return whether the daemon runs: `running`, `not_responding` (since its last beat) or `stopped`.

    A process that was killed leaves its last beat behind: on this host its pid tells it is gone;
    another host's process is judged by its beat alone.
    """
    # Another host's process is judged by its beat: silent for STOPPED_AFTER_S, it is gone.
    alive = [i for i in journal.instances() if not owner_is_dead(i.owner) and now - i.beat_at <= STOPPED_AFTER_S]
    if not alive:
        return {"state": "stopped", "instances": []}
    instances = []
    for instance in alive:
        responding = now - instance.beat_at <= NOT_RESPONDING_AFTER_S
        host, _, pid = instance.owner.rpartition(":")
        instances.append({
            "owner": instance.owner, "host": host, "pid": int(pid) if pid.isdigit() else None,
            "state": "running" if responding else "not_responding",
            "started_at": _iso(instance.started_at), "last_beat_at": _iso(instance.beat_at),
            "models": list(instance.models), "stopping": instance.stopping_at is not None,
        })  # fmt: skip
    running = [i for i in instances if i["state"] == "running"]
    state = "running" if running else "not_responding"
    last_beat = max(i.beat_at for i in alive)
    return {"state": state, "since": None if running else _iso(last_beat), "instances": instances}


def status_report(config: Config, journal: Journal, now: float | None = None) -> dict[str, Any]:
    """Return whether the daemon runs; per folder what waits, runs, retries, failed in the last day and
    why it is paused; throughput over the last hour; the running jobs, the queue and recent failures."""
    now = time.time() if now is None else now
    daemon = daemon_state(journal, now)
    counts = journal.counts()
    waiting = journal.jobs([JobState.QUEUED, JobState.RETRY_WAIT])
    finished_today = journal.finished_since(now - DAY_S)
    held = journal.pauses()
    environment: dict[str, str] = {}
    for instance in journal.instances():
        if not owner_is_dead(instance.owner):
            environment |= instance.paused
    # A running job is shown as running only while the process that claimed it lives; a killed
    # daemon's job is handed back when it starts again.
    running: list[dict[str, Any]] = []
    interrupted: list[dict[str, Any]] = []
    responding = {i["owner"] for i in daemon["instances"] if i["state"] == "running"}
    for job in journal.jobs([JobState.RUNNING]):
        (running if job.owner in responding else interrupted).append(job_view(job, now))
    names_ = list(config.folders) + [name for name in counts if name not in config.folders]
    folders: dict[str, dict[str, Any]] = {}
    for name in names_:  # folders removed from the config but still in the journal come last
        by_state = counts.get(name, {})
        why = environment.get(name) or (
            "paused by the operator (whisperd resume)" if name in held or "*" in held else None)
        folders[name] = {
            "queued": by_state.get(JobState.QUEUED.value, 0),
            "running": sum(1 for j in running if j["folder"] == name),
            "interrupted": sum(1 for j in interrupted if j["folder"] == name),
            "retrying": by_state.get(JobState.RETRY_WAIT.value, 0),
            "done_24h": sum(1 for j in finished_today if j.folder == name and j.state == JobState.DONE),
            "failed_24h": sum(1 for j in finished_today if j.folder == name and j.state == JobState.FAILED),
            "paused": why,
        }
    return {
        "daemon": daemon,
        "folders": folders,
        "paused": {name: f["paused"] for name, f in folders.items() if f["paused"]} | environment,
        "operator_paused": sorted(held),
        "throughput_1h": throughput(journal.finished_since(now - HOUR_S)),
        "running": running,
        "interrupted": interrupted,
        "queue": [job_view(j, now) for j in sorted(waiting, key=lambda j: (-j.priority, j.next_attempt_at))][
            :QUEUE_SHOWN
        ],
        "queued": len(waiting),
        "recent_failures": [job_view(j, now) for j in journal.jobs([JobState.FAILED], limit=RECENT_FAILURES,
                                                                    newest_first=True)],
    }


def pause(journal: Journal, folders: Sequence[str], *, resume: bool, now: float | None = None) -> list[str]:
    """Pause ('*': every folder) or resume folders; return what changed, in words.

    Resuming one folder while every folder is paused lifts nothing: the whole-daemon pause stays
    until `resume` without a folder.
    """
    now = time.time() if now is None else now
    lines = []
    for folder in folders:
        what = "every folder" if folder == "*" else f"folder {folder}"
        if resume:
            lifted = journal.resume(folder)
            lines.append(f"resumed {what}" if lifted else f"{what} was not paused")
            if folder != "*" and "*" in journal.pauses():
                lines.append("every folder is still paused: `whisperd resume` without --folder lifts that")
        else:
            added = journal.pause(folder, now=now)
            lines.append(f"paused {what}: no new file is started; the running one finishes" if added
                         else f"{what} was already paused")
    return lines


def throughput(finished: Sequence[Job]) -> dict[str, Any]:
    """Return what finished jobs amount to: files done and failed, hours of audio transcribed, and the
    real-time factor (audio seconds per second spent on them, every stage counted)."""
    done = [j for j in finished if j.state == JobState.DONE]
    audio_s = sum(j.audio_s or 0.0 for j in done)
    work_s = sum(sum(j.timings.values()) for j in done if j.audio_s)
    return {"files": len(done), "failed": sum(1 for j in finished if j.state == JobState.FAILED),
            "audio_hours": round(audio_s / 3600, 3),
            "realtime_factor": round(audio_s / work_s, 1) if work_s > 0 else None}


def format_status(report: dict[str, Any]) -> str:
    """Return the status report as text for a terminal."""
    lines = [_daemon_line(report["daemon"])]
    for name, f in report["folders"].items():
        summary = (f"{f['queued']} queued, {f['running']} running, {f['retrying']} retrying, "
                   + (f"{f['interrupted']} interrupted, " if f["interrupted"] else "")
                   + f"{f['done_24h']} done and {f['failed_24h']} failed in 24 h")
        lines.append(f"{name}: {summary}" + (f"; paused: {f['paused']}" if f["paused"] else ""))
    for name, reason in report["paused"].items():
        if name not in report["folders"]:  # the environment's reasons that are not a folder's (tools, models)
            lines.append(f"paused: {name}: {reason}")
    rate = report["throughput_1h"]
    speed = f", {rate['realtime_factor']}x real time" if rate["realtime_factor"] else ""
    lines.append(f"last hour: {rate['files']} file(s), {rate['audio_hours']} h of audio{speed}")
    for job in report["running"]:
        eta = f", about {_duration(job['eta_s'])} left" if job.get("eta_s") is not None else ""
        lines.append(f"running: #{job['id']} {job['folder']}/{job['path']} {round(job['progress'] * 100)}%{eta}")
    for job in report["interrupted"]:
        lines.append(f"interrupted: #{job['id']} {job['folder']}/{job['path']} (its daemon is gone or not "
                     "responding; it is tried again when whisperd starts again on that host)")
    if not report["running"]:
        lines.append("running: nothing")
    lines.append(f"queued: {report['queued']}")
    for job in report["queue"]:
        when = f" (retry at {job['next_attempt_at']})" if job["state"] == "retry_wait" else ""
        lines.append(f"  #{job['id']} {job['folder']}/{job['path']}{when}")
    if report["recent_failures"]:
        lines.append("recent failures:")
        for job in report["recent_failures"]:
            lines.append(f"  #{job['id']} {job['folder']}/{job['path']} [{job.get('stage')}]: {job.get('error')}")
    return "\n".join(names.printable(line) for line in lines)  # a file name can hold terminal escapes


def _daemon_line(daemon: dict[str, Any]) -> str:
    if daemon["state"] == "stopped":
        return "daemon: stopped"
    if daemon["state"] == "not_responding":
        return f"daemon: not responding since {daemon['since']} ({', '.join(i['owner'] for i in daemon['instances'])})"
    running = [i for i in daemon["instances"] if i["state"] == "running"]
    who = ", ".join(f"{i['owner']} since {i['started_at']}" + (" (stopping)" if i["stopping"] else "")
                    + (f", model in memory: {', '.join(i['models'])}" if i["models"] else ", no model in memory")
                    for i in running)
    return f"daemon: running ({who})"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def list_jobs(
    journal: Journal, *, states: Sequence[str] = (), since: float | None = None, folder: str | None = None
) -> list[Job]:
    """Return jobs filtered by state, last update time and folder, oldest first."""
    jobs = journal.jobs([JobState(s) for s in states] if states else None)
    return [
        j for j in jobs
        if (since is None or j.updated_at >= since) and (folder is None or j.folder == folder)
    ]  # fmt: skip


JOBS_HEADER = f"{'ID':>6}  {'STATE':<10}  {'UPDATED':<19}  {'TRIES':>5}  FILE"


def format_jobs(jobs: Iterable[Job]) -> str:
    """Return a header and one line per job: id, state, last update, tries, folder/path, and why
    it is waiting or failed."""
    lines = [JOBS_HEADER]
    for job in jobs:
        updated = datetime.fromtimestamp(job.updated_at).strftime("%Y-%m-%d %H:%M:%S")
        waiting_or_failed = job.state in (JobState.RETRY_WAIT, JobState.FAILED)
        error = f"  [{job.last_stage}] {job.last_error}" if job.last_error and waiting_or_failed else ""
        where = f"{job.folder}/{job.rel_path}"
        lines.append(f"{job.id:>6}  {job.state.value:<10}  {updated}  {attempts_made(job):>5}  {where}{error}")
    return "\n".join(names.printable(line) for line in lines)  # a file name can hold terminal escapes


@dataclass
class Outcome:
    """What an operator command did with each item it was given."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def retry_failed(
    config: Config, journal: Journal, selectors: Sequence[str], *, folder: str | None = None
) -> Outcome:
    """Move failed originals back into their inboxes and queue their jobs again, attempts reset.

    Selectors are job ids, paths of failed originals, or inbox-relative paths; with none, every
    failed job of `folder`.
    """
    if not selectors and folder is None:
        raise OperationError("name the jobs or files to retry, or --folder NAME for all its failures")
    if folder is not None and folder not in config.folders:
        raise OperationError(f"no folder named {folder!r} in the config")
    jobs = [j for j in journal.jobs() if folder is None or j.folder == folder]
    outcome = Outcome()
    if selectors:
        chosen, unknown = _select(jobs, selectors)
        if unknown and not chosen:
            raise OperationError(f"no job matches: {', '.join(unknown)}")
        outcome.skipped += [f"{selector}: no job matches" for selector in unknown]
        # A path retried once may also name its earlier, finished jobs: the failed one is meant.
        failed_keys = {(j.folder, j.rel_path) for j in chosen if j.state == JobState.FAILED}
        chosen = [j for j in chosen if j.state == JobState.FAILED or (j.folder, j.rel_path) not in failed_keys]
    else:
        chosen = [j for j in jobs if j.state == JobState.FAILED]
    for job in chosen:
        if job.state != JobState.FAILED:
            outcome.skipped.append(f"#{job.id} {job.folder}/{job.rel_path}: {_not_failed(job)}")
            continue
        label = f"#{job.id} {job.folder}/{job.rel_path}"
        target_folder = config.folders.get(job.folder)
        if target_folder is None:
            outcome.skipped.append(f"{label}: its folder is no longer configured")
            continue
        original = _failed_original(target_folder, job)
        if original is None or not fsutil.exists(original):
            outcome.skipped.append(f"{label}: the original is no longer at {job.disposed_path}")
            continue
        target = layout.inbox_place(target_folder, job.rel_path)
        try:
            fsutil.move_new(original, target)
        except FileExistsError:
            outcome.skipped.append(f"{label}: {target.display} is taken by another file")
            continue
        with contextlib.suppress(FileNotFoundError):
            fsutil.unlink(layout.error_file(original))
        if journal.requeue_failed(job.id, now=time.time()):
            outcome.done.append(label)
        else:
            outcome.skipped.append(f"{label}: moved back to the inbox; the daemon queues it as a new arrival")
    return outcome


def _not_failed(job: Job) -> str:
    """Return why a job is not retried: the state it is in, in words."""
    return {
        JobState.QUEUED: "not failed: it is queued and will run",
        JobState.RUNNING: "not failed: it is running now",
        JobState.RETRY_WAIT: f"not failed: it waits for its next attempt (at {_iso(job.next_attempt_at)})",
        JobState.DONE: "not failed: it is done (to process it again: whisperd enqueue FILE)",
    }.get(job.state, f"not failed: it is {job.state.value}")


def _failed_original(folder: Folder, job: Job) -> fsutil.Place | None:
    """Return the place of a failed job's original, below the folder's failed root."""
    return layout.recorded_place(folder, job.disposed_path, (folder.failed,)) if job.disposed_path else None


def _select(jobs: list[Job], selectors: Sequence[str]) -> tuple[list[Job], list[str]]:
    chosen: dict[int, Job] = {}
    unknown = []
    for selector in selectors:
        matches = [
            j for j in jobs
            if (selector.isdigit() and j.id == int(selector))
            or selector == j.rel_path
            or (j.disposed_path and Path(selector).resolve() == Path(j.disposed_path))
        ]  # fmt: skip
        if not matches:
            unknown.append(selector)
        chosen.update((j.id, j) for j in matches)
    return list(chosen.values()), unknown


@dataclass(frozen=True)
class EnqueueItem:
    """One file to queue, with rule fields for it alone (task, language, …)."""

    path: Path
    overrides: dict[str, Any] = field(default_factory=dict)


def read_list(text: str) -> list[EnqueueItem]:
    """Return the items of an enqueue list: one path per line, or JSON lines with a "path" key."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise OperationError(f"line {number}: not valid JSON: {err.msg}") from err
            if not isinstance(data, dict) or not isinstance(data.get("path"), str):
                raise OperationError(f'line {number}: a JSON line needs a "path" string')
            path = data.pop("path")
            items.append(EnqueueItem(Path(path), data))
        else:
            items.append(EnqueueItem(Path(line)))
    return items


def _copy_into(path: Path, out: Any) -> None:
    with open(path, "rb") as handle:
        shutil.copyfileobj(handle, out, 1 << 20)


def _owning_folder(config: Config, path: Path) -> Folder | None:
    for folder in config.folders.values():
        inbox = folder.inbox.resolve()
        if inbox in path.parents:
            return folder
    return None


def override_problems(config: Config, folder: str, rel: str, overrides: Mapping[str, Any]) -> list[str]:
    """Return what is wrong with a file's rule once per-job overrides apply (empty when it is coherent)."""
    try:
        rule = apply_overrides(config.rule_for(folder, rel), overrides)
    except ConfigError as err:
        return [str(p) for p in err.problems]
    return rule.problems()


def queue_file(journal: Journal, folder: Folder, rel: str, path: Path, overrides: Mapping[str, Any]) -> Job | None:
    """Return the job queued now for a file in a folder's inbox, with per-job overrides (None: already queued)."""
    st = path.stat()
    return journal.enqueue(
        FileIdentity(folder.name, rel, st.st_size, st.st_mtime_ns),
        priority=folder.priority, now=time.time(), skip_if_done=False, overrides=overrides,
    )


def enqueue(
    config: Config, journal: Journal, items: Sequence[EnqueueItem], *, folder: str | None = None
) -> Outcome:
    """Queue files now, without waiting for the watcher; a file outside every inbox is copied into
    `folder`'s inbox first. Per-item overrides are validated against that file's rule.

    Every valid item is queued; each invalid one is listed in `skipped` with the reason.
    """
    if folder is not None and folder not in config.folders:
        raise OperationError(f"no folder named {folder!r} in the config")
    problems = []
    plans = []
    for item in items:
        path = Path(os.path.abspath(item.path))
        if not path.is_file() or path.is_symlink():
            problems.append(f"{item.path}: not a regular file")
            continue
        owner = _owning_folder(config, path)
        if owner is None and folder is None:
            problems.append(f"{item.path}: outside every inbox; give --folder NAME to copy it into one")
            continue
        target_folder = owner or config.folders[folder]  # type: ignore[index]
        rel = names.escape(path.relative_to(target_folder.inbox.resolve()).as_posix() if owner else path.name)
        if owner is not None and not target_folder.accepts(rel):
            problems.append(f"{item.path}: the folder's include/exclude rules or built-in ignores skip it")
            continue
        refused = override_problems(config, target_folder.name, rel, item.overrides)
        if refused:
            problems.append(f"{item.path}: {'; '.join(refused)}")
            continue
        plans.append((path, target_folder, rel, item.overrides, owner is None))

    outcome = Outcome(skipped=problems)  # the valid ones are queued all the same
    for path, target_folder, rel, overrides, copy in plans:
        if copy:
            # Copy under a hidden name the watcher ignores, then rename: it never sees half a file.
            wanted = layout.inbox_place(target_folder, rel)
            staged = wanted.with_name(fsutil.temp_name())
            fsutil.atomic_write_binary(staged, lambda out, path=path: _copy_into(path, out))  # type: ignore[misc]
            target = fsutil.move_to_free_name(staged, wanted)  # never replaces a file that arrived meanwhile
            rel = names.escape(target.rel.as_posix())
            path = target.path
        job = queue_file(journal, target_folder, rel, path, overrides)
        label = f"{target_folder.name}/{rel}"
        if job is None:
            outcome.skipped.append(f"{label}: already queued")
        else:
            outcome.done.append(f"#{job.id} {label}" + (f" {json.dumps(overrides)}" if overrides else ""))
    return outcome
