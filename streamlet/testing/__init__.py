"""Helpers users can reuse in their own tests.

The test kit for apps is here: :class:`AppHarness` runs an app in-process on
records fed to it and shows what its sinks committed, batch by batch, and
:func:`assert_same_after_crash` checks that a crash at a step of the commit
protocol and a restart change no output (see :mod:`streamlet.testing.harness`;
the pytest fixture is in :mod:`streamlet.testing.pytest_plugin`).

Submodules are imported on demand so that a test importing one helper does
not pay for the others: the names above load the harness when first used,
:mod:`streamlet.testing.kafka` runs a real Kafka broker on loopback,
:mod:`streamlet.testing.faultfs` simulates power loss and I/O faults under
anything that writes through :mod:`streamlet.fs`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamlet.testing.harness import (
        CRASH_POINTS,
        AppHarness,
        Commit,
        MemorySource,
        Message,
        RecordingSink,
        SimulatedCrash,
        assert_same_after_crash,
    )

__all__ = [
    "CRASH_POINTS",
    "AppHarness",
    "Commit",
    "MemorySource",
    "Message",
    "RecordingSink",
    "SimulatedCrash",
    "assert_same_after_crash",
]


def __getattr__(name: str) -> Any:
    # The harness imports the whole engine: only when one of its names is used.
    if name in __all__:
        return getattr(importlib.import_module("streamlet.testing.harness"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
