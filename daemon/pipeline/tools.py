"""How a stage runs ffmpeg or ffprobe on a file, and whose fault a failure is.

A timeout, or a tool that did not run or was killed by a signal, says nothing about the file:
transient. A tool that ran and refused the file: permanent, with the stage's own reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from daemon import proc
from daemon.control import JobControl
from daemon.errors import MediaError, ToolError, TransientError


def run_on_file(
    argv: Sequence[str],
    *,
    path: Path,
    stage: str,
    timeout_s: float,
    control: JobControl | None,
    reason: Callable[[ToolError], str],
) -> proc.Completed:
    """Return the tool's output; raise TransientError or MediaError (reason(err)) naming file and stage."""
    try:
        return proc.run(argv, timeout_s=timeout_s, control=control)
    except ToolError as err:  # ToolTimeout included: it is abnormal
        if err.abnormal:
            raise TransientError.from_tool(str(err), err, path=path, stage=stage) from err
        raise MediaError.from_tool(reason(err), err, path=path, stage=stage) from err
