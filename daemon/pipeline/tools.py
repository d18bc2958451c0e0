"""How a stage runs ffmpeg or ffprobe on a file, and whose fault a failure is.

A timeout, or a tool that did not run or was killed by a signal, says nothing about the file:
transient. A tool that ran and refused the file: permanent, with the stage's own reason.

Inputs are containers, never playlists: the tools open a file only with a demuxer from
INPUT_FORMATS, so HLS and other playlists, concat lists, image sequences and subtitle files
(formats that name other files to open) are refused before anything else is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from daemon import proc
from daemon.control import JobControl
from daemon.errors import MediaError, ToolError, TransientError
from daemon.pipeline.source import Source

# ffmpeg's demuxer names for what users drop: mov covers mp4, m4a, 3gp, 3g2 and mj2, matroska covers
# webm, asf covers wmv and wma, mpeg covers mpg and vob. None of these opens a second file.
INPUT_FORMATS = (
    "mov", "matroska", "mp3", "wav", "w64", "flac", "ogg", "aac", "mpegts", "avi", "asf", "flv", "caf",
    "aiff", "amr", "ac3", "eac3", "dts", "truehd", "wv", "ape", "tta", "au", "mpeg", "rm", "xwma", "dsf",
    "voc",
)  # fmt: skip
MAX_STREAMS = 64  # more streams than any recording has; a file claiming thousands is refused
TOOL_LIMITS = proc.Limits()
_NOT_ALLOWED = re.compile(r"\[(\w+) @ [^]]*\] Format not on whitelist")


def input_args(source: Source) -> tuple[str, ...]:
    """Return the input options and the input itself, for ffprobe's and ffmpeg's argv."""
    return (
        "-protocol_whitelist", "file",
        "-format_whitelist", ",".join(INPUT_FORMATS),
        "-max_streams", str(MAX_STREAMS),
        "-i", source.url,
    )  # fmt: skip


def refused_format(err: ToolError) -> str | None:
    """Return why a tool refused to open the input, when the format allow-list did; else None."""
    match = _NOT_ALLOWED.search(err.stderr_tail)
    if match is None:
        return None
    return (f"refused: a {match.group(1)} file; whisperd opens only media containers (mp4, mkv, mov, webm, "
            "mp3, m4a, wav, flac, ogg, …), because formats such as playlists (hls), concat lists, image "
            "sequences and subtitles open other files")


def run_on_file(
    argv: Sequence[str],
    *,
    source: Source,
    stage: str,
    timeout_s: float,
    control: JobControl | None,
    reason: Callable[[ToolError], str],
    limits: proc.Limits = TOOL_LIMITS,
) -> proc.Completed:
    """Return the tool's output; raise TransientError or MediaError (reason(err)) naming file and stage.

    The tool inherits the source's descriptor and runs under `limits`.
    """
    try:
        return proc.run(argv, timeout_s=timeout_s, control=control, limits=limits, pass_fds=(source.fd,))
    except ToolError as err:  # ToolTimeout included: it is abnormal
        if err.abnormal:
            raise TransientError.from_tool(str(err), err, path=source.display, stage=stage) from err
        why = refused_format(err) or reason(err)
        raise MediaError.from_tool(why, err, path=source.display, stage=stage) from err
