"""Receivers: sources that push records and cannot replay them.

A TCP client or a socket cannot send its data again on request, so streamlet
must make it durable before telling the sender it arrived, as Spark
Streaming's reliable receivers do. A :class:`Receiver` runs as a task and
hands records to :meth:`ReceiverContext.store`; the block generator
(:mod:`streamlet._blocks`) groups them into blocks, appends each block to the
data WAL and logs it in the tracker, and only then completes the
:class:`Stored` handle that ``store`` returned. A receiver acknowledges its
sender only after that handle completes.

Each store may carry **acks**: per key (a client id, a Kafka partition), the
highest sequence number or offset the stored records reach. They are logged
with the block, so after a restart :attr:`ReceiverContext.acks` tells the
receiver what is already durable: where to resume, and which resent records
to drop as duplicates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Protocol

import anyio

from streamlet.errors import ConfigError
from streamlet.records import Record

__all__ = ["Receiver", "ReceiverContext", "Stored"]


class Stored(Protocol):
    """The durability of one :meth:`ReceiverContext.store` call."""

    def done(self) -> bool:
        """True once the records are durable (or the store failed)."""
        ...

    async def wait(self) -> None:
        """Return once the records are durable in the data WAL and the tracker.

        Raises:
            StreamletError: the records are not durable and must not be
                acknowledged: the data WAL or the tracker log failed (that
                failure, such as a :class:`~streamlet.errors.WALError`, is the
                ``__cause__``), or the app stopped before the records' block
                was cut.
        """
        ...


class ReceiverContext(Protocol):
    """What a running receiver may do; given to :meth:`Receiver.run`."""

    @property
    def name(self) -> str:
        """The receiver's name in the app (records' ``source``)."""
        ...

    @property
    def acks(self) -> Mapping[str, int]:
        """Per ack key, the highest value logged with a durable block (recovered state)."""
        ...

    @property
    def stopping(self) -> anyio.Event:
        """Set when the app begins a graceful stop: accept no new input, then return."""
        ...

    async def store(
        self, records: Sequence[Record], *, acks: Mapping[str, int] | None = None
    ) -> Stored:
        """Queue ``records`` for the next block; wait only while the buffer is full.

        Bounded buffers are how a receiver that outruns the disk is slowed
        down: this call blocks until the block generator has room. ``source``
        of each record is set to the receiver's name.

        Raises:
            StreamletError: nothing more can be stored: the data WAL has
                failed (its error is the ``__cause__``), or the app is
                stopping and cuts no more blocks.
        """
        ...


class Receiver(ABC):
    """Base class for custom receivers.

    Subclasses implement :meth:`run`. ``run`` is started once the app's
    recovery is done, is cancelled at a hard stop, and should return soon
    after :attr:`ReceiverContext.stopping` is set (having stopped reading
    new input), so that a graceful stop can flush what was stored.

    Args:
        name: the receiver's name in the app; defaults to one derived from
            its type and set by ``App.source``.
    """

    def __init__(self, *, name: str | None = None) -> None:
        if name is not None and not name:
            raise ConfigError("a receiver's name must not be empty")
        self.name = name or ""

    @abstractmethod
    async def run(self, context: ReceiverContext) -> None:
        """Receive until ``context.stopping`` is set; store records via ``context``."""

    def describe(self) -> str:
        """Identity for the state directory's manifest: type and what it receives."""
        return type(self).__name__
