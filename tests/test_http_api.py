"""The HTTP API end to end: a real daemon, a real listener (TCP and a unix socket), real uploads."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import media
import pysubs2
import pytest
from conftest import MediaSet, config_data
from daemon_harness import ROOT, Daemon, drop_file, files_under
from http_harness import Client, api_daemon, free_port

from daemon.config import API_FOLDER, parse_config, parse_size
from daemon.errors import ConfigError
from daemon.journal import JobState

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"


MAX_UPLOAD = "2M"  # the module daemon's http.max_upload: the test recordings are far smaller
MAX_WAITING = 3  # the module daemon's http.max_waiting


def _whisperd(daemon: Daemon, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "daemon", *args, "--config", str(daemon.config_path)],
                   cwd=ROOT, check=True, capture_output=True)


def _api_files(daemon: Daemon) -> list[str]:
    return files_under(Path(daemon.data["state_dir"]) / "api")


def test_http_settings_and_the_api_folder(tmp_path: Path, checkpoint: Path) -> None:
    """`http:` adds a folder `_api` under state_dir/api that is never watched and that no user folder
    can be named; a listen address that is neither host:port nor unix:/path is refused where it is written."""
    data = config_data(tmp_path, checkpoint, http={"listen": "[::1]:9000", "priority": 7})
    config = parse_config(data)
    api = config.folders[API_FOLDER]
    assert list(config.watched) == ["media"] and api.priority == 7
    assert api.inbox == tmp_path / "state" / "api" / "inbox"
    assert config.rule_for(API_FOLDER, "x.wav").on_success == "delete"
    assert API_FOLDER not in parse_config(config_data(tmp_path, checkpoint)).folders
    data = config_data(tmp_path, checkpoint, {"name": API_FOLDER}, http={"listen": "9000"})
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert [p.location for p in err.value.problems] == ["http.listen", "folders[0].name"]


@pytest.fixture(scope="module")
def tcp(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[tuple[Daemon, Client]]:
    """One daemon for the module, listening on 127.0.0.1 with a tokens file."""
    root = tmp_path_factory.mktemp("http-tcp")
    (root / "tokens").write_text(f"# API clients\n\nother-token\n{TOKEN}\n")
    listen = f"127.0.0.1:{free_port()}"
    daemon = api_daemon(root, checkpoint, {"listen": listen, "tokens_file": str(root / "tokens"),
                                           "max_upload": MAX_UPLOAD, "max_duration": "40m",
                                           "max_waiting": MAX_WAITING}).start()
    yield daemon, Client(listen, TOKEN)
    if daemon.proc is not None and daemon.proc.poll() is None:
        assert daemon.stop() == 0


def test_healthz_is_open_and_everything_else_needs_a_token(tcp: tuple[Daemon, Client]) -> None:
    """/healthz answers anyone; /readyz and uploads answer 401 without the token or with a wrong one."""
    _, client = tcp
    assert client.request("GET", "/healthz", token="")[0] == 200
    assert client.request("HEAD", "/healthz", token="")[0] == 200  # what curl -I and some probes send
    assert client.request("GET", "/readyz")[0] == 200
    status, headers, body = client.request("GET", "/readyz", token="wrong")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert "Bearer" in json.loads(body)["error"]["message"]
    status, _, _ = client.request("POST", "/v1/audio/transcriptions", token="wrong",
                                  files={"file": ("a.wav", b"RIFF")})
    assert status == 401


def test_an_upload_over_max_upload_is_413_before_it_is_stored(tcp: tuple[Daemon, Client]) -> None:
    """A declared Content-Length over http.max_upload, and a chunked body that grows past it, are both
    answered 413 with the reason; nothing reaches the API's folders and the API keeps serving."""
    daemon, client = tcp
    host, _, port = client.listen.rpartition(":")
    # Only the headers are sent: the answer comes before a byte of the body is read.
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/v1/audio/transcriptions")
        for name, value in (("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "multipart/form-data; boundary=x"),
                            ("Content-Length", str(parse_size(MAX_UPLOAD) + 1))):
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        assert response.status == 413 and "max_upload" in json.loads(body)["error"]["message"], body
    finally:
        conn.close()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        head = (b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n")
        chunks = iter([head] + [b"\0" * 65536] * (parse_size(MAX_UPLOAD) // 65536 + 8) + [b"\r\n--x--\r\n"])
        conn.request("POST", "/v1/audio/transcriptions", body=chunks, encode_chunked=True,
                     headers={"Authorization": f"Bearer {TOKEN}",
                              "Content-Type": "multipart/form-data; boundary=x"})
        response = conn.getresponse()
        assert response.status == 413, response.read()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close the connection while the client still sends: also a refusal
    finally:
        conn.close()
    assert _api_files(daemon) == []
    assert client.request("GET", "/readyz")[0] == 200


def test_an_arriving_upload_is_spooled_under_the_state_directory(tcp: tuple[Daemon, Client]) -> None:
    """While a large upload arrives, FastAPI's spool file is open in the API's private folder on the
    state disk, not in the system's shared temporary folder."""
    daemon, client = tcp
    host, _, port = client.listen.rpartition(":")
    spool = Path(daemon.data["state_dir"]) / "api" / "spool"
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        head = (b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n")
        conn.putrequest("POST", "/v1/audio/transcriptions")
        for name, value in (("Authorization", f"Bearer {TOKEN}"), ("Transfer-Encoding", "chunked"),
                            ("Content-Type", "multipart/form-data; boundary=x")):
            conn.putheader(name, value)
        conn.endheaders()
        for chunk in [head] + [b"\0" * 65536] * 24:  # 1.5 MB: past the 1 MB kept in memory
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))

        def spooled() -> list[str]:
            found = []
            for fd in Path(f"/proc/{daemon.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    found.append(os.readlink(fd))
            return [target for target in found if target.startswith(str(spool))]

        daemon.wait_for(spooled, 10, "the upload's spool file")
        conn.send(b"0\r\n\r\n")  # a truncated multipart body: refused, the spool file closed
        conn.getresponse().read()
    finally:
        conn.close()


def test_openai_transcription_formats(tcp: tuple[Daemon, Client], media_set: MediaSet) -> None:
    """srt parses with cues, vtt starts WEBVTT, json has text, verbose_json has language, duration and
    segments; the API's folders are empty afterwards."""
    daemon, client = tcp
    status, body = client.upload("/v1/audio/transcriptions", media_set.speech_mp3, model="whisper-1",
                                 response_format="srt")
    assert status == 200, body
    subs = pysubs2.SSAFile.from_string(body.decode(), format_="srt")
    assert len(subs) >= 1 and all(line.text.strip() for line in subs)
    status, body = client.upload("/v1/audio/transcriptions", media_set.speech_mp4, response_format="vtt")
    assert status == 200 and body.startswith(b"WEBVTT"), body
    status, body = client.upload("/v1/audio/transcriptions", media_set.speech_wav)
    assert status == 200 and isinstance(json.loads(body)["text"], str), body
    status, body = client.upload("/v1/audio/transcriptions", media_set.speech_wav, language="en",
                                 response_format="verbose_json", temperature="0")
    result = json.loads(body)
    assert status == 200 and result["language"] == "english" and result["task"] == "transcribe", body
    assert 1.0 < result["duration"] < 10.0 and result["segments"]
    assert _api_files(daemon) == []


def test_refused_upload_is_400_with_the_reason_and_the_api_keeps_serving(
    tcp: tuple[Daemon, Client], media_set: MediaSet
) -> None:
    """A text file named .mp4 gets 400 with whisperd's reason; a bad language gets 400 before any
    job; the next upload is transcribed, and no file of either is left behind."""
    daemon, client = tcp
    status, body = client.upload("/v1/audio/transcriptions", media_set.not_media)
    reason = json.loads(body)["error"]["message"]
    assert status == 400 and "notes.mp4" not in reason and reason, body  # the client's name never reaches disk
    status, body = client.upload("/v1/audio/transcriptions", media_set.speech_wav, language="klingon")
    assert status == 400 and "klingon" in json.loads(body)["detail"], body
    status, body = client.upload("/v1/audio/transcriptions", media_set.speech_wav, response_format="text")
    assert status == 200, body
    assert _api_files(daemon) == []
    failed = [j for j in daemon.jobs() if j.folder == "_api" and j.state == JobState.FAILED]
    assert len(failed) == 1 and failed[0].last_error
    # A name without an extension is stored as <random>.bin, and cleaned up like any other.
    status, _, body = client.request("POST", "/v1/audio/transcriptions", files={"file": ("blob", b"not media")})
    assert status == 400, body
    assert _api_files(daemon) == []
    # A request FastAPI cannot validate is a 400 with the reason, as OpenAI answers, not a 422.
    status, _, body = client.request("POST", "/v1/audio/transcriptions", fields={"response_format": "xml"},
                                     files={"file": ("a.wav", media_set.speech_wav.read_bytes())})
    assert status == 400 and "response_format" in json.loads(body)["error"]["message"], body
    status, _, body = client.request("POST", "/v1/audio/transcriptions", fields={"model": "whisper-1"})
    assert status == 400 and "file" in json.loads(body)["error"]["message"], body


def test_hostile_and_overlong_uploads_are_refused_like_inbox_files(
    tcp: tuple[Daemon, Client], media_set: MediaSet, tmp_path: Path
) -> None:
    """An HLS playlist naming a file outside (uploaded as .mp4) is refused 400 with the inbox's reason,
    and nothing outside is read; an upload longer than http.max_duration is 422 with the limit named."""
    daemon, client = tcp
    secret = media.tone_wav(tmp_path / "secret.wav", seconds=3)
    before = os.stat(secret).st_atime_ns
    playlist = tmp_path / "episode.mp4"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3.0,\n{secret}\n#EXT-X-ENDLIST\n")
    status, body = client.upload("/v1/audio/transcriptions", playlist)
    assert status == 400 and "hls" in json.loads(body)["error"]["message"].lower(), body
    assert os.stat(secret).st_atime_ns == before
    long = tmp_path / "long.opus"  # 45 minutes of silence in a few kB: under max_upload, over max_duration
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono:d=2700",
                    "-c:a", "libopus", "-b:a", "6k", str(long)], check=True)
    status, body = client.upload("/v1/audio/transcriptions", long)
    assert status == 422 and "max_duration" in json.loads(body)["error"]["message"], body
    assert _api_files(daemon) == []


def test_async_job_reports_progress_gives_every_format_and_can_be_cancelled(
    tcp: tuple[Daemon, Client], media_set: MediaSet, tmp_path: Path
) -> None:
    """POST /v1/jobs answers 202 with a Location at once; the job's state ends done; its result comes
    in each format until DELETE removes it (then 404). A long job reports progress and an ETA while it
    runs, and DELETE stops it mid-file: cancelled, its upload gone. A made-up id is 404."""
    daemon, client = tcp
    status, headers, body = client.request("POST", "/v1/jobs", fields={"language": "en"},
                                           files={"file": ("talk.mp3", media_set.speech_mp3.read_bytes())})
    created = json.loads(body)
    assert status == 202 and headers["location"] == f"/v1/jobs/{created['id']}", body
    assert created["state"] in ("queued", "running", "done")
    done = _wait_async(client, created["id"], ("done",))
    assert done["audio_s"] > 1 and done["attempts"] == 1 and "expires_at" in done
    status, headers, body = client.request("GET", f"/v1/jobs/{created['id']}/result?format=srt")
    assert status == 200 and len(pysubs2.SSAFile.from_string(body.decode(), format_="srt")) >= 1, body
    status, headers, body = client.request("GET", f"/v1/jobs/{created['id']}/result?format=vtt")
    assert status == 200 and body.startswith(b"WEBVTT") and headers["content-type"].startswith("text/vtt")
    status, _, body = client.request("GET", f"/v1/jobs/{created['id']}/result?format=json")
    assert status == 200 and json.loads(body)["language"] == "en"
    assert client.request("DELETE", f"/v1/jobs/{created['id']}")[0] == 204
    assert client.request("GET", f"/v1/jobs/{created['id']}")[0] == 404
    assert client.request("GET", f"/v1/jobs/{created['id']}/result")[0] == 404
    for made_up in ("1-" + "0" * 32, "9" * 30 + "-" + "0" * 32, "\u0661-" + "0" * 32):
        assert client.request("GET", "/v1/jobs/" + quote(made_up))[0] == 404, made_up

    # A file whisperd refuses: the job fails with the reason, its result is that 400, and the upload
    # itself does not stay on the state disk (nobody fetches it).
    status, body = client.upload("/v1/jobs", media_set.not_media)
    refused = _wait_async(client, json.loads(body)["id"], ("failed",))
    assert refused["failure"] == "refused" and refused["error"], refused
    status, _, body = client.request("GET", f"/v1/jobs/{refused['id']}/result")
    assert status == 400 and json.loads(body)["detail"] == refused["error"], body
    daemon.wait_for(lambda: _api_files(daemon) == [], 20, "the failed upload to be removed")

    long = tmp_path / "long.opus"  # half an hour in 1.4 MB: under max_upload
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=f=440:d=1800", "-c:a", "libopus",
                    "-b:a", "6k", str(long)], check=True)
    status, body = client.upload("/v1/jobs", long)
    assert status == 202, body
    job_id = json.loads(body)["id"]
    deadline = time.monotonic() + 60
    while True:
        view = json.loads(client.request("GET", f"/v1/jobs/{job_id}")[2])
        ended = view["state"] not in ("queued", "running")
        if view.get("eta_s") is not None or ended or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert view["state"] == "running" and 0 < view["progress"] < 1 and view["eta_s"] > 0, view
    # The status page shows it as an upload: its file name holds the id's secret half.
    status, _, body = client.request("GET", "/v1/status")
    assert status == 200 and job_id.split("-")[1] not in body.decode(), body
    assert f"upload #{job_id.split('-')[0]}" in body.decode()
    status, _, body = client.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 409, body
    status, _, body = client.request("DELETE", f"/v1/jobs/{job_id}")
    assert status == 200, body
    cancelled = _wait_async(client, job_id, ("cancelled",), timeout=30)
    assert cancelled["failure"] == "cancelled"
    status, _, body = client.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 410 and "cancelled" in json.loads(body)["detail"], body
    daemon.wait_for(lambda: _api_files(daemon) == [], 10, "the cancelled job's upload to go")
    processing = Path(daemon.data["state_dir"]) / "processing" / "_api"
    assert not processing.exists() or list(processing.iterdir()) == []  # no empty folder per cancel


def test_a_folder_file_and_a_request_share_one_loaded_model(tcp: tuple[Daemon, Client], media_set: MediaSet) -> None:
    """A file dropped into the folder and an upload, both done by the same process: the model was loaded
    once (one model_loaded event), and the registry the daemon reports holds that one model."""
    daemon, client = tcp
    drop_file(media_set.speech_wav, daemon.folder("inbox") / "shared-model.wav")
    status, body = client.upload("/v1/audio/transcriptions", media_set.speech_wav, response_format="text")
    assert status == 200, body
    daemon.wait_for(lambda: [j for j in daemon.jobs([JobState.DONE]) if j.rel_path == "shared-model.wav"], 60,
                    "the folder file")
    loads = daemon.events("model_loaded")
    assert len(loads) == 1, loads
    status, _, body = client.request("GET", "/v1/status")
    [instance] = json.loads(body)["daemon"]["instances"]
    assert instance["models"] == [loads[0]["model"]]


def test_asr_as_bazarr_calls_it(tcp: tuple[Daemon, Client], media_set: MediaSet) -> None:
    """/asr with raw 16 kHz PCM (encode=false) returns srt; /detect-language names a language."""
    _, client = tcp
    pcm = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(media_set.speech_wav), "-f", "s16le",
                          "-ac", "1", "-ar", "16000", "-"], check=True, capture_output=True).stdout
    status, headers, body = client.request(
        "POST", "/asr?task=transcribe&language=en&output=srt&encode=false&word_timestamps=false&vad_filter=true",
        files={"audio_file": ("episode.mkv", pcm)})
    assert status == 200, body
    assert headers["content-disposition"] == 'attachment; filename="episode.mkv.srt"'
    assert len(pysubs2.SSAFile.from_string(body.decode(), format_="srt")) >= 1
    status, body = client.upload("/detect-language", media_set.speech_mp3, name="audio_file")
    found = json.loads(body)
    assert status == 200 and len(found["language_code"]) in (2, 3) and found["detected_language"], body


def test_api_job_is_claimed_before_a_waiting_folder_job(tcp: tuple[Daemon, Client], media_set: MediaSet) -> None:
    """With everything paused: readyz and a waiting request are answered 503 at once with the reason
    and Retry-After; an async job is queued all the same, up to http.max_waiting (then 503), and a
    queued one can be cancelled. A folder file queued first and the async job second: on resume the
    API job runs first (http.priority 100 over the folder's 0)."""
    daemon, client = tcp
    _whisperd(daemon, "pause")
    try:
        status, _, body = client.request("GET", "/readyz")
        assert status == 503 and "paused" in json.loads(body)["reason"], body
        status, headers, body = client.request("POST", "/v1/audio/transcriptions",
                                               files={"file": ("a.wav", media_set.speech_wav.read_bytes())})
        assert status == 503 and "paused" in json.loads(body)["error"]["message"], body
        assert int(headers["retry-after"]) > 0
        drop_file(media_set.speech_wav, daemon.folder("inbox") / "waiting.wav")
        daemon.wait_for(lambda: [j for j in daemon.jobs([JobState.QUEUED]) if j.folder == "media"], 30,
                        "the folder job to be queued")
        status, body = client.upload("/v1/jobs", media_set.speech_wav)
        assert status == 202, body
        job_id = json.loads(body)["id"]
        # http.max_waiting API jobs wait, however many arrive at once: the others are refused at once
        # with Retry-After; a queued one can be cancelled.
        answers: list[tuple[int, dict[str, str], bytes]] = []
        senders = [threading.Thread(target=lambda: answers.append(client.request(
            "POST", "/v1/jobs", files={"file": ("a.wav", media_set.speech_wav.read_bytes())})))
            for _ in range(MAX_WAITING + 3)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(60)
        extra = [json.loads(body)["id"] for status, _, body in answers if status == 202]
        refused = [(status, headers, body) for status, headers, body in answers if status != 202]
        assert len(extra) == MAX_WAITING - 1 and len(refused) == 4, answers
        for status, headers, body in refused:
            assert status == 503 and "max_waiting" in json.loads(body)["detail"] and headers["retry-after"], body
        for other in extra:
            status, _, body = client.request("DELETE", f"/v1/jobs/{other}")
            assert status == 200 and json.loads(body)["state"] == "cancelled", body
    finally:
        _whisperd(daemon, "resume")
    finished = _wait_async(client, job_id, ("done",))
    assert finished["audio_s"] > 0
    folder_job = daemon.wait_for(lambda: [j for j in daemon.jobs([JobState.DONE]) if j.rel_path == "waiting.wav"],
                                 60, "the folder job")[0]
    [api_job] = [j for j in daemon.jobs([JobState.DONE]) if j.id == int(job_id.split("-")[0])]
    assert client.request("DELETE", f"/v1/jobs/{job_id}")[0] == 204  # its results go at once
    assert api_job.created_at > folder_job.created_at
    assert api_job.started_at is not None and folder_job.started_at is not None
    assert api_job.started_at < folder_job.started_at
    assert client.request("GET", "/readyz")[0] == 200


def _wait_async(client: Client, job_id: str, states: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until the job is in one of `states`; return its last view."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = client.request("GET", f"/v1/jobs/{job_id}")
        assert status == 200, body
        view = json.loads(body)
        if view["state"] in states or time.monotonic() > deadline:
            assert view["state"] in states, view
            return dict(view)
        time.sleep(0.1)


def test_unix_socket_timeout_and_stop(tmp_path: Path, checkpoint: Path, media_set: MediaSet) -> None:
    """On a unix socket (mode 0660, no tokens): a transcription comes back; a request whose job runs
    past http.timeout gets 504 and its job is cancelled mid-file, its upload removed; a reload that
    changes `http` keeps the running listener; a request waiting when the daemon stops gets 503, the
    daemon exits 0, the socket is gone."""
    sock = tmp_path / "run" / "api.sock"
    daemon = api_daemon(tmp_path, checkpoint, {"listen": f"unix:{sock}", "timeout": "8s"})
    daemon.data["defaults"]["sample_len"] = 224  # a long clip stays in transcription while the test acts
    daemon.write_config(daemon.data)
    daemon.start()
    client = Client(f"unix:{sock}")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    status, body = client.upload("/v1/audio/transcriptions", media_set.speech_wav, response_format="text")
    assert status == 200 and body.endswith(b"\n"), body
    long = media.tone_wav(tmp_path / "long.wav", seconds=600)
    status, body = client.upload("/v1/audio/transcriptions", long)
    assert status == 504, body
    [cancelled] = daemon.wait_for(lambda: [j for j in daemon.jobs([JobState.FAILED]) if j.folder == "_api"], 30,
                                  "the timed-out job to be cancelled")
    assert cancelled.failure == "cancelled" and cancelled.started_at is not None
    assert daemon.event("job_cancelled") is not None
    daemon.wait_for(lambda: _api_files(daemon) == [], 10, "the cancelled job's files to go")

    daemon.write_config({**daemon.data, "http": {"listen": "127.0.0.1:1", "timeout": "5s"}})
    daemon.signal(signal.SIGHUP)
    restart = daemon.wait_for(lambda: daemon.event("restart_needed"), 30, "the reload")
    assert restart["settings"] == ["http"]
    assert client.request("GET", "/readyz")[0] == 200  # the running listener stays until a restart

    answer: dict[str, Any] = {}

    def ask() -> None:
        answer["status"], answer["body"] = client.upload("/v1/audio/transcriptions", long)

    waiting = threading.Thread(target=ask)
    waiting.start()
    daemon.wait_for(lambda: daemon.jobs([JobState.RUNNING]), 30, "the API job to run")
    assert daemon.stop() == 0
    waiting.join(10)
    assert answer["status"] == 503 and "stopping" in json.loads(answer["body"])["detail"], answer
    assert not sock.exists()


def test_a_client_that_hangs_up_cancels_its_running_job(tcp: tuple[Daemon, Client], tmp_path: Path) -> None:
    """A client that sends a long file and hangs up while it transcribes: its job stops mid-file,
    cancelled, and its files go; nothing is transcribed for nobody."""
    daemon, client = tcp
    long = tmp_path / "long.opus"  # half an hour in 1.4 MB: under max_upload
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=f=440:d=1800", "-c:a", "libopus",
                    "-b:a", "6k", str(long)], check=True)
    before = {j.id for j in daemon.jobs() if j.folder == "_api"}
    host, _, port = client.listen.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = (b'--x\r\nContent-Disposition: form-data; name="file"; filename="long.opus"\r\n\r\n'
            + long.read_bytes() + b"\r\n--x--\r\n")
    conn.request("POST", "/v1/audio/transcriptions", body=body,
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "multipart/form-data; boundary=x"})
    [running] = daemon.wait_for(lambda: [j for j in daemon.jobs([JobState.RUNNING])
                                         if j.folder == "_api" and j.id not in before and j.progress], 60,
                                "the request's job to transcribe")
    conn.close()  # the client gives up
    [ended] = daemon.wait_for(lambda: [j for j in daemon.jobs([JobState.FAILED]) if j.id == running.id], 30,
                              "the job to be cancelled")
    assert ended.failure == "cancelled"
    assert daemon.event("api_request_gone") is not None
    # (Async jobs' results stay for http.keep_results; a request's files are the ones named req-.)
    daemon.wait_for(lambda: not [f for f in _api_files(daemon) if "req-" in f], 10, "its files to go")


def test_a_request_does_not_wait_for_a_folder_file_being_transcribed(
    tmp_path: Path, checkpoint: Path, media_set: MediaSet
) -> None:
    """jobs_in_flight 1, a long folder file transcribing: a request is answered while that file still
    runs (http.reserved_worker, and the file passing the device's turn between windows), from the
    same loaded model."""
    listen = f"127.0.0.1:{free_port()}"
    daemon = api_daemon(tmp_path, checkpoint, {"listen": listen})
    daemon.data["defaults"]["sample_len"] = 224  # the long file stays in transcription while the test acts
    daemon.write_config(daemon.data)
    daemon.start()
    drop_file(media.tone_wav(tmp_path / "long.wav", seconds=1800), daemon.folder("inbox") / "long.wav")
    # Its first windows decoded: the long file holds the model's device (it passes its turn between windows).
    daemon.wait_for(lambda: [j for j in daemon.jobs([JobState.RUNNING])
                             if j.rel_path == "long.wav" and (j.progress or 0) > 0], 60,
                    "the folder file to be transcribing")
    status, body = Client(listen).upload("/v1/audio/transcriptions", media_set.speech_wav, response_format="text")
    assert status == 200, body
    [running] = [j for j in daemon.jobs([JobState.RUNNING]) if j.rel_path == "long.wav"]
    assert running.progress is not None and running.progress < 1
    assert len(daemon.events("model_loaded")) == 1
    assert daemon.stop() == 0


def test_a_loopback_listener_without_tokens_answers_only_loopback_names(tmp_path: Path, checkpoint: Path) -> None:
    """No tokens_file on 127.0.0.1 (Bazarr on the same host): a request addressed to another name (a
    web page's DNS rebinding) is 403; 127.0.0.1 and localhost, with their port, are served."""
    port = free_port()
    daemon = api_daemon(tmp_path, checkpoint, {"listen": f"127.0.0.1:{port}"}).start()

    def status_for(host: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/v1/status", headers={"Host": host})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    assert status_for(f"rebound.example:{port}") == 403
    assert status_for("192.168.1.20") == 403
    assert status_for(f"127.0.0.1:{port}") == 200
    assert status_for(f"localhost:{port}") == 200
    assert daemon.stop() == 0


def test_an_async_jobs_results_go_once_keep_results_passed(
    tmp_path: Path, checkpoint: Path, media_set: MediaSet
) -> None:
    """http.keep_results: an async job's results are served while kept, then removed (410), its files
    gone from the API's folders; its job stays readable in the journal as done."""
    port = free_port()
    daemon = api_daemon(tmp_path, checkpoint, {"listen": f"127.0.0.1:{port}", "keep_results": "4s"}).start()
    client = Client(f"127.0.0.1:{port}")
    status, body = client.upload("/v1/jobs", media_set.speech_wav)
    assert status == 202, body
    job_id = json.loads(body)["id"]
    done = _wait_async(client, job_id, ("done",))
    status, _, body = client.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200 and body.strip(), (done, body)
    daemon.wait_for(lambda: client.request("GET", f"/v1/jobs/{job_id}/result")[0] == 410, 30,
                    "the results to be removed")
    assert _api_files(daemon) == []
    assert _wait_async(client, job_id, ("done",))["expires_at"] == done["expires_at"]
    assert daemon.stop() == 0


def test_a_live_unix_socket_is_not_taken_over_a_stale_one_is(tmp_path: Path, checkpoint: Path) -> None:
    """A socket another process listens on stops the start (exit 1, the reason said); the socket a
    killed process left behind is replaced, with mode 0660."""
    sock = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        holder.bind(str(sock))
        holder.listen()
        daemon = api_daemon(tmp_path, checkpoint, {"listen": f"unix:{sock}"}).start(wait_ready=False)
        assert daemon.proc is not None
        assert daemon.proc.wait(timeout=60) == 1
        assert "another process listens" in daemon.tail()
    assert sock.exists()  # the holder closed: its socket file stays, as a killed process's would
    daemon.start()
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    assert Client(f"unix:{sock}").request("GET", "/healthz")[0] == 200
    assert daemon.stop() == 0


def test_a_taken_port_stops_the_start_with_the_reason(tmp_path: Path, checkpoint: Path) -> None:
    """`whisperd run` on a port another process listens on exits 1, saying which address, before `ready`."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        daemon = api_daemon(tmp_path, checkpoint, {"listen": listen}).start(wait_ready=False)
        assert daemon.proc is not None
        assert daemon.proc.wait(timeout=60) == 1
    assert f"cannot listen on {listen}" in daemon.tail()
    assert daemon.event("ready") is None


def test_requests_of_a_killed_daemon_are_not_transcribed_for_nobody(
    tmp_path: Path, checkpoint: Path, media_set: MediaSet
) -> None:
    """kill -9 while a request's job waits: the next start drops that job (its client is gone) and
    leaves none of its files; the folders' own work is untouched."""
    listen = f"127.0.0.1:{free_port()}"
    daemon = api_daemon(tmp_path, checkpoint, {"listen": listen})
    daemon.data["defaults"]["sample_len"] = 224  # a long clip stays in transcription while the test acts
    daemon.write_config(daemon.data)
    daemon.start()
    client = Client(listen)
    long = media.tone_wav(tmp_path / "long.wav", seconds=600)
    waiting = threading.Thread(target=lambda: _swallow(lambda: client.upload("/v1/audio/transcriptions", long)))
    waiting.start()
    daemon.wait_for(lambda: [j for j in daemon.jobs([JobState.RUNNING]) if j.folder == "_api"], 60,
                    "the API job to run")
    daemon.kill()  # its upload is in the processing area, its job RUNNING: a restart would resume it
    waiting.join(10)
    daemon.start()
    assert not [j for j in daemon.jobs() if j.folder == "_api"]  # not resumed for a client that is gone
    assert _api_files(daemon) == []
    assert daemon.event("api_job_dropped") is not None
    drop_file(media_set.speech_wav, daemon.folder("inbox") / "after.wav")
    [done] = daemon.wait_done(1, timeout=60)
    assert done.state == JobState.DONE
    assert daemon.stop() == 0


def _swallow(call: Any) -> None:
    """Run a request whose connection the test breaks (the daemon is killed under it)."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        call()
