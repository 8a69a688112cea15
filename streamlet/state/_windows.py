"""Keyed windows: which windows a time falls in, when they close, what they emit.

Everything here is a pure decision over values; the keyed state store keeps
the open windows and the watermark, and commits an emission together with the
deletion of its window, so that a window reaches an exactly-once sink once.

Terms:

* A **window** is the half-open interval ``[start, end)`` of seconds, with
  ``end - start == spec.size``. Windows are aligned to the epoch: every start
  is a whole multiple of ``spec.slide``. Tumbling windows have
  ``slide == size``; sliding (hopping) windows have ``slide < size``, and a
  time belongs to ``size / slide`` of them.
* A **pane** is one key's accumulator for one window, ``(key, start) -> acc``
  (a row of the store's ``panes`` table).
* **Processing time** (``time="processing"``): a record's time is its batch's
  time, which the tracker logs before the batch runs, so a re-run puts it in
  the same windows. A window closes in the first batch whose time is
  ``>= end``.
* **Event time** (``time="event"``): a record's time is its own event time.
  The **watermark** is ``max(event time seen) - lateness``, monotone. The
  watermark a batch uses is computed from *earlier* batches only and stored
  with the state (Spark logs it in the offset log), so a re-run makes the same
  decisions. A window closes in the first batch whose watermark is ``>= end``.
  A record with ``time < watermark`` is **late** (Spark's rule): it is counted
  and handed back to the caller, to be dropped or sent to the dead-letter
  sink, and never added to any window, because a window that could hold it
  may already have been emitted.
* **Idle timeout** (event time, ``idle_timeout=``): a watermark moves only
  with new event times, so the last windows before input stops would never
  close. With an idle timeout, once no batch has raised the largest on-time
  event time seen for ``idle_timeout`` seconds of batch time, event time is taken
  to go on at the pace of the batch clock: a batch at time ``t`` uses the
  watermark ``max(watermark, newest - lateness + (t - raised_at -
  idle_timeout))``, where ``newest`` is the largest event time of a record
  that was not late and ``raised_at`` the time of the batch that raised it.
  It depends on the batch's logged time and the stored book only, so a
  re-run decides alike.
  The price: a record that arrives after that with an older event time is
  late, as any record behind the watermark.

Time resolution: every time is resolved to the nearest whole millisecond, and
every comparison (membership, lateness, closing) is made on integer
milliseconds. Window bounds computed in float seconds drift (``0.1 * 3`` is
not ``0.3``; ``11.3 - 0.1`` is ``11.200000000000001``), which would put a
record that sits exactly on a boundary in the wrong window, or call it late.
Kafka timestamps are whole milliseconds, and ``round(ms / 1000 * 1000)``
gives ``ms`` back exactly, so nothing a source delivers is moved. Sizes,
slides and lateness must therefore be whole milliseconds. The public API
speaks float seconds, like the rest of streamlet; a start or end is returned
as ``ms / 1000``, the float nearest to the exact decimal.

Invariants (tested in ``tests/state/test_windows.py``):

* ``windows_of(t)`` holds exactly the ``size / slide`` windows with
  ``start <= t < end``.
* A record that is not late only enters windows that are not due at the
  clock the batch closes with (``end > t >= clock``), and the clock never
  goes back, so a closed window is never reopened and is emitted at most once.
* Emission order is deterministic: by end, then key (:func:`key_order`).
* Accumulators are JSON values that orjson encodes and decodes unchanged;
  nothing is pickled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias

import orjson

from streamlet.errors import ConfigError

__all__ = [
    "JSON",
    "Aggregation",
    "Book",
    "Event",
    "Fold",
    "Key",
    "Time",
    "Window",
    "WindowResult",
    "WindowSpec",
    "aggregate",
    "apply_batch",
    "check_interval",
    "closing",
    "count",
    "due",
    "event_clock",
    "is_json",
    "is_late",
    "key_order",
    "max_",
    "min_",
    "next_watermark",
    "open_results",
    "raised",
    "reduce",
    "sliding",
    "sum_",
    "tumbling",
    "window_end",
    "windows_of",
]

JSON: TypeAlias = "bool | int | float | str | list[JSON] | dict[str, JSON] | None"
"""A value orjson encodes and decodes unchanged (see :func:`is_json`)."""

Key: TypeAlias = str | bytes | int
"""A state key, as :class:`KeyedState` takes it."""

Time: TypeAlias = Literal["processing", "event"]

MS_PER_SECOND = 1000
"""Times are resolved to whole milliseconds; see the module docstring."""

_INT_MIN = -(2**63)
_INT_LIMIT = 2**64
"""orjson encodes integers in ``[-2**63, 2**64)``; larger ones raise."""


def _ms(seconds: float) -> int:
    """``seconds`` as the nearest whole number of milliseconds."""
    if not math.isfinite(seconds):
        raise ValueError(f"time {seconds!r} is not a finite number of seconds")
    return round(seconds * MS_PER_SECOND)


def _whole_ms(name: str, seconds: object, where: str) -> int:
    """Validate a duration setting and return it in milliseconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ConfigError(
            f"window {name} must be a number of seconds, not {seconds!r}: pass a number to {where}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(
            f"window {name} must be a finite number of seconds >= 0, not {seconds!r}:"
            f" fix {name}= in {where}"
        )
    ms = round(seconds * MS_PER_SECOND)
    if not math.isclose(seconds * MS_PER_SECOND, ms, rel_tol=1e-9, abs_tol=1e-6):
        raise ConfigError(
            f"window {name} {seconds!r} s is not a whole number of milliseconds, the"
            f" resolution of window times: round {name}= in {where} to 0.001 s"
        )
    return ms


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """The shape of a keyed window; build it with :func:`tumbling` or :func:`sliding`.

    Attributes:
        size: the window's length in seconds (> 0, whole milliseconds).
        slide: seconds between consecutive window starts; ``size`` for
            tumbling windows. ``size`` must be a whole multiple of it, so
            every time lies in the same number of windows (``size / slide``).
        time: ``"processing"``: a record's time is its batch's time;
            ``"event"``: its own event time, closed by the watermark.
        lateness: event time only: how far (seconds) the watermark trails
            the largest event time seen; records older than the watermark
            are late. Must be 0 for processing time, where nothing is late.
        idle_timeout: event time only: seconds of batch time without a new
            largest event time after which the watermark follows the batch
            clock (see the module docstring); None (the default): the
            watermark waits for input.

    Raises:
        ConfigError: a setting is out of range, not whole milliseconds, or
            ``size`` is not a multiple of ``slide``.
    """

    size: float
    slide: float
    time: Time = "processing"
    lateness: float = 0.0
    idle_timeout: float | None = None
    size_ms: int = field(init=False, repr=False, compare=False)
    slide_ms: int = field(init=False, repr=False, compare=False)
    lateness_ms: int = field(init=False, repr=False, compare=False)
    idle_timeout_ms: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = "tumbling()" if self.size == self.slide else "sliding()"
        size_ms = _whole_ms("size", self.size, where)
        slide_ms = _whole_ms("slide", self.slide, where)
        lateness_ms = _whole_ms("lateness", self.lateness, where)
        if size_ms == 0:
            raise ConfigError(f"window size must be > 0 s, not {self.size!r}: fix size= in {where}")
        if slide_ms == 0:
            raise ConfigError(
                f"window slide must be > 0 s, not {self.slide!r}: fix slide= in {where}"
            )
        if slide_ms > size_ms:
            raise ConfigError(
                f"window slide {self.slide!r} s is longer than its size {self.size!r} s, so"
                f" some times would be in no window: use slide <= size in {where}"
            )
        if size_ms % slide_ms:
            raise ConfigError(
                f"window size {self.size!r} s is not a multiple of its slide {self.slide!r} s,"
                f" so records would not all be in the same number of windows: in {where},"
                f" pick a slide that divides the size"
            )
        if self.time not in ("processing", "event"):
            raise ConfigError(
                f"window time must be 'processing' or 'event', not {self.time!r}: fix time="
                f" in {where}"
            )
        if self.time == "processing" and lateness_ms:
            raise ConfigError(
                f"window lateness {self.lateness!r} s applies to event time only: with"
                f" time='processing' nothing is late; drop lateness= or use time='event'"
                f" in {where}"
            )
        idle_ms: int | None = None
        if self.idle_timeout is not None:
            idle = self.idle_timeout
            if isinstance(idle, int | float) and not isinstance(idle, bool) and not idle > 0:
                raise ConfigError(
                    f"window idle_timeout must be > 0 s, not {idle!r}: fix idle_timeout= in"
                    f" {where}, or leave it out to wait for input"
                )
            if self.time != "event":
                raise ConfigError(
                    f"window idle_timeout {self.idle_timeout!r} s applies to event time only:"
                    " processing-time windows close on the batch clock anyway; drop"
                    f" idle_timeout= or use time='event' in {where}"
                )
            idle_ms = _whole_ms("idle_timeout", self.idle_timeout, where)
            if idle_ms == 0:
                raise ConfigError(
                    f"window idle_timeout must be > 0 s, not {self.idle_timeout!r}: fix"
                    f" idle_timeout= in {where}, or leave it out to wait for input"
                )
        object.__setattr__(self, "size_ms", size_ms)
        object.__setattr__(self, "slide_ms", slide_ms)
        object.__setattr__(self, "lateness_ms", lateness_ms)
        object.__setattr__(self, "idle_timeout_ms", idle_ms)

    @property
    def per_time(self) -> int:
        """How many windows every time belongs to: ``size / slide``."""
        return self.size_ms // self.slide_ms


def tumbling(
    size: float,
    *,
    time: Time = "processing",
    lateness: float = 0.0,
    idle_timeout: float | None = None,
) -> WindowSpec:
    """Windows of ``size`` seconds that do not overlap: ``[0, size), [size, 2 size), ...``.

    Raises:
        ConfigError: see :class:`WindowSpec`.
    """
    return WindowSpec(
        size=size, slide=size, time=time, lateness=lateness, idle_timeout=idle_timeout
    )


def sliding(
    size: float,
    slide: float,
    *,
    time: Time = "processing",
    lateness: float = 0.0,
    idle_timeout: float | None = None,
) -> WindowSpec:
    """Windows of ``size`` seconds starting every ``slide`` seconds (hopping windows).

    Raises:
        ConfigError: see :class:`WindowSpec`.
    """
    return WindowSpec(
        size=size, slide=slide, time=time, lateness=lateness, idle_timeout=idle_timeout
    )


def check_interval(spec: WindowSpec, batch_interval: float) -> None:
    """Check that a processing-time window fits the batch interval.

    With processing time a window holds whole batches, so its size and slide
    must be whole multiples of ``batch_interval`` (Spark's
    ``reduceByKeyAndWindow`` requires the same). Otherwise consecutive
    windows would hold different numbers of batches (a 1.5 s window at a 1 s
    interval holds one batch, then two), and the results would measure the
    schedule rather than the data. Event-time windows do not depend on the
    interval, so they always pass.

    Raises:
        ConfigError: ``batch_interval`` is not positive, or the size or slide
            is not a multiple of it.
    """
    if spec.time != "processing":
        return
    if not (math.isfinite(batch_interval) and batch_interval > 0):
        raise ConfigError(f"batch_interval must be positive, not {batch_interval!r}")
    for name, seconds in (("size", spec.size), ("slide", spec.slide)):
        ratio = seconds / batch_interval
        if round(ratio) < 1 or not math.isclose(ratio, round(ratio), rel_tol=1e-9):
            raise ConfigError(
                f"processing-time window {name} {seconds!r} s is not a multiple of the"
                f" batch interval {batch_interval!r} s, so its windows would hold different"
                f" numbers of batches: make the window's {name} a multiple of"
                f" batch_interval, or use time='event'"
            )


class Window(NamedTuple):
    """The half-open window ``[start, end)``, in seconds since the epoch."""

    start: float
    """First second in the window: a whole multiple of the spec's slide."""
    end: float
    """First second after the window: ``start + size``."""


def windows_of(t: float, spec: WindowSpec) -> list[Window]:
    """The windows holding time ``t``, ordered by start.

    ``t`` is resolved to the millisecond first; a ``t`` exactly on a boundary
    belongs to the window starting there, not to the one ending there.
    Always ``spec.size / spec.slide`` windows.

    Raises:
        ValueError: ``t`` is not finite.
    """
    t_ms = _ms(t)
    last = t_ms // spec.slide_ms * spec.slide_ms  # floor, also for negative times
    starts = range(last - (spec.per_time - 1) * spec.slide_ms, last + 1, spec.slide_ms)
    return [
        Window(start / MS_PER_SECOND, (start + spec.size_ms) / MS_PER_SECOND) for start in starts
    ]


def window_end(start: float, spec: WindowSpec) -> float:
    """The end of the window starting at ``start``, computed in milliseconds."""
    return (_ms(start) + spec.size_ms) / MS_PER_SECOND


# -- watermark and closing ------------------------------------------------------


def next_watermark(
    previous: float | None, event_times: Iterable[float], lateness: float
) -> float | None:
    """The watermark after a batch: ``max(previous, max(event_times) - lateness)``.

    Monotone: it never goes below ``previous``. None until any event time has
    been seen. Store the result with the batch's state: the *next* batch
    uses it, so that a re-run of a batch sees the same watermark.
    """
    newest = max((_ms(t) for t in event_times), default=None)
    if newest is None:
        return previous
    candidate = newest - _ms(lateness)
    if previous is not None:
        candidate = max(candidate, _ms(previous))
    return candidate / MS_PER_SECOND


def is_late(t: float, watermark: float | None) -> bool:
    """True when event time ``t`` is behind the watermark (Spark: ``t < watermark``).

    A late record is never added to a window: the caller counts it and hands
    it to ``on_late`` (drop or dead-letter).
    """
    return watermark is not None and _ms(t) < _ms(watermark)


def event_clock(
    watermark: float | None,
    newest: float | None,
    raised_at: float | None,
    batch_time: float,
    spec: WindowSpec,
) -> float | None:
    """The watermark an event-time batch at ``batch_time`` uses; pure.

    ``watermark``: the stored one (from earlier batches); ``newest``: the
    largest event time seen; ``raised_at``: the batch time that raised it.
    Without ``spec.idle_timeout``, or before it has passed, the stored
    watermark. After it, event time is taken to go on with the batch clock
    (module docstring, "Idle timeout"); never below the stored watermark.
    """
    idle_ms = spec.idle_timeout_ms
    if idle_ms is None or newest is None or raised_at is None:
        return watermark
    idle_for = _ms(batch_time) - _ms(raised_at) - idle_ms
    if idle_for <= 0:
        return watermark
    moved = _ms(newest) - spec.lateness_ms + idle_for
    if watermark is not None:
        moved = max(moved, _ms(watermark))
    return moved / MS_PER_SECOND


def raised(
    newest: float | None, raised_at: float | None, event_times: Iterable[float], batch_time: float
) -> tuple[float | None, float | None]:
    """The largest event time seen after a batch, and the batch time that raised it; pure."""
    top = max((_ms(t) for t in event_times), default=None)
    if top is None or (newest is not None and top <= _ms(newest)):
        return newest, raised_at
    return top / MS_PER_SECOND, batch_time


def due(ends: Iterable[float], clock: float | None) -> list[float]:
    """The distinct window ends that close at ``clock``, ascending.

    ``clock`` is the batch's time for processing time and the batch's
    watermark for event time; a window closes when ``end <= clock``. With no
    watermark yet (None) nothing closes.
    """
    if clock is None:
        return []
    limit = _ms(clock)
    return [ms / MS_PER_SECOND for ms in sorted({_ms(e) for e in ends}) if ms <= limit]


def key_order(key: Key) -> bytes:
    """The bytes emission sorts a key by: its stored encoding.

    The same bytes as ``streamlet.state._store.encode_key`` (a type byte,
    then UTF-8 for str, the bytes themselves, or the decimal digits of an
    int), so a store that reads closed panes ordered by its key column emits
    them in this order too. Python cannot order ``1`` against ``"a"``; bytes
    always compare.
    """
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"b" + key
    return b"i" + str(int(key)).encode("ascii")


class WindowResult(NamedTuple):
    """One closed window's result for one key."""

    key: Key
    """The state key the pane belongs to."""
    start: float
    """The window's start, as in the pane's ``(key, start)``."""
    end: float
    """The window's end; results are emitted in order of it."""
    value: JSON
    """The aggregation's ``result`` of the window's accumulator."""


def closing(
    panes: Mapping[tuple[Key, float], JSON],
    clock: float | None,
    spec: WindowSpec,
    agg: Aggregation,
) -> list[WindowResult]:
    """The results of the open panes that close at ``clock``, in emission order.

    ``panes`` holds open windows (``(key, start) -> accumulator``) after the
    batch's records were added; passing only some of them (the candidates a
    store found with an index) is fine, since each pane is decided on its
    own. The order is by end, then :func:`key_order`, so two runs emit the
    same sequence. Delete the returned panes in the same commit as the
    emission.
    """
    if clock is None:
        return []
    limit = _ms(clock)
    return _results(panes, spec, agg, lambda end_ms: end_ms <= limit)


def open_results(
    panes: Mapping[tuple[Key, float], JSON], spec: WindowSpec, agg: Aggregation
) -> list[WindowResult]:
    """The results of every open pane, in emission order, as if all had closed.

    For tests and for reports of what is still open (``emit="update"``, a
    shutdown summary): it decides nothing about closing.
    """
    return _results(panes, spec, agg, lambda _end_ms: True)


def _results(
    panes: Mapping[tuple[Key, float], JSON],
    spec: WindowSpec,
    agg: Aggregation,
    closes: Callable[[int], bool],
) -> list[WindowResult]:
    closed = [
        (_ms(start) + spec.size_ms, key, start)
        for key, start in panes
        if closes(_ms(start) + spec.size_ms)
    ]
    closed.sort(key=lambda c: (c[0], key_order(c[1])))
    return [
        WindowResult(key, start, end_ms / MS_PER_SECOND, agg.result(panes[(key, start)]))
        for end_ms, key, start in closed
    ]


# -- aggregations ----------------------------------------------------------------


def is_json(value: object) -> bool:
    """True when orjson encodes ``value`` and decodes an equal value of the same types.

    Allowed: None, bool, int in ``[-2**63, 2**64)``, finite float, str, list,
    and dict with str keys, nested. Refused: tuples (they come back as
    lists), NaN and infinities (orjson writes null), larger ints (orjson
    refuses them), and anything else (it would need pickle).
    """
    if value is None or isinstance(value, bool | str):
        return True
    if isinstance(value, int):
        return _INT_MIN <= value < _INT_LIMIT
    if isinstance(value, float):
        return math.isfinite(value)
    if type(value) is list:
        return all(is_json(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and is_json(v) for k, v in value.items())
    return False


def _fresh(value: JSON) -> JSON:
    """A copy of ``value`` as the store would hand it back after a commit."""
    decoded: JSON = orjson.loads(orjson.dumps(value))
    return decoded


class Aggregation(Protocol):
    """How a window folds its records into one JSON accumulator.

    The accumulator is what the store keeps per pane, so it must be a JSON
    value (:func:`is_json`) that round-trips through orjson unchanged;
    state is never pickled.
    """

    def zero(self) -> JSON:
        """A fresh accumulator for an empty window."""
        ...

    def add(self, acc: JSON, item: Any) -> JSON:
        """The accumulator after adding ``item``; it may reuse ``acc``."""
        ...

    def result(self, acc: JSON) -> JSON:
        """What a closed window emits for its accumulator."""
        ...


@dataclass(frozen=True, slots=True)
class Fold:
    """An :class:`Aggregation` built from an initial value and a step function."""

    name: str
    initial: JSON
    step: Callable[[Any, Any], Any]
    finish: Callable[[Any], Any] | None = None

    def zero(self) -> JSON:
        # A copy, so that a step that mutates its accumulator cannot change
        # the initial value of later windows.
        return _fresh(self.initial)

    def add(self, acc: JSON, item: Any) -> JSON:
        new: JSON = self.step(acc, item)
        return new

    def result(self, acc: JSON) -> JSON:
        if self.finish is None:
            return acc
        value: JSON = self.finish(acc)
        return value


ValueFn: TypeAlias = Callable[[Any], Any]


def _value_of(value: ValueFn | None) -> ValueFn:
    return value if value is not None else _identity


def _identity(item: Any) -> Any:
    return item


def count() -> Fold:
    """The number of records in the window (every record counts, like ``COUNT(*)``)."""
    return Fold("count", 0, lambda acc, _item: acc + 1)


def sum_(value: ValueFn | None = None) -> Fold:
    """The sum of ``value(record)`` (the record itself by default); 0 when empty.

    A value of None is skipped, like NULL in SQL's ``SUM``.
    """
    get = _value_of(value)

    def step(acc: Any, item: Any) -> Any:
        v = get(item)
        return acc if v is None else acc + v

    return Fold("sum", 0, step)


def _extreme(name: str, better: Callable[[Any, Any], bool], value: ValueFn | None) -> Fold:
    get = _value_of(value)

    def step(acc: Any, item: Any) -> Any:
        v = get(item)
        if v is None:
            return acc
        if acc is None or better(v, acc):
            return v
        return acc

    return Fold(name, None, step)


def min_(value: ValueFn | None = None) -> Fold:
    """The smallest ``value(record)``; None when the window has no value.

    None values are skipped (SQL's ``MIN``), so None means "none yet". On
    ties the first value seen is kept.
    """
    return _extreme("min", lambda v, acc: v < acc, value)


def max_(value: ValueFn | None = None) -> Fold:
    """The largest ``value(record)``; None when the window has no value.

    None values are skipped (SQL's ``MAX``). On ties the first value seen is kept.
    """
    return _extreme("max", lambda v, acc: v > acc, value)


def reduce(fn: Callable[[Any, Any], Any], value: ValueFn | None = None) -> Fold:
    """``fn(fn(v1, v2), v3) ...`` over the window's values in input order.

    The accumulator is None before the first value, so None values are
    skipped. ``fn`` need not be commutative: records are added in input
    order, which a re-run repeats.
    """
    get = _value_of(value)

    def step(acc: Any, item: Any) -> Any:
        v = get(item)
        if v is None:
            return acc
        return v if acc is None else fn(acc, v)

    return Fold("reduce", None, step)


def aggregate(
    initial: JSON,
    add: Callable[[Any, Any], Any],
    result: Callable[[Any], Any] | None = None,
) -> Fold:
    """A general fold: ``acc = add(acc, record)`` from ``initial``, emitting ``result(acc)``.

    ``initial`` and every accumulator ``add`` returns must be JSON values
    (:func:`is_json`): the store saves them with orjson, never pickle.

    Raises:
        ConfigError: ``initial`` is not a JSON value.
    """
    if not is_json(initial):
        raise ConfigError(
            f"aggregate(initial={initial!r}) is not a JSON value: use None, bool, int,"
            " finite float, str, list or dict with str keys (tuples become lists in the"
            " store, so use a list)"
        )
    return Fold("aggregate", initial, add, result)


# -- the in-memory reference -----------------------------------------------------


class Event(NamedTuple):
    """One record as :func:`apply_batch` sees it."""

    key: Key
    time: float
    """Event time in seconds; ignored by processing-time windows."""
    item: Any
    """What the aggregation adds (its ``value=`` function is applied to it)."""


@dataclass(frozen=True, slots=True)
class Book:
    """The state of one keyed window between batches, as the store keeps it.

    Attributes:
        panes: the open windows, ``(key, start) -> accumulator``.
        watermark: event time: the watermark the *next* batch uses (None
            until an event time was seen). Processing time: the latest batch
            time applied, so that a wall clock stepped back cannot reopen a
            window that already closed.
    """

    panes: Mapping[tuple[Key, float], JSON] = field(default_factory=dict)
    watermark: float | None = None
    newest: float | None = None
    """Event time: the largest event time of a record that was not late (for ``idle_timeout``)."""
    raised_at: float | None = None
    """Event time: the batch time of the batch that raised ``newest``."""


def apply_batch(
    book: Book,
    records: Iterable[Event],
    batch_time: float,
    spec: WindowSpec,
    agg: Aggregation,
) -> tuple[Book, list[WindowResult], list[Event]]:
    """Run one batch over a window's state: the reference model for the store.

    Written to be obviously correct, not fast. ``book`` is not modified (its
    accumulators are copied before ``agg.add`` sees them); a new book is
    returned.

    Processing time: the batch's time is ``max(batch_time, book.watermark)``
    (a clock stepped back counts as the latest time seen); every record goes
    to the windows of that time; panes with ``end <= time`` close.

    Event time: the watermark is ``book.watermark``, from earlier batches
    (moved on by :func:`event_clock` once ``spec.idle_timeout`` passed
    without a new largest event time). Records with ``time < watermark``
    are late; the others go to the windows of their own time, in input
    order. Panes with ``end <= watermark`` close; then the watermark for the
    next batch is computed from all of this batch's event times, late ones
    included.

    Returns:
        ``(new_book, emitted, late)``: the emitted results in emission order
        (:func:`closing`), and the late records in input order.

    Raises:
        TypeError: an accumulator is not a JSON value (:func:`is_json`),
            which the store could not save.
    """
    panes: dict[tuple[Key, float], JSON] = dict(book.panes)
    touched: set[tuple[Key, float]] = set()
    late: list[Event] = []
    records = list(records)
    clock: float | None
    watermark: float | None
    if spec.time == "processing":
        now = batch_time
        if book.watermark is not None and _ms(book.watermark) > _ms(batch_time):
            now = book.watermark
        placed = [(r, windows_of(now, spec)) for r in records]
        clock = watermark = now
    else:
        clock = event_clock(book.watermark, book.newest, book.raised_at, batch_time, spec)
        placed = []
        for r in records:
            if is_late(r.time, clock):
                late.append(r)
            else:
                placed.append((r, windows_of(r.time, spec)))
        watermark = next_watermark(clock, (r.time for r in records), spec.lateness)
        # Only on-time records move event time on: a late one shows delay.
        newest, raised_at = raised(
            book.newest, book.raised_at, (r.time for r, _ in placed), batch_time
        )
    for record, windows in placed:
        for window in windows:
            pane = (record.key, window.start)
            if pane not in touched:
                # As the store would: a decoded copy, never the caller's object.
                panes[pane] = _fresh(panes[pane]) if pane in panes else agg.zero()
                touched.add(pane)
            panes[pane] = agg.add(panes[pane], record.item)
    for key, start in sorted(touched, key=lambda p: (p[1], key_order(p[0]))):
        acc = panes[(key, start)]
        if not is_json(acc):
            raise TypeError(
                f"the accumulator of window [{start}, {window_end(start, spec)}) for key"
                f" {key!r} is not a JSON value: {acc!r}. An aggregation must keep it to"
                " None, bool, int, finite float, str, list and dict with str keys, so the"
                " store can save it without pickle"
            )
    emitted = closing(panes, clock, spec, agg)
    for result in emitted:
        del panes[(result.key, result.start)]
    if spec.time == "processing":
        return Book(panes, watermark), emitted, late
    return Book(panes, watermark, newest, raised_at), emitted, late
