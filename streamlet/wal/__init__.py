"""The write-ahead log: durable, group-committed appends of byte records.

:class:`WriteAheadLog` is the log itself (:mod:`streamlet.wal.log`); the
on-disk format is specified in :mod:`streamlet.wal.format`; :func:`verify`,
:func:`dump` and :func:`repair` (:mod:`streamlet.wal.tools`) are the offline
tools behind ``streamlet wal``.
"""

from __future__ import annotations

from streamlet.wal.log import Durability, Position, WriteAheadLog
from streamlet.wal.tools import RepairResult, VerifyReport, dump, repair, verify

__all__ = [
    "Durability",
    "Position",
    "RepairResult",
    "VerifyReport",
    "WriteAheadLog",
    "dump",
    "repair",
    "verify",
]
