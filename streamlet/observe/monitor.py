"""The monitor of one app: batches kept for the page, metrics, and live subscribers.

The app hands it each batch's :class:`~streamlet.metrics.BatchInfo` (it is a
listener, after the batch is done) and an
:class:`~streamlet.observe.probe.EngineProbe` once the engine is assembled.
The HTTP side (:mod:`streamlet.observe.web`) only reads from it. Data flows
one way: engine → monitor → HTTP; nothing here calls back into the engine
except the probe's reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from streamlet.clock import Clock
from streamlet.metrics import BatchInfo
from streamlet.observe.probe import EngineProbe
from streamlet.observe.prometheus import DEFAULT_BUCKETS, AppMetrics
from streamlet.observe.status import RETAINED_BATCHES, BatchLog, Snapshot

__all__ = ["Monitor"]

log = logging.getLogger(__name__)

SUBSCRIBER_QUEUE = 256
"""Batches an event-stream subscriber may fall behind by before it is dropped."""


class Monitor:
    """Batches, metrics and event-stream subscribers of one app.

    Args:
        app: the app's name.
        clock: the app's clock (batch done times).
        retained: batches kept for the page and ``/api/batches``.
        buckets: histogram bucket bounds in seconds.
    """

    def __init__(
        self,
        app: str,
        clock: Clock,
        *,
        retained: int = RETAINED_BATCHES,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.app = app
        self.clock = clock
        self.batches = BatchLog(retained)
        self.probe: EngineProbe | None = None
        self.metrics = AppMetrics(app, self.snapshot, buckets=buckets)
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def snapshot(self) -> Snapshot | None:
        """The engine now (None: not serving yet)."""
        return self.probe.snapshot() if self.probe is not None else None

    def on_batch(self, info: BatchInfo) -> None:
        """A listener: keep the batch, count it, and send it to subscribers."""
        document = self.batches.add(info)
        self.metrics.on_batch(info, self.clock.time())
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(document)
            except asyncio.QueueFull:
                # A page that stopped reading: drop it rather than hold
                # batches for it; its EventSource reconnects and refetches.
                self._subscribers.discard(queue)
                log.debug("an event-stream subscriber fell behind; dropped")

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        """A queue that receives each new batch's document (None: the stream ends)."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        """End every event stream (the app is stopping)."""
        for queue in list(self._subscribers):
            while True:
                try:
                    queue.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    queue.get_nowait()  # the end matters more than an unread batch
        self._subscribers.clear()
