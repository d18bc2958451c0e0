"""Train a tiny whisper model on synthetic espeak-ng speech: a test fixture that really recognises.

No real weights can be downloaded in the test environment, and a random-weight checkpoint only
proves plumbing. This script synthesises a closed-set corpus (8 English and 8 French phrases, many
espeak-ng voices, variants, speeds and pitches, placed at random offsets, some over noise) plus
silence/noise clips, and trains a small ``whisper.model.Whisper`` (real multilingual vocabulary
and context sizes) to do what the daemon's tests need:

* transcribe English and French phrases, with segment timestamps;
* translate the French phrases (``<|translate|>``) into their English meaning;
* detect the language (en/fr) from the logits after ``<|startoftranscript|>``;
* say nothing for silence and noise: ``<|nospeech|>`` is the target at the SOT position (where
  whisper reads ``no_speech_prob``) and the first timestamp is random (so its log-probability is
  low and whisper's ``logprob_threshold`` guard skips the window), then end-of-text.

The checkpoint is whisper's own format (``{"dims": ..., "model_state_dict": ...}``, fp16 tensors),
so ``whisper.load_model(path)`` loads it unchanged. Everything is deterministic given ``--seed``
(and the thread count). At the end it reports accuracy through unmodified ``whisper.transcribe``
on held-out voices (espeak-ng variants never used in training).

Usage::

    python tools/train_test_model.py --out tests/fixtures/speech-tiny.pt [--steps N] [--seed S]
        [--threads T] [--max-minutes M] [--work /tmp/train]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from whisper.audio import HOP_LENGTH, N_FRAMES, SAMPLE_RATE
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import get_tokenizer

# The closed set of phrases. English ones are transcribed as is; French ones are transcribed in
# French or translated to their English meaning (distinct from every English phrase).
ENGLISH = [
    "Good morning everyone.",
    "The weather is cold today.",
    "Please open the window.",
    "My phone battery is dead.",
    "Where is the train station?",
    "Thank you very much.",
    "Turn off the lights.",
    "I like green apples.",
]
FRENCH = [
    ("Le chat dort sur le lit.", "The cat sleeps on the bed."),
    ("Il pleut beaucoup ici.", "It rains a lot here."),
    ("Je voudrais un café.", "I would like a coffee."),
    ("La porte est fermée.", "The door is closed."),
    ("Nous partons demain matin.", "We leave tomorrow morning."),
    ("Merci pour le cadeau.", "Thanks for the gift."),
    ("Mon frère est médecin.", "My brother is a doctor."),
    ("Où est la bibliothèque?", "Where is the library?"),
]

EN_BASES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
            "en-us-nyc"]
FR_BASES = ["fr-fr", "fr-be", "fr-ch"]
# espeak-ng variants (voice "+variant"). Held-out variants are never used in training.
TRAIN_VARIANTS = ["", "m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "croak", "klatt", "klatt2",
                  "klatt3", "Alex", "Andy", "Annie", "aunty", "boris", "david", "ed", "edward", "iven",
                  "john", "linda", "max", "michel", "paul", "quincy", "rob", "robert", "steph", "travis",
                  "victor", "zac", "grandma", "belinda", "benjamin", "norbert", "shelby"]
HELDOUT_VARIANTS = ["m7", "f4", "f5", "Mike", "klatt4", "caleb"]
SPEEDS = [120, 150, 175, 200]
PITCHES = [35, 50, 65]

TIME_PRECISION = 0.02  # seconds per timestamp token
MAX_INITIAL = 1.0  # whisper's default max_initial_timestamp: first timestamp is at most <|1.00|>


def log(msg: str) -> None:
    """Print one timestamped progress line (flushed, so a nohup log shows it at once)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def normalize(text: str) -> str:
    """Return text lowercased, punctuation stripped, whitespace collapsed (for exact-match scoring)."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


@dataclasses.dataclass
class Clip:
    """One synthesised utterance, 16 kHz mono float32, trimmed to its speech."""

    phrase: int  # index into ENGLISH, or len(ENGLISH) + index into FRENCH
    lang: str
    voice: str
    audio: np.ndarray


def synth(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """Return espeak-ng's rendering of text as 16 kHz float32 samples, silence trimmed off both ends."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-b", "1", "--stdin", "--stdout"],
        input=text.encode(), capture_output=True, check=True,
    ).stdout
    raw = subprocess.run(
        ["sox", "-t", "wav", "-", "-r", str(SAMPLE_RATE), "-t", "raw", "-e", "floating-point", "-b", "32",
         "-c", "1", "-"],
        input=wav, capture_output=True, check=True,
    ).stdout
    audio = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.02 * max(float(np.abs(audio).max()), 1e-6))
    if loud.size == 0:
        return audio
    start, end = max(0, loud[0] - 160), min(audio.size, loud[-1] + 160)
    return audio[start:end].copy()


def corpus(voices: list[tuple[str, str]], takes: list[tuple[int, int]], per_phrase: int, seed: int) -> list[Clip]:
    """Return every phrase of each (language, voice), said in per_phrase random (speed, pitch) takes."""
    rng = random.Random(seed)
    jobs = []
    for lang, voice in voices:
        texts = list(enumerate(ENGLISH)) if lang == "en" else [(len(ENGLISH) + i, f) for i, (f, _) in
                                                               enumerate(FRENCH)]
        for phrase, text in texts:
            for speed, pitch in rng.sample(takes, per_phrase):
                jobs.append((phrase, lang, voice, text, speed, pitch))
    with ThreadPoolExecutor(4) as pool:
        audios = list(pool.map(lambda j: synth(j[3], j[2], j[4], j[5]), jobs))
    return [Clip(j[0], j[1], j[2], a) for j, a in zip(jobs, audios, strict=True)]


def voice_list(variants: list[str]) -> list[tuple[str, str]]:
    """Return (language, espeak voice) for every base voice with every variant."""
    out = []
    for variant in variants:
        suffix = f"+{variant}" if variant else ""
        out += [("en", base + suffix) for base in EN_BASES]
        out += [("fr", base + suffix) for base in FR_BASES]
    return out


def features(audio: np.ndarray) -> torch.Tensor:
    """Return the (80, 3000) log-mel window exactly as whisper.transcribe builds its first window.

    transcribe computes the mel of audio + 30 s of zeros, takes the content frames of the window
    and pads the rest with zeros in log-mel space (pad_or_trim on the mel, not on the audio).
    """
    content = min(audio.size // HOP_LENGTH, N_FRAMES)
    padded = np.concatenate([audio, np.zeros(SAMPLE_RATE, dtype=np.float32)])
    mel = whisper.log_mel_spectrogram(torch.from_numpy(padded))[:, :content]
    return F.pad(mel, (0, N_FRAMES - content))


def noise(rng: random.Random, n: int) -> np.ndarray:
    """Return n samples of white, pink or brown noise with unit peak."""
    nrng = np.random.default_rng(rng.getrandbits(32))
    white = nrng.standard_normal(n).astype(np.float32)
    kind = rng.choice(["white", "white", "pink", "brown"])
    if kind == "brown":
        white = np.cumsum(white)
        white -= np.convolve(white, np.ones(801) / 801, mode="same")
    elif kind == "pink":
        spec = np.fft.rfft(white)
        spec /= np.sqrt(np.maximum(np.arange(spec.size), 1))
        white = np.fft.irfft(spec, n).astype(np.float32)
    return (white / max(float(np.abs(white).max()), 1e-6)).astype(np.float32)


@dataclasses.dataclass
class Example:
    """One training/eval window: features, the decoder input tokens and their targets."""

    mel: torch.Tensor
    tokens: list[int]
    targets: list[int]


class Builder:
    """Makes whisper-format token sequences and augmented audio windows."""

    def __init__(self) -> None:
        self.tok = get_tokenizer(multilingual=True, num_languages=99)
        self.sot = self.tok.sot
        self.eot = self.tok.eot
        self.lang = {"en": self.tok.to_language_token("en"), "fr": self.tok.to_language_token("fr")}
        self.task = {"transcribe": self.tok.transcribe, "translate": self.tok.translate}
        self.ts0 = self.tok.timestamp_begin
        self.text_cache: dict[str, list[int]] = {}

    def text(self, s: str) -> list[int]:
        """Return the tokens of ' ' + s (whisper's segments start with a space)."""
        if s not in self.text_cache:
            self.text_cache[s] = self.tok.encode(" " + s)
        return self.text_cache[s]

    def ts(self, seconds: float) -> int:
        """Return the timestamp token for seconds (on whisper's 20 ms grid)."""
        return self.ts0 + max(0, min(1500, round(seconds / TIME_PRECISION)))

    def sequence(self, first: int, lang: str, task: str, body: list[int]) -> tuple[list[int], list[int]]:
        """Return (input tokens, targets): targets[i] is what follows input[i]; -100 = no loss."""
        seq = [self.sot, self.lang[lang], self.task[task], *body, self.eot]
        targets = [first, -100, *seq[3:]]
        return seq[:-1], targets

    def speech(self, rng: random.Random, clip: Clip) -> Example:
        """Return an augmented window of one clip with its transcribe/translate target."""
        audio = clip.audio * rng.uniform(0.1, 0.9) / max(float(np.abs(clip.audio).max()), 1e-6)
        dur = audio.size / SAMPLE_RATE
        tail = rng.uniform(0.05, 3.0)
        room = max(0.0, 30.0 - dur - tail)
        r = rng.random()
        onset = rng.uniform(0, 0.4) if r < 0.4 else rng.uniform(0.4, 3.0) if r < 0.6 else rng.uniform(0, room)
        onset = min(onset, room)
        total = int((onset + dur + tail) * SAMPLE_RATE)
        buf = np.zeros(min(total, 30 * SAMPLE_RATE), dtype=np.float32)
        start = int(onset * SAMPLE_RATE)
        seg = audio[: buf.size - start]
        buf[start : start + seg.size] += seg
        if rng.random() < 0.3:
            snr_db = rng.uniform(8, 30)
            level = float(np.sqrt(np.mean(seg**2))) / (10 ** (snr_db / 20))
            buf += noise(rng, buf.size) * level * 3
        elif rng.random() < 0.3:
            buf += noise(rng, buf.size) * rng.uniform(1e-4, 3e-3)
        end = onset + seg.size / SAMPLE_RATE
        if clip.lang == "en":
            lang, text = "en", ENGLISH[clip.phrase]
            task = "translate" if rng.random() < 0.1 else "transcribe"
        else:
            french, english = FRENCH[clip.phrase - len(ENGLISH)]
            lang = "fr"
            task = "translate" if rng.random() < 0.5 else "transcribe"
            text = english if task == "translate" else french
        words = self.text(text)
        if rng.random() < 0.15:
            body = [self.tok.no_timestamps, *words]
        else:
            body = [self.ts(min(onset, MAX_INITIAL)), *words, self.ts(end)]
        tokens, targets = self.sequence(self.lang[lang], lang, task, body)
        return Example(features(buf), tokens, targets)

    def nothing(self, rng: random.Random) -> Example:
        """Return a silence or noise window: <|nospeech|> at SOT, a random first timestamp, then EOT."""
        n = int(rng.uniform(0.5, 30.0) * SAMPLE_RATE)
        r = rng.random()
        if r < 0.35:
            buf = np.zeros(n, dtype=np.float32)
            if rng.random() < 0.5:
                buf += noise(rng, n) * rng.uniform(1e-5, 1e-3)
        else:
            buf = noise(rng, n) * rng.uniform(0.01, 0.9)
        lang = rng.choice(["en", "fr"])
        task = rng.choice(["transcribe", "transcribe", "translate"])
        body = [self.ts(rng.randint(0, int(MAX_INITIAL / TIME_PRECISION)) * TIME_PRECISION)]
        tokens, targets = self.sequence(self.tok.no_speech, lang, task, body)
        return Example(features(buf), tokens, targets)


def collate(batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (mel batch, padded input tokens, padded targets)."""
    width = max(len(e.tokens) for e in batch)
    tokens = torch.full((len(batch), width), 0, dtype=torch.long)
    targets = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        tokens[i, : len(e.tokens)] = torch.tensor(e.tokens)
        targets[i, : len(e.targets)] = torch.tensor(e.targets)
    return torch.stack([e.mel for e in batch]), tokens, targets


def make_model(width: int, layers: int, heads: int, seed: int) -> Whisper:
    """Return a freshly initialised tiny whisper with the real multilingual vocabulary and contexts."""
    torch.manual_seed(seed)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=width, n_audio_head=heads,
                           n_audio_layer=layers, n_vocab=51865, n_text_ctx=448, n_text_state=width,
                           n_text_head=heads, n_text_layer=layers)
    model = Whisper(dims)
    with torch.no_grad():
        # whisper leaves the decoder's positional embedding uninitialised (torch.empty)
        model.decoder.positional_embedding.normal_(0, 0.01)
        model.decoder.token_embedding.weight.normal_(0, 0.02)
    return model


def save(model: Whisper, path: Path) -> None:
    """Write the model in whisper's checkpoint format with fp16 tensors."""
    state = {k: v.detach().half().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"dims": dataclasses.asdict(model.dims), "model_state_dict": state}, tmp)
    tmp.replace(path)


@torch.no_grad()
def quick_eval(model: Whisper, builder: Builder, evalset: list[tuple[torch.Tensor, str, str, str]]) -> str:
    """Return a one-line summary of greedy whisper.decode accuracy on a fixed held-out batch."""
    model.eval()
    ok = {"en": [0, 0], "fr": [0, 0], "tr": [0, 0], "lid": [0, 0]}
    mels = torch.stack([e[0] for e in evalset])
    _, probs = model.detect_language(mels, builder.tok)
    for (_, lang, task, _want), p in zip(evalset, probs, strict=True):
        key = "tr" if task == "translate" else lang
        ok["lid"][0] += max(p, key=p.get) == lang
        ok["lid"][1] += 1
        ok[key][1] += 1
    for task in ("transcribe", "translate"):
        for lang in ("en", "fr"):
            idx = [i for i, e in enumerate(evalset) if e[1] == lang and e[2] == task]
            if not idx:
                continue
            opts = whisper.DecodingOptions(task=task, language=lang, fp16=False, temperature=0.0)
            results = whisper.decode(model, mels[idx], opts)
            key = "tr" if task == "translate" else lang
            for i, res in zip(idx, results, strict=True):
                ok[key][0] += normalize(res.text) == normalize(evalset[i][3])
    model.train()
    return " ".join(f"{k}={a}/{n}" for k, (a, n) in ok.items())


def evaluate(model_path: Path, clips: list[Clip], work: Path, seed: int) -> dict[str, object]:
    """Return held-out accuracy through unmodified whisper.transcribe on the saved checkpoint."""
    model = whisper.load_model(str(model_path), device="cpu")
    rng = random.Random(seed + 7)
    opts = {"temperature": 0.0, "condition_on_previous_text": False, "fp16": False, "beam_size": None,
            "best_of": None, "verbose": None}
    score: dict[str, list[int]] = {"transcribe_en": [0, 0], "transcribe_fr": [0, 0], "translate_fr": [0, 0],
                                   "language_id": [0, 0], "offset_start_0.5s": [0, 0], "nothing_empty": [0, 0]}
    misses: list[str] = []

    def check(name: str, good: bool, detail: str) -> None:
        score[name][0] += bool(good)
        score[name][1] += 1
        if not good and len(misses) < 30:
            misses.append(f"{name}: {detail}")

    for clip in clips:
        lead = 0.3
        audio = np.concatenate([np.zeros(int(lead * SAMPLE_RATE), np.float32), clip.audio * 0.5,
                                np.zeros(SAMPLE_RATE, np.float32)])
        if clip.lang == "en":
            res = whisper.transcribe(model, audio, language="en", **opts)
            check("transcribe_en", normalize(res["text"]) == normalize(ENGLISH[clip.phrase]),
                  f"{clip.voice} {res['text']!r}")
            res = whisper.transcribe(model, audio, language=None, **opts)
            check("language_id", res["language"] == "en", f"{clip.voice} en->{res['language']}")
        else:
            french, english = FRENCH[clip.phrase - len(ENGLISH)]
            res = whisper.transcribe(model, audio, language="fr", **opts)
            check("transcribe_fr", normalize(res["text"]) == normalize(french), f"{clip.voice} {res['text']!r}")
            res = whisper.transcribe(model, audio, language="fr", task="translate", **opts)
            check("translate_fr", normalize(res["text"]) == normalize(english), f"{clip.voice} {res['text']!r}")
            res = whisper.transcribe(model, audio, language=None, **opts)
            check("language_id", res["language"] == "fr", f"{clip.voice} fr->{res['language']}")
    # Phrases late in the window: word timestamps move the cue start to the speech.
    for clip in clips[:: max(1, len(clips) // 12)]:
        onset = rng.uniform(3, 22)
        audio = np.concatenate([np.zeros(int(onset * SAMPLE_RATE), np.float32), clip.audio * 0.5,
                                np.zeros(SAMPLE_RATE // 2, np.float32)])
        res = whisper.transcribe(model, audio, language=clip.lang, word_timestamps=True, **opts)
        starts = [s["start"] for s in res["segments"] if s["text"].strip()]
        check("offset_start_0.5s", bool(starts) and abs(starts[0] - onset) <= 0.5,
              f"{clip.voice} onset {onset:.2f} starts {starts}")
    # Silence and noise with whisper's default guards.
    nrng = random.Random(seed + 11)
    for i in range(8):
        n = int(nrng.uniform(2, 25) * SAMPLE_RATE)
        audio = np.zeros(n, np.float32) if i % 2 == 0 else noise(nrng, n) * nrng.uniform(0.05, 0.5)
        res = whisper.transcribe(model, audio, language=None, temperature=0.0, fp16=False, verbose=None)
        check("nothing_empty", res["text"].strip() == "", f"{'silence' if i % 2 == 0 else 'noise'} "
              f"{res['text']!r}")
    summary: dict[str, object] = {k: f"{a}/{n} ({100 * a / max(n, 1):.1f}%)" for k, (a, n) in score.items()}
    summary["misses"] = misses
    return summary


def main(argv: list[str] | None = None) -> int:
    """Synthesise, train, save and evaluate; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=55.0, help="stop training after this long")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--takes", type=int, default=2, help="speed/pitch takes of each phrase per voice")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--work", type=Path, default=Path("/tmp/train"))
    ap.add_argument("--stop-at", type=int, default=0, help="stop at this step (the LR schedule still spans --steps)")
    ap.add_argument("--init", type=Path, help="start from this checkpoint's weights instead of random ones")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--french-share", type=float, default=0.0, help="share of speech examples in French "
                    "(0: as in the corpus, 3 of 11 voices)")
    ap.add_argument("--lang-weight", type=float, default=1.0, help="loss weight of the token after SOT "
                    "(language or no-speech)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the --out checkpoint")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    log("synthesising held-out corpus")
    heldout = corpus(voice_list(HELDOUT_VARIANTS)[::3], [(165, 50)], 1, args.seed + 2)
    if args.eval_only:
        log(json.dumps(evaluate(args.out, heldout, args.work, args.seed), indent=1))
        return 0
    log("synthesising training corpus")
    takes = [(s, p) for s in SPEEDS for p in PITCHES]
    train = corpus(voice_list(TRAIN_VARIANTS), takes, args.takes, args.seed + 3)
    train = [c for c in train if c.audio.size > SAMPLE_RATE // 4]
    log(f"{len(train)} training clips, {len(heldout)} held-out clips ({time.monotonic() - started:.0f} s)")

    builder = Builder()
    rng = random.Random(args.seed)
    evalset = []
    erng = random.Random(args.seed + 1)
    for clip in heldout[::4]:
        ex = builder.speech(erng, clip)
        if clip.lang == "en":
            evalset.append((ex.mel, "en", "transcribe", ENGLISH[clip.phrase]))
        else:
            french, english = FRENCH[clip.phrase - len(ENGLISH)]
            evalset.append((ex.mel, "fr", "transcribe", french))
            evalset.append((ex.mel, "fr", "translate", english))

    model = make_model(args.width, args.layers, args.heads, args.seed)
    if args.init is not None:
        model.load_state_dict(torch.load(args.init, map_location="cpu")["model_state_dict"])
        log(f"initialised from {args.init}")
    model.train()
    by_lang = {lang: [c for c in train if c.lang == lang] for lang in ("en", "fr")}
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, dims {model.dims}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = min(args.warmup, max(1, args.steps // 10))
    deadline = started + args.max_minutes * 60
    t_train = time.monotonic()
    ema = None
    step = 0
    for step in range(1, args.steps + 1):
        progress = step / args.steps
        lr = args.lr * min(1.0, step / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        if args.french_share > 0:
            batch = [builder.nothing(rng) if rng.random() < 0.1 else builder.speech(
                rng, rng.choice(by_lang["fr" if rng.random() < args.french_share else "en"]))
                for _ in range(args.batch)]
        else:
            batch = [builder.nothing(rng) if rng.random() < 0.1 else builder.speech(rng, rng.choice(train))
                     for _ in range(args.batch)]
        mel, tokens, targets = collate(batch)
        logits = model(mel, tokens)
        if args.lang_weight == 1.0:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        else:
            each = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
            weight = (targets != -100).float()
            weight[:, 0] *= args.lang_weight
            loss = (each * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0 or step == 1:
            per = (time.monotonic() - t_train) / step
            log(f"step {step} loss {loss.item():.3f} ema {ema:.3f} lr {lr:.2e} {per:.2f} s/step")
        if step % args.eval_every == 0:
            log(f"eval step {step}: {quick_eval(model, builder, evalset)}")
            save(model, args.out)
        if step == args.stop_at:
            log(f"stopping at step {step} (--stop-at)")
            break
        if time.monotonic() > deadline:
            log(f"time budget reached at step {step}")
            break
    minutes = (time.monotonic() - started) / 60
    save(model, args.out)
    log(f"trained {step} steps in {minutes:.1f} min; saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    log(f"final quick eval: {quick_eval(model, builder, evalset)}")
    log("held-out evaluation through whisper.transcribe:")
    torch.set_num_threads(1)
    log(json.dumps(evaluate(args.out, heldout, args.work, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
