"""Writers (txt, srt, vtt, tsv, json) into a target directory, each file atomically.

The formats are whisper's own writers, so srt and vtt match what whisper's CLI writes for the
same result and layout options; only the file handling differs (temp name, fsync, rename).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from whisper.utils import WriteJSON, WriteSRT, WriteTSV, WriteTXT, WriteVTT

from daemon.config import Rule
from daemon.errors import TransientError
from daemon.fsutil import atomic_write_text
from daemon.pipeline.transcribe import Transcript

STAGE = "publish"

WRITERS = {"txt": WriteTXT, "srt": WriteSRT, "vtt": WriteVTT, "tsv": WriteTSV, "json": WriteJSON}


def output_names(rule: Rule, stem: str, language: str) -> dict[str, str]:
    """Return the file name of each requested format, from the rule's name template."""
    return {fmt: rule.output_filename(stem, fmt, language) for fmt in rule.output_formats}


def layout_options(rule: Rule) -> dict[str, object]:
    """Return the subtitle layout options in the form whisper's writers take."""
    return {
        "max_line_width": rule.max_line_width,
        "max_line_count": rule.max_line_count,
        "highlight_words": rule.highlight_words,
        "max_words_per_line": rule.max_words_per_line,
    }


def publish(transcript: Transcript, rule: Rule, target_dir: Path, stem: str) -> tuple[Path, ...]:
    """Return the paths written: every requested format, never a partial file visible.

    An unwritable or full outbox is a TransientError: the file is fine, the outbox may recover.
    """
    result = transcript.to_whisper_result()
    options = layout_options(rule)
    written = []
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        for fmt, name in output_names(rule, stem, transcript.language).items():
            writer = WRITERS[fmt](output_dir=str(target_dir))
            target = target_dir / name

            def write(handle: TextIO, writer: Any = writer) -> None:
                writer.write_result(result, file=handle, options=options)

            atomic_write_text(target, write)
            written.append(target)
    except OSError as err:
        raise TransientError(
            f"cannot write outputs to {target_dir}: {err.strerror or err}", stage=STAGE
        ) from err
    return tuple(written)
