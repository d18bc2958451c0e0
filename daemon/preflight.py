"""What a config needs from the machine: folders that exist, permissions for the service user,
inboxes that `watch: events` can really watch.

`check-config` reports all of it at once; `run` refuses to start when an inbox cannot be watched.
Permissions are judged from mode bits for a named user (its uid and groups), as the kernel would
for that user: running the check as root must not hide that the service user cannot write.
Access control lists and systemd's `ReadWritePaths=` are not read.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from daemon.config import CheckedFolder, Folder, HttpSettings

# File systems whose changes made on another machine (or the VM's host) never reach inotify.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "9p", "virtiofs", "vboxsf", "vmhgfs", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs",
    "fuse.rclone", "fuse.s3fs", "fuse.gcsfuse", "fuse.davfs", "fuse.juicefs", "fuse.vmhgfs-fuse",
})  # fmt: skip

Level = Literal["error", "warning"]
MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class Finding:
    """One thing the machine lacks for a config: where in the file, what, and how bad."""

    location: str
    message: str
    level: Level = "error"

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


@dataclass(frozen=True)
class User:
    """Whose permissions count: the service's account."""

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def named(cls, name: str) -> User:
        """Return the user with this name and its groups; raise KeyError if there is none."""
        entry = pwd.getpwnam(name)
        gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        return cls(name, entry.pw_uid, frozenset(gids))

    @classmethod
    def current(cls) -> User:
        """Return the user running this process, with its groups."""
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, frozenset({os.getegid(), *os.getgroups()}))


def may(user: User, st: os.stat_result, want: int) -> bool:
    """Return True when the mode bits grant `user` every access in want (os.R_OK | os.W_OK | os.X_OK)."""
    if user.uid == 0:
        # root may read and write anything; it may execute only what someone may execute.
        return not want & os.X_OK or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
    if st.st_uid == user.uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in user.gids:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where, what type, from where."""

    point: Path
    fstype: str
    source: str
    read_only: bool


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040).
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Return the mounts listed in mountinfo text, in its order (later mounts cover earlier ones)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 3:
            continue
        options = fields[5].split(",")
        mounts.append(Mount(Path(_unescape(fields[4])), fields[sep + 1], _unescape(fields[sep + 2]), "ro" in options))
    return mounts


def mount_of(path: Path, mounts: Iterable[Mount]) -> Mount | None:
    """Return the mount that holds path (the deepest mount point above it, the last one mounted)."""
    best: Mount | None = None
    for mount in mounts:
        if (mount.point == path or mount.point in path.parents) and (
            best is None or len(mount.point.parts) >= len(best.point.parts)
        ):
            best = mount
    return best


def _mounts() -> list[Mount]:
    try:
        return parse_mountinfo(MOUNTINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return []


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _way_in(path: Path, user: User) -> str | None:
    """Return why user cannot reach path (a folder on the way it may not enter), or None."""
    for parent in reversed(path.parents):
        try:
            st = parent.stat()
        except OSError:
            return None  # reported by the caller
        if stat.S_ISDIR(st.st_mode) and not may(user, st, os.X_OK):
            return f"user {user.name} cannot enter {parent} (mode {stat.filemode(st.st_mode)})"
    return None


def _reach(path: Path, user: User) -> tuple[os.stat_result | None, str | None]:
    """Return the folder's stat, or why user cannot get to it (missing, not a folder, a folder on the way)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        existing = _existing_ancestor(path)
        if not existing.is_dir():
            return None, f"{path} cannot exist: {existing} is not a folder"
        return None, None  # missing: the caller says what that means for its role
    except NotADirectoryError:
        return None, f"{path} cannot exist: {_existing_ancestor(path)} is not a folder"
    except PermissionError:
        return None, f"{path} cannot be looked at: {_way_in(path, user) or 'permission denied'}"
    if not stat.S_ISDIR(st.st_mode):
        return None, f"{path} is not a folder"
    return st, _way_in(path, user)


def check_folder_path(path: Path, role: str, user: User, mounts: list[Mount]) -> Iterator[tuple[str, Level]]:
    """Yield what is wrong with one configured folder for user, with its level."""
    want = os.R_OK | os.W_OK | os.X_OK  # every role is written: originals move out of the inbox too
    st, problem = _reach(path, user)
    if problem:
        yield problem, "error"
        return
    if st is None:
        existing = _existing_ancestor(path)
        if role == "inbox":
            yield f"{path} does not exist", "error"
        elif not may(user, existing.stat(), want):
            yield f"{path} does not exist, and user {user.name} cannot create it in {existing}", "error"
        else:
            yield f"{path} does not exist yet; whisperd creates it when it first needs it", "warning"
        return
    if not may(user, st, want):
        yield (f"user {user.name} cannot read and write in {path} (owner {_owner(st)}, "
               f"mode {stat.filemode(st.st_mode)})"), "error"  # fmt: skip
    mount = mount_of(path.resolve(), mounts)
    if mount is not None and mount.read_only:
        yield f"{path} is on a read-only mount ({mount.point})", "error"


def watch_problem(inbox: Path, user: User) -> str | None:
    """Return why user cannot watch an inbox (missing, not a folder, not readable), or None if it can."""
    st, problem = _reach(inbox, user)
    if problem:
        return problem
    if st is None:
        return f"{inbox} does not exist"
    if not may(user, st, os.R_OK | os.X_OK):
        return f"user {user.name} cannot read {inbox} (owner {_owner(st)}, mode {stat.filemode(st.st_mode)})"
    return None


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def check_folder(checked: CheckedFolder, user: User, mounts: list[Mount] | None = None) -> list[Finding]:
    """Return what the machine lacks for one folder: its folders, their permissions, its watch mode."""
    mounts = _mounts() if mounts is None else mounts
    folder: Folder = checked.folder
    where = f"folders[{checked.index}]"
    found = []
    for role in ("inbox", "outbox", "archive", "failed", "processing"):
        path = getattr(folder, role)
        if path is None or role in checked.missing:
            continue
        found += [Finding(f"{where}.{role}", message, level)
                  for message, level in check_folder_path(path, role, user, mounts)]  # fmt: skip
    if folder.watch == "events" and "inbox" not in checked.missing:
        mount = mount_of(_existing_ancestor(folder.inbox).resolve(), mounts)
        if mount is not None and mount.fstype in NETWORK_FILESYSTEMS:
            found.append(Finding(
                f"{where}.watch",
                f"the inbox is on a network file system ({mount.fstype} {mount.source} at {mount.point}): "
                "inotify does not see files other machines write there; use watch: poll "
                "(the periodic rescan still finds them, every rescan_interval)",
                "warning",
            ))
    return found


def check_folders(folders: Iterable[CheckedFolder], user: User) -> list[Finding]:
    """Return what the machine lacks for every folder, in the file's order."""
    mounts = _mounts()
    return [finding for checked in folders for finding in check_folder(checked, user, mounts)]


def unwatchable(folders: Iterable[CheckedFolder], user: User) -> list[Finding]:
    """Return the inboxes `run` cannot watch (missing, not a folder, not readable), each with why."""
    found = []
    for checked in folders:
        problem = watch_problem(checked.folder.inbox, user)
        if problem is not None:
            found.append(Finding(f"folders[{checked.index}].inbox", problem))
    return found


def check_http(http: HttpSettings) -> list[Finding]:
    """Return what the machine lacks for the HTTP API: a tokens file that cannot be read or is empty."""
    from daemon.errors import ListenerError
    from daemon.http.tokens import read_tokens

    if http.tokens_file is None:
        local = http.listen.startswith("unix:") or http.listen.rpartition(":")[0] in ("127.0.0.1", "localhost", "[::1]")
        return [] if local else [Finding("http.tokens_file", f"not set: anyone who can reach {http.listen} may use "
                                         "the API", "warning")]
    try:
        read_tokens(http.tokens_file)
    except ListenerError as err:
        return [Finding("http.tokens_file", str(err))]
    return []
