"""The client ids ``streamlet send`` derives for a file, and how it picks one with the server."""

from __future__ import annotations

import anyio
import pytest

from streamlet.sources import TcpSource
from streamlet.tcp import (
    FILE_PREFIX_BYTES,
    FileClientId,
    TcpClient,
    UnreachableError,
    choose_client_id,
    file_client_ids,
)
from tests.sources.support import FakeContext, running

PLACE = {"host": "h1", "path": "/data/a.txt", "device": 2049, "inode": 77}


def ids(prefix: bytes, **changes: object) -> list[FileClientId]:
    return file_client_ids(prefix, **{**PLACE, **changes})  # type: ignore[arg-type]


def test_ids_name_powers_of_two_of_the_first_lines_most_specific_first() -> None:
    found = ids(b"".join(b"%d\n" % i for i in range(1, 12)) + b"unfinished")
    assert [c.lines for c in found] == [8, 4, 2, 1]
    assert len({c.client_id for c in found}) == 4
    assert all(c.client_id.startswith("file-") and len(c.client_id) == 21 for c in found)


def test_appending_keeps_the_ids_of_the_shorter_file() -> None:
    content = b"".join(b"row %d\n" % i for i in range(1, 2000))
    for size in (1, 3, 4, 7, 100, 700):
        shorter = b"".join(b"row %d\n" % i for i in range(1, size + 1))
        longer = ids(content[:FILE_PREFIX_BYTES])
        assert ids(shorter)[0] in longer


def test_any_other_place_identity_or_first_line_gives_other_ids() -> None:
    base = {c.client_id for c in ids(b"a\nb\n")}
    for changed in (
        ids(b"a\nb\n", host="h2"),
        ids(b"a\nb\n", path="/data/b.txt"),
        ids(b"a\nb\n", device=2050),
        ids(b"a\nb\n", inode=78),
        ids(b"A\nb\n"),
    ):
        assert base.isdisjoint(c.client_id for c in changed)
    # The same first line, another second one: only the one-line id is shared.
    assert base & {c.client_id for c in ids(b"a\nc\n")} == {ids(b"a\n")[0].client_id}


def test_without_a_complete_line_the_id_names_the_first_bytes() -> None:
    wide = b"x" * (FILE_PREFIX_BYTES + 10)
    assert [c.lines for c in ids(wide)] == [0]
    assert ids(wide) == ids(wide[:FILE_PREFIX_BYTES] + b"different after 4 KiB\n")
    assert ids(b"") != ids(b"partial")
    assert len(ids(b"\n" * FILE_PREFIX_BYTES)) == 13  # 4096 lines: 2**12 down to 2**0


async def test_choose_picks_the_most_specific_id_the_server_has_lines_of() -> None:
    candidates = ids(b"".join(b"%d\n" % i for i in range(1, 9)))
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port:
        assert await choose_client_id(candidates, "127.0.0.1", port) == candidates[0]
        for used in (candidates[2], candidates[1]):
            async with TcpClient("127.0.0.1", port, used.client_id) as client:
                await client.send(b"line")
            assert await choose_client_id(candidates, "127.0.0.1", port) == used
    with pytest.raises(ValueError, match="at least one candidate"):
        await choose_client_id([], "127.0.0.1", port)


async def test_choose_raises_unreachable_once_for_all_candidates() -> None:
    candidates = ids(b"1\n2\n3\n4\n")
    async with running(TcpSource(), FakeContext()) as port:
        pass  # the port is free again
    with anyio.fail_after(10), pytest.raises(UnreachableError, match=r"within 0\.3 s"):
        await choose_client_id(candidates, "127.0.0.1", port, connect_timeout=0.3)
