"""One consume → copy → produce pipeline per system, each run as its own process.

:mod:`benchmarks.peers` starts these with ``python -m benchmarks.peer_pipelines
SYSTEM ...``, watches their output topic from outside, samples their CPU time
from ``/proc`` and kills them with SIGKILL (a crash, and the end of every
run). A process of its own per system keeps the comparison fair: one Python
interpreter each, no shared event loop, and CPU time that belongs to one
system only (threads included: librdkafka's for Quix Streams, aiokafka's
none).

Every pipeline does the same thing: read the input topic from the earliest
offset (``read_committed``), copy each record's value unchanged to the
output topic, and commit, in one of two guarantees:

* ``exactly-once``: outputs and input offsets in one Kafka transaction;
* ``at-least-once``: outputs flushed, then the input offsets committed.

A commit happens every ``--commit-records`` records or every
``--commit-interval`` seconds, whichever comes first, each system through
its own setting for it (named in the function below). The values are bytes
throughout: no system pays for JSON that the others skip.

Quix Streams and Faust are imported only in their own function: install them
with ``pip install -e '.[peers]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SYSTEMS = ("floor", "streamlet", "quix", "faust")
GUARANTEES = ("exactly-once", "at-least-once")


@dataclass(frozen=True)
class Pipeline:
    """One system's run: where it reads and writes, and how often it commits."""

    system: str
    guarantee: str
    bootstrap: str
    input: str
    output: str
    group: str
    """Consumer group (offsets), also the base of transactional ids and app names."""
    state: str
    """A directory the system may keep files in (streamlet's state, Quix's, Faust's)."""
    partitions: int
    commit_records: int
    commit_interval: float

    @property
    def exactly_once(self) -> bool:
        return self.guarantee == "exactly-once"


# ---- the floor: hand-written aiokafka ------------------------------------------


async def run_floor(p: Pipeline) -> None:
    """The hand-written loop: what a careful user writes with aiokafka alone.

    The consumer is assigned every partition (no group membership, so no
    rebalance wait on restart) and resumes from the group's committed
    offsets. Each commit takes up to ``commit_records`` records from
    ``getmany``, or what came within ``commit_interval``; it writes each
    input partition's records to the same output partition with the
    producer's batch API. Exactly-once: in a transaction, the offsets added
    with ``send_offsets_to_transaction``. At-least-once: an idempotent
    producer, every send awaited, then the offsets committed.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=p.bootstrap,
        group_id=p.group,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=p.bootstrap,
        transactional_id=f"{p.group}-floor" if p.exactly_once else None,
        enable_idempotence=True,
        acks="all",
        retry_backoff_ms=10,
    )
    await consumer.start()
    await producer.start()
    tps = [TopicPartition(p.input, n) for n in range(p.partitions)]
    consumer.assign(tps)
    for tp in tps:
        committed = await consumer.committed(tp)
        if committed is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)
    while True:
        taken: dict[Any, list[Any]] = {}
        size = 0
        deadline = time.monotonic() + p.commit_interval
        while size < p.commit_records:
            left = deadline - time.monotonic()
            if left <= 0 and size:
                break
            fetched = await consumer.getmany(
                *tps, timeout_ms=max(1, int(left * 1000)), max_records=p.commit_records - size
            )
            for tp, messages in fetched.items():
                taken.setdefault(tp, []).extend(messages)
                size += len(messages)
        offsets = {tp: messages[-1].offset + 1 for tp, messages in taken.items()}
        if p.exactly_once:
            async with producer.transaction():
                futures = await send_all(producer, p.output, taken)
                await producer.send_offsets_to_transaction(offsets, p.group)
                for future in futures:
                    await future
        else:
            for future in await send_all(producer, p.output, taken):
                await future
            await consumer.commit(offsets)


async def send_all(producer: Any, topic: str, taken: dict[Any, list[Any]]) -> list[Any]:
    """Send each partition's records to the same output partition, in producer batches.

    Also the floor of :mod:`benchmarks.kafka`. Kept here, in a module that
    imports nothing at the top, so that the floor's process loads aiokafka
    alone.
    """
    futures = []
    for tp, messages in taken.items():
        batch = producer.create_batch()
        for message in messages:
            if batch.append(key=None, value=message.value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=tp.partition))
                batch = producer.create_batch()
                batch.append(key=None, value=message.value, timestamp=None)
        futures.append(await producer.send_batch(batch, topic, partition=tp.partition))
    return futures


# ---- streamlet ----------------------------------------------------------------


def run_streamlet(p: Pipeline) -> None:
    """A KafkaSource in direct mode into an identity handler and a KafkaSink.

    Commits: a batch per ``commit_interval`` (``batch_interval``), of at most
    ``commit_records`` records (``max_batch_records``; a full batch is
    followed at once). Exactly-once: the transactional sink with the source
    offsets in each batch's transaction (``consume_from``). At-least-once:
    ``transactional=False`` (an idempotent producer; a batch re-run after a
    crash is written again).
    """
    import anyio

    from streamlet import App, Batch
    from streamlet.kafka.sink import KafkaSink
    from streamlet.kafka.source import KafkaSource

    app = App(
        p.group,
        state_dir=p.state,
        batch_interval=p.commit_interval,
        max_batch_records=p.commit_records,
    )
    kafka = KafkaSource(p.input, bootstrap_servers=p.bootstrap, group_id=p.group, start="earliest")
    source = app.source(kafka, name="input")
    sink = KafkaSink(
        p.output,
        bootstrap_servers=p.bootstrap,
        transactional=p.exactly_once,
        consume_from=kafka if p.exactly_once else None,
    )

    @app.handler(source, sink=sink, name="copy")
    async def copy(batch: Batch) -> list[bytes]:
        return [record.value for record in batch]

    anyio.run(app.serve)


# ---- Quix Streams ---------------------------------------------------------------


def run_quix(p: Pipeline) -> None:
    """A StreamingDataFrame from the input topic straight ``to_topic`` the output.

    Commits: ``commit_every=commit_records`` and ``commit_interval``.
    Guarantee: ``processing_guarantee`` (Quix's exactly-once is a
    transactional producer with the offsets in the transaction). Values
    are (de)serialized as ``bytes``. The consumer joins the group (Quix
    has no other way), so a restart waits for the group.
    """
    from quixstreams import Application

    app = Application(
        broker_address=p.bootstrap,
        consumer_group=p.group,
        auto_offset_reset="earliest",
        commit_interval=p.commit_interval,
        commit_every=p.commit_records,
        processing_guarantee=p.guarantee,  # type: ignore[arg-type]
        state_dir=p.state,
        loglevel="WARNING",
        auto_create_topics=False,
        use_changelog_topics=False,
    )
    source = app.topic(p.input, value_deserializer="bytes")
    output = app.topic(p.output, value_serializer="bytes")
    app.dataframe(source).to_topic(output)
    app.run()


# ---- Faust ------------------------------------------------------------------------


def run_faust(p: Pipeline) -> None:
    """An agent over the input topic that sends each value to the output topic.

    Commits: ``broker_commit_every=commit_records`` and
    ``broker_commit_interval``. Guarantee: ``processing_guarantee``
    (``exactly_once`` or ``at_least_once``). Values are ``raw`` bytes.
    """
    import faust

    app = faust.App(
        p.group,
        broker=f"kafka://{p.bootstrap}",
        processing_guarantee=p.guarantee.replace("-", "_"),
        broker_commit_every=p.commit_records,
        broker_commit_interval=p.commit_interval,
        consumer_auto_offset_reset="earliest",
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=p.partitions,
        web_enabled=False,
        datadir=p.state,
    )
    source = app.topic(p.input, value_type=bytes, value_serializer="raw")
    output = app.topic(p.output, value_type=bytes, value_serializer="raw")

    @app.agent(source)
    async def copy(stream: Any) -> None:
        async for value in stream:
            await output.send(value=value)

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    app.main()


# ---- command line ---------------------------------------------------------------


def parse(argv: Sequence[str]) -> Pipeline:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer_pipelines")
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("--guarantee", choices=GUARANTEES, required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--commit-records", type=int, required=True)
    parser.add_argument("--commit-interval", type=float, required=True)
    args = parser.parse_args(argv)
    return Pipeline(
        args.system,
        args.guarantee,
        args.bootstrap,
        args.input,
        args.output,
        args.group,
        args.state,
        args.partitions,
        args.commit_records,
        args.commit_interval,
    )


def command(p: Pipeline) -> list[str]:
    """The command line that runs ``p`` (the inverse of :func:`parse`)."""
    return [
        sys.executable,
        "-m",
        "benchmarks.peer_pipelines",
        p.system,
        f"--guarantee={p.guarantee}",
        f"--bootstrap={p.bootstrap}",
        f"--input={p.input}",
        f"--output={p.output}",
        f"--group={p.group}",
        f"--state={p.state}",
        f"--partitions={p.partitions}",
        f"--commit-records={p.commit_records}",
        f"--commit-interval={p.commit_interval}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    p = parse(sys.argv[1:] if argv is None else argv)
    if p.system == "floor":
        asyncio.run(run_floor(p))
    elif p.system == "streamlet":
        run_streamlet(p)
    elif p.system == "quix":
        run_quix(p)
    else:
        run_faust(p)


if __name__ == "__main__":
    main()
