"""A worker for the monitoring tests, configured by environment variables.

OBSERVED_STATE: its state directory; OBSERVED_OUT: its FileSink directory;
OBSERVED_RECORDS: records of the sequence source (each value carries a
marker that must never appear in an HTTP response), made available at
OBSERVED_RATE per second per partition (two partitions); OBSERVED_SLOW: seconds
the ``slow`` handler sleeps per batch; OBSERVED_FAIL_EVERY: the ``picky``
handler fails on every batch whose id is a multiple of it (dead-lettered).
"""

from __future__ import annotations

import os

import anyio

import streamlet as sl
from streamlet.records import Batch
from streamlet.sources.sequence import SequenceSource

MARKER = "payload-never-served"

app = sl.App(
    "observed",
    state_dir=os.environ["OBSERVED_STATE"],
    batch_interval=0.1,
    on_failure="dead_letter",
    dead_letter=sl.FileSink(os.environ["OBSERVED_OUT"] + "-dead"),
    max_retries=1,
    retry_backoff=0.01,
)
numbers = app.source(
    SequenceSource(
        rate=float(os.environ.get("OBSERVED_RATE", "500")),
        partitions=2,
        limit=int(os.environ["OBSERVED_RECORDS"]) // 2,
        value=lambda p, o: f"{MARKER}-{p}-{o}".encode(),
    ),
    name="numbers",
)
SLOW = float(os.environ.get("OBSERVED_SLOW", "0"))
FAIL_EVERY = int(os.environ.get("OBSERVED_FAIL_EVERY", "0"))


@app.handler(numbers, sink=sl.FileSink(os.environ["OBSERVED_OUT"]))
async def slow(batch: Batch) -> list[str]:
    await anyio.sleep(SLOW)
    return [r.value.decode() for r in batch]


@app.handler(numbers)
async def picky(batch: Batch) -> None:
    if FAIL_EVERY and batch.id % FAIL_EVERY == 0:
        raise ValueError(f"batch {batch.id} is not to my taste")
