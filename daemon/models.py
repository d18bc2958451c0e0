"""Resident models: each (model, device) is loaded once and kept for every later file."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from daemon.errors import ModelError

if TYPE_CHECKING:
    from whisper.model import Whisper

log = structlog.get_logger(__name__)


def is_checkpoint_path(name: str) -> bool:
    """Return True when a model setting names a checkpoint file rather than an official model."""
    return name.endswith(".pt") or "/" in name


def model_problem(name: str) -> str | None:
    """Return why a model setting cannot work (unknown name, missing file), or None if it can."""
    import whisper

    if is_checkpoint_path(name):
        return None if Path(name).is_file() else f"checkpoint file not found: {name}"
    if name in whisper.available_models():
        return None
    available = ", ".join(whisper.available_models())
    return f"unknown model {name!r}; available: {available}, or a path to a .pt checkpoint"


def resolve_device(device: str) -> str:
    """Return the torch device for a setting: 'auto' picks cuda when one is usable."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for but torch sees no CUDA device")
    return device


class ModelRegistry:
    """Loads each (model, device) once and keeps it resident; safe to share between threads."""

    def __init__(self, model_dir: Path, device: str = "auto", torch_threads: int = 0) -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.loads: Counter[tuple[str, str]] = Counter()  # how often each key was loaded from disk
        self._models: dict[tuple[str, str], Whisper] = {}
        self._lock = threading.Lock()
        if torch_threads:
            import torch

            # Deliberate: on small CPUs, extra intra-op threads slow small models down.
            torch.set_num_threads(torch_threads)

    @property
    def fp16(self) -> bool:
        """Return True when models run in half precision (on CUDA; CPU kernels need fp32)."""
        return self.device.startswith("cuda")

    def get(self, name: str) -> Whisper:
        """Return the resident model, loading it (and downloading a named one) on first use."""
        key = (name, self.device)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._load(name)
                self._models[key] = model
                self.loads[key] += 1
            return model

    def loaded(self) -> list[str]:
        """Return the names of the models now resident."""
        return [name for name, _ in self._models]

    def _load(self, name: str) -> Whisper:
        import whisper

        problem = model_problem(name)
        if problem:
            raise ModelError(problem)
        started = time.monotonic()
        log.info("model_loading", model=name, device=self.device, model_dir=str(self.model_dir))
        try:
            # whisper.load_model reads checkpoints with torch.load(weights_only=True) and
            # downloads a named model into download_root (checksum-verified) when missing.
            self.model_dir.mkdir(parents=True, exist_ok=True)
            model = whisper.load_model(name, device=self.device, download_root=str(self.model_dir))
        except Exception as err:  # a corrupt file or a failed download: say which model
            raise ModelError(f"cannot load model {name!r}: {err}") from err
        log.info("model_loaded", model=name, device=self.device,
                 duration_s=round(time.monotonic() - started, 2))
        return model
