"""Test-only crash points: named steps where a test can have whisperd kill itself with SIGKILL.

With `WHISPERD_TEST_CRASH_AT=name` (or `name:n`, the n-th time that step is reached) in its
environment, the process sends itself SIGKILL there, the way a power cut or the OOM killer would
end it; without the variable every call is a no-op. The crash-safety tests use these to prove
that a crash at every step boundary loses nothing and duplicates nothing.

The steps, in a job's order: claimed, taken, extracted, window, output (after each output file),
published, linked (between the archive's hard link and the unlink), disposed.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "WHISPERD_TEST_CRASH_AT"
_name, _, _nth = (os.environ.get(ENV) or "").partition(":")
_target = int(_nth) if _nth.isdigit() else 1
_seen: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Kill this process here if a test asked for it; otherwise do nothing."""
    if not _name or name != _name:
        return
    _seen[name] += 1
    if _seen[name] == _target:
        os.kill(os.getpid(), signal.SIGKILL)
