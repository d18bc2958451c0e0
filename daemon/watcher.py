"""Watching inboxes: watchdog observers (inotify or polling), full rescans, and a stability gate.

The watcher only detects: every sighting of a file (an event or a rescan) touches the stability
tracker, and `poll(now)` hands on the files that have settled. It never processes anything.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
    FileSystemMovedEvent,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon import fsutil, names
from daemon.config import Folder
from daemon.errors import UnsafePath

log = structlog.get_logger(__name__)

# watchdog's inotify emitter warns when a directory created inside a recursive watch (our own
# processing area, a copied folder) gets its watch added twice; the events are not affected.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


@dataclass(frozen=True)
class ReadyFile:
    """A file that has stopped changing: what the journal enqueues."""

    folder: str
    rel_path: str
    size: int
    mtime_ns: int


@dataclass
class _Sighting:
    last_touch: float  # monotonic time of the last event or scan that saw the file
    size: int
    mtime_ns: int


class StabilityTracker:
    """Decides when a file is completely written. No limit on how long arrival may take.

    Ready means: no touch for `delay` seconds, AND a fresh lstat shows the size and mtime seen
    before. Callers pass `now` (monotonic seconds). Entries that are not regular files (links,
    FIFOs, sockets, devices) settle like files and are handed on too: never opened here, they
    are refused and reported once by the worker, and leave the inbox.
    """

    def __init__(self, delay_s: float, root: Path | None = None) -> None:
        self.delay_s = delay_s
        self.root = root  # the inbox: paths below it are looked at without following a link on the way
        self._pending: dict[Path, _Sighting] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def _lstat(self, path: Path) -> os.stat_result:
        if self.root is None:
            return os.lstat(path)
        try:
            st = fsutil.lstat(fsutil.Place(self.root, PurePosixPath(path.relative_to(self.root))))
        except UnsafePath:
            st = None  # the way to it is a link now: as good as gone from the inbox
        if st is None:
            raise FileNotFoundError(path)
        return st

    def touch(self, path: Path, now: float) -> None:
        """Record that something happened to path (an event, or a scan saw it)."""
        try:
            st = self._lstat(path)
        except FileNotFoundError:
            with self._lock:
                self._pending.pop(path, None)
            return
        with self._lock:
            seen = self._pending.get(path)
            if seen is None:
                self._pending[path] = _Sighting(now, st.st_size, st.st_mtime_ns)
            else:
                seen.last_touch = now

    def poll(self, now: float) -> list[tuple[Path, os.stat_result]]:
        """Return the files that have settled, forgetting them; unsettled ones wait on."""
        with self._lock:
            due = [(p, s) for p, s in self._pending.items() if now - s.last_touch >= self.delay_s]
        ready = []
        for path, seen in due:
            try:
                st = self._lstat(path)
            except FileNotFoundError:
                self._forget(path)
                continue
            if (st.st_size, st.st_mtime_ns) == (seen.size, seen.mtime_ns):
                if stat.S_ISREG(st.st_mode) and self._held_for_writing(path):
                    # Quiet, but a local writer still has it open (a copy paused mid-way): wait on.
                    with self._lock:
                        seen.last_touch = now
                    continue
                self._forget(path)
                ready.append((path, st))
            else:
                # Still growing, written without an event (a network share): start the wait again.
                with self._lock:
                    seen.size, seen.mtime_ns, seen.last_touch = st.st_size, st.st_mtime_ns, now
        return ready

    def _held_for_writing(self, path: Path) -> bool:
        """Return True when a process on this machine has the file open for writing.

        A read lease is refused while anyone holds the file open for writing (where leases are
        permitted: the file's owner, or CAP_LEASE); elsewhere /proc's descriptor tables tell, for
        the processes this one may see. Writers on other machines (SMB/NFS) are seen by neither:
        for them the stability delay, and the worker's re-checks, are what count.
        """
        try:
            fd = fsutil.open_read(fsutil.Place(self.root, PurePosixPath(path.relative_to(self.root)))) \
                if self.root is not None else os.open(path, fsutil.READ_FLAGS)
        except (OSError, ValueError):
            return False
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EBUSY):
                return True
            return writers_in_proc(os.fstat(fd))  # no leases here (not the owner, or NFS)
        else:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            return False
        finally:
            os.close(fd)

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)


def writers_in_proc(target: os.stat_result) -> bool:
    """Return True when a process visible in /proc has this inode open for writing."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or another user's and hidden from us
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = int(next(line for line in info if line.startswith("flags:")).split()[1], 8)
            except (OSError, StopIteration, ValueError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                return True
    return False


class _EventHandler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._handle(event)
        except Exception as err:  # an exception here would end the observer's thread: the rescan covers it
            log.warning("event_not_handled", folder=self.watcher.folder.name, error=f"{type(err).__name__}: {err}")

    def _handle(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        if isinstance(event, (DirCreatedEvent, DirMovedEvent)):
            # A folder moved or copied in may bring files that raised no event of their own.
            target = event.dest_path if isinstance(event, DirMovedEvent) else event.src_path
            self.watcher.scan(Path(os.fsdecode(target)))
            return
        if event.is_directory:
            return
        path = event.dest_path if isinstance(event, FileSystemMovedEvent) else event.src_path
        self.watcher.saw(Path(os.fsdecode(path)))


class FolderWatcher:
    """One folder's observer, rescans and stability tracker."""

    def __init__(self, folder: Folder, clock: Callable[[], float]) -> None:
        self.folder = folder
        self.clock = clock
        self.tracker = StabilityTracker(folder.stability_delay, root=folder.inbox)
        self._observer: BaseObserver | None = None

    @property
    def watching(self) -> bool:
        """Return True while an observer is running for this folder."""
        return self._observer is not None and self._observer.is_alive()

    def start(self) -> None:
        """Start observing the inbox (inotify, or polling); OSError when it cannot be watched.

        A missing inbox is never created: that would hide an unmounted share behind an empty folder.
        """
        if not self.folder.inbox.is_dir():
            raise FileNotFoundError(f"the inbox {self.folder.inbox} is missing or not a folder")
        # Polling for network shares: inotify never hears about other machines' writes.
        observer: BaseObserver = (
            PollingObserver(timeout=self.folder.poll_interval) if self.folder.watch == "poll" else Observer()
        )
        observer.schedule(_EventHandler(self), str(self.folder.inbox), recursive=self.folder.recursive)
        observer.daemon = True
        observer.start()
        self._observer = observer
        log.info("watching", folder=self.folder.name, inbox=str(self.folder.inbox), mode=self.folder.watch)

    def stop(self) -> None:
        """Stop observing; pending sightings are forgotten (the next start rescans)."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None

    def relative(self, path: Path) -> str | None:
        """Return path relative to the inbox if it is a candidate (accepted, not too deep), else None."""
        try:
            rel = path.relative_to(self.folder.inbox)
        except ValueError:
            return None
        if not rel.parts or (not self.folder.recursive and len(rel.parts) > 1):
            return None
        text = names.escape(rel.as_posix())  # the journal's printable form of a name that is not UTF-8
        return text if self.folder.accepts(text) else None

    def saw(self, path: Path) -> None:
        """Touch a file an event reported, if it is a candidate."""
        if self.relative(path) is not None:
            self.tracker.touch(path, self.clock())

    def scan(self, top: Path | None = None) -> int:
        """Touch every candidate file under top (default: the whole inbox); return how many."""
        count = 0
        now = self.clock()
        for path in self._walk(top or self.folder.inbox):
            if self.relative(path) is not None:
                self.tracker.touch(path, now)
                count += 1
        return count

    def _walk(self, top: Path) -> Iterator[Path]:
        """Yield every entry below top that is not a real folder: files, and links to folders too.

        Folders are entered through descriptors from the inbox down, never through a link; a link
        is yielded like a file so the worker refuses and reports it.
        """
        inbox = self.folder.inbox
        try:
            rel = PurePosixPath(top.relative_to(inbox))
        except ValueError:
            return
        start = fsutil.Place(inbox, rel)
        if rel.parts:
            st = fsutil.lstat(start)
            if st is None:
                return
            if not stat.S_ISDIR(st.st_mode):
                yield top  # a link (or anything) that was reported as a folder
                return

        def skip(below: PurePosixPath) -> bool:
            # Prune ignored folders (.whisperd, @eaDir, #recycle …) instead of walking them.
            return not self.folder.recursive or self.folder.builtin_ignored((rel / below).as_posix())

        try:
            for place, _st in fsutil.walk_files(start, skip=skip):
                yield place.path
        except UnsafePath:
            return  # a folder on the way became a link: the next scan sees the link itself

    def poll(self, now: float) -> list[ReadyFile]:
        """Return the files that have settled since the last poll."""
        ready = []
        for path, st in self.tracker.poll(now):
            rel = self.relative(path)
            if rel is not None:
                ready.append(ReadyFile(self.folder.name, rel, st.st_size, st.st_mtime_ns))
        return ready
