"""KafkaDirectSource: a Kafka topic read by offset ranges, Spark's direct API.

There is no receiver and no copy of the data in the WAL: the scheduler asks
:meth:`~KafkaDirectSource.latest` how far each partition is readable, logs
the ranges it takes, and :meth:`~KafkaDirectSource.read` fetches exactly
those records, the same ones again after a crash. See
:mod:`streamlet.kafka.source` for the settings and the guarantees.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import anyio
from aiokafka.errors import KafkaError

from streamlet.errors import SourceError, SourceUnavailableError
from streamlet.kafka._consumer import POLL, OutOfRangeFetch, kafka_error
from streamlet.kafka._link import Link
from streamlet.kafka.config import KafkaSourceConfig
from streamlet.kafka.policy import split
from streamlet.kafka.source import KafkaSource
from streamlet.records import OffsetRange, Record
from streamlet.sources.base import DirectSource

__all__ = ["KafkaDirectSource"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Cursor:
    """Where the consumer stands on a partition after a read.

    ``records`` are those fetched past the last range's ``until``, offsets
    ``[start, position)``; a read that starts at ``start`` uses them instead
    of fetching them again.
    """

    start: int
    position: int
    records: list[Record]


@dataclass(slots=True)
class _Progress:
    range: OffsetRange
    position: int
    taken: list[Record]
    spill: list[Record]
    reusable: bool = True


class KafkaDirectSource(KafkaSource, DirectSource):
    """A Kafka topic read by offset ranges (Spark's direct API); see :mod:`.source`.

    Build it with :class:`KafkaSource` (``mode="direct"``, the default).

    Args:
        config: the validated settings.
    """

    def __init__(self, config: KafkaSourceConfig) -> None:
        super().__init__(name=config.name or config.topic, max_rate=config.max_rate)
        self.config = config
        self._link = Link(config)
        self._cursors: dict[int, _Cursor] = {}
        #: The last end offsets the brokers told, and since when they have
        #: not answered (None: the last lookup succeeded).
        self._ends: dict[int, int] = {}
        self._unanswered_since: float | None = None
        #: Per partition, where the batches planned so far end (the
        #: scheduler's next start): from start_positions, resume_from, read.
        self._planned: dict[int, int] = {}

    async def start(self) -> None:
        """Connect and assign the topic's partitions.

        Raises:
            StreamletError: the brokers cannot be reached within
                ``connect_timeout`` (the message names them and what to check).
            ConfigError: the topic or a requested partition does not exist.
        """
        await self._link.connect()

    async def latest(self) -> Mapping[int, int]:
        """Per partition, one past the newest readable offset (the LSO under read_committed).

        Called at every tick, between batches. When the brokers do not
        answer within ``config.patience`` seconds, each partition's end is
        given as where the batches planned so far end (never past what the
        brokers last told): the next batch takes no new offsets, so no batch
        starts that would wait on brokers that are down, and the scheduler
        goes on ticking (and sees a stop request) instead of hanging in this
        lookup. Only when no answer came for ``fetch_timeout`` seconds in a
        row does it fail, as any other lookup does.

        Raises:
            StreamletError: no answer for ``fetch_timeout`` seconds, or a
                lookup failed for good.
        """
        link = self._link
        if link.refresh_partitions():
            self._cursors.clear()
        partitions = sorted(link.partitions)
        known = self._ends
        if any(p not in known for p in partitions):
            ends = await link.end_offsets(partitions)  # nothing to fall back on
        else:
            began = time.monotonic()
            since = self._unanswered_since
            answer: dict[int, int] | None = None
            with anyio.move_on_after(self.config.patience):
                answer = await link.end_offsets(partitions, since=since)
            if answer is None:
                if since is None:
                    self._unanswered_since = began
                    log.warning(
                        "Kafka at %s did not tell the end offsets of topic %r within %g s;"
                        " batches take no new offsets of it until it does (the app stops if"
                        " it does not answer within fetch_timeout=%g s)",
                        self.config.servers,
                        self.config.topic,
                        self.config.patience,
                        self.config.fetch_timeout,
                    )
                planned = self._planned
                return {p: min(known[p], planned.get(p, known[p])) for p in partitions}
            ends = answer
        if self._unanswered_since is not None:
            log.info("Kafka at %s answers again", self.config.servers)
        self._unanswered_since = None
        known.update(ends)
        return ends

    async def start_positions(self, partitions: Iterable[int]) -> Mapping[int, int]:
        """Apply ``start`` (and ``on_out_of_range``) to partitions streamlet has not seen."""
        positions = await self._link.start_positions(partitions)
        self._planned.update(positions)
        return positions

    def resume_from(self, positions: Mapping[int, int]) -> None:
        """Point the consumer at the next batch's starts, so it prefetches them."""
        consumer = self._link.consumer
        self._planned.update(positions)
        for partition, offset in positions.items():
            if partition in consumer.assigned:
                consumer.seek(partition, offset)
                self._cursors[partition] = _Cursor(offset, offset, [])

    async def read(self, ranges: Sequence[OffsetRange]) -> list[Record]:
        """Exactly the readable records of ``ranges``, in range and offset order.

        Raises:
            StreamletError: a partition made no progress for ``fetch_timeout``
                seconds, offsets were lost and ``on_out_of_range="fail"``, or
                the broker failed the fetch.
        """
        link = self._link
        consumer = link.consumer
        progress: dict[int, _Progress] = {}
        for r in ranges:
            if r.partition not in consumer.assigned:
                raise SourceError(
                    f"cannot read offsets [{r.start}, {r.until}) of {link.where(r.partition)}:"
                    f" this source reads partitions {sorted(consumer.assigned)} only"
                )
            if r.partition in progress:
                raise SourceError(f"two ranges for {link.where(r.partition)} in one read")
            self._planned[r.partition] = max(self._planned.get(r.partition, 0), r.until)
            cursor = self._cursors.pop(r.partition, None)
            if cursor is not None and cursor.start == r.start:
                taken, spill = split(cursor.records, r.start, r.until)
                progress[r.partition] = _Progress(r, cursor.position, taken, spill)
            else:
                consumer.seek(r.partition, r.start)
                progress[r.partition] = _Progress(r, r.start, [], [])
        active = {p for p, s in progress.items() if s.position < s.range.until}
        last_progress = time.monotonic()
        while active:
            try:
                fetched = await consumer.getmany(active, wait=POLL, source=self.name)
            except OutOfRangeFetch as exc:
                for partition, offset in exc.offsets.items():
                    state = progress.get(partition)
                    if state is None or partition not in active:
                        continue
                    r = state.range
                    target = await link.out_of_range(
                        partition,
                        offset,
                        until=r.until,
                        what=f"reading offsets [{r.start}, {r.until}) of {link.where(partition)}",
                    )
                    state.reusable = False
                    if target >= r.until:
                        active.discard(partition)
                    else:
                        consumer.seek(partition, target)
                        state.position = target
                last_progress = time.monotonic()
                continue
            except KafkaError as exc:
                raise kafka_error(
                    f"fetching from topic {self.config.topic!r} at {self.config.servers}", exc
                ) from exc
            moved = False
            for partition, records in fetched.items():
                if not records:
                    continue
                state = progress[partition]
                taken, spill = split(records, state.range.start, state.range.until)
                state.taken.extend(taken)
                state.spill.extend(spill)
                moved = True
            for partition in sorted(active):
                state = progress[partition]
                position = await consumer.position(partition)
                if position != state.position:
                    state.position = position
                    moved = True
                # Markers and aborted records are skipped without being
                # returned, so the position, not the records, says "done".
                if position >= state.range.until:
                    active.discard(partition)
            now = time.monotonic()
            if moved:
                last_progress = now
            elif active and now - last_progress > self.config.fetch_timeout:
                await self._stalled(progress, active)
        for partition, state in progress.items():
            if state.reusable:
                self._cursors[partition] = _Cursor(state.range.until, state.position, state.spill)
        out: list[Record] = []
        for r in ranges:
            out.extend(progress[r.partition].taken)
        return out

    async def _stalled(self, progress: Mapping[int, _Progress], active: Iterable[int]) -> None:
        link = self._link
        stuck = sorted(active)
        ends: dict[int, int] = {}
        # Only for the message: a broker that is down must not double the wait.
        with anyio.move_on_after(self.config.patience):
            ends = await link.end_offsets(stuck)
        details = "; ".join(
            f"{link.where(p)} at offset {progress[p].position} of range"
            f" [{progress[p].range.start}, {progress[p].range.until}), "
            + (f"readable up to {ends[p]}" if p in ends else "the brokers did not answer")
            for p in stuck
        )
        error = SourceUnavailableError(
            f"reading topic {self.config.topic!r} made no progress for"
            f" fetch_timeout={self.config.fetch_timeout:g} s: {details}. If the range"
            " reaches past what is readable, the topic was recreated or truncated since the"
            " batch was planned; otherwise check the brokers' health"
        )
        raise error

    async def commit(self, ranges: Sequence[OffsetRange]) -> None:
        """Commit each range's ``until`` to the group (with ``group_id``), for lag tools."""
        await self._link.commit({r.partition: r.until for r in ranges})

    async def aclose(self) -> None:
        """Disconnect."""
        self._cursors.clear()
        await self._link.close()

    def describe(self) -> str:
        return self.config.describe("direct")
