"""Backpressure: an input rate that follows what the handlers can process.

A fixed ``max_rate`` is a guess. When a handler slows down (a slow database,
a larger payload) batches take longer than the batch interval, scheduling
delay grows, and with it the backlog and the end-to-end latency. Like Spark
Streaming's ``PIDRateEstimator``, :class:`RateEstimator` looks at every
finished batch and sets the rate for the next ones:

* the **proportional** term moves the rate toward the rate at which the last
  batch was actually processed (records / seconds it took);
* the **integral** term works off accumulated scheduling delay: the records
  that piled up while batches waited are taken out of the next rate, so the
  backlog drains instead of only holding steady;
* the **derivative** term damps fast swings (off by default, as in Spark).

The rate never falls below ``min_rate`` (so the pipeline keeps moving and
the estimator keeps getting signal) and, when the handlers speed up again,
grows back at once through the proportional term.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from streamlet.errors import ConfigError

__all__ = ["RateController", "RateEstimator"]


@dataclass(slots=True)
class RateEstimator:
    """A PID controller from batch timings to records per second.

    Args:
        batch_interval: the app's batch interval in seconds.
        proportional: weight of the current error (rate - processing rate).
        integral: weight of the backlog implied by scheduling delay.
        derivative: weight of the change of the error per second.
        min_rate: the floor, in records per second.
    """

    batch_interval: float
    proportional: float = 1.0
    integral: float = 0.2
    derivative: float = 0.0
    min_rate: float = 100.0
    rate: float | None = None
    _last_time: float | None = None
    _last_error: float = 0.0

    def __post_init__(self) -> None:
        if not self.batch_interval > 0:
            raise ConfigError(f"batch_interval must be positive, not {self.batch_interval!r}")
        for name in ("proportional", "integral", "derivative"):
            if getattr(self, name) < 0:
                raise ConfigError(f"backpressure {name} gain must be >= 0")
        if not self.min_rate > 0:
            raise ConfigError(f"backpressure min_rate must be positive, not {self.min_rate!r}")

    def update(
        self, *, time: float, records: int, processing_time: float, scheduling_delay: float
    ) -> float | None:
        """Feed one finished batch; return the new rate, or None if unchanged.

        Args:
            time: when the batch finished (seconds, any monotonic clock).
            records: records the batch processed.
            processing_time: seconds the batch took, handlers and commits.
            scheduling_delay: seconds the batch waited behind earlier ones.
        """
        if records <= 0 or processing_time <= 0:
            return None  # nothing was measured
        if self._last_time is not None and time <= self._last_time:
            return None
        processing_rate = records / processing_time
        if self.rate is None:
            # First measurement: adopt what the handlers just showed.
            self.rate = max(processing_rate, self.min_rate)
            self._last_time = time
            self._last_error = 0.0
            return self.rate
        assert self._last_time is not None
        elapsed = time - self._last_time
        error = self.rate - processing_rate
        backlog = scheduling_delay * processing_rate / self.batch_interval
        change = (error - self._last_error) / elapsed
        new_rate = max(
            self.rate
            - self.proportional * error
            - self.integral * backlog
            - self.derivative * change,
            self.min_rate,
        )
        self._last_time = time
        self._last_error = error
        self.rate = new_rate
        return new_rate


class RateController:
    """Per source, the input rate backpressure sets from each finished batch; no I/O.

    The scheduler feeds it every batch it runs (records per source, the time
    the batch kept the worker busy, its scheduling delay) and applies the
    rates that changed: as per-partition batch limits for direct sources,
    as a throttle for receivers. One :class:`RateEstimator` per source.

    Args:
        names: the sources it sets rates for.
        batch_interval: the app's batch interval in seconds.
        min_rate: the lowest rate it sets, records/s per source.
    """

    def __init__(self, names: Iterable[str], *, batch_interval: float, min_rate: float) -> None:
        self._estimators = {
            name: RateEstimator(batch_interval=batch_interval, min_rate=min_rate) for name in names
        }

    @property
    def rates(self) -> dict[str, float | None]:
        """Per source, the rate set last (None: no batch of it measured yet)."""
        return {name: estimator.rate for name, estimator in self._estimators.items()}

    def update(
        self, now: float, inputs: Mapping[str, int], *, busy: float, scheduling_delay: float
    ) -> dict[str, float]:
        """Feed one finished batch; return the rates that changed, by source."""
        changed: dict[str, float] = {}
        for name, estimator in self._estimators.items():
            rate = estimator.update(
                time=now,
                records=inputs.get(name, 0),
                processing_time=busy,
                scheduling_delay=scheduling_delay,
            )
            if rate is not None:
                changed[name] = rate
        return changed
