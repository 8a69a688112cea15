"""Per-batch figures, as Spark's streaming listener reports them.

The scheduler builds one :class:`BatchInfo` per batch and hands it to every
listener the app registered; ``streamlet run`` prints each as a status line,
and the monitor (:mod:`streamlet.observe`) turns them into metrics and the
live page. A BatchInfo holds counts, offsets and timings, never record data.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from streamlet.records import BlockRef, OffsetRange

__all__ = ["LATENCY_BUCKETS", "BatchInfo", "HandlerInfo", "LatencyHistogram"]

LATENCY_BUCKETS: tuple[float, ...] = tuple(round(0.001 * 60_000 ** (i / 17), 6) for i in range(18))
"""Latency bucket bounds in seconds: 1 ms to 60 s in 18 exponential steps."""


class LatencyHistogram:
    """Counts of durations by bucket, for parts that must not depend on a metrics library.

    The write-ahead log's writer thread observes each fsync here; the monitor
    reads :meth:`cumulative` when Prometheus scrapes. One thread writes, any
    may read: a reader may see one observation half-counted (in ``count``
    but not yet in its bucket), which a scrape tolerates.
    """

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(frozen=True, slots=True)
class HandlerInfo:
    """What one handler did with one batch.

    Attributes:
        name: the handler's name.
        records: its input records (those of its sources).
        outputs: outputs its sink committed (0 when it was dead-lettered).
        attempts: calls of the handler (1: no retry).
        dead_lettered: its input went to the dead-letter sink (it failed
            after its retries, or its sink refused its outputs).
        errors: the failures of its calls and sink commits, newest last
            (type and message; at most a few).
        sink: its sink's description (None: no sink).
        commit_time: seconds its sink's commit took, retries included.
        commit_attempts: tries of that commit (0: nothing was committed).
    """

    name: str
    records: int = 0
    outputs: int = 0
    attempts: int = 1
    dead_lettered: bool = False
    errors: tuple[str, ...] = ()
    sink: str | None = None
    commit_time: float = 0.0
    commit_attempts: int = 0


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """What happened to one batch. Times are in seconds.

    Attributes:
        batch_id: the batch's id.
        batch_time: wall-clock time the batch was scheduled for.
        records: input records in the batch.
        outputs: outputs committed, over all handlers.
        scheduling_delay: from the scheduled time to the start of the batch
            (grows when batches take longer than the batch interval).
        processing_time: running the handlers, retries included.
        commit_time: sink commits, source commits and the ``done`` record.
        total_delay: from the scheduled time to the batch being done.
        recovered: True when the batch is a re-run after a restart.
        dead_lettered: handlers whose input went to the dead-letter sink.
        inputs: input records per source.
        ranges: the offset ranges of direct sources the batch covered.
        blocks: the receivers' blocks it covered.
        handlers: per handler, what it did (:class:`HandlerInfo`).
        decode_failures: records that failed to decode (dead letters).
    """

    batch_id: int
    batch_time: float
    records: int
    outputs: int
    scheduling_delay: float
    processing_time: float
    commit_time: float
    total_delay: float
    recovered: bool = False
    dead_lettered: tuple[str, ...] = ()
    inputs: Mapping[str, int] = field(default_factory=dict)
    ranges: tuple[OffsetRange, ...] = ()
    blocks: tuple[BlockRef, ...] = ()
    handlers: tuple[HandlerInfo, ...] = ()
    decode_failures: int = 0

    def status_line(self) -> str:
        """One human-readable line for logs and ``streamlet run``."""
        line = (
            f"batch {self.batch_id}: {self.records} records -> {self.outputs} outputs;"
            f" delay {self.scheduling_delay * 1000:.1f} ms,"
            f" processing {self.processing_time * 1000:.1f} ms,"
            f" commit {self.commit_time * 1000:.1f} ms,"
            f" total {self.total_delay * 1000:.1f} ms"
        )
        if self.recovered:
            line += " (recovered)"
        if self.dead_lettered:
            line += f" (dead-lettered: {', '.join(self.dead_lettered)})"
        return line
