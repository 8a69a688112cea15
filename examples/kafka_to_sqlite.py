"""Kafka → SQLite, exactly once: page views counted per page, offsets stored with the rows.

Each batch reads a logged offset range of the ``page-views`` topic (JSON
values such as ``{"page": "/home"}``), adds its counts to a ``views`` table
and records the batch (and its offset ranges) in the same SQLite transaction.
Kill the worker at any moment and start it again: the batch in flight runs
again over the same offsets, and the database takes it once. A value that is
not JSON goes to ``out/page_views_dead.jsonl`` with its topic, partition,
offset and the error, and counting goes on.

Run it against your broker::

    STREAMLET_KAFKA=localhost:9092 streamlet run examples.kafka_to_sqlite:app

    sqlite3 out/page_views.db 'SELECT page, views FROM views ORDER BY views DESC LIMIT 10'
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from collections.abc import Sequence

import orjson

import streamlet as sl

BOOTSTRAP = os.environ.get("STREAMLET_KAFKA", "localhost:9092")
TOPIC = os.environ.get("STREAMLET_TOPIC", "page-views")


def add_counts(
    conn: sqlite3.Connection, batch: sl.Batch, outputs: Sequence[tuple[str, int]]
) -> None:
    """Add one batch's counts; runs inside the batch's transaction."""
    conn.executemany(
        "INSERT INTO views (page, views) VALUES (?, ?)"
        " ON CONFLICT (page) DO UPDATE SET views = views + excluded.views",
        outputs,
    )


app = sl.App(
    "page_views",
    state_dir=".streamlet/page_views",
    batch_interval=1.0,
    dead_letter=sl.FileSink("out/page_views_dead"),
)
views = app.source(
    sl.KafkaSource(TOPIC, bootstrap_servers=BOOTSTRAP, group_id="page-views", start="earliest"),
    name="views",
    decode=orjson.loads,
)


@app.handler(
    views,
    sink=sl.SQLiteSink(
        "out/page_views.db",
        add_counts,
        table_ddl="CREATE TABLE IF NOT EXISTS views (page TEXT PRIMARY KEY, views INTEGER)",
    ),
)
async def count_pages(batch: sl.Batch[dict[str, object]]) -> list[tuple[str, int]]:
    """Count the views per page in one batch (``data``: each value's JSON object)."""
    pages = Counter(str(record.data["page"]) for record in batch)
    return sorted(pages.items())
