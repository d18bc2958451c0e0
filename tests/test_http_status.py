"""/metrics and the live status page end to end: a real daemon with the API, real jobs, a real browser."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import media
import pytest
from conftest import MediaSet
from daemon_harness import ROOT, Daemon, drop_file
from http_harness import Client, api_daemon, free_port
from prometheus_client.parser import text_string_to_metric_families

from daemon.journal import Job, JobState

pytestmark = pytest.mark.slow

TOKEN = "status-token"
HOSTILE = "<img src=x onerror=alert(1)>.wav"  # a share user's file name, aimed at the page
CHROMIUM = shutil.which("chromium")
CHROMIUM_TIMEOUT_S = 45  # it renders in 2-6 s here


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[tuple[Daemon, Client]]:
    """One daemon for the module: folder 'media' (fast decoding) and folder 'slow', whose files decode for
    minutes so a job stays running while the page is looked at; the API on 127.0.0.1 with a token."""
    root = tmp_path_factory.mktemp("http-status")
    (root / "tokens").write_text(f"{TOKEN}\n")
    listen = f"127.0.0.1:{free_port()}"
    daemon = api_daemon(root, checkpoint, {"listen": listen, "tokens_file": str(root / "tokens")})
    slow = {**daemon.data["folders"][0], "name": "slow", "sample_len": 224}
    for role in ("inbox", "outbox", "archive", "failed"):
        slow[role] = str(root / "slow" / role)
    Path(slow["inbox"]).mkdir(parents=True)
    # shutdown_grace 1 s: the long job is handed back at the end without the usual wait.
    daemon.write_config({**daemon.data, "folders": [*daemon.data["folders"], slow], "shutdown_grace": 1})
    daemon.start()
    yield daemon, Client(listen, TOKEN)
    assert daemon.stop() == 0


def _scrape(client: Client, token: str | None = None) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Return /metrics parsed by prometheus-client's own parser: family name → (sample name, labels, value)."""
    status, headers, body = client.request("GET", "/metrics", token=token)
    assert status == 200 and headers["content-type"].startswith("text/plain; version="), body
    return {family.name: [(s.name, s.labels, s.value) for s in family.samples]
            for family in text_string_to_metric_families(body.decode())}


def _value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Return the one sample of that name whose labels include these; fail when there is not exactly one."""
    found = [value for sample, have, value in samples if sample == name and labels.items() <= have.items()]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def test_metrics_count_jobs_audio_real_time_factor_and_requests_by_route(
    served: tuple[Daemon, Client], media_set: MediaSet
) -> None:
    """After a folder file and an API request are done: the jobs by folder and state, audio seconds, the
    real-time factor histogram (one observation each), and requests by route template and status."""
    daemon, client = served
    drop_file(media_set.speech_wav, daemon.folder("inbox") / "meeting.wav")
    status, body = client.upload("/v1/audio/transcriptions", media_set.speech_wav)
    assert status == 200, body
    daemon.wait_for(lambda: [j for j in daemon.jobs([JobState.DONE]) if j.folder == "media"], 60, "the folder job")
    assert client.request("GET", "/v1/nothing-here/12345")[0] == 404

    metrics = _scrape(client)
    jobs = metrics["whisperd_jobs"]
    assert _value(jobs, "whisperd_jobs", folder="media", state="done") == 1
    assert _value(jobs, "whisperd_jobs", folder="_api", state="done") == 1
    assert _value(jobs, "whisperd_jobs", folder="slow", state="done") == 0  # every folder, zeros included
    audio = metrics["whisperd_audio_processed_seconds"]
    speech_s = media.media_duration(media_set.speech_wav)
    assert _value(audio, "whisperd_audio_processed_seconds_total", folder="media") == pytest.approx(speech_s, 0.05)
    assert _value(audio, "whisperd_audio_processed_seconds_total", folder="_api") > 0
    rtf = metrics["whisperd_job_real_time_factor"]
    assert sum(v for name, _, v in rtf if name == "whisperd_job_real_time_factor_count") >= 2
    assert _value(rtf, "whisperd_job_real_time_factor_sum", folder="media") > 0
    requests = metrics["whisperd_http_requests"]
    assert _value(requests, "whisperd_http_requests_total", route="/v1/audio/transcriptions", status="200") == 1
    # Raw paths never become labels: a path no route serves is counted under one shared label.
    assert _value(requests, "whisperd_http_requests_total", route="<unmatched>", status="404") >= 1
    assert not [labels for _, labels, _ in requests if "12345" in labels["route"]]
    assert _value(metrics["whisperd_queue_oldest_age_seconds"], "whisperd_queue_oldest_age_seconds",
                  folder="media") == 0
    [load] = [s for s in metrics["whisperd_model_load_seconds"] if s[0] == "whisperd_model_load_seconds"]
    assert load[1]["device"] == "cpu" and load[2] > 0
    assert _value(metrics["process_resident_memory_bytes"], "process_resident_memory_bytes") > 0


def test_metrics_need_the_token_unless_the_setting_opens_them(
    served: tuple[Daemon, Client], tmp_path: Path, checkpoint: Path
) -> None:
    """/metrics answers 401 without the token, and the refusal is counted; http.metrics_open lets a
    scraper in without one, and only /metrics: the page and the status JSON still ask for it."""
    _, client = served
    status, headers, _ = client.request("GET", "/metrics", token="")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert _value(_scrape(client)["whisperd_http_requests"], "whisperd_http_requests_total", route="/metrics",
                  status="401") >= 1

    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    listen = f"127.0.0.1:{free_port()}"
    daemon = api_daemon(tmp_path, checkpoint, {"listen": listen, "tokens_file": str(tmp_path / "tokens"),
                                               "metrics_open": True}).start()
    try:
        anyone = Client(listen)
        assert "whisperd_jobs" in _scrape(anyone)
        assert anyone.request("GET", "/")[0] == 401
        assert anyone.request("GET", "/v1/status")[0] == 401
    finally:
        assert daemon.stop() == 0


def test_the_page_and_its_json_need_the_token_as_bearer_or_basic_password(served: tuple[Daemon, Client]) -> None:
    """`/` without credentials is 401 with a Basic challenge (the browser asks); with the token as a
    Basic password (any user) or a bearer header it is the page; a wrong password is refused."""
    _, client = served
    status, headers, _ = client.request("GET", "/", token="")
    assert status == 401 and headers["www-authenticate"].startswith('Basic realm="whisperd"')
    status, headers, body = client.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<title>whisperd" in body
    assert "default-src 'none'" in headers["content-security-policy"]
    assert not re.search(rb"""(src|href)=["']?(https?:)?//""", body)  # nothing from another origin
    for user, password, expected in (("anyone", TOKEN, 200), ("", TOKEN, 200), ("anyone", "wrong", 401),
                                     (TOKEN, "", 401)):
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        assert _get_with(client, "/v1/status", f"Basic {basic}") == expected, (user, password)
    assert _get_with(client, "/v1/status", "Basic not-base64!") == 401
    # Only the page's reads take Basic: a browser replays it on any site's requests to this origin,
    # and another site's form must not thereby queue work or read other routes.
    basic = "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    assert _get_with(client, "/readyz", basic) == 401
    assert _get_with(client, "/v1/jobs", basic, method="POST") == 401
    status, _, body = client.request("GET", "/v1/status")
    report = json.loads(body)
    assert status == 200 and report["daemon"]["state"] == "running" and {"media", "slow", "_api"} <= set(
        report["folders"])


def _get_with(client: Client, path: str, authorization: str, method: str = "GET") -> int:
    """Return the status of a request with this Authorization header, as sent (the Client only sends bearer)."""
    host, _, port = client.listen.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, headers={"Authorization": authorization})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class _Page(HTMLParser):
    """The elements of a dumped DOM: each tag with its attributes, and the text of each list item."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _artifacts() -> Path:
    """Return where CI collects screenshots: $WHISPERD_ARTIFACTS, else <repo>/test-artifacts."""
    place = Path(os.environ.get("WHISPERD_ARTIFACTS") or ROOT / "test-artifacts")
    place.mkdir(parents=True, exist_ok=True)
    return place


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once, in a profile of its own, with no network beyond the test's listener."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        try:
            return subprocess.run(
                [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking", "--disable-sync",
                 f"--user-data-dir={profile}", "--virtual-time-budget=6000", *args],
                capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            # An alert() the page opened holds headless Chromium until killed: a file name ran as script.
            pytest.fail(f"chromium did not finish in {CHROMIUM_TIMEOUT_S} s (a dialog the page opened blocks it)")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: Makefile TEST_PACKAGES)")
def test_the_page_shows_the_running_job_with_progress_and_a_hostile_name_as_text(
    served: tuple[Daemon, Client], tmp_path: Path
) -> None:
    """In headless Chromium, the page (token as a Basic password) shows the running job, whose name is
    markup, as text with its progress; no element comes from the name. A phone-sized screenshot is kept."""
    daemon, client = served
    drop_file(media.tone_wav(tmp_path / "long.wav", seconds=600), daemon.folder("inbox", "slow") / HOSTILE)

    def making_progress() -> list[Job]:
        return [j for j in daemon.jobs([JobState.RUNNING]) if j.rel_path == HOSTILE and (j.progress or 0) > 0]

    [job] = daemon.wait_for(making_progress, 90, "the long job to make progress")
    host, _, port = client.listen.rpartition(":")
    url = f"http://viewer:{TOKEN}@{host}:{port}/"  # the browser answers the Basic challenge with these

    dumped = _chromium("--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    page = _Page()
    page.feed(dumped.stdout)
    items = [attrs for tag, attrs in page.tags if tag == "li" and attrs.get("data-job-id") == str(job.id)]
    assert items, f"the running job #{job.id} is not on the page:\n{dumped.stdout[-4000:]}"
    text = "".join(page.text)
    assert f"slow/{HOSTILE}" in text  # the name as the user wrote it, shown as text …
    assert not [attrs for tag, attrs in page.tags if tag == "img"]  # … and never parsed as markup
    assert re.search(r"\b\d{1,3}%", text) and "elapsed" in text, text
    assert "_api" in text and "updated " in text  # the folders table, filled by a successful poll

    shot = _artifacts() / "status-page.png"
    shot.unlink(missing_ok=True)
    taken = _chromium(f"--screenshot={shot}", "--window-size=412,915", "--hide-scrollbars", url)
    assert taken.returncode == 0 and shot.stat().st_size > 1000, taken.stderr[-2000:]
    assert shot.read_bytes().startswith(b"\x89PNG")
