"""The test kit for apps: AppHarness on the examples, failures, crashes and restarts."""

from __future__ import annotations

import base64
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

import streamlet as sl
import streamlet.testing
from examples import kafka_to_sqlite, window_counts, wordcount
from streamlet._faults import SimulatedCrash, crash_in_process, crash_point
from streamlet.testing import (
    CRASH_POINTS,
    AppHarness,
    Message,
    assert_same_after_crash,
)
from streamlet.testing.pytest_plugin import streamlet_harness  # noqa: F401 - the fixture

README = Path(__file__).resolve().parents[2] / "README.md"


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _exists(path: Path) -> bool:
    return path.exists()


# -- the examples -----------------------------------------------------------------


async def test_wordcount_counts_fed_sentences_without_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with AppHarness(wordcount.app) as harness:
        harness.feed("lines", ["stream batch stream", b"batch log"])
        ran = await harness.until_idle()
        assert [info.batch_id for info in ran] == [1]
        assert harness.outputs("count_words") == [("batch", 2), ("log", 1), ("stream", 2)]
        harness.feed("lines", ["crash restart"])
        await harness.until_idle()
        assert harness.batches("count_words") == {
            1: [("batch", 2), ("log", 1), ("stream", 2)],
            2: [("crash", 1), ("restart", 1)],
        }
    assert _names(tmp_path) == []  # FileSink("out/wordcount") was stood in for
    assert harness.state_dir.startswith("/streamlet/")  # in memory: no temporary directory


async def test_window_counts_keeps_keyed_state_in_a_temporary_directory_it_removes() -> None:
    async with AppHarness(window_counts.app) as harness:
        harness.feed("readings", [Message(b"r", key=f"s{i % 2}") for i in range(20)])
        await harness.until_idle()
        assert harness.outputs("per_window") == []  # no 10 s window has closed yet
        assert _exists(Path(harness.state_dir, "state", "per_window.sqlite"))
        await harness.run_for(12.0)  # idle batches close the windows as time passes
        closed = harness.outputs("per_window")
    assert not _exists(Path(harness.state_dir))
    # Every 10 s window holding the readings (fed at one instant) counts all ten of each sensor.
    assert {(key, count) for key, _, _, count in closed} == {("s0", 10), ("s1", 10)}  # type: ignore[misc]
    assert len(closed) == 2 * 5  # sliding(10, 2): five windows hold that instant


async def test_kafka_records_decode_and_the_bad_one_is_a_dead_letter() -> None:
    harness = AppHarness(kafka_to_sqlite.app)
    harness.feed(
        "views",
        [
            Message({"page": "/home"}, key="u1", partition=0),
            Message(b"{not json", partition=0),
            Message({"page": "/home"}, partition=1, offset=40),
            Message({"page": "/about"}, partition=1, headers=(("trace", b"7"),)),
        ],
    )
    await harness.until_idle()
    assert harness.outputs("count_pages") == [("/about", 1), ("/home", 2)]
    [dead] = harness.dead_letters()
    assert isinstance(dead, dict)
    assert (dead["source"], dead["partition"], dead["offset"]) == ("views", 0, 1)
    assert base64.b64decode(dead["value"]) == b"{not json"
    assert dead["handler"] is None
    assert "JSONDecodeError" in dead["error"]
    # Offsets as Kafka has them: dense from 0, or as given, then on from there.
    [info] = harness.infos
    assert sorted((r.partition, r.start, r.until) for r in info.ranges) == [(0, 0, 2), (1, 40, 42)]


async def test_keep_sinks_writes_through_the_real_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the example's SQLiteSink writes out/page_views.db
    async with AppHarness(kafka_to_sqlite.app, keep_sinks=True) as harness:
        harness.feed("views", [{"page": "/a"}, {"page": "/b"}])
        await harness.until_idle()
        harness.feed("views", [{"page": "/a"}])
        await harness.crash_at("after_sink_commit", batch=2)
        assert await harness.restart() == [2]
    # The real sink took batch 2 before the crash and skipped its re-run.
    assert [c.written for c in harness.commits("count_pages")] == [True, True, False]
    with sqlite3.connect(tmp_path / "out" / "page_views.db") as conn:
        rows = conn.execute("SELECT page, views FROM views ORDER BY page").fetchall()
    conn.close()
    assert rows == [("/a", 2), ("/b", 1)]
    assert _names(tmp_path) == ["out"]


# -- feeding ----------------------------------------------------------------------


def _echo_app(**settings: object) -> sl.App:
    app = sl.App("echo", **settings)  # type: ignore[arg-type]
    src = app.source(sl.SequenceSource(limit=0), name="in")

    @app.handler(src, sink=sl.FileSink("out/echo"))
    async def echo(batch: sl.Batch) -> list[object]:
        return [(r.partition, r.offset, r.key, r.value, r.timestamp, r.headers) for r in batch]

    return app


async def test_fed_values_are_encoded_as_a_source_would() -> None:
    harness = AppHarness(_echo_app())
    now = harness.clock.time()
    harness.feed(
        "in",
        [
            b"raw",
            "text",
            {"a": 1},
            [1, 2],
            sl.Record(b"rec", b"k", 5.0, partition=2, offset=9),
            Message("m", key="k2", partition=2, timestamp=7.0, headers=(("h", None),)),
        ],
    )
    await harness.until_idle()
    assert harness.outputs("echo") == [
        (0, 0, None, b"raw", now, ()),
        (0, 1, None, b"text", now, ()),
        (0, 2, None, b'{"a":1}', now, ()),
        (0, 3, None, b"[1,2]", now, ()),
        (2, 9, b"k", b"rec", 5.0, ()),
        (2, 10, b"k2", b"m", 7.0, (("h", None),)),
    ]


async def test_offsets_only_increase_and_sources_are_named() -> None:
    harness = AppHarness(_echo_app())
    harness.feed("in", [Message(b"x", offset=5)])
    with pytest.raises(ValueError, match="offset 5 of partition 0 is not past"):
        harness.feed("in", [Message(b"y", offset=5)])
    with pytest.raises(sl.ConfigError, match="no source named 'nope'; its sources: in"):
        harness.feed("nope", [b"z"])
    with pytest.raises(KeyError, match="no handler named 'nope'"):
        harness.outputs("nope")


async def test_the_users_app_is_not_changed() -> None:
    app = _echo_app()
    sources, handlers = dict(app._sources), list(app._handlers)
    harness = AppHarness(app)
    harness.feed("in", [b"a"])
    await harness.until_idle()
    assert app._sources == sources
    assert app._handlers == handlers
    assert app.state_dir == ".streamlet/echo"
    assert app._stop is None


async def test_run_batches_counts_idle_batches_and_says_when_there_are_none() -> None:
    async with AppHarness(window_counts.app) as harness:
        ran = await harness.run_batches(3)  # State(idle=True): a batch every interval
        assert [info.records for info in ran] == [0, 0, 0]
    with pytest.raises(AssertionError, match=r"0 batch\(es\) ran in 5 s of the app's clock"):
        await AppHarness(_echo_app()).run_batches(1, limit=5.0)


# -- retries and dead letters -------------------------------------------------------


async def test_a_handler_that_fails_once_is_retried_and_commits_once() -> None:
    app = sl.App("flaky", max_retries=2)
    src = app.source(sl.SequenceSource(limit=0), name="in")
    calls: list[int] = []

    @app.handler(src, sink=sl.FileSink("out/flaky"))
    async def flaky(batch: sl.Batch) -> list[str]:
        calls.append(batch.id)
        if len(calls) == 1:
            raise ConnectionError("once")
        return [r.value.decode() for r in batch]

    harness = AppHarness(app)
    harness.feed("in", ["a", "b"])
    await harness.until_idle()
    assert calls == [1, 1]
    assert harness.commits("flaky") == [(1, ["a", "b"], True)]
    assert harness.infos[0].handlers[0].attempts == 2


async def test_a_handler_that_always_fails_sends_its_records_to_the_dead_letter_sink() -> None:
    app = sl.App(
        "poison",
        max_retries=1,
        on_failure="dead_letter",
        dead_letter=sl.FileSink("out/dead"),
    )
    src = app.source(sl.SequenceSource(limit=0), name="in")

    @app.handler(src, sink=sl.FileSink("out/poison"))
    async def always_fails(batch: sl.Batch) -> list[str]:
        raise ValueError("no")

    harness = AppHarness(app)
    harness.feed("in", ["a"])
    await harness.until_idle()
    assert harness.outputs("always_fails") == []
    [dead] = harness.dead_letters()
    assert isinstance(dead, dict)
    assert dead["handler"] == "always_fails"
    assert dead["attempts"] == 2
    assert dead["error"] == "ValueError: no"


async def test_with_on_failure_stop_the_handlers_error_is_raised() -> None:
    app = sl.App("stops", max_retries=0)
    src = app.source(sl.SequenceSource(limit=0), name="in")

    @app.handler(src)
    async def fails(batch: sl.Batch) -> None:
        raise ValueError("no")

    harness = AppHarness(app)
    harness.feed("in", ["a"])
    with pytest.raises(sl.HandlerError, match="handler 'fails' failed on batch 1") as caught:
        await harness.until_idle()
    assert isinstance(caught.value.__cause__, ValueError)  # the handler's own error
    assert harness.outputs("fails") == []


# -- crashes and restarts -------------------------------------------------------------


def _totals_app() -> sl.App:
    """Keyed running totals, a stateless handler, decode and dead letters: every step."""
    app = sl.App(
        "totals",
        on_failure="dead_letter",
        dead_letter=sl.FileSink("out/dead"),
        max_batch_records=3,
    )
    events = app.source(sl.SequenceSource(limit=0), name="events", decode=orjson.loads)

    @app.handler(events, sink=sl.FileSink("out/totals"), state=sl.State())
    async def totals(batch: sl.Batch, state: sl.KeyedState) -> list[tuple[str, int]]:
        for record in batch:
            user = str(record.data["user"])  # type: ignore[index]
            state[user] = state.get(user, 0) + 1
        return sorted((str(k), int(v)) for k, v in state.changed().items())  # type: ignore[call-overload]

    @app.handler(events, sink=sl.FileSink("out/sizes"))
    async def sizes(batch: sl.Batch) -> list[int]:
        return [len(batch)]

    return app


ROUNDS = [
    {"events": [{"user": "ann"}, {"user": "bob"}, b"oops", {"user": "ann"}]},
    {"events": [{"user": "bob"}, {"user": "cy"}]},
    {"events": [{"user": "ann"}]},
]


@pytest.mark.parametrize("point", CRASH_POINTS)
async def test_a_crash_at_any_step_and_a_restart_change_no_output(point: str) -> None:
    crashed = await assert_same_after_crash(_totals_app, ROUNDS, point=point, batch=2)
    assert crashed.crashes[0].point == point
    assert crashed.outputs("totals")[-1] == ("ann", 3)
    assert len(crashed.dead_letters()) == 1


async def test_crash_and_restart_by_hand() -> None:
    harness = AppHarness(_totals_app())
    harness.feed("events", [{"user": "ann"}, {"user": "bob"}])
    crash = await harness.crash_at("after_sink_commit", batch=1)
    assert (crash.point, crash.batch_id) == ("after_sink_commit", 1)
    # The sinks took batch 1; its state and its "done" were not written.
    assert harness.outputs("totals") == [("ann", 1), ("bob", 1)]
    assert await harness.restart() == [1]
    # Re-run: the sinks had it already, the state is committed now.
    assert [c.written for c in harness.commits("totals")] == [True, False]
    harness.feed("events", [{"user": "ann"}])
    await harness.until_idle()
    assert harness.outputs("totals") == [("ann", 1), ("bob", 1), ("ann", 2)]
    harness.close()


async def test_windows_closed_by_time_are_the_same_after_a_crash_in_an_idle_batch() -> None:
    rounds: list[object] = [{"readings": [Message(b"r", key="s1")] * 3}, 12.0]
    crashed = await assert_same_after_crash(
        window_counts.app,
        rounds,  # type: ignore[arg-type]
        point="after_state_commit",
        batch=5,
    )
    assert len(crashed.outputs("per_window")) == 5


async def test_crash_at_a_batch_that_never_comes_says_so() -> None:
    harness = AppHarness(_echo_app())
    harness.feed("in", [b"a"])
    with pytest.raises(AssertionError, match="went idle without reaching after_handler of batch 7"):
        await harness.crash_at("after_handler", batch=7)
    with pytest.raises(ValueError, match="not a crash point"):
        await harness.crash_at("after_lunch")
    with pytest.raises(AssertionError, match="the crash was not tested"):
        await assert_same_after_crash(_echo_app, {"in": [b"a"]}, point="after_done", batch=3)


def _calls_per_batch_app() -> sl.App:
    app = sl.App("hidden")
    src = app.source(sl.SequenceSource(limit=0), name="in")
    seen: Counter[int] = Counter()

    @app.handler(src, sink=sl.FileSink("out/hidden"))
    async def hidden(batch: sl.Batch) -> list[str]:
        seen[batch.id] += 1  # a re-run sees a different world: not deterministic
        return [f"{r.value.decode()}#{seen[batch.id]}" for r in batch]

    return app


def _at_least_once_app() -> sl.App:
    app = sl.App("printer")
    src = app.source(sl.SequenceSource(limit=0), name="in")

    @app.handler(src, sink=sl.CallbackSink(lambda batch, outputs: None))
    async def shout(batch: sl.Batch) -> list[str]:
        return [r.value.decode().upper() for r in batch]

    return app


async def test_the_crash_assertion_catches_a_handler_that_is_not_deterministic() -> None:
    with pytest.raises(AssertionError, match=r"handler 'hidden' committed other outputs") as err:
        await assert_same_after_crash(
            _calls_per_batch_app, {"in": ["a"]}, point="after_handler", batch=1
        )
    assert "without: batch 1: ['a#1']" in str(err.value)
    assert "with:    batch 1: ['a#2']" in str(err.value)


async def test_the_crash_assertion_catches_a_sink_that_repeats_outputs() -> None:
    # CallbackSink is at-least-once: its stand-in takes a re-run's commit again.
    await assert_same_after_crash(_at_least_once_app, {"in": ["a"]}, point="after_handler")
    with pytest.raises(AssertionError, match=r"handler 'shout' committed other outputs"):
        await assert_same_after_crash(_at_least_once_app, {"in": ["a"]}, point="before_done")


async def test_the_in_process_hook_raises_where_the_variable_would_kill() -> None:
    crash_point("after_handler", 1)  # no hook, no variable: nothing happens
    with crash_in_process(lambda point, batch: point == "after_handler" and batch == 2):
        crash_point("after_handler", 1)
        with pytest.raises(SimulatedCrash, match="after_handler of batch 2"):
            crash_point("after_handler", 2)
    crash_point("after_handler", 2)  # the hook is gone with the block


def test_the_variable_still_kills_with_a_hook_set() -> None:
    code = (
        "from streamlet._faults import crash_in_process, crash_point\n"
        "with crash_in_process(lambda point, batch: False):\n"
        "    crash_point('after_done', 3)\n"
        "    crash_point('after_done', 4)\n"
        "print('alive')\n"
    )
    env = {**os.environ, "STREAMLET_CRASH_AT": "after_done:4"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == -signal.SIGKILL
    assert result.stdout == b""


# -- the package and the fixture -------------------------------------------------------


async def test_the_fixture_makes_harnesses_and_closes_them(
    streamlet_harness: Callable[..., AppHarness],  # noqa: F811 - the fixture imported above
) -> None:
    harness = streamlet_harness(window_counts.app)
    harness.feed("readings", [Message(b"x", key="s0")])
    await harness.until_idle()
    assert _exists(Path(harness.state_dir))  # removed by the fixture after the test


def test_the_kit_names_are_exported_and_load_only_when_used() -> None:
    for name in streamlet.testing.__all__:
        assert getattr(streamlet.testing, name) is not None
    code = (
        "import sys, streamlet.testing as t\n"
        "assert 'streamlet.testing.harness' not in sys.modules\n"
        "t.AppHarness\n"
        "assert 'streamlet.testing.harness' in sys.modules\n"
        "assert 'streamlet.testing.kafka' not in sys.modules\n"  # no broker, no Java
        "assert 'streamlet.testing.postgres' not in sys.modules\n"
        "assert 'asyncpg' not in sys.modules\n"  # the postgres extra
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_the_readme_example_test_passes() -> None:
    section = README.read_text().split("## Testing your app", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert snippet is not None
    namespace: dict[str, object] = {"__name__": "readme_testing"}
    exec(compile(snippet.group(1), "README.md", "exec"), namespace)  # noqa: S102 - our README
    await namespace["test_counts_words"]()  # type: ignore[operator]
    for point in ("after_handler", "after_sink_commit", "before_done"):
        await namespace["test_a_crash_changes_nothing"](point)  # type: ignore[operator]
