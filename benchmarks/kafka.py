"""Kafka: direct-mode consume throughput beside a plain aiokafka loop, exactly-once
Kafka → Kafka throughput, and end-to-end latency through a transactional sink.

Run from the repository root::

    python -m benchmarks.kafka                        # about 2.5 minutes
    python -m benchmarks.kafka --quick                # under a minute, a smoke test
    python -m benchmarks.kafka --bootstrap host:port  # a running broker

Without ``--bootstrap`` the embedded single-node broker of
:mod:`streamlet.testing.kafka` (the real Apache Kafka, jars cached in
``.cache/kafka``) is started on loopback and stopped at the end, also when a
case fails. Topics are made fresh for the run (4 partitions) and deleted at
the end.

What is measured
----------------
* **Consume throughput, direct mode vs plain aiokafka.** One input topic is
  filled with ``--records`` records of 100 bytes (default 1,000,000; the
  first 8 bytes of each value are its sequence number), spread evenly over
  its partitions. Then, round by round, two readers consume all of it from
  the beginning, in alternating order so that a busy neighbour slows both
  alike:

  - *streamlet*: an app with a ``KafkaSource`` in direct mode
    (``read_committed``, ``start="earliest"``) and a handler that counts
    the records of each batch and writes nothing (no sink). Each batch takes
    at most ``--batch-records`` records (``max_batch_records``), and a batch
    cut short by that bound is followed at once, so batches run back to
    back whatever the 100 ms batch interval; every batch logs its offset ranges (``alloc``, fsync'd)
    before the read and is logged done (fsync'd) after the handler, as in
    production (durability ``always``).
  - *plain*: an ``AIOKafkaConsumer`` built with the very settings
    ``KafkaSource`` gives its own consumer (``read_committed``, no group,
    the same fetch sizes), assigned every partition and seeked to the
    beginning, then a loop of ``getmany`` (200 ms timeout, as the source
    polls) that counts what it gets.

  Both are timed from the start of consumption to the last record handed
  over, connecting excluded: the plain loop from its first ``getmany`` to
  the one that returns the last record; streamlet from the start of its
  first batch (the tick's offset look-up, the ``alloc`` log and the read all
  included) to the moment its last batch is done. The figures are the
  medians of the rounds, and the ratio is streamlet's median over the plain
  loop's. Process CPU seconds per second (all threads; the broker is a
  separate process) are printed beside each rate, with the ratio in records
  per CPU-second, which depends less on what else the machine runs.

* **Exactly-once Kafka → Kafka.** The same input topic, read by a
  ``KafkaSource`` (direct, ``read_committed``, with a consumer group) into an
  identity handler whose outputs a transactional ``KafkaSink`` writes to a
  4-partition output topic, the source offsets committed in each batch's
  transaction (``consume_from``). Batches as above, one transaction each. The
  rate is the input records over the time from the start of the first batch
  to the end of the last one, when its transaction has committed. Then (not
  timed) a ``read_committed`` consumer reads the whole output topic and
  checks that every input record is there exactly once. Beside it, round by
  round in alternating order (``--rounds``), the *floor*: a hand-written
  aiokafka loop with the same guarantee (``read_committed`` ``getmany``, a
  transactional producer writing each input partition's records to the
  same output partition with the batch API, the input offsets added with
  ``send_offsets_to_transaction``, one transaction per ``--batch-records``
  records), each round into a fresh output topic, checked the same way. The
  ratio is streamlet's median rate over the floor's, and likewise per
  CPU-second.

* **End-to-end latency.** For each batch interval (50, 200 and 1000 ms) a
  fresh input and output topic and the exactly-once pipeline above (no rate
  limit). A separate process (its own event loop, so that neither the
  pipeline nor the measurement delays the other) runs a producer writing
  ``--rate`` records/s (default 5,000) to the input topic, paced by the
  clock every millisecond, each value carrying its sequence number and the
  ``time.monotonic()`` taken just before it is handed to the producer, and a
  ``read_committed`` consumer of the output topic that takes
  ``time.monotonic()`` when ``getmany`` returns and records ``visible -
  produced`` for every record. Only records produced in the measured window
  count: it opens after ``--warmup`` seconds and lasts ``--seconds``; the
  producer stops at its end and the consumer waits for every record of the
  window (and reports any seen twice). Percentiles are nearest-rank over
  every record of the window. A latency covers: producer → broker → the
  pipeline's next tick (the offset look-up sees it only once acknowledged)
  → ``alloc`` → fetch → handler → transaction (outputs, marker, source
  offsets) → commit markers → the checking consumer's fetch.

* **Produce retries.** aiokafka logs a warning for each produce request it
  retries; the benchmark counts them per case (``retries``) instead of
  printing them. Each retry waits the producer's ``retry_backoff_ms`` (100 ms
  by default), so they show in the latency tail.

Targets: direct-mode consume throughput at least 0.9 of the plain loop's;
exactly-once Kafka → Kafka at least 0.9 of the floor's throughput and 0.8
of its records per CPU-second. The exactly-once runs pass when the output
holds every input record exactly once; the latencies are reported, with no
target set.

The table goes to stdout, followed by one JSON line with every figure, the
targets and pass/fail per target; the same JSON is written to ``--json``
and a plot (latency percentiles per interval, throughput bars) to ``--plot``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from benchmarks.common import (
    PERCENTILES,
    REPO_ROOT,
    add_output_options,
    ms,
    output_paths,
    percentiles,
    work_directory,
    write_result,
)
from benchmarks.peer_pipelines import send_all
from streamlet import App, Batch
from streamlet.kafka.config import KafkaSourceConfig
from streamlet.kafka.sink import KafkaSink
from streamlet.kafka.source import KafkaSource
from streamlet.metrics import BatchInfo
from streamlet.testing.kafka import (
    KAFKA_VERSION,
    EmbeddedKafka,
    admin_client,
    wait_for_broker,
)
from streamlet.testing.kafka import create_topics as kafka_topics

PARTITIONS = 4
RECORDS = 1_000_000  # input records of the throughput runs
QUICK_RECORDS = 100_000
RECORD_SIZE = 100  # bytes of each value
BATCH_RECORDS = 100_000  # most records per batch in the throughput runs
THROUGHPUT_INTERVAL = 0.1  # batch interval of the throughput runs, seconds
INTERVALS = (0.05, 0.2, 1.0)  # batch intervals of the latency runs, seconds
INPUT_RATE = 5_000  # records/s of the latency runs
PACE = 0.001  # seconds between sends of the paced producer
POLL_MS = 200  # getmany timeout of the plain loop: the source's own poll
TARGET_RATIO = 0.9  # consume throughput: streamlet / plain aiokafka
EOS_TARGET_RATIO = 0.9  # exactly-once throughput: streamlet / the hand-written loop
EOS_TARGET_CPU_RATIO = 0.8  # exactly-once records per CPU-second: the same
DRAIN_TIMEOUT = 60.0  # seconds to wait for the last records of a window

_SEQ = struct.Struct("<q")
_STAMPED = struct.Struct("<qd")  # sequence number, time.monotonic() at produce
_SEQ_PAD = b"x" * (RECORD_SIZE - _SEQ.size)
_STAMPED_PAD = b"x" * (RECORD_SIZE - _STAMPED.size)

log = logging.getLogger("benchmarks.kafka")


class _RetryCounter(logging.Filter):
    """Counts the producers' retried produce requests, keeping their warnings out of the table.

    aiokafka logs one warning per retried request (``...retrying. Error:
    ...``); the count is reported per case instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "retrying" in record.getMessage():
            self.count += 1
            return False
        return True


#: Installed on aiokafka's producer sender logger by :func:`main`.
PRODUCE_RETRIES = _RetryCounter()


# ---- topics -----------------------------------------------------------------


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    """Create ``names`` and wait until the broker describes all their partitions."""
    async with admin_client(bootstrap) as admin:
        await kafka_topics(admin, names, partitions)


async def delete_topics(bootstrap: str, names: Sequence[str]) -> None:
    """Delete ``names``; failures are logged, not raised (this is clean-up)."""
    try:
        async with admin_client(bootstrap) as admin:
            await admin.delete_topics(list(names))
    except Exception as exc:
        log.warning("deleting topics %s failed: %r", ", ".join(names), exc)


async def fill(bootstrap: str, topic: str, records: int, partitions: int) -> float:
    """Write ``records`` values (sequence number + padding) evenly over the partitions.

    Returns:
        Seconds taken.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    began = time.monotonic()
    try:
        await producer.partitions_for(topic)
        futures = []
        pack = _SEQ.pack
        for p in range(partitions):
            seq, end = p * records // partitions, (p + 1) * records // partitions
            while seq < end:
                batch = producer.create_batch()
                while seq < end and batch.append(
                    key=None, value=pack(seq) + _SEQ_PAD, timestamp=None
                ):
                    seq += 1
                batch.close()
                futures.append(await producer.send_batch(batch, topic, partition=p))
        for future in futures:
            await future
    finally:
        await producer.stop()
    return time.monotonic() - began


def _partitions(topic: str) -> list[Any]:
    """The ``TopicPartition``s of one of the benchmark's topics (made with PARTITIONS)."""
    return [TopicPartition(topic, p) for p in range(PARTITIONS)]


# ---- consume throughput -----------------------------------------------------


@dataclass
class ConsumeRound:
    """One reader's pass over the whole topic."""

    reader: str
    """"plain" or "streamlet"."""
    records: int
    seconds: float
    cpu: float
    """Process CPU seconds (all threads) per second; 1.0 is one core busy."""
    batches: int = 0

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def per_cpu(self) -> float:
        """Records per CPU-second."""
        return self.rate / self.cpu if self.cpu else 0.0


async def consume_plain(bootstrap: str, topic: str, records: int) -> ConsumeRound:
    """The baseline: ``getmany`` with the source's own consumer settings."""
    kwargs = KafkaSourceConfig(topic, bootstrap_servers=bootstrap).consumer_kwargs()
    consumer = AIOKafkaConsumer(**kwargs)
    await consumer.start()
    try:
        tps = _partitions(topic)
        consumer.assign(tps)
        for tp, offset in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, offset)
        count = 0
        began, cpu_began = time.monotonic(), time.process_time()
        while count < records:
            fetched = await consumer.getmany(*tps, timeout_ms=POLL_MS)
            for messages in fetched.values():
                count += len(messages)
        seconds, cpu = time.monotonic() - began, time.process_time() - cpu_began
    finally:
        await consumer.stop()
    if count != records:
        raise RuntimeError(f"the plain loop read {count} records, not {records}")
    return ConsumeRound("plain", count, seconds, cpu / seconds)


class _Until:
    """A batch listener that stops ``app`` once ``records`` records are done.

    Notes when each batch is done (clock and process CPU time), for the rate.
    """

    def __init__(self, app: App, records: int) -> None:
        self.app = app
        self.records = records
        self.done = 0
        self.ready_cpu = 0.0
        """Process CPU time when the app was ready (connected, before its first tick)."""
        self.batches: list[tuple[float, float, BatchInfo]] = []

    def __call__(self, info: BatchInfo) -> None:
        self.batches.append((time.monotonic(), time.process_time(), info))
        self.done += info.records
        if self.done >= self.records:
            self.app.stop()

    def span(self) -> tuple[float, float]:
        """Seconds from the first batch's tick to the end of the last batch, and CPU seconds.

        The tick is when the first batch's offset look-up began: its end
        less its ``total_delay``. The CPU count starts when the app was
        ready, an idle moment (at most one interval) before that tick.
        """
        (first_at, _, first), (last_at, last_cpu, _) = self.batches[0], self.batches[-1]
        return last_at - (first_at - first.total_delay), last_cpu - self.ready_cpu


async def _serve_until(app: App, until: _Until) -> None:
    """Serve ``app`` until ``until`` stops it: every record done."""
    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        until.ready_cpu = time.process_time()
    if until.done < until.records:
        raise RuntimeError(f"app {app.name} stopped after {until.done} of {until.records} records")


async def consume_streamlet(
    bootstrap: str, topic: str, records: int, workdir: str, batch_records: int
) -> ConsumeRound:
    """Direct mode with a counting handler and no sink, until every record is done."""
    state = tempfile.mkdtemp(prefix="consume-", dir=workdir)
    try:
        app = App(
            f"bench-consume-{uuid.uuid4().hex[:8]}",
            state_dir=state,
            batch_interval=THROUGHPUT_INTERVAL,
            durability="always",
            max_batch_records=batch_records,
        )
        source = app.source(
            KafkaSource(topic, bootstrap_servers=bootstrap, start="earliest"),
            name="input",
        )
        counted = 0

        async def count(batch: Batch) -> list[object]:
            nonlocal counted
            counted += len(batch)
            return []

        app.handler(source, name="count")(count)
        until = _Until(app, records)
        app.add_listener(until)
        await _serve_until(app, until)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    if counted != records:
        raise RuntimeError(f"streamlet's handler saw {counted} records, not {records}")
    seconds, cpu = until.span()
    return ConsumeRound("streamlet", counted, seconds, cpu / seconds, len(until.batches))


@dataclass
class ConsumeResult:
    """Rounds of the plain loop and of streamlet, in the order they ran."""

    plain: list[ConsumeRound] = field(default_factory=list)
    streamlet: list[ConsumeRound] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    @property
    def plain_median(self) -> float:
        return statistics.median(r.rate for r in self.plain)

    @property
    def streamlet_median(self) -> float:
        return statistics.median(r.rate for r in self.streamlet)

    @property
    def ratio(self) -> float:
        return self.streamlet_median / self.plain_median

    @property
    def per_cpu_ratio(self) -> float:
        mine = statistics.median(r.per_cpu for r in self.streamlet)
        base = statistics.median(r.per_cpu for r in self.plain)
        return mine / base if base else 0.0

    @property
    def passed(self) -> bool:
        return self.ratio >= TARGET_RATIO

    def to_json(self) -> dict[str, Any]:
        return {
            "plain_records_per_s": round(self.plain_median),
            "streamlet_records_per_s": round(self.streamlet_median),
            "plain_rounds": [round(r.rate) for r in self.plain],
            "streamlet_rounds": [round(r.rate) for r in self.streamlet],
            "plain_cpu": [round(r.cpu, 2) for r in self.plain],
            "streamlet_cpu": [round(r.cpu, 2) for r in self.streamlet],
            "streamlet_batches": [r.batches for r in self.streamlet],
            "first_in_round": self.order,
            "ratio": round(self.ratio, 3),
            "ratio_per_cpu_second": round(self.per_cpu_ratio, 3),
            "target_ratio": TARGET_RATIO,
            "pass": self.passed,
        }


# ---- exactly-once Kafka → Kafka -----------------------------------------------


def _pipeline(
    name: str,
    state: str,
    bootstrap: str,
    source_topic: str,
    sink_topic: str,
    interval: float,
    max_batch_records: int = BATCH_RECORDS,
) -> App:
    """KafkaSource (direct, read_committed) → identity → transactional KafkaSink."""
    app = App(
        name,
        state_dir=state,
        batch_interval=interval,
        durability="always",
        max_batch_records=max_batch_records,
    )
    kafka = KafkaSource(source_topic, bootstrap_servers=bootstrap, group_id=name, start="earliest")
    source = app.source(kafka, name="input")

    async def copy(batch: Batch) -> list[bytes]:
        return [record.value for record in batch]

    sink = KafkaSink(sink_topic, bootstrap_servers=bootstrap, consume_from=kafka)
    app.handler(source, sink=sink, name="copy")(copy)
    return app


@dataclass
class Verdict:
    """What a read_committed consumer found in an output topic."""

    expected: int
    """Records the input had: sequence numbers ``0 .. expected - 1``."""
    records: int = 0
    """Records read."""
    distinct: int = 0
    """Distinct sequence numbers among them."""
    seen: bytearray = field(init=False, repr=False)
    """Per sequence number, whether it was read."""

    def __post_init__(self) -> None:
        self.seen = bytearray(self.expected)

    def count(self, fetched: Mapping[Any, Sequence[Any]]) -> None:
        """Count the records of one ``getmany`` (values start with their sequence number)."""
        expected, seen, unpack = self.expected, self.seen, _SEQ.unpack_from
        for messages in fetched.values():
            self.records += len(messages)
            for message in messages:
                seq = unpack(message.value)[0]
                if 0 <= seq < expected and not seen[seq]:
                    seen[seq] = 1
                    self.distinct += 1

    @property
    def duplicates(self) -> int:
        return self.records - self.distinct

    @property
    def missing(self) -> int:
        return self.expected - self.distinct

    @property
    def exactly_once(self) -> bool:
        return self.records == self.distinct == self.expected


async def read_output(bootstrap: str, topic: str, verdict: Verdict) -> None:
    """Read all of ``topic`` (read_committed), counting into ``verdict`` as it goes.

    Returns once every sequence number ``0 .. verdict.expected - 1`` was seen
    and the consumer stands at the end offsets (so an extra copy at the end
    would be counted too). Cancel it to stop early: ``verdict`` holds what
    was found until then.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        tps = _partitions(topic)
        consumer.assign(tps)
        while True:
            fetched = await consumer.getmany(*tps, timeout_ms=POLL_MS)
            verdict.count(fetched)
            if verdict.distinct == verdict.expected and not fetched:
                ends = await consumer.end_offsets(tps)
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                    return
    finally:
        with anyio.CancelScope(shield=True):
            await consumer.stop()


@dataclass
class EosResult:
    """The exactly-once Kafka → Kafka run."""

    records: int
    seconds: float
    cpu: float
    batches: list[BatchInfo]
    verdict: Verdict
    retries: int
    """Produce requests the pipeline's producer retried."""

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def passed(self) -> bool:
        return self.verdict.exactly_once

    def to_json(self) -> dict[str, Any]:
        commit = [b.commit_time for b in self.batches]
        processing = [b.processing_time for b in self.batches]
        return {
            "records": self.records,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(self.rate),
            "cpu": round(self.cpu, 2),
            "batches": len(self.batches),
            "median_batch_records": round(statistics.median(b.records for b in self.batches)),
            "median_processing_ms": ms(statistics.median(processing)),
            "median_commit_ms": ms(statistics.median(commit)),
            "produce_retries": self.retries,
            "output_records": self.verdict.records,
            "duplicates": self.verdict.duplicates,
            "missing": self.verdict.missing,
            "pass": self.passed,
        }


async def run_eos(
    bootstrap: str,
    source_topic: str,
    sink_topic: str,
    records: int,
    workdir: str,
    batch_records: int,
    verify_timeout: float,
) -> EosResult:
    """The input topic through the exactly-once pipeline; then check the output."""
    state = tempfile.mkdtemp(prefix="eos-", dir=workdir)
    retries = PRODUCE_RETRIES.count
    try:
        app = _pipeline(
            f"bench-eos-{uuid.uuid4().hex[:8]}",
            state,
            bootstrap,
            source_topic,
            sink_topic,
            THROUGHPUT_INTERVAL,
            batch_records,
        )
        until = _Until(app, records)
        app.add_listener(until)
        await _serve_until(app, until)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    retries = PRODUCE_RETRIES.count - retries
    seconds, cpu = until.span()
    verdict = Verdict(records)
    with anyio.move_on_after(verify_timeout):
        await read_output(bootstrap, sink_topic, verdict)
    batches = [b for _, _, b in until.batches]
    return EosResult(until.done, seconds, cpu / seconds, batches, verdict, retries)


@dataclass
class FloorRound:
    """One run of the hand-written exactly-once loop (the floor)."""

    records: int
    seconds: float
    cpu: float
    """Process CPU seconds (all threads) per second."""
    transactions: int
    verdict: Verdict

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(self.rate),
            "cpu": round(self.cpu, 2),
            "transactions": self.transactions,
            "duplicates": self.verdict.duplicates,
            "missing": self.verdict.missing,
            "pass": self.verdict.exactly_once,
        }


@dataclass
class EosRounds:
    """The exactly-once rounds: streamlet's pipeline and the hand-written floor, alternating."""

    streamlet: list[EosResult]
    floor: list[FloorRound]

    @property
    def median(self) -> EosResult:
        """streamlet's round of median rate."""
        return sorted(self.streamlet, key=lambda r: r.rate)[len(self.streamlet) // 2]

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.streamlet)

    @property
    def floor_rate(self) -> float:
        return statistics.median(r.rate for r in self.floor)

    @property
    def ratio(self) -> float:
        return self.rate / self.floor_rate

    @property
    def cpu_ratio(self) -> float:
        """streamlet's records per CPU-second over the floor's."""
        mine = statistics.median(r.rate / r.cpu for r in self.streamlet)
        floor = statistics.median(r.rate / r.cpu for r in self.floor)
        return mine / floor

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.streamlet) and all(
            r.verdict.exactly_once for r in self.floor
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **self.median.to_json(),
            "rounds_records_per_s": [round(r.rate) for r in self.streamlet],
            "floor": [r.to_json() for r in self.floor],
            "floor_records_per_s": round(self.floor_rate),
            "ratio": round(self.ratio, 3),
            "cpu_ratio": round(self.cpu_ratio, 3),
            "targets": {"ratio": EOS_TARGET_RATIO, "cpu_ratio": EOS_TARGET_CPU_RATIO},
            "pass": self.passed,
        }


async def eos_floor(
    bootstrap: str,
    source_topic: str,
    sink_topic: str,
    records: int,
    batch_records: int,
    verify_timeout: float,
) -> FloorRound:
    """The floor: a hand-written aiokafka loop with the same guarantee as the pipeline.

    A ``read_committed`` consumer of every input partition and a
    transactional producer; each transaction takes up to ``batch_records``
    records from ``getmany`` (what the pipeline's batches take), writes them
    to the same partition of the output with the producer's batch API, adds
    the input offsets with ``send_offsets_to_transaction`` and commits.
    Nothing is logged to disk (the pipeline logs each batch's offsets and its
    end, fsync'd): the gap between the two is streamlet's cost.
    """
    kwargs = KafkaSourceConfig(source_topic, bootstrap_servers=bootstrap).consumer_kwargs()
    consumer = AIOKafkaConsumer(**kwargs)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"bench-floor-{uuid.uuid4().hex[:8]}",
        retry_backoff_ms=10,
    )
    group = f"bench-floor-{uuid.uuid4().hex[:8]}"
    await consumer.start()
    await producer.start()
    transactions = count = 0
    try:
        tps = _partitions(source_topic)
        consumer.assign(tps)
        for tp, offset in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, offset)
        began, cpu_began = time.monotonic(), time.process_time()
        while count < records:
            taken: dict[Any, list[Any]] = {}
            size = 0
            while size < batch_records and count + size < records:
                fetched = await consumer.getmany(
                    *tps, timeout_ms=POLL_MS, max_records=batch_records - size
                )
                for tp, messages in fetched.items():
                    taken.setdefault(tp, []).extend(messages)
                    size += len(messages)
            async with producer.transaction():
                futures = await send_all(producer, sink_topic, taken)
                await producer.send_offsets_to_transaction(
                    {tp: messages[-1].offset + 1 for tp, messages in taken.items()}, group
                )
                for future in futures:
                    await future
            transactions += 1
            count += size
        seconds, cpu = time.monotonic() - began, time.process_time() - cpu_began
    finally:
        await producer.stop()
        await consumer.stop()
    verdict = Verdict(records)
    with anyio.move_on_after(verify_timeout):
        await read_output(bootstrap, sink_topic, verdict)
    return FloorRound(count, seconds, cpu / seconds, transactions, verdict)


# ---- latency: the load process ----------------------------------------------


@dataclass
class LoadSpec:
    """What the load process does; see :func:`_load_main`."""

    bootstrap: str
    source_topic: str
    sink_topic: str
    rate: float
    warmup: float
    seconds: float
    drain_timeout: float


async def _produce_paced(
    producer: Any, spec: LoadSpec, window: list[float], counts: list[int]
) -> None:
    """Send ``spec.rate`` records/s for ``warmup + seconds``; count those in the window.

    ``window`` is filled with [start, end]; ``counts`` with [sent, in window].
    """
    began = time.monotonic()
    window[:] = [began + spec.warmup, began + spec.warmup + spec.seconds]
    start, end = window
    sent = in_window = 0
    pack = _STAMPED.pack
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - began) * spec.rate) - sent
        for _ in range(due):
            stamp = time.monotonic()
            await producer.send(spec.source_topic, value=pack(sent, stamp) + _STAMPED_PAD)
            sent += 1
            if start <= stamp < end:
                in_window += 1
        await anyio.sleep(PACE)
    await producer.flush()
    counts[:] = [sent, in_window]


async def _load(spec: LoadSpec) -> dict[str, Any]:
    producer = AIOKafkaProducer(bootstrap_servers=spec.bootstrap, acks="all")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=spec.bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await producer.start()
    await consumer.start()
    try:
        await producer.partitions_for(spec.source_topic)
        tps = _partitions(spec.sink_topic)
        consumer.assign(tps)
        for tp, offset in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, offset)
        window: list[float] = [math.inf, math.inf]
        counts: list[int] = [0, 0]
        latencies = array("d")
        seen: set[int] = set()
        duplicates = 0
        producing = True

        all_seen = anyio.Event()

        async def check() -> None:
            nonlocal duplicates
            unpack = _STAMPED.unpack_from
            while producing or len(latencies) < counts[1]:
                fetched = await consumer.getmany(*tps, timeout_ms=POLL_MS)
                visible = time.monotonic()
                start, end = window
                for messages in fetched.values():
                    for message in messages:
                        seq, stamp = unpack(message.value)
                        if seq in seen:
                            duplicates += 1
                            continue
                        seen.add(seq)
                        if start <= stamp < end:
                            latencies.append(visible - stamp)
            all_seen.set()

        timed_out = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(check)
            await _produce_paced(producer, spec, window, counts)
            producing = False
            with anyio.move_on_after(spec.drain_timeout) as drained:
                await all_seen.wait()
            timed_out = drained.cancelled_caught
            tg.cancel_scope.cancel()
        return {
            "sent": counts[0],
            "in_window": counts[1],
            "latencies": latencies.tobytes(),
            "seen": len(seen),
            "duplicates": duplicates,
            "timed_out": timed_out,
        }
    finally:
        await consumer.stop()
        await producer.stop()


def _load_main(spec: LoadSpec, conn: Connection) -> None:
    """Entry point of the load process: run it, send the result (or the error) back."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result: dict[str, Any] = anyio.run(_load, spec)
    except BaseException as exc:
        conn.send({"error": repr(exc)})
        raise
    conn.send(result)
    conn.close()


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run the load process of ``spec`` (see :func:`_load_main`) and return what it measured.

    ``"latencies"`` comes back as an ``array("d")`` of seconds.

    Raises:
        RuntimeError: the load process failed, or exited without a result.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    load = context.Process(target=_load_main, args=(spec, send), name="kafka-bench-load")
    load.start()
    send.close()
    try:
        try:
            result: dict[str, Any] = await anyio.to_thread.run_sync(
                receive.recv, abandon_on_cancel=True
            )
        except EOFError:
            result = {"error": f"it exited with code {load.exitcode}"}
        await anyio.to_thread.run_sync(load.join, 30.0)
    finally:
        if load.is_alive():
            load.kill()
            load.join()
    if "error" in result:
        raise RuntimeError(f"the load process failed: {result['error']}")
    latencies = array("d")
    latencies.frombytes(result["latencies"])
    return {**result, "latencies": latencies}


# ---- latency: the pipeline --------------------------------------------------


@dataclass
class LatencyResult:
    """One latency run: a batch interval and what its window's records saw."""

    batch_interval: float
    seconds: float
    in_window: int
    measured: int
    duplicates: int
    percentiles: dict[str, float]
    """p50/p95/p99/max in seconds."""
    batches: list[BatchInfo]
    retries: int
    """Produce requests the pipeline's producer retried."""

    @property
    def passed(self) -> bool:
        return self.measured == self.in_window and self.duplicates == 0

    def to_json(self) -> dict[str, Any]:
        commit = [b.commit_time for b in self.batches]
        processing = [b.processing_time for b in self.batches]
        delay = [b.scheduling_delay for b in self.batches]
        return {
            "batch_interval_ms": round(self.batch_interval * 1e3),
            "input_records_per_s": round(self.in_window / self.seconds),
            "records": self.measured,
            "records_in_window": self.in_window,
            "duplicates": self.duplicates,
            **{f"{k}_ms": ms(v) for k, v in self.percentiles.items()},
            "batches": len(self.batches),
            "median_batch_records": (
                round(statistics.median(b.records for b in self.batches)) if self.batches else 0
            ),
            "median_processing_ms": ms(statistics.median(processing)) if processing else None,
            "median_commit_ms": ms(statistics.median(commit)) if commit else None,
            "max_scheduling_delay_ms": ms(max(delay)) if delay else None,
            "produce_retries": self.retries,
            "pass": self.passed,
        }


async def run_latency(
    bootstrap: str, workdir: str, interval: float, rate: float, seconds: float, warmup: float
) -> LatencyResult:
    """One latency run at batch ``interval``; see the module docstring."""
    tag = uuid.uuid4().hex[:8]
    source_topic, sink_topic = f"bench-lat-in-{tag}", f"bench-lat-out-{tag}"
    await create_topics(bootstrap, [source_topic, sink_topic], PARTITIONS)
    state = tempfile.mkdtemp(prefix=f"latency-{round(interval * 1e3)}ms-", dir=workdir)
    batches: list[BatchInfo] = []
    retries = PRODUCE_RETRIES.count
    try:
        app = _pipeline(f"bench-lat-{tag}", state, bootstrap, source_topic, sink_topic, interval)
        app.add_listener(batches.append)
        spec = LoadSpec(
            bootstrap, source_topic, sink_topic, rate, warmup, seconds, DRAIN_TIMEOUT + interval
        )
        async with anyio.create_task_group() as tg:
            await tg.start(app.serve)
            try:
                result = await run_load(spec)
            finally:
                app.stop()
    finally:
        shutil.rmtree(state, ignore_errors=True)
        await delete_topics(bootstrap, [source_topic, sink_topic])
    latencies = result["latencies"]
    if not latencies:
        raise RuntimeError(f"no record of the window became visible at interval {interval} s")
    if result["timed_out"]:
        log.warning(
            "interval %g s: %d of %d records of the window were not seen within %g s",
            interval,
            result["in_window"] - len(latencies),
            result["in_window"],
            spec.drain_timeout,
        )
    return LatencyResult(
        batch_interval=interval,
        seconds=seconds,
        in_window=result["in_window"],
        measured=len(latencies),
        duplicates=result["duplicates"],
        percentiles=percentiles(latencies),
        batches=[b for b in batches if not b.recovered],
        retries=PRODUCE_RETRIES.count - retries,
    )


# ---- output -------------------------------------------------------------------


def print_consume(result: ConsumeResult, records: int, batch_records: int) -> None:
    print(
        f"Direct-mode consume throughput: {records:,} records of {RECORD_SIZE} B,"
        f" {PARTITIONS} partitions, read_committed; streamlet batches of at most"
        f" {batch_records:,} records, interval {THROUGHPUT_INTERVAL * 1e3:.0f} ms"
    )
    header = (
        f"{'round':>6} {'first':>9} {'plain rec/s':>12} {'cpu':>5} {'rec/cpu-s':>10}"
        f" {'streamlet rec/s':>16} {'cpu':>5} {'rec/cpu-s':>10} {'batches':>8} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    rounds = zip(result.plain, result.streamlet, result.order, strict=True)
    for i, (plain, mine, first) in enumerate(rounds, 1):
        print(
            f"{i:>6} {first:>9} {plain.rate:>12,.0f} {plain.cpu:>5.2f} {plain.per_cpu:>10,.0f}"
            f" {mine.rate:>16,.0f} {mine.cpu:>5.2f} {mine.per_cpu:>10,.0f} {mine.batches:>8}"
            f" {mine.rate / plain.rate:>6.3f}"
        )
    verdict = "met" if result.passed else "NOT met"
    print(
        f"{'median':>6} {'':>9} {result.plain_median:>12,.0f} {'':>16}"
        f" {result.streamlet_median:>16,.0f} {'':>25} {result.ratio:>6.3f}"
        f"  target ≥ {TARGET_RATIO}: {verdict}"
    )
    print(
        "cpu: process CPU seconds per second (all threads; the broker not included);"
        f" streamlet/plain in records per CPU-second: {result.per_cpu_ratio:.3f}"
    )


def print_eos(rounds: EosRounds, consume: ConsumeResult) -> None:
    result = rounds.median
    j = result.to_json()
    print(
        f"\nExactly-once Kafka → Kafka: KafkaSource (direct, read_committed) → identity →"
        f" KafkaSink (transactional, source offsets in the transaction), {PARTITIONS} → "
        f"{PARTITIONS} partitions"
    )
    header = (
        f"{'records':>10} {'seconds':>8} {'rec/s':>9} {'cpu':>5} {'batches':>8}"
        f" {'rec/batch':>10} {'proc ms':>8} {'txn ms':>8} {'retries':>8} {'vs direct':>10}"
        "  output"
    )
    print(header)
    print("-" * len(header))
    verdict = result.verdict
    check = (
        "every record exactly once"
        if verdict.exactly_once
        else f"NOT exactly once: {verdict.duplicates} duplicate(s), {verdict.missing} missing"
    )
    print(
        f"{result.records:>10,} {result.seconds:>8.2f} {result.rate:>9,.0f} {result.cpu:>5.2f}"
        f" {len(result.batches):>8} {j['median_batch_records']:>10,}"
        f" {j['median_processing_ms']:>8.1f} {j['median_commit_ms']:>8.1f}"
        f" {result.retries:>8} {result.rate / consume.streamlet_median:>10.3f}  {check}"
    )
    print(
        "proc/txn ms: medians per batch of read + handler time and of the sink's transaction"
        " (+ done log); retries: produce requests the sink's producer retried; vs direct:"
        " over the median direct-mode consume rate"
    )
    floor_ok = all(r.verdict.exactly_once for r in rounds.floor)
    print(
        f"\nThe floor, a hand-written aiokafka transactional loop (read_committed getmany,"
        f" batch API, offsets in the transaction, {rounds.floor[0].transactions} transactions),"
        f" medians of {len(rounds.floor)} rounds alternating with streamlet's:"
    )
    mine_cpu = statistics.median(r.rate / r.cpu for r in rounds.streamlet)
    floor_cpu = statistics.median(r.rate / r.cpu for r in rounds.floor)
    print(
        f"  streamlet {rounds.rate:>9,.0f} rec/s, {1e6 / mine_cpu:.2f} µs CPU/record;"
        f" floor {rounds.floor_rate:>9,.0f} rec/s, {1e6 / floor_cpu:.2f} µs CPU/record"
        f" ({'every record once' if floor_ok else 'NOT exactly once'})"
    )
    print(
        f"  ratio {rounds.ratio:.2f} (target ≥ {EOS_TARGET_RATIO}:"
        f" {'met' if rounds.ratio >= EOS_TARGET_RATIO else 'not met'}), per CPU-second"
        f" {rounds.cpu_ratio:.2f} (target ≥ {EOS_TARGET_CPU_RATIO}:"
        f" {'met' if rounds.cpu_ratio >= EOS_TARGET_CPU_RATIO else 'not met'})"
    )


def print_latency(results: Sequence[LatencyResult], rate: float) -> None:
    print(
        f"\nEnd-to-end latency, produce → visible to a read_committed consumer of the output;"
        f" exactly-once pipeline, {rate:,.0f} records/s"
    )
    header = (
        f"{'batch':>7} {'in rec/s':>9} {'records':>8} {'p50 ms':>8} {'p95 ms':>8}"
        f" {'p99 ms':>8} {'max ms':>8} {'rec/batch':>10} {'proc ms':>8} {'txn ms':>8}"
        f" {'retries':>8}  output"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        j = r.to_json()
        check = "every record once"
        if r.measured != r.in_window:
            check = f"{r.in_window - r.measured} record(s) NOT seen"
        if r.duplicates:
            check += f", {r.duplicates} DUPLICATE(S)"
        print(
            f"{j['batch_interval_ms']:>4} ms {j['input_records_per_s']:>9,} {r.measured:>8,}"
            f" {j['p50_ms']:>8.1f} {j['p95_ms']:>8.1f} {j['p99_ms']:>8.1f} {j['max_ms']:>8.1f}"
            f" {j['median_batch_records']:>10,} {j['median_processing_ms']:>8.1f}"
            f" {j['median_commit_ms']:>8.1f} {r.retries:>8}  {check}"
        )
    print(
        "proc/txn ms: medians per batch of read + handler time and of the sink's transaction"
        " (+ done log); retries: produce requests the sink's producer retried, each after"
        " its retry_backoff_ms"
    )


def plot(
    consume: ConsumeResult,
    eos: EosRounds,
    latency: Sequence[LatencyResult],
    rate: float,
    path: str,
) -> None:
    """Latency percentiles per batch interval; throughput bars beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (lat_ax, tput_ax) = plt.subplots(
        1, 2, figsize=(11, 4.4), dpi=100, gridspec_kw={"width_ratios": [3, 2]}
    )
    width = 0.2
    for i, (name, _) in enumerate(PERCENTILES):
        xs = [k + (i - 1.5) * width for k in range(len(latency))]
        bars = lat_ax.bar(xs, [r.percentiles[name] * 1e3 for r in latency], width, label=name)
        if name in ("p50", "p99"):
            lat_ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    for k, r in enumerate(latency):
        lat_ax.hlines(
            r.batch_interval * 1e3,
            k - 2 * width,
            k + 2 * width,
            colors="black",
            linestyles="dotted",
            label="batch interval" if k == 0 else "_nolegend_",
        )
    lat_ax.set_xticks(range(len(latency)))
    lat_ax.set_xticklabels([f"batch {r.batch_interval * 1e3:.0f} ms" for r in latency])
    lat_ax.set_yscale("log")
    top = max(r.percentiles["max"] for r in latency) * 1e3
    bottom = min(r.percentiles["p50"] for r in latency) * 1e3
    lat_ax.set_ylim(max(1.0, bottom / 3), top * 3)
    lat_ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    lat_ax.set_ylabel("produce → visible to read_committed (ms)")
    lat_ax.set_title(f"end-to-end latency, exactly-once, {rate:,.0f} records/s", fontsize=10)
    lat_ax.legend(fontsize=8, ncols=3, loc="upper left")
    lat_ax.grid(axis="y", which="both", alpha=0.3)

    labels = [
        "plain aiokafka\ngetmany",
        "streamlet\ndirect",
        "hand-written\nexactly-once",
        "streamlet\nexactly-once",
    ]
    values = [consume.plain_median, consume.streamlet_median, eos.floor_rate, eos.rate]
    bars = tput_ax.bar(labels, [v / 1e3 for v in values], color=["#999999", "C0", "#999999", "C2"])
    tput_ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    tput_ax.axhline(
        TARGET_RATIO * consume.plain_median / 1e3,
        color="black",
        linestyle="dashed",
        linewidth=1,
        label=f"{TARGET_RATIO}x plain",
    )
    tput_ax.set_ylabel("thousand records/s")
    verdict = "met" if consume.passed else "not met"
    tput_ax.set_title(
        f"throughput; direct/plain {consume.ratio:.2f} (target ≥ {TARGET_RATIO}: {verdict})\n"
        f"exactly-once/hand-written {eos.ratio:.2f} (per CPU-second {eos.cpu_ratio:.2f})",
        fontsize=10,
    )
    tput_ax.set_ylim(0, max(values) / 1e3 * 1.2)
    tput_ax.legend(fontsize=8, loc="upper right")
    tput_ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---- main -------------------------------------------------------------------


@dataclass
class Settings:
    """The run's settings, from the command line."""

    records: int
    rounds: int
    batch_records: int
    rate: float
    seconds: float
    warmup: float
    case_timeout: float
    """Seconds each case may take (a latency run: this plus its warm-up and window)."""


async def run_all(
    bootstrap: str, workdir: str, settings: Settings, report: Callable[[str], None]
) -> tuple[ConsumeResult, EosRounds, list[LatencyResult]]:
    """Every case, in order, on ``bootstrap``; topics made and deleted here.

    Each case must finish within ``settings.case_timeout`` seconds.
    """
    tag = uuid.uuid4().hex[:8]
    source_topic = f"bench-in-{tag}"
    limit = settings.case_timeout
    outputs: list[str] = []
    await create_topics(bootstrap, [source_topic], PARTITIONS)
    try:
        with anyio.fail_after(limit):
            took = await fill(bootstrap, source_topic, settings.records, PARTITIONS)
        report(f"filled {source_topic} with {settings.records:,} records in {took:.1f} s\n")
        consume = ConsumeResult()
        for i in range(settings.rounds):
            order = ("plain", "streamlet") if i % 2 == 0 else ("streamlet", "plain")
            consume.order.append(order[0])
            for reader in order:
                gc.collect()
                with anyio.fail_after(limit):
                    if reader == "plain":
                        consume.plain.append(
                            await consume_plain(bootstrap, source_topic, settings.records)
                        )
                    else:
                        consume.streamlet.append(
                            await consume_streamlet(
                                bootstrap,
                                source_topic,
                                settings.records,
                                workdir,
                                settings.batch_records,
                            )
                        )
        print_consume(consume, settings.records, settings.batch_records)
        sys.stdout.flush()
        eos_rounds: list[EosResult] = []
        floor_rounds: list[FloorRound] = []
        for i in range(settings.rounds):
            order = ("floor", "streamlet") if i % 2 == 0 else ("streamlet", "floor")
            for writer in order:
                out = f"bench-out-{writer}-{i}-{tag}"
                await create_topics(bootstrap, [out], PARTITIONS)
                outputs.append(out)
                gc.collect()
                with anyio.fail_after(limit):
                    if writer == "floor":
                        floor_rounds.append(
                            await eos_floor(
                                bootstrap,
                                source_topic,
                                out,
                                settings.records,
                                settings.batch_records,
                                verify_timeout=limit / 2,
                            )
                        )
                    else:
                        eos_rounds.append(
                            await run_eos(
                                bootstrap,
                                source_topic,
                                out,
                                settings.records,
                                workdir,
                                settings.batch_records,
                                verify_timeout=limit / 2,
                            )
                        )
        eos = EosRounds(eos_rounds, floor_rounds)
        print_eos(eos, consume)
        sys.stdout.flush()
    finally:
        await delete_topics(bootstrap, [source_topic, *outputs])
    latency: list[LatencyResult] = []
    for interval in INTERVALS:
        gc.collect()
        with anyio.fail_after(limit + settings.warmup + settings.seconds):
            latency.append(
                await run_latency(
                    bootstrap, workdir, interval, settings.rate, settings.seconds, settings.warmup
                )
            )
    print_latency(latency, settings.rate)
    return consume, eos, latency


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kafka",
        description="Direct-mode consume throughput beside a plain aiokafka loop, exactly-once "
        "Kafka → Kafka throughput, and end-to-end latency at batch intervals of 50, 200 "
        "and 1000 ms.",
    )
    parser.add_argument(
        "--bootstrap",
        help="host:port of a running broker (default: start the embedded one, stop it after)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="about a minute in all: a smoke test, noisy figures"
    )
    parser.add_argument(
        "--records",
        type=int,
        help=f"input records of the throughput runs (default {RECORDS:,}, or"
        f" {QUICK_RECORDS:,} with --quick)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds of the consume and exactly-once cases, each alternating streamlet and its"
        " floor (default 5, or 1 with --quick)",
    )
    parser.add_argument(
        "--batch-records",
        type=int,
        default=BATCH_RECORDS,
        help="most records per batch in the throughput runs",
    )
    parser.add_argument(
        "--rate", type=float, default=INPUT_RATE, help="records/s of the latency runs"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="measured seconds per latency run (default 20, or 3 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds before each latency window (default 2, or 1 with --quick)",
    )
    parser.add_argument(
        "--dir",
        help="where state directories (and the embedded broker) go (default: a temporary"
        " directory in the repository, on its file system); removed afterwards",
    )
    add_output_options(parser, "kafka", "(latency percentiles per interval, throughput bars)")
    args_given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_given)
    quick = args.quick
    plot_path, json_path = output_paths(args, "kafka")
    settings = Settings(
        records=args.records or (QUICK_RECORDS if quick else RECORDS),
        rounds=args.rounds or (1 if quick else 5),
        batch_records=args.batch_records,
        rate=args.rate,
        seconds=args.seconds if args.seconds is not None else (3.0 if quick else 20.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if quick else 2.0),
        case_timeout=600.0,
    )
    if not (
        settings.records >= PARTITIONS
        and settings.rounds > 0
        and settings.batch_records >= PARTITIONS
        and settings.rate > 0
        and settings.seconds > 0
        and settings.warmup >= 0
    ):
        parser.error("--records, --rounds, --batch-records, --rate and --seconds must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka.producer.sender").addFilter(PRODUCE_RETRIES)

    workdir, _ = work_directory(args.dir, "kafka")
    broker: EmbeddedKafka | None = None
    try:
        if args.bootstrap:
            bootstrap = args.bootstrap
            wait_for_broker(bootstrap, timeout=30)
            where = f"broker at {bootstrap}"
        else:
            broker = EmbeddedKafka(
                work_dir=os.path.join(workdir, "broker"),
                cache_dir=os.environ.get("STREAMLET_KAFKA_CACHE", REPO_ROOT / ".cache" / "kafka"),
            )
            # The client logs every refused connection while the broker starts.
            client_log = logging.getLogger("aiokafka")
            client_log.setLevel(logging.CRITICAL)
            try:
                broker.start()
            finally:
                client_log.setLevel(logging.NOTSET)
            bootstrap = broker.bootstrap
            where = (
                f"embedded Kafka {KAFKA_VERSION} at {bootstrap}"
                f" (started in {broker.startup_seconds:.1f} s)"
            )
        print(
            f"streamlet Kafka benchmark: {where}; {os.cpu_count()} CPUs,"
            f" load {os.getloadavg()[0]:.2f}, Python {platform.python_version()};"
            f" {settings.records:,} records x {settings.rounds} consume round(s),"
            f" latency {settings.warmup:g} s warm-up + {settings.seconds:g} s per interval\n"
        )
        sys.stdout.flush()
        consume, eos, latency = anyio.run(
            run_all, bootstrap, workdir, settings, lambda line: print(line, flush=True)
        )
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "benchmark": "kafka",
        "command": " ".join(["python -m benchmarks.kafka", *args_given]),
        "quick": quick,
        "cpus": os.cpu_count(),
        "broker": f"embedded Kafka {KAFKA_VERSION}" if broker is not None else "external",
        "partitions": PARTITIONS,
        "records": settings.records,
        "record_size": RECORD_SIZE,
        "batch_records": settings.batch_records,
        "throughput_batch_interval_ms": round(THROUGHPUT_INTERVAL * 1e3),
        "consume": consume.to_json(),
        "exactly_once": eos.to_json(),
        "latency_input_rate": settings.rate,
        "latency_seconds": settings.seconds,
        "latency_warmup": settings.warmup,
        "latency": [r.to_json() for r in latency],
        "targets": {
            "consume_ratio": TARGET_RATIO,
            "exactly_once_ratio": EOS_TARGET_RATIO,
            "exactly_once_cpu_ratio": EOS_TARGET_CPU_RATIO,
        },
        "pass": {
            "consume_ratio": consume.passed,
            "exactly_once_ratio": eos.ratio >= EOS_TARGET_RATIO,
            "exactly_once_cpu_ratio": eos.cpu_ratio >= EOS_TARGET_CPU_RATIO,
            "exactly_once_output": eos.passed,
            **{f"latency_{round(r.batch_interval * 1e3)}ms_output": r.passed for r in latency},
        },
    }
    plot(consume, eos, latency, settings.rate, plot_path)
    write_result(result, json_path, plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
