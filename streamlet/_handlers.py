"""User handlers: how they are declared and how one is called on a batch.

A handler is an ``async def`` taking a :class:`~streamlet.records.Batch`. It
returns its outputs (a list or any iterable, or None for none), or it is an
async generator that yields them. Either way the outputs of one call are
collected in full before its sink commits them, so a batch's outputs are
committed atomically or not at all.

Handlers run on the event loop that also acknowledges receivers' records and
ticks batches, so they must not block it (``time.sleep``, blocking I/O, long
CPU work). Blocking code goes in a plain ``def`` registered with
``thread=True``, which runs in a worker thread; a plain ``def`` without it is
refused when it is registered (:func:`check_handler`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import CodeType
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio.to_thread

from streamlet.errors import ConfigError, HandlerError
from streamlet.records import Batch
from streamlet.sinks.base import Sink

if TYPE_CHECKING:
    from streamlet.state import KeyedState, State

__all__ = ["HandlerFn", "HandlerSpec", "check_handler", "code_of", "invoke"]

HandlerFn: TypeAlias = Callable[..., Awaitable[Any] | AsyncIterator[Any] | Any]
"""``handler(batch)``, or ``handler(batch, state)`` for a handler with keyed state."""


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered handler.

    Attributes:
        name: unique within the app; part of the sink's idempotency key.
        fn: the user's function.
        sources: names of the sources whose records it receives.
        sink: where its outputs go, or None to discard them.
        thread: a plain ``def`` to run in a worker thread (blocking code).
        state: its keyed state, passed as the second argument (None: none).
    """

    name: str
    fn: HandlerFn
    sources: tuple[str, ...]
    sink: Sink | None
    thread: bool = False
    state: State | None = None


def _is_async(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    # A decorator made with functools.wraps around an async def (its wrapper
    # a plain def returning the coroutine) counts as the async def it wraps.
    for candidate in (fn, inspect.unwrap(fn) if callable(fn) else fn):
        if inspect.iscoroutinefunction(candidate) or inspect.isasyncgenfunction(candidate):
            return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and (
        inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
    )


def code_of(fn: object) -> CodeType | None:
    """The code object a handler runs, to find it on a stack (None: none found)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = inspect.unwrap(fn) if callable(fn) else fn
    code = getattr(fn, "__code__", None)
    if code is None:
        code = getattr(getattr(fn, "__call__", None), "__code__", None)  # noqa: B004
    return code if isinstance(code, CodeType) else None


def check_handler(name: str, fn: object, *, thread: bool, state: bool = False) -> None:
    """Refuse a handler that cannot be run as declared, at registration; pure.

    A plain ``def`` would otherwise be called (its side effects done) on
    every retry before its result was found not to be awaitable.

    Raises:
        ConfigError: ``fn`` is not callable, is a plain ``def`` without
            ``thread=True``, or is async with ``thread=True``.
    """
    if not callable(fn):
        raise ConfigError(f"handler {name!r} must be a function, not {type(fn).__name__}")
    if thread and _is_async(fn):
        raise ConfigError(
            f"handler {name!r} is async, so it runs on the event loop: drop thread=True"
            " (thread=True is for a plain def with blocking code)"
        )
    if not thread and not _is_async(fn):
        raise ConfigError(
            f"handler {name!r} is a plain def: handlers are async def (or async"
            " generators) and must not block the event loop. Make it async def, or, for"
            " blocking code, register it with @app.handler(..., thread=True) to run it in a"
            " worker thread"
        )
    wanted = 2 if state else 1
    try:
        inspect.signature(fn).bind(*range(wanted))
    except TypeError:
        what = "(batch, state), as it has state=" if state else "(batch)"
        raise ConfigError(
            f"handler {name!r} cannot be called as {name}{what}; give it those parameters"
        ) from None
    except ValueError:
        pass  # no signature to check (a builtin): it fails when called, as before


async def invoke(spec: HandlerSpec, batch: Batch, state: KeyedState | None = None) -> list[object]:
    """Call the handler once on ``batch`` (and its ``state``) and collect all its outputs.

    Raises:
        HandlerError: the handler returned something that is not a collection
            of outputs (its own exceptions propagate unchanged, for retries).
    """
    args: tuple[object, ...] = (batch,) if state is None else (batch, state)
    if spec.thread:
        return _outputs(spec, batch, await anyio.to_thread.run_sync(_in_thread, spec.fn, args))
    result = spec.fn(*args)
    if inspect.isasyncgen(result):
        return [item async for item in result]
    if not inspect.isawaitable(result):
        raise HandlerError(
            f"handler {spec.name!r} must be an async def (or async generator);"
            f" calling it returned {type(result).__name__}"
        )
    return _outputs(spec, batch, await result)


def _in_thread(fn: HandlerFn, args: tuple[object, ...]) -> object:
    """Call a ``thread=True`` handler; a generator's body runs here too, not on the loop."""
    value = fn(*args)
    if inspect.isgenerator(value):
        return list(value)
    return value


def _outputs(spec: HandlerSpec, batch: Batch, value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray, dict)) or not isinstance(value, Iterable):
        raise HandlerError(
            f"handler {spec.name!r} returned a {type(value).__name__} for batch {batch.id};"
            " return a list (or other iterable) of outputs, or None"
        )
    return list(value)
