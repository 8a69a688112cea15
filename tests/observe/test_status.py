"""The status model, health, addresses and the terminal picture: pure, no server."""

from __future__ import annotations

import pytest

from streamlet.errors import ConfigError
from streamlet.metrics import BatchInfo, HandlerInfo
from streamlet.observe.address import is_loopback, parse_address
from streamlet.observe.status import (
    BatchLog,
    ReceiverStatus,
    SinkStatus,
    Snapshot,
    SourceStatus,
    health,
    status_document,
)
from streamlet.observe.terminal import render
from streamlet.records import BlockRef, OffsetRange


def _info(batch_id: int, *, error: str | None = None, records: int = 10) -> BatchInfo:
    handler = HandlerInfo(
        "h",
        records=records,
        outputs=0 if error else records,
        attempts=2 if error else 1,
        dead_lettered=error is not None,
        errors=(error,) if error else (),
        sink="FileSink(out)",
        commit_time=0.002,
        commit_attempts=1,
    )
    return BatchInfo(
        batch_id=batch_id,
        batch_time=1000.0 + batch_id,
        records=records,
        outputs=handler.outputs,
        scheduling_delay=0.001,
        processing_time=0.01 * batch_id,
        commit_time=0.002,
        total_delay=0.013,
        dead_lettered=("h",) if error else (),
        inputs={"seq": records},
        ranges=(OffsetRange("seq", 0, batch_id * 10, batch_id * 10 + records),),
        blocks=(BlockRef(7, "tcp", 1, 0, 100, 3), BlockRef(8, "tcp", 1, 100, 100, 4)),
        handlers=(handler,),
    )


def _snapshot(**changes: object) -> Snapshot:
    fields: dict[str, object] = {
        "app": "a",
        "state": "running",
        "now": 100.0,
        "started": 40.0,
        "wall": 5000.0,
        "batch_interval": 1.0,
        "last_done": 3,
        "next_batch": 4,
        "pending": [],
        "running": {},
        "last_progress": 99.5,
        "checkpoint_age": 2.0,
        "buffered_bytes": 0,
        "sources": [SourceStatus("seq", "SequenceSource", {0: 30, 1: 5}, {0: 42, 1: 5})],
        "receivers": [ReceiverStatus("tcp", "TcpSource", 2, 7, {"c1": 9})],
        "sinks": [SinkStatus("h", "FileSink(out)", "exactly-once")],
    }
    fields.update(changes)
    return Snapshot(**fields)  # type: ignore[arg-type]


def test_the_batch_log_keeps_the_newest_and_pages_after_an_id() -> None:
    log = BatchLog(retained=3)
    for i in range(1, 6):
        log.add(_info(i))
    assert [b["id"] for b in log.after(-1, 100)] == [3, 4, 5]  # bounded memory
    assert [b["id"] for b in log.after(3, 100)] == [4, 5]
    assert [b["id"] for b in log.after(-1, 1)] == [5]
    assert log.last is not None
    assert log.last["id"] == 5


def test_a_batch_document_has_ranges_blocks_and_handlers_but_no_data() -> None:
    log = BatchLog()
    doc = log.add(_info(2, error="ValueError: bad"))
    assert doc["ranges"] == [{"source": "seq", "partition": 0, "start": 20, "until": 30}]
    assert doc["blocks"] == {"tcp": {"blocks": 2, "records": 7, "first": 7, "last": 8}}
    assert doc["handlers"][0]["errors"] == ["ValueError: bad"]
    assert doc["dead_lettered"] == ["h"]
    assert log.errors == [
        {
            "batch": 2,
            "time": 1002.0,
            "handler": "h",
            "error": "ValueError: bad",
            "failures": 1,
            "dead_lettered": True,
        }
    ]


def test_lag_is_what_no_batch_took_yet_per_partition() -> None:
    source = SourceStatus("k", "KafkaDirectSource", {0: 30, 1: 5}, {0: 42, 1: 5, 2: 3})
    assert source.lag() == {0: 12, 1: 0, 2: 3}


def test_health_fails_only_when_a_running_worker_shows_no_progress() -> None:
    assert health(_snapshot())[0]
    # Quiet for 31 s with a 1 s interval: past max(3 intervals, 30 s).
    ok, doc = health(_snapshot(last_progress=69.0))
    assert not ok
    assert doc["status"] == "stalled"
    assert doc["seconds_since_progress"] == 31.0
    # A long interval allows three of them.
    assert health(_snapshot(last_progress=69.0, batch_interval=20.0))[0]
    # Recovering is progress of its own.
    assert health(_snapshot(last_progress=0.0, state="recovering"))[0]


def test_the_status_document_and_its_terminal_picture() -> None:
    log = BatchLog()
    log.add(_info(1))
    log.add(_info(2, error="TimeoutError: slow"))
    doc = status_document(_snapshot(), log)
    assert doc["healthy"] is True
    assert doc["uptime"] == 60.0
    assert doc["sources"][0]["lag"] == 12
    assert doc["sources"][0]["partitions"][0] == {
        "partition": 0,
        "position": 30,
        "latest": 42,
        "lag": 12,
    }
    assert doc["rates"]["input_per_second"] == pytest.approx(20 / 2)  # two 1 s batches
    text = render(doc)
    assert "a: running, ok; last batch 3, 0 pending" in text
    assert "seq     SequenceSource  0     30        42      12   -" in text
    assert "tcp       TcpSource  2       7" in text
    assert "batch 2 handler h: TimeoutError: slow (dead-lettered)" in text
    assert "FileSink(out)  exactly-once" in text
    stalled = render(status_document(_snapshot(last_progress=0.0), log))
    assert "STALLED" in stalled


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("9100", ("127.0.0.1", 9100)),
        ("[::1]:0", ("::1", 0)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),  # noqa: S104 - parsed, not bound
    ],
)
def test_addresses_parse_with_loopback_by_default(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["host:", "localhost:http", "1.2.3.4:70000", ""])
def test_a_bad_address_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_address(text)


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")  # noqa: S104
    assert not is_loopback("192.168.1.5")
    assert not is_loopback("example.com")


def test_group_mode_shows_the_workers_tasks_and_rebalances() -> None:
    from streamlet.metrics import LatencyHistogram
    from streamlet.observe.status import GroupStatus, Latencies

    pauses = LatencyHistogram()
    pauses.observe(0.4)
    group = GroupStatus("orders", "w2", (1, 3), (1, 3), 2, 0.4, Latencies(pauses.cumulative(), 0.4))
    doc = status_document(_snapshot(group=group), BatchLog())
    assert doc["group"] == {
        "group": "orders",
        "worker": "w2",
        "tasks": [1, 3],
        "assigned": [1, 3],
        "rebalances": 2,
        "last_pause": 0.4,
    }
    assert "group 'orders' as worker 'w2': tasks [1, 3], 2 rebalance(s)" in render(doc)
    assert status_document(_snapshot(), BatchLog())["group"] is None
