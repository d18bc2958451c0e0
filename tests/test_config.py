"""Configuration: validation, error reporting with locations, and rule precedence."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon import cli, preflight
from daemon.config import BUILTIN_IGNORES, json_schema, load_config, parse_config, parse_duration, validate_config
from daemon.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _folder(tmp_path: Path, name: str = "a", **extra: Any) -> dict[str, Any]:
    base = tmp_path / name
    return {
        "name": name, "inbox": str(base / "in"), "outbox": str(base / "out"),
        "archive": str(base / "archive"), "failed": str(base / "failed"), **extra,
    }  # fmt: skip


def _locations(err: ConfigError) -> set[str]:
    return {p.location for p in err.problems}


def test_example_config_validates(capsys: pytest.CaptureFixture[str]) -> None:
    """config.example.yaml passes check-config --file-only, which prints each folder's resolved rules."""
    assert cli.main(["check-config", "--file-only", str(ROOT / "config.example.yaml")]) == 0
    out = capsys.readouterr().out
    assert "folder lectures" in out and "folder camera" in out
    assert "match 'french/*'" in out and "language=fr" in out
    assert "match 'interviews/*'" in out and "word_timestamps=True, max_line_width=42, max_line_count=2" in out
    # On this machine its /srv folders do not exist: checked for real, that is what it says.
    assert cli.main(["check-config", str(ROOT / "config.example.yaml")]) == 2
    err = capsys.readouterr().err
    assert "folders[0].inbox: /srv/media/lectures/inbox does not exist" in err


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A folder other users may enter (mode 0755, unlike pytest's own 0700 tmp_path), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="whisperd-check-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["check-config", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_config_reports_every_folder_problem_for_the_service_user(
    shared_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Missing inboxes, an inbox below a file, folders the service user cannot write: all at once, exit 2."""
    for sub in ("ok/in", "ok/out", "ok/archive", "ok/failed", "locked/out"):
        (shared_root / sub).mkdir(parents=True)
    for sub in ("ok", "ok/in", "ok/out", "ok/archive", "ok/failed"):
        (shared_root / sub).chmod(0o777)
    (shared_root / "locked").chmod(0o755)
    (shared_root / "locked" / "out").chmod(0o755)
    (shared_root / "a-file").write_text("")
    roles = {"outbox": "ok/out", "archive": "ok/archive", "failed": "ok/failed"}
    config = shared_root / "config.yaml"
    config.write_text(yaml.safe_dump({"folders": [
        {"name": "gone", "inbox": "missing/in", **roles},
        {"name": "below-a-file", "inbox": "a-file/in", **roles},
        {"name": "locked", "inbox": "ok/in", **roles, "outbox": "locked/out"},
    ]}))  # fmt: skip
    code, out, err = _check(capsys, str(config), "--as-user", "nobody")
    assert code == 2
    assert out.splitlines()[0] == f"{config}: 3 problem(s), 3 folder(s)"
    owner = f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"
    assert err.splitlines() == [
        f"  folders[0].inbox: {shared_root}/missing/in does not exist",
        f"  folders[1].inbox: {shared_root}/a-file/in cannot exist: {shared_root}/a-file is not a folder",
        f"  folders[2].outbox: user nobody cannot read and write in {shared_root}/locked/out "
        f"(owner {owner}, mode drwxr-xr-x)",
    ]
    assert "folder locked:" in out  # the file itself is valid: its rules are still shown


def test_check_config_and_run_refuse_an_empty_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty file or one without folders is an error: `run` would have nothing to watch."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, out, err = _check(capsys, str(empty))
    assert code == 2 and "folders: no folders configured" in err and out.startswith(f"{empty}: 1 problem(s)")
    assert cli.main(["run", "--config", str(empty)]) == 2
    assert "folders: no folders configured: whisperd run has nothing to watch" in capsys.readouterr().err


@pytest.mark.skipif(cli.DEFAULT_CONFIG.exists(), reason="this machine has a real /etc/whisperd/config.yaml")
def test_run_and_check_config_read_the_default_config_like_the_other_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --config, `run` and `check-config` read /etc/whisperd/config.yaml, as status and jobs do."""
    for argv in (["run"], ["check-config"], ["status"]):
        assert cli.main(argv) == 2, argv
        assert "cannot read /etc/whisperd/config.yaml" in capsys.readouterr().err, argv


def test_run_refuses_to_start_when_an_inbox_cannot_be_watched(tmp_path: Path) -> None:
    """`whisperd run` with a missing inbox exits 2 naming it and creates nothing (it may be an unmounted share)."""
    folder = _folder(tmp_path, "a")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "folders": [folder]}))
    proc = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2
    assert f"folders[0].inbox: {folder['inbox']} does not exist" in proc.stderr
    assert "--allow-missing" in proc.stderr
    assert not Path(folder["inbox"]).exists() and not (tmp_path / "state").exists()


def test_an_events_inbox_on_a_network_share_is_a_warning(tmp_path: Path) -> None:
    """`watch: events` on an NFS or SMB mount gets a warning (inotify misses other machines' writes); poll does not.

    No network share can be mounted here: the mount table is real mountinfo text naming one.
    """
    share = tmp_path / "share"
    (share / "in").mkdir(parents=True)
    mountinfo = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"95 22 0:52 / {share} rw,relatime shared:50 - nfs4 nas:/export/media rw,vers=4.2\n"
    )
    mounts = preflight.parse_mountinfo(mountinfo)
    assert [(m.point, m.fstype, m.source) for m in mounts] == [
        (Path("/"), "ext4", "/dev/sda1"), (share, "nfs4", "nas:/export/media"),
    ]
    user = preflight.User.current()
    checked = validate_config({"folders": [
        {"name": "events", "inbox": str(share / "in"), "outbox": str(tmp_path / "o"), "failed": str(tmp_path / "f"),
         "archive": str(tmp_path / "a")},
        {"name": "poll", "inbox": str(share / "in2"), "outbox": str(tmp_path / "o2"), "failed": str(tmp_path / "f2"),
         "archive": str(tmp_path / "a2"), "watch": "poll"},
    ]})  # fmt: skip
    events, polled = (preflight.check_folder(folder, user, mounts) for folder in checked.folders)
    [warning] = [f for f in events if f.location == "folders[0].watch"]
    assert warning.level == "warning" and "nfs4 nas:/export/media" in warning.message
    assert "use watch: poll" in warning.message
    assert not [f for f in polled if f.location.endswith(".watch")]
    # This machine's own mount table: tmp_path is on a local disk, so no warning.
    assert not [f for f in preflight.check_folders(checked.folders[:1], user) if f.location.endswith(".watch")]


def test_mount_points_with_spaces_are_read_from_their_escapes() -> None:
    """mountinfo writes a space in a mount point as \\040; the inbox below it is still matched to its share."""
    [mount] = preflight.parse_mountinfo("95 22 0:52 / /mnt/team\\040share rw - cifs //nas/team rw\n")
    assert mount.point == Path("/mnt/team share")
    assert preflight.mount_of(Path("/mnt/team share/inbox"), [mount]) == mount


def test_every_mistake_is_reported_with_its_location(tmp_path: Path) -> None:
    """A config with several mistakes lists all of them, each at its location, in one error."""
    data = {
        "device": "gpu",
        "log_levl": "info",
        "defaults": {"model": "turbo", "temperature": 3},
        "folders": [
            _folder(tmp_path, "a", rules=[
                {"match": "*.mp3", "task": "translate"},
                {"match": "*.mkv", "output_name": "{stem}.txt"},
            ]),
            _folder(tmp_path, "b", watch="inotify", model="no-such-model"),
            _folder(tmp_path, "a"),
        ],
    }  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert _locations(caught.value) >= {
        "device",
        "log_levl",
        "defaults.temperature[0]",
        "folders[0].rules[0]",  # translate with turbo
        "folders[0].rules[1].output_name",
        "folders[1].watch",
        "folders[1].model",  # still checked although watch is wrong in the same folder
        "folders[2].name",
    }
    text = str(caught.value)
    assert "turbo model is not trained to translate" in text
    assert "unknown model 'no-such-model'; available: tiny.en, tiny" in text


def test_check_config_exits_nonzero_and_prints_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`whisperd check-config` on a broken file exits 2 and prints every problem."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"device": "gpu", "folders": [{"name": "x"}]}))
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "device:" in err and "folders[0].inbox: required" in err


def test_a_missing_required_field_hides_no_other_problem(tmp_path: Path) -> None:
    """A folder without an inbox still gets its other mistakes reported, and the other folders theirs."""
    data = {
        "defaults": {"model": "turbo"},
        "folders": [
            {"name": "a", "outbox": "/o", "failed": "/f", "archive": "/a", "task": "translate", "ouptut_name": "x"},
            {"name": "b", "inbox": "/i", "outbox": "/o2", "failed": "/f2"},  # no archive for on_success: archive
        ],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert _locations(caught.value) == {
        "folders[0].inbox", "folders[0].ouptut_name", "folders[0]", "folders[1].archive",
    }
    assert "folders[0].inbox: required: folder to watch" in str(caught.value)


def test_inherited_problems_are_reported_once_where_written(tmp_path: Path) -> None:
    """A mistake in defaults is reported there once, not again for every folder and rule inheriting it."""
    data = {
        "defaults": {"max_line_width": 42, "model": "nonesuch"},
        "folders": [
            _folder(tmp_path, "a", rules=[{"match": "*.mp3", "language": "fr"}, {"match": "*.wav"}]),
            _folder(tmp_path, "b", model="base", max_words_per_line=3),
        ],
    }  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert [str(p) for p in caught.value.problems] == [
        "defaults: max_line_width need(s) word_timestamps: true",
        "defaults.model: unknown model 'nonesuch'; available: tiny.en, tiny, base.en, base, small.en, small, "
        "medium.en, medium, large-v1, large-v2, large-v3, large, large-v3-turbo, turbo, or a path to a whisper "
        ".pt file, a Hugging Face Whisper folder or a CTranslate2 Whisper folder",
        # folder b adds a mistake of its own; the inherited one is not repeated there
        "folders[1]: max_line_width, max_words_per_line need(s) word_timestamps: true",
        "folders[1]: max_words_per_line and max_line_width cannot be combined (whisper uses one)",
    ]


def test_problems_are_in_plain_words_with_did_you_mean(tmp_path: Path) -> None:
    """Misspelt keys and values get "did you mean", patterns are said in words, misplaced keys where they go."""
    data = {
        "device": "gpu",
        "log_levl": "info",
        "model_mirror": "ftp://mirror",
        "defaults": {"watch": "poll", "tempreature": 0},
        "folders": [_folder(tmp_path, "a b", watch="pol", rules=[{"match": "*", "langauge": "fr"}])],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    messages = {p.location: p.message for p in caught.value.problems}
    assert messages == {
        "device": "must be auto, cpu, cuda or cuda:N (a GPU's index, e.g. cuda:1), not 'gpu'",
        "log_levl": "unknown key 'log_levl'; did you mean 'log_level'?",
        "model_mirror": "must be a URL starting with http://, https:// or file://, not 'ftp://mirror'",
        "defaults.watch": "unknown key 'watch' here: it belongs to a folder",
        "defaults.tempreature": "unknown key 'tempreature'; did you mean 'temperature'?",
        "folders[0].name": "must start with a letter or digit and hold only letters, digits, '_', '.' and '-', "
                           "not 'a b'",
        "folders[0].watch": "must be 'events' or 'poll', not 'pol'; did you mean 'poll'?",
        "folders[0].rules[0].langauge": "unknown key 'langauge'; did you mean 'language'?",
    }


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    """A YAML syntax error is a ConfigError that says where."""
    path = tmp_path / "broken.yaml"
    path.write_text("folders:\n  - name: a\n   inbox: [\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        load_config(path)


def test_rule_precedence(tmp_path: Path, checkpoint: Path) -> None:
    """The first matching rule beats the folder's settings, which beat defaults."""
    data = {
        "defaults": {"model": str(checkpoint), "language": "de", "task": "transcribe", "beam_size": 2},
        "folders": [_folder(tmp_path, language="fr", output_formats=["srt"], rules=[
            {"match": "talks/*", "language": "es"},
            {"match": "*.MP3", "task": "translate"},
            {"match": "talks/*", "language": "it"},  # never reached: the first match wins
        ])],
    }  # fmt: skip
    config = parse_config(data)
    plain = config.rule_for("a", "clip.mp4")
    talk = config.rule_for("a", "talks/2024/keynote.mp4")
    song = config.rule_for("a", "music/song.mp3")
    assert (plain.language, plain.output_formats, plain.beam_size) == ("fr", ("srt",), 2)
    assert (talk.language, talk.output_formats, talk.beam_size) == ("es", ("srt",), 2)
    assert (song.task, song.language) == ("translate", "fr")


def test_explicit_null_overrides_a_default(tmp_path: Path) -> None:
    """`no_speech_threshold: null` on a folder turns the guard off; leaving it out keeps 0.6."""
    data = {"folders": [_folder(tmp_path, "a", no_speech_threshold=None), _folder(tmp_path, "b")]}
    config = parse_config(data)
    assert config.rule_for("a", "x.mp4").no_speech_threshold is None
    assert config.rule_for("b", "x.mp4").no_speech_threshold == 0.6


def test_translate_with_turbo_is_refused_wherever_it_arises(tmp_path: Path) -> None:
    """turbo from defaults plus translate on a folder is caught at that folder."""
    data = {"defaults": {"model": "turbo"}, "folders": [_folder(tmp_path, task="translate")]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert _locations(caught.value) == {"folders[0]"}


@pytest.mark.parametrize("role", ["outbox", "archive", "failed"])
def test_inbox_inside_an_output_folder_is_refused(tmp_path: Path, role: str) -> None:
    """An inbox inside any folder's outbox, archive or failed folder would eat its own output."""
    first = _folder(tmp_path, "a")
    second = _folder(tmp_path, "b", inbox=str(Path(first[role]) / "sub"))
    with pytest.raises(ConfigError) as caught:
        parse_config({"folders": [first, second]})
    assert "folders[1].inbox" in _locations(caught.value)
    assert role in str(caught.value)


def test_output_folder_inside_a_recursive_inbox_is_refused(tmp_path: Path) -> None:
    """An outbox inside a recursively watched inbox would feed outputs back in."""
    folder = _folder(tmp_path, "a")
    folder["outbox"] = str(Path(folder["inbox"]) / "done")
    with pytest.raises(ConfigError, match=r"folders\[0\]\.outbox: lies inside the inbox"):
        parse_config({"folders": [folder]})


def test_a_visible_processing_area_inside_the_inbox_is_refused(tmp_path: Path) -> None:
    """`processing: <inbox>/work` would be watched and queued again; a hidden one is fine."""
    folder = _folder(tmp_path, "a")
    folder["processing"] = str(Path(folder["inbox"]) / "work")
    with pytest.raises(ConfigError, match=r"folders\[0\]\.processing: lies inside the inbox"):
        parse_config({"folders": [folder]})
    folder["processing"] = str(Path(folder["inbox"]) / ".work")
    assert parse_config({"folders": [folder]}).folders["a"].processing == Path(folder["processing"])


def test_two_folders_may_not_share_an_inbox(tmp_path: Path) -> None:
    """Two folders watching one inbox would race for its files."""
    first = _folder(tmp_path, "a")
    second = _folder(tmp_path, "b", inbox=first["inbox"])
    with pytest.raises(ConfigError) as caught:
        parse_config({"folders": [first, second]})
    assert "folders[1].inbox" in _locations(caught.value)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """`inbox: in` in /etc/x/config.yaml means /etc/x/in, not the working directory's."""
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "config.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": "state",
        "folders": [{"name": "a", "inbox": "in", "outbox": "out", "failed": "failed", "archive": "~/arch"}],
    }))  # fmt: skip
    config = load_config(path)
    folder = config.folders["a"]
    assert folder.inbox == tmp_path / "conf" / "in"
    assert config.settings.state_dir == tmp_path / "conf" / "state"
    assert folder.archive == Path.home() / "arch"


def test_language_accepts_codes_names_and_container_tags(tmp_path: Path) -> None:
    """'French', 'fr' and 'fra' all mean whisper's 'fr'; nonsense is refused."""
    for spelling in ("French", "fr", "fra", "FR"):
        config = parse_config({"defaults": {"language": spelling}})
        assert config.defaults.language == "fr"
    with pytest.raises(ConfigError, match="unknown language 'klingon'"):
        parse_config({"defaults": {"language": "klingon"}})


@pytest.mark.parametrize(
    ("text", "seconds"), [(90, 90.0), ("90", 90.0), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0)]
)
def test_durations(text: object, seconds: float) -> None:
    """Durations take seconds or h/m/s suffixes."""
    assert parse_duration(text) == seconds


def test_layout_options_need_word_timestamps(tmp_path: Path) -> None:
    """max_line_width without word_timestamps is refused with a hint, as whisper needs words."""
    with pytest.raises(ConfigError, match=r"max_line_width need.* word_timestamps: true"):
        parse_config({"defaults": {"max_line_width": 42}})
    assert parse_config({"defaults": {"max_line_width": 42, "word_timestamps": True}})


def test_skip_silence_is_off_or_at_least_a_second() -> None:
    """skip_silence takes 0 (off) or a duration of 1 s or more; a positive silence level is refused."""
    with pytest.raises(ConfigError, match=r"skip_silence must be 0 \(off\) or at least 1 second"):
        parse_config({"defaults": {"skip_silence": 0.5}})
    with pytest.raises(ConfigError, match=r"silence_threshold_db"):
        parse_config({"defaults": {"silence_threshold_db": 3}})
    assert parse_config({"defaults": {"skip_silence": "10s"}}).defaults.skip_silence == 10.0
    assert parse_config({"defaults": {"skip_silence": 0}}).defaults.skip_silence == 0.0


def test_builtin_ignores_and_globs(tmp_path: Path) -> None:
    """Partial downloads and OS droppings are ignored; include/exclude apply case-insensitively."""
    config = parse_config({"folders": [_folder(tmp_path, include=["*.mp4", "*.mkv"], exclude=["drafts/*"])]})
    folder = config.folders["a"]
    assert folder.accepts("talk.MP4") and folder.accepts("sub/dir/talk.mkv")
    for junk in ("talk.mp4.part", ".hidden.mp4", "._talk.mp4", "@eaDir/talk.mp4", "~$talk.mp4",
                 "x.crdownload", "Thumbs.db", "#recycle/talk.mp4", "a/.stfolder/b.mp4", "THUMBS.DB",
                 "TALK.MP4.PART", "@EADIR/talk.mp4"):
        assert not folder.accepts(junk), junk
    assert not folder.accepts("notes.txt")
    assert not folder.accepts("drafts/talk.mp4")
    assert ".DS_Store" in BUILTIN_IGNORES


def test_config_schema_describes_folders_and_rules(capsys: pytest.CaptureFixture[str]) -> None:
    """`whisperd config-schema` prints a JSON Schema that knows folder and rule fields."""
    assert cli.main(["config-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == json_schema()
    folder = schema["$defs"]["Folder"]["properties"]
    assert {"inbox", "watch", "rules", "model", "task"} <= set(folder)
    assert "description" in folder["stability_delay"]


def test_out_of_range_and_mistyped_values_are_said_in_plain_words(tmp_path: Path) -> None:
    """Bounds and types read as the config's own words, not pydantic's ("Input should be …")."""
    data = {
        "defaults": {"max_line_width": -3, "beam_size": "lots"},
        "folders": [_folder(tmp_path, "a", word_timestamps="maybe", rules=3)],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    text = str(caught.value)
    assert "defaults.max_line_width: must be at least 1, not -3" in text
    assert "defaults.beam_size: must be a whole number, not 'lots'" in text
    assert "folders[0].word_timestamps: must be true or false, not 'maybe'" in text
    assert "folders[0].rules: must be a list, not 3" in text
    assert "Input should" not in text
