"""The WAL byte format: encoding, scanning, and the torn-tail-or-corruption rules."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamlet.wal.format import (
    FORMAT_VERSION,
    FRAME_HEADER_SIZE,
    MAGIC,
    SECTOR_SIZE,
    SEGMENT_HEADER_SIZE,
    FrameFault,
    check_frame,
    check_segment_header,
    crc32c,
    encode_frame,
    encode_frames,
    encode_segment_header,
    is_torn,
    parse_segment_name,
    scan,
    segment_name,
)

records_strategy = st.lists(st.binary(max_size=600), max_size=40)


def build(records: list[bytes], seq: int = 1) -> tuple[bytes, list[int]]:
    """A segment's bytes holding ``records``, and each record's frame offset."""
    data = bytearray(encode_segment_header(seq))
    offsets = []
    for record in records:
        offsets.append(len(data))
        data += encode_frame(record)
    return bytes(data), offsets


def classify(data: bytes, offset: int) -> tuple[FrameFault | None, bool]:
    """What a reader makes of the frame at ``offset`` in a whole last segment."""
    check = check_frame(data, offset, len(data))
    return check.fault, check.fault is not None and is_torn(data, 0, offset, check)


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 1 << bit
    return bytes(changed)


def test_frame_layout_is_as_documented() -> None:
    frame = encode_frame(b"hello")
    length, check, crc = struct.unpack_from("<III", frame)
    assert len(frame) == FRAME_HEADER_SIZE + 5
    assert length == 5
    assert check == crc32c(frame[:4])
    assert crc == crc32c(frame[:4] + b"hello")
    assert frame[FRAME_HEADER_SIZE:] == b"hello"


def test_segment_header_layout_and_round_trip() -> None:
    header = encode_segment_header(7)
    assert len(header) == SEGMENT_HEADER_SIZE
    magic, version, flags, seq, reserved, crc = struct.unpack("<8sIIQII", header)
    assert (magic, version, flags, seq, reserved) == (MAGIC, FORMAT_VERSION, 0, 7, 0)
    assert crc == crc32c(header[:28])
    assert check_segment_header(header, 7) is None


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda h: b"NOTAWAL!" + h[8:], "magic"),
        (lambda h: flip(h, 20), "checksum"),
        (lambda h: h[:20], "incomplete"),
    ],
)
def test_bad_segment_header_says_why(damage: Callable[[bytes], bytes], expected: str) -> None:
    header = encode_segment_header(3)
    reason = check_segment_header(damage(header), 3)
    assert reason is not None
    assert expected in reason


def test_unknown_format_version_names_the_readable_ones() -> None:
    body = struct.pack("<8sIIQI", MAGIC, 9, 0, 1, 0)
    header = body + struct.pack("<I", crc32c(body))
    reason = check_segment_header(header, 1)
    assert reason is not None
    assert "version 9" in reason
    assert "reads version(s) 1" in reason


def test_header_seq_must_match_the_file_name() -> None:
    reason = check_segment_header(encode_segment_header(4), 5)
    assert reason is not None
    assert "segment 4" in reason
    assert "5" in reason


def test_segment_names_round_trip_and_reject_others() -> None:
    assert segment_name(12) == "0000000000000012.wal"
    assert parse_segment_name("0000000000000012.wal") == 12
    for other in ("LOCK", "0000000000000012.wal.tmp", "12.wal", "0000000000000000.wal"):
        assert parse_segment_name(other) is None
    with pytest.raises(ValueError, match="outside"):
        segment_name(0)


def test_encode_frames_equals_encode_frame_back_to_back() -> None:
    records = [b"", b"a", b"bc" * 100, b"\x00" * 9000, b"z" * 9000]
    pieces = encode_frames(records, [len(r) for r in records])
    assert b"".join(pieces) == b"".join(encode_frame(r) for r in records)
    same = [b"x" * 10] * 5
    assert b"".join(encode_frames(same, [10] * 5)) == encode_frame(b"x" * 10) * 5


@given(records_strategy)
@settings(max_examples=200)
def test_any_records_round_trip_through_the_scanner(records: list[bytes]) -> None:
    data, offsets = build(records)
    found, stop = scan(data, SEGMENT_HEADER_SIZE, len(data))
    assert stop == len(data)
    assert [p for _, p in found] == records
    assert [o for o, _ in found] == offsets


@given(records_strategy.filter(bool), st.data())
@settings(max_examples=200)
def test_any_cut_of_a_log_scans_to_an_intact_prefix(
    records: list[bytes], data: st.DataObject
) -> None:
    whole, offsets = build(records)
    cut = data.draw(st.integers(SEGMENT_HEADER_SIZE, len(whole)))
    found, stop = scan(whole[:cut], SEGMENT_HEADER_SIZE, cut)
    intact = [o for o, r in zip(offsets, records, strict=True) if o + 12 + len(r) <= cut]
    assert [o for o, _ in found] == intact
    assert [p for _, p in found] == records[: len(intact)]
    if stop < cut:
        fault, torn = classify(whole[:cut], stop)
        assert fault in (FrameFault.SHORT_HEADER, FrameFault.PAST_END)
        assert torn


def test_truncated_tail_is_eof() -> None:
    records = [b"first", b"second" * 10, bytes(range(256)) * 3]
    whole, offsets = build(records)
    last = offsets[-1]
    for cut in range(last + 1, len(whole)):
        data = whole[:cut]
        found, stop = scan(data, SEGMENT_HEADER_SIZE, cut)
        assert [p for _, p in found] == records[:-1]
        assert stop == last
        fault, torn = classify(data, stop)
        assert torn, f"cut at {cut}: {fault}"


def test_crc_mismatch_mid_log_is_reported() -> None:
    records = [b"a" * 50, b"b" * 50, b"c" * 50]
    whole, offsets = build(records)
    data = flip(whole, offsets[1] + FRAME_HEADER_SIZE + 10)
    found, stop = scan(data, SEGMENT_HEADER_SIZE, len(data))
    assert [p for _, p in found] == records[:1]
    assert stop == offsets[1]
    check = check_frame(data, stop, len(data))
    assert check.fault is FrameFault.BAD_CRC
    assert "checksum" in check.reason
    assert not is_torn(data, 0, stop, check)


def test_flipped_length_is_corruption_not_torn() -> None:
    # A flipped high length bit makes the last frame look as if it ran past
    # the end of the file, exactly like a torn write, but for the length check.
    records = [b"a" * 50, b"b" * 50]
    whole, offsets = build(records)
    data = flip(whole, offsets[1] + 2, 3)
    fault, torn = classify(data, offsets[1])
    assert fault is FrameFault.BAD_LENGTH_CHECK
    assert not torn


def test_zero_filled_tail_is_torn() -> None:
    whole, _ = build([b"a" * 50])
    data = whole + bytes(5000)
    found, stop = scan(data, SEGMENT_HEADER_SIZE, len(data))
    assert len(found) == 1
    fault, torn = classify(data, stop)
    assert fault is FrameFault.BAD_LENGTH_CHECK
    assert torn


def test_zeroed_sector_inside_the_last_frame_is_torn() -> None:
    # A power cut can persist the header and the end of a frame but not a
    # sector in between: a whole zeroed sector is no bit flip.
    payload = bytes((i * 7 + 1) % 256 or 1 for i in range(4 * SECTOR_SIZE))
    whole, offsets = build([b"x" * 100, payload])
    data = bytearray(whole)
    sector = (offsets[1] // SECTOR_SIZE + 2) * SECTOR_SIZE
    data[sector : sector + SECTOR_SIZE] = bytes(SECTOR_SIZE)
    fault, torn = classify(bytes(data), offsets[1])
    assert fault is FrameFault.BAD_CRC
    assert torn


def test_zeroed_header_with_later_sectors_written_is_torn() -> None:
    # The sector holding the frame header kept its old content (zeros past
    # the old end of file) while later sectors of the frame were persisted.
    whole, offsets = build([b"x" * 500, b"y" * 2000])
    data = bytearray(whole)
    sector_end = offsets[1] - offsets[1] % SECTOR_SIZE + SECTOR_SIZE
    data[offsets[1] : sector_end] = bytes(sector_end - offsets[1])
    fault, torn = classify(bytes(data), offsets[1])
    assert fault is FrameFault.BAD_LENGTH_CHECK
    assert torn


def test_zero_sector_overlapping_a_damaged_header_is_torn() -> None:
    # The header straddles a sector boundary; its second sector is a zeroed
    # hole, the first holds the header's start.
    whole, offsets = build([b"x" * 462, b"y" * 2000])
    o = offsets[1]
    assert o % SECTOR_SIZE == SECTOR_SIZE - 6
    data = bytearray(whole)
    boundary = o + 6
    data[boundary : boundary + SECTOR_SIZE] = bytes(SECTOR_SIZE)
    fault, torn = classify(bytes(data), o)
    assert fault is FrameFault.BAD_LENGTH_CHECK
    assert torn


def test_single_flips_anywhere_are_detected() -> None:
    records = [bytes([i + 1]) * (17 * i + 3) for i in range(12)]
    whole, offsets = build(records)
    for index in range(SEGMENT_HEADER_SIZE, len(whole)):
        for bit in (0, 7):
            data = flip(whole, index, bit)
            found, stop = scan(data, SEGMENT_HEADER_SIZE, len(data))
            owner = max(o for o in offsets if o <= index)
            assert stop == owner
            assert [p for _, p in found] == records[: offsets.index(owner)]


def test_is_torn_wants_a_sector_aligned_tail() -> None:
    whole, offsets = build([b"x"])
    check = check_frame(whole, offsets[0], len(whole))
    with pytest.raises(ValueError, match="sector"):
        is_torn(whole[1:], 1, offsets[0], check)


def test_no_valid_frame_header_is_within_one_bit_of_all_zeros() -> None:
    # The torn-tail rule for an all-zero header relies on this: a header with
    # at most one bit set needs a length of at most one set bit whose length
    # check is zero (or a zero length whose check has at most one bit set).
    for length in [0] + [1 << i for i in range(32)]:
        set_bits = bin(length).count("1") + bin(crc32c(struct.pack("<I", length))).count("1")
        assert set_bits >= 2, length
