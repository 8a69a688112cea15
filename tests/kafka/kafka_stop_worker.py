"""Subprocess side of the tests that stop or kill a Kafka app (broker down, crash points).

Run as ``python -m streamlet run kafka_stop_worker:app`` with this directory
on ``PYTHONPATH``. ``app()`` builds ``KafkaSource -> copy -> sink`` from the
environment:

- ``KST_BOOTSTRAP``, ``KST_TOPIC``: the broker and the input topic;
- ``KST_MODE``: ``direct`` or ``receiver``; ``KST_GROUP``: a consumer group
  (empty: none);
- ``KST_SINK``: ``file`` (a FileSink in the directory ``KST_OUT``) or
  ``kafka`` (a transactional KafkaSink writing to the topic ``KST_OUT``);
- ``KST_APP``, ``KST_STATE``: the app's name and state directory;
- ``KST_INTERVAL``: batch and block interval in seconds (default 0.1 and
  the app's default).

The handler outputs each record's value unchanged, so the sink must end up
holding every produced value exactly once.
"""

from __future__ import annotations

import os

import streamlet as sl
from streamlet.kafka.sink import KafkaSink
from streamlet.records import Batch
from streamlet.sinks.base import Sink
from streamlet.sinks.file import FileSink
from streamlet.sources import KafkaSource


def app() -> sl.App:
    """The app, configured from ``KST_*`` environment variables."""
    env = os.environ
    interval = float(env["KST_INTERVAL"]) if env.get("KST_INTERVAL") else None
    application = sl.App(
        env["KST_APP"],
        state_dir=env["KST_STATE"],
        batch_interval=interval or 0.1,
        block_interval=interval,
        checkpoint_interval=0.5,
    )
    mode = env["KST_MODE"]
    source = KafkaSource(
        env["KST_TOPIC"],
        bootstrap_servers=env["KST_BOOTSTRAP"],
        group_id=env.get("KST_GROUP") or None,
        mode="receiver" if mode == "receiver" else "direct",
    )
    application.source(source, name="in")
    sink: Sink
    if env["KST_SINK"] == "kafka":
        sink = KafkaSink(env["KST_OUT"], bootstrap_servers=env["KST_BOOTSTRAP"], open_timeout=60)
    else:
        sink = FileSink(env["KST_OUT"])

    @application.handler("in", sink=sink)
    async def copy(batch: Batch) -> list[bytes]:
        return [record.value for record in batch]

    return application
