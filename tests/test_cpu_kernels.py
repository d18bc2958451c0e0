"""The CPU kernels (`cpu_dtype`): float32 decodes exactly what whisper's own modules decode; bfloat16
hears the real recordings as well; word timing, language detection and beam search still work.

The real pretrained base model on real recordings; the unmodified model is whisper's own module,
built from the same checkpoint, as the reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
import whisper
from conftest import Pretrained
from test_batched import FIXTURES, normalized_wer
from test_real_speech import JFK, JFK_TEXT, SPEECHBRAIN

from daemon.models.cpu import optimise_for_cpu

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
    for dtype in ("float32", "bfloat16"):
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
    """cpu_dtype from the config is what the registry loads: float32 by default, bfloat16 when asked;
    any other value is a config error."""
    from daemon.config import Settings
    from daemon.models import ModelRegistry

    assert Settings().cpu_dtype == "float32"
    with pytest.raises(ValueError, match="cpu_dtype"):
        Settings.model_validate({"cpu_dtype": "int8"})
    for dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        registry = ModelRegistry(pretrained.model_dir, device="cpu", cpu_dtype=dtype)
        model = registry.get(str(pretrained.base))
        assert model.encoder.conv1.weight.dtype == expected
        assert model.decoder.blocks[0].cross_attn.key.weight.dtype == expected
