"""The environment's faults: what stops whisperd from working on a folder, found before a file is taken.

A share that went away, an outbox that is full or read-only, a state directory on a full disk, a
tool that was uninstalled: none of these is a file's fault. `Health` checks each folder's roots
(and what every folder needs) before its files are claimed; a folder with a problem is paused, with
the reason in `whisperd status` and the systemd status line and one log event, and checked again
with a growing pause until the problem clears, when it resumes by itself. Files are never failed
for it, and their attempts are not counted.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.config import Config, Folder, Settings
from daemon.proc import LIMIT_TOOLS

log = structlog.get_logger(__name__)

TOOLS = ("ffmpeg", "ffprobe", *LIMIT_TOOLS)
HEALTHY_RECHECK_S = 30.0  # a working folder is looked at again this often (cheap: a few stat calls)
PAUSED_RECHECK_S = 5.0  # a paused one after this, doubling …
PAUSED_RECHECK_MAX_S = 300.0  # … up to this


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _writable_dir(path: Path, what: str, floor: int) -> str | None:
    """Return why files cannot be written below path (a configured folder), or None."""
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return f"the {what} {path} is missing and cannot be created (a share that is not mounted?)"
        free = _free(parent)  # created when the first file needs it, on this file system
    elif not path.is_dir():
        return f"the {what} {path} is not a folder"
    elif not os.access(path, os.W_OK | os.X_OK):
        return f"the {what} {path} is not writable"
    else:
        free = _free(path)
    if free < floor:
        return f"the {what} {path} has {_size(free)} free, below min_free_space ({_size(floor)})"
    return None


def tools_problem() -> str | None:
    """Return which tools whisperd needs are missing, or None."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return None
    return (f"{', '.join(missing)} not installed (apt-get install ffmpeg; prlimit and ionice come with util-linux, "
            "nice with coreutils)")


def folder_problem(folder: Folder, settings: Settings) -> str | None:
    """Return why this folder's files cannot be processed now (the environment's fault), or None."""
    problem = tools_problem() or _writable_dir(settings.state_dir, "state directory", settings.min_free_space)
    if problem:
        return problem
    if not folder.inbox.is_dir():
        return f"the inbox {folder.inbox} is missing or not a folder (a share that is not mounted?)"
    if not os.access(folder.inbox, os.R_OK | os.X_OK):
        return f"the inbox {folder.inbox} cannot be read by this process (its permissions, or the share's)"
    roles = (("outbox", folder.outbox), ("archive", folder.archive), ("failed folder", folder.failed))
    for what, path in roles:
        if path is not None and (problem := _writable_dir(path, what, settings.min_free_space)):
            return problem
    return None


@dataclass
class _State:
    problem: str | None
    next_check: float
    wait_s: float


class Health:
    """Which folders are paused by the environment, checked with backoff; safe to share between threads."""

    def __init__(self, check: Callable[[Folder, Settings], str | None] = folder_problem) -> None:
        self.check = check
        self.on_change: Callable[[], None] | None = None  # told when a folder pauses or resumes
        self._states: dict[str, _State] = {}
        self._strikes: dict[str, int] = {}  # forced pauses in a row, per folder
        self._lock = threading.Lock()

    def paused(self, config: Config, now: float) -> dict[str, str]:
        """Return the paused folders with their reasons, checking those that are due."""
        changed = False
        with self._lock:
            for name, folder in config.folders.items():
                state = self._states.get(name)
                if state is None or now >= state.next_check:
                    changed |= self._check(name, folder, config.settings, now)
            for gone in set(self._states) - set(config.folders):
                del self._states[gone]
            paused = {name: s.problem for name, s in self._states.items() if s.problem}
        if changed and self.on_change is not None:
            self.on_change()
        return paused

    def recheck(self, config: Config, folder: str, now: float) -> str | None:
        """Check one folder now (a job just failed in a way the environment may explain); return its problem."""
        with self._lock:
            changed = self._check(folder, config.folders[folder], config.settings, now)
            problem = self._states[folder].problem
        if changed and self.on_change is not None:
            self.on_change()
        return problem

    def force_pause(self, folder: str, reason: str, now: float) -> None:
        """Pause a folder for a fault a job met that the checks cannot see (a quota, a disk that filled
        with the outputs); each such pause in a row waits twice as long before the folder is tried again."""
        with self._lock:
            strikes = self._strikes.get(folder, 0) + 1
            self._strikes[folder] = strikes
            wait = min(PAUSED_RECHECK_S * 2 ** (strikes - 1), PAUSED_RECHECK_MAX_S)
            before = self._states.get(folder)
            self._states[folder] = _State(reason, now + wait, wait)
        if before is None or before.problem != reason:
            log.warning("folder_paused", folder=folder, reason=reason, next_check_s=round(wait),
                        consequence="its files wait, none is failed for it; it resumes by itself")
            if self.on_change is not None:
                self.on_change()

    def worked(self, folder: str) -> None:
        """A job of the folder got its outputs written: forget the pauses in a row."""
        self._strikes.pop(folder, None)

    def retry_at(self, folder: str) -> float | None:
        """Return when a paused folder is checked next."""
        state = self._states.get(folder)
        return state.next_check if state is not None and state.problem else None

    def reasons(self) -> dict[str, str]:
        """Return the paused folders and why, as last checked."""
        return {name: s.problem for name, s in self._states.items() if s.problem}

    def _check(self, name: str, folder: Folder, settings: Settings, now: float) -> bool:
        """Check a folder; return True when its state changed (paused, resumed or another reason)."""
        try:
            problem = self.check(folder, settings)
        except OSError as err:
            problem = f"cannot check the folder: {err.strerror or err}"
        before = self._states.get(name)
        if problem is None:
            self._states[name] = _State(None, now + HEALTHY_RECHECK_S, PAUSED_RECHECK_S)
            if before is not None and before.problem:
                log.info("folder_resumed", folder=name, was=before.problem)
                return True
            return False
        wait = PAUSED_RECHECK_S
        if before is not None and before.problem is not None:
            wait = min(before.wait_s * 2, PAUSED_RECHECK_MAX_S)
        self._states[name] = _State(problem, now + wait, wait)
        if before is None or before.problem != problem:
            log.warning("folder_paused", folder=name, reason=problem, next_check_s=round(wait),
                        consequence="its files wait, none is failed for it; it resumes by itself")
            return True
        return False
