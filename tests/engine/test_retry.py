"""retrying_until: the deadline-bound retry loop, on a FakeClock, exactly.

Every test runs the loop beside :meth:`FakeClock.autojump`: time moves only
when every task waits, straight to the next deadline, so attempt times and
pauses are exact. Binary fractions keep the arithmetic exact too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import pytest

from streamlet._retry import AttemptTimeout, OutOfTime, Patience, retrying_until
from streamlet.errors import ConfigError, SourceUnavailableError
from streamlet.testing.clock import FakeClock

_T = TypeVar("_T")


async def _on(clock: FakeClock, run: Callable[[], Awaitable[_T]]) -> _T:
    """``await run()`` with time jumping whenever it waits; its error raised as is."""
    result: list[_T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        with anyio.fail_after(10):  # real seconds: a hang, not a timing
            try:
                result.append(await run())
            except Exception as exc:  # raised below, not wrapped in an ExceptionGroup
                failure.append(exc)
        tg.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return result[0]


class _Calls:
    """An attempt that fails with ``errors`` in turn, then returns "done"; notes start times."""

    def __init__(self, clock: FakeClock, *errors: Exception, hang: bool = False) -> None:
        self.clock = clock
        self.errors = list(errors)
        self.hang = hang
        self.times: list[float] = []

    async def __call__(self) -> str:
        self.times.append(self.clock.monotonic())
        if self.hang:
            await anyio.sleep_forever()
        if self.errors:
            raise self.errors.pop(0)
        return "done"


async def test_gives_up_at_the_deadline_with_the_last_error_and_the_attempts() -> None:
    clock = FakeClock()
    call = _Calls(clock, *(ConnectionError(f"refused {n}") for n in range(1, 100)))
    patience = Patience(timeout=10.0, backoff=1.0, max_backoff=4.0)
    with pytest.raises(OutOfTime) as caught:
        await _on(clock, lambda: retrying_until(patience, "connect", call, clock=clock))
    # Pauses 1, 2, 4, then 4 capped to the 3 s left: no attempt at the deadline.
    assert call.times == [0.0, 1.0, 3.0, 7.0]
    assert clock.monotonic() == 10.0
    assert caught.value.attempts == 4
    assert isinstance(caught.value.error, ConnectionError)
    assert str(caught.value.error) == "refused 4"
    assert caught.value.__cause__ is caught.value.error


async def test_a_call_that_succeeds_returns_its_value_without_waiting() -> None:
    clock = FakeClock()
    call = _Calls(clock, OSError("down"), OSError("down"))
    patience = Patience(timeout=10.0, backoff=0.5, max_backoff=4.0)
    assert await _on(clock, lambda: retrying_until(patience, "x", call, clock=clock)) == "done"
    assert call.times == [0.0, 0.5, 1.5]
    assert clock.monotonic() == 1.5


async def test_an_error_that_is_not_transient_propagates_at_once_unchanged() -> None:
    clock = FakeClock()
    refusal = ConfigError("bad setting")  # not retriable: is_retriable says no
    call = _Calls(clock, refusal)
    patience = Patience(timeout=10.0, backoff=1.0, max_backoff=4.0)
    with pytest.raises(ConfigError) as caught:
        await _on(clock, lambda: retrying_until(patience, "x", call, clock=clock))
    assert caught.value is refusal
    assert call.times == [0.0]
    assert clock.monotonic() == 0.0


async def test_the_classifier_decides_what_is_transient() -> None:
    clock = FakeClock()
    patience = Patience(timeout=10.0, backoff=1.0, max_backoff=4.0)

    def transient(exc: Exception) -> bool:
        return isinstance(exc, ConnectionError)

    # Retriable for is_retriable, not for this classifier.
    call = _Calls(clock, ConnectionError("a"), SourceUnavailableError("b"))
    with pytest.raises(SourceUnavailableError, match="b"):
        await _on(
            clock,
            lambda: retrying_until(patience, "x", call, transient=transient, clock=clock),
        )
    assert call.times == [0.0, 1.0]
    # A TimeoutError the call raises itself is the classifier's to judge.
    call = _Calls(clock, TimeoutError("its own"))
    with pytest.raises(TimeoutError, match="its own"):
        await _on(
            clock,
            lambda: retrying_until(patience, "x", call, transient=transient, clock=clock),
        )


async def test_an_attempt_over_its_timeout_is_cut_off_and_tried_again() -> None:
    clock = FakeClock()
    call = _Calls(clock, hang=True)
    patience = Patience(timeout=10.0, backoff=1.0, max_backoff=1.0, attempt_timeout=2.0)
    with pytest.raises(OutOfTime) as caught:
        await _on(
            clock,
            # Nothing is transient for this classifier; a cut-off attempt still is.
            lambda: retrying_until(patience, "x", call, transient=lambda exc: False, clock=clock),
        )
    # Attempts of 2 s with 1 s pauses; the last one gets only the 1 s left.
    assert call.times == [0.0, 3.0, 6.0, 9.0]
    assert clock.monotonic() == 10.0
    assert caught.value.attempts == 4
    assert isinstance(caught.value.error, AttemptTimeout)
    assert isinstance(caught.value.error, TimeoutError)
    assert str(caught.value.error) == "no answer within 1 s"


async def test_without_attempt_timeout_an_attempt_has_the_time_left() -> None:
    clock = FakeClock()
    times: list[float] = []
    patience = Patience(timeout=4.0, backoff=1.0, max_backoff=1.0)

    async def fail_then_hang() -> None:
        times.append(clock.monotonic())
        if len(times) == 1:
            raise OSError("down")
        await anyio.sleep_forever()

    with pytest.raises(OutOfTime) as caught:
        await _on(clock, lambda: retrying_until(patience, "x", fail_then_hang, clock=clock))
    assert times == [0.0, 1.0]
    assert clock.monotonic() == 4.0
    assert isinstance(caught.value.error, AttemptTimeout)
    assert str(caught.value.error) == "no answer within 3 s"


def test_the_pause_doubles_caps_and_is_capped_by_the_time_left() -> None:
    patience = Patience(timeout=None, backoff=0.25, max_backoff=2.0)
    assert [patience.pause(n) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert patience.pause(3, left=0.75) == 0.75
    assert patience.pause(1, left=1.0) == 0.25
    assert patience.pause(100_000) == 2.0  # no overflow after many tries


async def test_without_a_timeout_it_keeps_trying_with_the_capped_backoff() -> None:
    clock = FakeClock()
    call = _Calls(clock, *(OSError("down") for _ in range(6)))
    patience = Patience(timeout=None, backoff=0.25, max_backoff=2.0)
    assert await _on(clock, lambda: retrying_until(patience, "x", call, clock=clock)) == "done"
    assert call.times == [0.0, 0.25, 0.75, 1.75, 3.75, 5.75, 7.75]


async def test_the_deadline_counts_from_since() -> None:
    clock = FakeClock(start=100.0)
    call = _Calls(clock, *(OSError("down") for _ in range(10)))
    patience = Patience(timeout=5.0, backoff=1.0, max_backoff=1.0)
    with pytest.raises(OutOfTime) as caught:
        await _on(clock, lambda: retrying_until(patience, "x", call, since=98.0, clock=clock))
    assert call.times == [100.0, 101.0, 102.0]
    assert clock.monotonic() == 103.0
    assert caught.value.attempts == 3


async def test_a_deadline_already_passed_allows_one_attempt_with_no_time() -> None:
    clock = FakeClock(start=10.0)
    patience = Patience(timeout=1.0, backoff=1.0, max_backoff=1.0)
    call = _Calls(clock, OSError("down"))
    with pytest.raises(OutOfTime) as caught:
        await _on(clock, lambda: retrying_until(patience, "x", call, since=0.0, clock=clock))
    assert (call.times, caught.value.attempts) == ([10.0], 1)


async def test_each_retry_is_logged_with_what_attempt_error_and_pause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    call = _Calls(clock, ConnectionError("refused"), TimeoutError())
    patience = Patience(timeout=10.0, backoff=0.5, max_backoff=4.0)
    with caplog.at_level(logging.INFO, logger="streamlet._retry"):
        await _on(
            clock,
            lambda: retrying_until(
                patience, "connect to db:1", call, clock=clock, log_level=logging.INFO
            ),
        )
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.INFO,
            "connect to db:1 failed (attempt 1): ConnectionError: refused; retrying in 0.50 s",
        ),
        (logging.INFO, "connect to db:1 failed (attempt 2): TimeoutError; retrying in 1.00 s"),
    ]


async def test_cancellation_is_never_caught() -> None:
    clock = FakeClock()
    patience = Patience(timeout=10.0, backoff=1.0, max_backoff=1.0, attempt_timeout=5.0)
    call = _Calls(clock, hang=True)
    with anyio.move_on_after(0.05) as scope:  # real time: the clock never jumps here
        await retrying_until(patience, "x", call, clock=clock)
    assert scope.cancelled_caught
    assert call.times == [0.0]
    assert clock.next_deadline == float("inf")  # the attempt's alarm is gone


def test_patience_refuses_impossible_settings() -> None:
    with pytest.raises(ConfigError):
        Patience(timeout=-1.0, backoff=1.0, max_backoff=1.0)
    with pytest.raises(ConfigError):
        Patience(timeout=1.0, backoff=2.0, max_backoff=1.0)
    with pytest.raises(ConfigError):
        Patience(timeout=1.0, backoff=1.0, max_backoff=1.0, attempt_timeout=0.0)


async def test_on_the_system_clock_attempts_are_cut_off_in_real_time() -> None:
    # The one test in real time: the system clock's attempts are bounded by
    # a cancel scope's deadline, not by a task sleeping on the clock.
    async def hang() -> None:
        await anyio.sleep_forever()

    patience = Patience(timeout=0.2, backoff=0.01, max_backoff=0.01, attempt_timeout=0.05)
    started = time.monotonic()
    with pytest.raises(OutOfTime) as caught:
        await retrying_until(patience, "x", hang)
    assert 0.2 <= time.monotonic() - started < 5
    assert isinstance(caught.value.error, AttemptTimeout)
    assert caught.value.attempts >= 2
    assert await retrying_until(patience, "x", _Calls(FakeClock(), OSError("once"))) == "done"
