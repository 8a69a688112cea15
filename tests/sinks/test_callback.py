"""CallbackSink and PrintSink: delivered on every commit, so at-least-once."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pytest

import streamlet.sinks
from streamlet.errors import SinkError
from streamlet.records import Batch
from streamlet.sinks import CallbackSink, PrintSink, Sink, SinkContext

CONTEXT = SinkContext("app", "counts", "state")


def batch(batch_id: int) -> Batch:
    return Batch(batch_id, 0.0, [])


async def test_plain_callback_gets_every_commit_including_repeats() -> None:
    seen: list[tuple[int, list[object]]] = []

    def record(batch: Batch, outputs: Sequence[object]) -> None:
        seen.append((batch.id, list(outputs)))

    sink = CallbackSink(record)
    await sink.open(CONTEXT)
    assert await sink.commit(batch(1), ["a"]) is True
    # A re-run after a crash delivers the batch again: the sink keeps no record.
    assert await sink.commit(batch(1), ["a"]) is True
    assert await sink.commit(batch(2), []) is True
    assert seen == [(1, ["a"]), (1, ["a"]), (2, [])]


async def test_async_callback_is_awaited() -> None:
    seen: list[int] = []

    async def record(batch: Batch, outputs: Sequence[object]) -> None:
        seen.append(batch.id)

    sink = CallbackSink(record)
    await sink.open(CONTEXT)
    await sink.commit(batch(5), [1])
    assert seen == [5]


async def test_a_callable_object_with_async_call_is_awaited() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.ids: list[int] = []

        async def __call__(self, batch: Batch, outputs: Sequence[object]) -> None:
            self.ids.append(batch.id)

    recorder = Recorder()
    sink = CallbackSink(recorder)
    await sink.commit(batch(3), [])
    assert recorder.ids == [3]


async def test_callback_error_is_a_sink_error_naming_handler_and_batch() -> None:
    def broken(batch: Batch, outputs: Sequence[object]) -> None:
        raise RuntimeError("endpoint down")

    sink = CallbackSink(broken)
    await sink.open(CONTEXT)
    with pytest.raises(SinkError, match=r"handler 'counts' failed on batch 8") as info:
        await sink.commit(batch(8), ["x"])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "broken" in str(info.value)


def test_callback_needs_a_callable() -> None:
    with pytest.raises(streamlet.ConfigError, match="needs a callable"):
        CallbackSink(42)  # type: ignore[arg-type]


async def test_print_sink_prints_a_header_and_one_line_per_output() -> None:
    stream = io.StringIO()
    sink = PrintSink(stream)
    await sink.open(CONTEXT)
    await sink.commit(batch(4), [b"raw \xff", "text", {"word": "hi", "n": 2}, object])
    await sink.commit(batch(5), [])
    lines = stream.getvalue().splitlines()
    assert lines == [
        "--- batch 4 counts: 4 output(s) ---",
        "raw \\xff",
        "text",
        '{"word":"hi","n":2}',
        repr(object),
        "--- batch 5 counts: 0 output(s) ---",
    ]


async def test_print_sink_writes_to_stdout_of_the_moment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sink = PrintSink()
    await sink.commit(batch(1), ["hello"])
    assert capsys.readouterr().out == "--- batch 1: 1 output(s) ---\nhello\n"


@pytest.mark.parametrize("sink_type", [CallbackSink, PrintSink])
def test_guarantee_is_at_least_once_and_documented(sink_type: type[Sink]) -> None:
    assert sink_type.guarantee == "at-least-once"
    assert "at-least-once" in (sink_type.__doc__ or "")


def test_durable_sinks_are_exactly_once() -> None:
    assert streamlet.sinks.FileSink.guarantee == "exactly-once"
    assert streamlet.sinks.SQLiteSink.guarantee == "exactly-once"


def test_sinks_package_exports_what_it_lists() -> None:
    names = streamlet.sinks.__all__
    assert sorted(names) == sorted(set(names))
    for name in names:
        assert getattr(streamlet.sinks, name) is not None, name
    public = {
        name
        for name, value in vars(streamlet.sinks).items()
        if not name.startswith("_") and isinstance(value, type) and issubclass(value, Sink)
    }
    assert public <= set(names)
