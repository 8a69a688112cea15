"""Kafka → Kafka, exactly once: a running count per key, kept in keyed state.

Every record of ``clicks`` (any value, keyed by user) adds one to its key's
count, which lives in the handler's keyed state
(``.streamlet/running_counts/state/count_clicks.sqlite``). Each batch writes
the new count of every key it changed to ``click-counts`` (key: the user,
value: ``{"user": ..., "count": n}``), in a Kafka transaction. The state
commits right after that transaction and before the batch is marked done,
so after a kill at any moment the batch in flight runs again on the counts
it saw before, and a ``read_committed`` consumer of ``click-counts`` sees
each count once, increasing by exactly what arrived.

Run it against your broker::

    STREAMLET_KAFKA=localhost:9092 streamlet run examples.running_counts:app
"""

from __future__ import annotations

import os

import streamlet as sl

BOOTSTRAP = os.environ.get("STREAMLET_KAFKA", "localhost:9092")
CLICKS = os.environ.get("STREAMLET_TOPIC", "clicks")
COUNTS = os.environ.get("STREAMLET_OUTPUT_TOPIC", "click-counts")

app = sl.App("running_counts", state_dir=".streamlet/running_counts", batch_interval=0.5)
clicks = app.source(
    sl.KafkaSource(CLICKS, bootstrap_servers=BOOTSTRAP, start="earliest"), name="clicks"
)


def _user(output: object) -> bytes:
    assert isinstance(output, dict)
    return str(output["user"]).encode()


@app.handler(
    clicks,
    sink=sl.KafkaSink(COUNTS, bootstrap_servers=BOOTSTRAP, key=_user),
    state=sl.State(idle=False),  # nothing to do when no click arrives
)
async def count_clicks(batch: sl.Batch, state: sl.KeyedState) -> list[dict[str, object]]:
    """Add the batch's clicks to each user's count; output the counts that changed."""
    for record in batch:
        user = (record.key or b"anonymous").decode()
        state[user] = state.get(user, 0) + 1
    changed = state.changed()
    return [{"user": user, "count": changed[user]} for user in sorted(map(str, changed))]
