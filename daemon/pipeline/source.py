"""An input file opened once: every tool reads it through this descriptor, never by its name again.

Whatever happens to the name afterwards (renamed, replaced by a symlink, swapped for another
file), ffprobe and ffmpeg read the very inode that was checked: they open `/proc/self/fd/N`, a
descriptor they inherit, under the `file` protocol.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import MediaError


@dataclass(frozen=True)
class Source:
    """An open input file and the name it is known by (in logs and reports)."""

    fd: int
    display: Path
    size: int
    mtime_ns: int
    device: int
    inode: int

    @property
    def url(self) -> str:
        """Return the input as ffmpeg's tools open it: the inherited descriptor, by the file protocol."""
        return f"file:/proc/self/fd/{self.fd}"

    @classmethod
    def from_fd(cls, fd: int, display: Path) -> Source:
        """Return a Source for an open descriptor; raise MediaError (closing it) if it is not a regular file."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise MediaError("not a regular file", path=display, stage="probe")
        return cls(fd, display, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)

    def changed(self) -> bool:
        """Return True when the file is no longer the size or mtime it had when it was opened."""
        st = os.fstat(self.fd)
        return (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns)

    def close(self) -> None:
        """Close the descriptor (once)."""
        with contextlib.suppress(OSError):  # already closed
            os.close(self.fd)


def open_path(path: Path) -> Source:
    """Return a file named by a trusted caller (the command line) opened as a Source.

    O_NONBLOCK: opening a FIFO must not wait for a writer; a FIFO is refused right after.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    return Source.from_fd(fd, path)
