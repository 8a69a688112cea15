"""Keyed windows without I/O: membership, watermark, closing, aggregations.

The property tests run :func:`apply_batch` against brute-force models that
follow the definitions literally (scan every start; recompute the watermark
from all earlier batches), over arbitrary splits of the same input into
batches.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamlet.errors import ConfigError
from streamlet.state._windows import (
    JSON,
    Aggregation,
    Book,
    Event,
    Key,
    Window,
    WindowResult,
    WindowSpec,
    aggregate,
    apply_batch,
    check_interval,
    closing,
    count,
    due,
    is_json,
    is_late,
    key_order,
    max_,
    min_,
    next_watermark,
    open_results,
    reduce,
    sliding,
    sum_,
    tumbling,
    window_end,
    windows_of,
)

# -- membership -------------------------------------------------------------------


def test_a_time_is_in_every_sliding_window_that_holds_it() -> None:
    spec = sliding(10, 2)
    assert windows_of(11.0, spec) == [(2, 12), (4, 14), (6, 16), (8, 18), (10, 20)]
    assert all(isinstance(w, Window) for w in windows_of(11.0, spec))


def test_a_time_on_a_boundary_belongs_to_the_window_starting_there() -> None:
    assert windows_of(10.0, sliding(10, 2))[-1] == (10, 20)
    assert windows_of(10.0, sliding(10, 2))[0] == (2, 12)
    assert windows_of(5.0, tumbling(5)) == [(5, 10)]
    assert windows_of(4.999, tumbling(5)) == [(0, 5)]


def test_tumbling_windows_are_aligned_to_the_epoch_also_before_it() -> None:
    assert windows_of(0.0, tumbling(60)) == [(0, 60)]
    assert windows_of(-0.001, tumbling(1)) == [(-1, 0)]
    assert windows_of(1_733_300_000.25, tumbling(60)) == [(1_733_299_980, 1_733_300_040)]


def test_times_are_resolved_to_the_millisecond_so_boundaries_do_not_drift() -> None:
    # 0.57 * 1000 is 569.99999999999994 in floats; flooring it would say [0.56, 0.57).
    assert windows_of(0.57, tumbling(0.01)) == [(0.57, 0.58)]
    # 0.1 + 0.2 is 0.30000000000000004: still the window starting at 0.3.
    assert windows_of(0.1 + 0.2, tumbling(0.1)) == [(0.3, 0.4)]
    assert window_end(0.1 * 3, tumbling(0.1)) == 0.4
    assert window_end(0.7, tumbling(0.1)) == 0.8  # 0.7 + 0.1 is 0.7999999999999999
    # Kafka milliseconds survive the trip through float seconds.
    for ms in (1_733_300_000_123, 999, 1, 0):
        assert windows_of(ms / 1000, tumbling(0.001)) == [(ms / 1000, (ms + 1) / 1000)]


@settings(max_examples=300, deadline=None)
@given(
    t_ms=st.integers(-100_000, 100_000),
    slide_ms=st.integers(1, 50),
    per_time=st.integers(1, 6),
)
def test_windows_of_matches_a_scan_of_every_start(t_ms: int, slide_ms: int, per_time: int) -> None:
    spec = sliding(per_time * slide_ms / 1000, slide_ms / 1000)
    scan = [
        (s / 1000, (s + spec.size_ms) / 1000)
        for s in range(t_ms - spec.size_ms, t_ms + 1)
        if s % slide_ms == 0 and s <= t_ms < s + spec.size_ms
    ]
    assert windows_of(t_ms / 1000, spec) == scan
    assert len(scan) == per_time


# -- settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: tumbling(0), "window size must be > 0 s, not 0: fix size= in tumbling()"),
        (lambda: tumbling(-1), "finite number of seconds >= 0, not -1: fix size= in tumbling()"),
        (lambda: tumbling(float("nan")), "finite number of seconds >= 0, not nan"),
        (lambda: tumbling("5"), "window size must be a number of seconds, not '5'"),  # type: ignore[arg-type]
        (lambda: tumbling(True), "window size must be a number of seconds, not True"),
        (lambda: tumbling(0.0005), "not a whole number of milliseconds"),
        (lambda: sliding(10, 0), "window slide must be > 0 s, not 0: fix slide= in sliding()"),
        (lambda: sliding(2, 10), "slide 10 s is longer than its size 2 s"),
        (lambda: sliding(10, 3), "window size 10 s is not a multiple of its slide 3 s"),
        (lambda: tumbling(5, time="batch"), "window time must be 'processing' or 'event'"),  # type: ignore[arg-type]
        (lambda: tumbling(5, lateness=1), "lateness 1 s applies to event time only"),
        (lambda: tumbling(5, time="event", lateness=-1), "fix lateness= in tumbling()"),
        (lambda: tumbling(5, idle_timeout=1), "idle_timeout 1 s applies to event time only"),
        (lambda: sliding(4, 2, time="event", idle_timeout=0), "idle_timeout must be > 0 s"),
        (lambda: tumbling(4, time="event", idle_timeout=-1), "idle_timeout must be > 0 s, not -1"),
        (lambda: tumbling(5, time="event", idle_timeout=0.0001), "round idle_timeout= in"),
    ],
)
def test_bad_settings_are_config_errors_that_say_what_to_do(
    make: Callable[[], WindowSpec], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make()
    assert message in str(caught.value)


def test_good_settings() -> None:
    spec = sliding(0.6, 0.2, time="event", lateness=1.5)
    assert (spec.size_ms, spec.slide_ms, spec.lateness_ms, spec.per_time) == (600, 200, 1500, 3)
    assert tumbling(5) == WindowSpec(5, 5, "processing", 0.0)


def test_processing_time_windows_must_be_multiples_of_the_batch_interval() -> None:
    check_interval(sliding(0.6, 0.2), 0.2)  # 0.6 / 0.2 is 2.9999999999999996 in floats
    check_interval(tumbling(60), 0.25)
    check_interval(tumbling(1.5, time="event"), 1.0)  # event time does not depend on it
    with pytest.raises(ConfigError, match=r"window size 1\.5 s is not a multiple of the batch"):
        check_interval(tumbling(1.5), 1.0)
    with pytest.raises(ConfigError, match=r"window slide 1 s is not a multiple of the batch"):
        check_interval(sliding(4, 1), 2.0)
    with pytest.raises(ConfigError, match=r"window size 0\.5 s is not a multiple"):
        check_interval(tumbling(0.5), 1.0)
    with pytest.raises(ConfigError, match="batch_interval must be positive"):
        check_interval(tumbling(1), 0)


# -- watermark and closing --------------------------------------------------------


def test_the_watermark_is_the_newest_event_time_less_the_lateness() -> None:
    assert next_watermark(None, [], 5) is None
    assert next_watermark(None, [3.0, 11.3, 7.0], 0.1) == 11.2  # not 11.200000000000001
    assert next_watermark(20.0, [11.3], 0.1) == 20.0  # never goes back
    assert next_watermark(20.0, [], 0.1) == 20.0


def test_late_means_before_the_watermark() -> None:
    wm = next_watermark(None, [11.3], 0.1)
    assert not is_late(11.2, wm)
    assert is_late(11.199, wm)
    assert not is_late(-1e9, None)


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(st.lists(st.integers(-10_000, 10_000)), max_size=8),
    lateness_ms=st.integers(0, 5_000),
)
def test_the_watermark_is_monotone_and_follows_its_formula(
    batches: list[list[int]], lateness_ms: int
) -> None:
    wm: float | None = None
    seen: list[int] = []
    for times in batches:
        new = next_watermark(wm, [t / 1000 for t in times], lateness_ms / 1000)
        seen += times
        assert new == (None if not seen else (max(seen) - lateness_ms) / 1000)
        assert wm is None or (new is not None and new >= wm)
        wm = new


def test_due_windows_end_at_or_before_the_clock() -> None:
    assert due([12.0, 10.0, 14.0, 10.0], 12.0) == [10.0, 12.0]
    assert due([0.30000000000000004], 0.3) == [0.3]
    assert due([1.0], None) == []


def test_closed_windows_come_out_by_end_then_key_encoding() -> None:
    spec = tumbling(10)
    panes: dict[tuple[Key, float], JSON] = {
        ("b", 0.0): 1,
        (b"a", 10.0): 2,
        ("a", 0.0): 3,
        (7, 0.0): 4,
        (b"z", 0.0): 5,
        ("a", 20.0): 6,
    }
    got = closing(panes, 20.0, spec, count())
    assert [(r.key, r.end) for r in got] == [
        (b"z", 10.0),
        (7, 10.0),
        ("a", 10.0),
        ("b", 10.0),
        (b"a", 20.0),
    ]
    assert got[0] == WindowResult(b"z", 0.0, 10.0, 5)
    assert closing(panes, None, spec, count()) == []
    assert [r.value for r in open_results(panes, spec, count())] == [5, 4, 3, 1, 2, 6]


def test_key_order_is_the_stores_key_encoding() -> None:
    store = pytest.importorskip("streamlet.state._store")
    for key in ("a", "", "é\udc80", b"", b"\x00", 0, -12, 10**30):
        assert key_order(key) == store.encode_key(key)


# -- aggregations ---------------------------------------------------------------


def _fold(agg: Aggregation, items: Sequence[Any]) -> JSON:
    acc = agg.zero()
    for item in items:
        acc = agg.add(acc, item)
        # Invariant: the accumulator is what the store would decode.
        assert is_json(acc)
        assert orjson.loads(orjson.dumps(acc)) == acc
    return agg.result(acc)


def _chain(a: int, b: int) -> int:
    """Not commutative: the result depends on the order of the values."""
    return (a * 31 + b) % 1_000_003


def _append(acc: list[int], item: int) -> list[int]:
    acc.append(item)  # mutates: zero() and the book must hand out copies
    return acc


AGGREGATIONS: list[tuple[str, Callable[[], Aggregation], Callable[[list[int]], JSON]]] = [
    ("count", count, len),
    ("sum", sum_, sum),
    ("min", min_, lambda xs: min(xs, default=None)),
    ("max", max_, lambda xs: max(xs, default=None)),
    ("reduce", lambda: reduce(_chain), lambda xs: functools.reduce(_chain, xs) if xs else None),
    ("aggregate", lambda: aggregate([], _append, len), len),
    ("aggregate-list", lambda: aggregate([], _append), list),
]


@pytest.mark.parametrize(("name", "make", "model"), AGGREGATIONS, ids=[a[0] for a in AGGREGATIONS])
def test_aggregations_on_plain_values(
    name: str, make: Callable[[], Aggregation], model: Callable[[list[int]], JSON]
) -> None:
    items = [5, -2, 9, -2, 0]
    assert _fold(make(), items) == model(items)
    assert _fold(make(), []) == model([])


def test_a_value_function_picks_the_value_and_none_values_are_skipped() -> None:
    rows = [{"n": 3}, {"n": None}, {"n": -1}, {"n": 8}]
    n: Callable[[Any], Any] = lambda row: row["n"]  # noqa: E731
    assert _fold(count(), rows) == 4
    assert _fold(sum_(value=n), rows) == 10
    assert _fold(min_(n), rows) == -1
    assert _fold(max_(n), rows) == 8
    assert _fold(reduce(lambda a, b: a * b, value=n), rows) == -24
    assert _fold(min_(n), [{"n": None}]) is None
    assert _fold(sum_(value=n), [{"n": 0.5}, {"n": 0.25}]) == 0.75


def test_aggregate_refuses_an_initial_value_the_store_could_not_save() -> None:
    with pytest.raises(ConfigError, match=r"aggregate\(initial=\(\)\) is not a JSON value"):
        aggregate((), _append)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a JSON value"):
        aggregate({1: 2}, _append)  # type: ignore[dict-item]


def test_only_values_orjson_gives_back_unchanged_are_json() -> None:
    good: list[object] = [None, True, 0, -(2**63), 2**64 - 1, 1.5, "é", [1, [2]], {"a": {"b": []}}]
    for value in good:
        assert is_json(value), value
        assert orjson.loads(orjson.dumps(value)) == value
    bad: list[object] = [(1, 2), float("nan"), float("inf"), 2**64, -(2**63) - 1, {1: 2}, b"x"]
    for value in bad:
        assert not is_json(value), value
    assert not is_json([1, (2,)])


def test_an_accumulator_that_is_not_json_is_refused_with_its_window() -> None:
    bad = aggregate(0, lambda acc, item: (acc, item))
    with pytest.raises(TypeError, match=r"window \[0\.0, 10\.0\) for key 'k' is not a JSON"):
        apply_batch(Book(), [Event("k", 1.0, 1)], 1.0, tumbling(10), bad)


# -- apply_batch: examples ----------------------------------------------------------


def test_processing_time_windows_close_in_the_first_batch_at_or_after_their_end() -> None:
    spec, agg = tumbling(2), count()
    book, emitted, late = apply_batch(Book(), [Event("a", 0, None)] * 3, 1.0, spec, agg)
    assert (emitted, late, book.panes, book.watermark) == ([], [], {("a", 0.0): 3}, 1.0)
    book, emitted, _ = apply_batch(book, [Event("a", 0, None)], 2.0, spec, agg)
    assert emitted == [WindowResult("a", 0.0, 2.0, 3)]
    assert book.panes == {("a", 2.0): 1}


def test_a_clock_stepped_back_does_not_reopen_a_closed_window() -> None:
    spec, agg = tumbling(2), count()
    book, _, _ = apply_batch(Book(), [Event("a", 0, None)], 1.0, spec, agg)
    book, emitted, _ = apply_batch(book, [], 2.5, spec, agg)
    assert [r.start for r in emitted] == [0.0]
    book, emitted, _ = apply_batch(book, [Event("a", 0, None)], 1.5, spec, agg)
    assert emitted == []
    assert book.panes == {("a", 2.0): 1}  # counted at 2.5, the latest time seen
    assert book.watermark == 2.5


def test_event_time_uses_the_watermark_of_earlier_batches() -> None:
    spec, agg = tumbling(10, time="event", lateness=2), sum_()
    first = [Event("a", 3.0, 1), Event("a", 15.0, 10), Event("a", 4.0, 100)]
    book, emitted, late = apply_batch(Book(), first, 100.0, spec, agg)
    # No watermark yet: nothing is late or closes, even though 4.0 < 15.0 - 2.
    assert (emitted, late) == ([], [])
    assert book.watermark == 13.0
    second = [Event("a", 12.9, 1000), Event("a", 13.0, 10_000), Event("b", 1.0, 7)]
    book, emitted, late = apply_batch(book, second, 0.0, spec, agg)
    assert emitted == [WindowResult("a", 0.0, 10.0, 101)]
    assert late == [Event("a", 12.9, 1000), Event("b", 1.0, 7)]
    assert book.panes == {("a", 10.0): 10_010}
    assert book.watermark == 13.0


def test_an_idle_timeout_moves_the_watermark_with_the_batch_clock_once_input_stops() -> None:
    spec, agg = tumbling(10, time="event", lateness=2, idle_timeout=5), count()
    book, emitted, _ = apply_batch(Book(), [Event("a", 13.0, 1)], 100.0, spec, agg)
    assert (book.watermark, book.newest, book.raised_at) == (11.0, 13.0, 100.0)
    # Not yet idle for 5 s: the watermark waits, window [10, 20) stays open.
    book, emitted, _ = apply_batch(book, [], 105.0, spec, agg)
    assert (emitted, book.watermark) == ([], 11.0)
    # 5 s past the timeout: event time went on by 5 s, to 13 - 2 + 5.
    book, emitted, _ = apply_batch(book, [], 110.0, spec, agg)
    assert (emitted, book.watermark) == ([], 16.0)
    book, emitted, _ = apply_batch(book, [], 115.0, spec, agg)
    assert emitted == [WindowResult("a", 10.0, 20.0, 1)]
    assert book.watermark == 21.0
    # An old record is late now, and a batch of only late records raises nothing.
    book, emitted, late = apply_batch(book, [Event("a", 18.0, 1)], 116.0, spec, agg)
    assert (emitted, late, book.newest, book.raised_at) == ([], [Event("a", 18.0, 1)], 13.0, 100.0)
    assert book.watermark == 22.0
    # New input: newest rises, and the clock waits for it again.
    book, _, _ = apply_batch(book, [Event("a", 30.0, 1)], 120.0, spec, agg)
    assert (book.watermark, book.newest, book.raised_at) == (28.0, 30.0, 120.0)
    book, _, _ = apply_batch(book, [], 124.0, spec, agg)
    assert book.watermark == 28.0


def test_without_an_idle_timeout_the_last_window_waits_for_input() -> None:
    spec, agg = tumbling(10, time="event", lateness=2), count()
    book, _, _ = apply_batch(Book(), [Event("a", 13.0, 1)], 100.0, spec, agg)
    for t in (200.0, 10_000.0):
        book, emitted, _ = apply_batch(book, [], t, spec, agg)
        assert (emitted, book.watermark) == ([], 11.0)


def test_the_callers_book_is_not_changed() -> None:
    spec, agg = tumbling(10), aggregate([], _append)
    book, _, _ = apply_batch(Book(), [Event("a", 0, 1)], 1.0, spec, agg)
    before = copy.deepcopy(book)
    apply_batch(book, [Event("a", 0, 2)], 2.0, spec, agg)
    assert book == before
    assert book.panes == {("a", 0.0): [1]}
    assert agg.zero() == []


# -- apply_batch: properties against brute-force models -----------------------------

KEYS: list[Key] = ["a", "b", b"a", 7, -3]


def _brute_windows(t_ms: int, spec: WindowSpec) -> list[int]:
    """Starts (ms) of the windows holding t_ms, by the definition."""
    first = (t_ms - spec.size_ms) // spec.slide_ms - 1
    last = t_ms // spec.slide_ms + 1
    starts = [k * spec.slide_ms for k in range(first, last + 1)]
    return [s for s in starts if s <= t_ms < s + spec.size_ms]


def _expected(
    placed: list[tuple[Key, int, int]], spec: WindowSpec, model: Callable[[list[int]], JSON]
) -> dict[tuple[Key, float], JSON]:
    """(key, start) -> model(items in input order) for records placed at times (ms)."""
    items: dict[tuple[Key, float], list[int]] = {}
    for key, t_ms, item in placed:
        for start in _brute_windows(t_ms, spec):
            items.setdefault((key, start / 1000), []).append(item)
    return {pane: model(xs) for pane, xs in items.items()}


class Run:
    """apply_batch over a sequence of batches, with what every batch returned."""

    def __init__(
        self,
        batches: Sequence[tuple[float, Sequence[Event]]],
        spec: WindowSpec,
        agg: Aggregation,
    ) -> None:
        self.book = Book()
        self.emitted: list[list[WindowResult]] = []
        self.late: list[Event] = []
        self.watermarks: list[float | None] = []  # the one each batch used
        closed: set[tuple[Key, float]] = set()
        for batch_time, records in batches:
            self.watermarks.append(self.book.watermark)
            book, emitted, late = apply_batch(self.book, records, batch_time, spec, agg)
            assert book.watermark is None or (
                self.book.watermark is None or book.watermark >= self.book.watermark
            ), "the watermark went back"
            for acc in book.panes.values():
                assert orjson.loads(orjson.dumps(acc)) == acc
            for result in emitted:
                pane = (result.key, result.start)
                assert pane not in closed, f"{pane} emitted twice"
                closed.add(pane)
            assert not closed & set(book.panes), "a closed window was reopened"
            self.book = book
            self.emitted.append(emitted)
            self.late += late

    @property
    def all_emitted(self) -> list[WindowResult]:
        return [r for batch in self.emitted for r in batch]

    def everything(self, spec: WindowSpec, agg: Aggregation) -> dict[tuple[Key, float], JSON]:
        """Emitted and still-open results, by pane."""
        results = self.all_emitted + open_results(self.book.panes, spec, agg)
        return {(r.key, r.start): r.value for r in results}


def _sorted_emission(results: list[WindowResult]) -> bool:
    order = [(r.end, key_order(r.key)) for r in results]
    return order == sorted(order)


specs = st.builds(
    lambda slide_ms, per_time: (slide_ms, per_time),
    st.sampled_from([100, 250, 500, 1000, 2000]),
    st.integers(1, 5),
)
aggregations = st.sampled_from(AGGREGATIONS)
events = st.builds(
    lambda key, t_ms, item: Event(key, t_ms / 1000, item),
    st.sampled_from(KEYS),
    st.integers(0, 20_000),
    st.integers(-50, 50),
)


def _split(items: Sequence[Any], cuts: set[int]) -> list[list[Any]]:
    """``items`` cut before each index in ``cuts`` (indices outside are ignored)."""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(items)), len(items)]
    return [list(items[a:b]) for a, b in itertools.pairwise(bounds)]


@settings(max_examples=150, deadline=None)
@given(
    spec_shape=specs,
    named=aggregations,
    batches=st.lists(
        st.tuples(st.integers(0, 3_000), st.lists(events, max_size=6)), min_size=1, max_size=8
    ),
    data=st.data(),
)
def test_processing_time_results_do_not_depend_on_how_batches_are_split(
    spec_shape: tuple[int, int],
    named: tuple[str, Callable[[], Aggregation], Callable[[list[int]], JSON]],
    batches: list[tuple[int, list[Event]]],
    data: st.DataObject,
) -> None:
    slide_ms, per_time = spec_shape
    spec = sliding(slide_ms * per_time / 1000, slide_ms / 1000)
    _, make, model = named
    agg = make()
    # The reference split: batch times from increments, as a scheduler makes them.
    timed: list[tuple[int, list[Event]]] = []
    now = 0
    for step, records in batches:
        now += step
        timed.append((now, records))
    reference = Run([(t / 1000, rs) for t, rs in timed], spec, agg)
    # Another split: each batch's records cut into several batches of the same
    # time, with empty (timer) batches at times in between.
    other: list[tuple[float, list[Event]]] = []
    previous = 0
    for t, records in timed:
        for extra in sorted(data.draw(st.lists(st.integers(previous, t), max_size=2))):
            other.append((extra / 1000, []))
        cuts = data.draw(st.sets(st.integers(1, max(1, len(records) - 1)), max_size=3))
        other += [(t / 1000, part) for part in _split(records, cuts) or [[]]]
        previous = t
    split = Run(other, spec, agg)

    # Same emissions, in the same order, and the same open windows at the end.
    assert split.all_emitted == reference.all_emitted
    assert split.book == reference.book
    assert reference.late == split.late == []
    assert _sorted_emission(reference.all_emitted)
    # Every window holds exactly the records of the batches whose time is in it.
    placed = [(r.key, t, r.item) for t, rs in timed for r in rs]
    assert reference.everything(spec, agg) == _expected(placed, spec, model)
    # A window is emitted in the first batch at or after its end.
    for (t, _), emitted in zip(timed, reference.emitted, strict=True):
        assert all(r.end <= t / 1000 for r in emitted)
    assert all(window_end(start, spec) > timed[-1][0] / 1000 for _, start in reference.book.panes)


def _brute_late(
    batches: Sequence[Sequence[Event]], lateness_ms: int
) -> tuple[list[Event], list[float | None]]:
    """Late records and each batch's watermark, recomputed from scratch per batch."""
    late: list[Event] = []
    marks: list[float | None] = []
    for i, records in enumerate(batches):
        earlier = [round(r.time * 1000) for batch in batches[:i] for r in batch]
        wm = max(earlier) - lateness_ms if earlier else None
        marks.append(None if wm is None else wm / 1000)
        late += [r for r in records if wm is not None and round(r.time * 1000) < wm]
    return late, marks


def _without(records: list[Event], late: list[Event]) -> list[Event]:
    """``records`` less the ``late`` ones, by identity: equal records may differ
    in lateness, and their order matters to a non-commutative fold."""
    late_ids = {id(r) for r in late}
    return [r for r in records if id(r) not in late_ids]


def _event_time_run(
    records: list[Event], cuts: set[int], spec: WindowSpec, agg: Aggregation
) -> tuple[Run, list[list[Event]]]:
    # A final empty batch: it closes what the last batch's records made due.
    batches = [*_split(records, cuts), []]
    return Run([(0.0, b) for b in batches], spec, agg), batches


@settings(max_examples=150, deadline=None)
@example(  # equal records, one late, folded by a non-commutative function
    spec_shape=(100, 1),
    lateness_ms=0,
    named=AGGREGATIONS[4],
    records=[Event("a", 0.0, 0), Event("a", 0.001, 1), Event("a", 0.0, 0)],
    cuts_a=set(),
    cuts_b={2},
)
@given(
    spec_shape=specs,
    lateness_ms=st.sampled_from([0, 100, 1000, 5000]),
    named=aggregations,
    records=st.lists(events, max_size=30),
    cuts_a=st.sets(st.integers(1, 29), max_size=8),
    cuts_b=st.sets(st.integers(1, 29), max_size=8),
)
def test_event_time_windows_hold_exactly_the_on_time_records(
    spec_shape: tuple[int, int],
    lateness_ms: int,
    named: tuple[str, Callable[[], Aggregation], Callable[[list[int]], JSON]],
    records: list[Event],
    cuts_a: set[int],
    cuts_b: set[int],
) -> None:
    """Splits may differ only in which records are late; with the same late
    records, they emit the same windows with the same results in the same order.
    """
    slide_ms, per_time = spec_shape
    spec = sliding(
        slide_ms * per_time / 1000, slide_ms / 1000, time="event", lateness=lateness_ms / 1000
    )
    _, make, model = named
    agg = make()
    records = [Event(*r) for r in records]  # one object per record, for _without
    runs = []
    for cuts in (cuts_a, cuts_b):
        run, batches = _event_time_run(records, cuts, spec, agg)
        late, marks = _brute_late(batches, lateness_ms)
        assert run.late == late
        assert run.watermarks == marks
        # Nothing late is in any window, emitted or open; everything else is.
        on_time = _without(records, run.late)
        placed = [(r.key, round(r.time * 1000), r.item) for r in on_time]
        assert run.everything(spec, agg) == _expected(placed, spec, model)
        # Windows close in the first batch whose watermark reaches their end,
        # in one global order, and the last watermark closed all it covers.
        assert _sorted_emission(run.all_emitted)
        for i, emitted in enumerate(run.emitted):
            for r in emitted:
                wm_now, wm_before = marks[i], marks[i - 1] if i else None
                assert wm_now is not None
                assert r.end <= wm_now
                assert wm_before is None or r.end > wm_before
        assert due([window_end(s, spec) for _, s in run.book.panes], marks[-1]) == []
        runs.append(run)
    a, b = runs
    if a.late == b.late:
        assert a.all_emitted == b.all_emitted
        assert a.book == b.book


@settings(max_examples=100, deadline=None)
@given(
    spec_shape=specs,
    lateness_ms=st.sampled_from([0, 100, 1000]),
    records=st.lists(events, max_size=30),
    cuts_a=st.sets(st.integers(1, 29), max_size=8),
    cuts_b=st.sets(st.integers(1, 29), max_size=8),
)
def test_event_time_input_in_time_order_is_never_late_however_it_is_split(
    spec_shape: tuple[int, int],
    lateness_ms: int,
    records: list[Event],
    cuts_a: set[int],
    cuts_b: set[int],
) -> None:
    slide_ms, per_time = spec_shape
    spec = sliding(
        slide_ms * per_time / 1000, slide_ms / 1000, time="event", lateness=lateness_ms / 1000
    )
    ordered = sorted(records, key=lambda r: r.time)
    a, _ = _event_time_run(ordered, cuts_a, spec, sum_())
    b, _ = _event_time_run(ordered, cuts_b, spec, sum_())
    assert a.late == b.late == []
    assert a.all_emitted == b.all_emitted
    assert a.book == b.book


@settings(max_examples=100, deadline=None)
@given(
    batches=st.lists(
        st.tuples(st.integers(0, 20_000), st.lists(events, max_size=5)), min_size=1, max_size=10
    ),
)
def test_processing_time_windows_close_once_whatever_the_clock_does(
    batches: list[tuple[int, list[Event]]],
) -> None:
    # Run checks that no window is emitted twice or reopened after it closed.
    run = Run([(t / 1000, rs) for t, rs in batches], sliding(3, 1), count())
    assert _sorted_emission(run.all_emitted)
    counts = run.everything(sliding(3, 1), count()).values()
    assert sum(c for c in counts if isinstance(c, int)) == 3 * sum(len(rs) for _, rs in batches)
