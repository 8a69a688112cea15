"""Readers of on-disk state take arbitrary bytes: only their documented errors come out."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import anyio
import google_crc32c
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlet._checkpoint import CheckpointError, decode, encode
from streamlet._tracker import restore
from streamlet.errors import StreamletError, WALError
from streamlet.records import Record, decode_records, encode_records
from streamlet.wal import WriteAheadLog
from streamlet.wal.format import encode_segment_header, segment_name

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_checkpoint_decode_of_arbitrary_bytes_raises_only_checkpoint_error(data: bytes) -> None:
    error: CheckpointError | None = None
    try:
        body = decode(data, "fuzz.json")
    except CheckpointError as exc:
        error = exc
    if error is not None:
        assert "fuzz.json" in str(error)
    else:
        assert isinstance(body, dict)


@settings(max_examples=300)
@given(json_values)
def test_a_checksummed_but_foreign_body_is_refused_by_name(value: object) -> None:
    data = encode({"app": "x", "state": value, "last_event": None})
    body = decode(data, "fuzz.json")
    error: StreamletError | None = None
    try:
        state, after = restore(body, "fuzz.json")
    except StreamletError as exc:
        error = exc
    if error is not None:
        assert "fuzz.json" in str(error)
    else:  # only a well-formed state gets through
        assert after is None
        assert isinstance(state.next_batch_id, int)


def test_a_header_with_a_wrong_checksum_names_the_problem() -> None:
    payload = orjson.dumps({"state": {}})
    header = orjson.dumps(
        {
            "format": "streamlet._checkpoint",
            "version": 1,
            "length": len(payload),
            "crc32c": google_crc32c.value(payload) ^ 1,
        }
    )
    with pytest.raises(CheckpointError, match=r"bad\.json: body fails its CRC32C check"):
        decode(header + b"\n" + payload, "bad.json")


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_block_decode_of_arbitrary_bytes_raises_only_value_error(data: bytes) -> None:
    try:
        records = decode_records(data, "src")
    except ValueError:
        return
    assert encode_records(records) == data


_HEADERS = st.lists(st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=6)), max_size=3)


@given(
    st.lists(
        st.tuples(st.binary(max_size=20), st.none() | st.binary(max_size=5), _HEADERS),
        max_size=5,
    )
)
def test_blocks_round_trip(
    items: list[tuple[bytes, bytes | None, list[tuple[str, bytes | None]]]],
) -> None:
    records = [
        Record(v, k, 1.5, "src", 2, i, headers=tuple(h)) for i, (v, k, h) in enumerate(items)
    ]
    assert decode_records(encode_records(records), "src") == records


def test_a_block_without_headers_is_the_original_layout() -> None:
    """Blocks written before headers existed read the same, and are written the same."""
    old = bytes.fromhex(
        "0102000000"  # version 1, two records
        "01" "000000000000f83f" "02000000" "0700000000000000" "01000000" "02000000" "6b" "7631"
        "00" "0000000000000000" "00000000" "0800000000000000" "00000000" "00000000"
    )  # fmt: skip
    records = [Record(b"v1", b"k", 1.5, "src", 2, 7), Record(b"", None, 0.0, "src", 0, 8)]
    assert decode_records(old, "src") == records
    assert encode_records(records) == old
    # With headers the block is version 2, which a streamlet from before
    # headers refuses by its version; version 1 never carries headers.
    headed = encode_records([records[0]._replace(headers=(("h", b"x"),)), records[1]])
    assert headed[0] == 2
    with pytest.raises(ValueError, match="malformed record"):
        decode_records(b"\x01" + headed[1:], "src")
    with pytest.raises(ValueError, match="block format version 3 is not readable"):
        decode_records(b"\x03" + headed[1:], "src")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.binary(max_size=200))
def test_a_segment_of_arbitrary_bytes_opens_or_fails_as_a_wal_error(
    with_header: bool, tail: bytes
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "wal"
        directory.mkdir(mode=0o700)
        path = directory / segment_name(1)
        path.write_bytes((encode_segment_header(1) if with_header else b"") + tail)
        os.chmod(path, 0o600)

        async def open_and_replay() -> None:
            try:
                wal = await WriteAheadLog.open(directory, durability="none")
            except WALError:
                return
            try:
                async for _position, payload in wal.replay():
                    assert isinstance(payload, bytes)
            finally:
                await wal.aclose()

        anyio.run(open_and_replay)
