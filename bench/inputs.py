"""The benchmark's audio: real recordings with their reference texts, and generated speech whose text is known.

Real recordings are read where they lie (`--audio-dir`, the shared folder), never copied into the
repository; their reference texts come from the table in that folder's README.md. Generated files
are espeak-ng speech of Harvard sentences (IEEE 1969 "Recommended Practice for Speech Quality
Measurements", public domain), several voices and speeds, with silence, hiss and noise between
phrases, in wav, flac, mp3 and ogg. Everything generated is a pure function of its index (seeded
noise), made once into a cache folder and reused.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE = 16000

# Harvard sentences, lists 1-6 (IEEE 1969; public domain). "The birch canoe…" is left out: it
# is one of the real recordings.
SENTENCES = (
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.",
    "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.",
    "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.",
    "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.",
    "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.",
    "What joy there is in living.",
    "A king ruled the state in the early days.",
    "The ship was torn apart on the sharp reef.",
    "Sickness kept him home the third week.",
    "The wide road shimmered in the hot sun.",
    "The lazy cow lay in the cool grass.",
    "Lift the square stone over the fence.",
    "The rope will bind the seven books at once.",
    "Hop over the fence and plunge in.",
    "The friendly gang left the drug store.",
    "Mesh wire keeps chicks inside.",
    "The frosty air passed through the coat.",
    "The crooked maze failed to fool the mouse.",
    "Adding fast leads to wrong sums.",
    "The show was a flop from the very start.",
    "A saw is a tool used for making boards.",
    "The wagon moved on well oiled wheels.",
    "March the soldiers past the next hill.",
    "A cup of sugar makes sweet fudge.",
    "Place a rosebush near the porch steps.",
    "Both lost their lives in the raging storm.",
)
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-x-rp", "en-us+m3", "en-gb-scotland", "en-029", "en-us+f2")
FORMATS = ("wav", "flac", "mp3", "ogg")


@dataclass(frozen=True)
class Item:
    """One input file, its reference text and its length."""

    path: Path
    reference: str
    duration_s: float
    origin: str  # 'real' or 'espeak-ng'

    def to_dict(self) -> dict[str, object]:
        """Return the item as plain data, for the JSON report."""
        return {"file": str(self.path), "reference": self.reference, "duration_s": round(self.duration_s, 3),
                "origin": self.origin}


def references_from_readme(readme: Path) -> dict[str, str]:
    """Return file name → reference text from the shared audio folder's README table."""
    found = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (name := re.fullmatch(r"`([^`]+)`", cells[0])):
            found[name.group(1)] = cells[2]
    return found


def duration_s(path: Path) -> float:
    """Return a media file's duration in seconds, as ffprobe reads it."""
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)["format"]["duration"])


def real_items(audio_dir: Path) -> list[Item]:
    """Return the real recordings in audio_dir that its README gives a reference text for."""
    references = references_from_readme(audio_dir / "README.md")
    return [Item(audio_dir / name, text, duration_s(audio_dir / name), "real")
            for name, text in sorted(references.items()) if (audio_dir / name).is_file()]


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """Return espeak-ng's speech of text as 16 kHz mono float32 samples."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    # espeak-ng writes 22.05 kHz; ffmpeg resamples (soxr would do as well; ffmpeg is what the daemon needs).
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", "pipe:0", "-ac", "1", "-ar", str(RATE),
                          "-f", "s16le", "pipe:1"], input=wav, capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def gap(rng: np.random.Generator, kind: str, seconds: float) -> np.ndarray:
    """Return a pause between phrases: near-silence, a hiss, or louder noise (a fan, a crowd)."""
    n = int(seconds * RATE)
    level = {"silence": 1e-4, "hiss": 10 ** (-50 / 20), "noise": 10 ** (-32 / 20)}[kind]
    return (rng.standard_normal(n) * level).astype(np.float32)


def assemble(rng: np.random.Generator, phrases: list[np.ndarray], gaps: list[tuple[str, float]],
             background_db: float | None) -> np.ndarray:
    """Return phrases joined by the given gaps, with a lead-in and tail, under an optional background hiss."""
    parts = [gap(rng, "silence", float(rng.uniform(0.2, 0.8)))]
    for i, phrase in enumerate(phrases):
        parts.append(phrase)
        if i < len(gaps):
            parts.append(gap(rng, *gaps[i]))
    parts.append(gap(rng, "silence", float(rng.uniform(0.2, 0.8))))
    audio = np.concatenate(parts)
    if background_db is not None:
        audio = audio + (rng.standard_normal(audio.size) * 10 ** (background_db / 20)).astype(np.float32)
    return np.clip(audio, -1.0, 1.0)


def encode(samples: np.ndarray, target: Path) -> None:
    """Write samples as the format target's suffix names (ffmpeg for everything but wav)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    tmp = target.with_name(f".{target.name}.tmp{target.suffix}")
    if target.suffix == ".wav":
        tmp.write_bytes(buffer.getvalue())
    else:
        codec = {".flac": ["-c:a", "flac"], ".mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
                 ".ogg": ["-c:a", "libopus", "-b:a", "32k"]}[target.suffix]
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "wav", "-i", "pipe:0", *codec, str(tmp)],
                       input=buffer.getvalue(), check=True)
    tmp.replace(target)


def _generate(target: Path, seed: int, sentence_ids: list[int], long_gaps: bool) -> Item:
    rng = np.random.default_rng(seed)
    voice = VOICES[seed % len(VOICES)]
    speed = int(rng.integers(140, 185))
    texts = [SENTENCES[i % len(SENTENCES)] for i in sentence_ids]
    phrases = [speak(text, voice, speed) for text in texts]
    kinds = ("silence", "hiss", "noise")
    gaps = [(kinds[int(rng.integers(3))], float(rng.uniform(0.4, 4.5 if long_gaps else 1.8)))
            for _ in phrases[1:]]
    background = None if seed % 3 == 0 else float(rng.uniform(-55, -42))
    encode(assemble(rng, phrases, gaps, background), target)
    return Item(target, " ".join(texts), duration_s(target), "espeak-ng")


def _cached(cache: Path, name: str) -> Item | None:
    """Return the item made earlier under this name, if its file is still there."""
    meta = cache / f"{name}.json"
    if meta.is_file():
        data = json.loads(meta.read_text())
        path = cache / data["file"]
        if path.is_file():
            return Item(path, data["reference"], data["duration_s"], data["origin"])
    return None


def generated_items(cache: Path, count: int, *, long_count: int = 0, long_minutes: float = 3.0) -> tuple[
        list[Item], list[Item]]:
    """Return `count` short generated files (2-3 sentences each) and `long_count` long ones, made once in cache."""
    cache.mkdir(parents=True, exist_ok=True)
    short, long = [], []
    for i in range(count):
        name = f"speech-{i:02d}"
        item = _cached(cache, name)
        if item is None:
            first = (i * 3) % len(SENTENCES)
            ids = list(range(first, first + 2 + i % 2))
            item = _generate(cache / f"{name}.{FORMATS[i % len(FORMATS)]}", seed=i, sentence_ids=ids, long_gaps=False)
            _remember(cache, name, item)
        short.append(item)
    for i in range(long_count):
        name = f"long-{i:02d}-{long_minutes:g}min"
        item = _cached(cache, name)
        if item is None:
            # About 5 s a sentence with its pause; some pauses pass whisperd's 3 s skip_silence.
            n = max(2, round(long_minutes * 60 / 5.0))
            ids = [(17 * i + 7 * k) % len(SENTENCES) for k in range(n)]
            item = _generate(cache / f"{name}.{('flac', 'mp3')[i % 2]}", seed=100 + i, sentence_ids=ids,
                             long_gaps=True)
            _remember(cache, name, item)
        long.append(item)
    return short, long


def _remember(cache: Path, name: str, item: Item) -> None:
    data = {**item.to_dict(), "file": item.path.name}
    (cache / f"{name}.json").write_text(json.dumps(data, indent=1))
