"""The HTTP API's pieces on their own, without a daemon: cancelling a job that waits to retry, the
async id lookup, what the status page shows of uploads, and the loopback listener's caller check."""

from __future__ import annotations

import asyncio
import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from conftest import config_data

from daemon.config import API_FOLDER, parse_config
from daemon.health import Health
from daemon.http.jobs import ApiJobs, Ask, prepare_area
from daemon.http.limits import LoopbackHostsOnly
from daemon.http.status_page import without_upload_names
from daemon.journal import JobState
from daemon.journal.sqlite import SqliteJournal
from daemon.layout import processing_base, work_dir
from daemon.models import ModelRegistry


@pytest.fixture
def api(tmp_path: Path, checkpoint: Path) -> ApiJobs:
    """An ApiJobs over a real config (with `http:`) and a real SQLite journal; no worker runs."""
    config = parse_config(config_data(tmp_path, checkpoint, http={"listen": "127.0.0.1:9"}))
    (tmp_path / "state").mkdir(exist_ok=True)
    prepare_area(config.folders[API_FOLDER])
    journal = SqliteJournal(tmp_path / "state" / "journal.sqlite3")
    registry = ModelRegistry(config.settings.model_dir, "cpu")  # loads nothing until asked
    return ApiJobs(lambda: config, journal, registry, Health(), wake=lambda: None, stopping=threading.Event())


def test_cancelling_a_job_that_waits_to_retry_removes_what_it_left(api: ApiJobs) -> None:
    """An async job that failed once and waits to retry keeps its original in the processing area,
    decoded audio in its work folder, maybe outputs: a DELETE ends it cancelled (pruned like any
    finished job) and removes all of them, the job's folder in the processing area too."""
    job, stem = api.submit(BytesIO(b"RIFF...."), ".wav", Ask(("txt",)), asynchronous=True)
    journal, folder = api.journal, api.folder
    state_dir = api.config().settings.state_dir
    claimed = journal.claim([API_FOLDER], now=job.created_at, owner="gone:1")
    assert claimed is not None and claimed.id == job.id
    area = processing_base(folder, state_dir)
    taken = area.path / str(job.id) / job.rel_path
    taken.parent.mkdir(parents=True)
    (folder.inbox / job.rel_path).rename(taken)  # what the worker's take does
    journal.set_processing(job.id, str(taken), now=job.created_at)
    work = work_dir(state_dir, job.id)
    work.mkdir(parents=True)
    (work / "audio.f32").write_bytes(b"\0" * 16)
    (folder.outbox / f"{stem}.txt").write_text("published before the disposal failed")
    journal.mark_retry(job.id, "the failed folder was full", "publish", now=job.created_at, due=job.created_at + 60)

    waiting = journal.get(job.id)
    assert waiting is not None and waiting.state == JobState.RETRY_WAIT
    ended = api.cancel(waiting, stem)
    assert ended is not None and (ended.state, ended.failure, ended.stays) == (JobState.FAILED, "cancelled", 0)
    assert not taken.exists() and not taken.parent.exists() and area.path.exists()
    assert not work.exists() and not (folder.outbox / f"{stem}.txt").exists()
    assert ended.finished_at is not None
    assert journal.prune(before=ended.finished_at + 1) == 1  # like any finished job: no row kept forever


def test_an_async_id_needs_its_number_and_its_secret(api: ApiJobs) -> None:
    """The id is '<number>-<secret>': both must match, in ASCII digits that fit SQLite's integer."""
    job, stem = api.submit(BytesIO(b"data"), ".mp3", Ask(("txt",)), asynchronous=True)
    public = api.public_id(job, stem)
    number, secret = public.split("-")
    assert api.lookup(public) == (job, stem)
    for wrong in (f"{int(number) + 1}-{secret}", f"{number}-{'0' * 32}", f"{'9' * 30}-{secret}",
                  f"\u0661-{secret}" if number == "1" else f"\u0661{number}-{secret}", f"{number}-{secret}x", "",
                  f"0{number}-{secret.upper()}"):
        assert api.lookup(wrong) is None, wrong
    request, request_stem = api.submit(BytesIO(b"data"), ".mp3", Ask(("txt",)))  # a waiting request's
    assert api.lookup(f"{request.id}-{request_stem.removeprefix('req-')}") is None


def test_the_status_page_shows_uploads_without_their_names() -> None:
    """An API job shows as 'upload #N' everywhere in the report, its name gone from errors too; a
    folder's file keeps its name."""
    secret = "job-" + "ab" * 16
    report: dict[str, Any] = {
        "running": [{"id": 7, "folder": API_FOLDER, "path": f"{secret}.mp4", "original": None}],
        "queue": [{"id": 8, "folder": "media", "path": "talk.mp4"}],
        "recent_failures": [{"id": 9, "folder": API_FOLDER, "path": f"{secret}.wav",
                             "error": f"ffprobe: /var/lib/whisperd/processing/_api/9/{secret}.wav: Invalid data",
                             "original": f"/var/lib/whisperd/api/failed/{secret}.wav"}],
    }
    shown = without_upload_names(report)
    assert secret not in str(shown)
    assert shown["running"][0]["path"] == "upload #7" and shown["queue"][0]["path"] == "talk.mp4"
    assert shown["recent_failures"][0]["error"].endswith("the upload: Invalid data")


@pytest.mark.parametrize(("headers", "status"), [
    ({"host": "127.0.0.1:9000"}, 200),
    ({"host": "localhost:9000"}, 200),
    ({"host": "localhost.:9000"}, 200),
    ({"host": "[::1]:9000"}, 200),
    ({"host": "127.0.0.1:9000", "origin": "http://127.0.0.1:9000", "sec-fetch-site": "same-origin"}, 200),
    ({}, 200),  # HTTP/1.0 without a Host: no browser
    ({"host": "rebound.example:9000"}, 403),
    ({"host": "[::ffff:10.0.0.1]:9000"}, 403),
    ({"host": "127.0.0.1:9000", "origin": "https://evil.example"}, 403),
    ({"host": "127.0.0.1:9000", "origin": "null"}, 403),
    ({"host": "127.0.0.1:9000", "sec-fetch-site": "cross-site"}, 403),
])
def test_a_loopback_listener_without_tokens_answers_local_programs_only(headers: dict[str, str], status: int) -> None:
    """What a web page in a local browser can send (another site's Origin or Sec-Fetch-Site, a rebound
    Host) is 403; local programs addressing a loopback name pass."""
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(LoopbackHostsOnly(app)(scope, None, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == status
