"""`GET /`: a live status page, and `GET /v1/status`, the JSON it polls (what `whisperd status --json` says).

The page is one HTML file with its CSS and script inline: no CDN, no web font, nothing fetched but
`v1/status`, so it works on a machine without internet and under a strict Content-Security-Policy.
Its script builds every element with textContent: file names come from whoever can write to a share.

A browser cannot send a bearer token when it opens a page, so the token may also come as HTTP Basic
auth, with the token as the password (any user name): `/` answers 401 with a Basic challenge, the
browser asks for it once, and sends it again with the page's own requests.
"""

from __future__ import annotations

import importlib.resources
import time
from functools import cache
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from daemon.config import API_FOLDER
from daemon.http.jobs import UPLOAD_NAME, ApiJobs
from daemon.operations import status_report

BASIC_PATHS = frozenset({"/", "/v1/status"})  # the page and what it reads: the token may come as a Basic password
PAGE_PATHS = frozenset({"/"})  # answered 401 with a Basic challenge, so a browser asks for the token
BASIC_CHALLENGE = 'Basic realm="whisperd", charset="UTF-8"'
# The page's script is inline: a policy that allows that script and its own origin's requests, nothing else.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@cache
def page_html() -> str:
    """Return the status page (read once from the package)."""
    return importlib.resources.files("daemon.http").joinpath("status.html").read_text(encoding="utf-8")


def add_status_routes(app: FastAPI, jobs: ApiJobs) -> None:
    """Serve the status page and the JSON it shows (on the app itself, so /metrics can name their routes)."""

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        """The live status page."""
        return HTMLResponse(page_html(), headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store",
                                                  "X-Content-Type-Options": "nosniff"})

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        """What `whisperd status --json` says: the daemon, each folder, running jobs with ETA, the queue,
        recent failures and why folders are paused."""
        report = await run_in_threadpool(lambda: status_report(jobs.config(), jobs.journal, time.time()))
        return without_upload_names(report)


def without_upload_names(report: dict[str, Any]) -> dict[str, Any]:
    """Return the status report with API jobs shown as "upload #<id>": an async job's file name holds
    the secret half of its id, and any token holder may read this page."""
    for key in ("running", "interrupted", "queue", "recent_failures"):
        for view in report.get(key, ()):
            if view.get("folder") != API_FOLDER:
                continue
            view["path"] = f"upload #{view['id']}"
            for field in ("original", "outputs"):
                view.pop(field, None)
            for field in ("error", "previous_error", "warning"):
                if isinstance(view.get(field), str):
                    view[field] = UPLOAD_NAME.sub("the upload", view[field])
    return report
