"""The batched engine: windows cut at pauses, decoded several at a time, on real and trained models.

Its promise is the sequential engine's words, faster: decoding a window in a batch gives exactly
the tokens it gives alone (fp32), its word error rate on real speech stays within a point of
whisper's own sequential decoding, and every time lands on its own file's timeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import media
import numpy as np
import pytest
import whisper
from conftest import SUMMARY, Pretrained
from test_real_speech import JFK, JFK_TEXT, SPEECHBRAIN, word_error_rate
from test_recognition import EN_VOICE, ENGLISH, FIXTURE
from whisper.normalizers import EnglishTextNormalizer

from daemon.config import Rule
from daemon.models import ModelRegistry
from daemon.pipeline.batched import BatchedEngine, can_batch, uses_batched
from daemon.pipeline.extract import Audio
from daemon.pipeline.probe import AudioStream
from daemon.pipeline.transcribe import Transcript, WhisperEngine

FIXTURES = Path(__file__).parent / "fixtures"
BATCHED: dict[str, Any] = {"engine": "batched", "temperature": 0, "beam_size": None,
                           "condition_on_previous_text": False}
STREAM = AudioStream(index=0, position=0, codec="pcm_s16le", channels=1, language=None, start_time=0.0, default=True)


@dataclass(frozen=True)
class Recording:
    """A real recording and what is said in it."""

    path: Path
    text: str
    starts: tuple[float, ...] = (0.0,)  # where each sentence starts, for the joined recording

    def audio(self) -> Audio:
        """Return the recording decoded as the pipeline would hand it over."""
        return Audio(samples=whisper.load_audio(str(self.path)), offset_s=0.0, stream=STREAM)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> list[Recording]:
    """The real recordings one by one, and all three in one file with 4 s of silence between them."""
    singles = [Recording(JFK, JFK_TEXT)] + [Recording(FIXTURES / name, text) for name, text in SPEECHBRAIN.items()]
    path, starts = media.joined_with_silence(tmp_path_factory.mktemp("joined") / "joined.wav",
                                             [r.path for r in singles], gap_s=4.0)
    joined = Recording(path, " ".join(r.text for r in singles), tuple(starts))
    return [joined, *singles]


def rule(model: Path | str, **overrides: Any) -> Rule:
    """Return a rule on a model, decoded by the batched engine unless overridden."""
    return Rule.model_validate({"model": str(model), **BATCHED, **overrides})


def tokens(transcripts: Sequence[Transcript]) -> list[list[tuple[int, ...]]]:
    """Return each transcript's segments' tokens."""
    return [[segment.tokens for segment in t.segments] for t in transcripts]


def normalized_wer(pairs: Sequence[tuple[str, str]]) -> float:
    """Return the word error rate over all (reference, hypothesis) pairs, after whisper's English normaliser."""
    norm = EnglishTextNormalizer()
    return word_error_rate(" ".join(norm(r) for r, _ in pairs), " ".join(norm(h) for _, h in pairs))


def test_a_window_decoded_in_a_batch_gives_the_tokens_it_gives_alone_with_real_base(
    base_registry: ModelRegistry, pretrained: Pretrained, recordings: list[Recording]
) -> None:
    """Real base, fp32: four files' six windows in one batch decode exactly as one at a time."""
    items = [(r.audio(), rule(pretrained.base), None) for r in recordings]
    alone = BatchedEngine(base_registry, batch_size=1).transcribe_many(items)
    together = BatchedEngine(base_registry, batch_size=8).transcribe_many(items)
    assert tokens(together) == tokens(alone)
    assert [t.text for t in together] == [t.text for t in alone]
    assert sum(len(t.segments) for t in together) >= 4  # every file said something
    assert word_error_rate(JFK_TEXT, together[1].text) <= 0.05, together[1].text


def test_a_window_decoded_in_a_batch_gives_the_tokens_it_gives_alone_with_the_trained_model(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    """The trained test model, fp32: the same, with held-out espeak-ng voices and a language to detect."""
    phrases = [media.speech_wav(tmp_path / f"p{n}.wav", ENGLISH, voice=voice)
               for n, voice in enumerate((EN_VOICE, "en-us+f3", "en+m3"))]
    joined, _ = media.joined_with_silence(tmp_path / "joined.wav", phrases, gap_s=3.0)
    items = [(Recording(path, ENGLISH).audio(), rule(FIXTURE, language="auto"), None) for path in [joined, *phrases]]
    alone = BatchedEngine(registry, batch_size=1).transcribe_many(items)
    together = BatchedEngine(registry, batch_size=4).transcribe_many(items)
    assert tokens(together) == tokens(alone)
    assert [t.language for t in together] == ["en"] * 4
    assert all(ENGLISH.lower().rstrip("?") in t.text.lower() for t in together[1:]), [t.text for t in together]


def test_batched_word_error_rate_stays_within_a_point_of_whisper_sequential_decoding(
    base_registry: ModelRegistry, pretrained: Pretrained, recordings: list[Recording]
) -> None:
    """On the real recordings, batched greedy windows against whisperd's default sequential decoding
    (beam search, conditioned on the previous text): at most 1 point of word error rate worse."""
    engine = WhisperEngine(base_registry)
    # whisperd's defaults, on the sequential engine (`auto` would take these short files batched)
    sequential_rule = Rule.model_validate({"model": str(pretrained.base), "engine": "sequential"})
    sequential = [engine.transcribe(r.audio(), sequential_rule) for r in recordings]
    batched = engine.batched.transcribe_many([(r.audio(), rule(pretrained.base), None) for r in recordings])
    sequential_wer = normalized_wer([(r.text, t.text) for r, t in zip(recordings, sequential, strict=True)])
    batched_wer = normalized_wer([(r.text, t.text) for r, t in zip(recordings, batched, strict=True)])
    SUMMARY.append(f"real speech WER (base): sequential {sequential_wer:.2%}, batched {batched_wer:.2%}")
    assert batched_wer <= sequential_wer + 0.01, ([t.text for t in sequential], [t.text for t in batched])


def test_times_land_on_each_files_own_timeline(
    base_registry: ModelRegistry, pretrained: Pretrained, recordings: list[Recording]
) -> None:
    """Segments and words of every file in a batch are timed on that file, not on the batch."""
    joined, jfk = recordings[0], recordings[1]
    out = BatchedEngine(base_registry).transcribe_many(
        [(r.audio(), rule(pretrained.base, word_timestamps=True), None) for r in (joined, jfk)])
    words = [w for s in out[0].segments for w in s.words or ()]
    starts = {w.word.strip(" ,.").lower(): w.start for w in words}
    # Each sentence's first word is said where its recording was placed (the 4 s gaps are skipped).
    for first_word, placed in zip(("and", "the", "the"), joined.starts, strict=True):
        spoken = min((w.start for w in words if w.word.strip(" ,.").lower() == first_word and w.start >= placed - 0.5),
                     default=None)
        assert spoken is not None and abs(spoken - placed) < 1.0, (first_word, placed, spoken)
    assert abs(starts["birch"] - joined.starts[1]) < 1.5
    assert abs(starts["child"] - joined.starts[2]) < 1.5
    jfk_words = {w.word.strip(" ,.").lower(): w.start for s in out[1].segments for w in s.words or ()}
    assert 1.2 <= jfk_words["americans"] <= 2.4, jfk_words  # as in jfk.flac alone, not after the joined file
    # Without word timings, segment times come from the windows' timestamp tokens.
    plain = BatchedEngine(base_registry).transcribe_many(
        [(r.audio(), rule(pretrained.base), None) for r in (joined, jfk)])
    for placed in joined.starts:
        assert any(abs(s.start - placed) < 1.0 for s in plain[0].segments), (placed, plain[0].segments)
    assert plain[1].segments[0].start < 1.0 and plain[1].segments[-1].end < 11.5
    duration = len(joined.audio().samples) / whisper.audio.SAMPLE_RATE
    for transcript in (*out, *plain):
        ends = [s.end for s in transcript.segments]
        assert all(0 <= s.start <= s.end <= duration + 0.01 for s in transcript.segments)
        assert ends == sorted(ends)


def test_windows_that_fail_the_quality_checks_are_decoded_again_hotter(
    base_registry: ModelRegistry, pretrained: Pretrained, recordings: list[Recording]
) -> None:
    """A compression-ratio threshold no text can meet sends every window to the next temperature."""
    jfk = recordings[1]
    engine = BatchedEngine(base_registry)
    cold = engine.transcribe(jfk.audio(), rule(pretrained.base, temperature=[0.0, 0.4]))
    hot = engine.transcribe(jfk.audio(), rule(pretrained.base, temperature=[0.0, 0.4], best_of=2,
                                              compression_ratio_threshold=0.1))
    assert {s.temperature for s in cold.segments} == {0.0}
    assert {s.temperature for s in hot.segments} == {0.4}
    assert word_error_rate(JFK_TEXT, hot.text) < 0.5, hot.text  # still his sentence, sampled
    # Several windows at once, best_of candidates each (whisper's own decode cannot batch those).
    several = engine.transcribe_many([(r.audio(), rule(pretrained.base, temperature=[0.0, 0.4], best_of=2,
                                                      compression_ratio_threshold=0.1), None)
                                      for r in recordings[1:]])
    assert [{s.temperature for s in t.segments} for t in several] == [{0.4}] * (len(recordings) - 1)


def test_silence_alone_is_not_decoded_and_gives_no_text(
    base_registry: ModelRegistry, pretrained: Pretrained, tmp_path: Path
) -> None:
    """Thirty seconds of silence: no window, no invented word, and a language for the outputs."""
    silence = media.silence_wav(tmp_path / "silence.wav", seconds=30)
    out = BatchedEngine(base_registry).transcribe(Recording(silence, "").audio(), rule(pretrained.base))
    assert (out.text, out.segments) == ("", ())
    assert out.language in whisper.tokenizer.LANGUAGES


def test_auto_picks_the_batched_engine_only_where_its_decoding_matches_the_rule() -> None:
    """Conditioning on the previous text (past one window) and the hallucination-silence guard stay
    sequential; greedy decoding and beam search on independent windows are the batched engine's."""
    assert not uses_batched(Rule())  # whisperd's defaults: beam search, conditioned
    # ... except for a file no longer than one window: no previous window's text to condition on.
    assert uses_batched(Rule(), 30.0) and not uses_batched(Rule(), 30.5)
    assert not uses_batched(Rule(engine="sequential"), 10.0)
    assert not uses_batched(Rule(word_timestamps=True, hallucination_silence_threshold=2.0), 10.0)
    for beams in (None, 5):
        independent = Rule(beam_size=beams, condition_on_previous_text=False)
        assert can_batch(independent) and uses_batched(independent)
        assert not uses_batched(independent.with_overrides({"engine": "sequential"}))
    assert not uses_batched(Rule(condition_on_previous_text=False, hallucination_silence_threshold=2.0))
    assert Rule(engine="batched").problems() == [
        "engine: batched decodes each window on its own; condition_on_previous_text "
        "need(s) engine: sequential (or set condition_on_previous_text: false)"]
    assert Rule(engine="batched", beam_size=5, condition_on_previous_text=False).problems() == []


def test_beam_search_on_a_batch_gives_each_window_whispers_own_beams(
    base_registry: ModelRegistry, pretrained: Pretrained, recordings: list[Recording]
) -> None:
    """Real base, fp32, 5 beams: four windows decoded together give each the tokens, log-probability
    and text whisper's own `decode` gives it alone (whisper's cannot decode them together)."""
    import torch

    from daemon.pipeline.batched import decode_batch

    model = base_registry.get(str(pretrained.base))
    mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(r.audio().samples))
                        for r in recordings[:4]])
    options = whisper.DecodingOptions(language="en", beam_size=5, fp16=False)
    with torch.inference_mode():
        features = model.embed_audio(mels)
        together = decode_batch(model, features, options)
        alone = [whisper.decode(model, features[i : i + 1], options)[0] for i in range(len(features))]
        with pytest.raises((RuntimeError, AssertionError)):  # whisper 20250625's: candidates and windows mismatch
            whisper.decode(model, features, options)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.avg_logprob for r in together] == pytest.approx([r.avg_logprob for r in alone], abs=1e-5)
    assert [r.text for r in together] == [r.text for r in alone]
    assert word_error_rate(JFK_TEXT, together[1].text) <= 0.05, together[1].text


def test_beam_search_on_a_batch_with_whispers_own_modules(tmp_path: Path) -> None:
    """The path a GPU takes (whisper's own attention, no CPU kernels), run here on the trained test
    model: the grouped cross-attention gives each window's beams what whisper gives it alone."""
    import torch

    from daemon.models.attention import share_audio_keys
    from daemon.pipeline.batched import decode_batch

    model = share_audio_keys(whisper.load_model(str(FIXTURE), device="cpu"))
    phrases = [media.speech_wav(tmp_path / f"p{n}.wav", ENGLISH, voice=voice)
               for n, voice in enumerate((EN_VOICE, "en-us+f3", "en+m3"))]
    mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(p))),
                                                    model.dims.n_mels) for p in phrases])
    options = whisper.DecodingOptions(language="en", beam_size=3, fp16=False, sample_len=24)
    with torch.inference_mode():
        features = model.embed_audio(mels)
        together = decode_batch(model, features, options)
        alone = [whisper.decode(model, features[i : i + 1], options)[0] for i in range(len(features))]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert all(ENGLISH.lower().rstrip("?") in r.text.lower() for r in together), [r.text for r in together]


def test_the_decoder_on_preallocated_caches_gives_whispers_own_tokens(tmp_path: Path) -> None:
    """The token steps a GPU replays as CUDA graphs (caches allocated once, written in place; run
    eagerly here) give whisper's own tokens and log-probabilities: on the trained test model greedy
    with and without timestamps, 3 beams, best-of sampling and a prompt; on random weights that never
    end, 200 tokens greedy and 60 with 4 beams (positions deep into the cache, beams reordering it)."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    from daemon.models.attention import share_audio_keys
    from daemon.pipeline.batched import decode_batch

    trained = share_audio_keys(whisper.load_model(str(FIXTURE), device="cpu"))
    phrases = [media.speech_wav(tmp_path / f"p{n}.wav", ENGLISH, voice=voice)
               for n, voice in enumerate((EN_VOICE, "en-us+f3", "en+m3"))]
    mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(p))),
                                                    trained.dims.n_mels) for p in phrases])
    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=128, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=448, n_text_state=128, n_text_head=2, n_text_layer=3)
    noise = share_audio_keys(Whisper(dims).eval())
    for name, parameter in noise.named_parameters():
        parameter.data.normal_(0, 0.05).add_(1.0 if name.endswith("ln.weight") else 0.0)
    endless = f"-1,{whisper.tokenizer.get_tokenizer(True).eot}"
    cases = [
        (trained, mels, {}), (trained, mels, {"without_timestamps": True}),
        (trained, mels, {"beam_size": 3, "sample_len": 24}),
        (trained, mels, {"temperature": 0.5, "best_of": 3, "sample_len": 30}),
        (trained, mels, {"prompt": "Where is the station? " * 8}),
        (noise, torch.randn(3, 80, 3000), {"suppress_tokens": endless, "sample_len": 200}),
        (noise, torch.randn(3, 80, 3000), {"suppress_tokens": endless, "sample_len": 60, "beam_size": 4}),
    ]
    with torch.inference_mode():
        for model, batch, overrides in cases:
            options = whisper.DecodingOptions(language="en", fp16=False, **overrides)
            features = model.embed_audio(batch)
            torch.manual_seed(1)
            own = decode_batch(model, features, options, static_cache=False)
            torch.manual_seed(1)
            static = decode_batch(model, features, options, static_cache=True)
            assert [r.tokens for r in static] == [r.tokens for r in own], overrides
            assert [r.avg_logprob for r in static] == pytest.approx([r.avg_logprob for r in own], abs=1e-5)
            assert [r.no_speech_prob for r in static] == pytest.approx([r.no_speech_prob for r in own], abs=1e-6)
            if model is noise:
                assert [len(r.tokens) for r in static] == [overrides["sample_len"]] * 3  # the whole budget
            elif "prompt" not in overrides:  # (the test model, trained without prompts, says nothing after one)
                assert all(ENGLISH.lower().rstrip("?") in r.text.lower() for r in static), (overrides, static)


def test_timestamp_rules_on_the_whole_batch_mask_what_whispers_mask_row_by_row() -> None:
    """The timestamp rules applied to a batch at once (no read-back per row) leave exactly the logits
    whisper's `ApplyTimestampRules` leaves: at the first token, after text, after one timestamp, after
    a pair, with timestamps out of order, and where the timestamps' total probability wins."""
    import torch
    from whisper.decoding import ApplyTimestampRules
    from whisper.tokenizer import get_tokenizer

    from daemon.models.graphed_decoder import timestamp_rules

    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    begin, start = tokenizer.timestamp_begin, list(tokenizer.sot_sequence)
    generator = torch.Generator().manual_seed(0)
    histories = [
        [], [440], [begin + 10], [440, begin + 12], [begin + 3, 440, begin + 9], [begin + 3, 440, begin + 9, begin + 9],
        [begin + 20, 300, begin + 5], [300, 301, 302], [begin + 1, 300, begin + 4, begin + 4, 500],
    ]  # fmt: skip
    for count in sorted({len(h) for h in histories}):
        rows = [h for h in histories if len(h) == count]
        tokens = torch.tensor([start + h for h in rows] * 3)
        logits = torch.randn(len(tokens), tokenizer.encoding.n_vocab, generator=generator) * 4
        logits[len(rows) :, begin:] += 6.0  # some rows where the timestamps together outweigh any text token
        for max_initial in (None, 50):
            own, batch = logits.clone(), logits.clone()
            ApplyTimestampRules(tokenizer, len(start), max_initial).apply(own, tokens)
            timestamp_rules(tokenizer, len(start), max_initial).apply(batch, tokens)
            assert torch.equal(own, batch), (rows, max_initial)
            assert torch.isinf(own).any(dim=1).all()  # every row had something masked: the rules ran


def test_a_job_finds_its_speech_before_it_waits_for_the_device(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VAD and the spectrogram's loudest value are CPU work: a job does them in its own thread while
    another job holds the device (on a GPU they overlap its decoding instead of idling the device),
    once, and its transcript is the one it would have been."""
    import threading

    import daemon.pipeline.batched as batched

    calls = []
    found = threading.Event()
    real = batched.find_speech

    def watched(*args: Any, **kwargs: Any) -> Any:
        calls.append(threading.current_thread().name)
        found.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(batched, "find_speech", watched)
    audio = Recording(media.speech_wav(tmp_path / "p.wav", ENGLISH, voice=EN_VOICE), ENGLISH).audio()
    engine = WhisperEngine(registry)
    done: dict[str, Transcript] = {}
    job = threading.Thread(target=lambda: done.update(t=engine.transcribe(audio, rule(FIXTURE, language="en"))),
                           name="job")
    with engine.turns.hold():  # another job has the device
        job.start()
        assert found.wait(20), "the job waited for the device before finding its speech"
        assert job.is_alive()  # and now it waits for the device
    job.join(60)
    assert calls == ["job"]  # found once, ahead; the engine used it instead of finding it again in its turn
    alone = BatchedEngine(registry).transcribe(audio, rule(FIXTURE, language="en"))
    assert tokens([done["t"]]) == tokens([alone]) and ENGLISH.lower().rstrip("?") in alone.text.lower()


def test_the_engine_decodes_beam_rules_in_batches_as_one_window_at_a_time(
    base_registry: ModelRegistry, pretrained: Pretrained, recordings: list[Recording]
) -> None:
    """`beam_size: 5` on the batched engine: the same tokens whatever the batch, and JFK's words."""
    items = [(r.audio(), rule(pretrained.base, beam_size=5), None) for r in recordings]
    alone = BatchedEngine(base_registry, batch_size=1).transcribe_many(items)
    together = BatchedEngine(base_registry, batch_size=8).transcribe_many(items)
    assert tokens(together) == tokens(alone)
    assert word_error_rate(JFK_TEXT, together[1].text) <= 0.05, together[1].text


def test_timestamp_tokens_close_segments_inside_a_window() -> None:
    """A window's timestamp pairs become segments timed on the file, not one segment per window."""
    from types import SimpleNamespace

    from daemon.pipeline.batched import _split

    tokenizer = whisper.tokenizer.get_tokenizer(True, language="en", task="transcribe")

    def ts(seconds: float) -> int:
        return tokenizer.timestamp_begin + round(seconds / 0.02)

    tokens = [ts(0.0), *tokenizer.encode(" Hello there."), ts(2.0), ts(2.0), *tokenizer.encode(" Second one."),
              ts(5.0), ts(5.5), *tokenizer.encode(" Cut at the pause")]
    result = SimpleNamespace(tokens=tokens, temperature=0.0, avg_logprob=-0.2, no_speech_prob=0.01)
    segments = _split(tokenizer, result, window_end=12.0)
    assert [(s["start"], s["end"], s["text"]) for s in segments] == [
        (0.0, 2.0, " Hello there."), (2.0, 5.0, " Second one."), (5.5, 12.0, " Cut at the pause")]


def test_speech_across_long_silences_is_packed_into_one_window_and_timed_back() -> None:
    """Three phrases with 6 s silences between them: one window of the three, the silences left out
    (each phrase alone would be padded to 30 s); times in it map back to each phrase's own place."""
    from daemon.pipeline.vad import PACK_GAP_S, Window, speech_windows

    voice = whisper.load_audio(str(JFK))[: 3 * whisper.audio.SAMPLE_RATE]  # 3 s of JFK's speech
    gap = np.zeros(6 * whisper.audio.SAMPLE_RATE, dtype=np.float32)
    audio = np.concatenate([voice, gap, voice, gap, voice])
    [window] = speech_windows(audio, max_gap_s=3.0)
    assert len(window.pieces) == 3 and window.length < 16.0, window
    assert [round(a) for a, _ in window.pieces] == [0, 9, 18]
    # Apart, as before: without a gap limit, silences shorter than the window stay inside it.
    assert [len(w.pieces) for w in speech_windows(audio)] == [1]
    packed = Window(((10.0, 13.0), (20.0, 24.0)))
    assert packed.length == 7.0 + PACK_GAP_S
    assert packed.to_source(1.0) == 11.0 and packed.to_source(3.0 + PACK_GAP_S + 2.0) == 22.0
    assert packed.to_source(3.5, end=True) == 13.0 and packed.to_source(3.5) == 20.0  # inside the gap
    assert packed.to_source(99.0) == 24.0
    assert packed.span_to_source(3.2, 3.8) == (20.0, 20.0)  # wholly in the gap: a point, never reversed
    # A silence (1.9 s here, from speech to speech) no longer than the gap packing leaves stays inside the piece.
    short_gap = np.concatenate([voice, np.zeros(int(1.2 * whisper.audio.SAMPLE_RATE), dtype=np.float32), voice])
    assert [len(w.pieces) for w in speech_windows(short_gap, max_gap_s=1.0)] == [1]


THREADS_SCRIPT = """
import json, sys, threading
from pathlib import Path
import torch, whisper
from daemon.config import Rule
from daemon.models import ModelRegistry
from daemon.pipeline.batched import BatchedEngine
from daemon.pipeline.extract import Audio
from daemon.pipeline.probe import AudioStream
from daemon.pipeline.vad import speech_windows

jfk, fixture, model_dir, stream = sys.argv[1], sys.argv[2], sys.argv[3], AudioStream(**json.loads(sys.argv[4]))
registry = ModelRegistry(Path(model_dir), "cpu", torch_threads=2)
samples = whisper.load_audio(jfk)
seen = {}

def find_speech():  # a job finding its file's speech, on its own thread, as the daemon's workers do
    speech_windows(samples)
    seen["after_vad_same_thread"] = torch.get_num_threads()

def transcribe():  # a later job; a library it used set one thread, as silero-vad's import does
    torch.set_num_threads(1)
    rule = Rule.model_validate({"model": fixture, "engine": "batched", "temperature": 0, "beam_size": None,
                                "condition_on_previous_text": False, "sample_len": 8})
    model = registry.get(rule.model)
    model.encoder.register_forward_pre_hook(lambda *_: seen.setdefault("encoder", torch.get_num_threads()))
    BatchedEngine(registry).transcribe(Audio(samples=samples, offset_s=0.0, stream=stream), rule)

for job in (find_speech, transcribe):
    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
print(json.dumps(seen))
"""


def test_the_model_runs_on_the_configured_threads_whatever_a_library_set(tmp_path: Path) -> None:
    """`torch_threads: 2`: finding speech leaves the thread count alone (importing silero-vad sets 1
    for the whole process), and the engine takes its threads back from a library that changed them.
    Run in a fresh interpreter: the import's effect is process-wide and cannot be undone."""
    import dataclasses
    import json
    import subprocess
    import sys

    stream = json.dumps(dataclasses.asdict(STREAM))
    out = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(JFK), str(FIXTURE), str(tmp_path), stream],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {"after_vad_same_thread": 2, "encoder": 2}


def test_a_window_reaches_the_files_ends_across_short_silences_only() -> None:
    """Speech with 1.5 s of silence before and after: one window from the first sample to the last,
    as whisper would decode the file. After 5 s of silence (over skip_silence's 3 s) the window
    starts at the speech instead, as the sequential engine skips such a silence."""
    from daemon.pipeline.vad import speech_windows

    rate = whisper.audio.SAMPLE_RATE
    voice = whisper.load_audio(str(JFK))[: 3 * rate]
    short, long_ = np.zeros(int(1.5 * rate), dtype=np.float32), np.zeros(5 * rate, dtype=np.float32)
    [window] = speech_windows(np.concatenate([short, voice, short]), max_gap_s=3.0)
    assert window.pieces == ((0.0, 6.0),)
    [window] = speech_windows(np.concatenate([long_, voice, long_]), max_gap_s=3.0)
    assert 4.5 < window.start < 5.5 and 7.0 < window.end < 8.5, window  # not 0 and 13


def test_the_gatherer_batches_ready_jobs_and_keeps_waiting_ones_beating() -> None:
    """Three jobs asking at once share one batch; a job arriving during a batch waits for the next,
    reporting (its heartbeat) meanwhile, and a cancellation then takes it out of the queue.

    The decoding is a stand-in that records the batches (the real engine runs in test_daemon)."""
    import threading
    import time

    from daemon.errors import JobCancelled
    from daemon.pipeline.gather import BEAT_EVERY_S, BatchGatherer

    batches: list[int] = []

    def decode(items: Any) -> list[Any]:  # STAND-IN for BatchedEngine.transcribe_many
        batches.append(len(items))
        time.sleep(2.5 * BEAT_EVERY_S)
        return [f"text of {audio}" for audio, _, _ in items]

    gatherer = BatchGatherer(decode)
    gatherer.expected = lambda: 3
    results: dict[str, Any] = {}

    def ask(name: str, progress: Any = None) -> None:
        try:
            results[name] = gatherer.transcribe(name, None, progress)  # type: ignore[arg-type]
        except JobCancelled as err:
            results[name] = err

    first = [threading.Thread(target=ask, args=(n,)) for n in ("a", "b", "c")]
    for t in first:
        t.start()
    time.sleep(0.5)  # the batch of three runs now
    beats: list[float] = []
    late = threading.Thread(target=ask, args=("late", beats.append))

    def cancelled(_: float) -> None:
        raise JobCancelled("shutdown")

    gone = threading.Thread(target=ask, args=("gone", cancelled))
    late.start()
    gone.start()
    for t in (*first, late, gone):
        t.join(15)
    assert batches == [3, 1]  # a, b, c together; then late alone (gone left the queue)
    assert results["a"] == "text of a" and results["late"] == "text of late"
    assert isinstance(results["gone"], JobCancelled)
    assert beats and set(beats) == {0.0}  # it beat while it waited behind the first batch


def test_device_turns_go_in_arrival_order_and_pass_between_windows() -> None:
    """A job holding the device passes its turn only when others wait: they go in the order they
    asked, and the holder goes on after them; with nobody waiting it goes on at once."""
    import threading
    import time

    from daemon.pipeline.turns import DeviceTurns

    turns, order = DeviceTurns(), []
    with turns.hold():
        turns.pass_turn()  # nobody waits: no hand-over
        order.append("long window 1")

        def job(name: str) -> None:
            with turns.hold():
                order.append(name)

        waiting = []
        for name in ("request", "second request"):
            waiting.append(threading.Thread(target=job, args=(name,)))
            waiting[-1].start()
            while turns.waiting() < len(waiting):  # in this order
                time.sleep(0.001)
        turns.pass_turn()
        order.append("long window 2")
    for thread in waiting:
        thread.join(5)
    assert order == ["long window 1", "request", "second request", "long window 2"]
    assert turns.waiting() == 0


def test_a_job_waiting_for_the_device_beats_and_can_be_stopped() -> None:
    """A job waiting behind a long turn runs its heartbeat every second (the watchdog hears of it);
    a heartbeat that raises (a shutdown) stops the wait without taking anyone's turn, also while the
    holder waits to take its turn back after passing it."""
    import threading
    import time

    from daemon.errors import JobCancelled
    from daemon.pipeline.turns import DeviceTurns

    turns = DeviceTurns()
    beats: list[float] = []
    inside: list[str] = []

    def job(name: str, heartbeat: Any = None, hold_s: float = 0.0) -> None:
        with contextlib.suppress(JobCancelled), turns.hold(heartbeat=heartbeat):
            inside.append(name)
            time.sleep(hold_s)
            inside.append(f"{name} done")

    def stopped() -> None:
        raise JobCancelled("shutdown")

    with turns.hold():  # a long batch
        waiter = threading.Thread(target=job, args=("waiter", lambda: beats.append(time.monotonic())))
        quitter = threading.Thread(target=job, args=("quitter", stopped))
        waiter.start()
        quitter.start()
        time.sleep(2.6)
        assert len(beats) >= 2 and not inside  # beating, still waiting
        quitter.join(5)
        assert not quitter.is_alive()  # stopped waiting at its first heartbeat
    waiter.join(5)
    assert inside == ["waiter", "waiter done"]  # the quitter's ticket did not hold anyone up

    # The holder passes its turn to a long job, and is stopped while waiting to take it back.
    inside.clear()
    holder_stopped = threading.Event()

    def holder() -> None:
        with contextlib.suppress(JobCancelled), turns.hold(heartbeat=stopped):
            inside.append("holder")
            while turns.waiting() == 0:
                time.sleep(0.001)
            turns.pass_turn()
            inside.append("holder again")
        holder_stopped.set()

    first = threading.Thread(target=holder)
    first.start()
    while not inside:
        time.sleep(0.001)
    long_job = threading.Thread(target=job, args=("long", None, 2.0))
    long_job.start()
    assert holder_stopped.wait(5)
    after = threading.Thread(target=job, args=("after",))
    after.start()
    long_job.join(5)
    after.join(5)
    assert inside == ["holder", "long", "long done", "after", "after done"]  # nobody entered during "long"


@pytest.mark.parametrize("engine_name", ["sequential", "batched"])
def test_both_engines_report_a_waiting_job_alive(registry: ModelRegistry, tmp_path: Path, engine_name: str) -> None:
    """A file waiting for the device behind another job's long turn reports its progress (unchanged)
    every second, the worker's heartbeat, on either engine; then it is transcribed."""
    import threading
    import time

    audio = Recording(media.speech_wav(tmp_path / "p.wav", ENGLISH, voice=EN_VOICE), ENGLISH).audio()
    engine = WhisperEngine(registry)
    reports: list[float] = []
    done: dict[str, Transcript] = {}
    chosen = rule(FIXTURE, language="en", engine=engine_name, condition_on_previous_text=True,
                  sample_len=48) if engine_name == "sequential" else rule(FIXTURE, language="en")
    job = threading.Thread(target=lambda: done.update(t=engine.transcribe(audio, chosen, reports.append)))
    with engine.turns.hold():  # another job's long turn
        job.start()
        time.sleep(2.6)
        waited = list(reports)
    job.join(60)
    assert len(waited) >= 2 and set(waited) == {0.0}, waited
    assert reports[-1] == 1.0 and ENGLISH.lower().rstrip("?") in done["t"].text.lower()


def test_a_gpu_that_cannot_capture_graphs_decodes_the_same_tokens_kernel_by_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If a CUDA graph capture fails (an operation that GPU or torch cannot capture), the decoding
    goes on with the same steps run eagerly, says so once, and never tries again in this process.
    The capture is faked (this machine has no GPU): `_replay` raises as a failed capture does."""
    import torch
    from structlog.testing import capture_logs

    from daemon.models import graphed_decoder
    from daemon.models.attention import share_audio_keys
    from daemon.pipeline.batched import decode_batch

    model = share_audio_keys(whisper.load_model(str(FIXTURE), device="cpu"))
    tries = []

    def failing_capture(self: Any, rows: int, windows: int) -> Any:  # the fake GPU
        tries.append(rows)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed_decoder.StaticCacheInference, "_replay", failing_capture)
    monkeypatch.setattr(graphed_decoder, "_graphs_failed", False)
    real_init = graphed_decoder.StaticCacheInference.__init__

    def on_gpu(self: Any, *args: Any, graphs: bool) -> None:
        real_init(self, *args, graphs=True)  # as on CUDA

    monkeypatch.setattr(graphed_decoder.StaticCacheInference, "__init__", on_gpu)
    options = whisper.DecodingOptions(language="en", fp16=False, sample_len=24)
    with torch.inference_mode():
        features = model.embed_audio(torch.zeros(2, model.dims.n_mels, 3000) - 1.0)
        own = decode_batch(model, features, options, static_cache=False)
        with capture_logs() as logs:
            first = decode_batch(model, features, options, static_cache=True)
            second = decode_batch(model, features, options, static_cache=True)
    assert [r.tokens for r in first] == [r.tokens for r in second] == [r.tokens for r in own]
    assert len(tries) == 1  # tried once, then never again
    assert [e["event"] for e in logs] == ["cuda_graphs_unavailable"]


def test_whispers_transcribe_with_the_static_cache_steps_gives_the_same_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the registry gives every model the static-cache `decode`, so whisper's own
    `transcribe()` (the sequential engine: windows conditioned on the previous text, beams, the
    temperature fallback, word times) decodes each window with those steps. Run here eagerly on the
    trained test model, a 3-sentence file gives the same segments as whisper's own steps."""
    import functools

    import torch

    from daemon.models import graphed_decoder
    from daemon.models.attention import share_audio_keys

    phrases = [media.speech_wav(tmp_path / f"p{n}.wav", ENGLISH, voice=voice)
               for n, voice in enumerate((EN_VOICE, "en-us+f3", "en+m3"))]
    joined, _ = media.joined_with_silence(tmp_path / "joined.wav", phrases, gap_s=20.0)  # several windows
    audio = whisper.load_audio(str(joined))
    own = share_audio_keys(whisper.load_model(str(FIXTURE), device="cpu"))
    static = share_audio_keys(whisper.load_model(str(FIXTURE), device="cpu"))
    static.decode = functools.partial(graphed_decoder.decode, static)
    used = []
    monkeypatch.setattr(graphed_decoder, "uses_static_cache", lambda model: used.append(model) or True)
    for options in ({"beam_size": 5}, {"temperature": (0.0, 0.4, 0.8), "sample_len": 40}, {"word_timestamps": True}):
        torch.manual_seed(0)  # the fallback's sampling (the silent windows fail the checks): the same draws
        a = whisper.transcribe(own, audio, language="en", fp16=False, **options)
        torch.manual_seed(0)
        b = whisper.transcribe(static, audio, language="en", fp16=False, **options)
        assert [(s["start"], s["end"], s["tokens"]) for s in b["segments"]] == \
            [(s["start"], s["end"], s["tokens"]) for s in a["segments"]], options
        assert b["segments"][0].get("words") == a["segments"][0].get("words")
        assert ENGLISH.lower().rstrip("?") in b["text"].lower()
    assert used and all(model is static for model in used)  # the static steps did the decoding
