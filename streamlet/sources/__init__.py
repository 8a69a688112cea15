"""Sources: direct (replayable by offset) and receivers (pushed, WAL'd)."""

from streamlet.kafka.direct import KafkaDirectSource
from streamlet.kafka.receiver import KafkaReceiver
from streamlet.kafka.source import KafkaSource
from streamlet.sources.base import DirectSource
from streamlet.sources.directory import DirectorySource
from streamlet.sources.sequence import SequenceSource
from streamlet.sources.tcp import TcpSource

__all__ = [
    "DirectSource",
    "DirectorySource",
    "KafkaDirectSource",
    "KafkaReceiver",
    "KafkaSource",
    "SequenceSource",
    "TcpSource",
]
