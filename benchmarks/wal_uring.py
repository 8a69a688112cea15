"""Would an io_uring writer lift the WAL's small-record ratio? A floor-to-floor comparison.

Run from the repository root (Linux 5.6 or later, io_uring not disabled)::

    python -m benchmarks.wal_uring          # about 40 s
    python -m benchmarks.wal_uring --quick  # a few seconds

``benchmarks.wal`` shows the write-ahead log below 0.8 of a plain
write + fdatasync loop for small records, and beside it a *floor*: the same
shape with nothing of the log in it (an asyncio task per appender, a future per
append, a Python writer thread doing the write and fdatasync per group and
handing the results back with ``call_soon_threadsafe``). The floor is itself
below 0.8 here, so the cost is the hand-off, not the log.

The one design that removes the Python thread is io_uring: the event loop
queues a linked write + fdatasync pair, the kernel runs them, and its
completion is signalled on an eventfd the loop watches. This benchmark puts
both floors side by side, each against a baseline that replays its own groups
(same sizes, same syncs) as a plain loop in one thread:

* **thread floor**: ``benchmarks.wal.floor_round``, the floor of that benchmark;
* **io_uring floor**: the same appenders and futures; one group in flight at a
  time (a second group may not be made durable before the first: a crash
  would leave a hole before intact records, which recovery must call
  corruption), submitted from the loop, completed through the eventfd.

io_uring is driven through ``ctypes`` here (setup, the two rings, the eventfd
registration): enough for a measurement, not a production backend. If the
io_uring floor is no higher than the thread floor, an io_uring backend would
not lift the log's ratio on this machine either.

The last line printed is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import mmap
import os
import platform
import shutil
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence

from benchmarks.common import work_directory
from benchmarks.wal import floor_round
from streamlet.wal.format import FRAME_HEADER_SIZE

SIZES = (100, 1024, 64 * 1024)
CONCURRENCY = (1, 8, 64)
ROUND_SECONDS = 0.2

# ---- io_uring through ctypes ---------------------------------------------------

_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427  # x86_64 and arm64 alike
_OP_FSYNC, _OP_WRITE = 3, 23
_SQE_IO_LINK = 1 << 2
_FSYNC_DATASYNC = 1
_REGISTER_EVENTFD = 4
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_SQE = struct.Struct("<BBHiQQIIQ24x")  # opcode flags ioprio fd off addr len op_flags user_data
_CQE = struct.Struct("<QiI")  # user_data res flags
_U32 = struct.Struct("<I")


class _SqOffsets(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("head", "tail", "ring_mask", "ring_entries")),
        *((name, ctypes.c_uint32) for name in ("flags", "dropped", "array", "resv1")),
        ("user_addr", ctypes.c_uint64),
    ]


class _CqOffsets(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("head", "tail", "ring_mask", "ring_entries")),
        *((name, ctypes.c_uint32) for name in ("overflow", "cqes", "flags", "resv1")),
        ("user_addr", ctypes.c_uint64),
    ]


class _Params(ctypes.Structure):
    _fields_ = [
        *(
            (name, ctypes.c_uint32)
            for name in ("sq_entries", "cq_entries", "flags", "sq_thread_cpu", "sq_thread_idle")
        ),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqOffsets),
        ("cq_off", _CqOffsets),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


class Ring:
    """One io_uring with its completions signalled on an eventfd."""

    def __init__(self, entries: int = 8) -> None:
        params = _Params()
        self.fd = _check(_libc.syscall(_SYS_SETUP, entries, ctypes.byref(params)), "io_uring_setup")
        self._sq_off, self._cq_off = params.sq_off, params.cq_off
        self._sq = mmap.mmap(self.fd, params.sq_off.array + params.sq_entries * 4, offset=0)
        self._cq = mmap.mmap(
            self.fd, params.cq_off.cqes + params.cq_entries * _CQE.size, offset=_OFF_CQ_RING
        )
        self._sqes = mmap.mmap(self.fd, params.sq_entries * 64, offset=_OFF_SQES)
        self._sq_mask = _U32.unpack_from(self._sq, params.sq_off.ring_mask)[0]
        self._cq_mask = _U32.unpack_from(self._cq, params.cq_off.ring_mask)[0]
        self._tail = _U32.unpack_from(self._sq, params.sq_off.tail)[0]
        self._queued = 0
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        target = ctypes.c_int(self.eventfd)
        _check(
            _libc.syscall(_SYS_REGISTER, self.fd, _REGISTER_EVENTFD, ctypes.byref(target), 1),
            "io_uring_register(EVENTFD)",
        )

    def prepare(
        self,
        op: int,
        fd: int,
        offset: int,
        buffer: bytes | None,
        op_flags: int,
        flags: int,
        tag: int,
    ) -> None:
        """Queue one entry; ``buffer`` must stay alive until its completion."""
        index = self._tail & self._sq_mask
        address = ctypes.cast(ctypes.c_char_p(buffer), ctypes.c_void_p).value or 0 if buffer else 0
        length = len(buffer) if buffer else 0
        _SQE.pack_into(
            self._sqes, index * 64, op, flags, 0, fd, offset, address, length, op_flags, tag
        )
        _U32.pack_into(self._sq, self._sq_off.array + index * 4, index)
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self._queued += 1

    def submit(self) -> None:
        # x86 and arm64 order these plain stores after the entries' (the
        # syscall is a full barrier for the kernel's side).
        _U32.pack_into(self._sq, self._sq_off.tail, self._tail)
        count, self._queued = self._queued, 0
        _check(_libc.syscall(_SYS_ENTER, self.fd, count, 0, 0, None, 0), "io_uring_enter")

    def completions(self) -> list[tuple[int, int]]:
        """(tag, result) of every completion so far."""
        off = self._cq_off
        head = _U32.unpack_from(self._cq, off.head)[0]
        tail = _U32.unpack_from(self._cq, off.tail)[0]
        done = []
        while head != tail:
            tag, result, _ = _CQE.unpack_from(
                self._cq, off.cqes + (head & self._cq_mask) * _CQE.size
            )
            done.append((tag, result))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(self._cq, off.head, head)
        return done

    def close(self) -> None:
        for area in (self._sq, self._cq, self._sqes):
            area.close()
        os.close(self.eventfd)
        os.close(self.fd)


# ---- the two floors ---------------------------------------------------------------


async def _appenders(
    concurrency: int, seconds: float, enqueue: Callable[[asyncio.Future[None]], None]
) -> tuple[int, float]:
    """``concurrency`` tasks, each awaiting one future per append, for ``seconds``."""
    loop = asyncio.get_running_loop()
    count = 0
    end = time.perf_counter() + seconds

    async def appender() -> None:
        nonlocal count
        while time.perf_counter() < end:
            future = loop.create_future()
            enqueue(future)
            await future
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(appender() for _ in range(concurrency)))
    return count, time.perf_counter() - started


async def uring_floor(
    ring: Ring, fd: int, size: int, concurrency: int, seconds: float
) -> tuple[int, float, list[int]]:
    """io_uring: linked write + fdatasync per group from the loop, completions by eventfd."""
    loop = asyncio.get_running_loop()
    frame = os.urandom(size + FRAME_HEADER_SIZE)  # as many bytes as a WAL frame
    waiting: list[asyncio.Future[None]] = []
    in_flight: list[tuple[list[asyncio.Future[None]], bytes]] = []
    drained = asyncio.Event()
    groups: list[int] = []
    offset = os.lseek(fd, 0, os.SEEK_END)
    kick_scheduled = False

    def start_group() -> None:
        nonlocal offset
        futures = waiting[:]
        waiting.clear()
        data = frame * len(futures)
        ring.prepare(_OP_WRITE, fd, offset, data, 0, _SQE_IO_LINK, 1)
        ring.prepare(_OP_FSYNC, fd, 0, None, _FSYNC_DATASYNC, 0, 2)
        ring.submit()
        offset += len(data)
        in_flight.append((futures, data))
        groups.append(len(futures))

    def completed() -> None:
        try:
            os.eventfd_read(ring.eventfd)
        except BlockingIOError:
            return
        for tag, result in ring.completions():
            if result < 0:
                raise OSError(-result, os.strerror(-result))
            if tag == 2:
                futures, _ = in_flight.pop()
                for future in futures:
                    future.set_result(None)
                if waiting:
                    start_group()
                else:
                    drained.set()

    def kick() -> None:
        nonlocal kick_scheduled
        kick_scheduled = False
        if not in_flight and waiting:
            start_group()

    def enqueue(future: asyncio.Future[None]) -> None:
        nonlocal kick_scheduled
        waiting.append(future)
        if not in_flight and not kick_scheduled:
            kick_scheduled = True
            loop.call_soon(kick)  # the appends of this loop iteration form one group

    loop.add_reader(ring.eventfd, completed)
    try:
        count, took = await _appenders(concurrency, seconds, enqueue)
        if in_flight:
            drained.clear()
            await drained.wait()
    finally:
        loop.remove_reader(ring.eventfd)
    return count, took, groups


def baseline(path: str, size: int, groups: Sequence[int]) -> float:
    """The same groups as a plain write + fdatasync loop in this thread; seconds."""
    frame = os.urandom(size + FRAME_HEADER_SIZE)  # as many bytes as a WAL frame
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        started = time.perf_counter()
        for group in groups:
            os.write(fd, frame * group)
            os.fdatasync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)


# ---- running and reporting ---------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.wal_uring", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="one short round per case")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per case (default 8)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 8)
    workdir, kind = work_directory(None, "uring")
    try:
        try:
            ring = Ring()
        except OSError as exc:
            print(f"io_uring is not available here ({exc}); nothing to compare", file=sys.stderr)
            return 2
        print(
            f"io_uring vs writer-thread floor: {os.cpu_count()} CPUs, Python"
            f" {platform.python_version()}, kernel {platform.release()}, {kind};"
            f" {rounds} round(s) of {ROUND_SECONDS:g} s per side and case, round robin\n"
        )
        cases = [(size, c) for size in SIZES for c in CONCURRENCY]
        ratios: dict[str, dict[str, list[float]]] = {
            f"{s}x{c}": {"thread": [], "uring": []} for s, c in cases
        }
        rates: dict[str, dict[str, list[float]]] = {
            f"{s}x{c}": {"thread": [], "uring": []} for s, c in cases
        }
        data = os.path.join(workdir, "data")
        base = os.path.join(workdir, "base")
        fd = os.open(data, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            for _ in range(rounds):
                for size, concurrency in cases:
                    key = f"{size}x{concurrency}"
                    for side in ("thread", "uring"):
                        floor = (
                            floor_round(
                                os.path.join(workdir, "floor"), size, concurrency, ROUND_SECONDS
                            )
                            if side == "thread"
                            else uring_floor(ring, fd, size, concurrency, ROUND_SECONDS)
                        )
                        count, took, groups = asyncio.run(floor)
                        base_took = baseline(base, size, groups)
                        ratios[key][side].append(base_took / took)
                        rates[key][side].append(count / took)
                        os.ftruncate(fd, 0)
        finally:
            os.close(fd)
            ring.close()
        print(
            " record  appenders  thread rec/s  thread/base  uring rec/s  uring/base  uring/thread"
        )
        print("-" * 86)
        summary: dict[str, dict[str, float]] = {}
        for size, concurrency in cases:
            key = f"{size}x{concurrency}"
            t_ratio = statistics.median(ratios[key]["thread"])
            u_ratio = statistics.median(ratios[key]["uring"])
            t_rate = statistics.median(rates[key]["thread"])
            u_rate = statistics.median(rates[key]["uring"])
            summary[key] = {
                "thread_over_base": round(t_ratio, 3),
                "uring_over_base": round(u_ratio, 3),
                "uring_over_thread": round(u_rate / t_rate, 3),
            }
            print(
                f"{size:>7}  {concurrency:>9}  {t_rate:>12,.0f}  {t_ratio:>11.2f}"
                f"  {u_rate:>11,.0f}  {u_ratio:>10.2f}  {u_rate / t_rate:>12.2f}"
            )
        print("\nratios: medians over rounds of each side's rate over its own baseline replay")
        print(json.dumps({"benchmark": "wal_uring", "rounds": rounds, "cases": summary}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
