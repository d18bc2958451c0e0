"""The `whisperd` command: subcommands only parse arguments and wire objects together."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO, cast

import structlog

from daemon import __version__, names, preflight, whisper_options
from daemon.config import (
    API_FOLDER,
    CheckedFolder,
    Config,
    Folder,
    Rule,
    apply_overrides,
    json_schema,
    load_config,
    parse_config,
    parse_duration,
    read_config_file,
    validate_config,
)
from daemon.errors import (
    ConfigError,
    ConfigProblem,
    JobError,
    ListenerError,
    ModelError,
    ToolMissing,
    UsageError,
    WhisperdError,
)
from daemon.journal import JobState
from daemon.models import ModelRegistry, is_path_setting, source_problem
from daemon.operations import OperationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command that SIGPIPE ended
DEFAULT_CONFIG = Path("/etc/whisperd/config.yaml")


def _user_model_dir() -> Path:
    # Without a config file, share whisper's own cache so models its CLI fetched are reused.
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "whisper"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes take one line: what is wrong, and where help is."""

    commands: dict[str, argparse.ArgumentParser]  # the subcommands' parsers, by name

    def error(self, message: str) -> NoReturn:
        for flag, reason in whisper_options.WHISPER_ONLY.items():
            if f" {flag}" in f" {message}" or f" {flag.replace('_', '-')}" in f" {message}":
                message = f"whisper's {flag} is not taken: {reason}"
                break
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> _Parser:
    """Return the argument parser for every subcommand."""
    parser = _Parser(
        prog="whisperd",
        description="Watch folders and turn recordings into transcripts and subtitles with Whisper.",
    )
    parser.add_argument("--version", action="version", version=f"whisperd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"the daemon's config file (default {DEFAULT_CONFIG})"

    r = sub.add_parser("run", help="run the daemon: watch the configured folders and process what arrives")
    r.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help=config_help)
    r.add_argument("--allow-missing", action="store_true",
                   help="start even when an inbox is missing or cannot be watched; that folder is paused, "
                   "with the reason in `whisperd status`, until it can be")

    t = sub.add_parser("transcribe", help="transcribe or translate files named on the command line, "
                       "with whisper's option names")
    whisper_options.add_arguments(t)

    s = sub.add_parser("status", help="per-folder counts, the running job with progress and ETA, recent failures")
    s.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help=config_help)
    s.add_argument("--json", action="store_true", help="print JSON")

    j = sub.add_parser("jobs", help="list jobs from the journal")
    j.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help=config_help)
    j.add_argument("--state", action="append", default=[], choices=[s.value for s in JobState],
                   help="only jobs in this state (repeatable)")
    j.add_argument("--since", type=_since, help="only jobs updated since: a duration ago (2h, 30m) or an ISO time")
    j.add_argument("--folder", help="only this folder's jobs")
    j.add_argument("--json", action="store_true", help="print JSON")

    rt = sub.add_parser("retry", help="queue failed jobs again, moving their originals back into the inbox")
    rt.add_argument("selectors", nargs="*", metavar="JOB|PATH",
                    help="job ids, failed originals, or inbox-relative paths")
    rt.add_argument("--folder", help="retry every failed job of this folder (or only those named)")
    rt.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help=config_help)

    e = sub.add_parser("enqueue", help="queue files now, without waiting for the watcher (batch runs)")
    e.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="files inside an inbox, or anywhere with --folder")
    e.add_argument("--list", type=Path, metavar="FILE",
                   help='paths one per line, or JSON lines like {"path": "…", "task": "translate", "language": "fr"}')
    e.add_argument("--folder", help="copy files from outside every inbox into this folder's inbox")
    e.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help=config_help)

    for verb, what in (("pause", "stop claiming new files (the running one finishes; files are still watched "
                                  "and queued), e.g. to lend the GPU to another service"),
                       ("resume", "claim files again after `whisperd pause`")):
        pr = sub.add_parser(verb, help=what)
        pr.add_argument("--folder", action="append", metavar="NAME",
                        help=f"{verb} only this folder (repeatable; default: every folder)")
        pr.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help=config_help)

    m = sub.add_parser("models", help="list the configured models: kind, where on disk, resident in a daemon; "
                       "or pull / import one ahead of time")
    m.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help=config_help)
    m.add_argument("--model-dir", "--model_dir", type=Path, help="use this model_dir instead of the config's")
    m.add_argument("--json", action="store_true", help="print JSON (the listing)")
    actions = m.add_subparsers(dest="action", metavar="ACTION")
    pull = actions.add_parser("pull", help="download OpenAI models into model_dir now, checksum-verified")
    pull.add_argument("names", nargs="+", metavar="NAME", help="an OpenAI model name (tiny … large-v3, turbo)")
    imp = actions.add_parser("import", help="convert a Hugging Face or CTranslate2 folder into model_dir's cache now")
    imp.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a model folder (or .pt file, to check it)")

    c = sub.add_parser("check-config", help="check a config file and the folders it names; print each folder's "
                       "resolved rules, or every problem at once")
    c.add_argument("file", nargs="?", type=Path, metavar="FILE", help=f"the config file (default {DEFAULT_CONFIG})")
    c.add_argument("--config", "-c", type=Path, dest="config_option", metavar="FILE",
                   help="the config file, given the way the other commands take it")
    c.add_argument("--as-user", metavar="USER",
                   help="judge the folders' permissions for this user, the one the service runs as "
                   "(whisperd for the packaged unit; default: whoever runs the check)")
    c.add_argument("--file-only", action="store_true",
                   help="check the file alone, not its folders on this machine (a config meant for another one)")

    sub.add_parser("config-schema", help="print the config file's JSON Schema (for editors)")
    parser.commands = dict(sub.choices)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Return the parsed command line; a mistake exits 2 with one line."""
    argv = list(argv)
    if argv[:1] == ["transcribe"]:
        argv = ["transcribe", *whisper_options.expand_output_formats(argv[1:])]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, so the hint names its --help
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whisperd command line; return the process exit code."""
    args = parse(sys.argv[1:] if argv is None else argv)
    handler = {
        "run": cmd_run,
        "transcribe": cmd_transcribe,
        "check-config": cmd_check_config,
        "status": cmd_status,
        "jobs": cmd_jobs,
        "retry": cmd_retry,
        "enqueue": cmd_enqueue,
        "pause": cmd_pause,
        "resume": cmd_pause,
        "config-schema": cmd_config_schema,
        "models": cmd_models,
    }[args.command]
    try:
        return handler(args)
    except BrokenPipeError:
        # The reader went away (`whisperd status | head -3`): stop quietly, as ls or cat do. Python
        # would still flush stdout at exit and print a traceback; point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ConfigError as err:
        print(f"whisperd: invalid configuration: {err}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as err:
        print(f"whisperd {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (OperationError, ToolMissing, ModelError, ListenerError) as err:
        print(f"whisperd: {err}", file=sys.stderr)
        return EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT (SIGHUP reloads the config).

    Refuses to start with no folders, or with an inbox it cannot watch (missing, not a folder, no
    access): creating a missing inbox would hide an unmounted share. `--allow-missing` starts
    anyway and hands the service the decision to pause those folders.
    """
    config = load_config(args.config)
    if not config.watched:
        raise ConfigError([ConfigProblem("folders", "no folders configured: whisperd run has nothing to watch")],
                          args.config)
    blocked = preflight.unwatchable(_checked_folders(config), preflight.User.current())
    if blocked and not args.allow_missing:
        lines = "".join(f"\n  {finding}" for finding in blocked)
        print(f"whisperd: cannot watch every inbox; fix them, or start with --allow-missing to pause "
              f"those folders until they can be watched:{lines}", file=sys.stderr)
        return EXIT_USAGE
    from daemon.service import Service  # torch and whisper: only once the daemon will really start

    # With --allow-missing the service pauses those folders: its health check finds the missing inbox
    # (the reason shows in status), and each rescan tries to watch it again.
    return Service(args.config).run()


def _checked_folders(config: Config) -> list[CheckedFolder]:
    return [CheckedFolder(i, folder) for i, folder in enumerate(config.watched.values())]


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
    else:
        filtered = args.state or args.since is not None or args.folder
        print("no jobs" + (" match these filters" if filtered else " in the journal yet"))
    return EXIT_OK


def _report(outcome: Any, verb: str, not_done: str) -> int:
    for line in outcome.done:
        print(names.printable(f"{verb}: {line}"))
    for line in outcome.skipped:
        print(names.printable(f"{not_done}: {line}"), file=sys.stderr)
    return EXIT_OK if not outcome.skipped else EXIT_FAILED


def cmd_pause(args: argparse.Namespace) -> int:
    """Pause or resume claiming work, for every folder or the ones named (the daemon reads it from the journal)."""
    from daemon import operations

    config = load_config(args.config)
    unknown = [name for name in args.folder or () if name not in config.folders]
    if unknown:
        raise UsageError(f"no folder named {', '.join(unknown)} in {args.config} "
                         f"(folders: {', '.join(config.folders) or 'none'})")
    journal = operations.open_daemon_journal(config)
    for line in operations.pause(journal, args.folder or ["*"], resume=args.command == "resume"):
        print(names.printable(line))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Queue failed jobs again."""
    from daemon import operations

    config = load_config(args.config)
    journal = operations.open_daemon_journal(config)
    outcome = operations.retry_failed(config, journal, args.selectors, folder=args.folder)
    return _report(outcome, "queued again", "not retried")


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
    return _report(operations.enqueue(config, journal, items, folder=args.folder), "queued", "not queued")


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
    """Check a config file and the folders it names; print each folder's resolved rules and every problem."""
    path: Path = args.config_option or args.file or DEFAULT_CONFIG
    data = read_config_file(path)  # unreadable, or not YAML: nothing more can be checked
    checked = validate_config(data, base_dir=path.resolve().parent)
    findings = [preflight.Finding(p.location, p.message) for p in checked.problems]
    if data is None or (isinstance(data, dict) and not data.get("folders")):
        findings.append(preflight.Finding("folders", "no folders configured: whisperd run has nothing to watch"))
    user = _check_user(args.as_user)
    if not args.file_only:
        findings += preflight.check_folders(checked.folders, user)
        if checked.settings is not None and checked.settings.http is not None:
            findings += preflight.check_http(checked.settings.http)
    errors = [f for f in findings if f.level == "error"]
    warnings = [f for f in findings if f.level == "warning"]

    counted = [f"{len(errors)} problem(s)"] if errors else ["OK"]
    counted += [f"{len(warnings)} warning(s)"] if warnings else []
    print(f"{path}: {', '.join(counted)}, {len(checked.folders)} folder(s)", flush=True)
    for finding in errors:
        print(f"  {finding}", file=sys.stderr)
    for finding in warnings:
        print(f"  warning: {finding}", file=sys.stderr)
    if checked.folders and not args.file_only and user.uid == 0 and args.as_user is None:
        print("  (permissions judged for root, who may write anywhere; the packaged service runs as "
              "whisperd: add --as-user whisperd)", file=sys.stderr)
    if not checked.problems:
        config = parse_config(data, base_dir=path.resolve().parent, source=path)
        for name, folder in config.watched.items():
            _print_folder(config, name, folder)
        if config.settings.http is not None:
            _print_api(config)
    return EXIT_USAGE if errors else EXIT_OK


def _check_user(name: str | None) -> preflight.User:
    if name is None:
        return preflight.User.current()
    try:
        return preflight.User.named(name)
    except KeyError:
        raise UsageError(f"--as-user: no user named {name!r} on this machine") from None


def _print_folder(config: Config, name: str, folder: Folder) -> None:
    base, entries = config.folder_rules(name)
    print(f"\nfolder {name}: {folder.inbox} → {folder.outbox} (watch: {folder.watch})")
    print(f"  own rule: {_rule_summary(base)}")
    for entry, rule in entries:
        print(f"  match {entry.match!r}: {_rule_summary(rule)}")


def _print_api(config: Config) -> None:
    http = config.settings.http
    assert http is not None
    base, _ = config.folder_rules(API_FOLDER)
    auth = f"bearer tokens from {http.tokens_file}" if http.tokens_file else "no tokens: anyone who reaches it"
    print(f"\nhttp api: {http.listen} ({auth}), priority {http.priority}, timeout {http.timeout:g} s")
    print(f"  own rule: {_rule_summary(base)}")


def _rule_summary(rule: Rule) -> str:
    keys = ("model", "task", "language", "audio_track", "output_formats", "output_name", "word_timestamps",
            "max_line_width", "max_line_count", "max_words_per_line", "highlight_words", "skip_silence",
            "on_success")
    defaults = Rule.model_fields
    # Layout options show only when set: most folders leave them off, and a line should fit a screen.
    optional = {"max_line_width", "max_line_count", "max_words_per_line", "highlight_words"}
    shown = [k for k in keys if k not in optional or getattr(rule, k) != defaults[k].default]
    return ", ".join(f"{k}={_show(getattr(rule, k))}" for k in shown)


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _cli_config(args: argparse.Namespace) -> Config:
    if args.config:
        return load_config(args.config)
    return parse_config({"model_dir": str(_user_model_dir())})


def cmd_transcribe(args: argparse.Namespace, registry: ModelRegistry | None = None) -> int:
    """Transcribe files named on the command line, loading each model once for all of them.

    Everything that can be wrong with the command line (an option, a language, a model, a folder)
    is found before any file is touched, and reported once: exit 2. A model that fails to load is
    reported once: exit 1, and no file is touched.
    """
    from daemon import log
    from daemon.pipeline import process_file
    from daemon.pipeline.clips import ClippedEngine
    from daemon.pipeline.transcribe import WhisperEngine
    from daemon.proc import require_tools

    config = _cli_config(args)
    settings = config.settings
    folder = _chosen_folder(config, args.folder)
    plans = _plan(config, folder, [Path(f) for f in args.files], _transcribe_overrides(args))
    require_tools()  # else every file would fail the same way

    stream = _BarSafeStream(sys.stderr)
    # The registry's model_unavailable speaks of queued files; here the failure is reported below.
    log.configure(args.log_format or settings.log_format, settings.log_level, cast(TextIO, stream),
                  quiet={"model_unavailable"})
    logger = structlog.get_logger("whisperd.transcribe")
    registry = registry or ModelRegistry(
        Path(args.model_dir) if args.model_dir else settings.model_dir,
        args.device or settings.device,
        args.threads if args.threads is not None else settings.torch_threads,
        cpu_dtype=settings.cpu_dtype,
        mirror=settings.model_mirror,
    )
    unloadable = _load_models(registry, [rule.model for _, rule in plans])
    if unloadable:
        for model, reason in unloadable.items():
            print(f"whisperd transcribe: cannot load model {model!r}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    engine = ClippedEngine(registry, args.clip_timestamps) if args.clip_timestamps else WhisperEngine(registry)
    failed = 0
    for source, rule in plans:
        try:
            with _progress_bar(source, stream) as progress:
                result = process_file(source, rule, engine, settings, target_dir=Path(args.output_dir),
                                      progress=progress)
        except (WhisperdError, OSError) as err:  # JobError, ModelError, FileChanged, GpuFault, …
            failed += 1
            # An expected fault of one file: one line with the reason, no traceback.
            stage = {"stage": err.stage} if isinstance(err, JobError) and err.stage else {}
            logger.warning("file_failed", file=names.escape(str(source)), **stage,
                           error=getattr(err, "reason", None) or getattr(err, "strerror", None) or str(err))
            continue
        for path in result.outputs:
            print(names.escape(str(path)))
    if failed:
        print(f"whisperd transcribe: {failed} of {len(plans)} file(s) failed", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _transcribe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = whisper_options.overrides(args)
    model = overrides.get("model")
    if isinstance(model, str) and is_path_setting(model):
        overrides["model"] = str(Path(model).expanduser().resolve())
    return overrides


def _chosen_folder(config: Config, name: str | None) -> Folder | None:
    """Return the folder --folder names; raise UsageError naming the configured ones otherwise."""
    if name is None:
        return None
    if config.source is None:
        raise UsageError("--folder needs --config: the folders are in the config file")
    if name not in config.folders:
        closest = difflib.get_close_matches(name, list(config.folders), n=1)
        hint = f"did you mean {closest[0]!r}? " if closest else ""
        raise UsageError(f"--folder: no folder named {name!r} in {config.source}; {hint}"
                         f"configured: {', '.join(config.folders) or 'none'}")
    return config.folders[name]


def _relative_to_inbox(folder: Folder, source: Path) -> str:
    """Return the path a folder's rules match: relative to its inbox when inside it, else the name."""
    try:
        return source.resolve().relative_to(folder.inbox.resolve()).as_posix()
    except ValueError:
        return source.name


def _plan(
    config: Config, folder: Folder | None, sources: Sequence[Path], overrides: dict[str, Any]
) -> list[tuple[Path, Rule]]:
    """Return each file with its rule; raise UsageError with every distinct mistake, in one line."""
    plans: list[tuple[Path, Rule]] = []
    mistakes: list[str] = []
    for source in sources:
        base = config.rule_for(folder.name, _relative_to_inbox(folder, source)) if folder else config.defaults
        try:
            rule = apply_overrides(base, overrides)
        except ConfigError as err:
            mistakes += [_option_problem(p) for p in err.problems]
            continue
        mistakes += rule.problems()
        problem = source_problem(rule.model)
        if problem:
            mistakes.append(f"--model: {problem}")
        plans.append((source, rule))
    if mistakes:
        raise UsageError("; ".join(dict.fromkeys(mistakes)))
    return plans


def _option_problem(problem: ConfigProblem) -> str:
    field = problem.location.split("[")[0].split(".")[0]
    return f"{whisper_options.option_for(field)}: {problem.message}" if field else problem.message


def _load_models(registry: ModelRegistry, models: Sequence[str]) -> dict[str, str]:
    """Load every model the files need, each once; return the ones that failed, with the reason."""
    failed = {}
    for model in dict.fromkeys(models):
        try:
            registry.get(model)
        except ModelError as err:
            failed[model] = str(err)
    return failed


class _BarSafeStream:
    """stderr for log lines that a progress bar may share: each whole line goes out through
    tqdm.write, which lifts the bar, writes the line and draws the bar again below it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.bars = 0  # progress bars now drawn on this stream
        self._partial = ""

    def write(self, text: str) -> int:
        if not self.bars:
            return int(self.stream.write(text))
        from tqdm import tqdm

        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            tqdm.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return bool(self.stream.isatty())

    def fileno(self) -> int:
        return int(self.stream.fileno())


class _progress_bar:
    """A tqdm bar on a terminal (percent of audio done), nothing otherwise."""

    def __init__(self, source: Path, stream: _BarSafeStream) -> None:
        self.source = source
        self.stream = stream
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.stream.isatty():
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=100, desc=names.escape(self.source.name), unit="%", leave=False,
                        file=self.stream.stream)
        self.stream.bars += 1

        def update(fraction: float) -> None:
            self.bar.update(round(fraction * 100) - self.bar.n)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
            self.stream.bars -= 1
