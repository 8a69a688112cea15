"""Keyed windows kept in a handler's :class:`~streamlet.state.KeyedState`.

:func:`windowed` runs one batch through a window aggregation: the decisions
are :func:`streamlet.state._windows.apply_batch` (pure, property-tested
against a brute-force model); this module only loads the part of the book
the batch needs from the state and writes it back, so that windows commit
exactly once with the batch like any other state.

Layout inside the state, as streamlet's own entries (``KeyedState.internal_*``:
a type byte no user key has, never expired by ``ttl``, never listed):

* ``window/<name>/meta``: ``{"watermark": ..., "starts": [open window starts, ms]}``,
  and for event time ``"newest"`` and ``"raised_at"`` (the largest event time
  seen and the batch time that raised it, for ``idle_timeout``);
* ``window/<name>/<start ms>``: one open window: ``{key (hex of its stored
  form): accumulator}``. A window is one entry: its keys must fit in memory
  together (one entry per key and window is a later step).

A batch reads the meta entry, the windows its records fall in and the
windows due to close, never the others: a batch costs what its windows
hold, not what the whole state holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from streamlet.errors import StateError
from streamlet.records import Record
from streamlet.state._keyed import KeyedState
from streamlet.state._store import decode_key, encode_key
from streamlet.state._windows import (
    JSON,
    Aggregation,
    Book,
    Event,
    Key,
    WindowResult,
    WindowSpec,
    _ms,
    apply_batch,
    event_clock,
    windows_of,
)

__all__ = ["Windowed", "windowed"]


class Windowed(NamedTuple):
    """What :func:`windowed` did with one batch."""

    results: list[WindowResult]
    """The windows that closed, each once: by end, then key."""
    late: list[Record]
    """Event time: the records behind the watermark, in input order; no window took them."""


def _record_key(record: Record) -> Key:
    if record.key is None:
        raise StateError(
            f"record at offset {record.offset} of partition {record.partition} of source"
            f" {record.source!r} has no key; give windowed() a key= function"
        )
    return record.key


def _record_time(record: Record) -> float:
    return record.timestamp


def windowed(
    state: KeyedState,
    records: Iterable[Record],
    spec: WindowSpec,
    agg: Aggregation,
    *,
    key: Callable[[Record], Key] = _record_key,
    event_time: Callable[[Record], float] = _record_time,
    name: str = "window",
) -> Windowed:
    """Add a batch's records to their windows; return the windows that closed.

    Processing time (``spec.time == "processing"``): a record belongs to the
    windows of its batch's time, and a window closes in the first batch at or
    after its end (with ``State(idle=True)``, the default, that batch runs
    even when no input arrives). Event time: a record belongs to the windows
    of ``event_time(record)`` (default: its Kafka timestamp); the watermark is
    the largest event time seen in earlier batches minus ``spec.lateness``;
    records behind it are late (returned, never added), and windows whose end
    it passed close. With ``spec.idle_timeout``, a watermark that no new event
    time raised for that long follows the batch clock (idle batches run with
    ``State(idle=True)``, the default), so the last windows close without
    input.

    Args:
        state: the handler's state for this batch.
        records: the batch's records (or the ones to aggregate).
        spec: the windows (:func:`streamlet.windows.tumbling`, ``sliding``).
        agg: the aggregation (``count()``, ``sum_()``, ...).
        key: a record's key (default: its Kafka key).
        event_time: a record's event time in seconds, for event-time windows.
        name: tells several windowed aggregations of one handler apart.

    Raises:
        StateError: a record has no key, or an accumulator cannot be stored.
    """
    base = b"window/" + name.encode() + b"/"
    meta_key = base + b"meta"
    meta = state.internal_get(meta_key) or {"watermark": None, "starts": []}
    open_starts: set[int] = set(meta["starts"])
    events = [
        Event(key(r), event_time(r) if spec.time == "event" else state.time, r) for r in records
    ]
    watermark: float | None = meta["watermark"]
    newest: float | None = meta.get("newest")
    raised_at: float | None = meta.get("raised_at")
    if spec.time == "event" and newest is None and watermark is not None:
        # A book kept before idle_timeout existed: its newest event time is
        # at least the watermark's, and the idle count starts now.
        newest, raised_at = watermark + spec.lateness, state.time
    # The windows this batch may touch: those its records fall in, and those
    # that may close (every open one that ends by the batch's clock). Loading
    # more than apply_batch uses is harmless; loading less is not (it would
    # start a window afresh over the stored one), so this errs wide.
    clock: float | None
    times: set[float]
    if spec.time == "processing":
        now = state.time if watermark is None else max(state.time, watermark)
        clock = now
        times = {state.time, now} if events else set()
    else:
        clock = event_clock(watermark, newest, raised_at, state.time, spec)
        times = {e.time for e in events}
    wanted = {_ms(w.start) for t in times for w in windows_of(t, spec)}
    due = {s for s in open_starts if clock is not None and s + spec.size_ms <= _ms(clock)}
    loaded = (wanted | due) & open_starts
    panes: dict[tuple[Key, float], JSON] = {}
    for start in loaded:
        for hexed, acc in state.internal_get(base + str(start).encode(), {}).items():
            panes[(decode_key(bytes.fromhex(hexed)), start / 1000)] = acc
    try:
        book, results, late = apply_batch(
            Book(panes, watermark, newest, raised_at), events, state.time, spec, agg
        )
    except TypeError as exc:
        raise StateError(f"windowed aggregation {name!r}: {exc}") from None
    kept_idle_count = (meta.get("newest"), meta.get("raised_at")) == (book.newest, book.raised_at)
    if not events and not results and kept_idle_count:
        # Nothing came and nothing closed: the book stays as it was. Its
        # watermark is worked out from it again next time, only ever higher,
        # so an idle batch that closes nothing writes nothing (in group mode
        # it would otherwise commit a transaction to the changelog per tick).
        return Windowed([], [])
    kept: dict[int, dict[str, JSON]] = {}
    for (k, pane_start), acc in book.panes.items():
        kept.setdefault(_ms(pane_start), {})[encode_key(k).hex()] = acc
    for start in loaded | wanted:
        entry = base + str(start).encode()
        if start in kept:
            state.internal_set(entry, kept[start])
        elif start in open_starts:
            state.internal_delete(entry)
    new_meta: dict[str, object] = {
        "watermark": book.watermark,
        "starts": sorted((open_starts - loaded) | set(kept)),
    }
    if book.newest is not None:
        new_meta["newest"] = book.newest
        new_meta["raised_at"] = book.raised_at
    state.internal_set(meta_key, new_meta)
    return Windowed(results, [e.item for e in late])
