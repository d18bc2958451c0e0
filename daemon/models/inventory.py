"""`whisperd models`: what the config names, what model_dir holds, and what running daemons hold.

Nothing here loads weights or hashes files: a model counts as cached when its file is present
(named) or when the conversion cache holds its content key, known from the hash index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config
from daemon.errors import ModelError
from daemon.journal import Instance
from daemon.models import download
from daemon.models.cache import HashIndex, cached_models, content_key, converted_path
from daemon.models.sources import ModelSource, identify


@dataclass(frozen=True)
class ModelRow:
    """One configured model, as `whisperd models` shows it."""

    setting: str
    kind: str  # 'OpenAI', 'whisper .pt', 'Hugging Face', 'CTranslate2', or 'invalid'
    used_by: tuple[str, ...]  # 'defaults', 'preload', folder names, 'folder/rules[0]'
    on_disk: str  # where its weights are ready to load, or why they are not
    resident: tuple[str, ...]  # owners (host:pid) of live daemons that hold it


@dataclass(frozen=True)
class Inventory:
    """The `whisperd models` report."""

    model_dir: Path
    rows: tuple[ModelRow, ...]
    other_files: tuple[Path, ...]  # in model_dir but not used by any configured model


KIND_NAMES = {"named": "OpenAI", "checkpoint": "whisper .pt", "hf": "Hugging Face", "ct2": "CTranslate2"}


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.0f} MB"


def _where_used(config: Config) -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for name in config.settings.preload_models:
        used.setdefault(name, []).append("preload")
    used.setdefault(config.defaults.model, []).append("defaults")
    for folder in config.folders:
        base, entries = config.folder_rules(folder)
        used.setdefault(base.model, []).append(folder)
        for i, (_, rule) in enumerate(entries):
            if rule.model != base.model:
                used.setdefault(rule.model, []).append(f"{folder}/rules[{i}]")
    return used


def on_disk(source: ModelSource, model_dir: Path, catalog: download.Catalog) -> tuple[str, Path | None]:
    """Return a description of where a source's weights are ready, and that file (None if not ready)."""
    if source.kind == "named":
        path = catalog[source.setting].path(model_dir)
        if path.is_file():
            return f"{path} ({_mb(path)})", path
        return f"not downloaded (whisperd models pull {source.setting})", None
    assert source.path is not None
    if source.kind == "checkpoint":
        return f"{source.path} ({_mb(source.path)})", source.path
    key = content_key(source.kind, source.path, HashIndex(model_dir), hash_new=False)
    cached = converted_path(model_dir, key) if key else None
    if cached is not None and cached.is_file():
        return f"converted: {cached} ({_mb(cached)})", cached
    return f"not converted yet (whisperd models import {source.path})", None


def inventory(config: Config, instances: Sequence[Instance], alive: set[str]) -> Inventory:
    """Return the report: every configured model, and the other files in model_dir."""
    model_dir = config.settings.model_dir
    catalog = download.catalog(config.settings.model_mirror)
    rows = []
    files: set[Path] = set()
    for setting, used in _where_used(config).items():
        resident = tuple(i.owner for i in instances if i.owner in alive and setting in i.models)
        try:
            source = identify(setting)
        except ModelError as err:
            rows.append(ModelRow(setting, "invalid", tuple(used), str(err), resident))
            continue
        where, path = on_disk(source, model_dir, catalog)
        if path is not None:
            files.add(path.resolve())
        rows.append(ModelRow(setting, KIND_NAMES[source.kind], tuple(used), where, resident))
    others = tuple(p for p in cached_models(model_dir) if p.resolve() not in files)
    return Inventory(model_dir, tuple(rows), others)


def format_inventory(report: Inventory) -> str:
    """Return the report as text for a terminal."""
    lines = [f"model_dir: {report.model_dir}"]
    for row in report.rows:
        lines.append(f"\n{row.setting}  [{row.kind}]")
        lines.append(f"  used by:  {', '.join(row.used_by)}")
        lines.append(f"  on disk:  {row.on_disk}")
        lines.append(f"  resident: {', '.join(row.resident) if row.resident else 'no'}")
    if report.other_files:
        lines.append("\nalso in model_dir (no configured model uses them):")
        lines += [f"  {path} ({_mb(path)})" for path in report.other_files]
    return "\n".join(lines)
