"""Windows over keyed state: tumbling and sliding, processing or event time, emitted once.

Use them in a handler that has ``state=State()``::

    window = sl.windows.sliding(10.0, 2.0)          # 10 s windows every 2 s

    @app.handler(numbers, sink=..., state=sl.State())
    async def per_window(batch, state):
        done = sl.windows.windowed(state, batch, window, sl.windows.count())
        return [(r.key, r.start, r.end, r.value) for r in done.results]

A window's result is returned once, in the batch that closes it, and
commits with that batch's outputs and state: exactly once with an
exactly-once sink. Processing-time windows close on the batch clock even
when no input arrives (``State(idle=True)``, the default). Event-time
windows close when the watermark (largest event time seen minus
``lateness``) passes their end; records behind the watermark come back in
``late`` (count them, or send them to a sink of their own) and never change
a window. With ``idle_timeout=`` an event-time watermark that no new event
time raised for that long follows the batch clock, so the last windows
close when input stops. See docs/architecture.md, "Keyed state and windows".
"""

from __future__ import annotations

from streamlet.state._windowed import Windowed, windowed
from streamlet.state._windows import (
    Aggregation,
    WindowResult,
    WindowSpec,
    aggregate,
    check_interval,
    count,
    max_,
    min_,
    reduce,
    sliding,
    sum_,
    tumbling,
)

__all__ = [
    "Aggregation",
    "WindowResult",
    "WindowSpec",
    "Windowed",
    "aggregate",
    "check_interval",
    "count",
    "max_",
    "min_",
    "reduce",
    "sliding",
    "sum_",
    "tumbling",
    "windowed",
]
