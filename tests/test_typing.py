"""Typed records: a handler's ``Batch[T]`` gives ``record.data`` the type ``T`` under mypy."""

from __future__ import annotations

from pathlib import Path

from tests.test_docs import SNIPPETS as GUIDE_SNIPPETS

PROGRAM = """
from typing import TypedDict, cast

import orjson

import streamlet as sl


class Order(TypedDict):
    customer: str
    cents: int


def parse(value: bytes) -> Order:
    return cast(Order, orjson.loads(value))


app = sl.App("typed", state_dir="state")
orders = app.source(sl.SequenceSource(limit=1), decode=parse)


@app.handler(orders)
async def totals(batch: sl.Batch[Order]) -> list[int]:
    for record in batch:
        reveal_type(record.data)
    return [record.data["cents"] for record in batch]


@app.handler(orders, name="untyped")
async def untyped(batch: sl.Batch) -> list[object]:
    for record in batch:
        reveal_type(record.data)
    return [record.data for record in batch]


@app.handler(orders, name="wrong")
async def wrong(batch: sl.Batch[Order]) -> list[int]:
    return [record.data["dollars"] for record in batch]


reveal_type(totals)
"""


def _mypy(*files: str) -> tuple[str, int]:
    from mypy import api

    out, err, status = api.run(["--strict", "--no-incremental", "--show-error-codes", *files])
    return out + err, status


def test_a_batch_s_type_parameter_types_record_data(tmp_path: Path) -> None:
    path = tmp_path / "typed_app.py"
    path.write_text(PROGRAM)
    out, _ = _mypy(str(path))
    notes = [line for line in out.splitlines() if "Revealed type" in line]
    assert 'Revealed type is "TypedDict(typed_app.Order, ' in notes[0], out
    assert 'Revealed type is "object"' in notes[1], out
    # The decorator hands the function back with its own type.
    assert "def (batch: streamlet.records.Batch[TypedDict(typed_app.Order, " in notes[2], out
    errors = [line for line in out.splitlines() if ": error:" in line]
    # The one misuse is caught, and nothing else is an error.
    assert len(errors) == 1, out
    assert 'TypedDict "Order" has no key "dollars"' in errors[0], out


def test_the_guide_snippets_pass_mypy_strict(tmp_path: Path) -> None:
    files = []
    for index, (_, snippet) in enumerate(GUIDE_SNIPPETS):
        path = tmp_path / f"guide_snippet_{index}.py"
        path.write_text(snippet)
        files.append(str(path))
    out, status = _mypy(*files)
    assert status == 0, out
