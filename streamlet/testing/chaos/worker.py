"""The chaos harness's app under test: numbered records to a FileSink and a SQLiteSink.

One module for every pipeline: the harness writes a
:class:`~streamlet.testing.chaos.config.WorkerConfig` (what the app reads,
where its state and outputs go, whether its handlers are poisoned) and runs::

    STREAMLET_CHAOS_WORKER=/run/worker.json streamlet run streamlet.testing.chaos.worker:app

(``python -m streamlet.testing.chaos.worker`` does the same). ``app`` is a
function, so importing this module builds nothing and needs no
configuration; ``streamlet run`` calls it.

Both handlers pass each record's value on unchanged: ``to_files`` to a
FileSink, ``to_db`` to a SQLiteSink table ``seen(v)``, and with a Kafka
source ``to_kafka`` to a transactional KafkaSink, key the value's key. The
harness reads those back and counts every record. Poisoned handlers raise
on, or hang over, the records :func:`~streamlet.testing.chaos.config.poisoned`
names, so that their batches go to the dead-letter sink.
"""

from __future__ import annotations

import functools
import sqlite3
import sys
from collections.abc import Sequence

import anyio

import streamlet as sl
from streamlet import KafkaSink, KafkaSource
from streamlet.testing.chaos.config import (
    HANDLER_TIMEOUT,
    WORKER_TARGET,
    KafkaInput,
    SequenceInput,
    SourceConfig,
    TcpInput,
    WorkerConfig,
    load_config,
    parse_value,
    poisoned,
)

__all__ = ["app", "build_app"]

# Short intervals: faults land between many small batches and checkpoints.
BATCH_INTERVAL = 0.1
BLOCK_INTERVAL = 0.02
CHECKPOINT_INTERVAL = 0.5
MAX_RATE = 20_000
"""Records per second per partition a direct source may hand one batch."""


def app() -> sl.App:
    """The app the file named by ``STREAMLET_CHAOS_WORKER`` describes (``streamlet run`` calls it).

    Raises:
        ConfigError: the variable is unset or the file is malformed.
    """
    return build_app(load_config())


def build_app(config: WorkerConfig) -> sl.App:
    """The app ``config`` describes (nothing is opened until it runs)."""
    built = _new_app(config)
    source = _add_source(built, config.source)

    async def outputs(batch: sl.Batch) -> list[str]:
        out = []
        for record in batch:
            value = record.value.decode()
            if config.poison:
                await _poison(value)
            out.append(value)
        return out

    @built.handler(source, sink=sl.FileSink(config.files))
    async def to_files(batch: sl.Batch) -> list[str]:
        return await outputs(batch)

    @built.handler(
        source,
        sink=sl.SQLiteSink(
            config.db, _insert, table_ddl="CREATE TABLE IF NOT EXISTS seen (v TEXT NOT NULL)"
        ),
    )
    async def to_db(batch: sl.Batch) -> list[str]:
        return await outputs(batch)

    if isinstance(config.source, KafkaInput):
        assert isinstance(source, KafkaSource)

        @built.handler(
            source,
            sink=KafkaSink(
                "output",
                bootstrap_servers=config.source.bootstrap,
                key=_key,
                value=_value,
                consume_from=source,
                open_timeout=60,
            ),
        )
        async def to_kafka(batch: sl.Batch) -> list[str]:
            return await outputs(batch)

    return built


def _new_app(config: WorkerConfig) -> sl.App:
    new = functools.partial(
        sl.App,
        "chaos",
        state_dir=config.state_dir,
        batch_interval=BATCH_INTERVAL,
        block_interval=BLOCK_INTERVAL,
        checkpoint_interval=CHECKPOINT_INTERVAL,
    )
    if config.dead_letter is None:
        return new()
    # A failed batch goes aside; a hanging one ends at the timeout; one retry, soon.
    return new(
        on_failure="dead_letter",
        dead_letter=sl.FileSink(config.dead_letter),
        handler_timeout=HANDLER_TIMEOUT,
        max_retries=1,
        retry_backoff=0.1,
    )


def _add_source(built: sl.App, spec: SourceConfig) -> sl.DirectSource | sl.Receiver:
    """Register the source ``spec`` describes, as ``input``: the name the checks read."""
    if isinstance(spec, SequenceInput):
        sequence = sl.SequenceSource(
            rate=spec.rate,
            partitions=spec.partitions,
            limit=spec.limit,
            max_rate=MAX_RATE,
            value=_sequence_value,
        )
        return built.source(sequence, name="input")
    if isinstance(spec, TcpInput):
        return built.source(sl.TcpSource(port=spec.port), name="input")
    kafka = KafkaSource(
        "input",
        bootstrap_servers=spec.bootstrap,
        group_id="chaos",
        start="earliest",
        max_rate=MAX_RATE,
        mode=spec.mode,
    )
    # Two calls, one per kind: App.source takes a direct source or a receiver, not either.
    if isinstance(kafka, sl.Receiver):
        return built.source(kafka, name="input")
    return built.source(kafka, name="input")


def _sequence_value(partition: int, offset: int) -> bytes:
    return b"p%d:%d" % (partition, offset)


async def _poison(value: str) -> None:
    parsed = parse_value(value)
    what = poisoned(parsed[1]) if parsed is not None else None
    if what == "raise":
        raise ValueError(f"poison record {value}")
    if what == "hang":
        await anyio.sleep(3600)


def _insert(conn: sqlite3.Connection, batch: sl.Batch, outputs: Sequence[object]) -> None:
    conn.executemany("INSERT INTO seen (v) VALUES (?)", [(o,) for o in outputs])


def _key(output: object) -> bytes:
    return str(output).partition(":")[0].encode()


def _value(output: object) -> bytes:
    return str(output).encode()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m streamlet.testing.chaos.worker [streamlet run options]``.

    Checks the configuration first, so a malformed one is one ``error:``
    line (exit 2), then runs ``streamlet run`` on :func:`app`, with its fault
    hooks and status lines.
    """
    from streamlet.cli import main as cli

    try:
        load_config()
    except sl.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    args = list(sys.argv[1:] if argv is None else argv)
    cli(["run", WORKER_TARGET, *args], prog_name="python -m streamlet.testing.chaos.worker")


if __name__ == "__main__":
    main()
