"""Where a folder's files go: processing area, outbox, archive, failed. Places, not opened paths.

Every place is a configured root and a validated relative path below it (see fsutil.Place), so
nothing a file name contains can place a file outside the roots, and every step from the root
down is taken without following links. Relative paths arrive in the journal's escaped text form
(names.escape) and are turned back into the file system's names here.

The processing area (where an original waits while its job runs) is moved out of the share when
it can be: `<state_dir>/processing/<folder>` when the state directory is on the inbox's mount (a
move there is a rename), else a hidden `<inbox>/.whisperd/processing`, reached from the inbox
without following links and checked by inode whenever whisperd finds something there.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path, PurePosixPath

from daemon import names
from daemon.config import Folder
from daemon.fsutil import Place

ERROR_SUFFIX = ".error.txt"
HIDDEN_PROCESSING = PurePosixPath(".whisperd") / "processing"


def safe_relative(rel_text: str) -> PurePosixPath:
    """Return an escaped inbox-relative path in file system names; raise ValueError if it leaves the root."""
    rel = PurePosixPath(names.unescape(rel_text))
    if rel.is_absolute() or not rel.parts or any(part in ("..", ".", "") for part in rel.parts):
        raise ValueError(f"not a safe relative path: {rel_text!r}")
    return rel


def _mount_of(path: Path) -> str | None:
    """Return an identifier of the mount a path is on (from /proc/self/mountinfo), or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > best[0]):
            best = (len(point), fields[0])
    return best[1] if best else None


@functools.lru_cache(maxsize=64)
def _same_mount(inbox: Path, state_dir: Path, _inbox_dev: int, _state_dev: int) -> bool:
    # The same device is not enough: systemd's ReadWritePaths= makes each folder a bind mount of
    # its own, and a rename between two mounts fails (EXDEV) even on one file system.
    if _inbox_dev != _state_dev:
        return False
    mounts = _mount_of(inbox), _mount_of(state_dir)
    return mounts[0] is not None and mounts[0] == mounts[1]


def anchored(folder: Folder, path: Path) -> Place:
    """Return a configured folder as a place: below the inbox when it lies there, else a root of its own.

    A folder hidden inside the inbox (`.outbox`, `.whisperd/processing`) is reached from the inbox
    without following links like everything else share users can write to; only the configured
    paths themselves are trusted as written.
    """
    inbox = folder.inbox
    if path == inbox or inbox in path.parents:
        return Place(inbox, PurePosixPath(path.relative_to(inbox)))
    return Place(path, PurePosixPath())


def below(area: Place, rel: PurePosixPath) -> Place:
    """Return a place below another."""
    return Place(area.root, area.rel / rel)


def recorded_place(folder: Folder, recorded: str, roots: tuple[Path | None, ...]) -> Place | None:
    """Return the place of a path the journal recorded (escaped), if it lies below one of these roots."""
    path = Path(names.unescape(recorded))
    for root in roots:
        if root is not None and root in path.parents:
            return below(anchored(folder, root), PurePosixPath(path.relative_to(root)))
    return None


def processing_base(folder: Folder, state_dir: Path) -> Place:
    """Return the folder's processing area: configured, under the state directory, or hidden in the inbox."""
    if folder.processing is not None:
        return anchored(folder, folder.processing)
    try:
        inbox_dev, state_dev = os.stat(folder.inbox).st_dev, os.stat(state_dir).st_dev
    except OSError:
        return Place(folder.inbox, HIDDEN_PROCESSING)
    if _same_mount(folder.inbox, state_dir, inbox_dev, state_dev):
        return Place(state_dir / "processing" / folder.name, PurePosixPath())
    return Place(folder.inbox, HIDDEN_PROCESSING)


def processing_place(base: Place, job_id: int, rel_text: str) -> Place:
    """Return where a job's original waits while the job owns it."""
    return below(base, PurePosixPath(str(job_id)) / safe_relative(rel_text))


def recorded_processing(folder: Folder, recorded: str, job_id: int, rel_text: str) -> Place:
    """Return the processing place the journal recorded for a job (the area may have moved since).

    An area hidden in the inbox is rooted at the inbox, walked without following links like the
    rest of the share; any other area (configured, or under the state directory) is trusted.
    """
    rel = safe_relative(rel_text)
    job_dir = Path(names.unescape(recorded)).parents[len(rel.parts) - 1]
    if job_dir.name != str(job_id):
        raise ValueError(f"recorded processing path {recorded!r} is not job {job_id}'s")
    return below(anchored(folder, job_dir.parent), PurePosixPath(str(job_id)) / rel)


def inbox_place(folder: Folder, rel_text: str) -> Place:
    """Return the file's place in the inbox."""
    return Place(folder.inbox, safe_relative(rel_text))


def outbox_dir(folder: Folder, rel_text: str) -> Place:
    """Return the outbox folder mirroring the file's subfolder."""
    return below(anchored(folder, folder.outbox), safe_relative(rel_text).parent)


def archive_place(folder: Folder, rel_text: str) -> Place:
    """Return the archive place mirroring the file's subfolder (before collision handling)."""
    assert folder.archive is not None, "config validation requires archive for on_success: archive"
    return below(anchored(folder, folder.archive), safe_relative(rel_text))


def failed_place(folder: Folder, rel_text: str) -> Place:
    """Return the failed-folder place mirroring the file's subfolder (before collisions)."""
    return below(anchored(folder, folder.failed), safe_relative(rel_text))


def error_file(failed_original: Place) -> Place:
    """Return the error report's place beside a failed original: `<name>.error.txt` (within 255 bytes)."""
    return failed_original.with_name(names.fit(failed_original.name, ERROR_SUFFIX))


def work_dir(state_dir: Path, job_id: int) -> Path:
    """Return where a job keeps its decoded audio while it runs (local disk, removed when it ends)."""
    return state_dir / "work" / str(job_id)
