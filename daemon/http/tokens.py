"""Bearer tokens: read from a file (one a line), compared in constant time, never logged."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path

from daemon.errors import ListenerError


def read_tokens(path: Path) -> tuple[str, ...]:
    """Return the tokens of a tokens file: one a line, blank lines and '#' comments skipped.

    Raises ListenerError when the file cannot be read or holds no token (every request would be refused).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ListenerError(f"cannot read the tokens file {path}: {getattr(err, 'strerror', None) or err}") from err
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise ListenerError(f"the tokens file {path} holds no token (one a line)")
    return tokens


def authorized(header: str | None, tokens: Sequence[str]) -> bool:
    """Return True when an Authorization header carries one of the tokens (every token compared)."""
    if header is None:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    offered = given.strip().encode()
    # Every token is compared, in constant time each: the answer's timing tells nothing of which one nearly matched.
    matches = [hmac.compare_digest(offered, token.encode()) for token in tokens]
    return any(matches)
