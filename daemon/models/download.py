"""OpenAI's named models: where each lives on disk, and fetching it once, checksum-verified.

A named model is whisper's own `.pt` file, downloaded from whisper's URL into model_dir under
whisper's file name (`base.pt`, `large-v3.pt`), so a model_dir shared with whisper's CLI
(`~/.cache/whisper`) is reused as is. The download streams into a hidden `.part` file, hashed on
the way, and is renamed into place only when the sha256 in the URL matches. A machine without
network gets an error that names the URL and the exact place to put the file instead.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import ModelError
from daemon.fsutil import fsync_dir
from daemon.models.cache import HashIndex

CHUNK = 1 << 20
TIMEOUT_S = 30.0  # per network read: a stalled connection fails instead of hanging the worker

Progress = Callable[[int, int | None], None]  # bytes so far, total (None when the server does not say)


@dataclass(frozen=True)
class NamedModel:
    """One of OpenAI's models: where to download it, and the sha256 it must have."""

    name: str
    url: str
    sha256: str
    filename: str  # whisper's file name for it (`base.pt`; `turbo` is `large-v3-turbo.pt`)

    def path(self, model_dir: Path) -> Path:
        """Return where the model lives in model_dir."""
        return model_dir / self.filename


Catalog = Mapping[str, NamedModel]


def catalog(mirror: str | None = None) -> dict[str, NamedModel]:
    """Return whisper's named models; with a mirror, each is fetched from `<mirror>/<file name>`.

    The sha256 always comes from whisper's own URL (its second-to-last part), so a mirror can
    only serve the very files OpenAI publishes.
    """
    import whisper

    models = {}
    for name, url in whisper._MODELS.items():
        filename = os.path.basename(url)
        source = url if mirror is None else f"{mirror.rstrip('/')}/{filename}"
        models[name] = NamedModel(name, source, url.rstrip("/").split("/")[-2], filename)
    return models


def verified_path(model: NamedModel, model_dir: Path) -> Path | None:
    """Return the model's file when it is present and its checksum holds, else None."""
    path = model.path(model_dir)
    if not path.is_file():
        return None
    return path if HashIndex(model_dir).sha256(path) == model.sha256 else None


def fetch(model: NamedModel, model_dir: Path, progress: Progress | None = None) -> Path:
    """Return the model's verified file in model_dir, downloading it if it is missing or corrupt.

    Raises ModelError (an environment problem: nothing is wrong with any user's file) when
    it cannot be downloaded or its checksum does not match.
    """
    present = verified_path(model, model_dir)
    if present is not None:
        return present
    target = model.path(model_dir)
    instead = (f"without network access, download {model.url} on another machine and copy it to {target} "
               f"(sha256 {model.sha256})")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelError(f"cannot create model_dir {model_dir}: {err.strerror}") from err
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(model.url, timeout=TIMEOUT_S) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, OSError, ValueError) as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        raise ModelError(f"cannot download model {model.name!r} from {model.url}: {reason}; {instead}") from err
    if digest.hexdigest() != model.sha256:
        part.unlink(missing_ok=True)
        raise ModelError(
            f"model {model.name!r} downloaded from {model.url} has sha256 {digest.hexdigest()}, expected "
            f"{model.sha256} (a proxy or a broken transfer?); nothing was kept; {instead}"
        )
    os.replace(part, target)
    fsync_dir(model_dir)
    return target
