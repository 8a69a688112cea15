"""Word count over the embedded source, written to files exactly once.

Run it (no Kafka or server needed)::

    streamlet run examples.wordcount:app --duration 10

Every half second a batch of sentences is counted and the counts are written
to ``out/wordcount/part-<batch>.jsonl``, one ``["word", count]`` per line.
Kill it at any moment (even with ``kill -9``) and start it again: the batch
that was in flight is re-run with the same sentences, and no batch is written
twice.
"""

from __future__ import annotations

import random
from collections import Counter

import streamlet as sl

WORDS: tuple[str, ...] = ("stream", "batch", "record", "offset", "block", "segment", "log", "fsync")
WORDS += ("commit", "replay", "sink", "source", "handler", "crash", "restart", "exactly", "once")


def sentence(partition: int, offset: int) -> bytes:
    """Sentence number ``offset``: the same words every time it is read."""
    rng = random.Random(offset * 1_000_003 + partition)  # noqa: S311 - not for security
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).encode()


app = sl.App("wordcount", state_dir=".streamlet/wordcount", batch_interval=0.5)
lines = app.source(sl.SequenceSource(rate=200, value=sentence), name="lines")


@app.handler(lines, sink=sl.FileSink("out/wordcount"))
async def count_words(batch: sl.Batch) -> list[tuple[str, int]]:
    """Count the words of one batch's sentences."""
    words = Counter(word for record in batch for word in record.value.decode().split())
    return sorted(words.items())
