"""The PostgreSQL examples, run as their docstrings say, against the test server.

Each runs as a real ``streamlet run`` worker, killed right after its first
sink commit and then run again cleanly: the table must hold every input once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.conftest import TopicFactory
from tests.kafka.test_examples_kafka import _crash_then_run

ROOT = Path(__file__).resolve().parents[2]


async def _fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


@pytest.mark.kafka
async def test_kafka_to_postgres_counts_every_view_once_across_a_crash(
    tmp_path: Path, kafka_bootstrap: str, new_topic: TopicFactory, pg_database: str
) -> None:
    topic = await new_topic(partitions=2)
    pages = [f"/page/{i % 7}" for i in range(3000)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i, page in enumerate(pages):
            await producer.send(topic, orjson.dumps({"page": page}), partition=i % 2)
        await producer.flush()
    finally:
        await producer.stop()

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {
        **os.environ,
        "STREAMLET_KAFKA": kafka_bootstrap,
        "STREAMLET_TOPIC": topic,
        "STREAMLET_POSTGRES": pg_database,
    }
    fast = ("--batch-interval", "0.2")
    await _crash_then_run("examples.kafka_to_postgres:app", tmp_path, env, crashed=fast, then=fast)
    counted = {r["page"]: r["views"] for r in await _fetch(pg_database, "SELECT * FROM page_views")}
    expected: dict[str, int] = {}
    for page in pages:
        expected[page] = expected.get(page, 0) + 1
    assert counted == expected
    offsets = await _fetch(
        pg_database, "SELECT partition, next_offset FROM streamlet_offsets ORDER BY partition"
    )
    assert [tuple(r) for r in offsets] == [(0, 1500), (1, 1500)]


async def test_directory_to_postgres_copies_each_line_once_across_a_crash(
    tmp_path: Path, pg_database: str
) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.txt").write_text("".join(f"a{i}\n" for i in range(3000)))
    (inbox / "b.txt").write_text("".join(f"b{i}\n" for i in range(2000)))
    env = {**os.environ, "STREAMLET_POSTGRES": pg_database, "PYTHONPATH": ""}
    # The first batch takes at most 1,000 lines (no record size measured
    # yet), so the kill after its commit leaves most of the work to do.
    fast = ("--batch-interval", "0.1")
    await _crash_then_run(
        "examples.directory_to_postgres:app", tmp_path, env, crashed=fast, then=fast
    )
    rows = await _fetch(
        pg_database,
        "SELECT file, count(*), count(DISTINCT text) FROM lines GROUP BY file ORDER BY file",
    )
    assert [tuple(r) for r in rows] == [("a.txt", 3000, 3000), ("b.txt", 2000, 2000)]
    assert sorted(os.listdir(inbox / "done")) == ["a.txt", "b.txt"]


async def test_the_readme_snippet_writes_its_rows_against_a_real_server(
    tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    import anyio

    import streamlet as sl

    readme = (ROOT / "README.md").read_text()
    (snippet,) = [
        s
        for s in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
        if "PostgresSink(" in s
    ]
    dsn = re.search(r'"(postgresql://[^"]+)"', snippet)
    assert dsn is not None
    namespace: dict[str, object] = {"__name__": "readme_postgres"}
    exec(compile(snippet.replace(dsn.group(1), pg_database), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    sink = namespace["sink"]
    assert isinstance(sink, sl.PostgresSink)

    monkeypatch.chdir(tmp_path)
    app = sl.App("readme_pg", state_dir=tmp_path / "state", batch_interval=0.05)
    numbers = app.source(sl.SequenceSource(rate=None, limit=500), name="numbers")

    @app.handler(numbers, sink=sink)
    async def orders(batch: sl.Batch) -> list[tuple[str, int]]:
        return [(f"sku-{r.offset % 7}", r.offset) for r in batch]

    with anyio.fail_after(30):
        await app.serve(duration=1.5)
    rows = await _fetch(pg_database, "SELECT count(*), count(DISTINCT qty) FROM orders")
    assert tuple(rows[0]) == (500, 500)
