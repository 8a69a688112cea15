"""Kafka → PostgreSQL, exactly once: page views counted per page, offsets stored with the rows.

Each batch reads a logged offset range of the ``page-views`` topic (JSON
values such as ``{"page": "/home"}``) and adds its counts to a ``page_views``
table in one PostgreSQL transaction, together with streamlet's own row for
the batch (``streamlet_batches``: app, handler, batch id, state directory,
offset ranges) and each partition's next offset (``streamlet_offsets``).
Kill the worker at any moment, or restart the database under it: the batch
in flight runs again over the same offsets and the table takes it once.

Needs the ``postgres`` extra (``pip install 'streamlet[postgres]'``). Run it
against your broker and database::

    STREAMLET_KAFKA=localhost:9092 STREAMLET_POSTGRES=postgresql://me@localhost/shop \\
        streamlet run examples.kafka_to_postgres:app

    psql shop -c 'SELECT page, views FROM page_views ORDER BY views DESC LIMIT 10'

The password can come from ``PGPASSWORD`` or ``~/.pgpass``; streamlet never
logs it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson

import streamlet as sl

BOOTSTRAP = os.environ.get("STREAMLET_KAFKA", "localhost:9092")
TOPIC = os.environ.get("STREAMLET_TOPIC", "page-views")
DATABASE = os.environ.get("STREAMLET_POSTGRES", "postgresql://localhost/streamlet")


async def add_counts(conn: Any, batch: sl.Batch, outputs: Sequence[object]) -> None:
    """Add one batch's counts; runs inside the batch's transaction (conn: asyncpg)."""
    await conn.executemany(
        "INSERT INTO page_views (page, views) VALUES ($1, $2)"
        " ON CONFLICT (page) DO UPDATE SET views = page_views.views + excluded.views",
        outputs,
    )


app = sl.App("page_views_pg", state_dir=".streamlet/page_views_pg", batch_interval=1.0)
views = app.source(
    sl.KafkaSource(TOPIC, bootstrap_servers=BOOTSTRAP, group_id="page-views-pg", start="earliest"),
    name="views",
    decode=orjson.loads,
)


@app.handler(
    views,
    sink=sl.PostgresSink(
        DATABASE,
        add_counts,
        table_ddl="CREATE TABLE IF NOT EXISTS page_views (page text PRIMARY KEY, views bigint)",
    ),
)
async def count_pages(batch: sl.Batch[dict[str, object]]) -> list[tuple[str, int]]:
    """Count the views per page in one batch (``data``: each value's JSON object)."""
    pages = Counter(str(record.data["page"]) for record in batch)
    return sorted(pages.items())
