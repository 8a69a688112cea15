"""Sources: direct (replayable by offset) and receivers (pushed, WAL'd)."""

from streamlet.sources.base import DirectSource
from streamlet.sources.sequence import SequenceSource

__all__ = ["DirectSource", "SequenceSource"]
