"""streamlet: asyncio micro-batch streaming with a write-ahead log and exactly-once output.

The public surface is re-exported here and listed in ``__all__``; everything
else lives in modules whose names say what they do, and may change.
"""

from __future__ import annotations

from streamlet.errors import (
    CommitError,
    ConfigError,
    HandlerError,
    RecordTooLargeError,
    SinkError,
    StreamletError,
    WALClosedError,
    WALCorruptionError,
    WALError,
    WALFailedError,
)

__version__ = "0.1.0"

__all__ = [
    "CommitError",
    "ConfigError",
    "HandlerError",
    "RecordTooLargeError",
    "SinkError",
    "StreamletError",
    "WALClosedError",
    "WALCorruptionError",
    "WALError",
    "WALFailedError",
    "__version__",
]
