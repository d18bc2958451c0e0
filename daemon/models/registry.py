"""Resident models: each (model, device) is loaded once and kept for every later file.

Loading goes source → `Checkpoint` → module: a named model is downloaded (once, verified), a
Hugging Face or CTranslate2 folder is converted (once, cached in model_dir by content), and the
module is built without whisper's random initialisation. A model that cannot be loaded is an
environment problem, not a file's: the failure is remembered and tried again only after a
backoff, so a machine without network does not try a download for every queued file.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from daemon.errors import ModelError
from daemon.models import download
from daemon.models.cache import HashIndex, content_key, converted_path
from daemon.models.checkpoint import (
    Checkpoint,
    build_model,
    heads_from_whisper_dump,
    model_nbytes,
    read_checkpoint,
    write_checkpoint,
)
from daemon.models.sources import ModelSource, identify
from daemon.retry import backoff_window

if TYPE_CHECKING:
    from whisper.model import Whisper

log = structlog.get_logger(__name__)

RETRY_BASE_S = 30.0  # a model that failed to load is tried again after this, doubling …
RETRY_MAX_S = 600.0  # … up to this


@dataclass(frozen=True)
class LoadedModel:
    """A resident model and how it got there."""

    name: str
    device: str
    source: ModelSource
    origin: str  # 'file', 'download', 'cache' (converted earlier) or 'converted' (just now)
    duration_s: float
    nbytes: int


@dataclass
class _Failure:
    reason: str
    count: int
    retry_at: float  # monotonic


def resolve_device(device: str) -> str:
    """Return the torch device for a setting: 'auto' picks cuda when one is usable."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for but torch sees no CUDA device")
    return device


def read_source(
    source: ModelSource, model_dir: Path, *, catalog: download.Catalog | None = None,
    progress: download.Progress | None = None,
) -> tuple[Checkpoint, str]:
    """Return a source's checkpoint and where it came from; convert and cache folders on first use."""
    if source.kind == "named":
        model = (catalog or download.catalog())[source.setting]
        origin = "file" if download.verified_path(model, model_dir) else "download"
        path = download.fetch(model, model_dir, progress)
        checkpoint = read_checkpoint(path)
        import whisper

        dump = whisper._ALIGNMENT_HEADS.get(source.setting)
        if dump is not None:
            checkpoint = replace(checkpoint, alignment_heads=heads_from_whisper_dump(checkpoint.dims, dump))
        return checkpoint, origin
    assert source.path is not None
    if source.kind == "checkpoint":
        return read_checkpoint(source.path), "file"
    key = content_key(source.kind, source.path, HashIndex(model_dir))
    assert key is not None  # hash_new: every file is hashed
    cached = converted_path(model_dir, key)
    if cached.is_file():
        try:
            return read_checkpoint(cached), "cache"
        except ModelError as err:  # a truncated cache file (disk full at the time): convert again
            log.warning("model_cache_unreadable", file=str(cached), error=str(err))
            cached.unlink(missing_ok=True)
    checkpoint = convert(source)
    try:
        write_checkpoint(checkpoint, cached)
    except OSError as err:
        log.warning("model_cache_not_written", file=str(cached), error=err.strerror or str(err),
                    consequence="the model is converted again at the next start")
    return checkpoint, "converted"


def convert(source: ModelSource) -> Checkpoint:
    """Return the checkpoint of a Hugging Face or CTranslate2 folder, read and checked."""
    assert source.path is not None
    if source.kind == "ct2":
        from daemon.models.ct2 import read_ct2

        return read_ct2(source.path)
    from daemon.models.hf import read_hf

    return read_hf(source.path)


class ModelRegistry:
    """Loads each (model, device) once and keeps it resident; safe to share between threads."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        torch_threads: int = 0,
        *,
        cpu_dtype: str = "float32",
        mirror: str | None = None,
        catalog: download.Catalog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.cpu_dtype = cpu_dtype  # float32, bfloat16 or int8, on a CPU (daemon.models.cpu)
        self.catalog = catalog if catalog is not None else download.catalog(mirror)
        self.clock = clock
        self.loads: Counter[tuple[str, str]] = Counter()  # how often each key was loaded from disk
        self.on_change: Callable[[], None] | None = None  # told when a model loads (for status)
        self._models: dict[tuple[str, str], Whisper] = {}
        self._info: dict[tuple[str, str], LoadedModel] = {}
        self._failures: dict[str, _Failure] = {}
        self._last_used: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        import torch

        if torch_threads:
            # Deliberate: on small CPUs, extra intra-op threads slow small models down.
            torch.set_num_threads(torch_threads)
        self.torch_threads = torch.get_num_threads()  # as set, or torch's own choice (the cores)

    def claim_threads(self) -> None:
        """Give the calling thread the configured torch threads before it runs a model (the engines'
        DeviceTurns call it whenever a job gets the device).

        Each thread keeps its own OpenMP thread count, taken from the last `set_num_threads` in the
        process when it first runs torch work; a library that sets its own (silero-vad's import
        sets 1) would otherwise leave the engine on one core. Cheap: a no-op when nothing changed.
        """
        import torch

        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)

    @property
    def fp16(self) -> bool:
        """Return True when models run in half precision (on CUDA; CPU kernels need fp32)."""
        return self.device.startswith("cuda")

    def get(self, name: str) -> Whisper:
        """Return the resident model, loading it (and downloading or converting it) on first use.

        Raises ModelError; after a failure, asking again within the backoff raises the same error
        at once without trying.
        """
        key = (name, self.device)
        with self._lock:
            self._last_used[key] = self.clock()
            model = self._models.get(key)
            if model is not None:
                return model
            failure = self._failures.get(name)
            if failure is not None and self.clock() < failure.retry_at:
                raise ModelError(failure.reason)
            try:
                model, info = self._load(name)
            except ModelError as err:
                self._failed(name, str(err))
                raise
            self._failures.pop(name, None)
            self._models[key] = model
            self._info[key] = info
            self.loads[key] += 1
        if self.on_change is not None:
            self.on_change()
        return model

    def unload_idle(self, idle_s: float) -> list[str]:
        """Drop models not asked for in `idle_s` seconds, freeing their memory; return their names.

        The next `get` loads them again (from model_dir's cache: a second or two).
        """
        with self._lock:
            now = self.clock()
            idle = [key for key in self._models if now - self._last_used.get(key, now) >= idle_s]
            for key in idle:
                del self._models[key]
                self._info.pop(key, None)
        if idle:
            import gc

            gc.collect()
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()  # give the memory back to the device, for other services
            for name, _ in idle:
                log.info("model_unloaded", model=name, device=self.device, idle_s=round(idle_s),
                         reason="nothing asked for it; it loads again for the next file")
            if self.on_change is not None:
                self.on_change()
        return [name for name, _ in idle]

    def loaded(self) -> list[str]:
        """Return the names of the models now resident."""
        return [name for name, _ in self._models]

    def info(self) -> list[LoadedModel]:
        """Return how each resident model was loaded."""
        return list(self._info.values())

    def unavailable(self) -> dict[str, str]:
        """Return the models that failed to load and are waiting for their next try, with the reason."""
        return {name: f.reason for name, f in self._failures.items()}

    def retry_in(self, name: str) -> float | None:
        """Return seconds until a failed model is tried again, or None if it has not failed."""
        failure = self._failures.get(name)
        return None if failure is None else max(failure.retry_at - self.clock(), 0.0)

    def _failed(self, name: str, reason: str) -> None:
        count = self._failures[name].count + 1 if name in self._failures else 1
        # No jitter: one process, one model; the delay only spaces out the attempts.
        delay = backoff_window(count, RETRY_BASE_S, RETRY_MAX_S)
        self._failures[name] = _Failure(reason, count, self.clock() + delay)
        log.warning("model_unavailable", model=name, error=reason, retry_in_s=round(delay),
                    consequence="files that need it wait in the queue; none is failed for it")

    def _load(self, name: str) -> tuple[Whisper, LoadedModel]:
        source = identify(name)
        started = time.monotonic()
        log.info("model_loading", model=name, kind=source.kind, device=self.device, model_dir=str(self.model_dir))
        try:
            checkpoint, origin = read_source(source, self.model_dir, catalog=self.catalog,
                                             progress=self._progress(name))
            module = build_model(checkpoint, device=self.device, half=self.fp16)
            from daemon.models.attention import share_audio_keys

            module = share_audio_keys(module)  # beam search on a batch of windows
            if self.device.startswith("cuda"):
                from daemon.models import graphed_decoder

                # whisper's transcribe() (the sequential engine) decodes each window with the graphed steps too
                module.decode = functools.partial(graphed_decoder.decode, module)
            dtype = "float16" if self.fp16 else "float32"
            if self.device == "cpu":
                from daemon.models.cpu import optimise_for_cpu

                dtype = self.cpu_dtype
                module = optimise_for_cpu(module, dtype)
        except ModelError:
            raise
        except Exception as err:  # out of memory, a CUDA error during the copy: say which model
            raise ModelError(f"cannot load model {name!r}: {type(err).__name__}: {err}") from err
        info = LoadedModel(name, self.device, source, origin, round(time.monotonic() - started, 3),
                           model_nbytes(module))
        log.info("model_loaded", model=name, kind=source.kind, origin=origin, device=self.device,
                 duration_s=info.duration_s, resident_mb=round(info.nbytes / 2**20, 1), dtype=dtype)
        return module, info

    @staticmethod
    def _progress(name: str) -> download.Progress:
        """Return a download progress callback that logs every tenth of the way."""
        reported = [-1]

        def report(done: int, total: int | None) -> None:
            if not total:
                return
            tenth = done * 10 // total
            if tenth != reported[0]:
                reported[0] = tenth
                log.info("model_downloading", model=name, percent=tenth * 10, mb=round(total / 2**20))

        return report
