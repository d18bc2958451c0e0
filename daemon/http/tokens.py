"""Bearer tokens: read from a file (one a line), compared in constant time, never logged."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers

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


def bearer_from_basic(header: str | None) -> str | None:
    """Return an Authorization header as a bearer one: a Basic header's password is taken as the token.

    Any other header is returned as it is; a Basic header that does not decode becomes None.
    """
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return header
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _user, colon, password = decoded.partition(":")
    return f"Bearer {password}" if colon and password else None


class TokenGate:
    """ASGI middleware: every request but `open_paths` needs a token, as a bearer header; the status
    page's reads (GET or HEAD of `basic_paths`) may carry it as a Basic password instead, which a
    browser sends after a challenge. Only those reads: a browser replays Basic credentials on any
    site's requests to this origin, and must not thereby let another page queue work here.

    A plain ASGI wrapper, not Starlette's BaseHTTPMiddleware: under that, a waiting request never
    sees its client hang up (and so could not give up its job).
    """

    def __init__(self, app: Any, *, tokens: Sequence[str] | None, open_paths: Collection[str],
                 basic_paths: Collection[str], challenge_paths: Collection[str], basic_challenge: str,
                 refuse: Callable[[str, dict[str, str]], Any]) -> None:
        self.app = app
        self.tokens = tokens
        self.open_paths = open_paths
        self.basic_paths = basic_paths
        self.challenge_paths = challenge_paths  # answered with a Basic challenge, so a browser asks
        self.basic_challenge = basic_challenge
        self.refuse = refuse  # (reason, headers) → the ASGI response of a 401

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.tokens is None or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        if scope["method"] in ("GET", "HEAD") and scope["path"] in self.basic_paths:
            header = bearer_from_basic(header)
        if authorized(header, self.tokens):
            await self.app(scope, receive, send)
            return
        challenge = self.basic_challenge if scope["path"] in self.challenge_paths else "Bearer"
        response = self.refuse("a valid 'Authorization: Bearer <token>' header is needed",
                               {"WWW-Authenticate": challenge})
        await response(scope, receive, send)
