"""A clock for tests: time moves only when the test says, or when nothing else can run.

Give it to an app (``App(..., clock=FakeClock())``) and start
:meth:`FakeClock.autojump` beside the app: whenever every task is blocked
(:func:`anyio.wait_all_tasks_blocked`), time jumps to the earliest deadline
anyone sleeps until, as trio's ``MockClock(autojump_threshold=0)`` does. A
test of many batch intervals then runs as fast as the code, with the same
timings on a loaded machine as on an idle one. Handlers that should *take*
time call :meth:`FakeClock.sleep`.

Tasks blocked on real I/O (a write-ahead log's fsync on a worker thread) count
as blocked: time may jump while they wait, as it would on a slow disk.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math

import anyio
import anyio.lowlevel

__all__ = ["FakeClock"]


class FakeClock:
    """A :class:`~streamlet.clock.Clock` that a test moves.

    Args:
        start: its monotonic time at first.
        wall: the wall-clock time at monotonic ``0`` (so ``time()`` is
            ``wall + monotonic()``).
    """

    def __init__(self, *, start: float = 0.0, wall: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall = wall
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._wall + self._now

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of this clock's time."""
        await self.sleep_until(self._now + seconds)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        if deadline == math.inf:
            await anyio.sleep_forever()
        woken = anyio.Event()
        entry = (deadline, next(self._order), woken)
        heapq.heappush(self._sleepers, entry)
        try:
            await woken.wait()
        finally:
            if not woken.is_set():  # cancelled: forget the deadline
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)

    async def wait(self, event: anyio.Event, deadline: float) -> None:
        if event.is_set():
            await anyio.lowlevel.checkpoint()
            return
        async with anyio.create_task_group() as group:

            async def until_deadline() -> None:
                await self.sleep_until(deadline)
                group.cancel_scope.cancel()

            group.start_soon(until_deadline)
            await event.wait()
            group.cancel_scope.cancel()

    @property
    def next_deadline(self) -> float:
        """The earliest deadline anyone sleeps until (inf: nobody sleeps)."""
        return self._sleepers[0][0] if self._sleepers else math.inf

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking every sleeper whose deadline passed."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back: advance({seconds})")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            heapq.heappop(self._sleepers)[2].set()

    async def autojump(self) -> None:
        """Jump to the next deadline whenever every task is blocked; runs until cancelled.

        Start it in the test's task group, beside the app.
        """
        while True:
            await _all_tasks_blocked()
            if self._sleepers:
                self.advance(max(0.0, self.next_deadline - self._now))
            else:
                # Everyone waits on something other than this clock (a
                # thread, a socket): give it real time to happen.
                await anyio.sleep(0.001)


async def _all_tasks_blocked() -> None:
    """Return once every other task of the loop waits on something.

    :func:`anyio.wait_all_tasks_blocked` sleeps a tenth of a second each
    time it finds a task runnable, which would make every jump of a busy
    app cost that much real time. This yields to the loop instead, and
    only after many tries (tasks woken by threads or real timers) sleeps a
    little. It reads asyncio's per-task ``_fut_waiter`` as anyio does.
    """
    this = asyncio.current_task()
    tries = 0
    while True:
        await asyncio.sleep(0 if tries < 100 else 0.0005)
        tries += 1
        for task in asyncio.all_tasks():
            if task is this:
                continue
            waiter = getattr(task, "_fut_waiter", None)
            if waiter is None or waiter.done():
                break
        else:
            return
