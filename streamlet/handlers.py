"""User handlers: how they are declared and how one is called on a batch.

A handler is an ``async def`` taking a :class:`~streamlet.records.Batch`. It
returns its outputs (a list or any iterable, or None for none), or it is an
async generator that yields them. Either way the outputs of one call are
collected in full before its sink commits them, so a batch's outputs are
committed atomically or not at all.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from streamlet.errors import HandlerError
from streamlet.records import Batch
from streamlet.sinks.base import Sink

__all__ = ["HandlerFn", "HandlerSpec", "invoke"]

HandlerFn: TypeAlias = Callable[[Batch], Awaitable[Any] | AsyncIterator[Any]]


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered handler.

    Attributes:
        name: unique within the app; part of the sink's idempotency key.
        fn: the user's function.
        sources: names of the sources whose records it receives.
        sink: where its outputs go, or None to discard them.
    """

    name: str
    fn: HandlerFn
    sources: tuple[str, ...]
    sink: Sink | None


async def invoke(spec: HandlerSpec, batch: Batch) -> list[object]:
    """Call the handler once on ``batch`` and collect all its outputs.

    Raises:
        HandlerError: the handler returned something that is not a collection
            of outputs (its own exceptions propagate unchanged, for retries).
    """
    result = spec.fn(batch)
    if inspect.isasyncgen(result):
        return [item async for item in result]
    if not inspect.isawaitable(result):
        raise HandlerError(
            f"handler {spec.name!r} must be an async def (or async generator);"
            f" calling it returned {type(result).__name__}"
        )
    value = await result
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray, dict)) or not isinstance(value, Iterable):
        raise HandlerError(
            f"handler {spec.name!r} returned a {type(value).__name__} for batch {batch.id};"
            " return a list (or other iterable) of outputs, or None"
        )
    return list(value)
