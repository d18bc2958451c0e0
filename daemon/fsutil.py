"""Durable filesystem steps: atomic writes and moves that survive a crash at any instant."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TextIO


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries to disk, so a rename in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(target: Path) -> Path:
    """Return a hidden temporary name beside target; watchers and users skip dotfiles.

    Its length does not depend on target's, so a name near the 255-byte limit still has one.
    """
    return target.with_name(f".whisperd-{uuid.uuid4().hex[:12]}.tmp")


def atomic_write_text(target: Path, write: Callable[[TextIO], None]) -> None:
    """Write a text file so that readers see either the old file or the whole new one."""
    tmp = temp_name(target)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def free_name(target: Path) -> Path:
    """Return target, or `name (1).ext`, `name (2).ext` … for the first name not taken."""
    candidate, n = target, 1
    while candidate.exists() or candidate.is_symlink():
        candidate = target.with_name(f"{target.stem} ({n}){target.suffix}")
        n += 1
    return candidate


def move_to_free_name(source: Path, target: Path) -> Path:
    """Move a file to target, or `name (1).ext` … if taken, never replacing a file; return where it went.

    A hard link claims the name atomically (it fails if another process took it meanwhile);
    filesystems without hard links (some SMB mounts) fall back to checking, then renaming.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = free_name(target)
        try:
            os.link(source, candidate, follow_symlinks=False)
        except FileExistsError:
            continue  # taken between the check and the link: try the next name
        except OSError:
            return durable_move(source, candidate)
        source.unlink()
        fsync_dir(candidate.parent)
        fsync_dir(source.parent)
        return candidate


def durable_move(source: Path, target: Path) -> Path:
    """Move a file and flush both directories; across filesystems copy, fsync, then unlink."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        tmp = temp_name(target)
        shutil.copy2(source, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
        source.unlink()
    fsync_dir(target.parent)
    fsync_dir(source.parent)
    return target
