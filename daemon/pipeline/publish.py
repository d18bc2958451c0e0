"""Writers (txt, srt, vtt, tsv, json) into a target directory, each file atomically.

The formats are whisper's own writers, so srt and vtt match what whisper's CLI writes for the
same result and layout options; only the file handling differs (temp name, fsync, rename).
"""

from __future__ import annotations

import contextlib
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from whisper.utils import WriteJSON, WriteSRT, WriteTSV, WriteTXT, WriteVTT

from daemon.config import Rule
from daemon.crashpoints import crash_point
from daemon.errors import TransientError
from daemon.fsutil import Place, atomic_write_text, unlink
from daemon.pipeline.transcribe import Transcript

STAGE = "publish"

WRITERS = {"txt": WriteTXT, "srt": WriteSRT, "vtt": WriteVTT, "tsv": WriteTSV, "json": WriteJSON}


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


def publish(transcript: Transcript, rule: Rule, target_dir: Path | Place, stem: str) -> tuple[Path, ...]:
    """Return the paths written: every requested format, never a partial file visible.

    A place below the outbox is reached without following links. An unwritable or full outbox,
    or a link planted in it, is a TransientError: the file is fine, the outbox may recover.
    """
    result = transcript.to_whisper_result()
    options = layout_options(rule)
    written = []
    try:
        for fmt, name in output_names(rule, stem, transcript.language).items():
            writer = WRITERS[fmt](output_dir=".")  # whisper's writers want a folder; ours write to a handle
            target = _target(target_dir, name)

            def write(handle: TextIO, writer: Any = writer) -> None:
                writer.write_result(result, file=handle, options=options)

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
