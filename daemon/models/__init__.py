"""Whisper models: what a `model:` setting names, reading every checkpoint format, keeping models resident.

| module | its one job |
| --- | --- |
| `sources.py` | a setting → a source (OpenAI name, `.pt`, Hugging Face folder, CTranslate2 folder); cheap facts |
| `download.py` | OpenAI's named models: fetched once into model_dir, checksum-verified |
| `ct2.py`, `hf.py` | a CTranslate2 / Hugging Face folder → a `Checkpoint` in whisper's names |
| `checkpoint.py` | whisper's own format, and building the module without random initialisation |
| `cache.py` | converted folders cached in model_dir by content hash |
| `registry.py` | resident models: load once per (name, device), remember failures |

Importing this package imports neither torch nor whisper.
"""

from daemon.models.registry import LoadedModel, ModelRegistry, resolve_device
from daemon.models.sources import ModelSource, identify, is_path_setting, source_problem, task_problems

__all__ = [
    "LoadedModel",
    "ModelRegistry",
    "ModelSource",
    "identify",
    "is_path_setting",
    "resolve_device",
    "source_problem",
    "task_problems",
]
