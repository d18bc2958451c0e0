"""The conversion cache in model_dir: each converted source once, named by its content's hash.

`<model_dir>/converted/<kind>-<sha256 prefix>.pt` holds a Hugging Face or CTranslate2 model in
whisper's own format, so later starts load it directly. Hashing gigabytes on every start would
cost seconds, so `index.json` remembers each source file's hash under its identity (size, mtime,
inode): a hash is computed again only when a file changed. The same index remembers which named
downloads were already checksum-verified.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from daemon.fsutil import atomic_write_text

HASH_CHUNK = 8 << 20
STALE_TEMP_S = 600.0  # a download or conversion writes more often than this
CONVERTED = "converted"
INDEX = "index.json"

_index_lock = threading.Lock()  # one writer of index.json per process; os.replace orders processes


@dataclass(frozen=True)
class FileIdentity:
    """What says a file has not changed since it was last hashed."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        """Return the identity of a file as it is now."""
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


class HashIndex:
    """File hashes remembered by file identity, kept in `<model_dir>/converted/index.json`."""

    def __init__(self, model_dir: Path) -> None:
        self.path = model_dir / CONVERTED / INDEX

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def known(self, path: Path) -> str | None:
        """Return the file's sha256 if it was hashed as it is now, without hashing it."""
        entry = self._load().get(str(path.resolve()))
        if isinstance(entry, dict) and entry.get("identity") == list(_fields(FileIdentity.of(path))):
            return str(entry["sha256"])
        return None

    def sha256(self, path: Path) -> str:
        """Return the file's sha256, hashing it only if it changed since the last time."""
        known = self.known(path)
        if known is not None:
            return known
        identity = FileIdentity.of(path)  # before hashing: a change while hashing is seen next time
        digest = file_sha256(path)
        self._remember(str(path.resolve()), identity, digest)
        return digest

    def _remember(self, key: str, identity: FileIdentity, digest: str) -> None:
        with _index_lock:
            data = self._load()
            data[key] = {"identity": list(_fields(identity)), "sha256": digest}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.path, lambda handle: json.dump(data, handle, indent=1, sort_keys=True))
            except OSError:
                pass  # a read-only model_dir: hashes are computed again next time, nothing else is lost


def _fields(identity: FileIdentity) -> tuple[int, int, int]:
    return (identity.size, identity.mtime_ns, identity.inode)


def file_sha256(path: Path) -> str:
    """Return the sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_files(kind: str, folder: Path) -> list[Path]:
    """Return the files whose content decides a converted model (weights and what shapes them)."""
    if kind == "ct2":
        names = ["model.bin", "config.json"]
    else:
        names = ["config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin"]
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (folder / index).is_file():
                names.append(index)
                shard_map = json.loads((folder / index).read_text(encoding="utf-8")).get("weight_map", {})
                names += sorted(set(shard_map.values()))
    return [folder / name for name in names if (folder / name).is_file()]


def content_key(kind: str, folder: Path, index: HashIndex, *, hash_new: bool = True) -> str | None:
    """Return a name for a source's content: the same weights give the same name wherever they lie.

    With hash_new=False, None when a file would have to be hashed first (a quick listing).
    """
    digest = hashlib.sha256()
    for path in source_files(kind, folder):
        file_digest = index.sha256(path) if hash_new else index.known(path)
        if file_digest is None:
            return None
        digest.update(f"{path.name}\0{file_digest}\n".encode())
    return f"{kind}-{digest.hexdigest()[:20]}"


def converted_path(model_dir: Path, key: str) -> Path:
    """Return where the converted checkpoint of a content key lives."""
    return model_dir / CONVERTED / f"{key}.pt"


def cached_models(model_dir: Path) -> list[Path]:
    """Return the converted checkpoints in model_dir, and the named downloads beside them."""
    found = sorted((model_dir / CONVERTED).glob("*.pt")) if (model_dir / CONVERTED).is_dir() else []
    found += sorted(p for p in model_dir.glob("*.pt")) if model_dir.is_dir() else []
    return found


def remove_stale_temp_files(directory: Path, *, now: float, idle_s: float = STALE_TEMP_S) -> list[Path]:
    """Remove temp files a killed conversion or download left (`.whisperd-*.tmp`, `.*.part`); return them.

    Only files untouched for `idle_s`: another instance may be writing one right now.
    """
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for pattern in (".whisperd-*.tmp", ".*.part"):
        for path in directory.glob(pattern):
            try:
                if now - path.stat().st_mtime >= idle_s:
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue
    return removed
