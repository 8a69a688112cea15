"""The block generator: receivers' records → durable blocks in the data WAL.

Receivers store records through a :class:`ReceiverContext` that this module
implements. Records collect in one open block per receiver; every
``interval`` seconds, or as soon as a block reaches ``max_block_bytes``, the
open blocks are cut, appended to the data WAL in one group commit, and then
logged as ``block`` events in the tracker with their acks. Only after both
are durable does a receiver's :class:`Stored` handle complete, so a receiver
never acknowledges data that a crash could lose.

A crash between the data append and the tracker event leaves an orphan block
in the data WAL: no batch will ever read it, and since its records were never
acknowledged, their sender sends them again. That is the whole recovery story
for this layer; nothing here needs replaying. The crash points
``block_before_tracker_event`` and ``block_after_tracker_event``
(:mod:`streamlet._faults`) kill a worker at either side of the tracker event;
``tests/engine/test_block_durability.py`` and
``tests/kafka/test_kafka_receiver_durability.py`` check that no acknowledged
record is lost and none is stored twice.

Memory is bounded: stores wait while more than ``max_buffered_bytes`` are
buffered or being written, which slows a receiver down to the speed of the
disk instead of letting it queue without limit.

Invariant: no block grows past ``max_block_bytes`` (unless a single store is
larger), however far the cuts lag behind the stores: a full block is sealed
and a new one opened, and the next cut takes every sealed block, in order,
before the open ones. The data WAL's record limit thus bounds one store, not
whatever a receiver stored while a cut was being written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import anyio

from streamlet._faults import CRASH_PAUSE, crash_due, crash_point
from streamlet._tracker import Tracker
from streamlet.clock import SYSTEM_CLOCK, Clock
from streamlet.errors import StreamletError
from streamlet.records import BlockRef, Record, decode_records, encode_records
from streamlet.sources.receiver import ReceiverContext, Stored
from streamlet.wal import Position, WriteAheadLog

__all__ = ["BlockGenerator", "throttle"]

log = logging.getLogger(__name__)

_RECORD_OVERHEAD = 32  # bytes per record in the block encoding, roughly
_READ_AHEAD = 16  # data WAL reads in flight at once while a batch reads its blocks


class _OpenBlock:
    """Records waiting for the next cut; doubles as their :class:`Stored` handle."""

    __slots__ = ("_done", "_error", "acks", "nbytes", "records", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.records: list[Record] = []
        self.nbytes = 0
        self.acks: dict[str, int] = {}
        self._done = anyio.Event()
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> None:
        await self._done.wait()
        if self._error is not None:
            raise StreamletError(
                f"records of receiver {self.source!r} were not made durable: {self._error}"
            ) from self._error

    def resolve(self, error: BaseException | None = None) -> None:
        self._error = error
        self._done.set()


class _Context:
    """The :class:`ReceiverContext` of one receiver."""

    def __init__(self, generator: BlockGenerator, name: str, acks: Mapping[str, int]) -> None:
        self._generator = generator
        self._name = name
        self._acks = dict(acks)

    @property
    def name(self) -> str:
        return self._name

    @property
    def acks(self) -> Mapping[str, int]:
        return self._acks

    @property
    def stopping(self) -> anyio.Event:
        return self._generator.stopping

    async def store(
        self, records: Sequence[Record], *, acks: Mapping[str, int] | None = None
    ) -> Stored:
        return await self._generator.store(self._name, records, acks)


def throttle(
    now: float, next_free: float, count: int, rate: float, *, burst: float
) -> tuple[float, float]:
    """When a store of ``count`` records may go on at ``rate`` records/s; pure.

    A token bucket that allows ``burst`` seconds of records at once: a store
    waits until the records before it would have been taken at the rate, and
    a receiver that was idle does not save up more than the burst.

    Args:
        now: the clock's time.
        next_free: when the records stored so far are paid for at the rate.

    Returns:
        ``(start, next_free)``: when the store may go on (<= ``now``: at once),
        and when it, in turn, is paid for.
    """
    start = max(next_free, now - burst)
    return start, start + count / rate


class BlockGenerator:
    """Cuts receivers' records into blocks and makes them durable.

    Args:
        wal: the data WAL blocks are appended to.
        tracker: where ``block`` events are logged.
        interval: seconds between cuts (the block interval).
        max_block_bytes: a receiver's open block is cut early at this size.
        max_buffered_bytes: stores wait while this much is buffered or in
            flight, over all receivers.
        clock: what cuts and the rate limit read (:mod:`streamlet.clock`).
    """

    def __init__(
        self,
        *,
        wal: WriteAheadLog,
        tracker: Tracker,
        interval: float,
        max_block_bytes: int,
        max_buffered_bytes: int,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.wal = wal
        self.clock = clock
        self.tracker = tracker
        self.interval = interval
        self.max_block_bytes = max_block_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.stopping = anyio.Event()
        self._open: dict[str, _OpenBlock] = {}
        # Blocks that reached max_block_bytes, in store order, for the next cut.
        self._sealed: list[_OpenBlock] = []
        self._buffered = 0
        self._cut_now = anyio.Event()
        self._room = anyio.Condition()
        self._cut_lock = anyio.Lock()
        self._failed: BaseException | None = None
        self._closed = False
        self._writing = 0
        self._cuts = 0  # cuts that wrote blocks, for the crash points
        self._rates: dict[str, float] = {}
        self._next_free: dict[str, float] = {}

    @property
    def buffered_bytes(self) -> int:
        """Bytes stored by receivers and not yet durable (what ``max_buffered_bytes`` bounds)."""
        return self._buffered

    def set_rate(self, source: str, rate: float | None) -> None:
        """Limit receiver ``source`` to ``rate`` records/s (None: no limit); backpressure."""
        if rate is None:
            self._rates.pop(source, None)
        else:
            self._rates[source] = rate

    async def _throttle(self, source: str, count: int) -> None:
        rate = self._rates.get(source)
        if rate is None:
            return
        now = self.clock.monotonic()
        start, self._next_free[source] = throttle(
            now, self._next_free.get(source, now), count, rate, burst=self.interval
        )
        if start > now:
            await self.clock.sleep_until(start)

    def context(self, name: str) -> ReceiverContext:
        """The context for receiver ``name``, with its recovered acks."""
        return _Context(self, name, self.tracker.state.acks.get(name, {}))

    async def store(
        self, source: str, records: Sequence[Record], acks: Mapping[str, int] | None
    ) -> Stored:
        """See :meth:`ReceiverContext.store`."""
        await self._throttle(source, len(records))
        size = sum(
            len(r.value) + (len(r.key) if r.key is not None else 0) + _RECORD_OVERHEAD
            for r in records
        )
        async with self._room:
            while True:
                self._check_open(source)
                # One store larger than the whole buffer still goes through,
                # alone, rather than waiting forever.
                if self._buffered == 0 or self._buffered + size <= self.max_buffered_bytes:
                    break
                await self._room.wait()
            self._buffered += size
        block = self._open.get(source)
        if block is not None and block.records and block.nbytes + size > self.max_block_bytes:
            self._seal(block)
            block = None
        if block is None:
            block = self._open[source] = _OpenBlock(source)
        # Kept as given: a block belongs to one source, its encoding does not
        # carry the source, and every record read back gets the block's.
        block.records.extend(records)
        block.nbytes += size
        if acks:
            for key, value in acks.items():
                if value > block.acks.get(key, -math.inf):
                    block.acks[key] = value
        if block.nbytes >= self.max_block_bytes:
            self._seal(block)
        return block

    def _seal(self, block: _OpenBlock) -> None:
        """Close a full block to further stores; the next cut takes it (see the invariant)."""
        del self._open[block.source]
        self._sealed.append(block)
        self._cut_now.set()

    def _check_open(self, source: str) -> None:
        if self._failed is not None:
            raise StreamletError(
                f"receiver {source!r} cannot store: the data write-ahead log failed"
                f" ({self._failed}); the app is stopping"
            ) from self._failed
        if self._closed:
            raise StreamletError(f"receiver {source!r} cannot store: the app is stopping")

    async def run(self) -> None:
        """Cut blocks every interval (or when one is full) until cancelled.

        Raises:
            WALError: the data WAL failed; every waiting store has been failed.
        """
        clock = self.clock
        next_cut = clock.monotonic() + self.interval
        while True:
            await clock.wait(self._cut_now, next_cut)
            self._cut_now = anyio.Event()
            if clock.monotonic() >= next_cut:
                next_cut += self.interval
                if next_cut < clock.monotonic():  # fell behind: do not burst
                    next_cut = clock.monotonic() + self.interval
            await self.cut()

    async def cut(self) -> int:
        """Make every open block durable now; return how many blocks were cut."""
        async with self._cut_lock:
            # A receiver's sealed blocks hold older records than its open one.
            still_open = [b for b in self._open.values() if b.records]
            for block in still_open:
                del self._open[block.source]
            blocks = [*self._sealed, *still_open]
            self._sealed.clear()
            if not blocks:
                return 0
            self._writing += 1
            self._cuts += 1
            try:
                positions = await self.wal.append_many([encode_records(b.records) for b in blocks])
                if crash_due("block_before_tracker_event", self._cuts):
                    await anyio.sleep(CRASH_PAUSE)
                    crash_point("block_before_tracker_event", self._cuts)
                refs = [
                    (
                        BlockRef(
                            self.tracker.state.next_block_id + i,
                            b.source,
                            p.segment,
                            p.offset,
                            p.length,
                            len(b.records),
                        ),
                        b.acks,
                    )
                    for i, (b, p) in enumerate(zip(blocks, positions, strict=True))
                ]
                await self.tracker.log_blocks(refs)
                crash_point("block_after_tracker_event", self._cuts)
            except BaseException as exc:
                self._failed = exc if isinstance(exc, Exception) else StreamletError("cancelled")
                for block in blocks:
                    block.resolve(self._failed)
                self._fail_open()
                raise
            finally:
                self._writing -= 1
                released = sum(b.nbytes for b in blocks)
                async with self._room:
                    self._buffered -= released
                    self._room.notify_all()
            for block in blocks:
                block.resolve()
            return len(blocks)

    def _fail_open(self) -> None:
        for block in [*self._sealed, *self._open.values()]:
            block.resolve(self._failed)
        self._sealed.clear()
        self._open.clear()

    async def close(self) -> None:
        """Cut what is buffered, then refuse further stores (graceful stop)."""
        self.stopping.set()
        await self.cut()
        self._closed = True
        async with self._room:
            self._room.notify_all()

    async def read(self, refs: Sequence[BlockRef]) -> list[Record]:
        """The records of ``refs``, in order, read back from the data WAL.

        Up to ``_READ_AHEAD`` blocks are read at once: each read is a trip to
        a worker thread, and a batch of many small blocks would otherwise pay
        them one after another.

        Raises:
            WALError: a block cannot be read (the first failing block's error).
            StreamletError: a block cannot be decoded.
        """
        records: list[Record] = []
        for start in range(0, len(refs), _READ_AHEAD):
            group = refs[start : start + _READ_AHEAD]
            for ref, payload in zip(group, await self._read_payloads(group), strict=True):
                records.extend(self._decode(ref, payload))
        return records

    async def _read_payloads(self, refs: Sequence[BlockRef]) -> list[bytes]:
        if len(refs) == 1:
            ref = refs[0]
            return [await self.wal.read(Position(ref.segment, ref.offset, ref.length))]
        payloads = [b""] * len(refs)
        errors: list[tuple[int, Exception]] = []

        async def fetch(index: int, ref: BlockRef) -> None:
            try:
                payloads[index] = await self.wal.read(Position(ref.segment, ref.offset, ref.length))
            except Exception as exc:
                # Collected, not raised: raised in the task group, it would
                # come out wrapped in an ExceptionGroup.
                errors.append((index, exc))

        async with anyio.create_task_group() as tg:
            for index, ref in enumerate(refs):
                tg.start_soon(fetch, index, ref)
        if errors:
            raise min(errors, key=lambda error: error[0])[1]
        return payloads

    @staticmethod
    def _decode(ref: BlockRef, payload: bytes) -> list[Record]:
        try:
            return decode_records(payload, ref.source)
        except ValueError as exc:
            raise StreamletError(
                f"block {ref.id} of receiver {ref.source!r} at data WAL segment"
                f" {ref.segment} offset {ref.offset} cannot be decoded: {exc}"
            ) from exc

    async def release(self, oldest_needed: Position | None) -> None:
        """Delete data WAL segments that hold no block a batch still needs.

        Skipped while a cut is being written: its blocks are durable but not
        yet in the tracker, so nothing outside this class knows they exist.
        """
        if self._writing:
            return
        up_to = oldest_needed
        if up_to is None:
            up_to = Position(self.wal.last_segment, 0, 0)
        removed = await self.wal.clean(up_to)
        if removed:
            log.debug("removed %d data WAL segment(s) before %s", removed, up_to)
