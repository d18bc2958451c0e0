"""`whisperd transcribe`: the pipeline for files named on the command line."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import media
import pytest
import yaml
from conftest import FAST_DECODE, MediaSet

from daemon import cli, whisper_options
from daemon.errors import UsageError
from daemon.models import ModelRegistry

FIXTURE = Path(__file__).parent / "fixtures" / "speech-tiny.pt"
ROOT = Path(__file__).resolve().parents[1]  # `python -m daemon` from here runs this checkout's daemon


def whisperd(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -m daemon ARGS` as a user would, capturing its output."""
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)  # fmt: skip


def _events(stderr: str) -> list[dict[str, Any]]:
    """Return the JSON log events in a command's stderr."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _fast_config(tmp_path: Path, checkpoint: Path, **folder: Any) -> Path:
    """Write a config on the tiny checkpoint with fast decoding and one folder 'lectures'; return its path."""
    roles = {role: str(tmp_path / "lectures" / role) for role in ("inbox", "outbox", "archive", "failed")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "model_dir": str(tmp_path / "models"), "device": "cpu", "torch_threads": 1,
        "defaults": {"model": str(checkpoint), **FAST_DECODE, "sample_len": 8},
        "folders": [{"name": "lectures", **roles, **folder}],
    }))  # fmt: skip
    return path


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
    args = cli.parse([
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
    [failed] = [e for e in _events(proc.stderr) if e["event"] == "file_failed"]
    assert (failed["file"], failed["stage"], failed["level"]) == (str(bad), "probe", "warning")
    assert failed["error"].startswith("not a media file")
    assert proc.stderr.splitlines()[-1] == "whisperd transcribe: 1 of 2 file(s) failed"
    assert str(tmp_path / "out" / "lecture.vtt") in proc.stdout.splitlines()


def test_cli_refuses_translate_with_turbo(tmp_path: Path, media_set: MediaSet) -> None:
    """--task translate --model turbo is refused before any model loads."""
    args = cli.parse(["transcribe", str(media_set.speech_mp4), "--model", "turbo", "--task", "translate"])
    registry = ModelRegistry(tmp_path, device="cpu")
    with pytest.raises(UsageError, match="turbo model is not trained to translate"):
        cli.cmd_transcribe(args, registry=registry)
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
                              capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
        assert json.loads(proc.stderr.splitlines()[-1]) == [], (argv, proc.stderr)
        assert proc.stdout, argv  # the command did its work


@pytest.mark.parametrize(
    ("argv", "files", "formats"),
    [
        (["--output_format", "srt", "talk.wav"], ["talk.wav"], ["srt"]),  # whisper's habit: one value
        (["talk.wav", "-f", "srt", "-f", "vtt"], ["talk.wav"], ["srt", "vtt"]),  # repeated
        (["-f", "srt", "vtt", "talk.wav", "b.mp4"], ["talk.wav", "b.mp4"], ["srt", "vtt"]),  # several values
        (["--output-format", "srt,json", "talk.wav"], ["talk.wav"], ["srt", "json"]),
        (["-f", "all", "talk.wav"], ["talk.wav"], ["txt", "srt", "vtt", "tsv", "json"]),
    ],
)
def test_output_format_takes_one_value_repeated_or_several(
    argv: list[str], files: list[str], formats: list[str]
) -> None:
    """`--output_format srt FILE` reads FILE as a file; -f repeats, takes several values, or 'all'."""
    args = cli.parse(["transcribe", *argv])
    assert args.files == files
    assert whisper_options.overrides(args)["output_formats"] == formats


def test_whisper_option_spellings_and_dashed_ones_mean_the_same() -> None:
    """Every option whisper's CLI spells with underscores works as typed, and with dashes, with whisper's meaning."""
    options = {
        "language": "French", "task": "translate", "temperature": "0.2", "best_of": "3", "beam_size": "None",
        "word_timestamps": "True", "max_line_width": "40", "max_line_count": "2", "max_words_per_line": "4",
        "highlight_words": "True", "initial_prompt": "Bonjour.", "condition_on_previous_text": "False",
        "threads": "2", "clip_timestamps": "1.5,4,9", "hallucination_silence_threshold": "2",
        "no_speech_threshold": "None", "logprob_threshold": "-0.5", "compression_ratio_threshold": "2",
        "output_dir": "subs", "model_dir": "models", "model": "base",
    }  # fmt: skip
    whisper_style = [token for name, value in options.items() for token in (f"--{name}", value)]
    dashed = [token.replace("_", "-") if token.startswith("--") else token for token in whisper_style]
    parsed = [cli.parse(["transcribe", "talk.wav", *argv, "--audio-track", "fra", "--skip-silence", "5s",
                         "--engine", "sequential"]) for argv in (whisper_style, dashed)]  # fmt: skip
    assert whisper_options.overrides(parsed[0]) == whisper_options.overrides(parsed[1]) == {
        "model": "base", "task": "translate", "language": "French", "audio_track": "fra", "skip_silence": 5.0,
        "word_timestamps": True, "max_line_width": 40, "max_line_count": 2, "max_words_per_line": 4,
        "highlight_words": True, "initial_prompt": "Bonjour.", "beam_size": None, "best_of": 3,
        "condition_on_previous_text": False, "no_speech_threshold": None, "compression_ratio_threshold": 2.0,
        "logprob_threshold": -0.5, "hallucination_silence_threshold": 2.0, "engine": "sequential",
        # whisper's --temperature T means T, then its fallback in steps of 0.2 up to 1.0
        "temperature": (0.2, 0.4, 0.6, 0.8, 1.0),
    }  # fmt: skip
    for args in parsed:
        assert (args.threads, args.clip_timestamps) == (2, (1.5, 4.0, 9.0))
        assert (args.output_dir, args.model_dir) == ("subs", "models")
    no_fallback = cli.parse(["transcribe", "a.wav", "--temperature", "0",
                             "--temperature_increment_on_fallback", "None"])  # fmt: skip
    assert whisper_options.overrides(no_fallback)["temperature"] == (0.0,)
    assert whisper_options.overrides(cli.parse(["transcribe", "a.wav", "--language", "None"]))["language"] == "auto"


def test_every_option_of_every_command_has_help() -> None:
    """`--help` of each command explains every option and argument it lists."""
    parser = cli.build_parser()
    for name, command in parser.commands.items():
        for action in command._actions:
            if action.dest != "help" and not isinstance(action, type(parser._subparsers._group_actions[0])):  # type: ignore[union-attr]
                assert action.help, f"whisperd {name} {'/'.join(action.option_strings) or action.dest}"
    shown = whisperd("transcribe", "--help").stdout
    for option in ("--output_format", "--best_of", "--condition_on_previous_text", "--clip_timestamps",
                   "--audio-track", "--skip-silence", "--engine", "--folder", "--threads"):
        assert option in shown, option


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--language", "klingon"], "--language: unknown language 'klingon'; did you mean lingala"),
        (["--model", "nonesuch"], "--model: unknown model 'nonesuch'; available: tiny.en, tiny, base.en"),
        (["--model", "notes.mp4"], "--model: unknown model 'notes.mp4'; available:"),
        (["--model", "{tmp}/notes.mp4"], "notes.mp4: not a whisper checkpoint torch can read: not a file torch"),
        (["--fp16", "False"], "whisper's --fp16 is not taken: whisperd uses float16 on CUDA"),
        (["--output_format", "docx"], "unknown output format docx; choose from txt, srt, vtt, tsv, json, all"),
        (["--folder", "lectures"], "--folder needs --config"),
        (["--temperature", "3"], "--temperature: must be at most 1.0, not 3.0"),
        (["--task", "translate", "--model", "turbo"], "turbo model is not trained to translate"),
        (["--engine", "fastest"], "argument --engine: invalid choice: 'fastest'"),
        (["--engine", "batched", "--beam_size", "5"], "engine: batched decodes each window on its own; "
                                                       "condition_on_previous_text need(s) engine: sequential"),
    ],
)
def test_a_mistaken_command_line_exits_2_once_before_any_file(
    argv: list[str], said: str, tmp_path: Path, media_set: MediaSet
) -> None:
    """An invalid option, language or model is one line on stderr and exit 2; no file is read, no model loaded."""
    (tmp_path / "notes.mp4").write_text("not a model")
    files = [str(shutil.copy(media_set.speech_wav, tmp_path / f"{n}.wav")) for n in ("one", "two")]
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    proc = whisperd("transcribe", *files, *argv, "-o", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and said in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_load_is_reported_once(tmp_path: Path, media_set: MediaSet) -> None:
    """A checkpoint that torch cannot use is one line for all the files, and no file is touched (exit 1)."""
    import torch

    broken = tmp_path / "broken.pt"
    torch.save({"weights": torch.zeros(2)}, broken)  # torch's format, but not a whisper model
    files = [str(shutil.copy(media_set.speech_wav, tmp_path / f"{n}.wav")) for n in ("one", "two", "three")]
    proc = whisperd("transcribe", *files, "--model", str(broken), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if "broken.pt" in line and not line.startswith("{")] == [
        f"whisperd transcribe: cannot load model {str(broken)!r}: {broken}: not a whisper checkpoint "
        "(no 'dims' and 'model_state_dict' in it)"
    ]
    assert not (tmp_path / "out").exists()


def test_a_missing_ffprobe_is_named_before_any_file(tmp_path: Path, media_set: MediaSet) -> None:
    """Without ffprobe on PATH the command says so once, instead of failing every file with a code None."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ffmpeg", "prlimit", "nice", "ionice"):
        (bin_dir / tool).symlink_to(shutil.which(tool))  # type: ignore[arg-type]
    proc = whisperd("transcribe", str(media_set.speech_wav), "-o", str(tmp_path / "out"),
                    env={**os.environ, "PATH": str(bin_dir)})  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "whisperd: ffprobe not found on PATH; install ffmpeg (apt-get install ffmpeg); prlimit and ionice come "
        "with util-linux, nice with coreutils"
    ]


def test_folder_rules_match_the_path_relative_to_its_inbox(
    tmp_path: Path, checkpoint: Path, media_set: MediaSet
) -> None:
    """With --folder, a file in the inbox's french/ gets the `french/*` rule; the same name elsewhere does not."""
    config = _fast_config(tmp_path, checkpoint, rules=[{"match": "french/*", "task": "translate", "language": "fr"}])
    inside = tmp_path / "lectures" / "inbox" / "french" / "chat_fr.wav"
    inside.parent.mkdir(parents=True)
    shutil.copy(media_set.speech_wav, inside)
    outside = Path(shutil.copy(media_set.speech_wav, tmp_path / "chat_fr.wav"))
    proc = whisperd("transcribe", str(inside), str(outside), "--config", str(config), "--folder", "lectures",
                    "-f", "txt", "-o", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    transcribed = {e["file"]: (e["task"], e["language"]) for e in _events(proc.stderr) if e["event"] == "transcribed"}
    assert transcribed[str(inside)] == ("translate", "fr")
    assert transcribed[str(outside)][0] == "transcribe"


@pytest.mark.skipif(not FIXTURE.exists(), reason="tests/fixtures/speech-tiny.pt is missing")
def test_clip_timestamps_transcribe_only_those_stretches(tmp_path: Path) -> None:
    """--clip_timestamps over the French phrase of a recording gives that phrase alone, timed inside the clip."""
    from test_recognition import ENGLISH, FRENCH, normalize, speech_span, srt_cues

    english = media.speech_wav(tmp_path / "en.wav", ENGLISH, voice="en-us+m7")
    french = media.speech_wav(tmp_path / "fr.wav", FRENCH, voice="fr-fr+f4")
    gap = tmp_path / "gap.wav"
    subprocess.run(["sox", "-n", "-r", "22050", "-c", "1", "-b", "16", str(gap), "trim", "0", "2"], check=True)
    both = tmp_path / "both.wav"
    subprocess.run(["sox", str(english), str(gap), str(french), str(both)], check=True)
    start = speech_span(english)[1] + 1.0  # in the gap, after the English phrase
    greedy = ["--model", str(FIXTURE), "--temperature", "0", "--temperature_increment_on_fallback", "None",
              "--beam_size", "None", "--best_of", "None", "--condition_on_previous_text", "False"]
    proc = whisperd("transcribe", str(both), *greedy, "--clip_timestamps", f"{start:.2f}", "-f", "srt",
                    "-o", str(tmp_path / "clip"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cues = srt_cues(tmp_path / "clip" / "both.srt")
    assert [normalize(c.text) for c in cues] == [normalize(FRENCH)]
    assert all(c.start >= start - 0.01 for c in cues), cues
    first = whisperd("transcribe", str(both), *greedy, "--clip_timestamps", f"0,{start:.2f}", "-f", "srt",
                     "-o", str(tmp_path / "first"))  # fmt: skip
    assert first.returncode == 0, first.stderr
    cues = srt_cues(tmp_path / "first" / "both.srt")
    assert [normalize(c.text) for c in cues] == [normalize(ENGLISH)]
    assert all(c.end <= start + 0.01 for c in cues), cues


def _on_a_terminal(argv: list[str], env: dict[str, str]) -> str:
    """Return what a command writes to a real terminal (a pseudo-terminal 100 columns wide)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the command closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_and_log_lines_do_not_share_a_line(tmp_path: Path, checkpoint: Path, media_set: MediaSet) -> None:
    """On a terminal each log line starts a line of its own, never glued after the progress bar."""
    config = _fast_config(tmp_path, checkpoint)
    files = [str(shutil.copy(media_set.speech_wav, tmp_path / f"{n}.wav")) for n in ("one", "two")]
    shown = _on_a_terminal(
        [sys.executable, "-m", "daemon", "transcribe", *files, "--config", str(config), "-f", "txt",
         "-o", str(tmp_path / "out")],
        {**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    pieces = re.split(r"[\r\n]", shown)
    assert any(re.match(r"one\.wav: +\d+%\|", piece) for piece in pieces), shown  # the bar was drawn
    logged = [piece for piece in pieces if "transcribed" in piece]
    assert len(logged) == 2, shown
    assert all(re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z \[info", piece) for piece in logged), logged
    assert "\x1b[3" not in shown  # NO_COLOR: no colour codes (tqdm's cursor moves are not colours)
