"""The one frame reader: frames and their offsets, and exactly how a segment ends."""

from __future__ import annotations

import random

import pytest

from streamlet.wal._reader import EndKind, SegmentEnd, SegmentReader
from streamlet.wal.format import (
    FRAME_HEADER_SIZE,
    SECTOR_SIZE,
    SEGMENT_HEADER_SIZE,
    FrameFault,
    check_frame,
    encode_frame,
    encode_segment_header,
    is_torn,
    scan,
)

SEQ = 3


class BytesFile:
    """A read-only :class:`streamlet.fs.File` over bytes that notes every read: (offset, size)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    @property
    def path(self) -> str:
        return "/log/0000000000000003.wal"

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return self.data[offset : offset + size]

    def size(self) -> int:
        return len(self.data)

    def append(self, data: bytes) -> None:
        raise AssertionError("the reader never writes")

    def sync(self) -> None:
        raise AssertionError("the reader never writes")

    def truncate(self, size: int) -> None:
        raise AssertionError("the reader never writes")

    def close(self) -> None:
        pass


def segment(payloads: list[bytes]) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A segment holding ``payloads``, and the (offset, payload) of each frame."""
    data = bytearray(encode_segment_header(SEQ))
    frames = []
    for payload in payloads:
        frames.append((len(data), payload))
        data += encode_frame(payload)
    return bytes(data), frames


def read_all(
    data: bytes, **options: object
) -> tuple[list[tuple[int, bytes]], SegmentEnd | None, BytesFile]:
    file = BytesFile(data)
    reader = SegmentReader(file, SEQ, **options)  # type: ignore[arg-type]
    return list(reader), reader.ending, file


def payloads(seed: int, count: int, largest: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(0, largest)) for _ in range(count)]


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 13, 31, 64, 4 * 2**20])
def test_frames_across_chunk_boundaries_come_whole_with_their_offsets(chunk_size: int) -> None:
    data, frames = segment(payloads(1, 40, 50))
    found, ending, file = read_all(data, chunk_size=chunk_size, torn_tail=True)
    assert found == frames
    assert ending == SegmentEnd(EndKind.CLEAN, len(data), "")
    # In chunks: no read is larger than a chunk, or than the one frame that needs more.
    largest_frame = max(FRAME_HEADER_SIZE + len(p) for _, p in frames)
    assert file.reads[0] == (0, SEGMENT_HEADER_SIZE)
    assert max(size for _, size in file.reads[1:]) <= max(chunk_size, largest_frame)
    if chunk_size < len(data):
        assert len(file.reads) > 2


def test_read_chunk_hands_out_one_chunk_at_a_time() -> None:
    data, frames = segment([bytes([i]) * 20 for i in range(10)])  # 32-byte frames
    reader = SegmentReader(BytesFile(data), SEQ, chunk_size=100)
    base, first = reader.read_chunk()
    assert base == SEGMENT_HEADER_SIZE
    assert [(base + offset, payload) for offset, payload in first] == frames[:3]
    assert reader.ending is None
    assert reader.position == frames[3][0]
    rest = []
    while reader.ending is None:
        base, chunk = reader.read_chunk()
        rest += [(base + offset, payload) for offset, payload in chunk]
    assert rest == frames[3:]
    assert reader.read_chunk().frames == []


@pytest.mark.parametrize("chunk_size", [7, 64, 4 * 2**20])
def test_a_torn_tail_at_every_byte_of_the_last_frame(chunk_size: int) -> None:
    data, frames = segment([*payloads(2, 6, 60), b"L" * 300])
    last = frames[-1][0]
    for cut in range(last, len(data)):
        torn = data[:cut]
        found, ending, _ = read_all(torn, chunk_size=chunk_size, torn_tail=True)
        assert found == frames[:-1], cut
        if cut == last:
            assert ending == SegmentEnd(EndKind.CLEAN, last, ""), cut
            continue
        assert ending is not None
        assert (ending.kind, ending.offset) == (EndKind.TORN, last), cut
        left = cut - last
        if left < FRAME_HEADER_SIZE:
            assert ending.fault is FrameFault.SHORT_HEADER
            assert ending.reason == (
                f"only {left} bytes are left, fewer than a {FRAME_HEADER_SIZE}-byte frame header"
            )
        else:
            assert ending.fault is FrameFault.PAST_END
            assert ending.reason == (
                f"the frame of a 300-byte record runs past the end of the data "
                f"({left - FRAME_HEADER_SIZE} payload bytes are there)"
            )
        # Where no torn tail is allowed (an older segment), the same cut is corruption.
        found, ending, _ = read_all(torn, chunk_size=chunk_size)
        assert found == frames[:-1]
        assert ending is not None
        assert (ending.kind, ending.offset) == (EndKind.CORRUPT, last), cut


@pytest.mark.parametrize("torn_tail", [False, True])
@pytest.mark.parametrize("chunk_size", [9, 4 * 2**20])
def test_a_bad_crc_mid_segment_is_corruption_at_its_offset(
    torn_tail: bool, chunk_size: int
) -> None:
    data, frames = segment([bytes([i]) * 100 for i in range(1, 9)])
    bad_offset, bad_payload = frames[4]
    damaged = bytearray(data)
    damaged[bad_offset + FRAME_HEADER_SIZE + 7] ^= 0x04
    file = BytesFile(bytes(damaged))
    reader = SegmentReader(file, SEQ, chunk_size=chunk_size, torn_tail=torn_tail)
    assert list(reader) == frames[:4]
    ending = reader.ending
    assert ending is not None
    assert (ending.kind, ending.offset, ending.fault, ending.length) == (
        EndKind.CORRUPT,
        bad_offset,
        FrameFault.BAD_CRC,
        100,
    )
    assert ending.reason.startswith("the 100-byte record fails its checksum (stored 0x")
    # Its length is sound: dump steps over it and reads on to a clean end.
    stepped = reader.step_over()
    assert stepped == bytes(damaged[bad_offset + FRAME_HEADER_SIZE :][:100]) != bad_payload
    assert list(reader) == frames[5:]
    assert reader.ending == SegmentEnd(EndKind.CLEAN, len(data), "")


def test_only_a_checksum_failure_can_be_stepped_over() -> None:
    data, frames = segment([b"a" * 10, b"b" * 10])
    reader = SegmentReader(BytesFile(data[:-3]), SEQ)
    assert list(reader) == frames[:1]
    with pytest.raises(ValueError, match="only a frame that failed its checksum"):
        reader.step_over()


def test_an_empty_segment_has_a_bad_header() -> None:
    found, ending, file = read_all(b"", torn_tail=True)
    assert found == []
    assert ending == SegmentEnd(
        EndKind.BAD_HEADER,
        0,
        "the segment header is incomplete: the file holds 0 of its 32 bytes",
    )
    assert file.reads == [(0, SEGMENT_HEADER_SIZE)]


def test_a_header_only_segment_ends_clean_right_after_the_header() -> None:
    found, ending, _ = read_all(encode_segment_header(SEQ), torn_tail=True)
    assert found == []
    assert ending == SegmentEnd(EndKind.CLEAN, SEGMENT_HEADER_SIZE, "")


def test_a_header_of_another_segment_is_a_bad_header() -> None:
    data = encode_segment_header(SEQ + 1) + encode_frame(b"x")
    found, ending, _ = read_all(data)
    assert found == []
    assert ending == SegmentEnd(
        EndKind.BAD_HEADER,
        0,
        f"the segment header says segment {SEQ + 1}, but the file name says {SEQ}",
    )


def test_the_header_is_not_read_when_reading_from_the_middle() -> None:
    data, frames = segment([b"a" * 10, b"b" * 10, b"c" * 10])
    file = BytesFile(data)
    reader = SegmentReader(file, SEQ, start=frames[1][0], check_header=False)
    assert list(reader) == frames[1:]
    assert reader.ending == SegmentEnd(EndKind.CLEAN, len(data), "")
    assert min(offset for offset, _ in file.reads) == frames[1][0]


def test_a_file_shorter_than_the_data_written_to_it_is_corrupt() -> None:
    data, frames = segment([b"a" * 10, b"b" * 10, b"c" * 10])
    cut = frames[2][0]  # on a frame boundary
    found, ending, _ = read_all(data[:cut], end=len(data), torn_tail=True)
    assert found == frames[:2]
    assert ending == SegmentEnd(
        EndKind.CORRUPT, cut, f"the file ends here, before the {len(data)} bytes written to it"
    )
    # Reading only up to what was written leaves later bytes alone.
    found, ending, _ = read_all(data, end=frames[2][0])
    assert found == frames[:2]
    assert ending == SegmentEnd(EndKind.CLEAN, frames[2][0], "")


def test_a_zeroed_sector_inside_the_last_frame_is_torn_and_elsewhere_corrupt() -> None:
    rng = random.Random(5)
    data, frames = segment([b"first", rng.randbytes(3000)])
    last = frames[-1][0]
    damaged = bytearray(data)
    sector = (last // SECTOR_SIZE + 2) * SECTOR_SIZE
    damaged[sector : sector + SECTOR_SIZE] = bytes(SECTOR_SIZE)
    _, ending, _ = read_all(bytes(damaged), torn_tail=True)
    assert ending is not None
    assert (ending.kind, ending.offset, ending.fault) == (EndKind.TORN, last, FrameFault.BAD_CRC)
    # A frame after it makes it an older record: a flip that zeroes nothing whole is corruption.
    damaged = bytearray(data + encode_frame(b"after"))
    damaged[last + FRAME_HEADER_SIZE + 100] ^= 1
    _, ending, _ = read_all(bytes(damaged), torn_tail=True)
    assert ending is not None
    assert (ending.kind, ending.offset) == (EndKind.CORRUPT, last)


def test_a_frame_ending_in_zeros_is_judged_by_its_whole_last_sector() -> None:
    """The sector holding a bad frame's end is judged whole, with the next frame's bytes in it.

    The frame's own bytes in that sector are zeros; the sector as a whole is
    not, so this is no hole left by a power cut but a damaged record.
    """
    start = SEGMENT_HEADER_SIZE + FRAME_HEADER_SIZE
    boundary = 2 * SECTOR_SIZE
    zeros = 40  # payload bytes past the boundary, all zero
    payload = bytes([7]) * (boundary - start) + bytes(zeros)
    data, frames = segment([payload, b"next" * 50])
    assert frames[1][0] == boundary + zeros
    damaged = bytearray(data)
    damaged[start + 100] ^= 0x01
    _, ending, _ = read_all(bytes(damaged), torn_tail=True)
    assert ending is not None
    assert (ending.kind, ending.offset, ending.fault) == (
        EndKind.CORRUPT,
        SEGMENT_HEADER_SIZE,
        FrameFault.BAD_CRC,
    )
    # Without the next frame, the zeros reach the end of the file: a torn tail.
    _, ending, _ = read_all(bytes(damaged[: frames[1][0]]), torn_tail=True)
    assert ending is not None
    assert (ending.kind, ending.offset) == (EndKind.TORN, SEGMENT_HEADER_SIZE)


def old_verdict(data: bytes) -> tuple[int, bool | None]:
    """Where the intact frames end and whether that is torn, judged on the whole file."""
    _, stop = scan(data, SEGMENT_HEADER_SIZE, len(data))
    if stop == len(data):
        return stop, None
    base = stop - stop % SECTOR_SIZE
    tail = data[base:]
    check = check_frame(tail, stop - base, len(tail))
    return stop, is_torn(tail, base, stop, check)


def test_the_torn_verdict_matches_the_rule_applied_to_the_whole_rest_of_the_file() -> None:
    """The reader looks only at the sectors the bad frame overlaps; the verdict is the same."""
    rng = random.Random(11)
    kinds = {EndKind.CLEAN: 0, EndKind.TORN: 0, EndKind.CORRUPT: 0}
    for _ in range(600):
        data = bytearray(segment(payloads(rng.randrange(10**6), rng.randrange(1, 12), 1500))[0])
        for _ in range(rng.randrange(1, 3)):
            how = rng.randrange(4)
            if how == 0:  # a bit flip
                index = rng.randrange(SEGMENT_HEADER_SIZE, len(data))
                data[index] ^= 1 << rng.randrange(8)
            elif how == 1:  # a zeroed sector
                start = rng.randrange(len(data) // SECTOR_SIZE + 1) * SECTOR_SIZE
                start = max(start, SEGMENT_HEADER_SIZE)
                data[start : start + SECTOR_SIZE] = bytes(len(data[start : start + SECTOR_SIZE]))
            elif how == 2:  # a cut
                del data[rng.randrange(SEGMENT_HEADER_SIZE, len(data) + 1) :]
            else:  # zeros appended, or garbage
                data += bytes(rng.randrange(1, 2000)) if rng.random() < 0.5 else rng.randbytes(40)
        stop, torn = old_verdict(bytes(data))
        for chunk_size in (rng.randrange(1, 700), 4 * 2**20):
            _, ending, _ = read_all(bytes(data), torn_tail=True, chunk_size=chunk_size)
            assert ending is not None
            expected = {None: EndKind.CLEAN, True: EndKind.TORN, False: EndKind.CORRUPT}[torn]
            assert (ending.kind, ending.offset) == (expected, stop)
        kinds[ending.kind] += 1
    assert kinds[EndKind.TORN], kinds
    assert kinds[EndKind.CORRUPT], kinds
