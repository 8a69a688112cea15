"""A group-mode worker for the tests: Kafka in, each value out to a KafkaSink, exactly once.

Configured by GROUP_BOOTSTRAP, GROUP_IN, GROUP_OUT, GROUP_NAME and GROUP_STATE.
Optional, each off (the defaults) unless set:

- GROUP_KEY=record: an output is keyed by its input record's key (the
  default keys it by its value), so a key's outputs stay in one partition.
- GROUP_MAX_BATCH_RECORDS: the app's ``max_batch_records`` (default 500).
- GROUP_SLOW_FIRST_BATCH: seconds the handler's first call sleeps (a slow
  start: its first batch outlasting the session timeout).
"""

from __future__ import annotations

import logging
import os

import anyio

import streamlet as sl

KEY_BY_RECORD = os.environ.get("GROUP_KEY", "value") == "record"
SLOW_FIRST_BATCH = float(os.environ.get("GROUP_SLOW_FIRST_BATCH", "0"))

log = logging.getLogger("group_worker")

app = sl.App(
    "grouped",
    state_dir=os.environ["GROUP_STATE"],
    batch_interval=0.05,
    max_batch_records=int(os.environ.get("GROUP_MAX_BATCH_RECORDS", "500")),
    group=os.environ["GROUP_NAME"],
    session_timeout=6.0,
)
orders = app.source(
    sl.KafkaSource(
        os.environ["GROUP_IN"], bootstrap_servers=os.environ["GROUP_BOOTSTRAP"], start="earliest"
    ),
    name="orders",
)
sink = (
    sl.KafkaSink(
        os.environ["GROUP_OUT"],
        bootstrap_servers=os.environ["GROUP_BOOTSTRAP"],
        key=lambda pair: pair[0],
        value=lambda pair: pair[1],
    )
    if KEY_BY_RECORD
    else sl.KafkaSink(
        os.environ["GROUP_OUT"],
        bootstrap_servers=os.environ["GROUP_BOOTSTRAP"],
        key=lambda value: value,
    )
)
calls = 0


@app.handler(orders, sink=sink)
async def copy(batch: sl.Batch) -> list[bytes] | list[tuple[bytes | None, bytes]]:
    global calls
    calls += 1
    if calls == 1 and SLOW_FIRST_BATCH > 0:
        log.info("slow first batch: sleeping %gs", SLOW_FIRST_BATCH)
        await anyio.sleep(SLOW_FIRST_BATCH)
        log.info("slow first batch: done")
    if KEY_BY_RECORD:
        return [(r.key, r.value) for r in batch]
    return [r.value for r in batch]
