"""streamlet: asyncio micro-batch streaming with a write-ahead log and exactly-once output.

The public surface is re-exported here and listed in ``__all__``; everything
else lives in modules whose names say what they do, and may change.
"""

from __future__ import annotations

from streamlet.app import App
from streamlet.errors import (
    ConfigError,
    DecodeError,
    FencedError,
    HandlerError,
    OutputError,
    RecordTooLargeError,
    SinkError,
    StreamletError,
    WALClosedError,
    WALCorruptionError,
    WALError,
    WALFailedError,
)
from streamlet.metrics import BatchInfo
from streamlet.records import Batch, BlockRef, OffsetRange, Record
from streamlet.sinks import CallbackSink, FileSink, KafkaSink, PrintSink, SQLiteSink
from streamlet.sinks.base import Sink, SinkContext
from streamlet.sources import DirectSource, KafkaSource, SequenceSource, TcpSource
from streamlet.sources.receiver import Receiver, ReceiverContext, Stored
from streamlet.tcp import TcpClient

__version__ = "0.1.0"

__all__ = [
    "App",
    "Batch",
    "BatchInfo",
    "BlockRef",
    "CallbackSink",
    "ConfigError",
    "DecodeError",
    "DirectSource",
    "FencedError",
    "FileSink",
    "HandlerError",
    "KafkaSink",
    "KafkaSource",
    "OffsetRange",
    "OutputError",
    "PrintSink",
    "Receiver",
    "ReceiverContext",
    "Record",
    "RecordTooLargeError",
    "SQLiteSink",
    "SequenceSource",
    "Sink",
    "SinkContext",
    "SinkError",
    "Stored",
    "StreamletError",
    "TcpClient",
    "TcpSource",
    "WALClosedError",
    "WALCorruptionError",
    "WALError",
    "WALFailedError",
    "__version__",
]
