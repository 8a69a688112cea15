"""The clock the engine reads and sleeps on, injected so that tests can own time.

The scheduler's ticks, its batch timings (which feed backpressure), the block
generator's cuts and rate limit, and the checkpointer's interval all read
time through a :class:`Clock`. :data:`SYSTEM_CLOCK` is the real one.
:class:`streamlet.testing.clock.FakeClock` is a clock that moves only when a
test advances it, or jumps to the next sleeper's deadline when every task is
blocked (trio's ``MockClock(autojump_threshold=0)``), so a test of a hundred
50 ms ticks takes no real time and does not depend on the machine's load.

What stays on real time: handler timeouts and retry backoff (they guard
against real hangs and real outages), and everything below the engine
(the WAL's writer thread, sockets, brokers).
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    """Time as the engine sees it: a monotonic clock, the wall clock, and waits on them."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (intervals, deadlines)."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (batch times shown to users)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once :meth:`monotonic` has reached ``deadline``."""
        ...

    async def wait(self, event: anyio.Event, deadline: float) -> None:
        """Return when ``event`` is set or :meth:`monotonic` reached ``deadline``, first."""
        ...


class SystemClock:
    """The real clocks: ``time.monotonic`` and ``time.time``, looked up at each call.

    Looked up rather than bound at import so that a fault hook replacing
    ``time.time`` (``STREAMLET_FAULT_CLOCK``) is seen.
    """

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        await anyio.sleep(max(0.0, deadline - time.monotonic()))

    async def wait(self, event: anyio.Event, deadline: float) -> None:
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            await event.wait()


SYSTEM_CLOCK: Clock = SystemClock()
"""The clock an app uses unless given another."""
