"""Sliding-window counts over the embedded source: 10 s windows every 2 s, exactly once.

Run it (no Kafka or server needed)::

    streamlet run examples.window_counts:app --duration 30

Sensors ``s0`` .. ``s4`` report 50 readings a second. Every 2 s the windows
of the last 10 s that just closed are written to
``out/window_counts/part-<batch>.jsonl``, one ``["s3", start, end, count]``
per sensor and window. The open windows live in the handler's keyed state
(``.streamlet/window_counts/state/per_window.sqlite``), committed with each
batch: kill it at any moment (even with ``kill -9``) and start it again, and
no window is written twice or counts a reading twice. Look at the state with
``streamlet state show .streamlet/window_counts``.
"""

from __future__ import annotations

import streamlet as sl
from streamlet.windows import count, sliding, windowed

WINDOW = sliding(10.0, 2.0)  # processing time: the batch's clock


def sensor(partition: int, offset: int) -> bytes | None:
    """Reading number ``offset`` comes from sensor ``s<offset mod 5>``."""
    return b"s%d" % (offset % 5)


app = sl.App("window_counts", state_dir=".streamlet/window_counts", batch_interval=0.5)
readings = app.source(sl.SequenceSource(rate=50, key=sensor), name="readings")


@app.handler(readings, sink=sl.FileSink("out/window_counts"), state=sl.State())
async def per_window(batch: sl.Batch, state: sl.KeyedState) -> list[tuple[str, float, float, int]]:
    """Count each sensor's readings per window; return the windows that closed."""
    done = windowed(state, batch, WINDOW, count())
    return [(_name(r.key), r.start, r.end, int(str(r.value))) for r in done.results]


def _name(key: sl.StateKey) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)
