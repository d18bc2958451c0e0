"""The `whisperd` command: subcommands only parse arguments and wire objects together."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from daemon import __version__, names
from daemon.config import (
    OUTPUT_FORMATS,
    RULE_FIELDS,
    Config,
    Rule,
    json_schema,
    load_config,
    parse_config,
    parse_duration,
)
from daemon.errors import ConfigError, JobError, ModelError, ToolMissing
from daemon.journal import JobState
from daemon.models import ModelRegistry, is_path_setting
from daemon.operations import OperationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _user_model_dir() -> Path:
    # Without a config file, share whisper's own cache so models its CLI fetched are reused.
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "whisper"


def _optional_float(value: str) -> float | None:
    return None if value.lower() in ("none", "null") else float(value)


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "null") else int(value)


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, not {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="whisperd",
        description="Watch folders and turn recordings into transcripts and subtitles with Whisper.",
    )
    parser.add_argument("--version", action="version", version=f"whisperd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the daemon: watch the configured folders and process what arrives")
    r.add_argument("--config", "-c", type=Path, required=True, help="the config file (e.g. /etc/whisperd/config.yaml)")

    t = sub.add_parser("transcribe", help="transcribe or translate files named on the command line")
    t.add_argument("files", nargs="+", type=Path, metavar="FILE")
    t.add_argument("--config", "-c", type=Path, help="take settings and defaults from this config file")
    t.add_argument("--folder", help="use this configured folder's rules (needs --config)")
    # Rule options: absent unless given (SUPPRESS), so only what the user typed overrides the
    # config's defaults; each dest is the rule field's name.
    rule = t.add_argument_group("rule options (override the config's defaults)")
    opt: dict[str, Any] = {"default": argparse.SUPPRESS}
    rule.add_argument("--model", **opt, help="model name or .pt checkpoint path")
    rule.add_argument("--task", **opt, choices=["transcribe", "translate"])
    rule.add_argument("--language", **opt, help="auto, or a code or name such as fr or French")
    rule.add_argument("--output-format", "--output_format", "-f", dest="output_formats", nargs="+",
                      choices=[*OUTPUT_FORMATS, "all"], **opt, help="formats to write (default: all)")
    rule.add_argument("--word-timestamps", "--word_timestamps", type=_bool, metavar="BOOL", **opt)
    rule.add_argument("--max-line-width", "--max_line_width", type=int, **opt)
    rule.add_argument("--max-line-count", "--max_line_count", type=int, **opt)
    rule.add_argument("--max-words-per-line", "--max_words_per_line", type=int, **opt)
    rule.add_argument("--highlight-words", "--highlight_words", type=_bool, metavar="BOOL", **opt)
    rule.add_argument("--initial-prompt", "--initial_prompt", **opt)
    rule.add_argument("--temperature", type=float, **opt)
    rule.add_argument("--beam-size", "--beam_size", type=_optional_int, **opt)
    rule.add_argument("--no-speech-threshold", "--no_speech_threshold", type=_optional_float, **opt)
    t.add_argument("--model-dir", "--model_dir", type=Path, help="where named models download")
    t.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--output-dir", "--output_dir", "-o", type=Path, default=Path("."),
                   help="directory for the outputs (default: the current directory)")
    t.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    t.add_argument("--log-format", choices=["auto", "json", "console"])

    default_config = Path("/etc/whisperd/config.yaml")
    config_help = f"the daemon's config file (default {default_config})"

    s = sub.add_parser("status", help="per-folder counts, the running job with progress and ETA, recent failures")
    s.add_argument("--config", "-c", type=Path, default=default_config, help=config_help)
    s.add_argument("--json", action="store_true", help="print JSON")

    j = sub.add_parser("jobs", help="list jobs from the journal")
    j.add_argument("--config", "-c", type=Path, default=default_config, help=config_help)
    j.add_argument("--state", action="append", default=[], choices=[s.value for s in JobState],
                   help="only jobs in this state (repeatable)")
    j.add_argument("--since", type=_since, help="only jobs updated since: a duration ago (2h, 30m) or an ISO time")
    j.add_argument("--folder", help="only this folder's jobs")
    j.add_argument("--json", action="store_true", help="print JSON")

    rt = sub.add_parser("retry", help="queue failed jobs again, moving their originals back into the inbox")
    rt.add_argument("selectors", nargs="*", metavar="JOB|PATH",
                    help="job ids, failed originals, or inbox-relative paths")
    rt.add_argument("--folder", help="retry every failed job of this folder (or only those named)")
    rt.add_argument("--config", "-c", type=Path, default=default_config, help=config_help)

    e = sub.add_parser("enqueue", help="queue files now, without waiting for the watcher (batch runs)")
    e.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    e.add_argument("--list", type=Path, metavar="FILE",
                   help='paths one per line, or JSON lines like {"path": "…", "task": "translate", "language": "fr"}')
    e.add_argument("--folder", help="copy files from outside every inbox into this folder's inbox")
    e.add_argument("--config", "-c", type=Path, default=default_config, help=config_help)

    m = sub.add_parser("models", help="list the configured models: kind, where on disk, resident in a daemon; "
                       "or pull / import one ahead of time")
    m.add_argument("--config", "-c", type=Path, default=default_config, help=config_help)
    m.add_argument("--model-dir", "--model_dir", type=Path, help="use this model_dir instead of the config's")
    m.add_argument("--json", action="store_true", help="print JSON (the listing)")
    actions = m.add_subparsers(dest="action", metavar="ACTION")
    pull = actions.add_parser("pull", help="download OpenAI models into model_dir now, checksum-verified")
    pull.add_argument("names", nargs="+", metavar="NAME", help="an OpenAI model name (tiny … large-v3, turbo)")
    imp = actions.add_parser("import", help="convert a Hugging Face or CTranslate2 folder into model_dir's cache now")
    imp.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a model folder (or .pt file, to check it)")

    c = sub.add_parser("check-config", help="validate a config file and print each folder's resolved rules")
    c.add_argument("config", type=Path, metavar="FILE")

    sub.add_parser("config-schema", help="print the config file's JSON Schema (for editors)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whisperd command line; return the process exit code."""
    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "transcribe": cmd_transcribe,
        "check-config": cmd_check_config,
        "status": cmd_status,
        "jobs": cmd_jobs,
        "retry": cmd_retry,
        "enqueue": cmd_enqueue,
        "config-schema": cmd_config_schema,
        "models": cmd_models,
    }[args.command]
    try:
        return handler(args)
    except ConfigError as err:
        print(f"whisperd: invalid configuration: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (OperationError, ToolMissing, ModelError) as err:
        print(f"whisperd: {err}", file=sys.stderr)
        return EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT (SIGHUP reloads the config)."""
    from daemon.service import Service

    return Service(args.config).run()


def _since(value: str) -> float:
    try:
        return time.time() - float(parse_duration(value))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a duration (2h, 30m) or ISO time: {value!r}") from err
    return (moment if moment.tzinfo else moment.astimezone()).timestamp()


def cmd_status(args: argparse.Namespace) -> int:
    """Print the daemon's state from its journal."""
    from daemon import operations

    config = load_config(args.config)
    journal = operations.open_daemon_journal(config)
    report = operations.status_report(config, journal)
    print(json.dumps(report, indent=2) if args.json else operations.format_status(report))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs from the journal."""
    from daemon import operations

    config = load_config(args.config)
    journal = operations.open_daemon_journal(config)
    jobs = operations.list_jobs(journal, states=args.state, since=args.since, folder=args.folder)
    if args.json:
        now = time.time()
        print(json.dumps([operations.job_view(j, now) for j in jobs], indent=2))
    elif jobs:
        print(operations.format_jobs(jobs))
    return EXIT_OK


def _report(outcome: Any, verb: str) -> int:
    for line in outcome.done:
        print(names.printable(f"{verb}: {line}"))
    for line in outcome.skipped:
        print(names.printable(f"skipped: {line}"), file=sys.stderr)
    return EXIT_OK if not outcome.skipped else EXIT_FAILED


def cmd_retry(args: argparse.Namespace) -> int:
    """Queue failed jobs again."""
    from daemon import operations

    config = load_config(args.config)
    journal = operations.open_daemon_journal(config)
    return _report(operations.retry_failed(config, journal, args.selectors, folder=args.folder), "queued again")


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Queue files now."""
    from daemon import operations

    items = [operations.EnqueueItem(p) for p in args.paths]
    if args.list:
        text = sys.stdin.read() if str(args.list) == "-" else args.list.read_text(encoding="utf-8")
        items += operations.read_list(text)
    if not items:
        raise operations.OperationError("name files to queue, or --list FILE")
    config = load_config(args.config)
    journal = operations.open_daemon_journal(config)
    return _report(operations.enqueue(config, journal, items, folder=args.folder), "queued")


def cmd_models(args: argparse.Namespace) -> int:
    """List configured models, or pull / import some into model_dir."""
    config = load_config(args.config)
    if args.model_dir is not None:
        config.settings = config.settings.model_copy(update={"model_dir": args.model_dir.resolve()})
    if args.action == "pull":
        return _models_pull(config, args.names)
    if args.action == "import":
        return _models_import(config, args.paths)
    from daemon.instances import owner_is_dead
    from daemon.journal import open_journal
    from daemon.models.inventory import format_inventory, inventory

    try:
        journal = open_journal(config.settings.state_dir, create=False)
        instances = journal.instances()
    except FileNotFoundError:
        instances = []
    alive = {i.owner for i in instances if not owner_is_dead(i.owner)}
    report = inventory(config, instances, alive)
    if args.json:
        import dataclasses

        print(json.dumps(dataclasses.asdict(report), indent=2, default=str))
    else:
        print(format_inventory(report))
    return EXIT_OK


def _models_pull(config: Config, names: Sequence[str]) -> int:
    from daemon.models import download
    from daemon.models.sources import named_models

    unknown = [n for n in names if n not in named_models()]
    if unknown:
        print(f"whisperd: not OpenAI model names: {', '.join(unknown)}; available: {', '.join(named_models())} "
              "(for a model folder use `whisperd models import PATH`)", file=sys.stderr)
        return EXIT_USAGE
    catalog = download.catalog(config.settings.model_mirror)
    failures = 0
    for name in names:
        model = catalog[name]
        if download.verified_path(model, config.settings.model_dir) is not None:
            print(f"{name}: already in {model.path(config.settings.model_dir)} (checksum verified)")
            continue
        try:
            with _download_bar(name) as progress:
                path = download.fetch(model, config.settings.model_dir, progress)
        except ModelError as err:
            failures += 1
            print(f"whisperd: {err}", file=sys.stderr)
            continue
        print(f"{name}: downloaded to {path} (sha256 {model.sha256[:12]}… verified)")
    return EXIT_FAILED if failures else EXIT_OK


def _models_import(config: Config, paths: Sequence[Path]) -> int:
    from daemon.models import identify
    from daemon.models.registry import read_source

    failures = 0
    for path in paths:
        setting = str(path.expanduser().resolve())
        started = time.monotonic()
        try:
            source = identify(setting)
            checkpoint, origin = read_source(source, config.settings.model_dir)
        except ModelError as err:
            failures += 1
            print(f"whisperd: {err}", file=sys.stderr)
            continue
        dims = checkpoint.dims
        shape = (f"{dims.n_audio_layer}+{dims.n_text_layer} layers, width {dims.n_audio_state}, "
                 f"{'multilingual' if dims.n_vocab >= 51865 else 'English-only'}")
        what = {"converted": "converted and cached", "cache": "already converted",
                "file": "a whisper checkpoint, loaded as it is"}[origin]
        print(f"{setting}: {source.describe()} ({shape}): {what} in {time.monotonic() - started:.1f} s; "
              f"use it with  model: {setting}")
    return EXIT_FAILED if failures else EXIT_OK


class _download_bar:
    """A tqdm bar of bytes on a terminal, nothing otherwise."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        def update(done: int, total: int | None) -> None:
            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.name, unit="B", unit_scale=True, unit_divisor=1024)
            self.bar.update(done - self.bar.n)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_config_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of the config file."""
    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file; print every folder's resolved rules, or every problem."""
    config = load_config(args.config)
    print(f"{args.config}: OK, {len(config.folders)} folder(s)")
    for name, folder in config.folders.items():
        base, entries = config.folder_rules(name)
        print(f"\nfolder {name}: {folder.inbox} → {folder.outbox} (watch: {folder.watch})")
        print(f"  own rule: {_rule_summary(base)}")
        for entry, rule in entries:
            print(f"  match {entry.match!r}: {_rule_summary(rule)}")
    return EXIT_OK


def _rule_summary(rule: Rule) -> str:
    keys = ("model", "task", "language", "audio_track", "output_formats", "output_name", "on_success")
    return ", ".join(f"{k}={_show(getattr(rule, k))}" for k in keys)


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {name: getattr(args, name) for name in RULE_FIELDS if hasattr(args, name)}
    model = overrides.get("model")
    if isinstance(model, str) and is_path_setting(model):
        overrides["model"] = str(Path(model).expanduser().resolve())
    return overrides


def _cli_config(args: argparse.Namespace) -> Config:
    if args.config:
        return load_config(args.config)
    return parse_config({"model_dir": str(_user_model_dir())})


def cmd_transcribe(args: argparse.Namespace, registry: ModelRegistry | None = None) -> int:
    """Transcribe files named on the command line, loading each model once for all of them."""
    from daemon import log
    from daemon.pipeline import process_file
    from daemon.pipeline.transcribe import WhisperEngine

    config = _cli_config(args)
    settings = config.settings
    if args.folder and args.folder not in config.folders:
        print(f"whisperd: no folder named {args.folder!r} in the config", file=sys.stderr)
        return EXIT_USAGE
    log.configure(args.log_format or settings.log_format, settings.log_level)
    logger = structlog.get_logger("whisperd.transcribe")

    overrides = _cli_overrides(args)
    registry = registry or ModelRegistry(
        args.model_dir or settings.model_dir,
        args.device or settings.device,
        args.threads if args.threads is not None else settings.torch_threads,
        mirror=settings.model_mirror,
    )
    engine = WhisperEngine(registry)
    failures = 0
    for source in args.files:
        base = config.rule_for(args.folder, source.name) if args.folder else config.defaults
        try:
            rule = base.with_overrides(overrides)
        except ValueError as err:
            print(f"whisperd: {err}", file=sys.stderr)
            return EXIT_USAGE
        if rule.problems():
            print("whisperd: " + "; ".join(rule.problems()), file=sys.stderr)
            return EXIT_USAGE
        try:
            with _progress_bar(source) as progress:
                result = process_file(source, rule, engine, settings,
                                      target_dir=args.output_dir, progress=progress)
        except (JobError, ModelError, FileNotFoundError) as err:
            failures += 1
            logger.error("file_failed", file=str(source), error=str(err),
                         stage=getattr(err, "stage", None))
            print(f"whisperd: {source}: {getattr(err, 'reason', err)}", file=sys.stderr)
            continue
        for path in result.outputs:
            print(names.escape(str(path)))
    return EXIT_FAILED if failures else EXIT_OK


class _progress_bar:
    """A tqdm bar on a terminal (percent of audio done), nothing otherwise."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=100, desc=self.source.name, unit="%", leave=True)

        def update(fraction: float) -> None:
            self.bar.update(round(fraction * 100) - self.bar.n)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
