"""Records, offset ranges, block refs and batches: values without I/O."""

from __future__ import annotations

import pytest

from streamlet.records import Batch, BlockRef, OffsetRange, Record


def _batch() -> Batch:
    records = [Record(b"a", source="x"), Record(b"b", source="y"), Record(b"c", source="x")]
    return Batch(
        7,
        1.5,
        records,
        (OffsetRange("x", 0, 0, 2),),
        (BlockRef(1, "y", 1, 32, 10, 1),),
    )


def test_a_handler_reading_every_source_gets_the_batch_itself() -> None:
    batch = _batch()
    assert batch.for_sources(["x", "y"]) is batch  # no copy per handler


def test_a_handler_of_one_source_sees_only_its_records_ranges_and_blocks() -> None:
    view = _batch().for_sources(["x"])
    assert (view.id, view.time) == (7, 1.5)
    assert [r.value for r in view] == [b"a", b"c"]
    assert view.ranges == (OffsetRange("x", 0, 0, 2),)
    assert view.blocks == ()
    assert len(_batch().for_sources(["y"])) == 1


def test_a_block_ref_reads_back_from_its_json_form() -> None:
    ref = BlockRef(3, "tcp", 2, 4096, 512, 17)
    assert BlockRef.from_json(list(ref)) == ref
    assert BlockRef.from_json(["3", "tcp", "2", "4096", "512", "17"]) == ref
    with pytest.raises(ValueError, match="6 fields"):
        BlockRef.from_json([3, "tcp", 2])
    with pytest.raises(ValueError, match="invalid literal"):
        BlockRef.from_json([3, "tcp", 2, 4096, 512, "many"])


def test_an_offset_range_counts_its_offsets() -> None:
    assert OffsetRange("s", 0, 10, 25).size == 15
