"""Every use streamlet makes of aiokafka's private parts, checked before the first one.

aiokafka promises nothing about its internals, and streamlet leans on a few
of them; here, and nowhere else, so that a release that moves one shows up
in one place and one test (``tests/kafka/test_aiokafka_seam.py``), and
aiokafka is pinned below its next minor version for that reason.

**Records straight from the fetch buffers (the source).** aiokafka turns
every fetched record into a ConsumerRecord (a dataclass of eleven fields,
headers copied into a tuple) and the source would then turn that into a
Record: two objects and two Python-level constructions per record, the
larger share of a direct read's CPU time. Here a consumer of streamlet's
tags itself through its value_deserializer (:class:`RecordTag`), and the
fetch buffers of a tagged consumer build Records themselves. Everything
else (batches, CRCs, control batches, aborted transactions, positions)
stays aiokafka's own. The seam is the fetcher module's PartitionRecords
class, constructed once per fetched partition response, and its
``_consumer_record(tp, record)`` method. Without it nothing breaks: the tag
is an identity deserializer, the consumer converts ConsumerRecords as
before (:func:`fast_reads` is False), and a warning says that reads are
slower than they should be.

**What the sink reads of a producer.** The error that killed a producer's
sender task (ProducerFenced is reported there and nowhere else), the
transaction's end waiter and the queued batches' drain waiters (read so that
asyncio does not log their errors as never retrieved), the sender task
again to cancel a producer whose stop overran, the producer's client (the
partitions available for a topic; a raw OffsetFetch, because aiokafka's own
helpers ignore the group-level error code and would read "coordinator
loading" as "no offset"), and the record batch builder's size estimate.

**Checked at first use, installed lazily.** ``import streamlet`` imports the
public ``aiokafka`` package only and changes nothing in it: a program that
never reads Kafka through streamlet gets aiokafka as it is. The first Kafka
consumer or producer streamlet makes calls :func:`prepare`, which looks up
every part above (:func:`check`: modules, attributes, signatures, and the
attributes aiokafka's constructors set) and then installs the fast path.
Parts the code can do without fall back as they always did, with a warning
naming them; a missing part without a fallback raises a ConfigError naming
the aiokafka version and the part, before anything is read or written.
"""

from __future__ import annotations

import asyncio
import dis
import importlib
import inspect
import logging
from collections.abc import Callable
from types import CodeType, ModuleType
from typing import Any, NamedTuple

import aiokafka

from streamlet.errors import ConfigError
from streamlet.records import Record

__all__ = [
    "CONSUMER_CLOSE",
    "FALLBACKS",
    "FETCH_BUFFERS",
    "PRODUCER_FAILURE",
    "RECORD_FIELDS",
    "REQUIRED",
    "Gap",
    "RecordTag",
    "available_partitions",
    "check",
    "close_client",
    "fast_reads",
    "fetch_group_offset",
    "finish_consumer_stop",
    "partition_records",
    "prepare",
    "producer_failure",
    "record_size",
    "sender_task",
]

log = logging.getLogger(__name__)

#: Record's fields, in the order the fetch buffers (and the consumer's own
#: conversion) build them as plain tuples.
RECORD_FIELDS = (
    "value",
    "key",
    "timestamp",
    "source",
    "partition",
    "offset",
    "data",
    "headers",
)
if Record._fields != RECORD_FIELDS:
    raise RuntimeError(
        f"streamlet.records.Record has fields {Record._fields}; update streamlet.kafka._aiokafka"
        f" and streamlet.kafka._consumer, which build records as {RECORD_FIELDS}"
    )

FETCH_BUFFERS = "record-building fetch buffers"
CONSUMER_CLOSE = "close of a consumer a fetch task interrupted"
PRODUCER_FAILURE = "reading of a failed producer"
REQUIRED = "required"
#: What streamlet does without the parts of each feature that has a fallback.
FALLBACKS: dict[str, str] = {
    FETCH_BUFFERS: "Kafka reads work but take about twice the CPU",
    CONSUMER_CLOSE: (
        "a consumer close that a fetch task's cancellation interrupts (brokers down) is left"
        " unfinished; its connections close with the process"
    ),
    PRODUCER_FAILURE: (
        "a KafkaSink learns why its producer failed only from the calls that fail: a fenced"
        " producer may be taken for a broken one, asyncio may log errors as never retrieved,"
        " and a producer whose stop overruns keeps its sender task"
    ),
}


class Gap(NamedTuple):
    """A private part of aiokafka that streamlet uses and did not find as it expects."""

    part: str
    """The part, as aiokafka spells it."""
    feature: str
    """What it is for: a key of :data:`FALLBACKS`, or :data:`REQUIRED` (no fallback)."""


# -- the check -------------------------------------------------------------------


class _Gaps:
    """Collects gaps; a part whose owner is already missing is not reported again."""

    def __init__(self) -> None:
        self.found: list[Gap] = []

    def add(self, part: str, feature: str) -> None:
        self.found.append(Gap(part, feature))

    def module(self, name: str, feature: str) -> ModuleType | None:
        try:
            return importlib.import_module(name)
        except ImportError:
            self.add(f"module {name}", feature)
            return None

    def attr(self, owner: Any, name: str, where: str, feature: str) -> Any:
        if owner is None:
            return None
        value = getattr(owner, name, None)
        if value is None:
            self.add(f"{where}.{name}", feature)
        return value

    def params(
        self, fn: Any, expected: list[str], where: str, feature: str, *, prefix: bool = False
    ) -> None:
        """``fn``'s parameters are ``expected`` (or start with them)."""
        if fn is None:
            return
        try:
            names = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            names = []
        if (names[: len(expected)] if prefix else names) != expected:
            shown = ", ".join(expected) + (", ..." if prefix else "")
            self.add(f"{where}({shown}) (it takes ({', '.join(names)}))", feature)

    def sets(self, cls: Any, names: tuple[str, ...], where: str, feature: str) -> None:
        """``cls.__init__`` sets the instance attributes ``names``.

        Instance attributes cannot be looked up on the class; the names its
        constructor's code uses can.
        """
        if cls is None:
            return
        code = getattr(getattr(cls, "__init__", None), "__code__", None)
        used = set(code.co_names) if isinstance(code, CodeType) else set()
        for name in names:
            if name not in used:
                self.add(f"{where} instances' {name} (set by its __init__)", feature)


def _loads_global(code: CodeType, name: str) -> bool:
    for instruction in dis.get_instructions(code):
        if instruction.opname == "LOAD_GLOBAL" and instruction.argval == name:
            return True
    return any(_loads_global(c, name) for c in code.co_consts if isinstance(c, CodeType))


def check() -> list[Gap]:
    """Look up every private part of aiokafka streamlet uses; return what is missing or changed.

    Changes nothing (it imports aiokafka's modules); :func:`prepare` acts on
    the answer. An empty list: the installed aiokafka has all of it.
    """
    gaps = _Gaps()
    _check_fetch_buffers(gaps)
    _check_consumer_close(gaps)
    _check_producer(gaps)
    return gaps.found


def _check_fetch_buffers(gaps: _Gaps) -> None:
    feature = FETCH_BUFFERS
    fetcher = gaps.module("aiokafka.consumer.fetcher", feature)
    where = "aiokafka.consumer.fetcher.PartitionRecords"
    current = gaps.attr(fetcher, "PartitionRecords", "aiokafka.consumer.fetcher", feature)
    buffers: Any = current
    if current is partition_records:  # installed: check aiokafka's class behind it
        buffers = _AIOKAFKA_BUFFERS
    elif current is not None and (
        not isinstance(current, type) or current.__module__ != "aiokafka.consumer.fetcher"
    ):
        gaps.add(f"{where} (it is {current!r}, not aiokafka's own class)", feature)
        buffers = None
    if buffers is not None:
        gaps.params(
            buffers.__init__,
            [
                "self",
                "tp",
                "records",
                "aborted_transactions",
                "fetch_offset",
                "key_deserializer",
                "value_deserializer",
            ],
            f"{where}.__init__",
            feature,
            prefix=True,
        )
        # The fast path finds its tag where aiokafka keeps the deserializer.
        gaps.sets(buffers, ("_value_deserializer",), where, feature)
        convert = gaps.attr(buffers, "_consumer_record", where, feature)
        gaps.params(convert, ["self", "tp", "record"], f"{where}._consumer_record", feature)
        unpack = getattr(getattr(buffers, "_unpack_records", None), "__code__", None)
        if not isinstance(unpack, CodeType) or "_consumer_record" not in unpack.co_names:
            gaps.add(f"{where}._unpack_records calling self._consumer_record", feature)
    fetcher_cls = gaps.attr(fetcher, "Fetcher", "aiokafka.consumer.fetcher", feature)
    if fetcher_cls is not None and not any(
        isinstance(code := getattr(member, "__code__", None), CodeType)
        and _loads_global(code, "PartitionRecords")
        for member in vars(fetcher_cls).values()
    ):
        # Replacing the module's name would then change nothing.
        gaps.add("aiokafka.consumer.fetcher.Fetcher building PartitionRecords by name", feature)
    for module, name in (
        ("aiokafka.record.default_records", "DefaultRecord"),
        ("aiokafka.record.legacy_records", "LegacyRecord"),
    ):
        cls = gaps.attr(gaps.module(module, feature), name, module, feature)
        for field in ("value", "key", "timestamp", "offset", "headers"):
            gaps.attr(cls, field, f"{module}.{name}", feature)


def _check_consumer_close(gaps: _Gaps) -> None:
    feature = CONSUMER_CLOSE
    gaps.sets(aiokafka.AIOKafkaConsumer, ("_fetcher", "_client"), "AIOKafkaConsumer", feature)
    fetcher = gaps.module("aiokafka.consumer.fetcher", feature)
    fetcher_cls = gaps.attr(fetcher, "Fetcher", "aiokafka.consumer.fetcher", feature)
    gaps.sets(fetcher_cls, ("_pending_tasks",), "aiokafka.consumer.fetcher.Fetcher", feature)


def _check_producer(gaps: _Gaps) -> None:
    feature = PRODUCER_FAILURE
    producer = aiokafka.AIOKafkaProducer
    gaps.sets(
        producer, ("_txn_manager", "_message_accumulator", "_sender"), "AIOKafkaProducer", feature
    )
    name = "aiokafka.producer.transaction_manager"
    manager = gaps.attr(gaps.module(name, feature), "TransactionManager", name, feature)
    gaps.attr(manager, "wait_for_transaction_end", f"{name}.TransactionManager", feature)
    name = "aiokafka.producer.message_accumulator"
    accumulator = gaps.module(name, feature)
    gaps.sets(
        gaps.attr(accumulator, "MessageAccumulator", name, feature),
        ("_batches",),
        f"{name}.MessageAccumulator",
        feature,
    )
    gaps.sets(
        gaps.attr(accumulator, "MessageBatch", name, feature),
        ("_drain_waiter",),
        f"{name}.MessageBatch",
        feature,
    )
    name = "aiokafka.producer.sender"
    sender = gaps.attr(gaps.module(name, feature), "Sender", name, feature)
    gaps.attr(sender, "sender_task", f"{name}.Sender", feature)

    feature = REQUIRED
    gaps.sets(producer, ("client",), "AIOKafkaProducer", feature)
    client_module = gaps.module("aiokafka.client", feature)
    client = gaps.attr(client_module, "AIOKafkaClient", "aiokafka.client", feature)
    where = "aiokafka.client.AIOKafkaClient"
    gaps.sets(client, ("cluster",), where, feature)
    gaps.params(
        gaps.attr(client, "coordinator_lookup", where, feature),
        ["self", "coordinator_type", "coordinator_key"],
        f"{where}.coordinator_lookup",
        feature,
    )
    gaps.params(
        gaps.attr(client, "send", where, feature),
        ["self", "node_id", "request"],
        f"{where}.send",
        feature,
        prefix=True,
    )
    gaps.attr(client, "close", where, feature)
    kinds = gaps.attr(client_module, "CoordinationType", "aiokafka.client", feature)
    gaps.attr(kinds, "GROUP", "aiokafka.client.CoordinationType", feature)
    cluster = gaps.attr(
        gaps.module("aiokafka.cluster", feature), "ClusterMetadata", "aiokafka.cluster", feature
    )
    gaps.params(
        gaps.attr(
            cluster, "available_partitions_for_topic", "aiokafka.cluster.ClusterMetadata", feature
        ),
        ["self", "topic"],
        "aiokafka.cluster.ClusterMetadata.available_partitions_for_topic",
        feature,
    )
    _check_offset_fetch(gaps)
    name = "aiokafka.record.default_records"
    builder = gaps.attr(gaps.module(name, feature), "DefaultRecordBatchBuilder", name, feature)
    gaps.params(
        gaps.attr(builder, "estimate_size_in_bytes", f"{name}.DefaultRecordBatchBuilder", feature),
        ["key", "value", "headers"],
        f"{name}.DefaultRecordBatchBuilder.estimate_size_in_bytes",
        feature,
    )


def _check_offset_fetch(gaps: _Gaps) -> None:
    """OffsetFetch: the request built as :func:`fetch_group_offset` does, the answer read so."""
    feature = REQUIRED
    name = "aiokafka.protocol.commit"
    commit = gaps.module(name, feature)
    request = gaps.attr(commit, "OffsetFetchRequest", name, feature)
    gaps.params(
        getattr(request, "__init__", None),
        ["self", "consumer_group", "partitions"],
        f"{name}.OffsetFetchRequest.__init__",
        feature,
    )
    responses = [
        (key, value)
        for key, value in (vars(commit) if commit is not None else {}).items()
        if key.startswith("OffsetFetchResponse_v")
    ]
    if commit is not None and not responses:
        gaps.add(f"{name}.OffsetFetchResponse_v*", feature)
    for key, response in responses:
        schema: Any = getattr(response, "SCHEMA", None)
        names = tuple(getattr(schema, "names", ()))
        topics: Any = (
            getattr(schema.fields[names.index("topics")], "array_of", None)
            if "topics" in names
            else None
        )
        partitions = (
            getattr(topics.fields[1], "array_of", None)
            if tuple(getattr(topics, "names", ())) == ("topic", "partitions")
            else None
        )
        if tuple(getattr(partitions, "names", ()))[:4] != (
            "partition",
            "offset",
            "metadata",
            "error_code",
        ):
            gaps.add(
                f"{name}.{key} laid out as topics: [(topic, partitions: [(partition, offset,"
                " metadata, error_code, ...)])]",
                feature,
            )


# -- first use -------------------------------------------------------------------

_PREPARED = False
_FAST_READS = False
#: aiokafka's PartitionRecords and its subclass that builds Records, once installed.
_AIOKAFKA_BUFFERS: Any = None
_RECORD_BUFFERS: Any = None
#: Parts without a fallback, bound by prepare().
_GROUP: Any = None
_OFFSET_FETCH: Any = None
_ESTIMATE_SIZE: Callable[..., int] | None = None


def prepare() -> None:
    """Check aiokafka and install the fast path; once, at the first consumer or producer.

    Not at import: ``import streamlet`` must change nothing in aiokafka for
    a program that never reads Kafka through streamlet.

    Raises:
        ConfigError: a part without a fallback is missing (the message names
            the aiokafka version and the parts); checked again at the next call.
    """
    global _PREPARED, _FAST_READS, _GROUP, _OFFSET_FETCH, _ESTIMATE_SIZE
    if _PREPARED:
        return
    gaps = check()
    required = [gap.part for gap in gaps if gap.feature == REQUIRED]
    if required:
        raise ConfigError(
            f"aiokafka {aiokafka.__version__} lacks what streamlet's Kafka source and sink"
            f" use: {'; '.join(required)}. Install the aiokafka version streamlet pins"
            " (see its pyproject.toml)"
        )
    for feature, consequence in FALLBACKS.items():
        parts = [gap.part for gap in gaps if gap.feature == feature]
        if parts:
            log.warning(
                "aiokafka %s lacks %s, which streamlet's %s uses; %s. Install the aiokafka"
                " version streamlet pins.",
                aiokafka.__version__,
                "; ".join(parts),
                feature,
                consequence,
            )
    _GROUP = importlib.import_module("aiokafka.client").CoordinationType.GROUP
    _OFFSET_FETCH = importlib.import_module("aiokafka.protocol.commit").OffsetFetchRequest
    _ESTIMATE_SIZE = importlib.import_module(
        "aiokafka.record.default_records"
    ).DefaultRecordBatchBuilder.estimate_size_in_bytes
    if not any(gap.feature == FETCH_BUFFERS for gap in gaps):
        _install_record_buffers()
    _PREPARED = True


def _install_record_buffers() -> None:
    """Route aiokafka's fetch buffers through :func:`partition_records`."""
    global _FAST_READS, _AIOKAFKA_BUFFERS, _RECORD_BUFFERS
    fetcher: Any = importlib.import_module("aiokafka.consumer.fetcher")
    current = fetcher.PartitionRecords
    if current is not partition_records:
        _AIOKAFKA_BUFFERS = current
        _RECORD_BUFFERS = _record_buffers(current)
        fetcher.PartitionRecords = partition_records
    _FAST_READS = True


def fast_reads() -> bool:
    """Whether the fetch buffers of a tagged consumer build Records."""
    return _FAST_READS


# -- the consumer ------------------------------------------------------------------

_new_tuple = tuple.__new__


class RecordTag:
    """A tagged consumer's value_deserializer: where its Records say they came from."""

    __slots__ = ("headers", "source")

    def __init__(self, headers: bool) -> None:
        self.source = ""
        self.headers = headers  # carry record headers (KafkaSource(headers=True))

    def __call__(self, value: bytes | None) -> bytes | None:
        return value  # only reached when the fast path is not installed


def _record_buffers(base: Any) -> Any:
    """The subclass of aiokafka's PartitionRecords a tagged consumer's fetches use.

    Made at install, not import: the base is looked up only once it was checked.
    """

    class RecordBuffers(base):  # type: ignore[misc]
        """A tagged consumer's fetch buffer: yields Records rather than ConsumerRecords."""

        def _consumer_record(self, tp: Any, record: Any) -> Record:
            # tuple.__new__ rather than Record(...): the named tuple's __new__
            # is a Python-level call. The tuple's order is RECORD_FIELDS.
            value = record.value
            stamp = record.timestamp
            tag = self._value_deserializer
            return _new_tuple(
                Record,
                (
                    b"" if value is None else value,
                    record.key,
                    stamp / 1000.0 if stamp is not None and stamp > 0 else 0.0,
                    tag.source,
                    tp.partition,
                    record.offset,
                    None,
                    tuple(record.headers) if tag.headers else (),
                ),
            )

    return RecordBuffers


def partition_records(
    tp: Any,
    records: Any,
    aborted_transactions: Any,
    fetch_offset: int,
    key_deserializer: Any,
    value_deserializer: Any,
    *args: Any,
) -> Any:
    """Stands in for aiokafka's PartitionRecords: untagged consumers get the original."""
    cls = _RECORD_BUFFERS if type(value_deserializer) is RecordTag else _AIOKAFKA_BUFFERS
    return cls(
        tp, records, aborted_transactions, fetch_offset, key_deserializer, value_deserializer, *args
    )


async def finish_consumer_stop(consumer: Any) -> None:
    """The part of ``AIOKafkaConsumer.stop`` after a fetch task's cancellation escaped it.

    aiokafka 0.14's fetcher close cancels its fetch tasks and awaits them,
    and one that was sleeping out a retry backoff (the broker is down)
    re-raises its own CancelledError there, which leaves the rest undone.
    """
    fetcher: Any = getattr(consumer, "_fetcher", None)
    tasks = [t for t in getattr(fetcher, "_pending_tasks", ()) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    client: Any = getattr(consumer, "_client", None)
    if client is not None:
        await client.close()


# -- the producer ------------------------------------------------------------------


def _consume(future: object) -> None:
    """Read a finished future's exception, so asyncio does not log it as lost."""
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        future.exception()


def sender_task(producer: Any) -> asyncio.Task[Any] | None:
    """The producer's background sender task (None if it has none, or it cannot be found)."""
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    return task if isinstance(task, asyncio.Task) else None


def producer_failure(producer: Any) -> BaseException | None:
    """The error that killed the producer's background sender, if one did.

    aiokafka reports a fenced producer by ending its sender task with
    ProducerFenced; every later call then fails with something less telling
    (an IllegalOperation or an assertion), so this is where the real cause
    is read. Reading the transaction's end waiter too keeps asyncio from
    logging its exception as never retrieved.
    """
    manager = getattr(producer, "_txn_manager", None)
    if manager is not None:
        _consume(manager.wait_for_transaction_end())
    # A dead sender also fails each queued batch's drain waiter, which
    # nothing in aiokafka reads afterwards.
    accumulator = getattr(producer, "_message_accumulator", None)
    for batches in getattr(accumulator, "_batches", {}).values():
        for batch in batches:
            _consume(getattr(batch, "_drain_waiter", None))
    task = sender_task(producer)
    if task is not None and task.done() and not task.cancelled():
        return task.exception()
    return None


async def close_client(producer: Any) -> None:
    """Close the producer's connections (after its sender task was cancelled)."""
    await producer.client.close()


def available_partitions(producer: Any, topic: str) -> list[int]:
    """The partitions of ``topic`` that have a leader, per the producer's metadata."""
    return sorted(producer.client.cluster.available_partitions_for_topic(topic) or ())


def record_size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    """An upper bound of the bytes a record takes in a record batch."""
    assert _ESTIMATE_SIZE is not None, "prepare() comes first"
    return int(_ESTIMATE_SIZE(key, value, headers))


async def fetch_group_offset(
    producer: Any, group: str, topic: str, partition: int
) -> tuple[list[int], tuple[int, str] | None]:
    """One OffsetFetch of ``group`` for a partition, through the producer's client.

    Returns:
        Every error code of the answer (the group's, then the partitions'),
        and the committed ``(offset, metadata)`` (None: none). aiokafka's own
        helpers drop the group-level code; the caller decides on all of them.

    Raises:
        KafkaError: the coordinator lookup or the request failed.
    """
    assert _OFFSET_FETCH is not None, "prepare() comes first"
    client = producer.client
    node = await client.coordinator_lookup(_GROUP, group)
    response = await client.send(node, _OFFSET_FETCH(group, [(topic, [partition])]))
    codes = [int(getattr(response, "error_code", 0))]
    found: tuple[int, str] | None = None
    for name, partitions in response.topics:
        for number, offset, metadata, code in partitions:
            codes.append(int(code))
            if name == topic and number == partition and offset >= 0:
                found = (int(offset), str(metadata or ""))
    return codes, found
