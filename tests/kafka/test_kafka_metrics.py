"""Kafka lag in the metrics and the status, against the real broker."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import anyio
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

import streamlet as sl
from tests.conftest import TopicFactory
from tests.kafka.test_kafka_source import _produce

pytestmark = pytest.mark.kafka


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        return bytes(response.read())


def _lag(metrics: bytes, topic_source: str) -> dict[str, float]:
    return {
        s.labels["partition"]: s.value
        for family in text_string_to_metric_families(metrics.decode())
        for s in family.samples
        if s.name == "streamlet_source_lag_records" and s.labels["source"] == topic_source
    }


async def test_lag_per_partition_is_the_last_stable_offset_minus_the_last_batch_end(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = await new_topic(2)
    await _produce(kafka_bootstrap, topic, [f"v{i}".encode() for i in range(600)])
    release = anyio.Event()
    app = sl.App(
        "lagging",
        state_dir=tmp_path / "state",
        batch_interval=0.05,
        max_batch_records=100,
        http="127.0.0.1:0",
    )
    source = app.source(
        sl.KafkaSource(topic, bootstrap_servers=kafka_bootstrap, group_id=None), name="orders"
    )

    @app.handler(source)
    async def hold(batch: sl.Batch) -> None:
        await release.wait()  # the first batch waits: the rest of the topic is lag

    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        assert app.http_url is not None
        url = app.http_url
        with anyio.fail_after(30):
            while True:
                status = orjson.loads(await anyio.to_thread.run_sync(_get, url + "api/status"))
                if status["running"]:
                    break
                await anyio.sleep(0.05)
        metrics = await anyio.to_thread.run_sync(_get, url + "metrics")
        (orders,) = status["sources"]
        # The first batch took at most 100 records; the rest is lag, per partition.
        ends = {str(p["partition"]): p["latest"] for p in orders["partitions"]}
        taken = {str(p["partition"]): p["position"] for p in orders["partitions"]}
        assert sum(ends.values()) == 600
        assert 0 < sum(taken.values()) <= 100
        assert _lag(metrics, "orders") == {p: ends[p] - taken[p] for p in ends}
        release.set()
        with anyio.fail_after(60):
            while True:
                metrics = await anyio.to_thread.run_sync(_get, url + "metrics")
                if set(_lag(metrics, "orders").values()) == {0.0}:
                    break
                await anyio.sleep(0.1)
        app.stop()
