"""A whisper `.pt` file's dimensions, read without importing torch.

Checking a config asks what a checkpoint can do (English-only? turbo?), which its `dims` say.
torch takes a second or two to import, longer than `whisperd status` should take, so the plain
values are read from the checkpoint's pickle here: every torch class or rebuild function it
names becomes an inert stand-in, so nothing in the file runs and no tensor is built.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any


class _Inert:
    """Stands in for whatever the pickle names (tensor rebuilders, storage types): takes anything."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


class _Mapping(dict[Any, Any]):
    """An OrderedDict's stand-in; a state dict also carries attributes (`_metadata`)."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return _Mapping
        return _Inert  # never the named class: a checkpoint is data, never code

    def persistent_load(self, pid: object) -> object:
        return None  # a tensor's storage: not read


def looks_like_checkpoint(path: Path) -> bool:
    """Return True when a file is in one of torch's formats: a zip archive, or a legacy pickle."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:2] == b"\x80\x02"  # zip local header; pickle protocol 2


def read_dims(path: Path) -> dict[str, int] | None:
    """Return the `dims` of a whisper checkpoint in torch's zip format; None when it cannot tell.

    None (torch's legacy format, another layout) leaves the answer to torch itself.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                return None
            with archive.open(pickles[0]) as handle:
                data = _PlainUnpickler(handle).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError):
        return None
    dims = data.get("dims") if isinstance(data, dict) else None
    if not isinstance(dims, dict) or not all(isinstance(v, int) for v in dims.values()):
        return None
    return {str(k): int(v) for k, v in dims.items()}
