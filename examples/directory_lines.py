r"""Lines of the files that land in a directory, written to SQLite exactly once.

Start the worker::

    streamlet run examples.directory_lines:app

and put files into ``inbox/`` from another terminal. A file is read once it
is complete, which here means once it has its name: write it under a hidden
(or ``.tmp``) name and rename it into place, as ``mv`` on one file system
does atomically::

    seq 1 100000 > inbox/.numbers.txt && mv inbox/.numbers.txt inbox/numbers.txt

Once every line of a file is committed, the file moves to ``inbox/done/``.
Kill the worker with ``kill -9`` while it reads: the batch in flight runs
again with the same lines, and ``out/directory_lines.db`` still holds every
line once::

    sqlite3 out/directory_lines.db \
        'SELECT file, count(*), count(DISTINCT line) FROM lines GROUP BY file'
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence

import streamlet as sl


def insert(
    conn: sqlite3.Connection, batch: sl.Batch, outputs: Sequence[tuple[str, int, str]]
) -> None:
    """Write one batch's lines; runs inside the batch's transaction."""
    conn.executemany("INSERT INTO lines (file, line, text) VALUES (?, ?, ?)", outputs)


os.makedirs("inbox", exist_ok=True)
app = sl.App("directory_lines", state_dir=".streamlet/directory_lines", batch_interval=0.5)
inbox = app.source(
    sl.DirectorySource("inbox", pattern="*.txt", finished="move"),
    name="inbox",
)


@app.handler(
    inbox,
    sink=sl.SQLiteSink(
        "out/directory_lines.db",
        insert,
        table_ddl="CREATE TABLE IF NOT EXISTS lines (file TEXT, line INTEGER, text TEXT)",
    ),
)
async def store_lines(batch: sl.Batch) -> list[tuple[str, int, str]]:
    """Keep the file (the record's key) and the line's offset in the stream beside the text."""
    return [(r.key.decode() if r.key else "", r.offset, r.value.decode()) for r in batch]
