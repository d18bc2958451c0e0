"""Make a tiny random-weight Whisper checkpoint for plumbing tests.

The checkpoint is in openai-whisper's own on-disk format (a dict with
``dims`` and ``model_state_dict``), so ``whisper.load_model(path)`` loads it
exactly like a real model file, including under ``torch.load(weights_only=True)``.

It is a *plumbing-only* model: the weights are random (seeded, so
deterministic), which means the transcribed text is noise. Use it to exercise
loading, scheduling, audio decoding and output writing without downloading a
real model; never assert on the words it produces.

The vocabulary is the multilingual one (n_vocab=51865), so
``model.is_multilingual`` is true and language detection / the multilingual
tokenizer code paths run. With the defaults the file is about 15 MB.

Usage::

    python tools/make_test_checkpoint.py OUT.pt [--seed N] [--width N] [--layers N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import sys
from pathlib import Path

import torch
from whisper.model import ModelDimensions, Whisper

# Size of the multilingual tokenizer's vocabulary; 51864 would be English-only.
MULTILINGUAL_VOCAB = 51865
# Whisper's fixed context lengths: 30 s of audio gives 1500 encoder frames, and
# the decoder's positional embedding has 448 slots. The audio side must match
# what whisper.audio produces, so these are not shrunk.
AUDIO_CTX = 1500
TEXT_CTX = 448


def make_checkpoint(
    path: Path,
    *,
    seed: int = 0,
    n_state: int = 64,
    n_head: int = 2,
    n_layer: int = 2,
    n_mels: int = 80,
) -> Path:
    """Return ``path`` after writing a random-weight Whisper checkpoint there.

    The same arguments always produce identical weights. The file is written to
    a temporary name in the same directory and renamed into place, so a reader
    never sees a half-written checkpoint.
    """
    if n_state % n_head != 0:
        raise ValueError(f"n_state ({n_state}) must be divisible by n_head ({n_head})")
    path = Path(path)
    dims = ModelDimensions(
        n_mels=n_mels,
        n_audio_ctx=AUDIO_CTX,
        n_audio_state=n_state,
        n_audio_head=n_head,
        n_audio_layer=n_layer,
        n_vocab=MULTILINGUAL_VOCAB,
        n_text_ctx=TEXT_CTX,
        n_text_state=n_state,
        n_text_head=n_head,
        n_text_layer=n_layer,
    )
    # Module construction draws from torch's global RNG, so seeding right
    # before it makes the initial weights a pure function of the arguments.
    # fork_rng keeps the caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Whisper(dims)
        # Whisper allocates the decoder's positional embedding with
        # torch.empty and relies on the checkpoint to fill it, so left alone
        # it holds leftover memory: different on every run and sometimes
        # huge (1e25) or NaN. Give it small seeded values like the rest.
        with torch.no_grad():
            torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
    checkpoint = {
        "dims": dataclasses.asdict(dims),
        "model_state_dict": model.state_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: that forces mode 0600, and the daemon may run as a
    # different user than whoever made the checkpoint. O_EXCL + 0666 & umask
    # gives ordinary file permissions and still never clobbers another writer.
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(checkpoint, fh)
        os.replace(tmp_name, path)
    except BaseException:
        # Leave no stray temp file behind on failure or interrupt.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    """Return the process exit status after writing the checkpoint named on the command line."""
    parser = argparse.ArgumentParser(
        description="Write a tiny random-weight (plumbing-only) Whisper checkpoint."
    )
    parser.add_argument("out", type=Path, help="output .pt path")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed value (default 0)")
    parser.add_argument(
        "--width", type=int, default=64, help="n_audio_state = n_text_state (default 64)"
    )
    parser.add_argument(
        "--layers", type=int, default=2, help="encoder and decoder layers (default 2)"
    )
    args = parser.parse_args(argv)
    try:
        out = make_checkpoint(args.out, seed=args.seed, n_state=args.width, n_layer=args.layers)
    except ValueError as exc:
        parser.error(str(exc))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
