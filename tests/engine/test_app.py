"""The App end to end, in process: registration, batches, restarts, failures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from streamlet.app import App
from streamlet.errors import ConfigError, HandlerError
from streamlet.metrics import BatchInfo
from streamlet.records import Batch, OffsetRange, Record
from streamlet.sinks.base import Sink
from streamlet.sources.sequence import SequenceSource


class ListSink(Sink):
    """Keeps committed batches in memory, idempotent by batch id."""

    def __init__(self) -> None:
        self.batches: dict[int, list[object]] = {}
        self.calls = 0

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        self.calls += 1
        if batch.id in self.batches:
            return False
        self.batches[batch.id] = list(outputs)
        return True

    def values(self) -> list[object]:
        return [v for _, outs in sorted(self.batches.items()) for v in outs]


def _counting_app(state_dir: Path, sink: Sink, *, limit: int = 50, **kwargs: object) -> App:
    app = App("t", state_dir=state_dir, batch_interval=0.01, **kwargs)  # type: ignore[arg-type]
    src = app.source(SequenceSource(rate=None, limit=limit, max_rate=1000), name="seq")

    @app.handler(src, sink=sink)
    async def echo(batch: Batch) -> list[int]:
        return [int(r.value) for r in batch]

    return app


async def _serve_until(app: App, done: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.serve)
        with anyio.fail_after(20):
            await done.wait()
        app.stop()


async def test_every_record_once_in_order_then_resume_without_repeats(tmp_path: Path) -> None:
    sink = ListSink()
    app = _counting_app(tmp_path / "state", sink, limit=50)
    infos: list[BatchInfo] = []
    done = anyio.Event()

    def on_batch(info: BatchInfo) -> None:
        infos.append(info)
        if sum(i.records for i in infos) >= 50:
            done.set()

    app.add_listener(on_batch)
    await _serve_until(app, done)
    assert sink.values() == list(range(50))
    # max_rate=1000/s over 0.01 s batches: at most 10 records per batch.
    assert all(i.records <= 10 for i in infos)
    assert [i.batch_id for i in infos] == list(range(1, len(infos) + 1))

    # Restart with a larger limit: continues at 50, repeats nothing.
    sink2 = ListSink()
    app2 = _counting_app(tmp_path / "state", sink2, limit=80)
    more = anyio.Event()
    seen: list[BatchInfo] = []

    def on_batch2(info: BatchInfo) -> None:
        seen.append(info)
        if sum(i.records for i in seen) >= 30:
            more.set()

    app2.add_listener(on_batch2)
    await _serve_until(app2, more)
    assert sink2.values() == list(range(50, 80))
    assert seen[0].batch_id == infos[-1].batch_id + 1


async def test_a_renamed_handler_is_refused_on_its_state_dir(tmp_path: Path) -> None:
    app = _counting_app(tmp_path / "state", ListSink(), limit=1)
    done = anyio.Event()
    app.add_listener(lambda info: done.set())
    await _serve_until(app, done)

    other = App("t", state_dir=tmp_path / "state", batch_interval=0.01)
    src = other.source(SequenceSource(rate=None, limit=1, partitions=2), name="seq")

    @other.handler(src, sink=ListSink(), name="different")
    async def different(batch: Batch) -> None:
        return None

    # More partitions are fine; a handler renamed would write its batches again.
    with pytest.raises(ConfigError, match="cannot run this version of the app") as info:
        await other.serve()
    assert "handler 'echo' appears renamed to 'different'" in str(info.value)
    assert "name='echo'" in str(info.value)


async def test_failing_handler_stops_the_app_and_the_batch_runs_again(tmp_path: Path) -> None:
    calls: list[int] = []
    sink = ListSink()
    app = App("t", state_dir=tmp_path / "s", batch_interval=0.01, max_retries=2, retry_backoff=0)
    src = app.source(SequenceSource(rate=None, limit=5), name="seq")

    @app.handler(src, sink=sink)
    async def broken(batch: Batch) -> list[int]:
        calls.append(batch.id)
        raise ValueError("bad record")

    with pytest.raises(HandlerError, match=r"'broken' failed on batch 1 after 3 attempt") as info:
        await app.serve()
    assert isinstance(info.value.__cause__, ValueError)
    assert calls == [1, 1, 1]
    assert sink.batches == {}

    # Fixed code, same state: batch 1 runs again with the same 5 records.
    fixed_sink = ListSink()
    fixed = App("t", state_dir=tmp_path / "s", batch_interval=0.01)
    src2 = fixed.source(SequenceSource(rate=None, limit=5), name="seq")
    recovered: list[BatchInfo] = []

    @fixed.handler(src2, sink=fixed_sink, name="broken")
    async def now_fine(batch: Batch) -> list[int]:
        return [int(r.value) for r in batch]

    fixed.add_listener(recovered.append)
    async with anyio.create_task_group() as tg:
        await tg.start(fixed.serve)
        fixed.stop()
    assert fixed_sink.batches == {1: [0, 1, 2, 3, 4]}
    assert recovered[0].recovered


async def test_dead_letter_policy_routes_records_and_goes_on(tmp_path: Path) -> None:
    dead = ListSink()
    good = ListSink()
    app = App(
        "t",
        state_dir=tmp_path / "s",
        batch_interval=0.01,
        max_retries=0,
        on_failure="dead_letter",
        dead_letter=dead,
    )
    src = app.source(SequenceSource(rate=None, limit=3), name="seq")

    @app.handler(src, sink=good)
    async def picky(batch: Batch) -> list[int]:
        raise RuntimeError("cannot handle")

    done = anyio.Event()
    app.add_listener(lambda info: done.set())
    await _serve_until(app, done)
    letters = dead.values()
    assert len(letters) == 3
    first = letters[0]
    assert isinstance(first, dict)
    assert first["handler"] == "picky"
    assert first["error"] == "RuntimeError: cannot handle"
    assert first["offset"] == 0
    assert good.batches == {}


async def test_handler_returning_a_string_is_an_error(tmp_path: Path) -> None:
    app = App("t", state_dir=tmp_path / "s", batch_interval=0.01, max_retries=0)
    src = app.source(SequenceSource(rate=None, limit=1), name="seq")

    @app.handler(src, sink=ListSink())
    async def wrong(batch: Batch) -> str:
        return "not a list"

    with pytest.raises(HandlerError) as info:
        await app.serve()
    assert "return a list" in str(info.value.__cause__)


async def test_async_generator_handlers_yield_outputs(tmp_path: Path) -> None:
    sink = ListSink()
    app = App("t", state_dir=tmp_path / "s", batch_interval=0.01)
    src = app.source(SequenceSource(rate=None, limit=4), name="seq")

    @app.handler(src, sink=sink)
    async def doubled(batch: Batch):  # type: ignore[no-untyped-def]
        for record in batch:
            yield int(record.value) * 2

    done = anyio.Event()
    app.add_listener(lambda info: done.set())
    await _serve_until(app, done)
    assert sink.values() == [0, 2, 4, 6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_interval": 0}, "batch_interval must be a positive number"),
        ({"batch_interval": -1.0}, "batch_interval must be a positive number"),
        ({"checkpoint_interval": -1}, "checkpoint_interval must be >= 0"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
        ({"on_failure": "ignore"}, "on_failure must be"),
        ({"on_failure": "dead_letter"}, "needs a dead_letter sink"),
        ({"handler_timeout": 0}, "handler_timeout must be > 0"),
        ({"durability": "sometimes"}, "durability must be"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        App("t", state_dir=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_bad_app_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="app name"):
        App("no spaces please")


async def test_app_without_handlers_is_refused(tmp_path: Path) -> None:
    app = App("t", state_dir=tmp_path / "s")
    with pytest.raises(ConfigError, match="has no handlers"):
        await app.serve()


async def test_group_writable_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    app = _counting_app(state, ListSink())
    with pytest.raises(ConfigError, match="writable by other users"):
        await app.serve()


async def test_unreadable_state_dir_gives_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    app = _counting_app(blocker / "state", ListSink())
    with pytest.raises(ConfigError, match="cannot be used") as info:
        await app.serve()
    assert str(blocker) in str(info.value)


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_sinks_refuse_outputs_counted_by_another_state_directory(
    tmp_path: Path, kind: str
) -> None:
    """A wiped state_dir restarts batch ids; its sinks must not skip the new batches."""
    from streamlet.sinks.file import FileSink
    from streamlet.sinks.sqlite import SQLiteSink

    def make_sink() -> Sink:
        if kind == "file":
            return FileSink(tmp_path / "out")
        return SQLiteSink(tmp_path / "out.db", lambda conn, batch, outputs: None)

    first = _counting_app(tmp_path / "state-1", make_sink(), limit=5)
    done = anyio.Event()
    first.add_listener(lambda info: done.set())
    await _serve_until(first, done)

    second = _counting_app(tmp_path / "state-2", make_sink(), limit=5)
    with anyio.fail_after(20), pytest.raises(ConfigError, match="another state directory"):
        await second.serve()

    # The original state directory is still welcome.
    again = _counting_app(tmp_path / "state-1", make_sink(), limit=5)
    again.stop()
    with anyio.fail_after(20):
        await again.serve()


async def test_undecodable_records_go_to_the_dead_letter_sink_and_the_batch_goes_on(
    tmp_path: Path,
) -> None:
    import base64

    import orjson

    from streamlet.records import Record

    dead = ListSink()
    sink = ListSink()
    app = App("t", state_dir=tmp_path / "state", batch_interval=0.01, dead_letter=dead)

    def value(partition: int, offset: int) -> bytes:
        return b"{oops" if offset % 10 == 3 else orjson.dumps({"n": offset})

    src = app.source(
        SequenceSource(rate=None, limit=30, value=value), name="json", decode=orjson.loads
    )

    @app.handler(src, sink=sink)
    async def numbers(batch: Batch) -> list[int]:
        return [r.data["n"] for r in batch]  # type: ignore[index]

    done = anyio.Event()
    app.add_listener(lambda info: done.set())
    await _serve_until(app, done)
    assert sink.values() == [n for n in range(30) if n % 10 != 3]
    letters = dead.values()
    assert [letter["offset"] for letter in letters] == [3, 13, 23]  # type: ignore[index]
    first = letters[0]
    assert isinstance(first, dict)
    assert first["handler"] is None
    assert first["source"] == "json"
    assert base64.b64decode(first["value"]) == b"{oops"
    assert "JSONDecodeError" in first["error"]
    assert Record(b"x").data is None


async def test_an_undecodable_record_without_a_dead_letter_sink_stops_the_app(
    tmp_path: Path,
) -> None:
    import orjson

    from streamlet.errors import DecodeError

    app = App("t", state_dir=tmp_path / "state", batch_interval=0.01)
    src = app.source(
        SequenceSource(rate=None, limit=5, value=lambda p, o: b"not json"),
        name="json",
        decode=orjson.loads,
    )
    app.handler(src, sink=ListSink())(_echo_data)
    with anyio.fail_after(20), pytest.raises(DecodeError, match="offset 0 of partition 0"):
        await app.serve()


async def _echo_data(batch: Batch) -> list[object]:
    return [r.data for r in batch]


async def test_a_failing_read_is_retried_with_the_same_ranges(tmp_path: Path) -> None:
    class Flaky(SequenceSource):
        def __init__(self) -> None:
            super().__init__(rate=None, limit=20)
            self.calls: list[tuple[int, int]] = []

        async def read(self, ranges: Sequence[OffsetRange]) -> list[Record]:
            self.calls.append((ranges[0].start, ranges[0].until))
            if len(self.calls) <= 2:
                raise ConnectionError("broker restarting")
            return await super().read(ranges)

    sink = ListSink()
    app = App("t", state_dir=tmp_path / "state", batch_interval=0.01, retry_backoff=0.01)
    source = app.source(Flaky(), name="flaky")
    app.handler(source, sink=sink)(_echo_data)
    done = anyio.Event()
    app.add_listener(lambda info: done.set())
    await _serve_until(app, done)
    assert source.calls[:3] == [(0, 20)] * 3
    assert len(sink.values()) == 20


async def test_a_corrupt_checkpoint_falls_back_and_two_are_refused_by_name(
    tmp_path: Path,
) -> None:
    from streamlet._checkpoint import CheckpointError

    sink = ListSink()
    app = _counting_app(tmp_path / "state", sink, limit=50, checkpoint_interval=0)
    done = anyio.Event()
    app.add_listener(lambda info: done.set() if info.batch_id >= 3 else None)
    await _serve_until(app, done)
    checkpoints = sorted((tmp_path / "state" / "checkpoints").glob("checkpoint-*.json"))
    assert len(checkpoints) == 2

    # The newest is damaged: the older one and the tracker log recover all of it.
    checkpoints[-1].write_bytes(checkpoints[-1].read_bytes()[:-3] + b"xyz")
    resumed = ListSink()
    again = _counting_app(tmp_path / "state", resumed, limit=80, checkpoint_interval=0)
    more = anyio.Event()
    again.add_listener(lambda info: more.set())
    await _serve_until(again, more)
    first = len(sink.values())
    assert sink.values() == list(range(first))
    assert resumed.values()[0] == first  # nothing repeated, nothing skipped
    assert resumed.values() == list(range(first, first + len(resumed.values())))

    # Both damaged: refused with the files named, nothing run.
    for path in sorted((tmp_path / "state" / "checkpoints").glob("checkpoint-*.json")):
        path.write_bytes(b"garbage")
    refused = _counting_app(tmp_path / "state", ListSink(), limit=80)
    with anyio.fail_after(20), pytest.raises(CheckpointError, match="no readable checkpoint"):
        await refused.serve()


async def test_a_graceful_stop_keeps_the_log_the_older_checkpoint_needs(tmp_path: Path) -> None:
    """Stopping rewrites the newest checkpoint; the older one must stay recoverable.

    Tiny tracker segments make the log cleaning behind checkpoints real: with
    the default 4 MiB segments nothing would ever be cleaned here.
    """
    state = tmp_path / "state"
    sink = ListSink()
    app = _counting_app(state, sink, limit=40, checkpoint_interval=0, tracker_segment_bytes=200)
    done = anyio.Event()
    app.add_listener(lambda info: done.set() if info.batch_id >= 4 else None)
    await _serve_until(app, done)
    # The stop's forced checkpoint rewrote checkpoint-<last done> and cleaned.
    assert len(list((state / "tracker").iterdir())) < 10
    checkpoints = sorted((state / "checkpoints").glob("checkpoint-*.json"))
    assert len(checkpoints) == 2
    checkpoints[-1].write_bytes(b"garbage")

    resumed = ListSink()
    again = _counting_app(
        state, resumed, limit=60, checkpoint_interval=0, tracker_segment_bytes=200
    )
    more = anyio.Event()
    again.add_listener(lambda info: more.set())
    await _serve_until(again, more)
    first = len(sink.values())
    assert sink.values() == list(range(first))
    assert resumed.values() == list(range(first, first + len(resumed.values())))


async def test_a_tracker_log_cut_below_the_checkpoint_is_refused(tmp_path: Path) -> None:
    """After a repair or restore cut the log below the checkpoint, new events would be skipped."""
    from streamlet.errors import StreamletError
    from streamlet.wal.format import SEGMENT_HEADER_SIZE

    state = tmp_path / "state"
    app = _counting_app(state, ListSink(), limit=30, checkpoint_interval=0)
    done = anyio.Event()
    app.add_listener(lambda info: done.set() if info.batch_id >= 3 else None)
    await _serve_until(app, done)
    segments = sorted((state / "tracker").glob("*.wal"))
    with segments[-1].open("r+b") as f:
        f.truncate(SEGMENT_HEADER_SIZE)  # every event gone, as a cut at the first record
    again = _counting_app(state, ListSink(), limit=30, checkpoint_interval=0)
    with anyio.fail_after(20), pytest.raises(StreamletError, match="ends before the event"):
        await again.serve()
