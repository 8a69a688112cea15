"""The source commit comes after the sink commit: a group's offsets never run ahead of the outputs.

A direct Kafka source commits a batch's ranges to its consumer group (for
lag tooling, and for ``start="committed"``) only once the batch's sinks hold
it. Here batch 3 is refused by its FileSink (an output with a newline is an
``OutputError``: the handler counts as failed and the app stops with the
batch uncommitted), so the group's offset must still be where batch 2 ended.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from aiokafka import AIOKafkaProducer

from streamlet.app import App
from streamlet.errors import StreamletError
from streamlet.records import Batch
from streamlet.sinks.file import FileSink
from streamlet.sources import KafkaSource
from streamlet.testing.kafka import group_offsets
from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka

RECORDS = 30
PER_BATCH = 10  # max_rate 200 records/s over a 0.05 s batch interval
REFUSED = 25  # in batch 3


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send(topic, value, partition=0)
        await producer.flush()
    finally:
        await producer.stop()


async def test_a_batch_its_sink_refused_is_not_committed_to_the_source_group(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    await _produce(kafka_bootstrap, topic, [b"%d" % n for n in range(RECORDS)])
    group = f"{topic}-g"
    out = tmp_path / "out"
    app = App("srcorder", state_dir=tmp_path / "state", batch_interval=0.05)
    source = app.source(
        KafkaSource(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            start="earliest",
            max_rate=PER_BATCH / 0.05,
        ),
        name="numbers",
    )

    @app.handler(source, sink=FileSink(out))
    async def copy(batch: Batch) -> list[str]:
        return [r.value.decode() + ("\n" if int(r.value) == REFUSED else "") for r in batch]

    with pytest.raises(StreamletError, match="newline"):
        with anyio.fail_after(30):
            await app.serve()
    committed = FileSink.read_committed(out)
    assert sorted(committed) == [1, 2]
    held = sum(len(lines) for lines in committed.values())
    assert held == 2 * PER_BATCH
    # A committed offset is the next offset to read: never past what the sink holds.
    offsets = await group_offsets(kafka_bootstrap, group)
    assert offsets.get(0, 0) <= held, offsets
