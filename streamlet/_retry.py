"""Trying again: one backoff policy, and one rule for what is worth another try.

A failure is tried again when it may pass: a :class:`~streamlet.errors.StreamletError`
says so with its ``retriable`` attribute (a broker that is restarting is
retriable; a corrupt file, a bad setting or an output its sink cannot write
is not), and any other exception (the user's handler raising, a timeout) may
pass and is tried again. Retrying an error that can never succeed only delays
the stop and fills the log.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from streamlet.errors import ConfigError, StreamletError

__all__ = ["GaveUp", "RetryPolicy", "is_retriable", "retrying"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a failing handler, sink or read is tried again.

    Attributes:
        max_retries: tries after the first one (0: no retry).
        backoff: the wait before the first retry, in seconds; doubles per try.
        max_backoff: the longest wait between tries.
        timeout: the most one handler call may take (None: no limit); a call
            over it counts as a failure.
    """

    max_retries: int = 3
    backoff: float = 0.2
    max_backoff: float = 5.0
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, not {self.max_retries!r}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ConfigError("retry backoff times must be >= 0 seconds")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"handler_timeout must be > 0 seconds, not {self.timeout!r}")

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (1-based)."""
        return float(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))


def is_retriable(exc: BaseException) -> bool:
    """Whether trying the same call again may succeed; pure."""
    if isinstance(exc, StreamletError):
        return exc.retriable
    return True


class GaveUp(Exception):
    """:func:`retrying` stopped trying: ``error`` is the last failure, after ``attempts`` tries."""

    def __init__(self, error: Exception, attempts: int) -> None:
        super().__init__(error, attempts)
        self.error = error
        self.attempts = attempts


async def retrying(
    policy: RetryPolicy,
    what: str,
    call: Callable[[], Awaitable[_T]],
    *,
    on_failure: Callable[[Exception], object] | None = None,
) -> _T:
    """Await ``call()`` until it succeeds, trying again with backoff while that may help.

    Args:
        policy: how many tries and how long between them.
        what: what is being tried, for the log ("handler 'x' on batch 7").
        call: makes one attempt.
        on_failure: told of each failed attempt, the last one included
            (the scheduler counts attempts and keeps errors for the monitor).

    Raises:
        GaveUp: the last failure was not retriable, or the retries ran out.
            Cancellation is never caught.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            if on_failure is not None:
                on_failure(exc)
            if attempt > policy.max_retries or not is_retriable(exc):
                raise GaveUp(exc, attempt) from exc
            delay = policy.delay(attempt)
            log.warning(
                "%s failed (attempt %d of %d): %r; retrying in %.2fs",
                what,
                attempt,
                policy.max_retries + 1,
                exc,
                delay,
            )
            await anyio.sleep(delay)
