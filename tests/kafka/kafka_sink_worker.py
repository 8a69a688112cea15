"""Subprocess side of the KafkaSink crash tests.

Two ways to run it:

- As an app: ``python -m streamlet run kafka_sink_worker:app`` with this
  directory on ``PYTHONPATH``. ``app()`` builds a
  ``SequenceSource -> handler -> KafkaSink`` app from the environment
  (``KSW_BOOTSTRAP``, ``KSW_TOPIC``, ``KSW_APP``, ``KSW_RECORDS``,
  ``KSW_MAX_RATE``). The handler outputs each record's offset as decimal
  text, so the output topic must end up holding ``0 .. KSW_RECORDS-1``
  exactly once and in order, however often the worker is killed.
- As a script: ``python kafka_sink_worker.py hold BOOTSTRAP TOPIC APP BATCH
  COUNT``. It commits batch BATCH with COUNT outputs ``ghost-<i>`` but stops
  where ``commit_transaction`` would be called, after the broker acknowledged
  every record, prints ``holding`` and waits to be SIGKILLed with its
  transaction open.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiokafka import AIOKafkaProducer

import streamlet as sl
from streamlet.kafka.sink import KafkaSink
from streamlet.records import Batch, Record
from streamlet.sinks.base import SinkContext


def app() -> sl.App:
    """The crash-test app, configured from ``KSW_*`` environment variables."""
    env = os.environ
    application = sl.App(env["KSW_APP"], batch_interval=0.05, checkpoint_interval=0.5)
    numbers = application.source(
        sl.SequenceSource(
            rate=None, limit=int(env["KSW_RECORDS"]), max_rate=float(env["KSW_MAX_RATE"])
        ),
        name="numbers",
    )
    sink = KafkaSink(env["KSW_TOPIC"], bootstrap_servers=env["KSW_BOOTSTRAP"], open_timeout=60)

    @application.handler(numbers, sink=sink)
    async def copy(batch: Batch) -> list[bytes]:
        return [record.value for record in batch]

    return application


async def hold(bootstrap: str, topic: str, app_name: str, batch_id: int, count: int) -> None:
    """Write a batch's outputs and stop just before committing; see the module docstring."""

    async def stop_here(self: AIOKafkaProducer) -> None:
        sys.stdout.write("holding\n")
        sys.stdout.flush()
        await asyncio.Event().wait()  # until SIGKILL

    AIOKafkaProducer.commit_transaction = stop_here
    sink = KafkaSink(topic, bootstrap_servers=bootstrap)
    await sink.open(SinkContext(app_name, "copy", "unused"))
    outputs = [f"ghost-{i}" for i in range(count)]
    batch = Batch(batch_id, 0.0, [Record(b"x")])
    await sink.commit(batch, outputs)
    raise AssertionError("commit returned although commit_transaction never does")


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[1] != "hold":
        sys.exit("usage: kafka_sink_worker.py hold BOOTSTRAP TOPIC APP BATCH COUNT")
    asyncio.run(hold(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])))
