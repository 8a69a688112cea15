r"""Lines of the files that land in a directory, copied into PostgreSQL exactly once.

Start the worker::

    STREAMLET_POSTGRES=postgresql://me@localhost/logs \
        streamlet run examples.directory_to_postgres:app

and put files into ``inbox/``: a file is read once it has its name, so write
it under a hidden (or ``.tmp``) name and rename it into place::

    seq 1 100000 > inbox/.numbers.txt && mv inbox/.numbers.txt inbox/numbers.txt

Each batch's lines go into the ``lines`` table with PostgreSQL's binary COPY,
inside the batch's transaction, together with streamlet's row for the batch.
Once every line of a file is committed, the file moves to ``inbox/done/``.
Kill the worker while it reads: the batch in flight runs again with the
same lines, and the table still holds every line once::

    psql logs -c 'SELECT file, count(*), count(DISTINCT line) FROM lines GROUP BY file'

Needs the ``postgres`` extra (``pip install 'streamlet[postgres]'``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import streamlet as sl

DATABASE = os.environ.get("STREAMLET_POSTGRES", "postgresql://localhost/streamlet")


async def copy_lines(conn: Any, batch: sl.Batch, outputs: Sequence[object]) -> None:
    """Copy one batch's lines in; runs inside the batch's transaction (conn: asyncpg)."""
    await conn.copy_records_to_table("lines", records=outputs, columns=["file", "line", "text"])


os.makedirs("inbox", exist_ok=True)
app = sl.App("directory_to_postgres", state_dir=".streamlet/directory_to_postgres")
inbox = app.source(
    sl.DirectorySource("inbox", pattern="*.txt", finished="move"),
    name="inbox",
)


@app.handler(
    inbox,
    sink=sl.PostgresSink(
        DATABASE,
        copy_lines,
        table_ddl="CREATE TABLE IF NOT EXISTS lines (file text, line bigint, text text)",
    ),
)
async def store_lines(batch: sl.Batch) -> list[tuple[str, int, str]]:
    """Keep the file (the record's key) and the line's offset in the stream beside the text."""
    return [(r.key.decode() if r.key else "", r.offset, r.value.decode()) for r in batch]
