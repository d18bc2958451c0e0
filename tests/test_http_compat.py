"""The HTTP API as other programs call it: the official openai client on a real pretrained model,
the first whisperd's /recognise, and schemathesis driving every route from the OpenAPI schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pysubs2
import pytest
from conftest import MediaSet, Pretrained
from daemon_harness import Daemon
from http_harness import Client, api_daemon, free_port
from test_real_speech import FIXTURES, GREEDY, JFK, JFK_TEXT, SPEECHBRAIN, word_error_rate, words

from daemon.journal import JobState

pytestmark = pytest.mark.slow

TOKEN = "compat-token"
SMALL_DOG, BIRCH = FIXTURES / "small_dog.wav", FIXTURES / "birch_canoe.wav"  # ~3 s each: fast on a CPU
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")  # the CLI beside this interpreter


def _daemon(root: Path, model: Path, top: dict[str, object] | None = None, **defaults: object) -> tuple[Daemon, str]:
    """Start a daemon with the API on a free port and one token; return it and its listen address."""
    (root / "tokens").write_text(f"{TOKEN}\n")
    listen = f"127.0.0.1:{free_port()}"
    daemon = api_daemon(root, model, {"listen": listen, "tokens_file": str(root / "tokens"), "max_upload": "4M"})
    daemon.data["defaults"] |= defaults
    daemon.data |= top or {}
    daemon.write_config(daemon.data)
    return daemon.start(), listen


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, pretrained: Pretrained) -> Iterator[tuple[Daemon, str]]:
    """A daemon on OpenAI's multilingual base, greedy (fast and deterministic), whisper's own guards."""
    root = tmp_path_factory.mktemp("compat-base")
    guards = {"no_speech_threshold": 0.6, "logprob_threshold": -1.0, "compression_ratio_threshold": 2.4}
    # api_daemon's sample_len 8 suits the random test model only: base must say a whole sentence.
    daemon, listen = _daemon(root, pretrained.base, {"model_dir": str(pretrained.model_dir)},  # conversion cache
                             **GREEDY, **guards, sample_len=None)
    yield daemon, listen
    assert daemon.stop() == 0


@pytest.fixture
def client(base: tuple[Daemon, str]) -> openai.OpenAI:
    """The official openai client pointed at the daemon, with its token as the API key."""
    return openai.OpenAI(base_url=f"http://{base[1]}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def test_openai_client_transcribes_jfk_to_the_sentence(client: openai.OpenAI) -> None:
    """client.audio.transcriptions.create on jfk.flac gives the reference sentence, word for word."""
    with JFK.open("rb") as audio:
        answer = client.audio.transcriptions.create(model="whisper-1", file=audio)
    assert word_error_rate(JFK_TEXT, answer.text) == 0, answer.text


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_openai_client_subtitles_parse_with_cues_in_order(client: openai.OpenAI, fmt: str) -> None:
    """srt and vtt come back as subtitles a parser reads: cues with text, in order, within the 11 s, the
    sentence's words in them."""
    with JFK.open("rb") as audio:
        body = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format=fmt)
    assert isinstance(body, str)
    subs = pysubs2.SSAFile.from_string(body, format_=fmt)
    assert len(subs) >= 1 and all(cue.plaintext.strip() for cue in subs)
    times = [(cue.start, cue.end) for cue in subs]
    assert all(start < end for start, end in times) and times == sorted(times), times
    assert all(end <= times[i + 1][0] for i, (_, end) in enumerate(times[:-1])), times
    assert times[-1][1] <= 11_100, times  # jfk.flac lasts 11.0 s
    assert word_error_rate(JFK_TEXT, " ".join(cue.plaintext for cue in subs)) == 0, body


def test_openai_client_verbose_json_is_its_typed_object(client: openai.OpenAI) -> None:
    """verbose_json parses into TranscriptionVerbose: language 'english', the duration, segments with every
    field OpenAI's have, no words unless asked for."""
    with JFK.open("rb") as audio:
        answer = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json")
    assert isinstance(answer, openai.types.audio.TranscriptionVerbose)
    assert answer.language == "english" and 10.5 < answer.duration < 11.5, answer
    assert answer.segments and answer.words is None
    assert word_error_rate(JFK_TEXT, answer.text) == 0, answer.text
    for i, segment in enumerate(answer.segments):
        # The client builds the object without validation: check each field has OpenAI's type.
        checked = openai.types.audio.TranscriptionSegment.model_validate(segment.model_dump())
        assert checked.id == i and 0 <= checked.start < checked.end <= 11.1 and checked.tokens
        assert set(segment.model_dump()) == set(openai.types.audio.TranscriptionSegment.model_fields)


def test_openai_client_word_timestamps(client: openai.OpenAI) -> None:
    """timestamp_granularities=["word", "segment"] gives both: words without spaces, in order, timed inside
    the audio, "Americans" where it is said (about 1.6-2.2 s), and the segments."""
    with JFK.open("rb") as audio:
        answer = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json",
                                                    timestamp_granularities=["word", "segment"])
    assert answer.words and answer.segments, answer
    assert all(w.word and w.word == w.word.strip() for w in answer.words), answer.words
    assert words(" ".join(w.word for w in answer.words)) == words(JFK_TEXT)
    starts = [w.start for w in answer.words]
    assert starts == sorted(starts) and all(w.start <= w.end <= 11.1 for w in answer.words), answer.words
    [americans] = [w for w in answer.words if w.word.strip(",") == "Americans"]
    assert 1.3 <= americans.start < americans.end <= 2.4, americans


# openai 3.57 marks translations.create deprecated (OpenAI's endpoint is): clients still call it.
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_openai_client_translation(client: openai.OpenAI) -> None:
    """client.audio.translations.create answers English (English speech stays itself), and verbose_json
    parses into TranslationVerbose naming 'english'."""
    with SMALL_DOG.open("rb") as audio:
        answer = client.audio.translations.create(model="whisper-1", file=audio, response_format="verbose_json")
    assert isinstance(answer, openai.types.audio.TranslationVerbose)
    assert answer.language == "english" and answer.segments and answer.duration > 2
    assert word_error_rate(SPEECHBRAIN[SMALL_DOG.name], answer.text) == 0, answer.text


def test_openai_client_sees_a_wrong_token_as_authentication_error(base: tuple[Daemon, str]) -> None:
    """A wrong API key is the client's AuthenticationError (401), with whisperd's reason as its message."""
    wrong = openai.OpenAI(base_url=f"http://{base[1]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err, JFK.open("rb") as audio:
        wrong.audio.transcriptions.create(model="whisper-1", file=audio)
    assert "Bearer" in err.value.message


def test_recognise_returns_whispers_json(base: tuple[Daemon, str]) -> None:
    """POST /recognise (multipart `file`) answers whisper's result: text, language code, segments with
    whisper's fields."""
    status, body = Client(base[1], TOKEN).upload("/recognise", BIRCH)
    assert status == 200, body
    result = json.loads(body)
    assert result["language"] == "en", result
    assert word_error_rate(SPEECHBRAIN[BIRCH.name], result["text"]) == 0, result
    assert result["segments"] and {"id", "seek", "start", "end", "text", "tokens", "avg_logprob",
                                   "no_speech_prob"} <= set(result["segments"][0])


def test_bazarr_asks_the_language_then_srt_on_raw_pcm(base: tuple[Daemon, str], tmp_path: Path) -> None:
    """Bazarr's calls, as its whisperai provider makes them (raw 16-bit 16 kHz mono PCM as `audio_file`),
    on the real base model: /detect-language?encode=false answers en, and
    /asr?...&output=srt&encode=false an srt whose cues hold the sentence."""
    pcm = tmp_path / "audio.pcm"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(SMALL_DOG), "-f", "s16le", "-ac", "1", "-ar", "16000",
                    str(pcm)], check=True)
    client = Client(base[1], TOKEN)
    status, body = client.upload("/detect-language?encode=false", pcm, name="audio_file")
    assert status == 200 and json.loads(body) == {"detected_language": "english", "language_code": "en"}, body
    status, body = client.upload("/asr?task=transcribe&language=en&output=srt&encode=false", pcm, name="audio_file")
    assert status == 200, body
    cues = pysubs2.SSAFile.from_string(body.decode(), format_="srt")
    assert cues and word_error_rate(SPEECHBRAIN[SMALL_DOG.name], " ".join(c.plaintext for c in cues)) == 0, body


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[tuple[Daemon, str]]:
    """A daemon on the tiny random test model with fast decoding: for schemathesis's many requests."""
    daemon, listen = _daemon(tmp_path_factory.mktemp("compat-fast"), checkpoint)
    yield daemon, listen
    assert daemon.stop() == 0


def test_word_granularity_alone_gives_words_and_no_segments(fast: tuple[Daemon, str], media_set: MediaSet) -> None:
    """timestamp_granularities=["word"] alone answers `words` and no `segments`, as OpenAI does; with none
    given, segments and no words. (The random test model's words are noise: only the shape counts.)"""
    client = openai.OpenAI(base_url=f"http://{fast[1]}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    with media_set.speech_wav.open("rb") as audio:
        answer = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json",
                                                    timestamp_granularities=["word"])
    assert answer.words is not None and answer.segments is None, answer
    with media_set.speech_wav.open("rb") as audio:
        answer = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json")
    assert answer.words is None and answer.segments is not None, answer


def test_no_route_answers_a_server_error_to_what_its_schema_allows(
    fast: tuple[Daemon, str], media_set: MediaSet
) -> None:
    """schemathesis sends requests generated from /openapi.json to every route: none answers 5xx.

    Nothing is excluded. Uploads carry generated bytes (not media: 400) or, in some requests that fit
    the schema, real speech (tests/schemathesis_hooks.py), so generated options reach whisper too.
    """
    # The CLI, as an operator would run it: its own process, its report on failure. The seed makes a
    # failure reproducible; the database off keeps a run from replaying another run's cases.
    # --max-examples bounds the fuzzing phase; the coverage phase (boundary values of every field) runs whole.
    argv = [str(SCHEMATHESIS), "run", f"http://{fast[1]}/openapi.json", "--checks", "not_a_server_error",
            "--header", f"Authorization: Bearer {TOKEN}", "--max-examples", "5", "--seed", "14",
            "--workers", "1", "--generation-database", "none", "--request-timeout", "60", "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("schemathesis_hooks.py")),
           "WHISPERD_FUZZ_AUDIO": str(media_set.speech_wav)}
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=fast[0].root, env=env)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # Every operation of the schema was tested (a schema it could not read would test nothing).
    status, _, body = Client(fast[1], TOKEN).request("GET", "/openapi.json")
    operations = sum(len(methods) for methods in json.loads(body)["paths"].values())
    assert status == 200 and operations >= 7 and f"Tested: {operations}\n" in run.stdout, run.stdout[-6000:]
    # The real audio reached whisper: the API's jobs include transcriptions that were done.
    done = [j for j in fast[0].jobs() if j.folder == "_api" and j.state == JobState.DONE]
    assert len(done) >= 10, len(done)  # some 35 with this seed, most of them /asr's raw PCM (any bytes are audio)
