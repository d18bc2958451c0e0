"""Getting models onto a machine: named downloads, `whisperd models`, and a model that is not there yet.

Downloads go to a loopback HTTP server the test runs (or a file:// mirror): no test reaches the
network. A model that cannot be loaded is the environment's fault: files wait for it, none fails.
"""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import FAST_DECODE, MediaSet, Pretrained, config_data, enqueue_file
from daemon_harness import ROOT
from structlog.testing import capture_logs

from daemon.config import Config
from daemon.errors import ModelError
from daemon.journal import JobState
from daemon.journal.sqlite import SqliteJournal
from daemon.models import ModelRegistry
from daemon.models.download import NamedModel, fetch
from daemon.pipeline.transcribe import WhisperEngine
from daemon.worker import Worker


class Mirror:
    """A loopback HTTP server serving a folder, counting requests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                mirror.hits.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    """A running loopback mirror over tmp_path/mirror."""
    root = tmp_path / "mirror"
    root.mkdir()
    server = Mirror(root)
    yield server
    server.server.shutdown()


def closed_port() -> int:
    """Return a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_downloads_verifies_and_then_reuses(mirror: Mirror, checkpoint: Path, tmp_path: Path) -> None:
    """A named model downloads into model_dir with progress and its checksum verified; later it is reused."""
    shutil.copy(checkpoint, mirror.root / "tiny.pt")
    model = NamedModel("tiny", f"{mirror.url}/tiny.pt", sha256(checkpoint), "tiny.pt")
    seen: list[tuple[int, int | None]] = []
    path = fetch(model, tmp_path / "models", lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "models" / "tiny.pt" and sha256(path) == model.sha256
    size = checkpoint.stat().st_size
    assert seen[-1] == (size, size)
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.endswith(".part")] == []
    assert fetch(model, tmp_path / "models") == path
    assert mirror.hits == ["/tiny.pt"]  # verified from the hash index the second time, not fetched


def test_a_download_with_the_wrong_checksum_is_not_kept(mirror: Mirror, tmp_path: Path) -> None:
    """A file whose sha256 is not the expected one (a proxy's error page, a broken transfer) is discarded."""
    (mirror.root / "base.pt").write_bytes(b"<html>proxy error</html>")
    model = NamedModel("base", f"{mirror.url}/base.pt", "ab" * 32, "base.pt")
    with pytest.raises(ModelError, match=r"has sha256 [0-9a-f]{64}, expected (ab){32} .*nothing was kept"):
        fetch(model, tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_an_unreachable_download_says_where_to_put_the_file(tmp_path: Path) -> None:
    """With no network the error names the URL that failed and the exact path to copy the file to."""
    url = f"http://127.0.0.1:{closed_port()}/base.pt"
    model = NamedModel("base", url, "cd" * 32, "base.pt")
    with pytest.raises(ModelError) as caught:
        fetch(model, tmp_path / "models")
    message = str(caught.value)
    assert f"cannot download model 'base' from {url}" in message
    assert f"copy it to {tmp_path / 'models' / 'base.pt'} (sha256 {'cd' * 32})" in message


def test_registry_waits_before_trying_a_failed_model_again(tmp_path: Path, mirror: Mirror) -> None:
    """After a failed download the registry answers at once until the backoff passes, then tries again."""
    clock = [0.0]
    catalog = {"tiny": NamedModel("tiny", f"{mirror.url}/tiny.pt", "ef" * 32, "tiny.pt")}
    registry = ModelRegistry(tmp_path / "models", device="cpu", catalog=catalog, clock=lambda: clock[0])
    with capture_logs() as logs, pytest.raises(ModelError, match="cannot download model 'tiny'"):
        registry.get("tiny")
    assert [e["event"] for e in logs] == ["model_loading", "model_unavailable"]
    clock[0] = 29.0
    with pytest.raises(ModelError, match="cannot download model 'tiny'"):
        registry.get("tiny")
    assert mirror.hits == ["/tiny.pt"] and registry.retry_in("tiny") == pytest.approx(1.0)
    assert "cannot download model 'tiny'" in registry.unavailable()["tiny"]
    clock[0] = 30.0
    with pytest.raises(ModelError):
        registry.get("tiny")
    assert mirror.hits == ["/tiny.pt", "/tiny.pt"]
    assert registry.retry_in("tiny") == pytest.approx(60.0)  # the wait doubles


def test_files_wait_in_the_inbox_while_their_model_cannot_be_downloaded(
    tmp_path: Path, config_factory: Callable[..., Config], media_set: MediaSet, checkpoint: Path
) -> None:
    """A queued file whose model cannot be downloaded stays in the inbox, queued, with no attempt counted;
    once the model can be had, the same job runs to the end."""
    mirror_dir = tmp_path / "mirror"
    mirror_dir.mkdir()
    config = config_factory(defaults={**FAST_DECODE, "model": "tiny"})
    folder = config.folders["media"]
    folder.inbox.mkdir(parents=True)
    shutil.copyfile(media_set.speech_wav, folder.inbox / "talk.wav")
    clock = [1000.0]
    catalog = {"tiny": NamedModel("tiny", f"file://{mirror_dir}/tiny.pt", sha256(checkpoint), "tiny.pt")}
    registry = ModelRegistry(tmp_path / "models", device="cpu", catalog=catalog, clock=lambda: clock[0])
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    worker = Worker(lambda: config, journal, WhisperEngine(registry), owner="test:1", clock=lambda: clock[0],
                    jitter=lambda: 1.0)
    job_id = enqueue_file(journal, folder.inbox / "talk.wav", "talk.wav", now=clock[0])

    with capture_logs() as logs:
        worker.run_once()
    job = journal.get(job_id)
    assert job is not None and (job.state, job.attempts) == (JobState.QUEUED, 0)
    assert job.next_attempt_at == pytest.approx(clock[0] + 30)
    assert (folder.inbox / "talk.wav").exists() and not folder.failed.exists()
    postponed = [e for e in logs if e["event"] == "job_postponed"]
    assert len(postponed) == 1 and "cannot download model 'tiny'" in postponed[0]["error"]
    assert not [e for e in logs if e.get("exc_info")]  # an expected fault: no traceback

    assert worker.run_once() is None  # not due yet
    shutil.copy(checkpoint, mirror_dir / "tiny.pt")  # the operator copies the file to the mirror
    clock[0] += 30
    worker.run_once()
    job = journal.get(job_id)
    assert job is not None and (job.state, job.attempts) == (JobState.DONE, 0)
    assert (folder.outbox / "talk.txt").exists() and (tmp_path / "models" / "tiny.pt").exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=ROOT)


def test_models_pull_reports_an_unreachable_mirror(tmp_path: Path, checkpoint: Path) -> None:
    """`whisperd models pull` exits 1 naming the URL that failed and where to put the file; names are checked first."""
    data = config_data(tmp_path, checkpoint, model_mirror=f"http://127.0.0.1:{closed_port()}/whisper")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    pulled = _cli("models", "--config", str(tmp_path / "config.yaml"), "pull", "base")
    assert pulled.returncode == 1
    assert "/whisper/base.pt" in pulled.stderr and f"copy it to {tmp_path / 'models' / 'base.pt'}" in pulled.stderr
    unknown = _cli("models", "--config", str(tmp_path / "config.yaml"), "pull", "huge")
    assert unknown.returncode == 2 and "not OpenAI model names: huge; available: tiny.en" in unknown.stderr


def test_models_import_converts_once_and_the_listing_shows_it(tmp_path: Path, pretrained: Pretrained) -> None:
    """`whisperd models import` converts a CTranslate2 folder into model_dir; `whisperd models` then shows it cached."""
    data = config_data(tmp_path, pretrained.tiny_en)
    data["defaults"]["model"] = str(pretrained.tiny_en)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    config = str(tmp_path / "config.yaml")
    before = _cli("models", "--config", config)
    assert before.returncode == 0
    assert "[CTranslate2]" in before.stdout and "not converted yet (whisperd models import" in before.stdout
    imported = _cli("models", "--config", config, "import", str(pretrained.tiny_en))
    assert imported.returncode == 0, imported.stderr
    assert "English-only): converted and cached" in imported.stdout
    again = _cli("models", "--config", config, "import", str(pretrained.tiny_en))
    assert "already converted" in again.stdout
    after = _cli("models", "--config", config)
    [cached] = (tmp_path / "models" / "converted").glob("ct2-*.pt")
    assert f"on disk:  converted: {cached}" in after.stdout
    assert "used by:  defaults, media" in after.stdout and "resident: no" in after.stdout
