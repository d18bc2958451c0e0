"""The encoder and the decoding loop of base on a CPU, per `cpu_dtype`: a microbenchmark.

8 windows (the three real recordings of tests/fixtures, repeated) go through the encoder, then
whisper's greedy decoding on the encoder output, for each cpu_dtype in turn, alternating, the
fastest of --repeat runs kept (other work on the machine only ever slows a run down). Prints
seconds per stage and dtype as JSON.

    .venv/bin/python bench/cpu_dtypes.py --threads 2                   # float32 and int8
    .venv/bin/python bench/cpu_dtypes.py --dtypes float32,bfloat16,int8 --repeat 5
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
RECORDINGS = ("jfk.flac", "birch_canoe.wav", "small_dog.wav")


def main() -> None:
    """Time base's encoder and decoding per cpu_dtype and print the fastest runs as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,int8", help="comma-separated cpu_dtype values")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache", help="where base is converted once")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    import whisper

    from bench.weights import prepare
    from daemon.models.checkpoint import build_model, read_checkpoint
    from daemon.models.cpu import optimise_for_cpu

    torch.set_num_threads(args.threads)
    plain = build_model(read_checkpoint(prepare("base", args.cache).pt), device="cpu", half=False)
    models = {dtype: optimise_for_cpu(copy.deepcopy(plain), dtype) for dtype in args.dtypes.split(",")}
    mels = [whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(FIXTURES / name))))
            for name in RECORDINGS]
    batch = torch.stack([mels[i % len(mels)] for i in range(args.windows)])
    options = whisper.DecodingOptions(language="en", fp16=False, temperature=0.0)
    best = {dtype: {"encoder_s": float("inf"), "decoding_s": float("inf")} for dtype in models}
    texts: dict[str, list[str]] = {}
    with torch.inference_mode():
        for _ in range(args.repeat + 1):  # the first round warms up and is not counted
            for dtype, model in models.items():
                started = time.perf_counter()
                features = model.embed_audio(batch)
                encoded = time.perf_counter()
                results = whisper.decode(model, features, options)
                done = time.perf_counter()
                if dtype in texts:
                    best[dtype]["encoder_s"] = min(best[dtype]["encoder_s"], encoded - started)
                    best[dtype]["decoding_s"] = min(best[dtype]["decoding_s"], done - encoded)
                texts[dtype] = [r.text for r in results[: len(mels)]]
    with open("/proc/loadavg", encoding="ascii") as load:
        load_average = load.read().split()[:3]
    print(json.dumps({"windows": args.windows, "threads": args.threads, "repeat": args.repeat,
                      "load_average_after": load_average,
                      "seconds": {d: {k: round(v, 3) for k, v in b.items()} for d, b in best.items()},
                      "texts": texts}, indent=2))


if __name__ == "__main__":
    main()
