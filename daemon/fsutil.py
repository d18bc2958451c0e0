"""File system steps that never leave their root and survive a crash at any instant.

Every place whisperd touches is a `Place`: a configured root (inbox, outbox, archive, failed,
processing area, state or model directory, trusted as the config names it) and a relative path
below it. Each step opens the root and then every folder below it with O_NOFOLLOW | O_DIRECTORY
and acts through those descriptors (openat, renameat, linkat, unlinkat), so a symbolic link
planted at any level, at any moment, is never followed: it is refused with UnsafePath. Files are
written to a hidden temporary name, fsynced, renamed into place, and their folder fsynced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TextIO

from daemon import names
from daemon.crashpoints import crash_point
from daemon.errors import UnsafePath

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO never waits for a writer (it is refused right after, by its type).
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
TEMP_PREFIX = ".whisperd-"
TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class Place:
    """A path below a trusted root; `rel` holds file system names (surrogates for undecodable bytes)."""

    root: Path
    rel: PurePosixPath

    @classmethod
    def of(cls, path: Path) -> Place:
        """Return a trusted path as a place: its folder is the root (for state and model files)."""
        return cls(path.parent, PurePosixPath(path.name))

    @property
    def path(self) -> Path:
        """Return the full path (for messages; never opened by name)."""
        return self.root / self.rel

    @property
    def display(self) -> str:
        """Return the full path in its printable form (undecodable bytes as \\xNN)."""
        return names.escape(str(self.path))

    @property
    def name(self) -> str:
        """Return the last component."""
        return self.rel.name

    @property
    def parent(self) -> Place:
        """Return the folder this place is in."""
        return Place(self.root, self.rel.parent)

    def child(self, name: str) -> Place:
        """Return a place inside this one."""
        return Place(self.root, self.rel / name)

    def with_name(self, name: str) -> Place:
        """Return the place beside this one with another name."""
        return Place(self.root, self.rel.with_name(name))


def _open_root(root: Path, create: bool) -> int:
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise
    root.mkdir(parents=True, exist_ok=True)
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@contextlib.contextmanager
def opened_dir(place: Place, *, create: bool = False, mode: int = 0o777) -> Iterator[int]:
    """Yield a descriptor of the folder at `place`, reached from its root without following a link.

    With `create`, missing folders are made (with `mode`, less the umask). A component that is a
    symlink or not a folder raises UnsafePath; a missing one (without `create`) raises FileNotFoundError.
    """
    fd = _open_root(place.root, create)
    try:
        walked = PurePosixPath()
        for part in place.rel.parts:
            walked /= part
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
                child = _open_child_dir(part, fd, place, walked)
            except OSError as err:
                raise _unsafe(err, place, walked) from err
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _open_child_dir(part: str, fd: int, place: Place, walked: PurePosixPath) -> int:
    try:
        return os.open(part, DIR_FLAGS, dir_fd=fd)
    except OSError as err:
        raise _unsafe(err, place, walked) from err


def _unsafe(err: OSError, place: Place, walked: PurePosixPath) -> Exception:
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        where = names.escape(str(place.root / walked))
        return UnsafePath(f"{where} is a symbolic link or not a folder; whisperd does not follow links", where)
    return err


def lstat(place: Place) -> os.stat_result | None:
    """Return the entry's own status (a link is not followed), or None when there is none."""
    try:
        with opened_dir(place.parent) as fd:
            return os.stat(place.name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def exists(place: Place) -> bool:
    """Return True when something (a file, a link, anything) has this name."""
    return lstat(place) is not None


def open_read(place: Place) -> int:
    """Return a read descriptor of the file at place; a symlink at any level raises UnsafePath."""
    with opened_dir(place.parent) as fd:
        try:
            return os.open(place.name, READ_FLAGS, dir_fd=fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UnsafePath(f"{place.display} is a symbolic link; whisperd does not follow links",
                                 place.display) from err
            raise


def fsync_dir(directory: Path) -> None:
    """Flush a trusted folder's entries to disk, so a rename in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name() -> str:
    """Return a hidden temporary file name; watchers and users skip dotfiles.

    Its length does not depend on the target's, so a name near the 255-byte limit still has one.
    """
    return f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"


def atomic_write_text(place: Place | Path, write: Callable[[TextIO], None]) -> None:
    """Write a text file so that readers see either the old file or the whole new one.

    The folders on the way are created. Whatever had the name before (a file, a planted link) is
    replaced, never written through.
    """
    _atomic_write(place, lambda fd: _write_text(fd, write))


def atomic_write_binary(place: Place | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a binary file (a converted model) like atomic_write_text."""
    _atomic_write(place, lambda fd: _write_binary(fd, write))


def _write_text(fd: int, write: Callable[[TextIO], None]) -> None:
    with open(fd, "w", encoding="utf-8", closefd=False) as handle:
        write(handle)


def _write_binary(fd: int, write: Callable[[BinaryIO], None]) -> None:
    with open(fd, "wb", closefd=False) as handle:
        write(handle)


def _atomic_write(place: Place | Path, fill: Callable[[int], None]) -> None:
    place = place if isinstance(place, Place) else Place.of(place)
    with opened_dir(place.parent, create=True) as dir_fd:
        tmp = temp_name()
        fd = os.open(tmp, NEW_FILE_FLAGS, 0o644, dir_fd=dir_fd)
        try:
            try:
                fill(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, place.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)


def free_name(place: Place) -> Place:
    """Return place, or `name (1).ext`, `name (2).ext` … for the first name not taken (all within 255 bytes)."""
    with opened_dir(place.parent, create=True) as fd:
        return place.with_name(_free_in(fd, place.name))


def _candidates(name: str) -> Iterator[str]:
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    yield name
    n = 1
    while True:
        yield names.fit(f"{stem} ({n})", f"{dot}{ext}")
        n += 1


def _free_in(dir_fd: int, name: str) -> str:
    for candidate in _candidates(name):
        try:
            os.stat(candidate, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return candidate
    raise AssertionError("unreachable")


def move(source: Place, target: Place) -> Place:
    """Move an entry (a file, or a link itself: never its target), replacing what target held.

    Both folders are flushed. Across file systems only a regular file with one name is copied (from
    a descriptor opened without following links, its mode and mtime kept), flushed, and then the
    original removed; anything else cannot cross and raises OSError(EXDEV).
    """
    with opened_dir(source.parent) as src_fd, opened_dir(target.parent, create=True) as dst_fd:
        try:
            os.rename(source.name, target.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            infd = os.open(source.name, READ_FLAGS, dir_fd=src_fd)
            try:
                st = os.fstat(infd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise OSError(errno.EXDEV, "only a regular file with one name can be moved to another "
                                               "file system", source.display) from err
                copy_fd_into(infd, dst_fd, target.name)
            finally:
                os.close(infd)
            os.unlink(source.name, dir_fd=src_fd)
        os.fsync(dst_fd)
        os.fsync(src_fd)
    return target


def copy_fd_into(
    infd: int, dst_fd: int, name: str, *, before_rename: Callable[[os.stat_result], None] | None = None
) -> os.stat_result:
    """Copy an open file into a folder as `name`: hidden temp name, mode and mtime kept, fsynced, renamed.

    `before_rename` sees the copy's status before it takes its name (to record its inode first).
    Returns the copy's status.
    """
    st = os.fstat(infd)
    tmp = temp_name()
    outfd = os.open(tmp, NEW_FILE_FLAGS, 0o600, dir_fd=dst_fd)
    try:
        try:
            offset = 0
            while chunk := os.pread(infd, 1 << 20, offset):
                os.write(outfd, chunk)
                offset += len(chunk)
            os.fchmod(outfd, stat.S_IMODE(st.st_mode))
            os.fsync(outfd)
            copied = os.fstat(outfd)
        finally:
            os.close(outfd)
        if before_rename is not None:
            before_rename(copied)
        os.replace(tmp, name, src_dir_fd=dst_fd, dst_dir_fd=dst_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dst_fd)
        raise
    # The original's mtime only once the copy has its name: a temp file with an old mtime would look
    # abandoned to another instance's start-up clean-up.
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)
    os.fsync(dst_fd)
    return os.stat(name, dir_fd=dst_fd, follow_symlinks=False)


def move_to_free_name(source: Place, wanted: Place) -> Place:
    """Move an entry to wanted, or `name (1).ext` … if taken, never replacing anything; return where it went.

    A hard link claims the name atomically (it fails if another process took it meanwhile);
    file systems without hard links (some SMB mounts) fall back to checking, then moving.
    """
    with opened_dir(source.parent) as src_fd, opened_dir(wanted.parent, create=True) as dst_fd:
        for candidate in _candidates(wanted.name):
            try:
                os.link(source.name, candidate, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            except FileExistsError:
                continue  # taken: try the next name
            except OSError:
                break  # no hard links here (or across file systems): check, then move
            crash_point("linked")
            os.unlink(source.name, dir_fd=src_fd)
            os.fsync(dst_fd)
            os.fsync(src_fd)
            return wanted.with_name(candidate)
        free = _free_in(dst_fd, wanted.name)
    return move(source, wanted.with_name(free))


def move_new(source: Place, target: Place) -> None:
    """Move an entry to target only if that name is free (FileExistsError otherwise): never replaces.

    A hard link claims the name atomically; without hard links (some SMB mounts), check then move.
    """
    with opened_dir(source.parent) as src_fd, opened_dir(target.parent, create=True) as dst_fd:
        try:
            os.link(source.name, target.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError:
            try:
                os.stat(target.name, dir_fd=dst_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                raise FileExistsError(errno.EEXIST, "name taken", target.display) from None
        else:
            os.unlink(source.name, dir_fd=src_fd)
            os.fsync(dst_fd)
            os.fsync(src_fd)
            return
    move(source, target)


def probe_writable(folder: Place) -> None:
    """Create the folder if needed and make sure a file can be created in it; raise OSError if not."""
    with opened_dir(folder, create=True) as fd:
        name = temp_name()
        os.close(os.open(name, NEW_FILE_FLAGS, 0o600, dir_fd=fd))
        os.unlink(name, dir_fd=fd)


def unlink(place: Place) -> None:
    """Remove an entry (a link itself, never its target) and flush its folder."""
    with opened_dir(place.parent) as fd:
        os.unlink(place.name, dir_fd=fd)
        os.fsync(fd)


def remove_empty_dirs(folder: Place, stop: PurePosixPath | None = None) -> None:
    """Remove now-empty folders from `folder` up to `stop` (default the root; not removed)."""
    rel = folder.rel
    stop = stop if stop is not None else PurePosixPath()
    while rel.parts and rel != stop and stop in rel.parents:
        try:
            with opened_dir(Place(folder.root, rel.parent)) as fd:
                os.rmdir(rel.name, dir_fd=fd)
        except OSError:
            return
        rel = rel.parent


def walk_files(top: Place, *, skip: Callable[[PurePosixPath], bool] | None = None) -> Iterator[
    tuple[Place, os.stat_result]
]:
    """Yield every entry below top that is not a real folder, with its own status.

    Folders are entered through descriptors (O_NOFOLLOW, O_NONBLOCK): links, to files or folders,
    are yielded, never followed, and nothing is opened by a path name. `skip(rel)` prunes folders.
    """
    try:
        with opened_dir(top) as fd:
            yield from _walk_fd(fd, top, PurePosixPath(), skip)
    except FileNotFoundError:
        return


def _walk_fd(
    fd: int, top: Place, rel: PurePosixPath, skip: Callable[[PurePosixPath], bool] | None
) -> Iterator[tuple[Place, os.stat_result]]:
    with os.scandir(fd) as entries:
        listed = list(entries)
    for entry in listed:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        child = rel / entry.name
        if not stat.S_ISDIR(st.st_mode):
            yield Place(top.root, top.rel / child), st
            continue
        if skip is not None and skip(child):
            continue
        try:
            sub = os.open(entry.name, DIR_FLAGS | os.O_NONBLOCK, dir_fd=fd)
        except OSError:
            continue  # gone, or swapped for something else since it was listed
        try:
            yield from _walk_fd(sub, top, child, skip)
        finally:
            os.close(sub)


def remove_stale_temp_files(top: Place, *, now: float, idle_s: float = 60.0) -> list[Place]:
    """Remove the hidden temporary files a killed write left below top; return them.

    Only files untouched for `idle_s`: another instance may be writing one right now.
    """
    removed = []
    for place, st in walk_files(top):
        if (place.name.startswith(TEMP_PREFIX) and place.name.endswith(TEMP_SUFFIX) and stat.S_ISREG(st.st_mode)
                and now - st.st_mtime >= idle_s):
            with contextlib.suppress(OSError):
                unlink(place)
                removed.append(place)
    return removed
