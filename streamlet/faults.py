"""Named crash points for crash tests of the commit protocol.

Setting ``STREAMLET_CRASH_AT=<point>`` (or ``<point>:<batch id>``) in a
worker's environment makes it SIGKILL itself when it reaches that point of
the commit protocol (for that batch, or for the first batch that gets
there). Tests use it to prove recovery from every step; in production the
variable is unset and a crash point is one dictionary lookup.

Points, in protocol order: ``after_allocate``, ``after_handler``,
``after_sink_commit``, ``before_done``, ``after_done``.
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "crash_point"]

ENV = "STREAMLET_CRASH_AT"
POINTS = ("after_allocate", "after_handler", "after_sink_commit", "before_done", "after_done")


def _parse(value: str | None) -> tuple[str, int | None] | None:
    if not value:
        return None
    point, _, batch = value.partition(":")
    if point not in POINTS:
        raise ValueError(f"{ENV}={value!r}: unknown crash point; known: {', '.join(POINTS)}")
    return point, int(batch) if batch else None


_TARGET = _parse(os.environ.get(ENV))


def crash_point(point: str, batch_id: int) -> None:
    """SIGKILL this process if the environment asked for a crash here."""
    if _TARGET is None:
        return
    name, batch = _TARGET
    if name == point and (batch is None or batch == batch_id):
        os.kill(os.getpid(), signal.SIGKILL)
