"""The CPU kernels (`cpu_dtype`): float32 decodes exactly what whisper's own modules decode; bfloat16
and int8 hear the real recordings as well; int8 gives a window the same bits alone as in a batch;
word timing, language detection and beam search still work.

The real pretrained base model on real recordings; the unmodified model is whisper's own module,
built from the same checkpoint, as the reference.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import media
import pytest
import torch
import whisper
from conftest import SUMMARY, Pretrained
from daemon_harness import ROOT
from test_batched import FIXTURES, Recording, normalized_wer, recordings, rule  # noqa: F401 (a fixture)
from test_real_speech import JFK, JFK_TEXT, SPEECHBRAIN

from daemon.models import ModelRegistry
from daemon.models.cpu import optimise_for_cpu
from daemon.pipeline.batched import BatchedEngine

RECORDINGS = [(JFK, JFK_TEXT)] + [(FIXTURES / name, text) for name, text in SPEECHBRAIN.items()]
GREEDY = whisper.DecodingOptions(language="en", fp16=False, temperature=0.0)


@pytest.fixture(scope="module")
def plain(pretrained: Pretrained) -> whisper.Whisper:
    """whisper's own modules on base's weights (the registry's conversion cache): no CPU kernel changed."""
    from daemon.models.checkpoint import build_model
    from daemon.models.registry import read_source
    from daemon.models.sources import identify

    checkpoint, _ = read_source(identify(str(pretrained.base)), pretrained.model_dir)
    return build_model(checkpoint, device="cpu", half=False)


def mels() -> torch.Tensor:
    """Return the recordings' first 30 s spectrograms as one batch."""
    return torch.stack([whisper.pad_or_trim(whisper.log_mel_spectrogram(whisper.load_audio(str(path))),
                                            whisper.audio.N_FRAMES) for path, _ in RECORDINGS])


def test_float32_kernels_decode_exactly_what_whispers_own_modules_decode(plain: whisper.Whisper) -> None:
    """cpu_dtype float32: the same tokens as the unmodified model, window for window, in a batch."""
    fast = optimise_for_cpu(copy.deepcopy(plain), "float32")
    batch = mels()
    with torch.inference_mode():
        expected = whisper.decode(plain, batch, GREEDY)
        got = whisper.decode(fast, batch, GREEDY)
    assert [r.tokens for r in got] == [r.tokens for r in expected]
    assert all(abs(g.avg_logprob - e.avg_logprob) < 1e-3 for g, e in zip(got, expected, strict=True))


def test_bfloat16_kernels_hear_the_real_recordings_as_well(plain: whisper.Whisper) -> None:
    """cpu_dtype bfloat16: word error rate on real speech no worse than float32's; a window gives the
    same tokens alone as in a batch (no scale shared across the batch)."""
    fast = optimise_for_cpu(copy.deepcopy(plain), "bfloat16")
    batch = mels()
    with torch.inference_mode():
        reference = [r.text for r in whisper.decode(plain, batch, GREEDY)]
        together = whisper.decode(fast, batch, GREEDY)
        alone = [whisper.decode(fast, batch[i : i + 1], GREEDY)[0] for i in range(len(RECORDINGS))]
    texts = [r.text for r in together]
    truth = [text for _, text in RECORDINGS]
    assert normalized_wer(list(zip(truth, texts, strict=True))) <= normalized_wer(
        list(zip(truth, reference, strict=True))) + 0.01, (texts, reference)
    assert [r.tokens for r in alone] == [r.tokens for r in together]


def test_word_timing_language_detection_and_beam_search_still_work(plain: whisper.Whisper) -> None:
    """The changed attention keeps what whisper's transcribe needs: word timings from the cross-attention
    weights, detect_language, and beam search's reordering of the key/value cache."""
    for dtype in ("float32", "bfloat16", "int8"):
        fast = optimise_for_cpu(copy.deepcopy(plain), dtype)
        result = whisper.transcribe(fast, str(JFK), fp16=False, temperature=0.0, beam_size=5, word_timestamps=True)
        words = [w for s in result["segments"] for w in s["words"]]
        assert result["language"] == "en"
        assert normalized_wer([(JFK_TEXT, result["text"])]) == 0.0, result["text"]
        americans = next(w for w in words if "Americans" in w["word"])
        assert 1.0 <= americans["start"] <= 2.5, (dtype, americans)


def test_float32_vocabulary_weights_keep_whispers_own_projection(plain: whisper.Whisper) -> None:
    """The fp16 vocabulary projection is used only where it is exact: weights that are float16 values."""
    assert type(optimise_for_cpu(copy.deepcopy(plain), "float32").decoder).__name__ == "_Decoder"
    fine_tuned = copy.deepcopy(plain)
    with torch.no_grad():
        fine_tuned.decoder.token_embedding.weight.add_(1e-5)  # no longer float16 values
    assert type(optimise_for_cpu(fine_tuned, "float32").decoder) is whisper.model.TextDecoder


def test_the_cpu_dtype_setting_reaches_the_loaded_model(pretrained: Pretrained) -> None:
    """cpu_dtype from the config is what the registry loads: float32 by default, bfloat16 or int8 when
    asked; any other value is a config error."""
    from daemon.config import Settings

    assert Settings().cpu_dtype == "float32"
    with pytest.raises(ValueError, match="cpu_dtype"):
        Settings.model_validate({"cpu_dtype": "int4"})
    for dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("int8", torch.float32)):
        registry = ModelRegistry(pretrained.model_dir, device="cpu", cpu_dtype=dtype)
        model = registry.get(str(pretrained.base))
        assert model.encoder.conv1.weight.dtype == expected
        key = model.decoder.blocks[0].cross_attn.key
        int8 = type(model.encoder.blocks[0].mlp[0]).__name__ == "_Int8Linear"
        assert int8 == (dtype == "int8")
        # int8 keeps the int8 projection alone: no float copy of the same weights beside it.
        assert (key.weight is None and key.int8 is not None) if int8 else key.weight.dtype == expected


def test_int8_gives_a_window_the_same_bits_alone_as_in_a_batch(plain: whisper.Whisper) -> None:
    """cpu_dtype int8: each window's encoder output, and so its tokens, are bit for bit the same
    whether it is encoded alone or in a batch with other windows (activations are scaled per row,
    never per batch)."""
    fast = optimise_for_cpu(copy.deepcopy(plain), "int8")
    recorded = mels()
    quiet = recorded[0] * 0.5 - 0.5  # a louder-quieter variant: the scale a shared one would take differs
    batch = torch.cat([recorded, quiet[None], recorded.flip(0)])
    with torch.inference_mode():
        together = fast.embed_audio(batch)
        alone = [fast.embed_audio(batch[i : i + 1])[0] for i in range(len(batch))]
        tokens_together = [r.tokens for r in whisper.decode(fast, batch, GREEDY)]
        tokens_alone = [whisper.decode(fast, batch[i : i + 1], GREEDY)[0].tokens for i in range(len(batch))]
        reference = plain.embed_audio(batch)
    for i, window in enumerate(alone):
        assert torch.equal(window, together[i]), i
    assert tokens_alone == tokens_together
    # Close to float32 (not equal): int8 is a choice, like bfloat16.
    assert float((together - reference).norm() / reference.norm()) < 0.15


SATURATING_CHECK = """
import torch
from daemon.models.cpu import _int8_kernel, _onednn
kernel = _int8_kernel()
if kernel is not None:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(200, 256, (64, 1280), dtype=torch.uint8, generator=g)  # loud rows
    w = torch.randint(100, 128, (96, 1280), dtype=torch.int8, generator=g)  # large weights
    w[::2] = -w[::2]
    exact = (x.long() - 128) @ w.long().t()
    if kernel == "onednn":
        got = _onednn(x, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(96))
    else:
        got = torch._int_mm((x.to(torch.int16) - 128).to(torch.int8), w.t())
    assert torch.equal(got.long(), exact), (kernel, int((got.long() - exact).abs().max()))
print(kernel)
"""


@pytest.mark.parametrize("isa", ["", "AVX512_CORE", "AVX2"])
def test_the_int8_kernel_chosen_sums_exactly_or_int8_is_not_used(isa: str) -> None:
    """On this CPU and on older ones (oneDNN limited to AVX-512 without VNNI, or AVX2: where int8
    pairs are summed in 16 bits and saturate), the int8 kernel whisperd picks sums loud rows against
    large weights exactly; where none does, it picks none and int8 is not used."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa} if isa else dict(os.environ)
    out = subprocess.run([sys.executable, "-c", SATURATING_CHECK], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] in ("onednn", "int_mm", "None")  # after the log lines


def test_int8_kernels_agree_bit_for_bit() -> None:
    """The two int8 kernels, oneDNN's (where it is exact) and torch._int_mm (everywhere), give the same
    bits: which one a CPU gets changes the speed, never the words."""
    from daemon.models.cpu import _int8_kernel, _Int8Linear

    if _int8_kernel() != "onednn":
        pytest.skip("oneDNN's int8 linear is missing or inexact on this CPU: only torch._int_mm runs")
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(512, 384)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(384, 512, generator=generator) * 0.05)
    x = torch.randn(2, 37, 512, generator=generator) * 3
    assert torch.equal(_Int8Linear(linear, "onednn")(x), _Int8Linear(linear, "int_mm")(x))


# Harvard sentences (IEEE 1969, public domain), three to a passage, spoken by espeak-ng.
HARVARD = (
    "Glue the sheet to the dark blue background. It's easy to tell the depth of a well. These days a "
    "chicken leg is a rare dish.",
    "Rice is often served in round bowls. The juice of lemons makes fine punch. The box was thrown "
    "beside the parked truck.",
    "The hogs were fed chopped corn and garbage. Four hours of steady work faced us. A large size in "
    "stockings is hard to sell.",
    "The boy was there when the sun rose. A rod is used to catch pink salmon. The source of the huge "
    "river is the clear spring.",
    "Kick the ball straight and follow through. Help the woman get back to her feet. A pot of tea "
    "helps to pass the evening.",
    "Smoky fires lack flame and heat. The soft cushion broke the man's fall. The salt breeze came "
    "across from the sea.",
)


def test_int8_batched_engine_hears_nearly_what_float32_hears(
    pretrained: Pretrained,
    recordings: list[Recording],  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    """cpu_dtype int8 through the batched engine on the real recordings (one by one and joined with
    silences) and six espeak-ng passages in three voices (about 200 words more, so one word is not
    a point): word error rate at most 4 points over float32's. int8 costs accuracy (measured here:
    15.1 % against 12.3 %), which is why it is a choice and not the default; a kernel summing wrong
    would cost far more."""
    voices = ("en-us+m7", "en+f3", "en-us+m3")
    spoken = [Recording(media.speech_wav(tmp_path / f"h{n}.wav", text, voice=voices[n % 3]), text)
              for n, text in enumerate(HARVARD)]
    heard = [*recordings, *spoken]
    transcripts = {}
    for dtype in ("float32", "int8"):
        registry = ModelRegistry(pretrained.model_dir, device="cpu", cpu_dtype=dtype)
        transcripts[dtype] = BatchedEngine(registry).transcribe_many(
            [(r.audio(), rule(pretrained.base), None) for r in heard])
    wer = {dtype: normalized_wer([(r.text, t.text) for r, t in zip(heard, out, strict=True)])
           for dtype, out in transcripts.items()}
    SUMMARY.append(f"int8 against float32 WER (base, batched): {wer['int8']:.2%} against {wer['float32']:.2%}")
    assert wer["int8"] <= wer["float32"] + 0.04, {d: [t.text for t in out] for d, out in transcripts.items()}
