"""What a subtitle viewer accepts, checked on srt and vtt files with a real subtitle parser (pysubs2)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pysubs2


def subtitle_problems(path: Path, end_s: float | None = None, fmt: str | None = None) -> list[str]:
    """Return what a viewer would refuse in an srt or vtt file (empty when it is fine).

    The file must parse; every cue must have text, last at least a millisecond, start where the
    one before it ended or later, and (given the audio's end) end by then.
    """
    try:
        subs = pysubs2.load(str(path), encoding="utf-8", format_=fmt or path.suffix.lstrip("."))
    except Exception as err:  # pysubs2 raises its own errors and plain ValueError alike
        return [f"{path}: does not parse as {fmt or path.suffix}: {err}"]
    problems = []
    previous_end = 0
    for n, cue in enumerate(subs, start=1):
        where = f"{path.name} cue {n} ({cue.start / 1000:.3f} --> {cue.end / 1000:.3f})"
        if not cue.plaintext.strip():
            problems.append(f"{where}: no text")
        if cue.end <= cue.start:
            problems.append(f"{where}: ends before it starts, or lasts no time")
        if cue.start < previous_end:
            problems.append(f"{where}: starts before the cue before it ended ({previous_end / 1000:.3f})")
        if end_s is not None and cue.end > round(end_s * 1000):
            problems.append(f"{where}: ends past the end of the audio ({end_s:.3f})")
        previous_end = max(previous_end, cue.end)
    return problems


def written_since(root: Path, since_ns: int, seen: dict[Path, tuple[int, int]]) -> list[Path]:
    """Return the srt and vtt files under root written since `since_ns` and not checked yet.

    Links and other non-files are skipped, and hidden names (temp files mid-write); `seen`
    remembers what was checked, by size and mtime, so each version of a file is parsed once.
    """
    found = []
    for folder, dirs, files in os.walk(root, onerror=lambda _: None):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or not name.endswith((".srt", ".vtt")):
                continue
            path = Path(folder) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            version = (st.st_size, st.st_mtime_ns)
            if stat.S_ISREG(st.st_mode) and st.st_mtime_ns >= since_ns and seen.get(path) != version:
                seen[path] = version
                found.append(path)
    return found
