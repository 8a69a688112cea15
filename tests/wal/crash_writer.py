"""The writer process of ``test_crash.py``: appends numbered records until it is killed.

Usage: ``python crash_writer.py DIRECTORY SEED``

It opens the write-ahead log in DIRECTORY, replays it to find the last number
there, prints ``ready N`` and goes on from N, the next number. A few
concurrent tasks append records with ``append`` and ``append_many`` (sizes
vary from 12 bytes to a third of a segment, so segments roll often). A number is
printed, flushed, only after the append that holds it returned: every printed
number must be in the log after a crash.

Log order is number order: a task takes its numbers and calls the append in
one step, with no ``await`` in between, and the log keeps records in the
order the appends were called. So after any crash the log holds 0..M with no
gap, and resuming from M + 1 never appends a number twice.
"""

from __future__ import annotations

import asyncio
import random
import struct
import sys

from streamlet.wal import WriteAheadLog

SEGMENT_SIZE = 64 * 1024
TASKS = 4
_HEAD = struct.Struct("<QI")  # number, size of the rest


def record(number: int) -> bytes:
    """Record ``number``: the number and a size, then bytes only this number has.

    Sizes come in runs of 40 numbers, so most ``append_many`` groups hold
    records of one size (the log frames those differently) and some do not.
    """
    run = number // 40
    if run % 53 == 0:
        size = 20_000
    elif run % 11 == 0:
        size = 0
    else:
        size = run * 37 % 1500
    return _HEAD.pack(number, size) + random.Random(number).randbytes(size)


def number_of(payload: bytes) -> int:
    """The number of an intact record; ValueError if ``payload`` is not exactly one."""
    if len(payload) < _HEAD.size:
        raise ValueError(f"a {len(payload)}-byte payload is shorter than a record header")
    number: int = _HEAD.unpack_from(payload)[0]
    if payload != record(number):
        raise ValueError(f"the record of number {number} came back damaged")
    return number


async def main(directory: str, seed: int) -> None:
    log = await WriteAheadLog.open(directory, segment_size=SEGMENT_SIZE)
    tail = None
    async for _, payload in log.replay():  # every record is checked by its crc
        tail = payload
    last = -1 if tail is None else number_of(tail)
    print(f"ready {last + 1}", flush=True)
    next_number = last + 1

    def take(count: int) -> range:
        nonlocal next_number
        numbers = range(next_number, next_number + count)
        next_number += count
        return numbers

    async def appender(rng: random.Random) -> None:
        while True:
            if rng.random() < 0.2:
                numbers = take(rng.randint(2, 40))
                await log.append_many([record(n) for n in numbers])
            else:
                numbers = take(1)
                await log.append(record(numbers[0]))
            sys.stdout.write("".join(f"{n}\n" for n in numbers))
            sys.stdout.flush()

    await asyncio.gather(*(appender(random.Random(seed * TASKS + i)) for i in range(TASKS)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
