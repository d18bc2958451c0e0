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


# Runs `python -m daemon ARGS` and prints, last on stderr, which of torch and whisper it imported.
_IMPORTS_CHILD = r"""
import json, runpy, sys
sys.argv = ["whisperd", *sys.argv[1:]]
try:
    runpy.run_module("daemon", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
finally:
    print(json.dumps(sorted(m for m in ("torch", "whisper") if m in sys.modules)), file=sys.stderr)
"""


def test_operator_commands_import_neither_torch_nor_whisper(tmp_path: Path, checkpoint: Path) -> None:
    """--help, check-config, status and jobs start without torch or whisper, even for a .pt model."""
    import json

    import yaml

    from daemon.journal import FileIdentity, open_journal

    folder = {role: str(tmp_path / role) for role in ("inbox", "outbox", "archive", "failed")}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "defaults": {"model": "base"},
        "folders": [{"name": "media", **folder, "rules": [{"match": "*.wav", "model": str(checkpoint)}]}],
    }))  # fmt: skip
    journal = open_journal(tmp_path / "state")
    journal.enqueue(FileIdentity("media", "talk.wav", 1, 1), priority=0, now=0.0, skip_if_done=False)
    journal.close()
    for argv in (["--help"], ["transcribe", "--help"], ["check-config", str(config)],
                 ["status", "--config", str(config)], ["jobs", "--config", str(config)]):
        proc = subprocess.run([sys.executable, "-c", _IMPORTS_CHILD, *argv],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert json.loads(proc.stderr.splitlines()[-1]) == [], (argv, proc.stderr)
        assert proc.stdout, argv  # the command did its work
