"""Lines over TCP, acknowledged only once durable, written to SQLite exactly once.

Start the worker::

    streamlet run examples.tcp_lines:app

and send it lines from another terminal (each is acknowledged once it is in
the data write-ahead log; sending the same file again skips what is durable)::

    seq 1 100000 > numbers.txt
    streamlet send --port 9999 numbers.txt

Kill the worker with ``kill -9`` while ``streamlet send`` runs: the client
reconnects when it is back and resends what was not acknowledged, and
``out/tcp_lines.db`` still holds every line once::

    sqlite3 out/tcp_lines.db 'SELECT count(*), count(DISTINCT line) FROM lines'
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import streamlet as sl


def insert(
    conn: sqlite3.Connection, batch: sl.Batch, outputs: Sequence[tuple[str | None, int, str]]
) -> None:
    """Write one batch's lines; runs inside the batch's transaction."""
    conn.executemany("INSERT INTO lines (client, seq, line) VALUES (?, ?, ?)", outputs)


app = sl.App("tcp_lines", state_dir=".streamlet/tcp_lines", batch_interval=0.5)
lines = app.source(sl.TcpSource(port=9999), name="lines")


@app.handler(
    lines,
    sink=sl.SQLiteSink(
        "out/tcp_lines.db",
        insert,
        table_ddl="CREATE TABLE IF NOT EXISTS lines (client TEXT, seq INTEGER, line TEXT)",
    ),
)
async def store_lines(batch: sl.Batch) -> list[tuple[str | None, int, str]]:
    """Keep who sent each line and its number beside the text."""
    return [
        (r.key.decode() if r.key is not None else None, r.offset, r.value.decode()) for r in batch
    ]
