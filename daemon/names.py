"""File names as the journal and the logs show them, and names that fit the file system's limit.

A name on disk is bytes. Names that are not UTF-8 (a Windows-1252 share, a camera) reach Python
as strings with lone surrogates (`os.fsdecode`), which neither SQLite nor a log line can hold.
Everything above the file system (journal, logs, reports, rules, output names) uses an escaped
text form instead: each undecodable byte is written `\\xNN` and a backslash is doubled, so the
form is printable UTF-8 and turns back into the exact bytes.
"""

from __future__ import annotations

import hashlib
import os
import re

NAME_MAX = 255  # bytes in one file name on Linux file systems (ext4, xfs, btrfs, cifs, nfs)
_ESCAPED = re.compile(r"\\(\\|x[89a-f][0-9a-f])")  # escape() writes bytes 0x80-0xff only


def escape(fs_text: str) -> str:
    """Return the printable form of a name as the file system gave it (surrogates escaped)."""
    if not any(0xDC80 <= ord(c) <= 0xDCFF or c == "\\" for c in fs_text):
        return fs_text
    out = []
    for char in fs_text:
        if char == "\\":
            out.append("\\\\")
        elif 0xDC80 <= ord(char) <= 0xDCFF:
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        else:
            out.append(char)
    return "".join(out)


def unescape(text: str) -> str:
    """Return the file system's form (surrogates for undecodable bytes) of an escaped name."""
    if "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)), text)


def printable(text: str) -> str:
    """Return text safe to show on a terminal: control and formatting characters (escape sequences,
    newlines, right-to-left overrides) written as \\xNN or \\uNNNN. For display only: not reversible."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in text)


def byte_length(fs_text: str) -> int:
    """Return how many bytes a name takes on disk."""
    return len(os.fsencode(fs_text))


def fit(stem: str, tail: str, head: str = "") -> str:
    """Return `head + stem + tail`, with the stem shortened if the whole exceeds NAME_MAX bytes.

    A shortened stem keeps its leading characters, then `~` and 8 hex digits of a hash of the
    whole stem, so two long names that differ only at the end stay two names. A tail too long to
    leave room (a 250-byte "extension") is shortened the same way, as part of the stem.
    """
    if byte_length(head + stem + tail) <= NAME_MAX:
        return head + stem + tail
    if byte_length(head + tail) > NAME_MAX // 2:
        stem, tail = stem + tail, ""
    digest = hashlib.sha256(os.fsencode(stem)).hexdigest()[:8]
    budget = NAME_MAX - byte_length(head + tail) - len(digest) - 1
    kept, used = [], 0
    for char in stem:
        size = byte_length(char)
        if used + size > budget:
            break
        kept.append(char)
        used += size
    return f"{head}{''.join(kept)}~{digest}{tail}"
