"""The chaos checks, without a worker: each way an output can be wrong is seen.

The checks are what makes a chaos run mean anything; a check that cannot
fail would pass every run. So each test here gives them an output that is
wrong in exactly one way and expects that way, and only it, to be counted.
"""

from __future__ import annotations

from collections import Counter

from streamlet.testing.chaos.checks import (
    Outputs,
    batch_id_gaps,
    check_sink,
    dead_letter_problems,
    sinks_apart,
)
from streamlet.testing.chaos.config import poisoned

EXPECTED = {"p0": range(3), "p1": range(3)}
COMPLETE = ["p0:0", "p1:0", "p0:1", "p1:1", "p0:2", "p1:2"]


def _counts(values: list[str], dead: list[str] | None = None) -> tuple[int, int, int, int]:
    check = check_sink(EXPECTED, values, dead or [])
    return check.lost, check.duplicated, check.out_of_order, check.unexpected


def test_a_complete_output_in_order_passes() -> None:
    check = check_sink(EXPECTED, COMPLETE, [])
    assert check.ok
    assert check.examples == []
    assert check.out == 6


def test_a_lost_record_fails() -> None:
    check = check_sink(EXPECTED, [v for v in COMPLETE if v != "p1:1"], [])
    assert not check.ok
    assert _counts([v for v in COMPLETE if v != "p1:1"]) == (1, 0, 0, 0)
    assert check.examples == ["lost p1:1"]


def test_a_duplicated_record_fails() -> None:
    check = check_sink(EXPECTED, [*COMPLETE, "p0:2"], [])
    assert not check.ok
    # Again at the end is also after p0:2 itself: a re-delivery breaks order too.
    assert (check.lost, check.duplicated, check.unexpected) == (0, 1, 0)
    assert "p0:2 x2" in check.examples


def test_a_record_both_written_and_dead_lettered_is_a_duplicate() -> None:
    assert _counts(COMPLETE, dead=["p1:0"]) == (0, 1, 0, 0)


def test_a_reordered_but_complete_output_fails() -> None:
    reordered = ["p0:1", "p0:0", "p1:0", "p1:1", "p0:2", "p1:2"]
    check = check_sink(EXPECTED, reordered, [])
    assert not check.ok
    assert _counts(reordered) == (0, 0, 1, 0)
    assert check.examples == ["p0:0 after p0:1"]


def test_order_is_per_key_only() -> None:
    interleaved = ["p1:0", "p1:1", "p1:2", "p0:0", "p0:1", "p0:2"]
    assert check_sink(EXPECTED, interleaved, []).ok


def test_records_never_sent_fail() -> None:
    assert _counts([*COMPLETE, "p0:3", "p2:0", "junk"]) == (0, 0, 0, 3)


def test_dead_letters_count_as_delivered_once() -> None:
    assert check_sink(EXPECTED, [v for v in COMPLETE if v != "p0:1"], ["p0:1"]).ok


def test_the_checker_sees_loss_duplicates_order_and_strangers_together() -> None:
    expected = {"a": range(1, 6)}
    broken = check_sink(expected, ["a:1", "a:3", "a:2", "a:3", "b:1", "junk"], ["a:1"])
    assert broken.lost == 2  # a:4, a:5
    assert broken.duplicated == 2  # a:3 twice, a:1 in the output and the dead letters
    assert broken.out_of_order == 1  # a:2 after a:3
    assert broken.unexpected == 2  # b:1, junk
    assert len(broken.examples) == 5  # quoted up to five; the counts say the rest


def _outputs(
    file: list[str],
    *,
    dead: dict[str, list[str]] | None = None,
    errors: dict[str, int] | None = None,
    file_batches: set[int] | None = None,
    db_batches: set[int] | None = None,
) -> Outputs:
    return Outputs(
        by_sink={"file": file, "sqlite": file},
        dead=dead if dead is not None else {"to_files": [], "to_db": []},
        dead_errors=Counter(errors or {}),
        file_batches=file_batches or set(),
        db_batches=db_batches or set(),
        db_commit_times=[],
    )


def test_dead_letter_problems_need_every_poisoned_record_aside_under_both_errors() -> None:
    expected = {"p0": range(5000)}
    poison = [f"p0:{n}" for n in expected["p0"] if poisoned(n)]
    assert {poisoned(int(v.partition(":")[2])) for v in poison} == {"raise", "hang"}
    clean = [f"p0:{n}" for n in expected["p0"] if not poisoned(n)]
    good = _outputs(
        clean,
        dead={"to_files": poison, "to_db": poison},
        errors={"ValueError": 4, "TimeoutError": 2},
    )
    assert dead_letter_problems(good, expected) == []

    leaked = _outputs([*clean, poison[0]], dead={"to_files": poison, "to_db": poison[1:]})
    problems = dead_letter_problems(leaked, expected)
    assert any("reached a sink" in p for p in problems)
    assert any("not dead-lettered by to_db" in p for p in problems)
    assert any("ValueError" in p for p in problems)
    assert any("TimeoutError" in p for p in problems)


def test_sinks_apart_names_batches_only_one_sink_committed() -> None:
    assert sinks_apart(_outputs([], file_batches={1, 2, 3}, db_batches={1, 2, 3})) == []
    assert sinks_apart(_outputs([], file_batches={1, 2, 4}, db_batches={1, 2, 3})) == [3, 4]


def test_batch_id_gaps() -> None:
    assert batch_id_gaps([]) == []
    assert batch_id_gaps([3, 1, 2]) == []
    assert batch_id_gaps([1, 2, 5]) == [3, 4]
