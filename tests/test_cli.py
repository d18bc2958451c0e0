"""`whisperd transcribe`: the pipeline for files named on the command line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import MediaSet

from daemon import cli
from daemon.models import ModelRegistry


def test_three_files_load_the_model_once(
    media_set: MediaSet, checkpoint: Path, tmp_path: Path, config_factory: object
) -> None:
    """Three files through one `whisperd transcribe` load the checkpoint from disk exactly once."""
    config_factory()  # type: ignore[operator]  # writes tmp_path/config.yaml with fast decoding
    registry = ModelRegistry(tmp_path / "models", device="cpu", torch_threads=1)
    files = [shutil.copy(src, tmp_path / name) for src, name in (
        (media_set.speech_mp4, "one.mp4"),
        (media_set.speech_mkv, "two.mkv"),
        (media_set.speech_mp3, "three.mp3"),
    )]  # fmt: skip
    args = cli.build_parser().parse_args([
        "transcribe", *map(str, files), "--config", str(tmp_path / "config.yaml"),
        "--output-format", "srt", "txt", "-o", str(tmp_path / "out"),
    ])  # fmt: skip
    assert cli.cmd_transcribe(args, registry=registry) == 0
    assert dict(registry.loads) == {(str(checkpoint), "cpu"): 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{stem}.{ext}" for stem in ("one", "two", "three") for ext in ("srt", "txt")
    )


def test_command_line_run_writes_outputs_and_reports_bad_files(
    media_set: MediaSet, tmp_path: Path, config_factory: object
) -> None:
    """A real `whisperd transcribe` process writes outputs for good files and exits 1 for a bad one."""
    config_factory()  # type: ignore[operator]
    good = shutil.copy(media_set.speech_mp4, tmp_path / "lecture.mp4")
    bad = shutil.copy(media_set.not_media, tmp_path / "notes.mp4")
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "transcribe", str(bad), str(good),
         "--config", str(tmp_path / "config.yaml"), "--task", "translate", "--language", "fr",
         "-f", "vtt", "json", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lecture.json", "lecture.vtt"]
    assert "notes.mp4: not a media file" in proc.stderr
    assert str(tmp_path / "out" / "lecture.vtt") in proc.stdout.splitlines()


def test_cli_refuses_translate_with_turbo(tmp_path: Path, media_set: MediaSet) -> None:
    """--task translate --model turbo is refused before any model loads."""
    args = cli.build_parser().parse_args(
        ["transcribe", str(media_set.speech_mp4), "--model", "turbo", "--task", "translate"]
    )
    registry = ModelRegistry(tmp_path, device="cpu")
    assert cli.cmd_transcribe(args, registry=registry) == 2
    assert not registry.loads
