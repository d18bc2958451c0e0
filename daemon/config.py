"""YAML → validated, frozen settings; per-folder rules resolved to one `Rule` per file.

Precedence for every rule field: the first matching entry of a folder's `rules:` list, then the
folder's own settings, then `defaults:`. Every mistake in a file is reported at once, each with
its location, so an operator fixes a config in one round trip.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
)

from daemon.errors import ConfigError, ConfigProblem
from daemon.languages import normalize_language

M = TypeVar("M", bound=BaseModel)

OutputFormat = Literal["txt", "srt", "vtt", "tsv", "json"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("txt", "srt", "vtt", "tsv", "json")
TEMPLATE_FIELDS = frozenset({"stem", "ext", "lang", "task", "model"})

# Names that mean "not a finished recording": partial downloads, editor and OS droppings.
BUILTIN_IGNORES = (
    ".*", "*.part", "*.crdownload", "*.tmp", "~$*", "._*", ".DS_Store", "Thumbs.db",
    "desktop.ini", "@eaDir", ".stfolder", ".~tmp~", "#recycle",
)  # fmt: skip

_DURATION = re.compile(
    r"^\s*(?:(\d+(?:\.\d+)?)d)?\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$"
)


def parse_duration(value: Any) -> Any:
    """Return seconds for `90`, `"90s"`, `"5m"`, `"1h30m"`, `"90d"`; other values pass to pydantic."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m or not any(m.groups()):
            raise ValueError(f"not a duration: {value!r} (use seconds, or e.g. '30s', '5m', '1h', '90d')")
        days, hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
        return days * 86400 + hours * 3600 + minutes * 60 + seconds
    return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(value: Any) -> Any:
    """Return bytes for `1073741824`, `"1G"`, `"500MiB"`, `"2 GB"` (binary multiples); others pass to pydantic."""
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"not a size: {value!r} (use bytes, or e.g. '500M', '1G')")
        number, unit = float(m.group(1)), m.group(2).lower()
        return int(number * 1024 ** " kmgt".index(unit or " "))
    return value


def _language(value: str) -> str:
    key = value.strip().lower()
    return key if key in ("auto", "track") else normalize_language(key)


def _formats(value: Any) -> Any:
    if value == "all" or value == ["all"]:
        return list(OUTPUT_FORMATS)
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _name_template(value: str) -> str:
    if "/" in value or "\\" in value or value.startswith("."):
        raise ValueError("must be a plain file name: no '/', '\\' or leading '.'")
    fields = set(re.findall(r"{(\w*)[^}]*}", value))
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(
            f"unknown field(s) {sorted(unknown)}; available: {sorted(TEMPLATE_FIELDS)}"
        )
    if "ext" not in fields:
        raise ValueError("must contain {ext}, or every format would write the same file")
    return value


def _temperature(value: Any) -> Any:
    return [value] if isinstance(value, (int, float)) else value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
Bytes = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
Language = Annotated[str, AfterValidator(_language)]
OutputFormats = Annotated[tuple[OutputFormat, ...], BeforeValidator(_formats), Field(min_length=1)]
NameTemplate = Annotated[str, AfterValidator(_name_template)]
Temperatures = Annotated[
    tuple[Annotated[float, Field(ge=0, le=1)], ...], BeforeValidator(_temperature),
    Field(min_length=1),
]
AudioTrack = Union[Literal["default"], Annotated[int, Field(ge=0)], str]


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Expand ~ and make a relative path relative to the config file's directory."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


ConfigPath = Annotated[Path, BeforeValidator(_resolve_path)]


def _resolve_model(value: Any, info: ValidationInfo) -> Any:
    """Leave a model name alone; make a file or folder path absolute like any other config path."""
    from daemon.models import is_path_setting

    if isinstance(value, str) and is_path_setting(value):
        return str(_resolve_path(value, info))
    return value


ModelName = Annotated[str, BeforeValidator(_resolve_model)]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo like `ouput_formats` must not silently fall back to defaults.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Strict):
    """Everything that decides how one file is processed. Field names follow whisper's CLI."""

    model: ModelName = Field("small", description="an OpenAI model name (tiny … large-v3, turbo), or a path to a whisper .pt file, a Hugging Face Whisper folder or a CTranslate2 Whisper folder")
    task: Literal["transcribe", "translate"] = Field("transcribe", description="translate always produces English")
    language: Language = Field("auto", description="'auto' detects; 'track' uses the audio track's language tag (else detects); or a code/name such as 'fr' or 'french'")
    audio_track: AudioTrack = Field("default", description="'default' (the track marked default, else the first), an index among audio tracks (0 = first), or a language tag to prefer such as 'fra'")
    output_formats: OutputFormats = Field(OUTPUT_FORMATS, description="any of txt, srt, vtt, tsv, json, or 'all'")
    output_name: NameTemplate = Field("{stem}.{ext}", description="file name template; fields: stem, ext, lang, task, model (e.g. '{stem}.{lang}.{ext}' for Plex/Jellyfin)")
    max_line_width: int | None = Field(None, ge=1, description="subtitle line width in characters (needs word_timestamps)")
    max_line_count: int | None = Field(None, ge=1, description="lines per subtitle cue (needs max_line_width)")
    max_words_per_line: int | None = Field(None, ge=1, description="words per subtitle line (needs word_timestamps)")
    highlight_words: bool = Field(False, description="underline each word as it is spoken in srt/vtt (needs word_timestamps)")
    word_timestamps: bool = Field(False, description="compute per-word timings (json and subtitle layout use them)")
    initial_prompt: str | None = Field(None, description="text that primes the first window: names, jargon, spelling")
    temperature: Temperatures = Field((0.0, 0.2, 0.4, 0.6, 0.8, 1.0), description="a value, or the fallback list tried when a window fails the thresholds")
    beam_size: int | None = Field(5, ge=1, description="beam width at temperature 0; null for greedy")
    best_of: int | None = Field(5, ge=1, description="candidates sampled at temperatures above 0")
    sample_len: int | None = Field(None, ge=1, le=224, description="most tokens decoded per 30 s window (null: whisper's 224)")
    no_speech_threshold: float | None = Field(0.6, description="skip a window whose no-speech probability is above this and whose logprob is below logprob_threshold; null disables")
    compression_ratio_threshold: float | None = Field(2.4, description="retry a window hotter when its text compresses better than this (repetition); null disables")
    logprob_threshold: float | None = Field(-1.0, description="retry a window hotter when its average log-probability is below this; null disables")
    condition_on_previous_text: bool = Field(True, description="feed the previous window's text as a prompt; false resists repetition loops")
    hallucination_silence_threshold: float | None = Field(None, gt=0, description="skip silences longer than this many seconds around a likely hallucination (needs word_timestamps)")
    engine: Literal["auto", "batched", "sequential"] = Field("auto", description="'batched' decodes 30 s windows cut at pauses (voice activity detection), several files' windows together, each window on its own (greedy or beam search); 'sequential' is whisper's transcribe(); 'auto' picks batched when the rule asks for neither condition_on_previous_text nor hallucination_silence_threshold, and for files no longer than one 30 s window unless the rule asks for hallucination_silence_threshold (no previous window's text to condition on)")
    skip_silence: Seconds = Field(3.0, description="decode around silences at least this long (below silence_threshold_db), so cues after them start on time and nothing is invented over them; 0 decodes everything")
    silence_threshold_db: float = Field(-60.0, le=0, description="RMS level in dBFS (per 20 ms) below which audio counts as silence for skip_silence")
    max_duration: Optional[Seconds] = Field(None, gt=0, description="refuse files that last longer than this (e.g. '4h'); null: no limit but the 48 h a file that declares no duration is decoded to at most")
    max_attempts: int = Field(5, ge=1, description="attempts for a transiently failing file before it goes to the failed folder")
    retry_base_delay: Seconds = Field(30.0, description="first retry delay; doubles each attempt, with full jitter")
    retry_max_delay: Seconds = Field(3600.0, description="cap on the retry delay")
    on_success: Literal["archive", "delete", "keep"] = Field("archive", description="what happens to the original once its outputs are written")

    def problems(self) -> list[str]:
        """Return what is wrong with this combination of settings (empty when it is coherent)."""
        from daemon.models import task_problems

        # English-only and turbo models, told by name or, for files and folders, by their dimensions.
        found = task_problems(self.model, self.task, self.language)
        needs_words = [
            name for name in ("max_line_width", "max_words_per_line", "hallucination_silence_threshold")
            if getattr(self, name) is not None
        ] + (["highlight_words"] if self.highlight_words else [])
        if needs_words and not self.word_timestamps:
            found.append(f"{', '.join(needs_words)} need(s) word_timestamps: true")
        if self.max_line_count is not None and self.max_line_width is None:
            found.append("max_line_count needs max_line_width")
        if self.max_words_per_line is not None and self.max_line_width is not None:
            found.append("max_words_per_line and max_line_width cannot be combined (whisper uses one)")
        if self.engine == "batched":
            sequential_only = (["hallucination_silence_threshold"]
                               if self.hallucination_silence_threshold is not None else [])
            sequential_only += ["condition_on_previous_text"] if self.condition_on_previous_text else []
            if sequential_only:
                found.append(f"engine: batched decodes each window on its own; {', '.join(sequential_only)} "
                             "need(s) engine: sequential (or set condition_on_previous_text: false)")
        if 0 < self.skip_silence < 1:
            found.append("skip_silence must be 0 (off) or at least 1 second")
        if self.retry_max_delay < self.retry_base_delay:
            found.append("retry_max_delay is smaller than retry_base_delay")
        return found

    def with_overrides(self, overrides: Mapping[str, Any]) -> Rule:
        """Return this rule with some fields replaced (validated again)."""
        return _merge(self, overrides)

    def output_filename(self, stem: str, ext: str, lang: str) -> str:
        """Return the output file name for one format, from the validated template."""
        from daemon.models import is_path_setting
        from daemon.names import fit

        model = self.model
        if is_path_setting(model):  # a file's stem or a folder's name, never a path
            model = Path(model).stem if model.endswith(".pt") else Path(model).name
        name = self.output_name.format(stem=stem, ext=ext, lang=lang, task=self.task, model=model)
        if "{stem}" not in self.output_name:
            return name
        # Too long for the file system (a 250-byte original name): shorten the stem, keep the rest.
        head, _, _ = self.output_name.partition("{stem}")
        prefix = head.format(ext=ext, lang=lang, task=self.task, model=model)
        return fit(stem, name[len(prefix) + len(stem):], prefix)


RULE_FIELDS = tuple(Rule.model_fields)

# The same fields, each optional with no default: what a folder or a rule entry overrides.
_RuleOverrides: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "RuleOverrides",
    __base__=_Strict,
    **{
        # field.annotation is the bare type; the validators and bounds live in field.metadata.
        name: (
            Optional[Annotated[tuple([field.annotation, *field.metadata])] if field.metadata else field.annotation],
            Field(None, description=field.description),
        )
        for name, field in Rule.model_fields.items()
    },
)


class RuleEntry(_RuleOverrides):  # type: ignore[misc,valid-type]
    """One entry of a folder's `rules:` list: a glob on the path relative to the inbox, and overrides."""

    match: str = Field(description="glob on the path relative to the inbox, case-insensitive; '*' also crosses '/'")

    def matches(self, relative_path: str) -> bool:
        """Return True when this entry's glob matches the inbox-relative path."""
        return fnmatch.fnmatchcase(relative_path.lower(), self.match.lower())


class Folder(_RuleOverrides):  # type: ignore[misc,valid-type]
    """One watched inbox, where its results go, and its own rule settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="short unique name, used in logs and the journal")
    inbox: ConfigPath = Field(description="folder to watch")
    outbox: ConfigPath = Field(description="transcripts and subtitles go here, mirroring the inbox's subfolders")
    archive: ConfigPath | None = Field(None, description="originals go here after success (needed when on_success is 'archive')")
    failed: ConfigPath = Field(description="originals that cannot be processed go here, each with <name>.error.txt")
    watch: Literal["events", "poll"] = Field("events", description="'events' (inotify, local disks) or 'poll' (SMB/NFS shares, where inotify misses other machines' writes)")
    poll_interval: Seconds = Field(10.0, gt=0, description="seconds between polls when watch is 'poll'")
    stability_delay: Seconds = Field(5.0, description="a file is ready when untouched this long and its size and mtime hold")
    include: tuple[str, ...] = Field(("*",), description="globs a file must match (relative path, case-insensitive)")
    exclude: tuple[str, ...] = Field((), description="globs that skip a file, on top of the built-in ignores (dotfiles, *.part, …)")
    recursive: bool = Field(True, description="watch subfolders too")
    processing: Optional[ConfigPath] = Field(None, description="where originals wait while being processed; on the inbox's file system, where share users cannot write (default: <state_dir>/processing/<name> when the state directory is on the inbox's mount, else <inbox>/.whisperd/processing, made 0700)")
    priority: int = Field(0, description="higher runs first when several folders have work waiting")
    rules: tuple[RuleEntry, ...] = Field((), description="first matching entry's settings win over the folder's, which win over defaults")

    def overrides(self) -> dict[str, Any]:
        """Return the rule fields this folder sets itself."""
        return _rule_overrides(self)

    @staticmethod
    def builtin_ignored(relative_path: str) -> bool:
        """Return True when any component is a partial or junk name (dotfiles, *.part, @eaDir …)."""
        parts = PurePosixPath(relative_path.lower()).parts
        return any(fnmatch.fnmatchcase(part, pat.lower()) for part in parts for pat in BUILTIN_IGNORES)

    def accepts(self, relative_path: str) -> bool:
        """Return True when the inbox-relative path passes the built-in ignores, include and exclude."""
        lowered = relative_path.lower()
        if self.builtin_ignored(relative_path):
            return False
        if not any(fnmatch.fnmatchcase(lowered, pat.lower()) for pat in self.include):
            return False
        return not any(fnmatch.fnmatchcase(lowered, pat.lower()) for pat in self.exclude)


def _rule_overrides(entry: BaseModel) -> dict[str, Any]:
    """Return the rule fields a folder or rules entry sets itself (explicit nulls included)."""
    return {k: getattr(entry, k) for k in entry.model_fields_set if k in RULE_FIELDS}


# The HTTP API's jobs live in a folder of their own. A leading '_' is outside the pattern every
# configured folder name must match, so no user folder can take this name.
API_FOLDER = "_api"

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")


def _listen(value: str) -> str:
    if value.startswith("unix:"):
        if not value[len("unix:"):].startswith("/"):
            raise ValueError(f"a unix socket needs an absolute path (unix:/run/whisperd/api.sock), not {value!r}")
        return value
    found = _HOST_PORT.match(value)
    if found is None or not 0 < int(found.group("port")) < 65536:
        raise ValueError(f"must be host:port (127.0.0.1:9000, [::1]:9000) or unix:/absolute/path, not {value!r}")
    return value


class HttpSettings(_Strict):
    """The optional HTTP API: OpenAI- and whisper-asr-webservice-compatible endpoints on the resident model."""

    listen: Annotated[str, AfterValidator(_listen)] = Field("127.0.0.1:9000", description="host:port to listen on (127.0.0.1:9000, [::1]:9000, 0.0.0.0:9000), or unix:/path/to/api.sock")
    tokens_file: Optional[ConfigPath] = Field(None, description="a file with one bearer token per line (blank lines and '#' comments skipped); when set, every endpoint but /healthz needs 'Authorization: Bearer <token>'")
    priority: int = Field(100, description="the priority of API jobs: they are claimed before folder jobs of a lower priority (folders default to 0)")
    timeout: Seconds = Field(3600.0, gt=0, description="how long a request waits for its transcript before it is answered 504")
    max_upload: Bytes = Field(1 << 30, description="the largest request body (upload) accepted; larger ones are answered 413 before they are stored (e.g. '200M'); 0: no limit")
    max_duration: Optional[Seconds] = Field(None, gt=0, description="uploads lasting longer are answered 422 (e.g. '2h'); null: the max_duration of defaults")
    max_waiting: int = Field(100, ge=0, description="API jobs queued or running at once; a request beyond is answered 503 with Retry-After; 0: no limit")
    reserved_worker: bool = Field(True, description="one more worker that takes API jobs alone, so a request never waits for folder files already being transcribed (it shares the model; the memory of one more file in flight); false: requests wait for a free worker of jobs_in_flight")
    keep_results: Seconds = Field(3600.0, gt=0, description="how long an async job's (POST /v1/jobs) results are kept after it ended (GET /v1/jobs/{id}/result, then 410)")
    metrics_open: bool = Field(False, description="true: /metrics answers without a token (for a Prometheus that cannot send one); the status page and every other endpoint still need it")


class Settings(_Strict):
    """Process-wide settings."""

    state_dir: ConfigPath = Field(Path("/var/lib/whisperd"), description="the journal and other state (local disk)")
    model_dir: ConfigPath = Field(Path("/var/cache/whisperd/models"), description="named models download here, and converted Hugging Face and CTranslate2 models are cached here")
    model_mirror: Optional[str] = Field(None, pattern=r"^(https?|file)://", description="download named models from this base URL (a mirror holding OpenAI's files under their own names) instead of OpenAI's; the checksums are still OpenAI's")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (cuda when available), cpu, cuda or cuda:N")
    preload_models: tuple[ModelName, ...] = Field((), description="models loaded at start-up so the first file waits for nothing")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch; 0 keeps torch's default. On small CPUs, 1 is often fastest for small models")
    jobs_in_flight: int = Field(1, ge=1, le=16, description="files processed side by side: each is prepared (probed, extracted) on its own while the others transcribe, and the batched engine decodes their windows together; 1 processes one file at a time")
    cpu_dtype: Literal["float32", "bfloat16", "int8"] = Field("float32", description="on a CPU: float32 is exact; bfloat16 runs the encoder and the cross-attention keys in bfloat16, about 1.8x faster where the CPU has AVX-512 BF16 or AMX, at a small cost in accuracy; int8 adds to float32's kernels: the encoder's and the decoder's attention and MLP linear layers int8 by int8 (activations scaled per token, so a window's words never depend on the others in its batch), about 1.5x faster where the CPU has VNNI or AMX; where no int8 product sums exactly (CPUs without VNNI) it says so and stays float32")
    log_format: Literal["auto", "json", "console"] = Field("auto", description="auto: console on a terminal, JSON otherwise (journald)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    probe_timeout: Seconds = Field(60.0, gt=0, description="wall-clock limit for ffprobe")
    extract_timeout: Seconds = Field(3600.0, gt=0, description="wall-clock limit for ffmpeg's audio extraction")
    rescan_interval: Seconds = Field(300.0, gt=0, description="every inbox is rescanned this often, whatever the watch mode: watchers miss files")
    shutdown_grace: Seconds = Field(30.0, description="on SIGTERM, how long the current job may run on before it is handed back to the queue")
    retention: Seconds = Field(90 * 86400.0, description="finished jobs older than this leave the journal (files kept in the inbox excepted); 0 keeps them forever")
    model_idle_unload: Seconds = Field(0.0, description="free a model's (GPU) memory after this long with nothing queued; it loads again for the next file (e.g. '10m'); 0 keeps models resident")
    min_free_space: Bytes = Field(1 << 30, description="a folder whose outbox, archive or failed folder, or the state directory, has less free space than this is paused until there is more")
    http: Optional[HttpSettings] = Field(None, description="the HTTP API; off when absent")


class ConfigFile(Settings):
    """The YAML file's shape, used for the JSON Schema."""

    defaults: Rule = Field(default_factory=Rule, description="every rule field's default for all folders")  # type: ignore[arg-type]
    folders: tuple[Folder, ...] = Field((), description="the watched folders")


class Config:
    """The validated configuration: settings, folders, and every folder's rules resolved once."""

    def __init__(self, settings: Settings, defaults: Rule, folders: Iterable[Folder], source: Path | None):
        self.settings = settings
        self.defaults = defaults
        self.folders: dict[str, Folder] = {f.name: f for f in folders}
        if settings.http is not None:
            self.folders[API_FOLDER] = api_folder(settings)
        self.source = source
        self._folder_rules: dict[str, tuple[Rule, tuple[tuple[RuleEntry, Rule], ...]]] = {}
        for folder in self.folders.values():
            base = _merge(defaults, folder.overrides())
            entries = tuple((entry, _merge(base, _rule_overrides(entry))) for entry in folder.rules)
            self._folder_rules[folder.name] = (base, entries)

    @property
    def watched(self) -> dict[str, Folder]:
        """Return the configured folders: those with an inbox to watch (the API's folder is not one)."""
        return {name: folder for name, folder in self.folders.items() if name != API_FOLDER}

    def rule_for(self, folder: str, relative_path: str) -> Rule:
        """Return the rule for a file: the first matching entry, else the folder's own rule."""
        base, entries = self._folder_rules[folder]
        for entry, rule in entries:
            if entry.matches(relative_path):
                return rule
        return base

    def folder_rules(self, folder: str) -> tuple[Rule, tuple[tuple[RuleEntry, Rule], ...]]:
        """Return a folder's own rule and each rules entry with its resolved rule."""
        return self._folder_rules[folder]

    def models_in_use(self) -> list[str]:
        """Return every distinct model named by defaults, folders and rules, preloads first."""
        names = list(self.settings.preload_models)
        for base, entries in self._folder_rules.values():
            names += [base.model] + [rule.model for _, rule in entries]
        return list(dict.fromkeys(names))


def api_folder(settings: Settings) -> Folder:
    """Return the folder the HTTP API's jobs go through: under the state directory, never watched.

    Uploads are queued directly; an original is deleted once its outputs are written, and the
    outputs are named after the upload alone, so the API finds them whatever `defaults:` says.
    """
    assert settings.http is not None
    root = settings.state_dir / "api"
    folder = Folder.model_validate({
        "name": "api", "inbox": root / "inbox", "outbox": root / "outbox", "failed": root / "failed",
        "recursive": False, "priority": settings.http.priority, "on_success": "delete",
        "output_name": "{stem}.{ext}",
        **({"max_duration": settings.http.max_duration} if settings.http.max_duration else {}),
    })  # fmt: skip
    named: Folder = folder.model_copy(update={"name": API_FOLDER})  # past the pattern on purpose: no user folder collides
    return named


def _merge(rule: Rule, overrides: Mapping[str, Any]) -> Rule:
    return Rule.model_validate({**rule.model_dump(), **overrides})


def apply_overrides(rule: Rule, overrides: Mapping[str, Any]) -> Rule:
    """Return the rule with some fields replaced; raise ConfigError naming each field in error.

    Unlike `Rule.with_overrides`, the problems are in plain words, each at its field
    (`language: unknown language 'klingon'; did you mean …`), for a command line or a list entry.
    """
    try:
        return _merge(rule, overrides)
    except ValidationError as err:
        raise ConfigError(_problems("", err, Rule)) from None


def _location(prefix: str, loc: tuple[int | str, ...]) -> str:
    text = prefix
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# Plain words for the fields whose values a regular expression checks (pydantic would quote it).
_PATTERN_MESSAGES = {
    "device": "must be auto, cpu, cuda or cuda:N (a GPU's index, e.g. cuda:1)",
    "model_mirror": "must be a URL starting with http://, https:// or file://",
    "name": "must start with a letter or digit and hold only letters, digits, '_', '.' and '-'",
}


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Return the model that holds the last key of loc (a folder's rules entry, say), if known."""
    current: type[BaseModel] = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        found = _model_in(info.annotation) if info is not None else None
        if found is None:
            return None
        current = found
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _unknown_key(model: type[BaseModel] | None, key: str) -> str:
    """Return the message for a key the model does not have: what it may have meant, or where it belongs."""
    known = list(model.model_fields) if model is not None else []
    if model is Settings:
        known += ["defaults", "folders"]
    for owner, where in ((Folder, "a folder"), (Rule, "a rule (defaults, a folder or a rules entry)"),
                         (ConfigFile, "the top level")):
        if key in owner.model_fields and key not in known:
            return f"unknown key {key!r} here: it belongs to {where}"
    closest = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key {key!r}" + (f"; did you mean {closest[0]!r}?" if closest else "")


def _message(model: type[BaseModel] | None, error: Any) -> str:
    """Return a pydantic error in plain words."""
    kind, loc, value = error["type"], tuple(error["loc"]), error.get("input")
    key = next((part for part in reversed(loc) if isinstance(part, str)), "")
    if kind == "missing":
        holder = _model_at(model, loc) if model is not None else None
        info = holder.model_fields.get(key) if holder is not None else None
        return "required" + (f": {info.description}" if info is not None and info.description else "")
    if kind == "extra_forbidden":
        return _unknown_key(_model_at(model, loc) if model is not None else None, key)
    if kind == "string_pattern_mismatch" and key in _PATTERN_MESSAGES:
        return f"{_PATTERN_MESSAGES[key]}, not {value!r}"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
        closest = difflib.get_close_matches(str(value), expected, n=1, cutoff=0.6)
        hint = f"; did you mean {closest[0]!r}?" if closest else ""
        return f"must be {error['ctx']['expected']}, not {value!r}{hint}"
    bound = _BOUND_WORDS.get(kind)
    if bound is not None:
        limit = next(iter(error.get("ctx", {}).values()), "?")
        return f"must be {bound} {limit}, not {value!r}"
    if kind in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[kind]}, not {value!r}"
    return str(error["msg"]).removeprefix("Value error, ")


# pydantic's numeric bounds and type errors, in the words a config file's reader uses.
_BOUND_WORDS = {"greater_than_equal": "at least", "greater_than": "more than", "less_than_equal": "at most",
                "less_than": "less than"}
_TYPE_WORDS = {"int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
               "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
               "bool_type": "true or false", "string_type": "text", "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping",
               "model_type": "a mapping"}


def _problems(prefix: str, err: ValidationError, model: type[BaseModel] | None = None) -> list[ConfigProblem]:
    return [ConfigProblem(_location(prefix, tuple(e["loc"])), _message(model, e)) for e in err.errors()]


def _is_within(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def _model_problems(model: str) -> list[str]:
    from daemon.models import source_problem

    problem = source_problem(model)
    return [problem] if problem else []


# Stand-ins for required values that are missing, so the rest of a folder is still checked. A
# folder with one never reaches a Config: its "required" problem is reported.
_PLACEHOLDERS = {"name": "missing-name", "match": "", "inbox": "/.whisperd-missing/inbox",
                 "outbox": "/.whisperd-missing/outbox", "failed": "/.whisperd-missing/failed"}  # fmt: skip


def _validate(
    model: type[M],
    raw: Any,
    prefix: str,
    context: dict[str, Any],
    problems: list[ConfigProblem],
    missing: set[str] | None = None,
) -> M | None:
    """Return the validated model, adding its problems; after errors, validate what is left.

    Dropping the keys in error (and standing in for required ones that are missing) and validating
    again lets the cross-field checks still run on the rest, so one typo or one missing field does
    not hide a second mistake in the same folder. `missing` collects the top-level keys stood in for.
    """
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as err:
        problems += _problems(prefix, err, model)
        pruned = copy.deepcopy(raw)
        for error in err.errors():
            loc = tuple(error["loc"])
            if error["type"] == "missing" and str(loc[-1]) in _PLACEHOLDERS:
                _stand_in(pruned, loc)
                if missing is not None and len(loc) == 1:
                    missing.add(str(loc[0]))
            else:
                _drop(pruned, loc)
    try:
        return model.model_validate(pruned, context=context)
    except (ValidationError, TypeError):
        return None


def _stand_in(data: Any, loc: tuple[int | str, ...]) -> None:
    """Put a placeholder where a required key is missing."""
    node = data
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node[loc[-1]] = _PLACEHOLDERS[str(loc[-1])]


def _drop(data: Any, loc: tuple[int | str, ...]) -> None:
    """Delete the deepest mapping key on loc's path (pydantic adds union tags past real keys)."""
    parent: Any = None
    key: Any = None
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            parent, key, node = node, part, node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            break
    if isinstance(parent, dict):
        parent.pop(key, None)


@dataclass(frozen=True)
class CheckedFolder:
    """A folder as far as it validated: its index in the file, and the required keys it lacks."""

    index: int
    folder: Folder
    missing: frozenset[str] = frozenset()  # stood in for by placeholders; never in a Config


@dataclass
class CheckedConfig:
    """What validating config data found: the parts that validated, and every problem."""

    settings: Settings | None
    defaults: Rule | None
    folders: list[CheckedFolder] = field(default_factory=list)
    problems: list[ConfigProblem] = field(default_factory=list)


def validate_config(data: Any, *, base_dir: Path | None = None) -> CheckedConfig:
    """Return what validating parsed YAML data found; never raises for the data's mistakes."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return CheckedConfig(None, None, problems=[ConfigProblem("", "the file must be a YAML mapping")])
    context = {"base_dir": base_dir}
    problems: list[ConfigProblem] = []

    settings_data = {k: v for k, v in data.items() if k not in ("defaults", "folders")}
    settings = _validate(Settings, settings_data, "", context, problems)
    defaults = _validate(Rule, data.get("defaults") or {}, "defaults", context, problems)

    raw_folders = data.get("folders") or []
    if not isinstance(raw_folders, list):
        problems.append(ConfigProblem("folders", "must be a list of folders"))
        raw_folders = []
    folders: list[CheckedFolder] = []
    for i, raw in enumerate(raw_folders):
        missing: set[str] = set()
        folder = _validate(Folder, raw, f"folders[{i}]", context, problems, missing)
        if folder is not None:
            folders.append(CheckedFolder(i, folder, frozenset(missing)))

    problems += _cross_check(defaults, folders, settings)
    return CheckedConfig(settings, defaults, folders, sorted(problems, key=_file_order))


def _file_order(problem: ConfigProblem) -> tuple[int, int]:
    """Return a sort key that lists problems as the file is read: settings, defaults, each folder."""
    found = re.match(r"folders\[(\d+)\]", problem.location)
    if found:
        return (2, int(found.group(1)))
    return (1, 0) if problem.location.startswith("defaults") else (0, 0)


def parse_config(data: Any, *, base_dir: Path | None = None, source: Path | None = None) -> Config:
    """Return the validated Config for parsed YAML data; raise ConfigError listing every problem."""
    checked = validate_config(data, base_dir=base_dir)
    if checked.problems:
        raise ConfigError(checked.problems, source)
    assert checked.settings is not None and checked.defaults is not None
    return Config(checked.settings, checked.defaults, (f.folder for f in checked.folders), source)


def _cross_check(
    defaults: Rule | None,
    folders: list[CheckedFolder],
    settings: Settings | None,
) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    models_checked: dict[str, list[str]] = {}

    def check_rule(location: str, rule: Rule, inherited: frozenset[str], sets_model: bool) -> frozenset[str]:
        """Report the rule's problems that its parent does not already have, and return them all.

        A mistake in `defaults` is reported there once, not again for every folder and rules
        entry that inherits it; a model is checked where it is written.
        """
        found = rule.problems()
        problems.extend(ConfigProblem(location, p) for p in found if p not in inherited)
        if sets_model:
            if rule.model not in models_checked:
                models_checked[rule.model] = _model_problems(rule.model)
            problems.extend(ConfigProblem(f"{location}.model", p) for p in models_checked[rule.model])
        return frozenset(found)

    from_defaults = check_rule("defaults", defaults, frozenset(), True) if defaults is not None else frozenset()
    if settings is not None:
        for j, name in enumerate(settings.preload_models):
            for p in _model_problems(name):
                problems.append(ConfigProblem(f"preload_models[{j}]", p))

    names: dict[str, int] = {}
    inboxes: dict[Path, int] = {}
    for checked in folders:
        i, folder = checked.index, checked.folder
        where = f"folders[{i}]"
        if "name" not in checked.missing:
            if folder.name in names:
                problems.append(ConfigProblem(f"{where}.name", f"{folder.name!r} is also the name of folders[{names[folder.name]}]"))
            names.setdefault(folder.name, i)
        if "inbox" not in checked.missing:
            inbox = folder.inbox.resolve()
            if inbox in inboxes:
                problems.append(ConfigProblem(f"{where}.inbox", f"folders[{inboxes[inbox]}] already watches {folder.inbox}"))
            inboxes.setdefault(inbox, i)
        if defaults is None:
            continue
        try:
            base = _merge(defaults, folder.overrides())
        except ValidationError as err:
            problems += _problems(where, err, Folder)
            continue
        from_folder = check_rule(where, base, from_defaults, "model" in folder.overrides())
        needs_archive = base.on_success == "archive"
        for r, entry in enumerate(folder.rules):
            try:
                rule = _merge(base, _rule_overrides(entry))
            except ValidationError as err:
                problems += _problems(f"{where}.rules[{r}]", err, RuleEntry)
                continue
            check_rule(f"{where}.rules[{r}]", rule, from_folder, "model" in _rule_overrides(entry))
            needs_archive |= rule.on_success == "archive"
        if needs_archive and folder.archive is None:
            problems.append(ConfigProblem(f"{where}.archive", "required: on_success is 'archive' but no archive folder is set"))

    # An inbox inside another folder's output would feed whisperd its own results.
    for inner in folders:
        i, folder = inner.index, inner.folder
        if "inbox" in inner.missing:
            continue
        for outer in folders:
            j, other = outer.index, outer.folder
            for role in ("outbox", "archive", "failed", "processing"):
                target = getattr(other, role)
                if target is None or role in outer.missing:
                    continue
                if _is_within(folder.inbox, target):
                    problems.append(ConfigProblem(
                        f"folders[{i}].inbox",
                        f"lies inside the {role} of folders[{j}] ({target}); whisperd would process its own output",
                    ))
                elif folder.recursive and _is_within(target, folder.inbox) and not Folder.builtin_ignored(
                    target.resolve().relative_to(folder.inbox.resolve()).as_posix()
                ):
                    problems.append(ConfigProblem(
                        f"folders[{j}].{role}",
                        f"lies inside the inbox of folders[{i}] ({folder.inbox}); whisperd would process its own output",
                    ))
                elif i != j and _is_within(target, folder.inbox):
                    # Hidden in its own inbox, a folder is reached from that inbox without following
                    # links; inside another folder's inbox it would be trusted as written.
                    problems.append(ConfigProblem(
                        f"folders[{j}].{role}",
                        f"lies inside the inbox of folders[{i}] ({folder.inbox}), where that share's users can "
                        "replace it with a link; keep it out of other folders' inboxes",
                    ))
    return problems


def read_config_file(path: str | Path) -> Any:
    """Return the parsed YAML of a config file; raise ConfigError if it cannot be read or parsed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([ConfigProblem("", f"cannot read {path}: {err.strerror}")], path) from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([ConfigProblem(where, f"not valid YAML: {getattr(err, 'problem', err)}")], path) from err


def load_config(path: str | Path) -> Config:
    """Return the validated Config from a YAML file; raise ConfigError listing every problem."""
    path = Path(path)
    return parse_config(read_config_file(path), base_dir=path.resolve().parent, source=path)


def json_schema() -> dict[str, Any]:
    """Return a JSON Schema of the config file, for editor completion and validation."""
    schema = ConfigFile.model_json_schema()
    schema["title"] = "whisperd configuration"
    return schema
