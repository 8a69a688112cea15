"""The Prometheus metrics of one app, from BatchInfos and a snapshot, parsed by real parsers."""

from __future__ import annotations

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from streamlet.metrics import BatchInfo, HandlerInfo, LatencyHistogram
from streamlet.observe.prometheus import AppMetrics
from streamlet.observe.status import Latencies, Snapshot, SourceStatus, WalStatus


def _batch(batch_id: int, *, dead: bool = False, processing: float = 0.01) -> BatchInfo:
    return BatchInfo(
        batch_id=batch_id,
        batch_time=100.0 + batch_id,
        records=10,
        outputs=0 if dead else 10,
        scheduling_delay=0.001,
        processing_time=processing,
        commit_time=0.003,
        total_delay=processing + 0.004,
        dead_lettered=("h",) if dead else (),
        inputs={"seq": 10},
        handlers=(
            HandlerInfo(
                "h",
                records=10,
                outputs=0 if dead else 10,
                attempts=3 if dead else 1,
                dead_lettered=dead,
                commit_attempts=0 if dead else 2,
                commit_time=0.0 if dead else 0.003,
            ),
        ),
        decode_failures=1 if dead else 0,
    )


def _snapshot() -> Snapshot:
    fsync = LatencyHistogram()
    for seconds in (0.0004, 0.002, 0.002, 0.5):
        fsync.observe(seconds)
    return Snapshot(
        app="m",
        state="running",
        now=10.0,
        started=0.0,
        wall=1000.0,
        batch_interval=1.0,
        last_done=3,
        next_batch=5,
        pending=[4],
        running={},
        last_progress=10.0,
        checkpoint_age=1.5,
        buffered_bytes=2048,
        sources=[SourceStatus("seq", "SequenceSource", {0: 30, 1: 8}, {0: 42, 1: 8})],
        wals=[
            WalStatus(
                "tracker",
                segments=2,
                appended_bytes=4096,
                fsync=Latencies(fsync.cumulative(), fsync.total),
                append=Latencies(fsync.cumulative(), fsync.total),
            )
        ],
    )


def _samples(
    text: str, *, openmetrics: bool = False
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    parse = parse_openmetrics if openmetrics else parse_text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in parse(text)
        for s in family.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_batches_count_into_counters_and_histograms() -> None:
    metrics = AppMetrics("m", _snapshot)
    for i in range(1, 4):
        metrics.on_batch(_batch(i), done_at=2000.0 + i)
    metrics.on_batch(_batch(4, dead=True, processing=2.0), done_at=2004.0)
    body, content_type = metrics.exposition(None)
    assert content_type.startswith("text/plain")
    s = _samples(body.decode())
    assert _value(s, "streamlet_batches_total", app="m", status="done", recovered="false") == 3
    assert (
        _value(s, "streamlet_batches_total", app="m", status="dead_lettered", recovered="false")
        == 1
    )
    assert _value(s, "streamlet_batch_input_records_total", app="m", source="seq") == 40
    assert _value(s, "streamlet_batch_outputs_total", app="m", handler="h") == 30
    assert _value(s, "streamlet_handler_retries_total", app="m", handler="h") == 2
    assert _value(s, "streamlet_handler_failures_total", app="m", handler="h") == 1
    assert _value(s, "streamlet_dead_letters_total", app="m", handler="h") == 10
    assert _value(s, "streamlet_dead_letters_total", app="m", handler="decode") == 1
    assert _value(s, "streamlet_sink_commit_retries_total", app="m", handler="h") == 3
    # Each histogram counts every batch once; the slow one lands above 1 s.
    assert _value(s, "streamlet_batch_processing_seconds_count", app="m") == 4
    assert _value(s, "streamlet_batch_processing_seconds_sum", app="m") == 2.03
    below_one = max(
        le
        for (n, labels), _ in s.items()
        if n.endswith("processing_seconds_bucket")
        for k, le in labels
        if k == "le" and le != "+Inf" and float(le) < 1.0
    )
    assert _value(s, "streamlet_batch_processing_seconds_bucket", app="m", le=below_one) == 3
    assert _value(s, "streamlet_sink_commit_seconds_count", app="m", handler="h") == 3
    assert _value(s, "streamlet_last_batch_id", app="m") == 4
    assert _value(s, "streamlet_last_batch_done_timestamp_seconds", app="m") == 2004.0


def test_scrape_time_gauges_come_from_the_snapshot() -> None:
    metrics = AppMetrics("m", _snapshot)
    s = _samples(metrics.exposition(None)[0].decode())
    assert _value(s, "streamlet_source_lag_records", app="m", source="seq", partition="0") == 12
    assert _value(s, "streamlet_source_lag_records", app="m", source="seq", partition="1") == 0
    assert _value(s, "streamlet_pending_batches", app="m") == 1
    assert _value(s, "streamlet_receiver_buffered_bytes", app="m") == 2048
    assert _value(s, "streamlet_checkpoint_age_seconds", app="m") == 1.5
    assert _value(s, "streamlet_up", app="m", state="running") == 1
    assert _value(s, "streamlet_wal_segments", app="m", log="tracker") == 2
    assert _value(s, "streamlet_wal_appended_bytes_total", app="m", log="tracker") == 4096
    assert _value(s, "streamlet_wal_fsync_seconds_count", app="m", log="tracker") == 4
    assert _value(s, "streamlet_wal_fsync_seconds_bucket", app="m", log="tracker", le="0.001") == 1


def test_before_serving_there_are_no_scrape_time_series_and_it_still_parses() -> None:
    metrics = AppMetrics("m", lambda: None)
    s = _samples(metrics.exposition(None)[0].decode())
    assert not any(name.startswith("streamlet_source_lag") for name, _ in s)


def test_the_openmetrics_format_is_served_when_asked_and_parses_strictly() -> None:
    metrics = AppMetrics("m", _snapshot)
    metrics.on_batch(_batch(1), done_at=2001.0)
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    s = _samples(body.decode(), openmetrics=True)
    assert _value(s, "streamlet_batches_total", app="m", status="done", recovered="false") == 1


def test_each_app_has_its_own_registry() -> None:
    first, second = AppMetrics("one", lambda: None), AppMetrics("two", lambda: None)
    first.on_batch(_batch(1), done_at=1.0)
    s = _samples(second.exposition(None)[0].decode())
    assert not any(dict(labels).get("app") == "one" for _, labels in s)
