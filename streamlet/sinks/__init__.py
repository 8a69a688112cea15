"""Sinks: where a handler's outputs go, each committing a batch at most once.

:class:`FileSink`, :class:`SQLiteSink`, :class:`PostgresSink` (needs the
``postgres`` extra) and :class:`KafkaSink` (transactional, its default) are
exactly-once with a replayable source; :class:`CallbackSink` and
:class:`PrintSink` are at-least-once.
"""

from streamlet.kafka.sink import KafkaSink
from streamlet.sinks.base import Guarantee, Sink, SinkContext, encode_output
from streamlet.sinks.callback import CallbackSink, PrintSink
from streamlet.sinks.file import FileSink
from streamlet.sinks.postgres import PostgresSink
from streamlet.sinks.sqlite import ApplyFunction, SQLiteSink

__all__ = [
    "ApplyFunction",
    "CallbackSink",
    "FileSink",
    "Guarantee",
    "KafkaSink",
    "PostgresSink",
    "PrintSink",
    "SQLiteSink",
    "Sink",
    "SinkContext",
    "encode_output",
]
