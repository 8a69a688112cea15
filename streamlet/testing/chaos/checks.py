"""What a chaos run must end with, as pure functions over what was read back from the sinks.

Every sink the harness checks is exactly-once: each input record is in it
once, or (when the app sends failures aside) in the dead-letter sink once;
nothing else is there; and per key (a partition, a TCP client) records come
out in input order. These functions take the outputs as read
(:class:`Outputs`, filled by :mod:`streamlet.testing.chaos.readback`) and
the expected numbers, and return counts and problems; they do no I/O, so
each way a run can fail is unit-tested.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from streamlet.testing.chaos.config import parse_value, poisoned

__all__ = [
    "Outputs",
    "SinkCheck",
    "batch_id_gaps",
    "check_sink",
    "dead_letter_problems",
    "poisoned_value",
    "sinks_apart",
]

EXAMPLES = 5
"""Problems quoted per sink; the counts say how many there are."""


@dataclass
class Outputs:
    """What the sinks hold, per sink in commit order."""

    by_sink: dict[str, list[str]]
    dead: dict[str, list[str]]
    """Dead letters' values per handler."""
    dead_errors: Counter[str]
    """Dead letters per error type."""
    file_batches: set[int]
    db_batches: set[int]
    db_commit_times: list[float]


@dataclass
class SinkCheck:
    """One sink's outputs against the input."""

    out: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    out_of_order: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == self.duplicated == self.unexpected == self.out_of_order == 0

    def _example(self, text: str) -> None:
        if len(self.examples) < EXAMPLES:
            self.examples.append(text)


def check_sink(
    expected: Mapping[str, range], outputs: Sequence[str], dead: Sequence[str]
) -> SinkCheck:
    """Lost, duplicated, unexpected and out-of-order records of one exactly-once sink.

    Args:
        expected: per key, the record numbers that must come out, in order.
        outputs: the sink's values in commit order.
        dead: the values its handler sent to the dead-letter sink (these
            count as delivered, once, but have no order).
    """
    check = SinkCheck(out=len(outputs))
    seen: Counter[tuple[str, int]] = Counter()
    last: dict[str, int] = {}
    for value in outputs:
        parsed = parse_value(value)
        if parsed is None or parsed[0] not in expected or parsed[1] not in expected[parsed[0]]:
            check.unexpected += 1
            check._example(f"unexpected {value!r}")
            continue
        key, number = parsed
        seen[parsed] += 1
        if number <= last.get(key, -1):
            check.out_of_order += 1
            check._example(f"{value} after {key}:{last[key]}")
        last[key] = number
    for value in dead:
        parsed = parse_value(value)
        if parsed is None or parsed[0] not in expected:
            check.unexpected += 1
            continue
        seen[parsed] += 1
    for (key, number), count in seen.items():
        if count > 1:
            check.duplicated += count - 1
            check._example(f"{key}:{number} x{count}")
    for key, numbers in expected.items():
        for number in numbers:
            if (key, number) not in seen:
                check.lost += 1
                check._example(f"lost {key}:{number}")
    return check


def sinks_apart(outputs: Outputs) -> list[int]:
    """Batch ids (the first ten) committed to one of the file and SQLite sinks but not the other."""
    return sorted(outputs.file_batches ^ outputs.db_batches)[:10]


def poisoned_value(value: str) -> bool:
    """Whether ``value`` is a record the poisoned handlers raise on or hang over."""
    parsed = parse_value(value)
    return parsed is not None and poisoned(parsed[1]) is not None


def dead_letter_problems(outputs: Outputs, expected: Mapping[str, range]) -> list[str]:
    """What is wrong with the dead letters of a poisoned app, if anything.

    Poisoned records must be in no sink and dead-lettered by every handler,
    and the dead letters must name both failures the app was given: the
    ``ValueError`` raised and the ``TimeoutError`` of a hanging handler.
    """
    problems: list[str] = []
    poisoned_out = [
        v for v in outputs.by_sink["file"] + outputs.by_sink["sqlite"] if poisoned_value(v)
    ]
    if poisoned_out:
        problems.append(f"poisoned records reached a sink: {poisoned_out[:5]}")
    wanted = {f"{key}:{n}" for key, numbers in expected.items() for n in numbers if poisoned(n)}
    for handler, values in outputs.dead.items():
        missing = wanted - set(values)
        if missing:
            problems.append(f"poisoned records not dead-lettered by {handler}: {sorted(missing)}")
    kinds = {poisoned(n) for numbers in expected.values() for n in numbers} - {None}
    if "raise" in kinds and not outputs.dead_errors.get("ValueError"):
        problems.append("no dead letter says ValueError, though records raise")
    if "hang" in kinds and not outputs.dead_errors.get("TimeoutError"):
        problems.append("no dead letter says TimeoutError, though records hang")
    return problems


def batch_id_gaps(ids: Iterable[int]) -> list[int]:
    """The batch ids (the first ten) missing from 1 to the highest of ``ids``: ids must be dense."""
    present = set(ids)
    return sorted(set(range(1, max(present, default=0) + 1)) - present)[:10]
