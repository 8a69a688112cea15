"""A group-mode worker for the tests: Kafka in, each value out to a KafkaSink, exactly once.

Configured by GROUP_BOOTSTRAP, GROUP_IN, GROUP_OUT, GROUP_NAME and GROUP_STATE.
"""

from __future__ import annotations

import os

import streamlet as sl

app = sl.App(
    "grouped",
    state_dir=os.environ["GROUP_STATE"],
    batch_interval=0.05,
    max_batch_records=500,
    group=os.environ["GROUP_NAME"],
    session_timeout=6.0,
)
orders = app.source(
    sl.KafkaSource(
        os.environ["GROUP_IN"], bootstrap_servers=os.environ["GROUP_BOOTSTRAP"], start="earliest"
    ),
    name="orders",
)


@app.handler(
    orders,
    sink=sl.KafkaSink(
        os.environ["GROUP_OUT"],
        bootstrap_servers=os.environ["GROUP_BOOTSTRAP"],
        key=lambda value: value,
    ),
)
async def copy(batch: sl.Batch) -> list[bytes]:
    return [r.value for r in batch]
