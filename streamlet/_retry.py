"""Trying again: one backoff policy, and one rule for what is worth another try.

A failure is tried again when it may pass: a :class:`~streamlet.errors.StreamletError`
says so with its ``retriable`` attribute (a broker that is restarting is
retriable; a corrupt file, a bad setting or an output its sink cannot write
is not), and any other exception (the user's handler raising, a timeout) may
pass and is tried again. Retrying an error that can never succeed only delays
the stop and fills the log.

Two loops: :func:`retrying` counts tries (handlers, sink commits, reads);
:func:`retrying_until` tries until a deadline, the shape of every connection
(a Kafka consumer's start and broker requests, a KafkaSink's open, the TCP
client's connect): each attempt bounded by the time left, a doubling pause
between attempts, and :class:`OutOfTime` with the last error at the deadline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from streamlet.clock import SYSTEM_CLOCK, Clock, SystemClock
from streamlet.errors import ConfigError, StreamletError

__all__ = [
    "AttemptTimeout",
    "GaveUp",
    "OutOfTime",
    "Patience",
    "RetryPolicy",
    "describe_error",
    "is_retriable",
    "retrying",
    "retrying_until",
]

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


@dataclass(frozen=True, slots=True)
class Patience:
    """How long :func:`retrying_until` keeps trying, and how it paces the attempts.

    Attributes:
        timeout: seconds from the start until giving up (None: never give up).
        backoff: the pause after the first failed attempt, in seconds; doubles
            after each further one.
        max_backoff: the longest pause between attempts.
        attempt_timeout: the most one attempt may take (None: the time left);
            an attempt over it fails with :class:`AttemptTimeout`, which is
            always worth another try.
    """

    timeout: float | None
    backoff: float
    max_backoff: float
    attempt_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout >= 0:
            raise ConfigError(f"a retry timeout must be >= 0 seconds, not {self.timeout!r}")
        if not 0 <= self.backoff <= self.max_backoff:
            raise ConfigError(
                "retry backoff times must be >= 0 seconds and backoff <= max_backoff,"
                f" not {self.backoff!r} and {self.max_backoff!r}"
            )
        if self.attempt_timeout is not None and not self.attempt_timeout > 0:
            raise ConfigError(
                f"an attempt timeout must be > 0 seconds, not {self.attempt_timeout!r}"
            )

    def pause(self, attempt: int, left: float = math.inf) -> float:
        """The pause after failed attempt ``attempt`` (1-based), at most ``left``; pure."""
        # The exponent is capped: after a thousand tries of a patience without
        # timeout, 2 ** attempt no longer fits in a float.
        return float(min(self.max_backoff, self.backoff * 2.0 ** min(attempt - 1, 64), left))


class AttemptTimeout(TimeoutError):
    """An attempt of :func:`retrying_until` outlasted its bound, or the time left."""


class OutOfTime(Exception):
    """:func:`retrying_until` reached its deadline.

    ``error`` is the last failure, after ``attempts`` attempts.
    """

    def __init__(self, error: Exception, attempts: int) -> None:
        super().__init__(error, attempts)
        self.error = error
        self.attempts = attempts


async def retrying_until(
    patience: Patience,
    what: str,
    call: Callable[[], Awaitable[_T]],
    *,
    transient: Callable[[Exception], bool] = is_retriable,
    since: float | None = None,
    clock: Clock = SYSTEM_CLOCK,
    log_level: int = logging.WARNING,
) -> _T:
    """Await ``call()`` until it succeeds or ``patience.timeout`` has passed.

    Each attempt is bounded by ``patience.attempt_timeout`` and by the time
    left, whichever ends first; an attempt cut off fails with
    :class:`AttemptTimeout`. After a transient failure the pause is
    :meth:`Patience.pause`, at most the time left; a pause that uses up the
    time left ends the loop at the deadline (no attempt is made with no time).
    Every retry is logged with ``what``, the attempt, the error and the pause.
    A cleanup that a failed attempt needs (stopping a half-started client)
    belongs inside ``call``.

    Time is the ``clock``'s; the default, :data:`~streamlet.clock.SYSTEM_CLOCK`,
    reads ``time.monotonic()``. Under asyncio that is also the event loop's
    clock (``anyio.current_time()``), so a ``since`` read from either agrees,
    and it is what the engine's own deadlines read; tests pass a
    :class:`~streamlet.testing.clock.FakeClock`.

    Args:
        patience: the deadline and the pacing.
        what: what is being tried, for the log ("connect to Kafka at host:9092").
        call: makes one attempt.
        transient: whether a failure may pass (default :func:`is_retriable`);
            a failure that may not is raised at once, unchanged.
        since: the clock's time the wait began, when earlier calls already
            waited for the same thing (default: now).
        clock: the time read and slept on.
        log_level: the level of the line logged per retry.

    Raises:
        OutOfTime: the deadline passed; ``error`` is the last failure
            (an :class:`AttemptTimeout` if the last attempt was cut off),
            ``attempts`` the number of attempts made.
        Exception: a failure ``transient`` rejects, as ``call`` raised it.
            Cancellation is never caught.
    """
    start = clock.monotonic() if since is None else since
    deadline = math.inf if patience.timeout is None else start + patience.timeout
    attempt = 0
    while True:
        attempt += 1
        began = clock.monotonic()
        bound = deadline
        if patience.attempt_timeout is not None:
            bound = min(bound, began + patience.attempt_timeout)
        error: Exception
        try:
            return await _bounded(clock, began, bound, call)
        except AttemptTimeout as exc:
            error = exc
        except Exception as exc:
            if not transient(exc):
                raise
            error = exc
        left = deadline - clock.monotonic()
        if left <= 0:
            raise OutOfTime(error, attempt) from error
        pause = patience.pause(attempt, left)
        log.log(
            log_level,
            "%s failed (attempt %d): %s; retrying in %.2f s",
            what,
            attempt,
            describe_error(error),
            pause,
        )
        await clock.sleep_until(clock.monotonic() + pause)
        if pause >= left:
            raise OutOfTime(error, attempt) from error


async def _bounded(
    clock: Clock, began: float, bound: float, call: Callable[[], Awaitable[_T]]
) -> _T:
    """``await call()``, begun at ``began``, cancelled once ``clock`` reaches ``bound``.

    ``bound`` inf: never cancelled, and no task is started.

    Raises:
        AttemptTimeout: ``bound`` came first.
    """
    if bound == math.inf:
        return await call()
    if isinstance(clock, SystemClock):
        # Its time.monotonic() is asyncio's loop time, which a cancel scope's
        # deadline reads: no task needed (a tenth of the cost of the alarm).
        with anyio.CancelScope(deadline=bound) as scope:
            return await call()
        assert scope.cancelled_caught
        raise AttemptTimeout(f"no answer within {bound - began:.3g} s")
    timed_out = False
    result: list[_T] = []
    failure: Exception | None = None
    # Any other clock (a FakeClock) bounds the attempt itself: a cancel
    # scope reads the event loop's time, which such a clock does not move.
    async with anyio.create_task_group() as group:

        async def alarm() -> None:
            nonlocal timed_out
            await clock.sleep_until(bound)
            timed_out = True
            group.cancel_scope.cancel()

        group.start_soon(alarm)
        # Caught here and raised below: raised inside the task group, it
        # would come out wrapped in an ExceptionGroup.
        try:
            result.append(await call())
        except Exception as exc:
            failure = exc
        group.cancel_scope.cancel()
    if result:
        return result[0]
    if timed_out:
        raise AttemptTimeout(f"no answer within {bound - began:.3g} s") from failure
    assert failure is not None
    raise failure


def describe_error(exc: BaseException, *, cause: bool = True) -> str:
    """``Type: message`` for a log line, and the error it wraps, if it wraps one."""
    name = type(exc).__name__
    text = str(exc) or name
    if not text.startswith(name):  # aiokafka's messages already start with their type
        text = f"{name}: {text}"
    if cause and exc.__cause__ is not None:
        text += f" (caused by {describe_error(exc.__cause__, cause=False)})"
    return text
