"""The private parts of aiokafka streamlet uses, checked without a broker.

``streamlet.kafka._aiokafka.check`` looks up every one of them; these tests
take parts away (or change them) the way an aiokafka release could, and
see that a part without a fallback stops the first Kafka source or sink
with a message naming the aiokafka version and the part, that a part with
one falls back with a warning, and that ``import streamlet`` changes nothing
in aiokafka: the fast path is installed by the first consumer.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiokafka
import aiokafka.client
import aiokafka.consumer.fetcher as fetcher
import aiokafka.producer.sender
import aiokafka.protocol.commit
import aiokafka.record.default_records
import pytest

from streamlet.errors import ConfigError
from streamlet.kafka import _aiokafka

AIOKAFKA_BUFFERS = fetcher.PartitionRecords
if AIOKAFKA_BUFFERS is _aiokafka.partition_records:  # another test's consumer installed it
    AIOKAFKA_BUFFERS = _aiokafka._AIOKAFKA_BUFFERS


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing prepared yet, aiokafka's own fetch buffers in place; restored afterwards."""
    monkeypatch.setattr(fetcher, "PartitionRecords", AIOKAFKA_BUFFERS)
    for name, value in (
        ("_PREPARED", False),
        ("_FAST_READS", False),
        ("_AIOKAFKA_BUFFERS", None),
        ("_RECORD_BUFFERS", None),
    ):
        monkeypatch.setattr(_aiokafka, name, value)


def test_the_installed_aiokafka_has_every_part(fresh: None) -> None:
    assert _aiokafka.check() == []
    _aiokafka.prepare()
    assert _aiokafka.fast_reads()
    assert fetcher.PartitionRecords is _aiokafka.partition_records
    assert _aiokafka._AIOKAFKA_BUFFERS is AIOKAFKA_BUFFERS
    # Checked again once installed, it looks behind the stand-in.
    assert _aiokafka.check() == []


async def _send_reordered(self: Any, request: Any, node_id: Any) -> Any:
    raise AssertionError("never called")


class _ResponseV9:
    """An OffsetFetch answer laid out differently from what streamlet reads."""

    SCHEMA = aiokafka.protocol.commit.OffsetFetchResponse_v0.SCHEMA
    SCHEMA = type(SCHEMA)(("groups", SCHEMA.fields[0]))


class _Builder:
    """A record batch builder without ``estimate_size_in_bytes``."""


def _remove(monkeypatch: pytest.MonkeyPatch, part: str) -> None:
    """Take ``part`` of aiokafka away, or change it, as a release could."""
    client = aiokafka.client.AIOKafkaClient
    if part == "coordinator_lookup":
        monkeypatch.delattr(client, "coordinator_lookup")
    elif part == "send":
        monkeypatch.setattr(client, "send", _send_reordered)
    elif part == "OffsetFetchResponse":
        monkeypatch.setattr(
            aiokafka.protocol.commit, "OffsetFetchResponse_v9", _ResponseV9, raising=False
        )
    elif part == "estimate_size_in_bytes":
        monkeypatch.setattr(aiokafka.record.default_records, "DefaultRecordBatchBuilder", _Builder)
    elif part == "CoordinationType":
        monkeypatch.delattr(aiokafka.client, "CoordinationType")
    else:
        raise AssertionError(part)


@pytest.mark.parametrize(
    ("part", "named"),
    [
        ("coordinator_lookup", "aiokafka.client.AIOKafkaClient.coordinator_lookup"),
        ("send", "aiokafka.client.AIOKafkaClient.send(self, node_id, request, ...)"),
        ("OffsetFetchResponse", "aiokafka.protocol.commit.OffsetFetchResponse_v9 laid out"),
        (
            "estimate_size_in_bytes",
            "aiokafka.record.default_records.DefaultRecordBatchBuilder.estimate_size_in_bytes",
        ),
        ("CoordinationType", "aiokafka.client.CoordinationType"),
    ],
)
def test_a_part_without_a_fallback_refuses_the_first_use(
    fresh: None, monkeypatch: pytest.MonkeyPatch, part: str, named: str
) -> None:
    _remove(monkeypatch, part)
    gaps = _aiokafka.check()
    assert [g.feature for g in gaps] == [_aiokafka.REQUIRED]
    assert gaps[0].part.startswith(named)
    with pytest.raises(ConfigError) as refused:
        _aiokafka.prepare()
    message = str(refused.value)
    assert f"aiokafka {aiokafka.__version__} lacks" in message
    assert named in message
    assert "pins" in message
    # Nothing was installed, and the next use checks again.
    assert fetcher.PartitionRecords is AIOKAFKA_BUFFERS
    assert not _aiokafka.fast_reads()
    with pytest.raises(ConfigError):
        _aiokafka.prepare()


class _Renamed(AIOKAFKA_BUFFERS):  # type: ignore[misc, valid-type]
    """A class of someone else's in aiokafka's place."""


class _NewInit(AIOKAFKA_BUFFERS):  # type: ignore[misc, valid-type]
    __module__ = "aiokafka.consumer.fetcher"

    def __init__(self, tp: Any, records: Any, fetch_offset: Any, *args: Any) -> None:
        raise AssertionError("never called")


class _NoDeserializer(AIOKAFKA_BUFFERS):  # type: ignore[misc, valid-type]
    __module__ = "aiokafka.consumer.fetcher"

    def __init__(
        self,
        tp: Any,
        records: Any,
        aborted_transactions: Any,
        fetch_offset: Any,
        key_deserializer: Any,
        value_deserializer: Any,
    ) -> None:
        self.deserializers = (key_deserializer, value_deserializer)


class _NoConvert(AIOKAFKA_BUFFERS):  # type: ignore[misc, valid-type]
    __module__ = "aiokafka.consumer.fetcher"

    def _unpack_records(self) -> Iterator[Any]:
        yield from ()


class _Fetcher:
    """A fetcher that builds its buffers some other way than by the module's name."""

    def _proc_fetch_request(self) -> None:
        raise AssertionError("never called")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("no _consumer_record", "aiokafka.consumer.fetcher.PartitionRecords._consumer_record"),
        ("foreign class", "aiokafka.consumer.fetcher.PartitionRecords (it is"),
        ("new __init__", "aiokafka.consumer.fetcher.PartitionRecords.__init__(self, tp, records,"),
        ("no _value_deserializer", "PartitionRecords instances' _value_deserializer"),
        ("no conversion call", "PartitionRecords._unpack_records calling self._consumer_record"),
        ("fetcher", "aiokafka.consumer.fetcher.Fetcher building PartitionRecords by name"),
    ],
)
def test_a_moved_fetch_buffer_seam_falls_back_with_a_warning(
    fresh: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    change: str,
    named: str,
) -> None:
    replacement = {
        "foreign class": _Renamed,
        "new __init__": _NewInit,
        "no _value_deserializer": _NoDeserializer,
        "no conversion call": _NoConvert,
    }.get(change)
    if change == "no _consumer_record":
        monkeypatch.delattr(AIOKAFKA_BUFFERS, "_consumer_record")
    elif change == "fetcher":
        monkeypatch.setattr(fetcher, "Fetcher", _Fetcher)
    else:
        monkeypatch.setattr(fetcher, "PartitionRecords", replacement)
    in_place = fetcher.PartitionRecords
    gaps = _aiokafka.check()
    # A fetcher of another shape also lacks what a cut-short close finishes.
    expected = {
        _aiokafka.FETCH_BUFFERS,
        *([_aiokafka.CONSUMER_CLOSE] if change == "fetcher" else []),
    }
    assert {g.feature for g in gaps} == expected
    assert any(named in g.part for g in gaps), gaps
    with caplog.at_level(logging.WARNING, logger="streamlet.kafka"):
        _aiokafka.prepare()
    assert not _aiokafka.fast_reads()
    assert fetcher.PartitionRecords is in_place  # left alone
    warning = caplog.text
    assert f"aiokafka {aiokafka.__version__} lacks" in warning
    assert named in warning
    assert "twice the CPU" in warning


def test_missing_producer_internals_fall_back_with_a_warning(
    fresh: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(aiokafka.producer.sender.Sender, "sender_task")
    gaps = _aiokafka.check()
    assert gaps == [
        _aiokafka.Gap("aiokafka.producer.sender.Sender.sender_task", _aiokafka.PRODUCER_FAILURE)
    ]
    with caplog.at_level(logging.WARNING, logger="streamlet.kafka"):
        _aiokafka.prepare()
    assert "aiokafka.producer.sender.Sender.sender_task" in caplog.text
    assert "fenced producer may be taken for a broken one" in caplog.text
    assert _aiokafka.fast_reads()  # the consumer's seam is whole


def test_an_attribute_the_constructor_no_longer_sets_is_found(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Producer(aiokafka.AIOKafkaProducer):  # type: ignore[misc]
        def __init__(self) -> None:
            self._sender = None

    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", Producer)
    parts = {g.part: g.feature for g in _aiokafka.check()}
    assert parts == {
        "AIOKafkaProducer instances' _txn_manager (set by its __init__)": (
            _aiokafka.PRODUCER_FAILURE
        ),
        "AIOKafkaProducer instances' _message_accumulator (set by its __init__)": (
            _aiokafka.PRODUCER_FAILURE
        ),
        "AIOKafkaProducer instances' client (set by its __init__)": _aiokafka.REQUIRED,
    }


_IMPORT_CHECK = """
import asyncio, json, sys, types

import aiokafka
import aiokafka.consumer.fetcher as fetcher

def snapshot():
    return {
        name: {k: v for k, v in vars(module).items() if not isinstance(v, types.ModuleType)}
        for name, module in list(sys.modules.items())
        if name == "aiokafka" or name.startswith("aiokafka.")
    }

def changed(before):
    out = []
    for name, old in before.items():
        new = snapshot().get(name, {})
        out += [f"{name}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) is not new.get(k)]
    return out

classes = {
    f"{name}.{k}": dict(vars(v))
    for name, module in snapshot().items()
    for k, v in module.items()
    if isinstance(v, type) and v.__module__.startswith("aiokafka")
}
before = snapshot()
import streamlet as sl
import streamlet.kafka.direct, streamlet.kafka.receiver, streamlet.kafka.sink
sl.KafkaSource("t", bootstrap_servers="127.0.0.1:1")
sl.KafkaSource("t", bootstrap_servers="127.0.0.1:1", mode="receiver")
sl.KafkaSink("t", bootstrap_servers="127.0.0.1:1")
after_import = changed(before)
after_import += [
    name for name, attrs in classes.items()
    if dict(vars(eval(name.rsplit(".", 1)[1], {}, vars(sys.modules[name.rsplit(".", 1)[0]]))))
    != attrs
]

from streamlet.kafka._consumer import Consumer

async def first_consumer():
    consumer = Consumer("t", {"bootstrap_servers": "127.0.0.1:1"})
    await consumer.stop()

asyncio.run(first_consumer())
print(json.dumps({"after_import": after_import, "after_consumer": changed(before)}))
"""


def test_importing_streamlet_leaves_aiokafka_alone() -> None:
    """Nothing in aiokafka changes until the first consumer; then the fetch buffers do."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["after_import"] == []
    # The check sees a change when there is one: the first consumer's install.
    assert found["after_consumer"] == ["aiokafka.consumer.fetcher.PartitionRecords"]
