"""The sink contract: how a batch's outputs become durable exactly once.

The scheduler calls :meth:`Sink.commit` once per handler per batch, after the
handler returned and before any source position advances. ``commit`` returns
only when the outputs are durable, and it is idempotent by batch id: after a
crash, the scheduler re-runs every batch that was allocated but not done, and
a sink that finds the batch already committed does nothing. That rule, plus
the same input on re-run, is what makes a pipeline exactly-once.

A sink that cannot keep the rule (a print, an HTTP call) says so with
``guarantee = "at-least-once"``; the app logs the weaker guarantee at start.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar, Literal, NamedTuple

import orjson

from streamlet.errors import ConfigError
from streamlet.records import Batch

__all__ = ["Guarantee", "Sink", "SinkContext", "ddl_scripts", "encode_output", "sink_ahead"]

Guarantee = Literal["exactly-once", "at-least-once"]


class SinkContext(NamedTuple):
    """Who is writing: handed to :meth:`Sink.open` once, before any commit."""

    app: str
    """The app's name; part of the idempotency key."""
    handler: str
    """The handler's name; one sink instance serves one handler."""
    state_dir: str
    """The app's state directory (a sink may keep bookkeeping under it)."""
    state_id: str = ""
    """The state directory's identity, made once when it is created.

    Batch ids count from 1 in every new state directory, so outputs written
    under one state directory must never be checked against the batch ids of
    another: a sink records this id with its bookkeeping and refuses a
    different one ("" means unknown and is not checked).
    """
    allocated: int | None = None
    """The newest batch id the state directory allocated (None: unknown).

    A sink holding a higher one is ahead of the state (see
    :func:`sink_ahead`); the app checks every sink after opening it, and a
    sink may check earlier, before it does anything a refused start must
    not do (KafkaSink: before it fences the producer of another worker).
    """
    group: str | None = None
    """The consumer group of group mode (None: one worker runs the app).

    In group mode every batch belongs to one *task*, partition ``p`` of each
    of the app's Kafka sources, and its offset ranges are all of partition
    ``p``. Batch ids are then local to a worker and mean nothing to a sink:
    an exactly-once sink keys what it committed by the input offsets of each
    task instead (see :meth:`Sink.acquire`).
    """
    source_topics: Mapping[str, str] = MappingProxyType({})
    """Source name → Kafka topic, for the app's Kafka sources."""
    changelog: str | None = None
    """Group mode, a handler with keyed state: its changelog topic, which the
    sink writes in its task transactions (``commit_changelog``)."""


class Sink(ABC):
    """Where a handler's outputs go; see the module docstring for the rules."""

    guarantee: ClassVar[Guarantee] = "exactly-once"

    async def open(self, context: SinkContext) -> None:  # noqa: B027 - optional hook
        """Prepare to write (create tables, directories); called once."""

    @abstractmethod
    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        """Make ``outputs`` of ``batch`` durable and visible, at most once.

        Returns:
            True if this call wrote the batch, False if the batch had been
            committed before (a re-run after a crash) and nothing was done.

        Raises:
            SinkError: the outputs could not be made durable; nothing of the
                batch is visible (sinks commit atomically). Raise
                :class:`~streamlet.errors.SinkUnavailableError` when trying
                again may pass (a service that is down, a full disk): a
                SinkError is not retriable, and the scheduler retries only
                retriable errors and exceptions that are not StreamletErrors.
            OutputError: an output cannot be written (it does not encode,
                is too large, is refused by the user's own code): the handler
                counts as failed, without retries.
        """

    async def last_committed(self) -> int | None:
        """The newest batch id this sink committed for its app, handler and state directory.

        Called after :meth:`open`. The app refuses to start when it is above
        every batch its state directory allocated (a state directory restored
        from a backup older than the sink): new batches would reuse ids the
        sink holds and be skipped. None (the default) means the sink does not
        know, as at-least-once sinks do not; 0 means nothing was committed.
        """
        return None

    async def acquire(self, task: int) -> Mapping[str, int] | None:
        """Group mode: take task ``task`` over; return where its input resumes.

        Called when this worker is assigned the task, before any batch of it.
        An exactly-once sink first fences every earlier owner of the task (a
        worker that lost it in a rebalance but may still be running), then
        reads what the task committed last: the result maps each source name
        to the next offset of its partition ``task`` to read. A source absent
        from it has no committed position in this sink (the app falls back
        to the source's start). None (the default) means the sink keeps no
        positions (at-least-once sinks).

        Raises:
            SinkError: the task could not be taken over (the app retries).
        """
        return None

    async def release(self, task: int) -> None:  # noqa: B027 - optional hook
        """Group mode: task ``task`` moved to another worker; drop what serves it."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once at shutdown."""

    def describe(self) -> str:
        """A short name for logs and the state-dir manifest."""
        return type(self).__name__


def ddl_scripts(sink: str, table_ddl: str | Sequence[str] | None) -> list[str]:
    """A database sink's ``table_ddl`` as a list of scripts; pure.

    Raises:
        ConfigError: it is neither a str nor a sequence of str.
    """
    if table_ddl is None:
        return []
    if isinstance(table_ddl, str):
        return [table_ddl]
    scripts = list(table_ddl)
    if not all(isinstance(s, str) for s in scripts):
        raise ConfigError(f"{sink} table_ddl must be a str or a list of str")
    return scripts


def encode_output(output: object) -> bytes:
    """One output as bytes: bytes as they are, str as UTF-8, anything else as JSON.

    Raises:
        TypeError: the output is not bytes, str or JSON-serializable.
    """
    if isinstance(output, bytes):
        return output
    if isinstance(output, str):
        return output.encode()
    return orjson.dumps(output, option=orjson.OPT_NON_STR_KEYS)


def sink_ahead(
    handler: str, sink: str, committed: int | None, allocated: int | None, state_dir: str
) -> str | None:
    """Why a sink is ahead of its state directory, or None when it is not; pure.

    Args:
        handler: the handler the sink serves.
        sink: the sink's description.
        committed: the newest batch id the sink committed for this app,
            handler and state directory (None: the sink cannot tell).
        allocated: the newest batch id the state directory allocated
            (None: unknown).
        state_dir: the state directory's path, for the message.
    """
    if committed is None or allocated is None or committed <= allocated:
        return None
    return (
        f"sink {sink} of handler {handler!r} holds batches up to {committed}, but state_dir"
        f" {state_dir} allocated batches only up to {allocated}: the state directory is"
        " older than the sink's outputs, as after restoring a backup of the state"
        " directory alone, or after its tracker log lost its tail (a power loss with"
        " durability other than 'always'). New batches"
        f" {allocated + 1}..{committed} would be skipped by the sink as already committed"
        " and their input lost, so the app does not start. Restore the newest copy of the"
        " state directory, or restore the state directory and the sink's outputs from the"
        " same backup (taken while the app was stopped); to start over, use a new"
        " state_dir together with a new sink location"
    )
