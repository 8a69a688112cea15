"""Keyed state for handlers: declared with :class:`State`, used as a :class:`KeyedState`.

A handler registered with ``state=State(...)`` is called as
``handler(batch, state)``; ``state`` is a dict-like view of its keys as of
the previous batch, and what the handler changes becomes durable exactly
once, with the batch (see :mod:`streamlet.state._store` for the protocol).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from streamlet.errors import ConfigError
from streamlet.state._keyed import KeyedState
from streamlet.state._store import StateKey

__all__ = ["KeyedState", "State", "StateKey"]


@dataclass(frozen=True, slots=True)
class State:
    """A handler's keyed state: how long keys live and how many stay in memory.

    Attributes:
        ttl: seconds of batch time after its last write that a key lives
            (None: for ever). Expired keys leave the state at the next batch
            and are handed to it in ``state.expired``, so the handler can
            emit a final output for each (``mapWithState``'s timeout).
        cache_keys: how many keys' encoded values stay in memory between
            batches; the rest is read from disk when a batch needs it, so the
            state may be larger than memory.
        idle: the handler also runs on a batch with no input (an *idle
            batch*, every batch interval while nothing arrives), so that
            processing-time windows close and keys expire on the batch clock
            rather than waiting for the next record. Its sink is called only
            when it returns outputs. False: it runs only when input arrives.
    """

    ttl: float | None = None
    cache_keys: int = 100_000
    idle: bool = True

    def __post_init__(self) -> None:
        if self.ttl is not None and not (self.ttl > 0 and math.isfinite(self.ttl)):
            raise ConfigError(f"State ttl must be a positive number of seconds, not {self.ttl!r}")
        if self.cache_keys < 0:
            raise ConfigError(f"State cache_keys must be >= 0, not {self.cache_keys!r}")

    def describe(self) -> dict[str, object]:
        """What the state-dir manifest records of it."""
        return {"ttl": self.ttl}
