"""Every checkpoint format whisperd loads, checked against the real writers and readers of each format.

The peers: CTranslate2 itself (faster-whisper's engine) decoding OpenAI's real `base`, transformers
writing and running Hugging Face Whisper models, CTranslate2's own converter writing model.bin
files, and whisper's own `load_model`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from conftest import Pretrained
from model_formats import rewrite_ct2, write_ct2, write_hf
from structlog.testing import capture_logs
from whisper.decoding import DecodingOptions

from daemon.errors import ModelError
from daemon.models import ModelRegistry
from daemon.models.checkpoint import build_model, heads_from_whisper_dump, read_checkpoint
from daemon.models.ct2 import read_ct2
from daemon.models.hf import read_hf

FIXTURES = Path(__file__).parent / "fixtures"
SPEECH_TINY = FIXTURES / "speech-tiny.pt"


def greedy_tokens(model: torch.nn.Module, mel: torch.Tensor, *, language: str = "en") -> list[int]:
    """Return whisper's greedy tokens (with timestamps) for one 30 s mel window."""
    options = DecodingOptions(language=language, fp16=False, temperature=0.0)
    return list(whisper.decode(model, mel, options)[0].tokens)


def window_mel(audio_path: Path, n_mels: int = 80) -> torch.Tensor:
    """Return the log-mel spectrogram of a file's first 30 s, batched (1, n_mels, 3000)."""
    audio = whisper.pad_or_trim(whisper.load_audio(str(audio_path)))
    return whisper.log_mel_spectrogram(audio, n_mels).unsqueeze(0)


@pytest.fixture(scope="module")
def english_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phrase speech-tiny.pt knows, in a held-out espeak-ng voice."""
    import media

    return media.speech_wav(tmp_path_factory.mktemp("en") / "en.wav", "Where is the train station?", voice="en-us+m7")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, pretrained: Pretrained) -> dict[str, Path]:
    """speech-tiny.pt written by transformers as a Hugging Face folder, then by CTranslate2's converter."""
    root = tmp_path_factory.mktemp("formats")
    hf = write_hf(SPEECH_TINY, root / "hf", tokenizer_json=pretrained.base / "tokenizer.json",
                  alignment_heads=[[1, 0], [1, 3]])
    return {
        "hf": hf,
        "ct2-float16": write_ct2(hf, root / "ct2-float16", "float16"),
        "ct2-float32": write_ct2(hf, root / "ct2-float32"),
        "ct2-int8": write_ct2(hf, root / "ct2-int8", "int8"),
    }


def test_base_decodes_the_same_tokens_as_ctranslate2_itself(pretrained: Pretrained) -> None:
    """OpenAI's base in CTranslate2 format, converted, gives token for token what CTranslate2 decodes.

    Both run greedy on the same mel of jfk.flac, with and without timestamps: CTranslate2 is the
    engine faster-whisper runs, so whisperd reads these folders exactly as their users know them.
    """
    import ctranslate2

    model = build_model(read_ct2(pretrained.base), device="cpu", half=False)
    mel = window_mel(FIXTURES / "jfk.flac")
    peer = ctranslate2.models.Whisper(str(pretrained.base), device="cpu", compute_type="float32")
    tokenizer = whisper.tokenizer.get_tokenizer(True, language="en", task="transcribe")
    for timestamps in (True, False):
        ours = whisper.decode(model, mel, DecodingOptions(language="en", fp16=False, temperature=0.0,
                                                          without_timestamps=not timestamps))[0]
        prompt = list(tokenizer.sot_sequence) + ([] if timestamps else [tokenizer.no_timestamps])
        theirs = peer.generate(ctranslate2.StorageView.from_array(mel.numpy()), [prompt], beam_size=1)
        assert list(ours.tokens) == theirs[0].sequences_ids[0], (timestamps, ours.text)
        assert ours.text.startswith("And so my fellow Americans")


def test_ctranslate2_folder_decodes_like_the_openai_file(converted: dict[str, Path], english_wav: Path) -> None:
    """The same weights as a whisper .pt and as CTranslate2 folders (fp32, fp16) give identical greedy tokens.

    The folders were written by CTranslate2's converter; an int8 one (weights quantised, so not
    bit-identical) still decodes the same phrase.
    """
    reference = build_model(read_checkpoint(SPEECH_TINY), device="cpu", half=False)
    mel = window_mel(english_wav)
    expected = greedy_tokens(reference, mel)
    assert whisper.tokenizer.get_tokenizer(True).decode(expected).strip() == "Where is the train station?"
    for name in ("ct2-float32", "ct2-float16"):
        model = build_model(read_ct2(converted[name]), device="cpu", half=False)
        assert greedy_tokens(model, mel) == expected, name
        for key, tensor in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], tensor), (name, key)
    quantised = build_model(read_ct2(converted["ct2-int8"]), device="cpu", half=False)
    assert greedy_tokens(quantised, mel) == expected
    worst = max((quantised.state_dict()[k] - v).abs().max().item() for k, v in reference.state_dict().items())
    assert 0 < worst < 0.02, worst


def test_hugging_face_folder_loads_back_to_identical_tensors(converted: dict[str, Path]) -> None:
    """A Hugging Face folder written by transformers from a whisper checkpoint loads back tensor for tensor,
    with the alignment heads of its generation_config.json."""
    original = torch.load(SPEECH_TINY, map_location="cpu", weights_only=True)["model_state_dict"]
    checkpoint = read_hf(converted["hf"])
    assert checkpoint.state.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(checkpoint.state[key].to(tensor.dtype), tensor), key
    assert checkpoint.alignment_heads == ((1, 0), (1, 3))
    model = build_model(checkpoint, device="cpu", half=False)
    assert model.alignment_heads.to_dense().nonzero().tolist() == [[1, 0], [1, 3]]


def test_hugging_face_mapping_computes_what_transformers_computes(tmp_path: Path) -> None:
    """A randomly initialised transformers Whisper, saved and loaded by whisperd, gives transformers' logits."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=3,
                           encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=256,
                           decoder_ffn_dim=256)
    peer = WhisperForConditionalGeneration(config).eval()
    peer.save_pretrained(tmp_path / "hf")
    ours = build_model(read_hf(tmp_path / "hf"), device="cpu", half=False)
    mel = torch.randn(1, 80, 3000)
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 400, 370, 452]])
    with torch.no_grad():
        expected = peer(input_features=mel, decoder_input_ids=tokens).logits
        got = ours(mel, tokens)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_module_built_without_random_init_equals_whispers_own_load(english_wav: Path) -> None:
    """Building the module without whisper's random initialisation gives whisper's own model, tensor for tensor."""
    ours = build_model(read_checkpoint(SPEECH_TINY), device="cpu", half=False)
    theirs = whisper.load_model(str(SPEECH_TINY), device="cpu")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], tensor), key
    assert torch.equal(ours.decoder.mask, theirs.decoder.mask)
    assert torch.equal(ours.alignment_heads.to_dense(), theirs.alignment_heads.to_dense())
    mel = window_mel(english_wav)
    assert greedy_tokens(ours, mel) == greedy_tokens(theirs, mel)


def test_half_precision_keeps_fp16_weights_and_fp32_layer_norms(english_wav: Path) -> None:
    """For CUDA the weights stay float16 (no fp32 copy) while LayerNorms stay float32, and it still decodes.

    Run on the CPU here (no GPU on the test machines), with fp16 activations as on a GPU.
    """
    model = build_model(read_checkpoint(SPEECH_TINY), device="cpu", half=True)
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    assert dtypes["decoder.blocks.0.attn.query.weight"] == torch.float16
    assert dtypes["encoder.conv1.weight"] == torch.float16
    assert dtypes["decoder.token_embedding.weight"] == torch.float16
    assert dtypes["decoder.blocks.0.attn_ln.weight"] == torch.float32
    assert dtypes["encoder.ln_post.bias"] == torch.float32
    assert all(d == torch.float32 for n, d in dtypes.items() if n.endswith(("_ln.weight", "_ln.bias")))
    mel = window_mel(english_wav).half()
    result = whisper.decode(model, mel, DecodingOptions(language="en", fp16=True, temperature=0.0))[0]
    assert result.text.strip() == "Where is the train station?"


def test_base_alignment_heads_match_whispers_own(pretrained: Pretrained) -> None:
    """The word-timing heads the CTranslate2 folder names are the ones whisper ships for `base`."""
    checkpoint = read_ct2(pretrained.base)
    assert checkpoint.alignment_heads == heads_from_whisper_dump(checkpoint.dims, whisper._ALIGNMENT_HEADS["base"])


# -- refusals ------------------------------------------------------------------------------------


def _bad(converted: dict[str, Path], tmp_path: Path, change, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    return rewrite_ct2(converted["ct2-float32"], tmp_path / "bad", change, **kwargs)


def test_ct2_with_an_unused_tensor_is_refused(converted: dict[str, Path], tmp_path: Path) -> None:
    """A model.bin holding a tensor whisper has no place for is refused, naming the file and the tensor."""
    folder = _bad(converted, tmp_path, lambda t: t.update({"decoder/layer_0/extra/weight": np.zeros(4, "<f4")}))
    with pytest.raises(ModelError, match=rf"{folder}/model.bin: 1 tensor\(s\) .* decoder/layer_0/extra/weight"):
        read_ct2(folder)


def test_ct2_with_a_key_bias_is_refused(converted: dict[str, Path], tmp_path: Path) -> None:
    """A non-zero key bias (whisper's key has none) is refused rather than silently dropped."""
    def change(tensors: dict[str, np.ndarray]) -> None:
        tensors["encoder/layer_1/self_attention/linear_0/bias"][130] = 0.5  # inside the key's third

    folder = _bad(converted, tmp_path, change)
    where = f"{folder}/model.bin: encoder/layer_1/self_attention/linear_0"
    with pytest.raises(ModelError, match=rf"{where} has a non-zero key bias"):
        read_ct2(folder)


def test_ct2_of_another_model_family_is_refused(converted: dict[str, Path], tmp_path: Path) -> None:
    """A CTranslate2 model of another family (here a TransformerSpec) is refused by name."""
    folder = _bad(converted, tmp_path, lambda t: None, spec="TransformerSpec")
    with pytest.raises(ModelError, match=rf"{folder}/model.bin: a CTranslate2 TransformerSpec model, not a Whisper"):
        read_ct2(folder)


def test_ct2_with_a_wrong_shape_is_refused(converted: dict[str, Path], tmp_path: Path) -> None:
    """A tensor of the wrong shape is refused with the expected and the found shape."""
    def change(tensors: dict[str, np.ndarray]) -> None:
        tensors["decoder/layer_1/ffn/linear_1/bias"] = np.zeros(100, "<f4")

    folder = _bad(converted, tmp_path, change)
    with pytest.raises(ModelError, match=r"decoder.blocks.1.mlp.2.bias has shape \[100\], expected \[128\]"):
        read_ct2(folder)


def test_truncated_ct2_and_foreign_hf_folders_are_refused(converted: dict[str, Path], tmp_path: Path) -> None:
    """A truncated model.bin and a Hugging Face folder of another model type are refused, naming the file."""
    cut = tmp_path / "cut"
    shutil.copytree(converted["ct2-float16"], cut)
    data = (cut / "model.bin").read_bytes()
    (cut / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=rf"{cut}/model.bin: truncated CTranslate2 model"):
        read_ct2(cut)
    bert = tmp_path / "bert"
    shutil.copytree(converted["hf"], bert)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ModelError, match=rf"{bert}/config.json: model_type is 'bert', not 'whisper'"):
        read_hf(bert)


# -- the conversion cache ------------------------------------------------------------------------


def test_a_folder_is_converted_once_then_loaded_from_the_cache(converted: dict[str, Path], tmp_path: Path) -> None:
    """The first load converts and caches by content; a later process (and a copy elsewhere) loads the cache.

    Each `model_loaded` event reports how the model was loaded, how long it took and its size.
    """
    model_dir = tmp_path / "models"
    with capture_logs() as first_logs:
        first = ModelRegistry(model_dir, device="cpu")
        first.get(str(converted["ct2-float16"]))
    cache = sorted((model_dir / "converted").glob("*.pt"))
    assert len(cache) == 1 and cache[0].name.startswith("ct2-")
    copy = tmp_path / "elsewhere" / "same-model"
    shutil.copytree(converted["ct2-float16"], copy)
    with capture_logs() as later_logs:
        later = ModelRegistry(model_dir, device="cpu")
        model = later.get(str(copy))
    assert sorted((model_dir / "converted").glob("*.pt")) == cache  # the same content, the same cache
    [loaded_first] = [e for e in first_logs if e["event"] == "model_loaded"]
    [loaded_later] = [e for e in later_logs if e["event"] == "model_loaded"]
    assert loaded_first["origin"] == "converted" and loaded_later["origin"] == "cache"
    assert loaded_later["duration_s"] >= 0 and loaded_later["resident_mb"] == pytest.approx(
        sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20, rel=0.05)
    # The cache is whisper's own format: whisper's load_model reads it as it is.
    assert whisper.load_model(str(cache[0]), device="cpu").dims == model.dims


def test_changed_alignment_heads_make_a_new_cache_entry(converted: dict[str, Path], tmp_path: Path) -> None:
    """Editing a folder's config.json (its alignment heads) is a new model: converted again, heads applied."""
    folder = tmp_path / "ct2"
    shutil.copytree(converted["ct2-float16"], folder)
    model_dir = tmp_path / "models"
    ModelRegistry(model_dir, device="cpu").get(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "alignment_heads": [[0, 2]]}))
    model = ModelRegistry(model_dir, device="cpu").get(str(folder))
    assert len(list((model_dir / "converted").glob("*.pt"))) == 2
    assert model.alignment_heads.to_dense().nonzero().tolist() == [[0, 2]]


def test_a_truncated_cache_file_is_converted_again(converted: dict[str, Path], tmp_path: Path) -> None:
    """A cache file cut short (a disk that filled up) is not trusted: the folder is converted again."""
    model_dir = tmp_path / "models"
    ModelRegistry(model_dir, device="cpu").get(str(converted["ct2-float16"]))
    [cache] = (model_dir / "converted").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])
    registry = ModelRegistry(model_dir, device="cpu")
    registry.get(str(converted["ct2-float16"]))
    assert [i.origin for i in registry.info()] == ["converted"]
    assert read_checkpoint(cache).dims == read_ct2(converted["ct2-float16"]).dims


def test_checkpoint_keeps_its_alignment_heads_through_the_cache(converted: dict[str, Path], tmp_path: Path) -> None:
    """Heads read from a Hugging Face folder survive the round trip through the cache file."""
    model_dir = tmp_path / "models"
    ModelRegistry(model_dir, device="cpu").get(str(converted["hf"]))
    [cache] = (model_dir / "converted").glob("hf-*.pt")
    assert read_checkpoint(cache).alignment_heads == ((1, 0), (1, 3))
