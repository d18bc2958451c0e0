"""Who a daemon process is (host:pid, the owner of the jobs it claims), and whether it still lives."""

from __future__ import annotations

import os
import socket


def default_owner() -> str:
    """Return this process's worker identity: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Return True while a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Return True when the process has ended and only waits to be reaped (kill -9 until its parent waits)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            # "pid (comm) state …": comm may hold spaces and parentheses; the state follows the last ')'.
            return stat.read().rpartition(")")[2].split()[:1] == ["Z"]
    except OSError:
        return False


def owner_is_dead(owner: str | None, host: str | None = None) -> bool:
    """Return True when a job's owner (host:pid) is certainly gone; other hosts' owners are not judged."""
    if not owner:
        return True
    owner_host, _, pid = owner.rpartition(":")
    if owner_host != (host or socket.gethostname()):
        return False
    return not (pid.isdigit() and pid_alive(int(pid)))
