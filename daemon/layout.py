"""Where a folder's files go: processing area, outbox, archive, failed. Pure path arithmetic.

Every path is built from the folder's configured roots and a validated relative path, so
nothing a file name contains can place a file outside them.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from daemon.config import Folder


def safe_relative(rel_path: str) -> PurePosixPath:
    """Return the inbox-relative path; raise ValueError if it is absolute or climbs with '..'."""
    rel = PurePosixPath(rel_path)
    if rel.is_absolute() or not rel.parts or any(part in ("..", ".", "") for part in rel.parts):
        raise ValueError(f"not a safe relative path: {rel_path!r}")
    return rel


def processing_root(folder: Folder) -> Path:
    """Return the folder's processing area (on the inbox's filesystem, so moves are renames)."""
    return folder.processing or folder.inbox / ".whisperd" / "processing"


def processing_path(folder: Folder, job_id: int, rel_path: str) -> Path:
    """Return where a job's original waits while the job owns it."""
    return processing_root(folder) / str(job_id) / safe_relative(rel_path)


def inbox_path(folder: Folder, rel_path: str) -> Path:
    """Return the file's place in the inbox."""
    return folder.inbox / safe_relative(rel_path)


def outbox_dir(folder: Folder, rel_path: str) -> Path:
    """Return the outbox directory mirroring the file's subfolder."""
    return folder.outbox / safe_relative(rel_path).parent


def archive_path(folder: Folder, rel_path: str) -> Path:
    """Return the archive location mirroring the file's subfolder (before collision handling)."""
    assert folder.archive is not None, "config validation requires archive for on_success: archive"
    return folder.archive / safe_relative(rel_path)


def failed_path(folder: Folder, rel_path: str) -> Path:
    """Return the failed-folder location mirroring the file's subfolder (before collisions)."""
    return folder.failed / safe_relative(rel_path)


def error_file(failed_original: Path) -> Path:
    """Return the error report's path beside a failed original: `<name>.error.txt`."""
    return failed_original.with_name(failed_original.name + ".error.txt")
