"""FileSink: one durable part file per batch, complete or absent, written at most once."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from streamlet.errors import ConfigError, SinkError
from streamlet.fs import File, OsFileSystem
from streamlet.records import Batch
from streamlet.sinks import FileSink, SinkContext, encode_output
from streamlet.sinks.file import MARKER
from streamlet.testing.faultfs import CutMode, FaultFS, run_until_cut
from tests.sinks import crash_worker

CONTEXT = SinkContext("app", "handler", "state")


def batch(batch_id: int) -> Batch:
    return Batch(batch_id, 1000.0 + batch_id, [])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def opened(directory: Path, context: SinkContext = CONTEXT, **kwargs: object) -> FileSink:
    sink = FileSink(directory, **kwargs)  # type: ignore[arg-type]
    await sink.open(context)
    return sink


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Umask 0, so that only the sink's own modes can keep files private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


class FlakyFS(OsFileSystem):
    """The real file system, failing chosen operations and noting each call's thread."""

    def __init__(self) -> None:
        self.fail: dict[str, OSError] = {}
        self.calls: list[tuple[str, int]] = []

    def _call(self, op: str) -> None:
        self.calls.append((op, threading.get_ident()))
        error = self.fail.get(op)
        if error is not None:
            raise error

    def create(self, path: str) -> File:
        self._call("create")
        return FlakyFile(super().create(path), self)

    def exists(self, path: str) -> bool:
        self._call("exists")
        return super().exists(path)

    def remove(self, path: str) -> None:
        self._call("remove")
        super().remove(path)

    def rename(self, src: str, dst: str) -> None:
        self._call("rename")
        super().rename(src, dst)

    def sync_dir(self, path: str) -> None:
        self._call("sync_dir")
        super().sync_dir(path)


class FlakyFile:
    def __init__(self, file: File, fs: FlakyFS) -> None:
        self._file = file
        self._fs = fs

    @property
    def path(self) -> str:
        return self._file.path

    def append(self, data: bytes) -> None:
        self._fs._call("append")
        self._file.append(data)

    def read(self, offset: int, size: int) -> bytes:
        return self._file.read(offset, size)

    def size(self) -> int:
        return self._file.size()

    def sync(self) -> None:
        self._fs._call("sync")
        self._file.sync()

    def truncate(self, size: int) -> None:
        self._file.truncate(size)

    def close(self) -> None:
        self._file.close()


async def test_round_trip_one_part_file_per_batch(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = await opened(out)
    assert await sink.commit(batch(3), [b"raw", "text", {"k": [1, 2]}, 7]) is True
    assert await sink.commit(batch(4), []) is True
    assert await sink.commit(batch(12), ["é"]) is True
    assert FileSink.read_committed(out) == {
        3: [b"raw", b"text", b'{"k":[1,2]}', b"7"],
        4: [],
        12: ["é".encode()],
    }
    assert (out / "part-000000000003.jsonl").read_bytes() == b'raw\ntext\n{"k":[1,2]}\n7\n'
    # An empty batch still leaves its file: that is what marks it committed.
    assert (out / "part-000000000004.jsonl").read_bytes() == b""
    assert visible(out) == [
        MARKER,
        "part-000000000003.jsonl",
        "part-000000000004.jsonl",
        "part-000000000012.jsonl",
    ]


async def test_custom_encode_is_used_per_output(tmp_path: Path) -> None:
    sink = await opened(tmp_path / "out", encode=lambda o: repr(o).encode())
    await sink.commit(batch(1), [(1, "a"), None])
    assert FileSink.read_committed(tmp_path / "out") == {1: [b"(1, 'a')", b"None"]}


async def test_second_commit_of_a_batch_returns_false_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = await opened(out)
    assert await sink.commit(batch(5), ["first"]) is True
    part = out / "part-000000000005.jsonl"
    before = part.stat()
    assert await sink.commit(batch(5), ["second", "run"]) is False
    again = await opened(out)  # a restarted process
    assert await again.commit(batch(5), []) is False
    assert part.read_bytes() == b"first\n"
    assert part.stat().st_ino == before.st_ino
    assert part.stat().st_mtime_ns == before.st_mtime_ns
    assert FileSink.read_committed(out) == {5: [b"first"]}


@pytest.mark.parametrize("output", [b"two\nlines", "two\nlines"])
async def test_output_with_a_newline_is_refused_naming_batch_and_handler(
    tmp_path: Path, output: object
) -> None:
    out = tmp_path / "out"
    sink = await opened(out)
    with pytest.raises(SinkError, match=r"output 1 of handler 'handler' in batch 9.*newline"):
        await sink.commit(batch(9), ["fine", output])
    assert visible(out) == [MARKER]
    # The JSON encoding of a str escapes the newline, so it goes through as a value.
    assert await sink.commit(batch(9), [{"text": "two\nlines"}]) is True


async def test_unencodable_output_is_refused_and_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = await opened(out)
    with pytest.raises(SinkError, match=r"output 0 of handler 'handler' in batch 2") as info:
        await sink.commit(batch(2), [object()])
    assert isinstance(info.value.__cause__, TypeError)
    assert visible(out) == [MARKER]


@pytest.mark.parametrize(
    "other", [SinkContext("other-app", "handler", "s"), SinkContext("app", "other", "s")]
)
async def test_directory_of_another_app_or_handler_is_refused(
    tmp_path: Path, other: SinkContext
) -> None:
    out = tmp_path / "out"
    sink = await opened(out)
    await sink.commit(batch(1), ["x"])
    leftover = out / ".part-000000000002.jsonl.tmp"
    leftover.write_bytes(b"in progress")
    with pytest.raises(ConfigError, match="holds the outputs of app 'app', handler 'handler'") as e:
        await opened(out, other)
    assert "own output directory" in str(e.value)
    assert str(out / MARKER) in str(e.value)
    # Refused before touching anything: the other sink's temp file stays.
    assert leftover.exists()
    assert orjson.loads((out / MARKER).read_bytes())["handler"] == "handler"


async def test_non_empty_directory_without_marker_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"not empty \(notes.txt\).*new or empty directory"):
        await opened(out)
    assert visible(out) == ["notes.txt"]


async def test_damaged_marker_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    await opened(out)
    (out / MARKER).write_bytes(b"{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        await opened(out)


async def test_temp_leftovers_are_removed_on_open(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = await opened(out)
    await sink.commit(batch(1), ["kept"])
    (out / ".part-000000000002.jsonl.tmp").write_bytes(b"half a bat")
    (out / ".part-000000000003.jsonl.tmp").write_bytes(b"")
    assert FileSink.read_committed(out) == {1: [b"kept"]}  # temps were never committed
    reopened = await opened(out)
    assert visible(out) == [MARKER, "part-000000000001.jsonl"]
    assert await reopened.commit(batch(2), ["whole"]) is True
    assert FileSink.read_committed(out) == {1: [b"kept"], 2: [b"whole"]}


async def test_marker_temp_left_by_a_crash_in_the_first_open_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / (MARKER + ".tmp")).write_bytes(b'{"format": "str')
    await opened(out)
    assert visible(out) == [MARKER]


@pytest.mark.usefixtures("open_umask")
async def test_directory_is_0700_and_files_0600(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    sink = await opened(out)
    await sink.commit(batch(1), ["secret"])
    await sink.commit(batch(2), [])
    assert mode(out) == 0o700
    assert mode(tmp_path / "deep") == 0o700
    for name in (MARKER, "part-000000000001.jsonl", "part-000000000002.jsonl"):
        assert mode(out / name) == 0o600, name


async def test_commit_before_open_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="not opened"):
        await FileSink(tmp_path).commit(batch(1), [])


async def test_a_commit_is_one_worker_thread_call(tmp_path: Path) -> None:
    fs = FlakyFS()
    sink = await opened(tmp_path / "out", fs=fs)
    fs.calls.clear()
    await sink.commit(batch(1), ["a", "b"])
    ops = [op for op, _ in fs.calls]
    assert ops == ["exists", "exists", "create", "append", "sync", "rename", "sync_dir"]
    threads = {ident for _, ident in fs.calls}
    assert len(threads) == 1
    assert threads != {threading.get_ident()}  # never on the event loop's thread


@pytest.mark.parametrize(
    ("op", "code", "advice"),
    [
        ("append", errno.ENOSPC, "disk is full"),
        ("sync", errno.EIO, "I/O error"),
        ("create", errno.EACCES, "not writable"),
        ("rename", errno.EIO, "I/O error"),
    ],
)
async def test_a_failed_write_leaves_nothing_visible_and_can_be_retried(
    tmp_path: Path, op: str, code: int, advice: str
) -> None:
    out = tmp_path / "out"
    fs = FlakyFS()
    sink = await opened(out, fs=fs)
    fs.fail[op] = OSError(code, os.strerror(code))
    with pytest.raises(SinkError) as info:
        await sink.commit(batch(7), ["x" * 1000])
    message = str(info.value)
    assert "batch 7 of handler 'handler'" in message
    assert str(out / "part-000000000007.jsonl") in message or str(out) in message
    assert advice in message
    assert visible(out) == [MARKER]
    del fs.fail[op]
    assert await sink.commit(batch(7), ["x" * 1000]) is True
    assert FileSink.read_committed(out) == {7: [b"x" * 1000]}


async def test_failed_directory_fsync_takes_the_part_back_and_stops_the_sink(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    fs = FlakyFS()
    sink = await opened(out, fs=fs)
    fs.fail["sync_dir"] = OSError(errno.EIO, "Input/output error")
    with pytest.raises(SinkError, match="fsync of the directory failed"):
        await sink.commit(batch(1), ["x"])
    # Nobody may count the batch as committed: its entry may not be durable.
    assert visible(out) == [MARKER]
    del fs.fail["sync_dir"]
    # fsync is never retried and trusted; the sink stays stopped until reopened.
    with pytest.raises(SinkError, match="restart the app"):
        await sink.commit(batch(1), ["x"])
    assert visible(out) == [MARKER]
    await sink.open(CONTEXT)
    assert await sink.commit(batch(1), ["x"]) is True


def test_sigkill_during_commits_leaves_every_reported_batch_exactly_once(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "out"
    start = 0
    for kill in range(5):
        context = f"kill {kill} (seed {seed})"
        done = crash_worker.run_until_killed("file", str(out), start, rng)
        start = crash_worker.check_run(done, start, context)
        committed = FileSink.read_committed(out)
        # Everything reported is there; at most the batch after the last
        # report is there too (committed, then killed before its report).
        assert set(committed) in ({*range(start)}, {*range(start + 1)}), context
        for batch_id, lines in committed.items():
            expected = [orjson.dumps(o) for o in crash_worker.outputs_of(batch_id)]
            assert lines == expected, f"{context}: batch {batch_id} is not whole"
        temps = [n for n in visible(out) if n.endswith(".tmp")]
        assert len(temps) <= 1, f"{context}: {temps}"
    committed = FileSink.read_committed(out)
    asyncio.run(FileSink(out).open(crash_worker.CONTEXT))
    assert not [n for n in visible(out) if n.endswith(".tmp")]
    assert FileSink.read_committed(out) == committed


# ---- power loss (FaultFS) ------------------------------------------------------------

POWER_OUTPUTS: dict[int, list[object]] = {
    # Batch 1 spans several 512-byte sectors, so a cut can keep part of it.
    1: [{"n": n, "pad": "x" * 300} for n in range(8)],
    2: ["short"],
    3: [],
}


async def power_workload(fs: FaultFS, reported: list[int]) -> None:
    sink = FileSink("/out", fs=fs)
    await sink.open(CONTEXT)
    for batch_id, outputs in POWER_OUTPUTS.items():
        if await sink.commit(batch(batch_id), outputs):
            reported.append(batch_id)


def expected_lines(batch_id: int) -> list[bytes]:
    return [encode_output(o) for o in POWER_OUTPUTS[batch_id]]


async def check_recovery(disk: FaultFS, reported: list[int], label: str) -> None:
    """Restart on what the power cut left: parts whole or absent, reported ones kept."""
    sink = FileSink("/out", fs=disk)
    await sink.open(CONTEXT)
    committed = FileSink.read_committed("/out", fs=disk)
    for batch_id, lines in committed.items():
        assert lines == expected_lines(batch_id), f"{label}: batch {batch_id} is partial"
    assert set(reported) <= set(committed), f"{label}: reported {reported}, left {committed}"
    assert not [n for n in disk.listdir("/out") if n.endswith(".tmp")], label
    # The restarted app re-runs every batch not known done; each lands once.
    for batch_id, outputs in POWER_OUTPUTS.items():
        wrote = await sink.commit(batch(batch_id), outputs)
        assert wrote == (batch_id not in committed), f"{label}: batch {batch_id}"
    final = FileSink.read_committed("/out", fs=disk)
    assert final == {b: expected_lines(b) for b in POWER_OUTPUTS}, label


async def test_power_cut_before_or_after_any_operation_leaves_parts_whole_or_absent() -> None:
    counting = FaultFS()
    await power_workload(counting, [])
    names = [op.name for op in counting.ops]
    assert names.count("rename") == 4  # the marker and three parts
    assert names.count("sync_dir") == 4  # open, and once per part
    modes: tuple[CutMode, ...] = ("drop", "sectors", "garble")
    for index in range(len(counting.ops)):
        for when in ("before", "after"):
            for mode in modes:
                for seed in range(2 if mode != "drop" else 1):
                    fs = FaultFS()
                    if when == "before":
                        fs.cut_at(index)
                    else:
                        fs.cut_after(index)
                    reported: list[int] = []
                    assert await run_until_cut(fs, power_workload(fs, reported))
                    label = f"cut {when} op {index} {counting.ops[index]}, {mode} seed {seed}"
                    disk = fs.power_cut(mode, rng=random.Random(seed))
                    await check_recovery(disk, reported, label)


async def test_a_retry_after_a_failed_fsync_writes_a_new_durable_file() -> None:
    fs = FaultFS()
    sink = FileSink("/out", fs=fs)
    await sink.open(CONTEXT)
    fs.fail_sync("/out/.part-*", times=1)
    with pytest.raises(SinkError, match="I/O error"):
        await sink.commit(batch(1), POWER_OUTPUTS[1])
    # The failed sync dropped the data; the retry must not trust that file.
    assert await sink.commit(batch(1), POWER_OUTPUTS[1]) is True
    disk = fs.power_cut("drop")
    assert FileSink.read_committed("/out", fs=disk) == {1: expected_lines(1)}


async def test_a_failed_directory_fsync_leaves_the_batch_whole_or_absent() -> None:
    for seed in range(10):
        fs = FaultFS()
        sink = FileSink("/out", fs=fs)
        await sink.open(CONTEXT)
        fs.fail_sync("/out", times=1)
        with pytest.raises(SinkError, match="fsync of the directory failed"):
            await sink.commit(batch(1), POWER_OUTPUTS[1])
        await check_recovery(fs.power_cut("sectors", rng=random.Random(seed)), [], f"{seed}")
