"""Noticing a handler that blocks the event loop.

Everything in a worker shares one event loop: receivers' acknowledgements,
the block generator, batch ticks. A handler that blocks it (``time.sleep``,
a synchronous HTTP call, minutes of CPU work) stalls all of them without an
error: senders wait for acks, and scheduling delay grows. The loop cannot
see that it is blocked, so a thread watches it: a task on the loop stamps a
heartbeat every ``threshold / 4`` seconds, and the thread warns once the
heartbeat is older than ``threshold``, naming the handler whose code is on the
loop thread's stack at that moment (or, if none is, every handler under way);
when the loop comes back it says for how long it was blocked.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from types import CodeType
from typing import TypeVar

import anyio
import anyio.to_thread

__all__ = ["watched"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)

Running = Callable[[], Mapping[str, int]]
"""Returns the handlers under way now: name → batch id."""


class _Watcher:
    def __init__(self, threshold: float, running: Running, code: Mapping[str, CodeType]) -> None:
        self.threshold = threshold
        self.running = running
        self.code = code
        self.loop_thread = threading.get_ident()
        self.beat = time.monotonic()
        self.stopped = threading.Event()
        # Set by the thread while it has warned about the current stall.
        self.stalled_since: float | None = None
        self.stalled_handlers: list[str] = []

    def watch(self) -> None:
        """The thread: compare the heartbeat with the clock, warn once per stall."""
        step = self.threshold / 4
        while not self.stopped.wait(step):
            beat = self.beat
            now = time.monotonic()
            if self.stalled_since is None and now - beat > self.threshold:
                handlers = sorted(self.running().items())
                if not handlers:
                    continue
                culprits = self.on_stack()
                handlers = [h for h in handlers if h[0] in culprits] or handlers
                self.stalled_since = beat
                self.stalled_handlers = [name for name, _ in handlers]
                log.warning(
                    "the event loop has been blocked for %.1f s while %s ran: receivers'"
                    " acknowledgements and batch ticks wait meanwhile. Handlers must not"
                    " block (no time.sleep, blocking I/O or long CPU work in an async def);"
                    " run blocking code in a plain def with @app.handler(..., thread=True)",
                    now - beat,
                    ", ".join(f"handler {name!r} (batch {batch})" for name, batch in handlers),
                )

    def on_stack(self) -> set[str]:
        """The handlers whose code is on the loop thread's stack now."""
        frame = sys._current_frames().get(self.loop_thread)
        codes: set[CodeType] = set()
        while frame is not None:
            codes.add(frame.f_code)
            frame = frame.f_back
        return {name for name, code in self.code.items() if code in codes}

    def heard(self, now: float) -> None:
        """On the loop: record a heartbeat; report the end of a stall the thread warned of."""
        since = self.stalled_since
        if since is not None:
            self.stalled_since = None
            log.warning(
                "the event loop was blocked for %.1f s (%s)",
                now - since,
                ", ".join(repr(name) for name in self.stalled_handlers),
            )
        self.beat = now


async def watched(
    threshold: float | None,
    running: Running,
    body: Callable[[], Awaitable[_T]],
    code: Mapping[str, CodeType] | None = None,
) -> _T:
    """Run ``body()`` with the event loop watched; ``threshold`` None: just run it.

    ``code`` maps handler names to their functions' code, to tell which of
    the handlers under way is the one blocking.

    Exceptions from ``body`` are raised as themselves (not in a group).
    """
    if threshold is None:
        return await body()
    watcher = _Watcher(threshold, running, code or {})
    thread = threading.Thread(target=watcher.watch, name="streamlet-loop-watchdog", daemon=True)

    async def heartbeat() -> None:
        while True:
            watcher.heard(time.monotonic())
            await anyio.sleep(threshold / 4)

    outcome: list[_T] = []
    failure: BaseException | None = None
    thread.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            try:
                outcome.append(await body())
            except Exception as exc:
                failure = exc
            finally:
                tg.cancel_scope.cancel()
    finally:
        watcher.stopped.set()
        await anyio.to_thread.run_sync(thread.join)
    if failure is not None:
        raise failure
    return outcome[0]
