"""streamlet: asyncio micro-batch streaming with a write-ahead log and exactly-once output.

The public surface is re-exported here and listed in ``__all__``, beside the
public modules (``sources``, ``sinks``, ``kafka``, ``records``, ``errors``,
``metrics``, ``clock``, ``fs``, ``tcp``, ``wal``, ``observe``, ``testing``).
Modules whose names start with an underscore are the engine's insides: they
may change without notice.
"""

from __future__ import annotations

from streamlet import windows
from streamlet.app import App
from streamlet.errors import (
    CheckpointError,
    ClientError,
    ConfigError,
    DecodeError,
    FencedError,
    HandlerError,
    OutputError,
    RecordTooLargeError,
    RejectedError,
    SinkError,
    SinkUnavailableError,
    SourceError,
    SourceUnavailableError,
    StateError,
    StreamletError,
    TaskNotHeldError,
    UnreachableError,
    WALClosedError,
    WALCorruptionError,
    WALError,
    WALFailedError,
)
from streamlet.metrics import BatchInfo
from streamlet.records import Batch, Decoded, OffsetRange, Record
from streamlet.sinks import (
    CallbackSink,
    FileSink,
    KafkaSink,
    PostgresSink,
    PrintSink,
    SQLiteSink,
)
from streamlet.sinks.base import Sink, SinkContext
from streamlet.sources import (
    DirectorySource,
    DirectSource,
    KafkaSource,
    SequenceSource,
    TcpSource,
)
from streamlet.sources.receiver import Receiver, ReceiverContext, Stored
from streamlet.state import KeyedState, State, StateKey
from streamlet.tcp import TcpClient

__version__ = "0.1.0"

__all__ = [
    "App",
    "Batch",
    "BatchInfo",
    "CallbackSink",
    "CheckpointError",
    "ClientError",
    "ConfigError",
    "DecodeError",
    "Decoded",
    "DirectSource",
    "DirectorySource",
    "FencedError",
    "FileSink",
    "HandlerError",
    "KafkaSink",
    "KafkaSource",
    "KeyedState",
    "OffsetRange",
    "OutputError",
    "PostgresSink",
    "PrintSink",
    "Receiver",
    "ReceiverContext",
    "Record",
    "RecordTooLargeError",
    "RejectedError",
    "SQLiteSink",
    "SequenceSource",
    "Sink",
    "SinkContext",
    "SinkError",
    "SinkUnavailableError",
    "SourceError",
    "SourceUnavailableError",
    "State",
    "StateError",
    "StateKey",
    "Stored",
    "StreamletError",
    "TaskNotHeldError",
    "TcpClient",
    "TcpSource",
    "UnreachableError",
    "WALClosedError",
    "WALCorruptionError",
    "WALError",
    "WALFailedError",
    "__version__",
    "windows",
]
