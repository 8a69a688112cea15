"""The Kafka chaos pipelines: a broker of their own, input produced to it, output read back.

Each pipeline starts an :class:`~streamlet.testing.kafka.EmbeddedKafka` so
that a scenario (``broker_kill``) may kill and restart it under a running
worker. The worker reads topic ``input`` with a ``KafkaSource`` and writes
topic ``output`` with a transactional ``KafkaSink`` besides the file and
SQLite sinks.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Literal

import anyio

from streamlet._tracker import TrackerState
from streamlet.testing.chaos.config import KafkaInput, SourceConfig
from streamlet.testing.chaos.inputs import FedPipeline, quiet

__all__ = ["KafkaPipeline", "KafkaReceiverPipeline"]


class KafkaPipeline(FedPipeline):
    """A direct ``KafkaSource`` to a transactional ``KafkaSink``, besides the file and SQLite sinks.

    The pipeline runs its own broker (:class:`~streamlet.testing.kafka.EmbeddedKafka`,
    jars from ``STREAMLET_KAFKA_CACHE`` or its default cache), so that a
    scenario may kill and restart it. Input is produced to a
    3-partition topic, key ``k<p>`` to partition ``p``, paced by worker
    uptime. The output topic is read with ``read_committed``.
    """

    name = "kafka"
    receiver = False
    mode: Literal["direct", "receiver"] = "direct"
    feeder = "Kafka"
    partitions = 3
    sinks = (("file", "to_files"), ("sqlite", "to_db"), ("kafka", "to_kafka"))

    def __init__(self, workdir: Path, *, records: int, pace: float, dead_letter: bool) -> None:
        from streamlet.testing.kafka import EmbeddedKafka

        super().__init__(workdir, records=records, pace=pace, dead_letter=dead_letter)
        quiet("aiokafka")  # its clients report every broker outage the scenario causes
        self.broker = EmbeddedKafka(
            work_dir=workdir / "kafka", cache_dir=os.environ.get("STREAMLET_KAFKA_CACHE")
        )
        self._started = False
        self._produced = 0

    @property
    def per_partition(self) -> int:
        return -(-self.records // self.partitions)

    def write_config(self) -> None:
        # The broker's address is in the configuration: it starts first.
        if not self._started:
            self.broker.start(timeout=180)
            self._started = True
        super().write_config()

    def source_config(self) -> SourceConfig:
        return KafkaInput(bootstrap=self.broker.bootstrap, mode=self.mode)

    def expected(self) -> dict[str, range]:
        return {f"k{p}": range(self.per_partition) for p in range(self.partitions)}

    def _before_feed(self) -> None:
        anyio.run(self._create_topics)

    def input_done(self) -> bool:
        return self._produced == self.per_partition

    async def _create_topics(self) -> None:
        from streamlet.testing.kafka import admin_client, create_topics

        async with admin_client(self.broker.bootstrap) as admin:
            await create_topics(admin, ("input", "output"), self.partitions)

    async def _feed_all(self) -> None:
        async with anyio.create_task_group() as tg:

            async def produce() -> None:
                await self._produce()
                tg.cancel_scope.cancel()

            tg.start_soon(produce)
            await anyio.to_thread.run_sync(self._stop.wait, abandon_on_cancel=True)
            tg.cancel_scope.cancel()

    async def _produce(self) -> None:
        """Produce the input paced by worker uptime, like the other pipelines' feeders.

        Idempotent, with a long request timeout: a send caught by a broker
        kill is retried by the producer once the broker is back, never twice.
        """
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            bootstrap_servers=self.broker.bootstrap,
            enable_idempotence=True,
            linger_ms=5,
            request_timeout_ms=600_000,
        )
        await producer.start()
        interval = self.pace / self.per_partition if self.pace > 0 else 0.0
        try:
            for first in range(0, self.per_partition, 25):
                numbers = range(first, min(first + 25, self.per_partition))
                sent = [
                    await producer.send("input", b"k%d:%d" % (p, n), key=b"k%d" % p, partition=p)
                    for n in numbers
                    for p in range(self.partitions)
                ]
                for future in sent:
                    await future
                self._produced = numbers[-1] + 1
                ahead = self._produced * interval - self.uptime()
                if ahead > 0:
                    await anyio.sleep(ahead)
        finally:
            with anyio.CancelScope(shield=True):  # close its connections even when cancelled
                await producer.stop()

    def consumed(self, state: TrackerState) -> bool:
        if not self.input_done():
            return False
        if state.pending or any(state.blocks.get(name) for name in state.blocks):
            return False
        try:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        except sqlite3.Error:
            return False
        try:
            (count,) = conn.execute("SELECT count(*) FROM seen").fetchone()
        except sqlite3.Error:
            return False
        finally:
            conn.close()
        return int(count) >= self.per_partition * self.partitions

    def extra_outputs(self) -> dict[str, list[str]]:
        return {"kafka": anyio.run(self._read_output)}

    async def _read_output(self) -> list[str]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            "output",
            bootstrap_servers=self.broker.bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        seen: list[str] = []
        want = self.per_partition * self.partitions
        try:
            idle = 0
            # Read until nothing new comes for a while once everything (or more) is in.
            while idle < (4 if len(seen) >= want else 20):
                batches = await consumer.getmany(timeout_ms=500, max_records=50_000)
                got = [m.value.decode() for msgs in batches.values() for m in msgs]
                seen.extend(got)
                idle = 0 if got else idle + 1
        finally:
            with anyio.CancelScope(shield=True):  # close its connections even when cancelled
                await consumer.stop()
        return seen

    def close(self) -> None:
        self.broker.stop()


class KafkaReceiverPipeline(KafkaPipeline):
    """The same with ``KafkaSource(mode="receiver")``: records go through the data WAL."""

    name = "kafka-receiver"
    receiver = True
    mode = "receiver"
