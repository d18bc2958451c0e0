"""Limits applied before a request reaches the app: a ceiling on request bodies, enforced before
FastAPI spools an upload to disk, and local callers only on a loopback listener without tokens.

FastAPI (Starlette) writes a multipart upload to a temporary file before any route sees it, so a
route cannot refuse a body that is too large: this wrapper does, at the ASGI level. A declared
Content-Length over the limit is answered 413 before a byte is read; a body sent without one (chunked)
is cut off at the limit, and whatever the app would answer then is replaced by the 413.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Wraps an ASGI app: HTTP requests whose body exceeds `limit` bytes are answered 413."""

    def __init__(self, app: App, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limit <= 0:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received = 0
        too_large = False  # once set, whatever the app answers is replaced by the 413
        answered = False

        async def counted() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_large = True
                    raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal answered
            if not too_large:
                await send(message)
            elif not answered:
                answered = True
                await self._refuse(send)

        with contextlib.suppress(_TooLarge):  # the app may let it through: then it ends here
            await self.app(scope, counted, watched)
        if too_large and not answered:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        reason = f"the upload is larger than http.max_upload ({self.limit} bytes)"
        body = json.dumps({"error": {"message": reason, "type": "invalid_request_error"}, "detail": reason}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})


def is_loopback_listen(listen: str) -> bool:
    """Return True for a host:port listen address on a loopback name or address (not a unix socket)."""
    if listen.startswith("unix:"):
        return False
    return _is_loopback_host(listen.rpartition(":")[0].strip("[]"))


def _is_loopback_host(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoopbackHostsOnly:
    """Wraps an ASGI app: on a loopback listener without tokens (Bazarr on the same host), answers 403
    to what a web page in the machine's user's browser could send.

    A page can post a form straight to 127.0.0.1 (no preflight for multipart: the work would run), or
    rebind a name of its own to 127.0.0.1 (DNS rebinding) and then read the answers too. The first
    carries the page's Origin, or Sec-Fetch-Site: cross-site; the second the page's name as its Host.
    A local program (Bazarr's requests, curl) sends neither, and addresses 127.0.0.1 or localhost.
    """

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {key: value.decode("latin-1") for key, value in scope["headers"]
                       if key in (b"host", b"origin", b"sec-fetch-site")}
            host, origin = headers.get(b"host"), headers.get(b"origin")
            if (host is not None and not _is_loopback_host(_host_name(host))) \
                    or (origin is not None and not _is_loopback_host(_host_name(_origin_host(origin)))) \
                    or headers.get(b"sec-fetch-site") in ("cross-site", "same-site"):
                body = json.dumps({"detail": "this listener (loopback, no tokens_file) answers only local "
                                             "programs addressed to 127.0.0.1, ::1 or localhost, not web "
                                             "pages"}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _origin_host(origin: str) -> str:
    """Return the host[:port] of an Origin header (http://localhost:9000 → localhost:9000; null → null)."""
    return origin.partition("://")[2] or origin


def _host_name(host: str) -> str:
    """Return the name in a Host header, without its port ([::1]:9000 → ::1)."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host
