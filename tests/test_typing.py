"""Typed records under mypy: a handler's ``Batch[T]`` types ``record.data`` as ``T``, and a
source's ``decode`` must return what its handlers take."""

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


@app.handler(orders, name="mismatched")
async def mismatched(batch: sl.Batch[int]) -> list[int]:
    return [record.data + 1 for record in batch]


@app.handler([orders], name="running", state=sl.State())
async def running(batch: sl.Batch[Order], state: sl.KeyedState) -> list[int]:
    return [record.data["cents"] for record in batch]


@app.handler(orders, name="blocking", thread=True)
def blocking(batch: sl.Batch[Order]) -> list[str]:
    return [record.data["customer"] for record in batch]


plain = app.source(sl.SequenceSource(limit=1), name="plain")


@app.handler([orders, plain], name="mixed")
async def mixed(batch: sl.Batch) -> list[object]:
    return [record.data for record in batch]
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
    # The decorator hands the function back as a callable of its batch type.
    assert 'Revealed type is "def (streamlet.records.Batch[TypedDict(typed_app.Order, ' in notes[2]
    errors = [line for line in out.splitlines() if ": error:" in line]
    # The two misuses are caught, and nothing else is an error.
    assert len(errors) == 2, out
    assert 'TypedDict "Order" has no key "dollars"' in errors[0], out
    # A handler of Batch[int] on a source whose decode returns Orders.
    assert "typed_app.py:44: error: Argument 1 has incompatible type" in errors[1], out
    assert "Batch[int]" in errors[1], out


def test_the_guide_snippets_pass_mypy_strict(tmp_path: Path) -> None:
    files = []
    for index, (_, snippet) in enumerate(GUIDE_SNIPPETS):
        path = tmp_path / f"guide_snippet_{index}.py"
        path.write_text(snippet)
        files.append(str(path))
    out, status = _mypy(*files)
    assert status == 0, out
