"""The model's device, shared by the jobs in flight: one job's work at a time, in turns.

A job holds the device for a turn, and between two windows (the sequential engine) or two batches
of windows (the batched engine) passes it on when another job is waiting, queueing again behind
it. So a request to the HTTP API is answered after at most one window of a long folder file, not
after the whole file, and jobs in flight share the device window by window. Turns are taken in
arrival order (tickets): nobody waits forever, and with nobody waiting a turn costs nothing.

A job waiting for its turn still beats (`hold(heartbeat=…)`, every BEAT_EVERY_S): the turn ahead may
be a batch that takes minutes (large models on a CPU), and a worker silent that long would stop the
systemd watchdog's pings. The heartbeat is also where a waiting job's cancellation is raised.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

BEAT_EVERY_S = 1.0  # how often a job waiting for its turn beats


class DeviceTurns:
    """One holder at a time; `pass_turn` hands the device to the jobs waiting, then takes it back.

    `on_take` runs in the job's thread each time it gets the device (the registry's torch threads).
    """

    def __init__(self, on_take: Callable[[], None] = lambda: None) -> None:
        self._on_take = on_take
        self._cond = threading.Condition()
        self._next_ticket = 0  # the ticket the next job to ask gets
        self._serving = 0  # the ticket that holds the device
        self._abandoned: set[int] = set()  # tickets whose jobs stopped waiting (interrupted)
        self._local = threading.local()  # the holding thread's heartbeat, for its pass_turn waits too

    @contextlib.contextmanager
    def hold(self, heartbeat: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the device for the block, after the jobs that asked before; `heartbeat` runs every
        BEAT_EVERY_S while this thread waits (here and in `pass_turn`), and may raise to stop waiting."""
        outer = getattr(self._local, "heartbeat", None), getattr(self._local, "held", False)
        self._local.heartbeat, self._local.held = heartbeat, False
        try:
            self._take()
            self._local.held = True
            yield
        finally:
            if self._local.held:  # not when pass_turn's wait to take it back was stopped
                self._give()
            self._local.heartbeat, self._local.held = outer

    def pass_turn(self) -> None:
        """Between two windows: let the jobs waiting now go first, then go on (at once if none waits)."""
        with self._cond:
            if self._next_ticket - self._serving - len(self._abandoned) <= 1:
                return
        self._give()
        self._local.held = False
        self._take()
        self._local.held = True

    def waiting(self) -> int:
        """Return how many jobs wait for the device."""
        with self._cond:
            return max(self._next_ticket - self._serving - len(self._abandoned) - 1, 0)

    def _take(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            heartbeat = getattr(self._local, "heartbeat", None)
            next_beat = time.monotonic() + BEAT_EVERY_S
            try:
                while self._serving != ticket:
                    self._cond.wait(max(next_beat - time.monotonic(), 0.0) if heartbeat else None)
                    if heartbeat is not None and time.monotonic() >= next_beat:
                        next_beat = time.monotonic() + BEAT_EVERY_S
                        heartbeat()  # still alive behind a long turn (the lock is reentrant: it may ask waiting())
            except BaseException:
                # Interrupted while waiting: the turn must not be lost to everyone behind it.
                if self._serving == ticket:
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                raise
        try:
            self._on_take()
        except BaseException:
            self._give()
            raise

    def _give(self) -> None:
        with self._cond:
            self._advance()

    def _advance(self) -> None:
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.remove(self._serving)
            self._serving += 1
        self._cond.notify_all()
