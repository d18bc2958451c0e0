"""Several jobs, one batch: the batched engine takes the files of every job that is ready at once.

With `jobs_in_flight` above 1 the daemon runs that many jobs side by side: each prepares its file
(claim, take, probe, extract) on its own thread, so the CPU work on the next files overlaps the
model's work on this one, and then asks for its transcript here. The first caller to find nobody
decoding becomes the leader: it waits a moment for the other busy jobs to arrive (never longer
than `linger_s`), takes every request waiting by then, and runs them through
`BatchedEngine.transcribe_many`, so windows of several files share each batch. The others block
until their transcript (or the batch's error) is handed to them. Every job keeps its own
crash-safe steps; only the decoding is shared.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from daemon.config import Rule
from daemon.pipeline.extract import Audio
from daemon.pipeline.transcribe import Progress, Transcript

log = structlog.get_logger(__name__)

LINGER_S = 1.0  # how long a leader waits for busy jobs still preparing their files (ffmpeg on a busy CPU)
BEAT_EVERY_S = 1.0  # a job waiting behind another batch reports (heartbeat, cancellation) this often


@dataclass(eq=False)
class _Request:
    audio: Audio
    rule: Rule
    progress: Progress | None
    transcript: Transcript | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class BatchGatherer:
    """Coalesces concurrent `transcribe` calls into `transcribe_many` batches."""

    def __init__(
        self,
        transcribe_many: Callable[[list[tuple[Audio, Rule, Progress | None]]], list[Transcript]],
        linger_s: float = LINGER_S,
    ) -> None:
        self._transcribe_many = transcribe_many
        self.linger_s = linger_s
        # How many jobs may still ask (the daemon's busy workers); 1 means nobody else: no waiting.
        self.expected: Callable[[], int] = lambda: 1
        self._cond = threading.Condition()
        self._waiting: list[_Request] = []
        self._leading = False

    def transcribe(self, audio: Audio, rule: Rule, progress: Progress | None = None) -> Transcript:
        """Return this file's transcript, decoded in a batch with whatever other jobs are ready."""
        request = _Request(audio, rule, progress)
        with self._cond:
            self._waiting.append(request)
            self._cond.notify_all()
            deadline = time.monotonic() + self.linger_s
            next_beat = time.monotonic() + BEAT_EVERY_S
            while not request.done:
                if not self._leading and (len(self._waiting) >= self.expected() or time.monotonic() >= deadline):
                    batch, self._waiting, self._leading = self._waiting, [], True
                    break
                left = deadline - time.monotonic()
                # Until the deadline, short waits; after it, only a batch ending (it notifies) changes
                # anything: no need to spin at 200 Hz behind a batch that takes minutes.
                self._cond.wait(max(min(left, 0.05), 0.005) if left > 0 else 0.25)
                if progress is not None and time.monotonic() >= next_beat:
                    # Waiting behind another batch: still this job's heartbeat, and where a shutdown
                    # cancels it (a request not yet taken leaves the queue; a taken one is ignored).
                    next_beat = time.monotonic() + BEAT_EVERY_S
                    try:
                        progress(0.0)
                    except BaseException:
                        if request in self._waiting:
                            self._waiting.remove(request)
                        raise
            else:
                return self._result(request)
        self._lead(batch)
        return self._result(request)

    def _lead(self, batch: list[_Request]) -> None:
        if len(batch) > 1:
            log.info("batch_gathered", files=len(batch))
        try:
            transcripts = self._transcribe_many([(r.audio, r.rule, r.progress) for r in batch])
        except BaseException as err:  # every file of the batch gets the batch's error (and retries alone)
            for request in batch:
                request.error = err
        else:
            for request, transcript in zip(batch, transcripts, strict=True):
                request.transcript = transcript
        with self._cond:
            for request in batch:
                request.done = True
            self._leading = False
            self._cond.notify_all()

    @staticmethod
    def _result(request: _Request) -> Transcript:
        if request.error is not None:
            raise request.error
        assert request.transcript is not None
        return request.transcript
