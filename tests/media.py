"""Make small, real test media files with ffmpeg (lavfi sources) and espeak-ng.

Every maker takes the output path, creates the parent directory if needed,
overwrites any existing file, and returns the path as a ``Path``. All external
tools run through argv lists (never a shell) with ``check=True``, so a failure
raises ``subprocess.CalledProcessError`` whose ``stderr`` says why.

Files are kept tiny so tests stay fast: video is 64x64 at 5 fps, audio is a
few seconds long. Container and codecs follow the suffix:

* ``.mp4``: H.264 (libx264 ultrafast) video + AAC audio.
* ``.mkv``: H.264 (libx264 ultrafast) video + Opus audio (Opus is what real
  downloaded .mkv/.webm files usually carry, and it exercises resampling from
  48 kHz in the decoder under test). Opus pre-skip makes Matroska report
  small non-zero start times even without a delay: video 0.007 s, audio
  -0.003 s. Container audio is always encoded at 48 kHz.

Audio-only formats for :func:`audio_file`: ``.wav`` (PCM s16), ``.flac``,
``.mp3`` (libmp3lame), ``.m4a`` (AAC), ``.ogg`` (Vorbis).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

# Common leading ffmpeg options: never read stdin (would hang or eat the test
# runner's input), only print real errors, always overwrite.
_FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]

# Tiny video: small frame and low rate keep encoding at a few ms per second.
_VIDEO_SIZE = "64x64"
_VIDEO_RATE = 5

_VIDEO_CODEC = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
_AUDIO_CODEC_FOR_CONTAINER = {
    ".mp4": ["-c:a", "aac", "-b:a", "64k", "-ar", "48000"],
    ".mkv": ["-c:a", "libopus", "-b:a", "32k", "-ar", "48000"],
}
_AUDIO_CODEC_FOR_FILE = {
    ".wav": ["-c:a", "pcm_s16le"],
    ".flac": ["-c:a", "flac"],
    ".mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
    ".m4a": ["-c:a", "aac", "-b:a", "64k"],
    ".ogg": ["-c:a", "libvorbis", "-q:a", "2"],
}

# A paragraph a user might plausibly have saved with the wrong extension.
_TEXT_PARAGRAPH = """\
# Meeting notes

This file is plain text that merely has a media file's name.
A transcription daemon should reject it cleanly, without crashing,
and report that it contains no decodable audio.
"""


def _run(argv: list[str], *, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Return the finished process for ``argv``; raise CalledProcessError on failure."""
    return subprocess.run(argv, check=True, capture_output=True, text=True, input=input_text)


def _prepare(path: Path) -> Path:
    """Return ``path`` as a Path, with its parent directory created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _container_audio_codec(path: Path) -> list[str]:
    """Return the ffmpeg audio-codec options for a video container chosen by suffix."""
    try:
        return _AUDIO_CODEC_FOR_CONTAINER[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"unsupported video container {path.suffix!r}; use .mp4 or .mkv") from None


def _color_source(seconds: float) -> list[str]:
    """Return ffmpeg input options for a black 64x64 lavfi video lasting ``seconds``."""
    return [
        "-f",
        "lavfi",
        "-i",
        f"color=c=black:s={_VIDEO_SIZE}:r={_VIDEO_RATE}:d={seconds:.3f}",
    ]


def ffprobe_streams(path: Path) -> list[dict[str, Any]]:
    """Return ffprobe's ``streams`` list (one dict per stream) for ``path``."""
    out = _run(
        [
            "ffprobe",
            "-hide_banner",
            "-loglevel",
            "error",
            "-show_streams",
            "-of",
            "json",
            str(path),
        ]
    ).stdout
    streams: list[dict[str, Any]] = json.loads(out).get("streams", [])
    return streams


def media_duration(path: Path) -> float:
    """Return the container duration of ``path`` in seconds, as ffprobe reports it."""
    out = _run(
        [
            "ffprobe",
            "-hide_banner",
            "-loglevel",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "json",
            str(path),
        ]
    ).stdout
    return float(json.loads(out)["format"]["duration"])


def speech_wav(path: Path, text: str, *, voice: str = "en", speed: int = 160) -> Path:
    """Return ``path`` after writing ``text`` spoken by espeak-ng (mono 22050 Hz WAV)."""
    path = _prepare(path)
    # Text goes through stdin, not argv: espeak-ng would treat a leading "-"
    # as an option, and "-b 1" makes non-ASCII text (French, German) UTF-8.
    _run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-b", "1", "--stdin", "-w", str(path)],
        input_text=text,
    )
    return path


def tone_wav(path: Path, *, freq: float = 440, seconds: float = 3.0, rate: int = 16000) -> Path:
    """Return ``path`` after writing a mono sine tone WAV."""
    path = _prepare(path)
    _run(
        [
            *_FFMPEG,
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency={freq}:sample_rate={rate}:duration={seconds}",
            "-ac",
            "1",
            "-c:a",
            "pcm_s16le",
            str(path),
        ]
    )
    return path


def silence_wav(path: Path, *, seconds: float = 3.0) -> Path:
    """Return ``path`` after writing a mono 16 kHz WAV of digital silence."""
    path = _prepare(path)
    _run(
        [
            *_FFMPEG,
            "-f",
            "lavfi",
            "-i",
            "anullsrc=channel_layout=mono:sample_rate=16000",
            "-t",
            str(seconds),
            "-c:a",
            "pcm_s16le",
            str(path),
        ]
    )
    return path


def noise_wav(path: Path, *, seconds: float = 3.0, amplitude: float = 0.3) -> Path:
    """Return ``path`` after writing a mono 16 kHz WAV of white noise."""
    path = _prepare(path)
    # Fixed seed so the "random" noise is the same file on every run.
    _run(
        [
            *_FFMPEG,
            "-f",
            "lavfi",
            "-i",
            f"anoisesrc=color=white:sample_rate=16000:amplitude={amplitude}"
            f":duration={seconds}:seed=1",
            "-c:a",
            "pcm_s16le",
            str(path),
        ]
    )
    return path


def video_with_audio(path: Path, audio: Path, *, language: str | None = None) -> Path:
    """Return ``path`` after muxing a tiny video with ``audio`` as its one audio stream.

    The container (.mp4 or .mkv) is chosen from the suffix; when ``language``
    is given (an ISO 639-2 code such as "eng") the audio stream is tagged with it.
    """
    path = _prepare(path)
    seconds = media_duration(audio)
    argv = [
        *_FFMPEG,
        *_color_source(seconds),
        "-i",
        str(audio),
        "-map",
        "0:v:0",
        "-map",
        "1:a:0",
        *_VIDEO_CODEC,
        *_container_audio_codec(path),
        # The video is already sized to the audio; -shortest guards against
        # encoder padding making one stream outlast the other.
        "-shortest",
    ]
    if language is not None:
        argv += ["-metadata:s:a:0", f"language={language}"]
    _run([*argv, str(path)])
    return path


def video_with_tracks(path: Path, tracks: list[tuple[Path, str]]) -> Path:
    """Return ``path`` after muxing a video stream plus an audio stream per (audio, language).

    Audio streams appear in the order given, each tagged with its language,
    e.g. ``[(eng_wav, "eng"), (fra_wav, "fra")]``. The video lasts as long as
    the longest track.
    """
    if not tracks:
        raise ValueError("video_with_tracks needs at least one (audio, language) track")
    path = _prepare(path)
    seconds = max(media_duration(audio) for audio, _ in tracks)
    argv = [*_FFMPEG, *_color_source(seconds)]
    for audio, _ in tracks:
        argv += ["-i", str(audio)]
    argv += ["-map", "0:v:0"]
    for index in range(len(tracks)):
        argv += ["-map", f"{index + 1}:a:0"]
    argv += [*_VIDEO_CODEC, *_container_audio_codec(path)]
    for index, (_, language) in enumerate(tracks):
        argv += [f"-metadata:s:a:{index}", f"language={language}"]
    _run([*argv, str(path)])
    return path


def video_with_delayed_audio(path: Path, audio: Path, *, delay_s: float = 2.0) -> Path:
    """Return ``path`` after muxing a video from 0 s with ``audio`` starting at ``delay_s`` s.

    The delay is applied with ``-itsoffset`` on the audio input, so it is
    carried as a stream start time (not as inserted silence), and both
    containers carry it: ffprobe reports video ``start_time`` 0.000 and audio
    ``start_time`` a little under ``delay_s``, because the encoder's priming
    samples are taken off (for 2.0 s: 1.978 in .mp4, AAC's 1024 samples at
    48 kHz; 1.987-1.991 in .mkv, Opus pre-skip rounded to Matroska's 1 ms).
    The video covers delay + audio.

    Beware: ``whisper.load_audio`` (plain ``ffmpeg -i F -f s16le ...``) drops
    the leading gap and returns only the audio's own length, so its
    timestamps come out ``delay_s`` early. ``-af aresample=async=1:first_pts=0``
    on that decode fills the gap with silence (then it returns delay + audio).
    """
    path = _prepare(path)
    seconds = delay_s + media_duration(audio)
    _run(
        [
            *_FFMPEG,
            *_color_source(seconds),
            "-itsoffset",
            str(delay_s),
            "-i",
            str(audio),
            "-map",
            "0:v:0",
            "-map",
            "1:a:0",
            *_VIDEO_CODEC,
            *_container_audio_codec(path),
            str(path),
        ]
    )
    return path


def video_without_audio(path: Path, *, seconds: float = 2.0) -> Path:
    """Return ``path`` after writing a tiny video that has no audio stream at all."""
    path = _prepare(path)
    _container_audio_codec(path)  # only validates the suffix
    _run([*_FFMPEG, *_color_source(seconds), "-map", "0:v:0", *_VIDEO_CODEC, "-an", str(path)])
    return path


def text_as_media(path: Path) -> Path:
    """Return ``path`` after writing a plain-text paragraph under a media name (e.g. notes.mp4)."""
    path = _prepare(path)
    path.write_text(_TEXT_PARAGRAPH, encoding="utf-8")
    return path


def zero_byte(path: Path) -> Path:
    """Return ``path`` after creating it as an empty (0-byte) file."""
    path = _prepare(path)
    path.write_bytes(b"")
    return path


def audio_file(path: Path, audio: Path) -> Path:
    """Return ``path`` after transcoding ``audio`` to the format its suffix implies.

    Supported suffixes: .wav, .flac, .mp3, .m4a, .ogg.
    """
    path = _prepare(path)
    try:
        codec = _AUDIO_CODEC_FOR_FILE[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"unsupported audio suffix {path.suffix!r}") from None
    _run([*_FFMPEG, "-i", str(audio), "-map", "0:a:0", "-vn", *codec, str(path)])
    return path


def joined_with_silence(path: Path, parts: list[Path], *, gap_s: float = 4.0) -> tuple[Path, list[float]]:
    """Return ``path`` after writing ``parts`` one after another with ``gap_s`` of silence between them
    (mono 16 kHz WAV), and the second at which each part starts."""
    path = _prepare(path)
    inputs: list[str] = []
    chain: list[str] = []
    starts: list[float] = []
    at = 0.0
    for n, part in enumerate(parts):
        inputs += ["-i", str(part)]
        chain.append(f"[{n}]aresample=16000,aformat=channel_layouts=mono[p{n}]")
        starts.append(round(at, 3))
        at += media_duration(part) + gap_s
    silence = len(parts)
    inputs += ["-f", "lavfi", "-t", str(gap_s), "-i", "anullsrc=r=16000:cl=mono"]
    gaps = len(parts) - 1
    chain.append(f"[{silence}]asplit={gaps}" + "".join(f"[g{n}]" for n in range(gaps)) if gaps > 1
                 else f"[{silence}]anull[g0]")
    order = "".join(f"[p{n}]" + (f"[g{n}]" if n < gaps else "") for n in range(len(parts)))
    chain.append(f"{order}concat=n={len(parts) + gaps}:v=0:a=1")
    _run([*_FFMPEG, *inputs, "-filter_complex", ";".join(chain), "-c:a", "pcm_s16le", str(path)])
    return path, starts
