"""Group mode under chaos: every output once, in order, counted exactly per key, read meanwhile.

Three worker processes of tests/group/group_worker.py share a 6-partition
topic through one consumer group and copy each record to a 6-partition
output topic with a KafkaSink, keyed by the input record's key. 300,000
records of 60 keys are produced in chunks while, in an order and at moments
drawn from a seeded random generator (``STREAMLET_TEST_SEED``), workers are
SIGKILLed and started again with the same state directory (three times), a
fourth worker joins, one leaves gracefully, and one is SIGSTOPped until the
group has dropped it and then resumed (a zombie, whose commits must be
fenced).

The workers keep keyed state (``GROUP_KEY=counted``): each output carries
not the input's sequence number but the count of its key's records seen
before, from the task's state, which moves with the task through every
kill, join, leave and zombie (restored from the changelog by the new owner).

A key lives in one input partition, so in one task, and its outputs (keyed
alike, both topics with the same partition count) in one output partition.
With exactly-once state and outputs and per-partition order a
``read_committed`` reader must see each key's counts as exactly 0, 1, 2, ...
with no gap and no repeat (a state restored without a batch repeats a count;
one counted twice skips one): the reader running during the chaos checks
that record by record, and a fresh reader at the end checks all 300,000.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from streamlet.errors import StreamletError
from streamlet.kafka._group import describe_group
from tests.conftest import TopicFactory
from tests.group.support import Worker, group_settled, setup_group_app

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

RECORDS = 300_000
KEYS = 60
PARTITIONS = 6
CHUNK = 10_000
LATE_CHUNKS = 3
SESSION_TIMEOUT = 6.0  # group_worker.py's
SEED = int(os.environ.get("STREAMLET_TEST_SEED", "20261204"))
WORKER_ENV = {"GROUP_KEY": "counted", "GROUP_MAX_BATCH_RECORDS": "5000"}


def record(i: int) -> tuple[bytes, bytes]:
    """The ``i``-th input: key ``k<n>``, value ``<n>:<its sequence number within the key>``."""
    return b"k%d" % (i % KEYS), b"%d:%d" % (i % KEYS, i // KEYS)


@dataclass
class InOrder:
    """Checks a read of the output: per key, sequence numbers 0, 1, 2, ... in one partition."""

    next_seq: list[int] = field(default_factory=lambda: [0] * KEYS)
    partition_of: dict[int, int] = field(default_factory=dict)
    count: int = 0
    problems: list[str] = field(default_factory=list)
    violations: int = 0

    def take(self, rec: Any) -> None:
        self.count += 1
        index, seq = (int(part) for part in rec.value.split(b":"))
        where = f"partition {rec.partition} offset {rec.offset}"
        if rec.key != b"k%d" % index:
            self._problem(f"value {rec.value!r} under key {rec.key!r} at {where}")
        if self.partition_of.setdefault(index, rec.partition) != rec.partition:
            self._problem(f"key k{index} in partitions {self.partition_of[index]} and {where}")
        expected = self.next_seq[index]
        if seq < expected:
            self._problem(f"key k{index}: seq {seq} again (expected {expected}) at {where}")
        elif seq > expected:
            self._problem(f"key k{index}: seq {seq} after a gap (expected {expected}) at {where}")
        self.next_seq[index] = max(expected, seq + 1)

    def _problem(self, text: str) -> None:
        self.violations += 1
        if len(self.problems) < 20:
            self.problems.append(text)

    def report(self) -> str:
        return f"{self.count} records read, {self.violations} violations: {self.problems}"


async def read_output(bootstrap: str, topic: str, check: InOrder, done: Callable[[], bool]) -> None:
    """Read ``topic``'s committed records from the start into ``check`` until ``done()``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not done():
            for batch in (await consumer.getmany(timeout_ms=300, max_records=20_000)).values():
                for rec in batch:
                    check.take(rec)
    finally:
        await consumer.stop()


async def read_all(bootstrap: str, topic: str) -> InOrder:
    """A fresh read_committed read of everything committed now (up to the stable offsets)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    try:
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    check = InOrder()
    positions = dict.fromkeys(tps, 0)

    def done() -> bool:
        return all(positions[tp] >= end[tp] for tp in tps)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not done():
            for batch in (await consumer.getmany(timeout_ms=300, max_records=20_000)).values():
                for rec in batch:
                    check.take(rec)
            for tp in tps:
                positions[tp] = await consumer.position(tp)
    finally:
        await consumer.stop()
    return check


async def produce(
    bootstrap: str, topic: str, pause: Callable[[], float], chaos_over: anyio.Event
) -> None:
    """Send every record, keyed, in chunks of CHUNK with a pause after each.

    The last LATE_CHUNKS wait for the chaos to be over, so records keep
    coming through all of it however long it takes.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        for start in range(0, RECORDS, CHUNK):
            if start == RECORDS - LATE_CHUNKS * CHUNK:
                await chaos_over.wait()
            for i in range(start, start + CHUNK):
                key, value = record(i)
                await producer.send(topic, value, key=key)
            await producer.flush()
            await anyio.sleep(pause())
    finally:
        await producer.stop()


async def test_every_output_once_and_in_order_per_key_through_random_chaos(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    source, out, env = await setup_group_app(
        kafka_bootstrap, new_topic, tmp_path, partitions=PARTITIONS
    )
    group = env["GROUP_NAME"]
    rng = random.Random(SEED)  # the chaos: its events, their order, targets and gaps
    pace = random.Random(SEED + 1)  # the producer's pauses
    began = time.monotonic()
    workers: list[Worker] = []  # every process started, for the logs
    alive: dict[str, Worker] = {}
    chaos: list[str] = []
    woke: list[tuple[Worker, int]] = []  # the zombie, and its log's length when it resumed
    live = InOrder()
    produced = anyio.Event()
    chaos_over = anyio.Event()

    def note(text: str) -> None:
        chaos.append(f"{time.monotonic() - began:6.1f}s {text} (reader at {live.count})")

    def start(name: str) -> Worker:
        worker = Worker(tmp_path, name, env, WORKER_ENV)
        workers.append(worker)
        alive[name] = worker
        return worker

    async def kill() -> None:
        name = rng.choice(sorted(alive))
        note(f"SIGKILL {name}, started again")
        await anyio.to_thread.run_sync(alive.pop(name).stop, signal.SIGKILL)
        start(name)  # the same state directory

    async def join() -> None:
        note("w4 joins")
        start("w4")

    async def leave() -> None:
        name = rng.choice(sorted(alive))
        note(f"{name} leaves (SIGTERM)")
        worker = alive.pop(name)
        code = await anyio.to_thread.run_sync(worker.stop)
        assert code == 0, f"{name} left with exit code {code}\n{worker.log()}"

    async def zombie() -> None:
        name = rng.choice(sorted(alive))
        worker = alive[name]
        note(f"SIGSTOP {name}")
        worker.process.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        with anyio.fail_after(4 * SESSION_TIMEOUT):  # the group drops it after the session timeout
            while True:
                try:
                    view = await describe_group(group, kafka_bootstrap)
                    if name not in {m.worker for m in view.members}:
                        break
                except StreamletError:
                    pass
                await anyio.sleep(0.3)
        await anyio.sleep(max(0.0, 1.5 * SESSION_TIMEOUT - (time.monotonic() - paused)))
        note(f"SIGCONT {name} after {time.monotonic() - paused:.1f}s, dropped from the group")
        worker.process.send_signal(signal.SIGCONT)
        woke.append((worker, len(worker.lines)))

    events: list[Callable[[], Any]] = [kill, kill, kill, join, leave, zombie]
    rng.shuffle(events)

    async def run_chaos() -> None:
        for event in events:
            await group_settled(kafka_bootstrap, group, alive.values())
            await anyio.sleep(rng.uniform(0.2, 2.0))
            await event()
        note("chaos over")
        chaos_over.set()

    async def produce_all() -> None:
        await produce(kafka_bootstrap, source, lambda: pace.uniform(1.0, 2.0), chaos_over)
        note("all records produced")
        produced.set()

    final: InOrder | None = None
    try:
        for name in ("w1", "w2", "w3"):
            start(name)
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce_all)
            tg.start_soon(read_output, kafka_bootstrap, out, live, lambda: live.count >= RECORDS)
            await run_chaos()
            with anyio.fail_after(60):
                await produced.wait()
                while live.count < RECORDS and not live.violations:  # noqa: ASYNC110
                    await anyio.sleep(0.3)
            note("the reader during the chaos saw every record")
            tg.cancel_scope.cancel()
        await anyio.sleep(1)  # anything written twice would show up by now
        final = await read_all(kafka_bootstrap, out)
        note(f"fresh read: {final.count} records")
    finally:
        after = [
            f"the zombie {w.name} after SIGCONT: {line.strip()}"
            for w, n in woke
            for line in w.lines[n:]
            if re.search(r"fenced|taken over|owns tasks", line, re.IGNORECASE)
        ]
        logs = "\n".join(
            [f"seed {SEED}", *chaos, *after, f"live reader: {live.report()}"]
            + [w.log() for w in workers]
        )
        for worker in workers:
            worker.process.send_signal(signal.SIGCONT)  # a zombie still stopped ends too
            worker.stop(signal.SIGKILL)
    assert live.violations == 0, f"during the chaos: {live.report()}\n{logs}"
    assert final.violations == 0, f"at the end: {final.report()}\n{logs}"
    assert final.count == RECORDS, f"at the end: {final.report()}\n{logs}"
    assert final.next_seq == [RECORDS // KEYS] * KEYS, logs
    # The reader ran during the chaos: it saw outputs before the chaos was over.
    over = next(line for line in chaos if "chaos over" in line)
    assert not over.endswith("(reader at 0)"), logs
    assert os.environ.get("SHOW_GROUP_LOGS") is None, logs
