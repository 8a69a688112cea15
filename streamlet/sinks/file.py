"""FileSink: each batch's outputs in one file, committed by an atomic rename.

Layout of a sink directory (format version 1)::

    .streamlet-sink.json           marker: the app and handler that own the directory
    part-000000000007.jsonl        outputs of batch 7, one encoded output per line
    .part-000000000008.jsonl.tmp   a commit in progress, or the leftover of a crash

A part file holds each output as ``encode(output)`` followed by ``b"\\n"``; a
batch without outputs has an empty part file, which still marks it
committed. An encoded output that contains ``b"\\n"`` is refused, because it
would read back as two outputs; the JSON that :func:`encode_output` makes
never contains one. Batch ids have at least 12 digits, so names sort in batch
order.

Commit of batch N, in one worker-thread call:

1. ``part-N.jsonl`` exists: the batch was committed before; do nothing.
2. write ``.part-N.jsonl.tmp``, fsync it, rename it to ``part-N.jsonl``,
   fsync the directory.

Invariant: a part file is complete or absent, never partial. The rename is
the commit point and comes only after the data is durable; temp files are
hidden (leading dot) from ``part-*`` globs and deleted on :meth:`FileSink.open`.
Open also fsyncs the directory, so a part file renamed just before a crash
is durable before any later batch can be marked done.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Sequence

import anyio
import anyio.to_thread
import orjson

from streamlet._faults import file_system
from streamlet.errors import ConfigError, OutputError, SinkError, SinkUnavailableError
from streamlet.fs import File, FileSystem, OsFileSystem, read_all, write_atomic
from streamlet.records import Batch
from streamlet.sinks.base import Sink, SinkContext, encode_output

__all__ = ["MARKER", "FileSink"]

log = logging.getLogger(__name__)

MARKER = ".streamlet-sink.json"
"""Name of the file that records which app and handler own a sink directory."""
MARKER_FORMAT = "streamlet.file-sink"
MARKER_VERSION = 1

_MARKER_TEMP = MARKER + ".tmp"
_PART = re.compile(r"^part-(\d{12,})\.jsonl$")
_PART_TEMP = re.compile(r"^\.part-\d{12,}\.jsonl\.tmp$")
_NEWLINE = b"\n"


def _part_name(batch_id: int) -> str:
    return f"part-{batch_id:012d}.jsonl"


def _is_temp(name: str) -> bool:
    return name == _MARKER_TEMP or _PART_TEMP.match(name) is not None


def _io_error(message: str) -> SinkUnavailableError:
    """A failed file operation of a commit: tried again, with a new temp file.

    Retrying is safe because nothing of the batch is visible until the
    rename; a failed fsync of the directory is the exception (never retried).
    """
    return SinkUnavailableError(message)


def _advice(exc: OSError) -> str:
    """What the user can do about an I/O error, by errno."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space on it; the batch is written again when retried"
    if exc.errno == errno.EIO:
        return (
            "the disk reported an I/O error: check the device (kernel log) before restarting;"
            " the batch is not committed and runs again on restart"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the directory is not writable: fix its permissions or mount"
    return "check the directory and the disk; the batch is not committed"


class FileSink(Sink):
    """Writes each batch's outputs to one file, exactly once per batch id.

    Exactly-once holds with a replayable (direct) source or a WAL'd
    receiver: a re-run of a batch after a crash finds its part file and
    skips it, keeping the outputs of the first successful run.

    Args:
        directory: the output directory, created (mode 0700) on open. One
            directory serves one handler of one app; a marker file enforces it.
        fs: the file layer; the real file system by default.
        encode: turns one output into the bytes of one line; must not
            produce ``b"\\n"``. Defaults to :func:`encode_output`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fs: FileSystem | None = None,
        encode: Callable[[object], bytes] = encode_output,
    ) -> None:
        self._directory = os.fspath(directory)
        # The real file system, unless STREAMLET_FAULT_FS asks for injected faults.
        self._fs: FileSystem = fs if fs is not None else file_system()
        self._encode = encode
        self._context: SinkContext | None = None
        # Serializes commits of this sink; the scheduler commits in order anyway.
        self._lock = anyio.Lock()
        # Set when a directory fsync failed: what is durable is unknown, and
        # a retry could report a lost file as committed (see the WAL's rule).
        self._broken: str | None = None

    @property
    def directory(self) -> str:
        """The output directory (absolute once the sink is open)."""
        return self._directory

    async def open(self, context: SinkContext) -> None:
        """Create or check the directory, remove crash leftovers, fsync it.

        Raises:
            ConfigError: the directory belongs to another app or handler,
                holds files that are not this sink's, or cannot be created.
            SinkError: an I/O error while preparing the directory.
        """
        self._directory = await anyio.to_thread.run_sync(self._open_sync, context)
        self._context = context
        self._broken = None

    def _open_sync(self, context: SinkContext) -> str:
        fs = self._fs
        directory = os.path.abspath(self._directory)
        try:
            fs.makedirs(directory)
            names = fs.listdir(directory)
        except (NotADirectoryError, FileExistsError, PermissionError) as exc:
            raise ConfigError(
                f"FileSink of handler {context.handler!r} cannot use {directory}: {exc};"
                " choose another directory or fix its permissions"
            ) from exc
        except OSError as exc:
            raise SinkError(
                f"FileSink of handler {context.handler!r} cannot prepare {directory}: {exc};"
                f" {_advice(exc)}"
            ) from exc
        try:
            # The marker is checked before anything is removed: the temp files
            # of a directory that belongs to someone else are not ours to delete.
            if MARKER in names:
                self._check_marker(directory, context)
            else:
                others = [name for name in names if not _is_temp(name)]
                if others:
                    shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
                    raise ConfigError(
                        f"FileSink directory {directory} is not empty ({shown}) and has no"
                        f" {MARKER} marker, so it is not a streamlet sink directory; choose a"
                        " new or empty directory for the outputs of handler"
                        f" {context.handler!r}"
                    )
            removed = [name for name in names if _is_temp(name)]
            for name in removed:
                fs.remove(os.path.join(directory, name))
            if removed:
                log.info(
                    "FileSink %s: removed %d temp file(s) left by an interrupted commit",
                    directory,
                    len(removed),
                )
            if MARKER not in names:
                self._write_marker(directory, context)
            # Makes the entries renamed before a crash durable before the
            # scheduler goes on: the process died, the page cache did not.
            fs.sync_dir(directory)
        except OSError as exc:
            raise SinkError(
                f"FileSink of handler {context.handler!r} cannot prepare {directory}: {exc};"
                f" {_advice(exc)}"
            ) from exc
        return directory

    def _check_marker(self, directory: str, context: SinkContext) -> None:
        path = os.path.join(directory, MARKER)
        try:
            found = orjson.loads(read_all(self._fs, path))
        except orjson.JSONDecodeError as exc:
            raise ConfigError(
                f"{path} is not valid JSON ({exc}); the sink directory is damaged:"
                " restore the marker or choose a new directory"
            ) from None
        if not isinstance(found, dict) or found.get("format") != MARKER_FORMAT:
            raise ConfigError(
                f"{path} is not a streamlet FileSink marker; choose another directory"
            )
        if found.get("version") != MARKER_VERSION:
            raise ConfigError(
                f"{path}: FileSink format version {found.get('version')!r} is not readable by"
                f" this streamlet (reads version {MARKER_VERSION})"
            )
        if found.get("state_id") and context.state_id and found["state_id"] != context.state_id:
            raise ConfigError(
                f"FileSink directory {directory} was written under another state directory"
                f" (id {found['state_id']}, see {path}); this app's state_dir {context.state_dir}"
                f" has id {context.state_id}. Batch ids restart with a new state directory, so"
                " its batches would be taken for ones already written and skipped. Restore the"
                " original state_dir, or give the outputs a new directory"
            )
        if found.get("app") != context.app or found.get("handler") != context.handler:
            raise ConfigError(
                f"FileSink directory {directory} holds the outputs of app {found.get('app')!r},"
                f" handler {found.get('handler')!r} (see {path}), not of app {context.app!r},"
                f" handler {context.handler!r}. Give each handler its own output directory;"
                " delete the old directory only if its outputs are no longer wanted"
            )

    def _write_marker(self, directory: str, context: SinkContext) -> None:
        fs = self._fs
        body = orjson.dumps(
            {
                "format": MARKER_FORMAT,
                "version": MARKER_VERSION,
                "app": context.app,
                "handler": context.handler,
                "state_id": context.state_id,
            },
            option=orjson.OPT_INDENT_2,
        )
        # open() fsyncs the directory once, after this and the cleanup.
        write_atomic(
            fs,
            os.path.join(directory, MARKER),
            body + _NEWLINE,
            temp=os.path.join(directory, _MARKER_TEMP),
            sync_dir=False,
        )

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        """Write ``outputs`` as ``part-<batch id>.jsonl`` unless that file exists.

        Encoding and all file operations run in one worker-thread call. If
        the caller is cancelled, the call still finishes (a thread cannot be
        stopped) and the cancellation is delivered afterwards; the batch is
        then committed or not, and a re-run sorts it out.

        Returns:
            True if this call wrote the batch, False if it was committed before.

        Raises:
            SinkError: an output cannot be encoded or contains a newline, or
                the file could not be made durable; no part file of the batch
                is visible then.
        """
        context = self._context
        if context is None:
            raise SinkError(f"FileSink {self._directory} was not opened; call open() first")
        async with self._lock:
            if self._broken is not None:
                raise SinkError(self._broken)
            return await anyio.to_thread.run_sync(self._commit_sync, context, batch, outputs)

    def _encode_all(self, context: SinkContext, batch_id: int, outputs: Sequence[object]) -> bytes:
        lines: list[bytes] = []
        for index, output in enumerate(outputs):
            try:
                line = self._encode(output)
            except Exception as exc:
                raise OutputError(
                    f"output {index} of handler {context.handler!r} in batch {batch_id} cannot"
                    f" be encoded for {self._directory}: {exc!r}; return bytes, str or"
                    " JSON-serializable values, or give FileSink an encode function"
                ) from exc
            if _NEWLINE in line:
                raise OutputError(
                    f"output {index} of handler {context.handler!r} in batch {batch_id}"
                    f" contains a newline; {self._directory} stores one output per line."
                    " Split it into several outputs, or give FileSink an encode function"
                    " that escapes newlines (JSON does)"
                )
            lines.append(line)
            lines.append(_NEWLINE)
        return b"".join(lines)

    def _commit_sync(self, context: SinkContext, batch: Batch, outputs: Sequence[object]) -> bool:
        fs = self._fs
        directory = self._directory
        final = os.path.join(directory, _part_name(batch.id))
        temp = os.path.join(directory, "." + _part_name(batch.id) + ".tmp")
        where = f"batch {batch.id} of handler {context.handler!r}"
        try:
            if fs.exists(final):
                return False
        except OSError as exc:
            raise _io_error(f"cannot check {final} for {where}: {exc}; {_advice(exc)}") from exc
        data = self._encode_all(context, batch.id, outputs)
        try:
            # A temp file here is from an earlier attempt of this process that failed.
            if fs.exists(temp):
                fs.remove(temp)
            file = fs.create(temp)
        except OSError as exc:
            raise _io_error(f"cannot create {temp} for {where}: {exc}; {_advice(exc)}") from exc
        try:
            self._write(file, data)
            fs.rename(temp, final)
        except OSError as exc:
            self._discard(temp)
            raise _io_error(f"cannot write {final} for {where}: {exc}; {_advice(exc)}") from exc
        try:
            fs.sync_dir(directory)
        except OSError as exc:
            # The part file is complete but its entry may not survive a power
            # loss. Take it back so that nobody counts it as committed, and
            # refuse further commits: fsync is never retried and trusted.
            self._discard(final)
            self._broken = (
                f"FileSink {directory} stopped after fsync of the directory failed while"
                f" committing {where}: {exc}. What reached the disk is unknown; check the"
                " device, then restart the app: unfinished batches run again"
            )
            raise SinkError(self._broken) from exc
        return True

    @staticmethod
    def _write(file: File, data: bytes) -> None:
        try:
            if data:
                file.append(data)
            file.sync()
        finally:
            file.close()

    def _discard(self, path: str) -> None:
        try:
            self._fs.remove(path)
        except OSError as exc:
            # Not fatal: a leftover temp is removed on the next open, and a
            # leftover part file is complete.
            log.warning("FileSink could not remove %s after a failed commit: %s", path, exc)

    async def last_committed(self) -> int | None:
        """The newest batch id with a part file in the directory (0: none)."""
        return await anyio.to_thread.run_sync(self._last_committed_sync)

    def _last_committed_sync(self) -> int:
        found = [int(m.group(1)) for m in map(_PART.match, self._fs.listdir(self._directory)) if m]
        return max(found, default=0)

    @classmethod
    def read_committed(
        cls, directory: str | os.PathLike[str], *, fs: FileSystem | None = None
    ) -> dict[int, list[bytes]]:
        """Every committed batch of a sink directory: batch id → its lines.

        Blocking; for tests and tools. Temp files are ignored: they were
        never committed.

        Raises:
            OSError: the directory or a part file cannot be read.
            ValueError: a part file does not end with a newline.
        """
        fs = fs if fs is not None else OsFileSystem()
        path = os.fspath(directory)
        committed: dict[int, list[bytes]] = {}
        for name in fs.listdir(path):
            match = _PART.match(name)
            if match is None:
                continue
            part = os.path.join(path, name)
            data = read_all(fs, part)
            if data and not data.endswith(_NEWLINE):
                raise ValueError(f"{part} does not end with a newline; FileSink did not write it")
            # Every line ends with a newline, so the last piece is always empty.
            committed[int(match.group(1))] = data.split(_NEWLINE)[:-1]
        return committed
