"""What a source must do for streamlet to replay it.

A **direct source** is replayable by offset (Kafka, the embedded sequence
source): at batch time the scheduler asks how far each partition has data
(:meth:`DirectSource.latest`), fixes a range ``[start, until)`` per partition,
logs it durably, and only then reads exactly those records
(:meth:`DirectSource.read`). A re-run after a crash reads the same range and
so the same records. After the batch's sinks committed, the scheduler calls
:meth:`DirectSource.commit` so the source's own bookkeeping (a Kafka consumer
group) can follow; streamlet's log, not the source, is the source of truth
for where the next batch starts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence

from streamlet.errors import ConfigError
from streamlet.records import OffsetRange, Record

__all__ = ["DirectSource"]


class DirectSource(ABC):
    """A source that can be read again by offset range.

    Args:
        name: the source's name in the app; defaults to one derived from the
            source's type and set by ``App.source``.
        max_rate: the most records per second per partition a batch may take
            (``None``: no limit). A batch over ``interval`` seconds takes at
            most ``max_rate * interval`` offsets per partition.
    """

    def __init__(self, *, name: str | None = None, max_rate: float | None = None) -> None:
        if max_rate is not None and not max_rate > 0:
            raise ConfigError(f"max_rate must be a positive number of records/s, not {max_rate!r}")
        self.name = name or ""
        self.max_rate = max_rate

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; called once before any other call."""

    @abstractmethod
    async def latest(self) -> Mapping[int, int]:
        """Per partition, the offset one past the last record available now."""

    @abstractmethod
    async def start_positions(self, partitions: Iterable[int]) -> Mapping[int, int]:
        """Where to start ``partitions`` that streamlet's state knows nothing of."""

    @abstractmethod
    async def read(self, ranges: Sequence[OffsetRange]) -> list[Record]:
        """Exactly the records of ``ranges``, in partition and offset order."""

    def resume_from(self, positions: Mapping[int, int]) -> None:  # noqa: B027 - optional hook
        """Called once after recovery with the positions the next batch starts at."""

    async def commit(self, ranges: Sequence[OffsetRange]) -> None:  # noqa: B027 - optional hook
        """Tell the source a batch covering ``ranges`` is durable downstream."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Disconnect; called once at shutdown."""

    def describe(self) -> str:
        """Identity for the state directory's manifest: type and what it reads."""
        return type(self).__name__
