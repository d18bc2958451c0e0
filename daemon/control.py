"""A running job's stop button and pulse, shared by the worker, the pipeline stages and the service.

Stages call `check()` between units of work (every poll of ffmpeg, every whisper window): it
records a heartbeat and raises JobCancelled once a stop was asked for. The service pings systemd's
watchdog only while the heartbeat is fresh, so a hung worker, not just a hung main thread, gets
the process restarted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from daemon.errors import JobCancelled

KEEPALIVE_EVERY_S = 1.0


class JobControl:
    """Cancellation and liveness for the worker thread."""

    def __init__(self) -> None:
        self._cancel = threading.Event()  # the process stops: every job from now on
        self._drop = threading.Event()  # the running job's client cancelled it: this job alone
        self.last_beat = time.monotonic()

    @property
    def cancelled(self) -> bool:
        """Return True once a stop was asked for."""
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the running job to stop at its next check (the process stops: it goes back to the queue)."""
        self._cancel.set()

    @property
    def dropped(self) -> bool:
        """Return True when the running job's client cancelled it (it ends; it is not queued again)."""
        return self._drop.is_set()

    def drop_job(self) -> None:
        """Ask the running job to stop at its next check and end, cancelled by its client."""
        self._drop.set()

    def next_job(self) -> None:
        """Forget a cancellation of the job before (a process stop stays)."""
        self._drop.clear()

    def beat(self) -> None:
        """Record that the worker is making progress."""
        self.last_beat = time.monotonic()

    def check(self) -> None:
        """Record a heartbeat; raise JobCancelled if a stop was asked for."""
        self.beat()
        if self._cancel.is_set() or self._drop.is_set():
            raise JobCancelled("the job was cancelled")

    @contextlib.contextmanager
    def keepalive(self) -> Iterator[None]:
        """Beat on a side thread during one long step with no checks of its own (a model download)."""
        done = threading.Event()

        def pulse() -> None:
            while not done.wait(KEEPALIVE_EVERY_S):
                self.beat()

        thread = threading.Thread(target=pulse, name="keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.beat()


class Isolation:
    """Lets jobs run side by side, except one that must run alone (it crashed whisperd before).

    `shared()` admits any number of jobs while none runs alone; `alone()` waits until every other
    job has finished and keeps new ones out meanwhile. Waiting callers keep beating.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._alone = False

    @contextlib.contextmanager
    def shared(self, beat: Callable[[], None]) -> Iterator[None]:
        """Run a job beside others (waits while one runs alone)."""
        with self._cond:
            while self._alone:
                beat()
                self._cond.wait(0.25)
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self, beat: Callable[[], None]) -> Iterator[None]:
        """Run a job with nothing else in flight (waits for the others to finish)."""
        with self._cond:
            while self._alone or self._active:
                beat()
                self._cond.wait(0.25)
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()
