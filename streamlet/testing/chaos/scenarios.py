"""The chaos scenarios, pipelines and profiles, as data: what runs where, and how big.

A :class:`Scenario` names a way to break the worker (its ``inject``
function is in :mod:`streamlet.testing.chaos.faults`) and the pipelines it
applies to; :data:`PIPELINES` names the apps under test; :data:`PROFILES`
lists the runs of ``streamlet chaos --profile short`` (CI) and ``long``
(the published figures). All three are plug-in points: :func:`register`
adds a scenario, and a :class:`~streamlet.testing.chaos.inputs.Pipeline`
subclass added to :data:`PIPELINES` tests another app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamlet.testing.chaos import faults
from streamlet.testing.chaos.inputs import Pipeline, SequencePipeline, TcpPipeline
from streamlet.testing.chaos.kafka import KafkaPipeline, KafkaReceiverPipeline

if TYPE_CHECKING:
    from streamlet.testing.chaos.checks import Outputs
    from streamlet.testing.chaos.run import Run

__all__ = ["PIPELINES", "PROFILES", "SCENARIOS", "Plan", "Scenario", "register"]


PIPELINES: dict[str, type[Pipeline]] = {
    "sequence": SequencePipeline,
    "tcp": TcpPipeline,
    "kafka": KafkaPipeline,
    "kafka-receiver": KafkaReceiverPipeline,
}
"""Pipelines by name; add a :class:`Pipeline` subclass here to test another app."""


@dataclass(frozen=True)
class Scenario:
    """A named way to break the worker.

    Attributes:
        name: the name used on the command line and in reports.
        inject: ``inject(run)`` starts workers through ``run`` and injects
            ``run.faults_wanted`` faults, leaving no worker running.
        description: one line for the report.
        pipelines: the pipelines it applies to.
        dead_letter: the app under test uses the dead-letter policy.
        verify: extra checks on the outputs (besides the common ones).
    """

    name: str
    inject: Callable[[Run], None]
    description: str
    pipelines: tuple[str, ...] = ("sequence", "tcp")
    dead_letter: bool = False
    verify: Callable[[Run, Outputs], None] = lambda run, outputs: None
    uptime_per_fault: float = 1.5
    """Seconds of worker uptime one fault takes, about: input is spread over them all."""


SCENARIOS: dict[str, Scenario] = {}
"""Registered scenarios by name."""


def register(scenario: Scenario) -> Scenario:
    """Add ``scenario`` to :data:`SCENARIOS` (a plug-in point); return it."""
    SCENARIOS[scenario.name] = scenario
    return scenario


_ALL_PIPELINES = ("sequence", "tcp", "kafka", "kafka-receiver")

register(
    Scenario(
        "sigkill_random",
        faults.sigkill_random,
        "SIGKILL at random moments",
        pipelines=_ALL_PIPELINES,
    )
)
register(
    Scenario(
        "sigkill_steps",
        faults.sigkill_steps,
        "SIGKILL at each named step of the commit protocol (STREAMLET_CRASH_AT)",
        pipelines=_ALL_PIPELINES,
        uptime_per_fault=1.0,
    )
)
register(
    Scenario(
        "sigterm_random",
        faults.sigterm_random,
        "SIGTERM at random moments: exit 0, nothing left pending",
        pipelines=_ALL_PIPELINES,
    )
)
register(
    Scenario(
        "slow_fsync",
        faults.slow_fsync,
        "every fsync delayed 20 ms to 1.1 s, with SIGKILLs",
        uptime_per_fault=4.0,
    )
)
register(
    Scenario(
        "fsync_eio",
        faults.fsync_eio,
        "fsync fails with EIO on a WAL, a checkpoint, a FileSink output: exit 1, then recover",
        uptime_per_fault=4.0,
    )
)
register(
    Scenario(
        "enospc",
        faults.enospc,
        "disk full while writing a WAL, a checkpoint, a FileSink output: exit 1, then recover",
        uptime_per_fault=4.0,
    )
)
register(
    Scenario(
        "torn_tail",
        faults.torn_tail,
        "a torn frame at the end of the last WAL segment: cut off, nothing lost",
        uptime_per_fault=2.5,
    )
)
register(
    Scenario(
        "bitflip",
        faults.bitflip,
        "a bit flipped in a sealed WAL segment: refuse to start naming file and offset",
        uptime_per_fault=2.5,
    )
)
register(
    Scenario(
        "dead_letter",
        faults.dead_letter,
        "handlers raise on some records, hang on others (timeout): dead letters, with SIGKILLs",
        dead_letter=True,
        uptime_per_fault=2.5,
    )
)
register(
    Scenario(
        "clock_jump",
        faults.clock_jump,
        "the wall clock jumps back and forward: batch ids stay dense",
        verify=faults.verify_clock,
        uptime_per_fault=3.5,
    )
)


register(
    Scenario(
        "broker_kill",
        faults.broker_kill,
        "the Kafka broker SIGKILLed and restarted under a running worker",
        pipelines=("kafka", "kafka-receiver"),
        # A broker restart takes tens of seconds, and the input goes on meanwhile.
        uptime_per_fault=30.0,
    )
)


@dataclass(frozen=True)
class Plan:
    """One scenario on one pipeline with its size."""

    scenario: str
    pipeline: str
    records: int
    faults: int


def _plans(rows: Iterable[tuple[str, str, int, int]]) -> tuple[Plan, ...]:
    return tuple(Plan(*row) for row in rows)


PROFILES: dict[str, tuple[Plan, ...]] = {
    "short": _plans(
        [
            ("sigkill_random", "sequence", 6000, 6),
            ("sigkill_random", "tcp", 6000, 6),
            ("sigkill_steps", "sequence", 6000, 5),
            ("sigkill_steps", "tcp", 6000, 5),
            ("sigterm_random", "sequence", 3000, 3),
            ("sigterm_random", "tcp", 3000, 3),
            ("slow_fsync", "tcp", 3000, 3),
            ("fsync_eio", "sequence", 3000, 3),
            ("fsync_eio", "tcp", 3000, 3),
            ("enospc", "sequence", 3000, 3),
            ("enospc", "tcp", 3000, 3),
            ("torn_tail", "tcp", 3000, 4),
            ("bitflip", "sequence", 3000, 2),
            ("bitflip", "tcp", 3000, 2),
            ("dead_letter", "sequence", 12000, 3),
            ("clock_jump", "sequence", 3000, 2),
            ("sigkill_random", "kafka-receiver", 3000, 3),
            # One broker restart: each takes tens of seconds (the long profile has four).
            ("broker_kill", "kafka", 3000, 1),
        ]
    ),
    "long": _plans(
        [
            ("sigkill_random", "sequence", 600_000, 130),
            ("sigkill_random", "tcp", 400_000, 80),
            ("sigkill_steps", "sequence", 20_000, 20),
            ("sigkill_steps", "tcp", 20_000, 20),
            ("sigterm_random", "sequence", 20_000, 10),
            ("sigterm_random", "tcp", 20_000, 10),
            ("slow_fsync", "sequence", 10_000, 6),
            ("slow_fsync", "tcp", 10_000, 6),
            ("fsync_eio", "sequence", 10_000, 6),
            ("fsync_eio", "tcp", 10_000, 8),
            ("enospc", "sequence", 10_000, 6),
            ("enospc", "tcp", 10_000, 8),
            ("torn_tail", "sequence", 10_000, 6),
            ("torn_tail", "tcp", 10_000, 8),
            ("bitflip", "sequence", 10_000, 4),
            ("bitflip", "tcp", 10_000, 6),
            ("dead_letter", "sequence", 30_000, 8),
            ("dead_letter", "tcp", 30_000, 8),
            ("clock_jump", "sequence", 10_000, 4),
            ("clock_jump", "tcp", 10_000, 4),
            ("sigkill_random", "kafka", 60_000, 25),
            ("sigkill_random", "kafka-receiver", 60_000, 25),
            ("sigkill_steps", "kafka", 10_000, 10),
            ("sigkill_steps", "kafka-receiver", 10_000, 10),
            ("broker_kill", "kafka", 10_000, 4),
            ("broker_kill", "kafka-receiver", 10_000, 4),
        ]
    ),
}
"""Named sets of runs: ``short`` for CI, ``long`` for the published figures."""
