"""The worker's status as plain data: what the page, ``/api/status`` and ``streamlet status`` show.

Everything here is pure: a :class:`Snapshot` is what the engine looks like at
one moment (read by :mod:`streamlet.observe.probe`), :class:`BatchLog` keeps
the last batches' :class:`~streamlet.metrics.BatchInfo` as JSON-ready dicts,
and :func:`status_document` and :func:`health` turn them into documents. No
record data appears anywhere: counts, offsets, timings and names only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamlet.metrics import BatchInfo

__all__ = [
    "BatchLog",
    "GroupStatus",
    "Latencies",
    "ReceiverStatus",
    "SinkStatus",
    "Snapshot",
    "SourceStatus",
    "WalStatus",
    "batch_document",
    "health",
    "status_document",
]

RETAINED_BATCHES = 1000
"""Batches the page and ``/api/batches`` can show; older ones are dropped (bounded memory)."""

_KEPT_ERRORS = 20
"""Recent errors kept for the status (handler failures, refused outputs)."""


def batch_document(info: BatchInfo) -> dict[str, Any]:
    """One batch as JSON-ready data: its figures, ranges, blocks and handlers."""
    return {
        "id": info.batch_id,
        "time": info.batch_time,
        "records": info.records,
        "outputs": info.outputs,
        "scheduling_delay": info.scheduling_delay,
        "processing_time": info.processing_time,
        "commit_time": info.commit_time,
        "total_delay": info.total_delay,
        "recovered": info.recovered,
        "dead_lettered": list(info.dead_lettered),
        "decode_failures": info.decode_failures,
        "inputs": dict(info.inputs),
        "ranges": [
            {"source": r.source, "partition": r.partition, "start": r.start, "until": r.until}
            for r in info.ranges
        ],
        "blocks": _blocks_by_receiver(info),
        "handlers": [
            {
                "name": h.name,
                "records": h.records,
                "outputs": h.outputs,
                "attempts": h.attempts,
                "dead_lettered": h.dead_lettered,
                "errors": list(h.errors),
                "sink": h.sink,
                "commit_time": h.commit_time,
                "commit_attempts": h.commit_attempts,
            }
            for h in info.handlers
        ],
    }


def _blocks_by_receiver(info: BatchInfo) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for block in info.blocks:
        entry = out.setdefault(block.source, {"blocks": 0, "records": 0, "first": block.id})
        entry["blocks"] += 1
        entry["records"] += block.records
        entry["last"] = block.id
    return out


class BatchLog:
    """The last batches as documents, newest last, at most ``retained`` of them.

    Also keeps the newest errors seen in them, for the status's "last errors".
    """

    def __init__(self, retained: int = RETAINED_BATCHES) -> None:
        self._batches: deque[dict[str, Any]] = deque(maxlen=retained)
        self._errors: deque[dict[str, Any]] = deque(maxlen=_KEPT_ERRORS)

    def add(self, info: BatchInfo) -> dict[str, Any]:
        """Keep ``info``; return its document."""
        document = batch_document(info)
        self._batches.append(document)
        for handler in info.handlers:
            if handler.errors:  # one entry per handler and batch: its newest error
                self._errors.append(
                    {
                        "batch": info.batch_id,
                        "time": info.batch_time,
                        "handler": handler.name,
                        "error": handler.errors[-1],
                        "failures": len(handler.errors),
                        "dead_lettered": handler.dead_lettered,
                    }
                )
        return document

    def after(self, batch_id: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` of the newest batches with an id above ``batch_id``, oldest first."""
        newer = [b for b in self._batches if b["id"] > batch_id]
        return newer[-limit:] if limit > 0 else []

    @property
    def last(self) -> dict[str, Any] | None:
        return self._batches[-1] if self._batches else None

    @property
    def errors(self) -> list[dict[str, Any]]:
        return list(self._errors)


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """A direct source: how far batches took each partition, and how far it goes.

    Attributes:
        positions: partition → the end of the last batch's range.
        latest: partition → what ``latest()`` said (for Kafka, the last
            stable offset); empty until the first allocation.
        rate_limit: the rate backpressure set, records/s (None: not set).
        max_per_partition: the most offsets the next batch takes per partition.
    """

    name: str
    kind: str
    positions: Mapping[int, int]
    latest: Mapping[int, int]
    rate_limit: float | None = None
    max_per_partition: int | None = None

    def lag(self) -> dict[int, int]:
        """Per partition, offsets available that no batch has taken yet."""
        return {p: max(0, end - self.positions.get(p, 0)) for p, end in sorted(self.latest.items())}


@dataclass(frozen=True, slots=True)
class ReceiverStatus:
    """A receiver: its stored blocks no batch took yet, and what it has acknowledged."""

    name: str
    kind: str
    pending_blocks: int
    pending_records: int
    acks: Mapping[str, int]
    rate_limit: float | None = None


@dataclass(frozen=True, slots=True)
class SinkStatus:
    """A handler's sink and the guarantee it gives."""

    handler: str
    sink: str
    guarantee: str


@dataclass(frozen=True, slots=True)
class Latencies:
    """A latency histogram's state: cumulative ``(bound, count)`` buckets and the sum."""

    buckets: Sequence[tuple[float, int]]
    total: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0


@dataclass(frozen=True, slots=True)
class WalStatus:
    """A write-ahead log's figures (``tracker`` or ``data``).

    Attributes:
        fsync: the writer thread's fsync calls.
        append: appends as their callers see them: from the call to durable.
    """

    name: str
    segments: int
    appended_bytes: int
    fsync: Latencies
    append: Latencies


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """Group mode: this worker's place in the app's consumer group.

    Attributes:
        tasks: the tasks it runs batches of now.
        assigned: the tasks the group's last assignment gave it (a task
            assigned but not yet taken over is in this, not in ``tasks``).
        rebalances: assignments taken over since it started.
        last_pause: how long the last one kept batches paused (seconds).
        pauses: every pause, as a histogram.
    """

    group: str
    worker: str
    tasks: tuple[int, ...]
    assigned: tuple[int, ...]
    rebalances: int
    last_pause: float | None
    pauses: Latencies


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The engine at one moment, as the monitor may see it (read-only).

    Attributes:
        now: the app clock's monotonic time when taken.
        started: the app clock's monotonic time when serving began.
        wall: the wall-clock time when taken.
        state: "starting", "recovering", "running" or "stopping".
        last_progress: monotonic time of the scheduler's last tick or batch.
        checkpoint_age: seconds since the last checkpoint (None: none yet).
        settings: the app's settings, JSON-ready.
    """

    app: str
    state: str
    now: float
    started: float
    wall: float
    batch_interval: float
    last_done: int
    next_batch: int
    pending: Sequence[int]
    running: Mapping[str, int]
    last_progress: float
    checkpoint_age: float | None
    buffered_bytes: int
    sources: Sequence[SourceStatus] = ()
    receivers: Sequence[ReceiverStatus] = ()
    sinks: Sequence[SinkStatus] = ()
    wals: Sequence[WalStatus] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    group: GroupStatus | None = None


STALL_INTERVALS = 3
"""A worker is stalled when no tick or batch came for this many batch intervals..."""
STALL_FLOOR = 30.0
"""...and at least this many seconds (a batch may legitimately take a while)."""


def health(snapshot: Snapshot) -> tuple[bool, dict[str, Any]]:
    """Whether the worker is processing (for a supervisor's liveness check), and why.

    Healthy while starting or recovering, and while running with a sign of
    life (a tick or a finished batch) within ``max(3 intervals, 30 s)``; a
    worker stuck in a handler or a sink past that is not.
    """
    quiet = max(0.0, snapshot.now - snapshot.last_progress)
    allowed = max(STALL_INTERVALS * snapshot.batch_interval, STALL_FLOOR)
    stalled = snapshot.state == "running" and quiet > allowed
    document = {
        "status": "stalled" if stalled else "ok",
        "state": snapshot.state,
        "last_done": snapshot.last_done,
        "seconds_since_progress": round(quiet, 3),
        "stall_after_seconds": allowed,
    }
    return not stalled, document


def status_document(snapshot: Snapshot, batches: BatchLog, *, recent: int = 20) -> dict[str, Any]:
    """The whole status as JSON-ready data (``/api/status``, ``streamlet status``)."""
    ok, health_document = health(snapshot)
    last = batches.last
    window = batches.after(-1, recent)
    return {
        "app": snapshot.app,
        "state": snapshot.state,
        "healthy": ok,
        "health": health_document,
        "time": snapshot.wall,
        "uptime": max(0.0, snapshot.now - snapshot.started),
        "batch_interval": snapshot.batch_interval,
        "last_done": snapshot.last_done,
        "next_batch": snapshot.next_batch,
        "pending": list(snapshot.pending),
        "running": dict(snapshot.running),
        "checkpoint_age": snapshot.checkpoint_age,
        "buffered_bytes": snapshot.buffered_bytes,
        "last_batch": last,
        "rates": _rates(window, snapshot.batch_interval),
        "sources": [
            {
                "name": s.name,
                "kind": s.kind,
                "partitions": [
                    {
                        "partition": p,
                        "position": s.positions.get(p, 0),
                        "latest": s.latest.get(p),
                        "lag": lag,
                    }
                    for p, lag in _lag_rows(s)
                ],
                "lag": sum(s.lag().values()),
                "rate_limit": s.rate_limit,
                "max_per_partition": s.max_per_partition,
            }
            for s in snapshot.sources
        ],
        "receivers": [
            {
                "name": r.name,
                "kind": r.kind,
                "pending_blocks": r.pending_blocks,
                "pending_records": r.pending_records,
                "acks": dict(r.acks),
                "rate_limit": r.rate_limit,
            }
            for r in snapshot.receivers
        ],
        "sinks": [
            {"handler": s.handler, "sink": s.sink, "guarantee": s.guarantee} for s in snapshot.sinks
        ],
        "wals": [
            {
                "name": w.name,
                "segments": w.segments,
                "appended_bytes": w.appended_bytes,
                "fsyncs": w.fsync.count,
                "fsync_mean": w.fsync.total / w.fsync.count if w.fsync.count else None,
                "appends": w.append.count,
                "append_mean": w.append.total / w.append.count if w.append.count else None,
            }
            for w in snapshot.wals
        ],
        "errors": batches.errors,
        "settings": dict(snapshot.settings),
        "group": (
            {
                "group": g.group,
                "worker": g.worker,
                "tasks": list(g.tasks),
                "assigned": list(g.assigned),
                "rebalances": g.rebalances,
                "last_pause": g.last_pause,
            }
            if (g := snapshot.group) is not None
            else None
        ),
    }


def _lag_rows(source: SourceStatus) -> Iterable[tuple[int, int]]:
    lag = source.lag()
    for partition in sorted(set(source.positions) | set(source.latest)):
        yield partition, lag.get(partition, 0)


def _rates(window: Sequence[Mapping[str, Any]], interval: float) -> dict[str, float | None]:
    """Input rate and mean delays over the last batches (None: no batch yet)."""
    if not window:
        return dict.fromkeys(
            ("input_per_second", "processing_time", "scheduling_delay", "total_delay")
        )
    span = max(window[-1]["time"] - window[0]["time"] + interval, interval)
    return {
        "input_per_second": sum(b["records"] for b in window) / span,
        "processing_time": sum(b["processing_time"] for b in window) / len(window),
        "scheduling_delay": sum(b["scheduling_delay"] for b in window) / len(window),
        "total_delay": sum(b["total_delay"] for b in window) / len(window),
    }
