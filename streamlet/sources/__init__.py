"""Sources: direct (replayable by offset) and receivers (pushed, WAL'd)."""

from streamlet.sources.base import DirectSource
from streamlet.sources.kafka import KafkaDirectSource, KafkaReceiver, KafkaSource
from streamlet.sources.sequence import SequenceSource
from streamlet.sources.tcp import TcpSource

__all__ = [
    "DirectSource",
    "KafkaDirectSource",
    "KafkaReceiver",
    "KafkaSource",
    "SequenceSource",
    "TcpSource",
]
