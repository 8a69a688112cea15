"""The embedded, replayable source: deterministic records addressed by offset.

``SequenceSource`` needs no server. Record ``o`` of partition ``p`` is a pure
function of ``(p, o)``, so a batch re-run after a crash reads the same bytes,
which makes it a direct source like Kafka and the default for demos, tests
and benchmarks. Records become available at ``rate`` per second per
partition from the moment the source starts (on its monotonic clock), up
to ``limit``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from streamlet.clock import SYSTEM_CLOCK, Clock
from streamlet.errors import ConfigError
from streamlet.records import OffsetRange, Record
from streamlet.sources.base import DirectSource

__all__ = ["SequenceSource", "default_value"]


def default_value(partition: int, offset: int) -> bytes:
    """The offset as decimal text: easy to check for loss and duplicates."""
    return str(offset).encode()


class SequenceSource(DirectSource):
    """Synthetic records ``value(partition, offset)`` at a steady rate.

    Args:
        rate: records per second per partition made available; ``None``
            makes every record up to ``limit`` available at once.
        partitions: number of partitions.
        limit: offsets per partition; ``None`` for an endless stream.
        value: the record payload for ``(partition, offset)``; must be a pure
            function, or replay would not reproduce the batch.
        key: the record key for ``(partition, offset)``, or None for no key.
        name: the source's name in the app.
        max_rate: the per-batch rate limit (see :class:`DirectSource`).
        clock: what the rate is counted on and timestamps are read from
            (:mod:`streamlet.clock`; tests give a fake one).
    """

    def __init__(
        self,
        *,
        rate: float | None = 1000.0,
        partitions: int = 1,
        limit: int | None = None,
        value: Callable[[int, int], bytes] = default_value,
        key: Callable[[int, int], bytes | None] | None = None,
        name: str | None = None,
        max_rate: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(name=name, max_rate=max_rate)
        self.clock = clock
        if rate is not None and not rate > 0:
            raise ConfigError(f"SequenceSource rate must be > 0 records/s, not {rate!r}")
        if rate is None and limit is None:
            raise ConfigError("SequenceSource needs a rate or a limit (or both)")
        if partitions < 1:
            raise ConfigError(f"SequenceSource partitions must be >= 1, not {partitions!r}")
        if limit is not None and limit < 0:
            raise ConfigError(f"SequenceSource limit must be >= 0, not {limit!r}")
        self.rate = rate
        self.partitions = partitions
        self.limit = limit
        self._value = value
        self._key = key
        self._started_at: float | None = None
        self._floor: dict[int, int] = {}

    async def start(self) -> None:
        self._started_at = self.clock.monotonic()

    async def start_positions(self, partitions: Iterable[int]) -> Mapping[int, int]:
        return dict.fromkeys(partitions, 0)

    def resume_from(self, positions: Mapping[int, int]) -> None:
        """Count the rate from the positions a restarted app resumes at.

        Without this a restart would wait until the wall clock caught up with
        offsets already processed before the crash.
        """
        self._floor = dict(positions)

    async def latest(self) -> Mapping[int, int]:
        if self.rate is None or self._started_at is None:
            produced = self.limit if self.limit is not None else 0
            return {p: max(produced, self._floor.get(p, 0)) for p in range(self.partitions)}
        elapsed = self.clock.monotonic() - self._started_at
        made = int(elapsed * self.rate)
        out: dict[int, int] = {}
        for p in range(self.partitions):
            end = self._floor.get(p, 0) + made
            out[p] = end if self.limit is None else min(end, self.limit)
        return out

    async def read(self, ranges: Sequence[OffsetRange]) -> list[Record]:
        value, key, name = self._value, self._key, self.name
        now = self.clock.time()
        out: list[Record] = []
        for r in ranges:
            for offset in range(r.start, r.until):
                out.append(
                    Record(
                        value(r.partition, offset),
                        key(r.partition, offset) if key is not None else None,
                        now,
                        name,
                        r.partition,
                        offset,
                    )
                )
        return out

    def describe(self) -> str:
        return f"SequenceSource(partitions={self.partitions})"
