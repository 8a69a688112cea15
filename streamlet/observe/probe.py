"""Reads the running engine for the monitor: a status snapshot on demand.

The probe holds references to the app's parts and only reads them, on the
event loop, when a scrape or a page asks: nothing in the batch path waits on
it, and nothing it does changes the engine (the monitor is read-only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from streamlet._blocks import BlockGenerator
from streamlet._scheduler import BatchScheduler
from streamlet._tracker import Tracker
from streamlet.clock import Clock
from streamlet.observe.status import (
    GroupStatus,
    Latencies,
    ReceiverStatus,
    SinkStatus,
    Snapshot,
    SourceStatus,
    WalStatus,
)
from streamlet.sources.base import DirectSource
from streamlet.sources.receiver import Receiver
from streamlet.wal import WriteAheadLog

__all__ = ["EngineProbe"]


@dataclass(slots=True)
class EngineProbe:
    """The parts of a serving app the monitor may read.

    Attributes:
        state: what the app is doing: "starting", "recovering", "running"
            or "stopping" (set by the app as it goes).
    """

    app: str
    clock: Clock
    batch_interval: float
    tracker: Tracker
    scheduler: BatchScheduler
    direct: Mapping[str, DirectSource]
    receivers: Mapping[str, Receiver]
    sinks: Sequence[SinkStatus]
    settings: Mapping[str, Any]
    blocks: BlockGenerator | None = None
    wals: Mapping[str, WriteAheadLog] = field(default_factory=dict)
    stop: anyio.Event | None = None
    #: Group mode: the worker's place in the group (None: one worker runs the app).
    group: Callable[[], Mapping[str, Any]] | None = None
    state: str = "starting"
    started: float = 0.0

    def snapshot(self) -> Snapshot:
        """The engine now."""
        state = self.tracker.state
        rates = self.scheduler.rates
        limits = self.scheduler.limits
        return Snapshot(
            app=self.app,
            state="stopping" if self.stop is not None and self.stop.is_set() else self.state,
            now=self.clock.monotonic(),
            started=self.started,
            wall=self.clock.time(),
            batch_interval=self.batch_interval,
            last_done=state.last_done,
            next_batch=state.next_batch_id,
            pending=[a.id for a in state.pending],
            running=dict(self.scheduler.running),
            last_progress=self.scheduler.last_progress,
            checkpoint_age=(
                self.clock.monotonic() - written
                if (written := self.scheduler.checkpointer.last_written) is not None
                else None
            ),
            buffered_bytes=self.blocks.buffered_bytes if self.blocks is not None else 0,
            sources=[
                SourceStatus(
                    name=name,
                    kind=type(source).__name__,
                    positions=dict(state.positions.get(name, {})),
                    latest=dict(self.scheduler.latest.get(name, {})),
                    rate_limit=rates.get(name),
                    max_per_partition=limits.get(name),
                )
                for name, source in self.direct.items()
            ],
            receivers=[
                ReceiverStatus(
                    name=name,
                    kind=type(receiver).__name__,
                    pending_blocks=len(blocks := state.blocks.get(name, [])),
                    pending_records=sum(b.records for b in blocks),
                    acks=dict(state.acks.get(name, {})),
                    rate_limit=rates.get(name),
                )
                for name, receiver in self.receivers.items()
            ],
            sinks=list(self.sinks),
            wals=[_wal_status(name, wal) for name, wal in self.wals.items()],
            settings=dict(self.settings),
            group=_group_status(self.group()) if self.group is not None else None,
        )


def _group_status(raw: Mapping[str, Any]) -> GroupStatus:
    pauses = raw["pauses"]
    return GroupStatus(
        group=raw["group"],
        worker=raw["worker"],
        tasks=tuple(raw["tasks"]),
        assigned=tuple(raw["assigned"]),
        rebalances=raw["rebalances"],
        last_pause=raw["last_pause"],
        pauses=Latencies(pauses.cumulative(), pauses.total),
    )


def _wal_status(name: str, wal: WriteAheadLog) -> WalStatus:
    stats = wal.stats()
    return WalStatus(
        name=name,
        segments=stats.segments,
        appended_bytes=stats.appended_bytes,
        fsync=Latencies(stats.fsync.cumulative(), stats.fsync.total),
        append=Latencies(stats.append.cumulative(), stats.append.total),
    )
