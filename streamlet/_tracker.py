"""The batch tracker: which input belongs to which batch, durably.

Every decision about input is an event appended to the tracker's own
write-ahead log before anything acts on it:

* ``block``: a receiver's block is durable in the data WAL (id, where, how
  many records, and the receiver's acknowledgement bookkeeping);
* ``alloc``: batch ``id`` covers these offset ranges and these blocks;
* ``done``: batch ``id``'s outputs are committed and its source positions
  advanced.

Replaying the events over the last checkpoint rebuilds :class:`TrackerState`
exactly, so after a crash every allocated-but-not-done batch is re-run with
the same input. The state transitions (:meth:`TrackerState.apply`) and the
allocation decision (:func:`plan_allocation`) are pure and tested without
I/O; :class:`Tracker` adds the log.

Invariants:

* A batch is allocated before any handler sees it, and its ranges start
  where the previous batch's ended (no gap, no overlap).
* Batches are done in id order; ``done`` of a batch that is not the oldest
  pending one is a bug and raises.
* A block is allocated to at most one batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from streamlet.errors import StreamletError
from streamlet.fs import FileSystem
from streamlet.records import BlockRef, OffsetRange
from streamlet.wal import Position, WriteAheadLog

__all__ = [
    "AllocEvent",
    "Allocation",
    "BlockEvent",
    "DoneEvent",
    "DropEvent",
    "Event",
    "Tracker",
    "TrackerState",
    "available_offsets",
    "decode_event",
    "encode_event",
    "plan_allocation",
    "restore",
    "share_budget",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1
SEGMENT_SIZE = 4 * 2**20
"""Default size of the tracker log's segment files."""


@dataclass(frozen=True, slots=True)
class Allocation:
    """The input of one batch, as logged before it runs."""

    id: int
    time: float
    ranges: tuple[OffsetRange, ...]
    blocks: tuple[BlockRef, ...]

    @property
    def empty(self) -> bool:
        """True when the batch would hold no input."""
        return not self.blocks and all(r.until == r.start for r in self.ranges)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "t": self.time,
            "r": [list(r) for r in self.ranges],
            "b": [list(b) for b in self.blocks],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Allocation:
        return cls(
            id=int(data["id"]),
            time=float(data["t"]),
            ranges=tuple(OffsetRange(str(r[0]), *map(int, r[1:])) for r in data["r"]),
            blocks=tuple(BlockRef.from_json(b) for b in data["b"]),
        )


@dataclass(frozen=True, slots=True)
class BlockEvent:
    """``block``: a receiver's block is durable in the data WAL, with its acks."""

    ref: BlockRef
    acks: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AllocEvent:
    """``alloc``: a batch's input, fixed before any handler sees it."""

    alloc: Allocation


@dataclass(frozen=True, slots=True)
class DoneEvent:
    """``done``: a batch's outputs are committed and its positions advanced."""

    batch_id: int


@dataclass(frozen=True, slots=True)
class DropEvent:
    """``drop``: a pending batch is given up, not committed: its task moved to another worker.

    Group mode only. The batch's outputs were never committed by this worker
    (or its commit was fenced); the task's new owner resumes from what the
    sinks committed, so nothing of the batch is lost or run twice.
    """

    batch_id: int


Event = BlockEvent | AllocEvent | DoneEvent | DropEvent
"""One tracker event; on disk, one orjson object (see :func:`encode_event`)."""


def encode_event(event: Event) -> bytes:
    """The log record of ``event``: ``{"e": "block"|"alloc"|"done", ...}``."""
    if isinstance(event, BlockEvent):
        body: dict[str, Any] = {"e": "block", "b": list(event.ref)}
        if event.acks:
            body["acks"] = dict(event.acks)
        return orjson.dumps(body)
    if isinstance(event, AllocEvent):
        return orjson.dumps({"e": "alloc", **event.alloc.to_json()})
    if isinstance(event, DropEvent):
        return orjson.dumps({"e": "drop", "id": event.batch_id})
    return orjson.dumps({"e": "done", "id": event.batch_id})


def decode_event(data: bytes | Mapping[str, Any]) -> Event:
    """The event of a log record (bytes, or its parsed object).

    Raises:
        StreamletError: the record is not a tracker event this version reads.
    """
    try:
        raw = orjson.loads(data) if isinstance(data, bytes) else data
        kind = raw.get("e")
        if kind == "block":
            ref = BlockRef.from_json(raw["b"])
            acks = {str(c): int(q) for c, q in (raw.get("acks") or {}).items()}
            return BlockEvent(ref, acks)
        if kind == "alloc":
            return AllocEvent(Allocation.from_json(raw))
        if kind == "done":
            return DoneEvent(int(raw["id"]))
        if kind == "drop":
            return DropEvent(int(raw["id"]))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise StreamletError(
            f"malformed tracker event {data!r}: {type(exc).__name__}: {exc}"
        ) from None
    raise StreamletError(f"unknown tracker event {data!r}")


@dataclass(slots=True)
class TrackerState:
    """Everything the tracker knows; rebuilt from checkpoint + log on start.

    Attributes:
        next_batch_id: id the next allocation gets.
        last_done: id of the newest done batch (0 when none).
        positions: per direct source and partition, where the next
            allocation starts (the ``until`` of the newest allocation).
        committed: the same, as of the newest done batch: what a consumer
            group may be told, and where a rebuilt state would restart.
        pending: allocated but not done batches, oldest first.
        blocks: per receiver, durable blocks not yet allocated, oldest first.
        next_block_id: id the next block gets.
        acks: per receiver, its acknowledgement bookkeeping (for example the
            highest sequence number per client), as of the newest block.
    """

    next_batch_id: int = 1
    last_done: int = 0
    positions: dict[str, dict[int, int]] = field(default_factory=dict)
    committed: dict[str, dict[int, int]] = field(default_factory=dict)
    pending: list[Allocation] = field(default_factory=list)
    blocks: dict[str, list[BlockRef]] = field(default_factory=dict)
    next_block_id: int = 1
    acks: dict[str, dict[str, int]] = field(default_factory=dict)

    def check(self, event: Event) -> None:
        """Raise StreamletError if ``event`` cannot be applied to this state; pure.

        The tracker checks an event before it appends it: an impossible event
        that reached the log would make every later replay of the log fail.
        """
        if isinstance(event, AllocEvent):
            if event.alloc.id != self.next_batch_id:
                raise StreamletError(
                    f"tracker log allocates batch {event.alloc.id} where"
                    f" {self.next_batch_id} was next"
                )
        elif isinstance(event, DropEvent) and not any(a.id == event.batch_id for a in self.pending):
            raise StreamletError(f"tracker log drops batch {event.batch_id}, which is not pending")
        elif isinstance(event, DoneEvent) and (
            not self.pending or self.pending[0].id != event.batch_id
        ):
            oldest = self.pending[0].id if self.pending else None
            raise StreamletError(
                f"tracker log marks batch {event.batch_id} done while the oldest pending"
                f" is {oldest}"
            )

    def apply(self, event: Event) -> None:
        """Apply one event; raises StreamletError (changing nothing) on an impossible one."""
        self.check(event)
        if isinstance(event, BlockEvent):
            ref = event.ref
            self.blocks.setdefault(ref.source, []).append(ref)
            self.next_block_id = max(self.next_block_id, ref.id + 1)
            if event.acks:
                mine = self.acks.setdefault(ref.source, {})
                for client, seq in event.acks.items():
                    mine[client] = max(seq, mine.get(client, -1))
        elif isinstance(event, AllocEvent):
            alloc = event.alloc
            for r in alloc.ranges:
                self.positions.setdefault(r.source, {})[r.partition] = r.until
            taken = {b.id for b in alloc.blocks}
            if taken:
                for source, refs in self.blocks.items():
                    self.blocks[source] = [b for b in refs if b.id not in taken]
            self.pending.append(alloc)
            self.next_batch_id = alloc.id + 1
        elif isinstance(event, DropEvent):
            self.pending = [a for a in self.pending if a.id != event.batch_id]
        else:
            done = self.pending.pop(0)
            for r in done.ranges:
                self.committed.setdefault(r.source, {})[r.partition] = r.until
            self.last_done = done.id

    def to_json(self) -> dict[str, Any]:
        """A checkpoint body; read back with :meth:`from_json`."""
        return {
            "version": STATE_VERSION,
            "next_batch_id": self.next_batch_id,
            "last_done": self.last_done,
            "positions": {s: {str(p): o for p, o in m.items()} for s, m in self.positions.items()},
            "committed": {s: {str(p): o for p, o in m.items()} for s, m in self.committed.items()},
            "pending": [a.to_json() for a in self.pending],
            "blocks": {s: [list(b) for b in refs] for s, refs in self.blocks.items()},
            "next_block_id": self.next_block_id,
            "acks": self.acks,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrackerState:
        """Rebuild from a checkpoint body.

        Raises:
            StreamletError: the body is of an unknown version.
        """
        if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION:
            found = data.get("version") if isinstance(data, Mapping) else None
            raise StreamletError(
                f"tracker state version {found!r} is not readable"
                f" (this streamlet reads version {STATE_VERSION})"
            )
        try:
            return cls._from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise StreamletError(
                f"tracker state is malformed ({type(exc).__name__}: {exc}); the checkpoint"
                " was not written by a compatible streamlet"
            ) from None

    @classmethod
    def _from_json(cls, data: Mapping[str, Any]) -> TrackerState:
        return cls(
            next_batch_id=int(data["next_batch_id"]),
            last_done=int(data["last_done"]),
            positions={
                s: {int(p): int(o) for p, o in m.items()} for s, m in data["positions"].items()
            },
            committed={
                s: {int(p): int(o) for p, o in m.items()} for s, m in data["committed"].items()
            },
            pending=[Allocation.from_json(a) for a in data["pending"]],
            blocks={s: [BlockRef.from_json(b) for b in refs] for s, refs in data["blocks"].items()},
            next_block_id=int(data["next_block_id"]),
            acks={s: {str(c): int(q) for c, q in m.items()} for s, m in data["acks"].items()},
        )


def restore(body: Mapping[str, Any], path: str) -> tuple[TrackerState, Position | None]:
    """The tracker state of a checkpoint body, and the log position it covers.

    Raises:
        StreamletError: the body is not a tracker checkpoint this version reads.
    """
    state_json = body.get("state")
    if not isinstance(state_json, Mapping):
        raise StreamletError(f"checkpoint {path} holds no tracker state")
    try:
        state = TrackerState.from_json(state_json)
    except StreamletError as exc:
        raise StreamletError(f"checkpoint {path}: {exc}") from None
    event = body.get("last_event")
    if event is None:
        return state, None
    if (
        not isinstance(event, list)
        or len(event) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in event)
    ):
        raise StreamletError(f"checkpoint {path}: last_event {event!r} is not a log position")
    return state, Position(*event)


def share_budget(available: Mapping[int, int], budget: int) -> dict[int, int]:
    """Split ``budget`` offsets among partitions by what each has available; pure.

    Water-filling: a partition with less than an even share takes all of
    it, and what it leaves goes to the others, so a hot partition is not
    held to ``budget / partitions`` while the others are idle.

    Args:
        available: per partition, the offsets it could take (after rate limits).
        budget: the most offsets all of them together take.
    """
    if sum(available.values()) <= budget:
        return dict(available)
    taken: dict[int, int] = {}
    left = budget
    ordered = sorted(available, key=lambda p: (available[p], p))
    for i, partition in enumerate(ordered):
        take = min(available[partition], left // (len(ordered) - i))
        taken[partition] = take
        left -= take
    return taken


def available_offsets(
    state: TrackerState,
    latest: Mapping[str, Mapping[int, int]],
    limits: Mapping[str, int | None],
) -> dict[str, dict[int, int]]:
    """Per direct source and partition, how many new offsets a batch may take; pure.

    What lies between the state's position and ``latest``, capped by the
    source's per-partition rate limit in ``limits`` (``None``: no limit).
    """
    available: dict[str, dict[int, int]] = {}
    for source in sorted(latest):
        starts = state.positions.get(source, {})
        limit = limits.get(source)
        counts = available[source] = {}
        for partition in sorted(latest[source]):
            count = max(0, latest[source][partition] - starts[partition])
            counts[partition] = count if limit is None else min(count, limit)
    return available


def plan_allocation(
    state: TrackerState,
    *,
    batch_time: float,
    latest: Mapping[str, Mapping[int, int]],
    limits: Mapping[str, int | None],
    budgets: Mapping[str, int] | None = None,
    receivers: frozenset[str] = frozenset(),
    receiver_limits: Mapping[str, int | None] | None = None,
    receiver_max_bytes: int | None = None,
) -> Allocation:
    """Decide the next batch's input; pure.

    Args:
        state: the tracker's state; ``positions`` must already hold a start
            for every partition in ``latest``.
        batch_time: wall-clock time the batch is for.
        latest: per direct source and partition, the offset one past the
            newest available record.
        limits: per direct source, the most offsets a batch may take from
            one partition (``None``: no limit): the rate limit.
        budgets: per direct source, the most offsets a batch takes from all
            its partitions together, shared by :func:`share_budget`
            (missing: no limit): the size limit.
        receivers: receivers whose unallocated blocks the batch takes.
        receiver_limits: per receiver, about the most records a batch takes
            (whole blocks, oldest first, at least one); ``None``: all of them.
            With backpressure this spreads a backlog over several batches
            instead of reading it all into one.
        receiver_max_bytes: per receiver, about the most block bytes a batch
            takes (whole blocks, oldest first, at least one); None: no limit.

    Returns:
        The allocation, holding only partitions with new offsets; it may be
        empty (check ``.empty``).
    """
    ranges: list[OffsetRange] = []
    for source, available in available_offsets(state, latest, limits).items():
        starts = state.positions.get(source, {})
        budget = (budgets or {}).get(source)
        taken = available if budget is None else share_budget(available, budget)
        for partition in sorted(taken):
            if taken[partition] > 0:
                start = starts[partition]
                ranges.append(OffsetRange(source, partition, start, start + taken[partition]))
    blocks: list[BlockRef] = []
    for source in sorted(receivers):
        waiting = state.blocks.get(source, ())
        receiver_limit = (receiver_limits or {}).get(source)
        if receiver_limit is None and receiver_max_bytes is None:
            blocks.extend(waiting)
            continue
        records = size = 0
        for block in waiting:
            if records and (
                (receiver_limit is not None and records + block.records > receiver_limit)
                or (receiver_max_bytes is not None and size + block.length > receiver_max_bytes)
            ):
                break
            blocks.append(block)
            records += block.records
            size += block.length
    return Allocation(state.next_batch_id, batch_time, tuple(ranges), tuple(blocks))


class Tracker:
    """The durable tracker: :class:`TrackerState` plus its event log.

    Every ``log_*`` call returns once the event is durable in the log, and
    only then changes the in-memory state.
    """

    def __init__(self, wal: WriteAheadLog, state: TrackerState, last_event: Position | None):
        self._wal = wal
        self.state = state
        #: Position of the newest event applied; a checkpoint records it.
        self.last_event = last_event
        # Events are logged one call at a time, so that the in-memory state
        # is always exactly "the log up to last_event": with two appends in
        # flight, the later one could finish first, and a checkpoint taken in
        # between would claim an event it does not hold.
        self._lock = anyio.Lock()

    @property
    def wal(self) -> WriteAheadLog:
        """The tracker's log (read it only: the monitor takes its figures)."""
        return self._wal

    @classmethod
    async def open(
        cls,
        directory: str,
        *,
        base: TrackerState | None,
        after: Position | None,
        fs: FileSystem | None = None,
        durability: str = "always",
        segment_size: int = SEGMENT_SIZE,
    ) -> Tracker:
        """Open the log and replay the events newer than ``after`` over ``base``.

        ``segment_size`` is the size of the log's segment files: the log is
        cleaned a whole segment at a time, so smaller segments free space
        sooner (tests use tiny ones to exercise cleaning).
        """
        wal = await WriteAheadLog.open(
            directory, durability=durability, segment_size=segment_size, fs=fs
        )
        state = base if base is not None else TrackerState()
        last = after
        replayed = 0
        # The log must still hold the event the checkpoint covers: one cut
        # below it (a repair, an older copy of the log, a lost tail) would
        # take new events at positions the next recovery skips as covered.
        reached = after is None
        try:
            async for position, payload in wal.replay(after):
                if after is not None and position[:2] <= after[:2]:
                    reached = reached or position[:2] == after[:2]
                    continue
                state.apply(decode_event(payload))
                last = position
                replayed += 1
        except BaseException:
            await wal.aclose()
            raise
        if not reached:
            assert after is not None
            await wal.aclose()
            raise StreamletError(
                f"the tracker log in {directory} ends before the event the checkpoint"
                f" covers (segment {after.segment}, offset {after.offset}): the log was"
                " cut or lost its tail (a repair, an older copy of tracker/ restored, or"
                " a power loss with durability other than 'always'). Events written now"
                " would be skipped by the next recovery, so the app does not start."
                " Restore the whole state directory from a backup, or use a new one"
            )
        if replayed:
            log.info("replayed %d tracker events from %s", replayed, directory)
        return cls(wal, state, last)

    async def _log(self, event: Event) -> None:
        async with self._lock:
            # Invariant: only an event that applies is appended (checked first).
            self.state.check(event)
            position = await self._wal.append(encode_event(event))
            self.state.apply(event)
            self.last_event = position

    async def _log_blocks(self, events: Sequence[BlockEvent]) -> None:
        async with self._lock:
            # Block events apply independently of each other: each is checked
            # against the current state.
            for event in events:
                self.state.check(event)
            positions = await self._wal.append_many([encode_event(e) for e in events])
            for event in events:
                self.state.apply(event)
            self.last_event = positions[-1]

    def seed_positions(self, source: str, positions: Mapping[int, int]) -> None:
        """Set start positions for partitions the state has never seen.

        Not logged by itself: the first allocation that uses them logs them
        as its ranges' starts, and until then they can be asked for again.
        """
        known = self.state.positions.setdefault(source, {})
        for partition, offset in positions.items():
            known.setdefault(partition, offset)

    async def log_blocks(self, blocks: Sequence[tuple[BlockRef, Mapping[str, int]]]) -> None:
        """Record that every block is durable in the data WAL, in one group commit.

        The refs' ids must continue ``state.next_block_id`` in order.
        """
        if blocks:
            await self._log_blocks([BlockEvent(ref, dict(acks)) for ref, acks in blocks])

    async def log_allocated(self, alloc: Allocation) -> None:
        """Record that batch ``alloc.id`` covers ``alloc``'s input."""
        await self._log(AllocEvent(alloc))

    async def log_done(self, batch_id: int) -> None:
        """Record that batch ``batch_id`` is committed."""
        await self._log(DoneEvent(batch_id))

    async def log_dropped(self, batch_id: int) -> None:
        """Record that pending batch ``batch_id`` is given up (group mode: its task moved)."""
        await self._log(DropEvent(batch_id))

    def reset_positions(self, source: str, positions: Mapping[int, int]) -> None:
        """Group mode: set where partitions resume, as a task's new owner learned from its sinks.

        Not logged, like :meth:`seed_positions`: the first allocation logs
        them as its ranges' starts, and after a restart the worker learns
        them from the sinks again when it is assigned the task.
        """
        self.state.positions.setdefault(source, {}).update(positions)

    async def clean(self, up_to: Position) -> int:
        """Delete log segments wholly older than ``up_to``."""
        return await self._wal.clean(up_to)

    async def aclose(self) -> None:
        await self._wal.aclose()
