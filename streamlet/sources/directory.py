"""DirectorySource: a directory of files read as one replayable stream of lines.

Spark Streaming's ``textFileStream``, as a direct source: complete files that
appear in a directory are read line by line (or as JSON lines), and a batch
that runs again after a crash reads exactly the same bytes.

**Offsets.** The engine's offset range is ``(source, partition, start,
until)``, and its batch bounds, rate limits and backpressure count offsets
as records. So the files form one logical stream, partition 0, whose
offsets are line numbers: the source's own *manifest* lists the files in
the order they were taken, each with its first offset, its line count, its
size and its modification time. A logged range ``[start, until)`` therefore
names, through the manifest, a list of (file, lines) and so of (file, byte
range); the manifest only grows at its end, so a logged range keeps its
meaning. A record's value is its line without the ``\n``, its offset the
line's number in the stream, its key the file's name (UTF-8), its timestamp
the file's modification time when it was taken.

**The manifest** (``manifest=``; default ``<directory>/.streamlet-<source
name>.json``) is JSON, replaced atomically (temp file, fsync, rename,
directory fsync)::

    {"format": "streamlet.directory", "version": 1, "directory": <abs path>,
     "base": <first offset listed>, "finished": <offsets below are finished>,
     "files": [[name, first offset, lines, size, mtime_ns, inode, stamp], ...]}

``mtime_ns`` is the modification time when the file was taken (its records'
timestamp); ``inode`` and ``stamp`` (a modification time) are those of the
file as last seen, which tell it apart from a new file of the same name.

Invariant: a file is in the durable manifest before :meth:`latest` returns
an offset past its first line, so no range is logged over a file the
manifest does not hold.

**Complete files** (the convention writers must follow). A file is taken
when its name matches ``pattern``, it is a regular file directly in the
directory, its name does not start with ``.`` and ends neither with
``.tmp`` nor with ``.done``, and:

* ``complete="rename"`` (default): it is there. Writers write under a hidden
  or ``.tmp`` name (or elsewhere on the same file system) and rename the
  finished file into place; a rename is atomic.
* ``complete="marker"``: an empty marker ``<name>.done`` exists beside it.
  Writers write the file in place and create the marker when it is
  finished.

A complete file must not change afterwards. Each read checks the file
against the manifest: a file that is gone, shorter than when it was taken
or with fewer lines is a :class:`~streamlet.errors.SourceError` naming the
file and what to do, never a silent skip or a short batch; one that grew
is read up to its recorded size, with a warning.

**Finished files** (``finished=``): ``"keep"`` leaves them (the manifest
then remembers every name, and a name is read once); ``"move"`` renames a
file and its marker into ``done_dir`` (default ``<directory>/done``);
``"delete"`` removes them. Either happens only once every batch that read
the file's lines is done (``done`` logged): the scheduler calls
:meth:`commit` after a batch's sinks committed and before its ``done`` is
logged, and plans the next batch only after that, so the source finishes
the files below the last committed range at the next :meth:`latest`, and
on a restart those below the recovered position (:meth:`resume_from`). A
file already moved or deleted (a crash before the manifest was rewritten)
is not an error, and a new file that took its name meanwhile is told apart
by its inode and modification time, left, and read as new. A moved file that a pending batch still
needs is read from ``done_dir``; a file put back after it was gone becomes
the file its lines are read from, and the one finished. ``done_dir`` must
be on the directory's file system (files are renamed into it), and a file
there of the same name is replaced.
"""

from __future__ import annotations

import bisect
import fnmatch
import logging
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiofiles
import aiofiles.os
import anyio
import orjson
from aiofiles.threadpool.binary import AsyncFileIO

from streamlet.errors import ConfigError, SourceError
from streamlet.fs import OsFileSystem, read_all, write_atomic
from streamlet.records import OffsetRange, Record
from streamlet.sources.base import DirectSource

__all__ = ["DirectorySource"]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "streamlet.directory"
MANIFEST_VERSION = 1
MARKER_SUFFIX = ".done"
TEMP_SUFFIX = ".tmp"
CHUNK = 1 << 20
"""Bytes read at a time; a read never holds a whole file, only a batch's lines."""

READERS = 16
"""Files read at once when a batch spans several."""

_new_tuple = tuple.__new__  # Record(...) costs a Python call per line


def _mark(marks: list[tuple[int, int]], line: int, byte: int) -> None:
    """Note that ``line`` starts at ``byte`` (``marks`` stays sorted and without repeats)."""
    at = bisect.bisect_left(marks, (line, byte))
    if at == len(marks) or marks[at] != (line, byte):
        marks.insert(at, (line, byte))


@dataclass(slots=True)
class _File:
    """One manifest entry: a complete file and where its lines sit in the stream."""

    name: str
    first: int
    """Offset of the file's first line in the stream."""
    lines: int
    size: int
    mtime_ns: int
    """Modification time when taken: the records' timestamp."""
    ino: int
    stamp: int
    """Inode and modification time as last seen: which file of that name it is."""
    marks: list[tuple[int, int]] = field(default_factory=list)
    """Known line starts, ``(line within the file, byte)``, sorted; not stored."""

    @property
    def end(self) -> int:
        """The offset one past the file's last line."""
        return self.first + self.lines

    def to_json(self) -> list[Any]:
        return [self.name, self.first, self.lines, self.size, self.mtime_ns, self.ino, self.stamp]

    def same(self, st: os.stat_result) -> bool:
        """Whether ``st`` is of this file (rather than another of its name)."""
        return st.st_ino == self.ino and st.st_mtime_ns == self.stamp


def _count_lines(path: str, size: int, ino: int, chunk: int) -> tuple[int, list[tuple[int, int]]]:
    """Lines in the first ``size`` bytes of ``path`` and a line start every ``chunk`` bytes.

    A last line without a newline counts. Blocking: run in a worker thread.

    Raises:
        FileNotFoundError: ``path`` is gone, or is no longer inode ``ino``.
        OSError: the file cannot be read, or it is shorter than ``size``.
    """
    marks = [(0, 0)]
    lines = 0
    pos = 0
    last = 0x0A
    buffer = bytearray(min(chunk, size))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_ino != ino:
            raise FileNotFoundError(f"{path} was replaced since it was listed")
        while pos < size:
            n = f.readinto(view[: min(chunk, size - pos)])
            if not n:
                raise OSError(f"{path} ended at byte {pos}, before its size {size}")
            count = buffer.count(b"\n", 0, n)
            if count:
                lines += count
                marks.append((lines, pos + buffer.rfind(b"\n", 0, n) + 1))
            pos += n
            last = buffer[n - 1]
    if last != 0x0A:  # a last line without its newline
        lines += 1
    if marks[-1][1] >= size:
        marks.pop()  # the end of the file is no line's start
    return lines, marks


@dataclass(slots=True)
class _Spill:
    """Lines a read split past its range's end, kept for the next range of that file."""

    file: _File
    line: int
    """Number (within the file) of ``lines[0]``."""
    lines: list[bytes]
    carry: bytes
    """The bytes after the last of ``lines``: part of a line."""
    pos: int
    """Where in the file the bytes after ``carry`` begin."""


@dataclass(slots=True)
class _Candidate:
    name: str
    size: int
    mtime_ns: int
    ino: int


def _complete(directory: str, pattern: str, marker: bool, known: set[str]) -> list[_Candidate]:
    """The complete files in ``directory`` not in ``known``; blocking (a worker thread)."""
    names: set[str] = set()
    found: list[_Candidate] = []
    entries = list(os.scandir(directory))
    if marker:
        names = {e.name for e in entries}
    for entry in entries:
        name = entry.name
        if (
            name in known
            or name.startswith(".")
            or name.endswith((TEMP_SUFFIX, MARKER_SUFFIX))
            or not fnmatch.fnmatchcase(name, pattern)
        ):
            continue
        if marker and name + MARKER_SUFFIX not in names:
            continue
        try:
            st = entry.stat(follow_symlinks=True)
        except FileNotFoundError:
            continue  # gone between listing and stat: it was not ours yet
        if not stat.S_ISREG(st.st_mode):
            continue
        found.append(_Candidate(name, st.st_size, st.st_mtime_ns, st.st_ino))
    return found


class DirectorySource(DirectSource):
    """Complete files of a directory, as lines or JSON lines, replayable by offset.

    See the module docstring for the offsets, the manifest, the convention
    that makes a file complete and what happens to finished files.

    Args:
        directory: the directory to watch (not its subdirectories).
        pattern: a glob the file names must match (``fnmatch``, case-sensitive).
        order: how files found in one scan are ordered: ``"name"`` or
            ``"mtime"`` (modification time, then name). A file found in a
            later scan always comes after those already taken.
        complete: ``"rename"`` (a file is complete once it is in the
            directory) or ``"marker"`` (once ``<name>.done`` exists).
        format: ``"lines"`` (a record per line, its value without the
            ``\\n``) or ``"jsonl"`` (the same, with ``data`` the decoded JSON;
            blank lines are skipped, their offsets unused).
        finished: ``"keep"``, ``"move"`` (into ``done_dir``) or ``"delete"``.
        done_dir: where ``finished="move"`` puts files; default
            ``<directory>/done``.
        manifest: the manifest's path; default
            ``<directory>/.streamlet-<source name>.json``. It belongs with the
            app's state directory: back them up together.
        chunk_size: bytes read at a time.
        name: the source's name in the app.
        max_rate: the most lines per second a batch takes (see
            :class:`~streamlet.sources.base.DirectSource`).

    Raises:
        ConfigError: a setting is not one of the above.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        pattern: str = "*",
        order: Literal["name", "mtime"] = "name",
        complete: Literal["rename", "marker"] = "rename",
        format: Literal["lines", "jsonl"] = "lines",
        finished: Literal["keep", "move", "delete"] = "keep",
        done_dir: str | os.PathLike[str] | None = None,
        manifest: str | os.PathLike[str] | None = None,
        chunk_size: int = CHUNK,
        name: str | None = None,
        max_rate: float | None = None,
    ) -> None:
        super().__init__(name=name, max_rate=max_rate)
        for setting, value, allowed in (
            ("order", order, ("name", "mtime")),
            ("complete", complete, ("rename", "marker")),
            ("format", format, ("lines", "jsonl")),
            ("finished", finished, ("keep", "move", "delete")),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"DirectorySource {setting} must be one of {', '.join(allowed)}, not {value!r}"
                )
        if chunk_size < 1:
            raise ConfigError(f"DirectorySource chunk_size must be >= 1, not {chunk_size!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.pattern = pattern
        self.order = order
        self.complete = complete
        self.format = format
        self.finished = finished
        self.done_dir = (
            os.path.abspath(os.fspath(done_dir))
            if done_dir is not None
            else os.path.join(self.directory, "done")
        )
        self._manifest_path = os.path.abspath(os.fspath(manifest)) if manifest else None
        self.chunk_size = chunk_size
        self._fs = OsFileSystem()
        self._files: list[_File] = []
        self._firsts: list[int] = []
        self._names: set[str] = set()
        self._base = 0
        #: Offsets below this are of batches that are done, and their files finished.
        self._finished = 0
        #: The end of the last range a batch committed (its ``done`` follows).
        self._committed = 0
        self._spill: _Spill | None = None
        #: keep: the files before this one are done, their line starts let go.
        self._kept = 0
        #: A file was put back under another inode: the manifest must say so.
        self._adopted = False

    # -- the manifest -------------------------------------------------------------

    @property
    def manifest_path(self) -> str:
        """Where the manifest is (known once the source has its name)."""
        if self._manifest_path is not None:
            return self._manifest_path
        return os.path.join(self.directory, f".streamlet-{self.name or 'directory'}.json")

    @property
    def end(self) -> int:
        """The offset one past the last line of the files taken so far."""
        return self._files[-1].end if self._files else self._base

    def _load(self) -> None:
        path = self.manifest_path
        if not os.path.exists(path):
            return
        try:
            body = orjson.loads(read_all(self._fs, path))
            kind = (body.get("format"), body.get("version"))
            files = [
                _File(str(n), int(f), int(c), int(s), int(m), int(i), int(t))
                for n, f, c, s, m, i, t in body["files"]
            ]
            base, finished = int(body["base"]), int(body["finished"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SourceError(
                f"the manifest {path} of source {self.name!r} cannot be read ({exc}); restore"
                " it from the backup of the state directory, or remove it together with the"
                " state directory to read the directory afresh"
            ) from exc
        if kind != (MANIFEST_FORMAT, MANIFEST_VERSION):
            raise SourceError(
                f"the manifest {path} of source {self.name!r} is {kind[0]!r} version"
                f" {kind[1]!r}, not {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}: it was"
                " written by another program or a newer streamlet"
            )
        if body.get("directory") != self.directory:
            raise ConfigError(
                f"the manifest {path} is of directory {body.get('directory')!r}, not"
                f" {self.directory!r}; give each directory a manifest of its own"
            )
        self._files, self._base, self._finished = files, base, finished
        self._firsts = [f.first for f in files]
        self._names = {f.name for f in files}

    def _body(self) -> bytes:
        return orjson.dumps(
            {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "directory": self.directory,
                "base": self._base,
                "finished": self._finished,
                "files": [f.to_json() for f in self._files],
            }
        )

    async def _save(self) -> None:
        body = self._body()
        await anyio.to_thread.run_sync(write_atomic, self._fs, self.manifest_path, body)

    # -- the DirectSource contract ----------------------------------------------

    async def start(self) -> None:
        """Check the directory and load the manifest.

        Raises:
            ConfigError: the directory does not exist.
            SourceError: the manifest cannot be read.
        """
        if not await aiofiles.os.path.isdir(self.directory):
            raise ConfigError(f"DirectorySource directory {self.directory} is not a directory")
        await anyio.to_thread.run_sync(self._load)
        self._committed = self._finished

    async def start_positions(self, partitions: Iterable[int]) -> Mapping[int, int]:
        """A new state directory starts after the files already finished (moved or deleted)."""
        return dict.fromkeys(partitions, self._base)

    def resume_from(self, positions: Mapping[int, int]) -> None:
        """Note where the next batch starts: every batch below it is done.

        Raises:
            SourceError: the state directory is ahead of the manifest (the
                manifest was lost or replaced).
        """
        position = positions.get(0, self._base)
        if position > self.end:
            raise SourceError(
                f"the state of source {self.name!r} is at line {position}, past the end"
                f" {self.end} of its manifest {self.manifest_path}: the manifest was lost or"
                " replaced. Restore it with the state directory, or start with a new"
                " state_dir and no manifest"
            )
        self._committed = max(self._committed, position)

    async def latest(self) -> Mapping[int, int]:
        """Finish files every done batch has read, take new complete files, and say the end.

        New files are in the durable manifest before this returns.
        """
        await self._finish(self._committed)
        try:
            found = await anyio.to_thread.run_sync(
                _complete, self.directory, self.pattern, self.complete == "marker", self._names
            )
        except OSError as exc:
            raise SourceError(
                f"source {self.name!r} cannot list its directory {self.directory}: {exc}"
            ) from exc
        if found:
            if self.order == "mtime":
                found.sort(key=lambda c: (c.mtime_ns, c.name))
            else:
                found.sort(key=lambda c: c.name)
            await self._take(found)
        return {0: self.end}

    async def commit(self, ranges: Sequence[OffsetRange]) -> None:
        """A batch's sinks committed; its files are finished after its ``done``."""
        for r in ranges:
            self._committed = max(self._committed, r.until)

    async def read(self, ranges: Sequence[OffsetRange]) -> list[Record]:
        """Exactly the lines of ``ranges``, read back from their files in chunks.

        Raises:
            SourceError: a file a range needs is gone or shorter than when it
                was taken, a range is outside the manifest, or (``jsonl``) a
                line is not JSON.
        """
        pieces: list[tuple[_File, int, int]] = []
        for r in ranges:
            if r.partition != 0 or r.start < self._base or r.until > self.end:
                raise SourceError(
                    f"source {self.name!r} has no lines [{r.start}, {r.until}) of partition"
                    f" {r.partition}: its manifest {self.manifest_path} holds lines"
                    f" [{self._base}, {self.end}) of partition 0. The manifest does not"
                    " belong with this state directory; restore the two together"
                )
            index = max(0, bisect.bisect_right(self._firsts, r.start) - 1)
            while index < len(self._files) and self._files[index].first < r.until:
                file = self._files[index]
                lo = max(r.start, file.first) - file.first
                hi = min(r.until, file.end) - file.first
                if hi > lo:
                    pieces.append((file, lo, hi))
                index += 1
        if len(pieces) == 1:
            out: list[Record] = []
            await self._read_lines(*pieces[0], out)
        else:
            out = await self._read_pieces(pieces)
        if self._adopted:
            self._adopted = False
            await self._save()
        return out

    async def _read_pieces(self, pieces: list[tuple[_File, int, int]]) -> list[Record]:
        """Read ``(file, lo, hi)`` pieces, :data:`READERS` files at a time, in order.

        Many files (small ones, mostly) are read several at a time, since each
        open, read and close waits for a worker thread.
        """
        parts: list[list[Record]] = [[] for _ in pieces]
        failed: list[Exception] = []
        limiter = anyio.CapacityLimiter(READERS)

        async def read_piece(at: int, scope: anyio.CancelScope) -> None:
            async with limiter:
                try:
                    await self._read_lines(*pieces[at], parts[at])
                except Exception as exc:
                    # Raised as itself below, not in an exception group.
                    failed.append(exc)
                    scope.cancel()

        async with anyio.create_task_group() as tg:
            for at in range(len(pieces)):
                tg.start_soon(read_piece, at, tg.cancel_scope)
        if failed:
            raise failed[0]
        return [record for part in parts for record in part]

    def describe(self) -> str:
        return f"DirectorySource({self.directory})"

    # -- taking and finishing files ------------------------------------------------

    async def _take(self, found: list[_Candidate]) -> None:
        """Count the new files' lines and add them to the durable manifest, in order."""
        chunk = self.chunk_size

        def count_all() -> list[_File]:
            taken: list[_File] = []
            first = self.end
            for c in found:
                path = os.path.join(self.directory, c.name)
                try:
                    lines, marks = _count_lines(path, c.size, c.ino, chunk)
                except FileNotFoundError:
                    continue  # moved away before it was taken: not ours
                except OSError as exc:
                    raise SourceError(
                        f"source {self.name!r} cannot read the new file {path}: {exc}. A"
                        " complete file must not change; see DirectorySource's convention"
                    ) from exc
                taken.append(
                    _File(c.name, first, lines, c.size, c.mtime_ns, c.ino, c.mtime_ns, marks)
                )
                first += lines
            return taken

        taken = await anyio.to_thread.run_sync(count_all)
        if not taken:
            return
        self._files.extend(taken)
        self._firsts.extend(f.first for f in taken)
        self._names.update(f.name for f in taken)
        # Invariant: the manifest is durable before latest() reports these lines.
        await self._save()
        log.info("source %r took %d file(s), lines up to %d", self.name, len(taken), self.end)

    async def _finish(self, upto: int) -> None:
        """Move or delete the files wholly below ``upto``, whose batches are all done."""
        if upto <= self._finished:
            return
        if self.finished == "keep":
            # Kept files stay listed (their names are read once); only the
            # line starts of those whose batches are done are let go.
            while self._kept < len(self._files) and self._files[self._kept].end <= upto:
                self._files[self._kept].marks = []
                self._kept += 1
            self._finished = upto
            return
        done = [f for f in self._files if f.end <= upto]
        if not done:
            return
        try:
            await anyio.to_thread.run_sync(self._finish_files, done)
        except OSError as exc:
            verb = "move" if self.finished == "move" else "delete"
            raise SourceError(
                f"source {self.name!r} cannot {verb} its finished file(s) in {self.directory}:"
                f" {exc}. The directory must be writable, and done_dir ({self.done_dir}) on"
                " its file system; the files go once this is fixed, and are not read again"
            ) from exc
        self._files = self._files[len(done) :]
        self._firsts = self._firsts[len(done) :]
        self._names.difference_update(f.name for f in done)
        self._base = done[-1].end
        self._finished = self._base
        await self._save()

    def _finish_files(self, files: list[_File]) -> None:
        """Rename or remove ``files`` and their markers, then sync; blocking."""
        if self.finished == "move":
            os.makedirs(self.done_dir, exist_ok=True)
        for f in files:
            path = os.path.join(self.directory, f.name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                # Moved or removed already: by a run that crashed before it
                # rewrote the manifest (or by hand, once it was finished).
                continue
            if not f.same(st):
                # Another file of that name came after this one was finished
                # and moved or removed, before the manifest was rewritten (or
                # the file was changed, against the convention): it is left,
                # and read as a new file.
                log.warning(
                    "file %s is not the file of that name whose lines were read (another"
                    " inode or modification time): it is left in place and read as a new file",
                    path,
                )
                continue
            # The marker first: a marker left without its file is a new file's.
            names = ([f.name + MARKER_SUFFIX] if self.complete == "marker" else []) + [f.name]
            for name in names:
                source = os.path.join(self.directory, name)
                try:
                    if self.finished == "move":
                        os.rename(source, os.path.join(self.done_dir, name))
                    else:
                        os.remove(source)
                except FileNotFoundError:
                    continue
        self._fs.sync_dir(self.directory)
        if self.finished == "move":
            self._fs.sync_dir(self.done_dir)

    # -- reading -------------------------------------------------------------------

    async def _open_file(self, file: _File) -> tuple[str, AsyncFileIO]:
        """The file holding ``file``'s lines now, open and checked against the manifest.

        The file itself (its inode) where it is, in the directory or in
        ``done_dir``; else a file put back under its name, which becomes the
        file (the error below says to put it back).
        """
        path = os.path.join(self.directory, file.name)
        paths = [path]
        if self.finished == "move":
            paths.append(os.path.join(self.done_dir, file.name))
        chosen: tuple[str, AsyncFileIO, os.stat_result] | None = None
        for candidate in paths:
            try:
                f = await aiofiles.open(candidate, "rb", buffering=0)
            except FileNotFoundError:
                continue
            st = os.fstat(f.fileno())  # of the open file: no race with a rename
            if chosen is None or file.same(st):
                if chosen is not None:
                    await chosen[1].close()
                chosen = (candidate, f, st)
            else:
                await f.close()
            if file.same(st):
                break
        if chosen is None:
            raise SourceError(
                f"file {path} of source {self.name!r} is gone, and its lines"
                f" [{file.first}, {file.end}) are needed by a batch that is not done. Put"
                f" the file back ({file.size} bytes) for the batch to run again; a missing"
                " file is never skipped"
            )
        candidate, f, st = chosen
        if st.st_size < file.size:
            await f.close()
            raise SourceError(
                f"file {candidate} of source {self.name!r} is {st.st_size} bytes,"
                f" shorter than the {file.size} it had when it was taken (lines"
                f" [{file.first}, {file.end})): a complete file must not change. Put"
                " back the file as it was for the batch to run again; its lines"
                " cannot be skipped"
            )
        if not file.same(st) or st.st_size > file.size:
            log.warning(
                "file %s of source %r is not as it was taken (put back, or changed);"
                " reading its first %d bytes as recorded",
                candidate,
                self.name,
                file.size,
            )
        if not file.same(st):
            # Put back after it was gone: the file now, and the one to move or
            # delete once it is finished.
            file.ino, file.stamp = st.st_ino, st.st_mtime_ns
            self._adopted = True
        return candidate, f

    async def _read_lines(self, file: _File, lo: int, hi: int, out: list[Record]) -> None:
        """Append lines ``[lo, hi)`` of ``file`` (numbered within it) to ``out``."""
        path, f = await self._open_file(file)
        try:
            await self._read_open(f, path, file, lo, hi, out)
        finally:
            await f.close()

    async def _read_open(
        self, f: AsyncFileIO, path: str, file: _File, lo: int, hi: int, out: list[Record]
    ) -> None:
        size = file.size
        spill = self._spill
        lines: list[bytes] = []
        if spill is not None and spill.file is file and spill.line == lo:
            # The last read split these lines already: go on from them.
            self._spill = None
            line, lines, carry, pos = spill.line, spill.lines, spill.carry, spill.pos
        else:
            # The nearest known line start at or before `lo`; the file's start else.
            at = bisect.bisect_right(file.marks, (lo, size)) - 1
            line, pos = file.marks[at] if at >= 0 else (0, 0)
            carry = b""
        key = file.name.encode()
        ts = file.mtime_ns / 1e9
        name = self.name
        first = file.first
        jsonl = self.format == "jsonl"
        positioned = pos == 0
        while line < hi:
            if lines:
                pass  # from the spill
            elif pos < size:
                if not positioned:
                    await f.seek(pos)
                    positioned = True
                data = await f.read(min(self.chunk_size, size - pos))
                if not data:
                    break  # shorter than recorded: reported below
                pos += len(data)
                lines = (carry + data if carry else data).split(b"\n")
                carry = lines.pop()
            elif carry:
                lines = [carry]  # the last line, without a newline
                carry = b""
            else:
                break
            count = len(lines)
            start = max(0, lo - line)
            stop = min(count, hi - line)
            if stop > start:
                if jsonl:
                    self._decode_json(lines, start, stop, line, file, path, key, ts, out)
                else:
                    base = first + line
                    part = lines if start == 0 and stop == count else lines[start:stop]
                    out.extend(
                        [
                            _new_tuple(Record, (v, key, ts, name, 0, base + i, None, ()))
                            for i, v in enumerate(part, start)
                        ]
                    )
            if line < hi <= line + count and hi < file.lines:
                # Line `hi` is where the next batch starts: mark where it is,
                # and keep what was split past it for that batch.
                rest = lines[hi - line :]
                _mark(file.marks, hi, pos - len(carry) - sum(len(v) + 1 for v in rest))
                self._spill = _Spill(file, hi, rest, carry, pos)
            line += count
            lines = []
        if line < hi:
            raise SourceError(
                f"file {path} of source {self.name!r} has fewer lines than the {file.lines}"
                f" it had when it was taken (line {line} of it is missing): it changed"
                " after it was complete. Put back the file as it was for the batch to run"
                " again; its lines cannot be skipped"
            )

    def _decode_json(
        self,
        lines: list[bytes],
        start: int,
        stop: int,
        line: int,
        file: _File,
        path: str,
        key: bytes,
        ts: float,
        out: list[Record],
    ) -> None:
        for i in range(start, stop):
            value = lines[i]
            if not value.strip():
                continue
            try:
                data = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise SourceError(
                    f"line {line + i + 1} of {path} (offset {file.first + line + i} of source"
                    f" {self.name!r}) is not JSON: {exc}. Use format='lines' with"
                    " app.source(..., decode=orjson.loads) and a dead_letter sink to set such"
                    " lines aside"
                ) from exc
            out.append(
                _new_tuple(Record, (value, key, ts, self.name, 0, file.first + line + i, data, ()))
            )
