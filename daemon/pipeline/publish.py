"""Writers (txt, srt, vtt, tsv, json) into a target directory, each file atomically.

The formats are whisper's own writers, so srt and vtt match what whisper's CLI writes for the
same result and layout options; only the file handling differs (temp name, fsync, rename), and
the timed formats (srt, vtt, tsv) get only cues a viewer accepts: each with text, inside the
audio, in order, none overlapping the next, each lasting at least a millisecond
(`viewable_cues`). whisper returns empty segments, segments that end past the audio, and runs of
words timed at one instant; players and the WebVTT standard refuse cues made of those. The json
output stays whisper's result as it is.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from whisper.utils import WriteJSON, WriteSRT, WriteTSV, WriteTXT, WriteVTT, format_timestamp

from daemon.config import Rule
from daemon.crashpoints import crash_point
from daemon.errors import TransientError
from daemon.fsutil import Place, atomic_write_text, unlink
from daemon.pipeline.transcribe import Transcript

STAGE = "publish"

MIN_SHOWN_MS = 500  # how long a cue whisper timed at zero length is shown, room permitting

Cue = tuple[int, int, str]  # start and end in milliseconds (what the formats print), text


def _plain(text: str) -> str:
    return re.sub(r"</?u>", "", text).strip()


def viewable_cues(cues: Iterable[Cue], end_ms: int | None) -> list[Cue]:
    """Return the cues a viewer accepts: each with text, inside the audio, in order, none
    overlapping the next, each lasting at least a millisecond.

    A cue past the end of the audio (whisper's text over its padding) is dropped and one that runs
    past it is cut there. Cues starting at the same instant share the time up to where the last of
    them (or the next cue) ends, in order, so no text is lost; a cue of zero length with room after
    it is shown for up to MIN_SHOWN_MS.
    """
    ordered = sorted((c for c in cues if _plain(c[2])), key=lambda c: c[0])  # stable: whisper's order on ties
    if end_ms is not None:
        ordered = [(max(0, s), min(e, end_ms), t) for s, e, t in ordered if s < end_ms]
    shown: list[Cue] = []
    i = 0
    while i < len(ordered):
        start = max(ordered[i][0], 0)
        j = i
        while j < len(ordered) and ordered[j][0] <= start:  # the cues starting at this instant
            j += 1
        together, i = ordered[i:j], j
        following = ordered[i][0] if i < len(ordered) else None
        ceiling = min([t for t in (following, end_ms) if t is not None], default=None)
        end = max(e for _, e, _ in together)
        if end <= start:  # zero length: give it time, as far as the next cue or the end allow
            end = start + MIN_SHOWN_MS
        if ceiling is not None:
            end = min(end, ceiling)
        if end - start < len(together):  # no millisecond for each: one cue for the lot
            texts = list(dict.fromkeys(_plain(t) for _, _, t in together))
            together, end = [(start, end, "\n".join(texts))], max(end, start + 1)
        step = (end - start) / len(together)
        for n, (_, _, text) in enumerate(together):
            shown.append((start + round(n * step), start + round((n + 1) * step), text))
    return shown


class _Viewable:
    """Makes one of whisper's subtitle writers print only cues a viewer accepts (`viewable_cues`)."""

    always_include_hours: bool
    decimal_marker: str

    def __init__(self, end_s: float | None) -> None:
        self.end_ms = round(end_s * 1000) if end_s is not None else None

    def format_timestamp(self, seconds: float) -> int:
        # whisper's iterate_result times each cue with this: keep milliseconds, print them later.
        return round(seconds * 1000)

    def _text(self, ms: int) -> str:
        return str(format_timestamp(ms / 1000, self.always_include_hours, self.decimal_marker))

    def cues(self, result: dict[str, Any], options: dict[str, Any]) -> list[Cue]:
        """Return the cues whisper's writer makes of the result, made viewable."""
        made = self.iterate_result(result, options)  # type: ignore[attr-defined]
        return viewable_cues(made, self.end_ms)


# whisper ships no type information, so its writer classes are Any to mypy.
class ViewableSRT(_Viewable, WriteSRT):  # type: ignore[misc]
    """whisper's srt writer, printing only cues a viewer accepts."""

    def __init__(self, end_s: float | None) -> None:
        WriteSRT.__init__(self, output_dir=".")
        _Viewable.__init__(self, end_s)

    def write_result(self, result: dict[str, Any], file: TextIO, options: dict[str, Any] | None = None,
                     **kwargs: Any) -> None:  # fmt: skip
        for i, (start, end, text) in enumerate(self.cues(result, options or {}), start=1):
            print(f"{i}\n{self._text(start)} --> {self._text(end)}\n{text}\n", file=file, flush=True)


class ViewableVTT(_Viewable, WriteVTT):  # type: ignore[misc]
    """whisper's vtt writer, printing only cues a viewer accepts."""

    def __init__(self, end_s: float | None) -> None:
        WriteVTT.__init__(self, output_dir=".")
        _Viewable.__init__(self, end_s)

    def write_result(self, result: dict[str, Any], file: TextIO, options: dict[str, Any] | None = None,
                     **kwargs: Any) -> None:  # fmt: skip
        print("WEBVTT\n", file=file)
        for start, end, text in self.cues(result, options or {}):
            print(f"{self._text(start)} --> {self._text(end)}\n{text}\n", file=file, flush=True)


class ViewableTSV(WriteTSV):  # type: ignore[misc]
    """whisper's tsv writer, its rows timed like the subtitles' cues."""

    def __init__(self, end_s: float | None) -> None:
        super().__init__(output_dir=".")
        self.end_ms = round(end_s * 1000) if end_s is not None else None

    def write_result(self, result: dict[str, Any], file: TextIO, options: dict[str, Any] | None = None,
                     **kwargs: Any) -> None:  # fmt: skip
        rows = [(round(s["start"] * 1000), round(s["end"] * 1000), s["text"].strip()) for s in result["segments"]]
        print("start", "end", "text", sep="\t", file=file)
        for start, end, text in viewable_cues(rows, self.end_ms):
            print(start, end, text.replace("\t", " ").replace("\n", " "), sep="\t", file=file, flush=True)


def _writer(fmt: str, end_s: float | None) -> Any:
    timed = {"srt": ViewableSRT, "vtt": ViewableVTT, "tsv": ViewableTSV}
    return timed[fmt](end_s) if fmt in timed else {"txt": WriteTXT, "json": WriteJSON}[fmt](output_dir=".")


def _with_text(result: dict[str, Any]) -> dict[str, Any]:
    """Return whisper's result without segments and words that have no text (whisper's writers would
    make empty cues of them)."""
    segments = []
    for segment in result["segments"]:
        if not segment["text"].strip():
            continue
        if "words" in segment:
            segment = {**segment, "words": [w for w in segment["words"] if w["word"].strip()]}
            if not segment["words"]:
                continue
        segments.append(segment)
    return {**result, "segments": segments}


def output_names(rule: Rule, stem: str, language: str) -> dict[str, str]:
    """Return the file name of each requested format, from the rule's name template (within 255 bytes)."""
    return {fmt: rule.output_filename(stem, fmt, language) for fmt in rule.output_formats}


def _target(target_dir: Path | Place, name: str) -> Place:
    if isinstance(target_dir, Place):
        return target_dir.child(name)
    return Place(target_dir, PurePosixPath(name))  # a folder named on the command line: trusted


def layout_options(rule: Rule) -> dict[str, object]:
    """Return the subtitle layout options in the form whisper's writers take."""
    return {
        "max_line_width": rule.max_line_width,
        "max_line_count": rule.max_line_count,
        "highlight_words": rule.highlight_words,
        "max_words_per_line": rule.max_words_per_line,
    }


def publish(
    transcript: Transcript, rule: Rule, target_dir: Path | Place, stem: str, *, end_s: float | None = None
) -> tuple[Path, ...]:
    """Return the paths written: every requested format, never a partial file visible.

    `end_s` is where the audio ends on the file's timeline: no cue is shown past it. A place
    below the outbox is reached without following links. An unwritable or full outbox, or a
    link planted in it, is a TransientError: the file is fine, the outbox may recover.
    """
    result = transcript.to_whisper_result()
    options = layout_options(rule)
    written = []
    try:
        for fmt, name in output_names(rule, stem, transcript.language).items():
            writer = _writer(fmt, end_s)  # whisper's writers want a folder; ours write to a handle
            target = _target(target_dir, name)
            shown = result if fmt == "json" else _with_text(result)  # whisper's json: as whisper returned it

            def write(handle: TextIO, writer: Any = writer, shown: dict[str, Any] = shown) -> None:
                writer.write_result(shown, file=handle, options=options)

            atomic_write_text(target, write)
            written.append(target.path)
            crash_point("output")
    except OSError as err:
        for path in written:  # all or nothing: a full disk must not leave half a set of outputs
            with contextlib.suppress(OSError):
                unlink(_target(target_dir, path.name))
        where = target_dir.display if isinstance(target_dir, Place) else target_dir
        raise TransientError(f"cannot write outputs to {where}: {err.strerror or err}", stage=STAGE) from err
    return tuple(written)
