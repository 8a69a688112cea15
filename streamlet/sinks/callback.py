"""Sinks that hand outputs to code or to a stream: at-least-once.

Neither keeps a record of the batches it saw, so a batch re-run after a
crash (allocated, maybe even delivered, but not marked done) is delivered
again. Use them for side effects that tolerate repeats, for printing, and in
tests; use :class:`~streamlet.sinks.file.FileSink` or
:class:`~streamlet.sinks.sqlite.SQLiteSink` where a repeat would be wrong.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import ClassVar, TextIO

from streamlet.errors import ConfigError, SinkUnavailableError
from streamlet.records import Batch
from streamlet.sinks.base import Guarantee, Sink, SinkContext, encode_output

__all__ = ["Callback", "CallbackSink", "PrintSink"]

Callback = Callable[[Batch, Sequence[object]], object]
"""``fn(batch, outputs)``, plain or async; its return value is ignored."""


class CallbackSink(Sink):
    """Calls ``fn(batch, outputs)`` once per commit: at-least-once.

    A batch re-run after a crash calls ``fn`` again with the same batch id;
    make ``fn`` idempotent by ``batch.id`` if repeats matter, or use a
    durable sink. A plain function runs on the event loop, so it must be
    quick; do slow work in an async function.

    Args:
        fn: a plain or async callable taking ``(batch, outputs)``.

    Raises:
        ConfigError: ``fn`` is not callable.
    """

    guarantee: ClassVar[Guarantee] = "at-least-once"

    def __init__(self, fn: Callback) -> None:
        if not callable(fn):
            raise ConfigError(f"CallbackSink needs a callable, not {type(fn).__name__}")
        self._fn = fn
        self._handler = "?"

    async def open(self, context: SinkContext) -> None:
        """Remember the handler's name for error messages."""
        self._handler = context.handler

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        """Call ``fn``; always True, since the sink cannot know about earlier calls.

        Raises:
            SinkUnavailableError: ``fn`` raised (tried again); its exception
                is the ``__cause__``.
        """
        try:
            result = self._fn(batch, outputs)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            # The callback's failure may pass (a service that is down): try again.
            error = SinkUnavailableError(
                f"the callback {_name(self._fn)} of handler {self._handler!r} failed on batch"
                f" {batch.id}: {exc!r}; the batch is not done and is delivered again"
            )
            raise error from exc
        return True

    def describe(self) -> str:
        return f"CallbackSink({_name(self._fn)})"


class PrintSink(Sink):
    """Prints each batch's outputs, one per line, under a header: at-least-once.

    Outputs are shown as :func:`encode_output` makes them (bytes as they
    are, str as is, other values as JSON; ``repr`` for what JSON cannot
    hold), decoded as UTF-8 with undecodable bytes escaped. A batch re-run after a crash is printed
    again.

    Args:
        stream: where to print; ``None`` (the default) means ``sys.stdout``
            at the time of each commit, so redirections made later apply.
    """

    guarantee: ClassVar[Guarantee] = "at-least-once"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._handler = ""

    async def open(self, context: SinkContext) -> None:
        """Remember the handler's name for the batch header."""
        self._handler = context.handler

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        """Print the batch; always True."""
        stream = self._stream if self._stream is not None else sys.stdout
        lines = [_show(output) for output in outputs]
        who = f" {self._handler}" if self._handler else ""
        header = f"--- batch {batch.id}{who}: {len(lines)} output(s) ---"
        stream.write("\n".join([header, *lines]) + "\n")
        stream.flush()
        return True


def _show(output: object) -> str:
    try:
        return encode_output(output).decode("utf-8", errors="backslashreplace")
    except TypeError:
        # Not JSON-serializable: printing must not fail over it.
        return repr(output)


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))
