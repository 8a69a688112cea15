"""A group-mode worker for the tests: Kafka in, each value out to a KafkaSink, exactly once.

Configured by GROUP_BOOTSTRAP, GROUP_IN, GROUP_OUT, GROUP_NAME and GROUP_STATE,
and GROUP_APP (the app's name; default ``grouped``).
Optional, each off (the defaults) unless set:

- GROUP_KEY=record: an output is keyed by its input record's key (the
  default keys it by its value), so a key's outputs stay in one partition.
- GROUP_KEY=counted: as ``record``, and the handler keeps keyed state, a
  count per input key: a value ``<index>:<seq>`` goes out as
  ``<index>:<count>`` (any other value ``v`` as ``v|<count>``), where count
  is how many records of the key came before. With exact state through
  kills and task moves, count equals the record's place in its key.
- GROUP_MAX_BATCH_RECORDS: the app's ``max_batch_records`` (default 500).
- GROUP_SLOW_FIRST_BATCH: seconds the handler's first call sleeps (a slow
  start: its first batch outlasting the session timeout).
"""

from __future__ import annotations

import logging
import os

import anyio

import streamlet as sl

COUNTED = os.environ.get("GROUP_KEY", "value") == "counted"
KEY_BY_RECORD = COUNTED or os.environ.get("GROUP_KEY", "value") == "record"
SLOW_FIRST_BATCH = float(os.environ.get("GROUP_SLOW_FIRST_BATCH", "0"))

log = logging.getLogger("group_worker")

app = sl.App(
    os.environ.get("GROUP_APP", "grouped"),
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


async def count(batch: sl.Batch, state: sl.KeyedState) -> list[tuple[bytes | None, bytes]]:
    outputs: list[tuple[bytes | None, bytes]] = []
    for r in batch:
        key = r.key or b""
        seen = state.get(key, 0)
        state[key] = seen + 1
        index, colon, _ = r.value.partition(b":")
        value = b"%s:%d" % (index, seen) if colon else b"%s|%d" % (r.value, seen)
        outputs.append((r.key, value))
    return outputs


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


if COUNTED:
    app.handler(orders, sink=sink, state=sl.State(idle=False))(count)
else:
    app.handler(orders, sink=sink)(copy)
