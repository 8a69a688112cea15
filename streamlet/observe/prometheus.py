"""Prometheus metrics of one app, through the official ``prometheus_client`` library.

Two kinds of figures, kept apart so that the batch path pays almost nothing:

* per batch (counters and histograms): updated once per batch from its
  :class:`~streamlet.metrics.BatchInfo` by :meth:`AppMetrics.on_batch`, a
  listener like any other;
* right now (gauges: lag, pending batches, buffered bytes, rate limits,
  checkpoint age, WAL figures): read from a
  :class:`~streamlet.observe.status.Snapshot` when Prometheus scrapes, by a
  custom collector, so that a partition or source that went away leaves no
  stale series behind.

Each app has its own :class:`~prometheus_client.CollectorRegistry`, never the
library's global one: two apps in one process (or a test beside a worker) do
not mix their series. Names follow Prometheus conventions: base units
(seconds, bytes), ``_total`` on counters, bounded labels (no keys, no data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from streamlet.metrics import LATENCY_BUCKETS, BatchInfo
from streamlet.observe.status import Latencies, Snapshot, health

__all__ = ["DEFAULT_BUCKETS", "AppMetrics"]

DEFAULT_BUCKETS = LATENCY_BUCKETS
"""Histogram buckets: 1 ms to 60 s in 18 exponential steps."""


class AppMetrics:
    """The metrics of one app: a registry, its per-batch series and a scrape-time collector.

    Args:
        app: the app's name (the ``app`` label of every series).
        snapshot: reads the engine now (None until the app is serving).
        buckets: histogram bucket bounds in seconds.
    """

    def __init__(
        self,
        app: str,
        snapshot: Callable[[], Snapshot | None],
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.app = app
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.batches = Counter(
            "streamlet_batches",
            "Batches done, by outcome (done; dead_lettered: some handler's input went to"
            " the dead-letter sink) and whether it was a re-run after a restart",
            ["app", "status", "recovered"],
            registry=r,
        )
        self.input_records = Counter(
            "streamlet_batch_input_records",
            "Input records taken by batches, per source",
            ["app", "source"],
            registry=r,
        )
        self.outputs = Counter(
            "streamlet_batch_outputs",
            "Outputs committed by handlers' sinks",
            ["app", "handler"],
            registry=r,
        )
        self.handler_retries = Counter(
            "streamlet_handler_retries",
            "Handler calls tried again after a failure",
            ["app", "handler"],
            registry=r,
        )
        self.handler_failures = Counter(
            "streamlet_handler_failures",
            "Batches a handler failed on after its retries (or whose outputs its sink refused)",
            ["app", "handler"],
            registry=r,
        )
        self.dead_letters = Counter(
            "streamlet_dead_letters",
            "Records sent to the dead-letter sink, per handler (decode: failed to decode)",
            ["app", "handler"],
            registry=r,
        )
        self.sink_retries = Counter(
            "streamlet_sink_commit_retries",
            "Sink commits tried again after a failure",
            ["app", "handler"],
            registry=r,
        )
        buckets = list(buckets)
        self.scheduling_delay = Histogram(
            "streamlet_batch_scheduling_delay_seconds",
            "From a batch's scheduled time to its start (grows when batches take longer"
            " than the interval)",
            ["app"],
            buckets=buckets,
            registry=r,
        )
        self.processing = Histogram(
            "streamlet_batch_processing_seconds",
            "Reading a batch's input and running its handlers, retries included",
            ["app"],
            buckets=buckets,
            registry=r,
        )
        self.commit = Histogram(
            "streamlet_batch_commit_seconds",
            "Sink commits, source commits and the done record of a batch",
            ["app"],
            buckets=buckets,
            registry=r,
        )
        self.total_delay = Histogram(
            "streamlet_batch_total_delay_seconds",
            "From a batch's scheduled time to its being done",
            ["app"],
            buckets=buckets,
            registry=r,
        )
        self.sink_commit = Histogram(
            "streamlet_sink_commit_seconds",
            "One sink's commit of one batch, retries included",
            ["app", "handler"],
            buckets=buckets,
            registry=r,
        )
        self.last_batch = Gauge(
            "streamlet_last_batch_id", "The id of the newest batch done", ["app"], registry=r
        )
        self.last_batch_time = Gauge(
            "streamlet_last_batch_done_timestamp_seconds",
            "Wall-clock time the newest batch was done (alert when it stops moving)",
            ["app"],
            registry=r,
        )
        r.register(_Now(app, snapshot))

    def on_batch(self, info: BatchInfo, done_at: float) -> None:
        """Count one finished batch (a listener; ``done_at`` is the wall-clock time)."""
        app = self.app
        status = "dead_lettered" if info.dead_lettered else "done"
        self.batches.labels(app, status, str(info.recovered).lower()).inc()
        for source, count in info.inputs.items():
            self.input_records.labels(app, source).inc(count)
        for handler in info.handlers:
            if handler.outputs:
                self.outputs.labels(app, handler.name).inc(handler.outputs)
            if handler.attempts > 1:
                self.handler_retries.labels(app, handler.name).inc(handler.attempts - 1)
            if handler.dead_lettered:
                self.handler_failures.labels(app, handler.name).inc()
                self.dead_letters.labels(app, handler.name).inc(handler.records)
            if handler.commit_attempts:
                self.sink_commit.labels(app, handler.name).observe(handler.commit_time)
                if handler.commit_attempts > 1:
                    self.sink_retries.labels(app, handler.name).inc(handler.commit_attempts - 1)
        if info.decode_failures:
            self.dead_letters.labels(app, "decode").inc(info.decode_failures)
        self.scheduling_delay.labels(app).observe(info.scheduling_delay)
        self.processing.labels(app).observe(info.processing_time)
        self.commit.labels(app).observe(info.commit_time)
        self.total_delay.labels(app).observe(info.total_delay)
        self.last_batch.labels(app).set(info.batch_id)
        self.last_batch_time.labels(app).set(done_at)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format ``accept`` asks for (text or OpenMetrics), and its type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _Now(Collector):
    """The gauges read from the engine at scrape time (no stale series)."""

    def __init__(self, app: str, snapshot: Callable[[], Snapshot | None]) -> None:
        self.app = app
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # built at each scrape: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        if snap is None:
            return
        app = self.app
        pending = GaugeMetricFamily(
            "streamlet_pending_batches",
            "Batches logged and not yet done (more than one: the worker is behind)",
            labels=["app"],
        )
        pending.add_metric([app], len(snap.pending))
        yield pending
        up = GaugeMetricFamily(
            "streamlet_up",
            "1 while the worker is processing, 0 when it has stalled (see /healthz)",
            labels=["app", "state"],
        )
        up.add_metric([app, snap.state], 1.0 if _processing(snap) else 0.0)
        yield up
        lag = GaugeMetricFamily(
            "streamlet_source_lag_records",
            "Offsets a direct source has that no batch took yet (Kafka: last stable offset"
            " minus the end of the last batch)",
            labels=["app", "source", "partition"],
        )
        limit = GaugeMetricFamily(
            "streamlet_source_rate_limit_records_per_second",
            "The input rate backpressure set for a source",
            labels=["app", "source"],
        )
        for source in snap.sources:
            for partition, behind in source.lag().items():
                lag.add_metric([app, source.name, str(partition)], behind)
            if source.rate_limit is not None:
                limit.add_metric([app, source.name], source.rate_limit)
        blocks = GaugeMetricFamily(
            "streamlet_receiver_pending_blocks",
            "Blocks a receiver stored that no batch took yet",
            labels=["app", "receiver"],
        )
        for receiver in snap.receivers:
            blocks.add_metric([app, receiver.name], receiver.pending_blocks)
            if receiver.rate_limit is not None:
                limit.add_metric([app, receiver.name], receiver.rate_limit)
        yield lag
        yield limit
        yield blocks
        buffered = GaugeMetricFamily(
            "streamlet_receiver_buffered_bytes",
            "Bytes receivers stored that are not durable yet (bounded by max_buffered_bytes)",
            labels=["app"],
        )
        buffered.add_metric([app], snap.buffered_bytes)
        yield buffered
        if snap.checkpoint_age is not None:
            age = GaugeMetricFamily(
                "streamlet_checkpoint_age_seconds",
                "Seconds since the last checkpoint was written",
                labels=["app"],
            )
            age.add_metric([app], snap.checkpoint_age)
            yield age
        if snap.group is not None:
            g = snap.group
            owned = GaugeMetricFamily(
                "streamlet_tasks_owned",
                "Tasks (partition p of every source) this worker runs batches of",
                labels=["app", "worker"],
            )
            owned.add_metric([app, g.worker], len(g.tasks))
            yield owned
            rebalances = CounterMetricFamily(
                "streamlet_rebalances",
                "Group assignments this worker took over since it started",
                labels=["app", "worker"],
            )
            rebalances.add_metric([app, g.worker], g.rebalances)
            yield rebalances
            pause = HistogramMetricFamily(
                "streamlet_rebalance_pause_seconds",
                "From a rebalance taking tasks away to batches running again",
                labels=["app", "worker"],
            )
            _histogram(pause, [app, g.worker], g.pauses)
            yield pause
        if snap.wals:
            segments = GaugeMetricFamily(
                "streamlet_wal_segments",
                "Segment files of a write-ahead log",
                labels=["app", "log"],
            )
            written = CounterMetricFamily(
                "streamlet_wal_appended_bytes",
                "Bytes appended to a write-ahead log (frames included)",
                labels=["app", "log"],
            )
            fsync = HistogramMetricFamily(
                "streamlet_wal_fsync_seconds",
                "A write-ahead log's fsync calls (one per group commit)",
                labels=["app", "log"],
            )
            append = HistogramMetricFamily(
                "streamlet_wal_append_seconds",
                "Appends to a write-ahead log, from the call until durable",
                labels=["app", "log"],
            )
            for wal in snap.wals:
                segments.add_metric([app, wal.name], wal.segments)
                written.add_metric([app, wal.name], wal.appended_bytes)
                _histogram(fsync, [app, wal.name], wal.fsync)
                _histogram(append, [app, wal.name], wal.append)
            yield segments
            yield written
            yield fsync
            yield append


def _histogram(family: HistogramMetricFamily, labels: list[str], data: Latencies) -> None:
    family.add_metric(
        labels,
        [(_bound(le), float(n)) for le, n in data.buckets],
        sum_value=data.total,
    )


def _bound(le: float) -> str:
    return "+Inf" if le == float("inf") else repr(le)


def _processing(snap: Snapshot) -> bool:
    return health(snap)[0]
