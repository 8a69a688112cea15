"""DirectorySource on its own: offsets, the completeness convention, changed files, finishing."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlet.errors import ConfigError, SourceError
from streamlet.records import OffsetRange, Record
from streamlet.sources.directory import DirectorySource


def _put(directory: Path, name: str, data: bytes) -> None:
    """Write a file the way the convention asks: a hidden temp name, then a rename."""
    temp = directory / f".{name}.part"
    temp.write_bytes(data)
    os.rename(temp, directory / name)


async def _open(directory: Path, **kwargs: object) -> DirectorySource:
    source = DirectorySource(directory, name="files", **kwargs)  # type: ignore[arg-type]
    await source.start()
    return source


async def _read(source: DirectorySource, start: int, until: int) -> list[Record]:
    return await source.read([OffsetRange("files", 0, start, until)])


def _values(records: list[Record]) -> list[tuple[bytes, bytes | None, int]]:
    return [(r.value, r.key, r.offset) for r in records]


lines_st = st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=8)
files_st = st.lists(st.tuples(lines_st, st.booleans()), min_size=1, max_size=5)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    files=files_st,
    chunk=st.integers(1, 40),
    cuts=st.lists(st.integers(0, 60), max_size=6),
    data=st.data(),
)
def test_ranges_read_back_the_same_lines_at_any_cut_and_chunk_size(
    tmp_path_factory: pytest.TempPathFactory,
    files: list[tuple[list[bytes], bool]],
    chunk: int,
    cuts: list[int],
    data: st.DataObject,
) -> None:
    directory = tmp_path_factory.mktemp("in")
    expected: list[tuple[bytes, bytes | None, int]] = []
    for index, (lines, newline_at_end) in enumerate(files):
        name = f"f{index:02d}.txt"
        body = b"\n".join(lines) + (b"\n" if newline_at_end and lines else b"")
        _put(directory, name, body)
        # The reference: a last line without its newline is a line too.
        split = body.split(b"\n")
        if split and split[-1] == b"":
            split.pop()
        first = len(expected)
        expected.extend((line, name.encode(), first + i) for i, line in enumerate(split))

    async def main() -> None:
        source = await _open(directory, chunk_size=chunk)
        end = (await source.latest())[0]
        assert end == len(expected)
        bounds = sorted({0, end, *(min(c, end) for c in cuts)})
        ranges = list(itertools.pairwise(bounds))
        got = []
        for start, until in ranges:
            got.extend(_values(await _read(source, start, until)))
        assert got == expected
        # After a "restart" (a new source, no marks), any range reads the same lines.
        again = await _open(directory, chunk_size=data.draw(st.integers(1, 40)))
        assert (await again.latest())[0] == end
        for start, until in data.draw(st.permutations(ranges)):
            assert _values(await _read(again, start, until)) == expected[start:until]

    anyio.run(main)


async def test_hidden_temp_marker_and_unmatched_names_are_never_read(tmp_path: Path) -> None:
    (tmp_path / ".hidden.log").write_bytes(b"no\n")
    (tmp_path / "writing.log.tmp").write_bytes(b"no\n")
    (tmp_path / "other.txt").write_bytes(b"no\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.log").write_bytes(b"no\n")
    _put(tmp_path, "a.log", b"yes\n")
    source = await _open(tmp_path, pattern="*.log")
    assert await source.latest() == {0: 1}
    assert _values(await _read(source, 0, 1)) == [(b"yes", b"a.log", 0)]


async def test_a_file_being_written_is_not_read_before_its_rename(tmp_path: Path) -> None:
    source = await _open(tmp_path)
    temp = tmp_path / ".big.txt.tmp"
    with temp.open("wb") as f:
        f.write(b"first half of a li")
        f.flush()
        assert await source.latest() == {0: 0}
        f.write(b"ne\nsecond\n")
    assert await source.latest() == {0: 0}
    os.rename(temp, tmp_path / "big.txt")
    assert await source.latest() == {0: 2}
    assert [r.value for r in await _read(source, 0, 2)] == [b"first half of a line", b"second"]


async def test_marker_mode_takes_a_file_only_once_its_marker_exists(tmp_path: Path) -> None:
    source = await _open(tmp_path, complete="marker")
    with (tmp_path / "a.csv").open("wb") as f:
        f.write(b"1,2\n3,")
        f.flush()
        assert await source.latest() == {0: 0}
        f.write(b"4\n")
    assert await source.latest() == {0: 0}
    (tmp_path / "a.csv.done").touch()
    assert await source.latest() == {0: 2}
    assert [r.value for r in await _read(source, 0, 2)] == [b"1,2", b"3,4"]


async def test_files_found_later_come_after_those_taken_and_the_order_survives_a_restart(
    tmp_path: Path,
) -> None:
    _put(tmp_path, "b", b"b\n")
    _put(tmp_path, "c", b"c\n")
    source = await _open(tmp_path)
    assert await source.latest() == {0: 2}
    _put(tmp_path, "a", b"a\n")  # sorts first, but comes later
    assert await source.latest() == {0: 3}
    assert [r.value for r in await _read(source, 0, 3)] == [b"b", b"c", b"a"]
    restarted = await _open(tmp_path)
    assert await restarted.latest() == {0: 3}
    assert [r.value for r in await _read(restarted, 0, 3)] == [b"b", b"c", b"a"]


async def test_mtime_order_takes_older_files_first(tmp_path: Path) -> None:
    for name, mtime in (("a", 300), ("b", 100), ("c", 200)):
        _put(tmp_path, name, name.encode() + b"\n")
        os.utime(tmp_path / name, ns=(mtime * 10**9, mtime * 10**9))
    source = await _open(tmp_path, order="mtime")
    assert await source.latest() == {0: 3}
    records = await _read(source, 0, 3)
    assert [r.value for r in records] == [b"b", b"c", b"a"]
    assert [r.timestamp for r in records] == [100.0, 200.0, 300.0]


async def test_json_lines_are_decoded_and_blank_lines_skipped(tmp_path: Path) -> None:
    _put(tmp_path, "a.jsonl", b'{"n": 1}\n\n  \n[2]\n')
    source = await _open(tmp_path, format="jsonl")
    assert await source.latest() == {0: 4}
    records = await _read(source, 0, 4)
    assert [(r.data, r.offset) for r in records] == [({"n": 1}, 0), ([2], 3)]


async def test_a_line_that_is_not_json_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    _put(tmp_path, "a.jsonl", b'{"n": 1}\n{oops\n')
    source = await _open(tmp_path, format="jsonl")
    await source.latest()
    with pytest.raises(SourceError, match=r"line 2 of .*a\.jsonl .*not JSON"):
        await _read(source, 0, 2)


async def test_a_file_removed_before_its_batch_reads_it_is_a_clear_error(tmp_path: Path) -> None:
    _put(tmp_path, "a.txt", b"1\n2\n")
    source = await _open(tmp_path)
    await source.latest()
    (tmp_path / "a.txt").unlink()
    with pytest.raises(SourceError, match=r"a\.txt .* is gone.*lines \[0, 2\).*Put the file back"):
        await _read(source, 0, 2)
    # Put back, it reads again: a missing file is never skipped.
    _put(tmp_path, "a.txt", b"1\n2\n")
    assert [r.value for r in await _read(source, 0, 2)] == [b"1", b"2"]


async def test_a_file_that_shrank_is_a_clear_error(tmp_path: Path) -> None:
    _put(tmp_path, "a.txt", b"1\n2\n3\n")
    source = await _open(tmp_path)
    await source.latest()
    (tmp_path / "a.txt").write_bytes(b"1\n")
    with pytest.raises(SourceError, match=r"a\.txt .* is 2 bytes, shorter than the 6"):
        await _read(source, 2, 3)


async def test_a_file_rewritten_with_fewer_lines_is_an_error_not_a_short_batch(
    tmp_path: Path,
) -> None:
    _put(tmp_path, "a.txt", b"1\n2\n3\n")
    source = await _open(tmp_path)
    await source.latest()
    (tmp_path / "a.txt").write_bytes(b"1,2,3\n")  # the same size, one line
    with pytest.raises(SourceError, match="fewer lines"):
        await _read(source, 0, 3)


async def test_a_file_that_grew_is_read_up_to_its_recorded_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _put(tmp_path, "a.txt", b"1\n2\n")
    source = await _open(tmp_path)
    await source.latest()
    with (tmp_path / "a.txt").open("ab") as f:
        f.write(b"3\n")
    assert [r.value for r in await _read(source, 0, 2)] == [b"1", b"2"]
    assert "not as it was taken" in caplog.text


async def test_a_range_outside_the_manifest_is_refused(tmp_path: Path) -> None:
    _put(tmp_path, "a.txt", b"1\n")
    source = await _open(tmp_path)
    await source.latest()
    with pytest.raises(SourceError, match=r"no lines \[0, 5\)"):
        await _read(source, 0, 5)


async def test_a_state_ahead_of_the_manifest_is_refused(tmp_path: Path) -> None:
    _put(tmp_path, "a.txt", b"1\n")
    source = await _open(tmp_path)
    with pytest.raises(SourceError, match="past the end 0 of its manifest"):
        source.resume_from({0: 7})


async def test_a_manifest_of_another_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    manifest = tmp_path / "m.json"
    first = await _open(tmp_path / "a", manifest=manifest)
    _put(tmp_path / "a", "x", b"x\n")
    await first.latest()
    with pytest.raises(ConfigError, match="is of directory"):
        await _open(tmp_path / "b", manifest=manifest)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"order": "size"}, "order must be one of"),
        ({"complete": "quiet"}, "complete must be one of"),
        ({"format": "csv"}, "format must be one of"),
        ({"finished": "archive"}, "finished must be one of"),
        ({"chunk_size": 0}, "chunk_size must be"),
    ],
)
def test_bad_settings_are_config_errors(
    tmp_path: Path, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        DirectorySource(tmp_path, **settings)  # type: ignore[arg-type]


# -- finished files ---------------------------------------------------------------


@pytest.mark.parametrize("finished", ["move", "delete"])
async def test_finished_files_go_only_after_their_batch_is_done(
    tmp_path: Path, finished: str
) -> None:
    """commit() comes before ``done`` is logged; the files go at the next latest()."""
    _put(tmp_path, "a", b"1\n2\n")
    _put(tmp_path, "b", b"3\n")
    source = await _open(tmp_path, finished=finished)
    await source.latest()
    batch = [OffsetRange("files", 0, 0, 3)]
    await source.read(batch)
    await source.commit(batch)
    # A crash here (before_done) re-runs the batch: both files must still be there.
    assert (tmp_path / "a").exists()
    assert (tmp_path / "b").exists()
    await source.latest()  # the scheduler asks only after the batch is done
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()
    assert ((tmp_path / "done" / "a").exists()) == (finished == "move")
    manifest = orjson.loads((tmp_path / ".streamlet-files.json").read_bytes())
    assert (manifest["base"], manifest["files"]) == (3, [])
    # A new file goes on from there.
    _put(tmp_path, "a", b"4\n")
    assert await source.latest() == {0: 4}
    assert [r.value for r in await _read(source, 3, 4)] == [b"4"]


async def test_a_file_half_read_is_not_finished(tmp_path: Path) -> None:
    _put(tmp_path, "a", b"1\n2\n")
    source = await _open(tmp_path, finished="delete")
    await source.latest()
    await source.commit([OffsetRange("files", 0, 0, 1)])
    await source.latest()
    assert (tmp_path / "a").exists()


async def test_finishing_again_after_a_crash_is_not_an_error(tmp_path: Path) -> None:
    """Files moved before the crash, manifest not yet rewritten: the restart finishes them."""
    _put(tmp_path, "a", b"1\n")
    _put(tmp_path, "a.done", b"")
    source = await _open(tmp_path, finished="move", complete="marker")
    await source.latest()
    manifest = (tmp_path / ".streamlet-files.json").read_bytes()
    await source.commit([OffsetRange("files", 0, 0, 1)])
    await source.latest()
    assert sorted(os.listdir(tmp_path / "done")) == ["a", "a.done"]
    (tmp_path / ".streamlet-files.json").write_bytes(manifest)  # as before the crash
    restarted = await _open(tmp_path, finished="move", complete="marker")
    restarted.resume_from({0: 1})
    assert await restarted.latest() == {0: 1}
    assert orjson.loads((tmp_path / ".streamlet-files.json").read_bytes())["files"] == []


async def test_a_moved_file_a_pending_batch_needs_is_read_from_the_done_directory(
    tmp_path: Path,
) -> None:
    _put(tmp_path, "a", b"1\n")
    source = await _open(tmp_path, finished="move")
    await source.latest()
    (tmp_path / "done").mkdir()
    os.rename(tmp_path / "a", tmp_path / "done" / "a")
    assert [r.value for r in await _read(source, 0, 1)] == [b"1"]


async def test_a_new_state_directory_starts_after_the_finished_files(tmp_path: Path) -> None:
    _put(tmp_path, "a", b"1\n")
    source = await _open(tmp_path, finished="delete")
    await source.latest()
    await source.commit([OffsetRange("files", 0, 0, 1)])
    await source.latest()
    fresh = await _open(tmp_path, finished="delete")
    assert await fresh.start_positions([0]) == {0: 1}


@pytest.mark.parametrize("finished", ["move", "delete"])
async def test_a_new_file_that_took_a_finished_files_name_is_read_not_finished(
    tmp_path: Path, finished: str
) -> None:
    """A crash after the old file went, before the manifest said so; then a new one came."""
    _put(tmp_path, "data.csv", b"old\n")
    source = await _open(tmp_path, finished=finished)
    await source.latest()
    manifest = (tmp_path / ".streamlet-files.json").read_bytes()
    await source.commit([OffsetRange("files", 0, 0, 1)])
    await source.latest()
    assert not (tmp_path / "data.csv").exists()
    (tmp_path / ".streamlet-files.json").write_bytes(manifest)  # as before the crash
    _put(tmp_path, "data.csv", b"new 1\nnew 2\n")  # the old inode may be reused
    later = (tmp_path / "data.csv").stat().st_mtime_ns + 10**9
    os.utime(tmp_path / "data.csv", ns=(later, later))
    restarted = await _open(tmp_path, finished=finished)
    restarted.resume_from({0: 1})
    assert await restarted.latest() == {0: 3}
    assert (tmp_path / "data.csv").exists()
    assert [r.value for r in await _read(restarted, 1, 3)] == [b"new 1", b"new 2"]


async def test_a_file_put_back_after_it_was_gone_is_read_and_then_finished(
    tmp_path: Path,
) -> None:
    _put(tmp_path, "a.txt", b"1\n2\n")
    source = await _open(tmp_path, finished="delete")
    await source.latest()
    (tmp_path / "a.txt").unlink()
    with pytest.raises(SourceError, match="is gone"):
        await _read(source, 0, 2)
    _put(tmp_path, "a.txt", b"1\n2\n")
    later = (tmp_path / "a.txt").stat().st_mtime_ns + 10**9
    os.utime(tmp_path / "a.txt", ns=(later, later))  # another file; perhaps the same inode
    restarted = await _open(tmp_path, finished="delete")  # as after the failed run
    await restarted.latest()
    assert [r.value for r in await _read(restarted, 0, 2)] == [b"1", b"2"]
    again = await _open(tmp_path, finished="delete")  # the put-back file is in the manifest
    again.resume_from({0: 2})
    assert await again.latest() == {0: 2}
    assert not (tmp_path / "a.txt").exists()


async def test_a_finished_file_that_cannot_be_moved_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "done").write_bytes(b"a file where the directory should be")
    _put(tmp_path / "in", "a", b"1\n")
    source = await _open(tmp_path / "in", finished="move", done_dir=tmp_path / "done")
    await source.latest()
    await source.commit([OffsetRange("files", 0, 0, 1)])
    with pytest.raises(SourceError, match="cannot move its finished file"):
        await source.latest()
    assert (tmp_path / "in" / "a").exists()


async def test_a_directory_that_went_away_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    source = await _open(tmp_path / "in")
    (tmp_path / "in").rmdir()
    with pytest.raises(SourceError, match="cannot list its directory"):
        await source.latest()
