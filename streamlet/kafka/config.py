"""Validated settings of the Kafka source and the Kafka sink, checked before anything connects.

Every setting is checked when the source or sink is built, so a typo fails
at ``app.source()`` or ``KafkaSink(...)`` with a message naming it, not at
the first batch; and the settings the guarantees rest on are streamlet's to
set: they are refused in ``consumer_config`` and ``producer_config``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from aiokafka import AIOKafkaConsumer

from streamlet.errors import ConfigError
from streamlet.kafka.policy import transactional_id

if TYPE_CHECKING:
    from streamlet.sinks.base import SinkContext

__all__ = [
    "ConsumedTopic",
    "HeadersFunction",
    "Isolation",
    "KafkaSinkConfig",
    "KafkaSourceConfig",
    "KeyFunction",
    "OutOfRangePolicy",
    "Partitioner",
    "StartPosition",
    "ValueFunction",
    "probe_settings",
]

StartPosition = Literal["committed", "earliest", "latest"] | Mapping[int, int]
OutOfRangePolicy = Literal["fail", "earliest", "latest"]
Isolation = Literal["read_committed", "read_uncommitted"]

#: How long a direct source's latest() waits at least for the brokers before
#: it answers with the end offsets they last told (see there); at least twice
#: the consumer's fetch_max_wait_ms too, as an offset lookup can queue behind
#: a fetch the broker holds that long.
_LATEST_PATIENCE = 1.0
#: Consumer settings streamlet owns, and what to use instead.
_MANAGED = {
    "topics": "the topic argument",
    "loop": "nothing: the running loop is used",
    "bootstrap_servers": "the bootstrap_servers argument",
    "group_id": "the group_id argument",
    "isolation_level": "the isolation argument",
    "enable_auto_commit": "nothing: offsets are committed only after a batch is durable",
    "auto_offset_reset": "the on_out_of_range argument",
    "key_deserializer": "nothing: records carry bytes; decode them in the handler",
    "value_deserializer": "nothing: records carry bytes; decode them in the handler",
}
_CONSUMER_ARGS = frozenset(inspect.signature(AIOKafkaConsumer.__init__).parameters) - {"self"}
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"KafkaSource {name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _offset(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"KafkaSource {what} must be an integer >= 0, not {value!r}")
    return value


@dataclass(frozen=True)
class KafkaSourceConfig:
    """Validated settings of a Kafka source; see :class:`~streamlet.kafka.source.KafkaSource`.

    Raises:
        ConfigError: a setting is invalid; the message names it and what to do.
    """

    topic: str
    bootstrap_servers: str | Sequence[str]
    group_id: str | None = None
    partitions: Sequence[int] | None = None
    start: StartPosition = "committed"
    isolation: Isolation = "read_committed"
    max_rate: float | None = None
    on_out_of_range: OutOfRangePolicy = "fail"
    connect_timeout: float = 30.0
    fetch_timeout: float = 30.0
    consumer_config: Mapping[str, object] = field(default_factory=dict)
    name: str | None = None
    headers: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not _TOPIC_NAME.fullmatch(self.topic):
            raise ConfigError(
                f"KafkaSource topic {self.topic!r} is not a Kafka topic name (1 to 249 of"
                " letters, digits, '.', '_', '-'); one KafkaSource reads one topic, so"
                " register a source per topic"
            )
        servers = self.bootstrap_servers
        listed = [servers] if isinstance(servers, str) else list(servers)
        if not listed or not all(isinstance(s, str) and s.strip() for s in listed):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) bootstrap_servers must be 'host:port' or a list"
                f" of them, not {servers!r}"
            )
        object.__setattr__(
            self, "bootstrap_servers", servers if isinstance(servers, str) else tuple(listed)
        )
        if self.group_id is not None and (not isinstance(self.group_id, str) or not self.group_id):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) group_id must be a non-empty string or None"
            )
        if self.partitions is not None:
            parts = tuple(_offset("partition number", p) for p in self.partitions)
            if not parts or len(set(parts)) != len(parts):
                raise ConfigError(
                    f"KafkaSource({self.topic!r}) partitions must list distinct partition"
                    f" numbers, or be None for all, not {self.partitions!r}"
                )
            object.__setattr__(self, "partitions", tuple(sorted(parts)))
        start = self.start
        if isinstance(start, Mapping):
            checked = {
                _offset("start partition", p): _offset(f"start offset of partition {p}", o)
                for p, o in start.items()
            }
            if self.partitions is not None:
                extra = sorted(set(checked) - set(self.partitions))
                if extra:
                    raise ConfigError(
                        f"KafkaSource({self.topic!r}) start names partitions {extra} that are"
                        f" not in partitions={list(self.partitions)}; add them or drop them"
                    )
            object.__setattr__(self, "start", dict(sorted(checked.items())))
        elif start not in ("committed", "earliest", "latest"):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) start must be 'committed', 'earliest', 'latest'"
                f" or a {{partition: offset}} dict, not {start!r}"
            )
        if self.isolation not in ("read_committed", "read_uncommitted"):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) isolation must be 'read_committed' or"
                f" 'read_uncommitted', not {self.isolation!r}"
            )
        if self.max_rate is not None and (
            isinstance(self.max_rate, bool)
            or not isinstance(self.max_rate, (int, float))
            or not self.max_rate > 0
        ):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) max_rate must be a positive number of records/s"
                f" per partition, or None, not {self.max_rate!r}"
            )
        if self.on_out_of_range not in ("fail", "earliest", "latest"):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) on_out_of_range must be 'fail', 'earliest' or"
                f" 'latest', not {self.on_out_of_range!r}"
            )
        object.__setattr__(
            self, "connect_timeout", _seconds("connect_timeout", self.connect_timeout)
        )
        object.__setattr__(self, "fetch_timeout", _seconds("fetch_timeout", self.fetch_timeout))
        if not isinstance(self.consumer_config, Mapping):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) consumer_config must be a mapping of"
                f" aiokafka consumer settings, not {type(self.consumer_config).__name__}"
            )
        for key in self.consumer_config:
            if key in _MANAGED:
                raise ConfigError(
                    f"KafkaSource({self.topic!r}) consumer_config must not set {key!r};"
                    f" use {_MANAGED[key]}"
                )
            if key not in _CONSUMER_ARGS:
                raise ConfigError(
                    f"KafkaSource({self.topic!r}) consumer_config has {key!r}, which"
                    " aiokafka.AIOKafkaConsumer does not take; check the spelling against"
                    " its documentation"
                )
        object.__setattr__(self, "consumer_config", dict(self.consumer_config))
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ConfigError(f"KafkaSource({self.topic!r}) name must be a non-empty string")
        if not isinstance(self.headers, bool):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) headers must be True or False, not {self.headers!r}"
            )

    @property
    def patience(self) -> float:
        """Seconds a live broker may take to answer an offset lookup (see ``_LATEST_PATIENCE``)."""
        wait = self.consumer_config.get("fetch_max_wait_ms", 500)
        fetch_wait = wait / 1000 if isinstance(wait, (int, float)) else 0.5
        return min(self.fetch_timeout, max(_LATEST_PATIENCE, 2 * fetch_wait))

    @property
    def servers(self) -> str:
        """The bootstrap servers as one comma-separated string, for messages."""
        servers = self.bootstrap_servers
        return servers if isinstance(servers, str) else ",".join(servers)

    def consumer_kwargs(self, *, group: bool = False) -> dict[str, object]:
        """Keyword arguments for an ``AIOKafkaConsumer``: the group's, or a group-less one."""
        servers = self.bootstrap_servers
        return {
            "client_id": "streamlet",
            "metadata_max_age_ms": 30_000,
            **self.consumer_config,
            "bootstrap_servers": servers if isinstance(servers, str) else list(servers),
            "group_id": self.group_id if group else None,
            "isolation_level": self.isolation,
            "enable_auto_commit": False,
            # Never reset silently: an out-of-range fetch raises and
            # on_out_of_range decides, with the lost range logged.
            "auto_offset_reset": "none",
        }

    def describe(self, mode: str) -> str:
        """Identity for the app's manifest (what a state directory's ranges mean)."""
        parts = "all" if self.partitions is None else ",".join(map(str, self.partitions))
        return f"KafkaSource(topic={self.topic!r}, partitions={parts}, mode={mode})"


# -- the sink ------------------------------------------------------------------

KeyFunction = Callable[[object], bytes | None]
"""Maps one output to its record key (None: no key)."""
ValueFunction = Callable[[object], bytes | None]
"""Maps one output to its record value (None: a tombstone, which needs a key)."""
HeadersFunction = Callable[[object], Sequence[tuple[str, bytes]] | None]
"""Maps one output to its record headers, ``[(name, value), ...]`` (None: none)."""
Partitioner = Callable[[bytes | None, list[int], list[int]], int]
"""``partitioner(key, all_partitions, available_partitions) -> partition``, as in aiokafka."""

#: Producer settings the sink owns; producer_config must not set them.
_OWNED_SETTINGS = frozenset(
    {
        "bootstrap_servers",
        "transactional_id",
        "transaction_timeout_ms",
        "enable_idempotence",
        "acks",
        "partitioner",
        "key_serializer",
        "value_serializer",
        "loop",
    }
)


class ConsumedTopic(Protocol):
    """What KafkaSink needs of a Kafka source to commit its offsets with the outputs.

    A ``KafkaSource`` has these; any object with the three attributes does.
    """

    @property
    def name(self) -> str:
        """The source's name in the app: the ``source`` of its offset ranges."""
        ...

    @property
    def topic(self) -> str:
        """The topic the source reads."""
        ...

    @property
    def group_id(self) -> str | None:
        """The consumer group its offsets are committed under."""
        ...


def _sources_of(consume_from: ConsumedTopic | Sequence[ConsumedTopic] | None) -> list[Any]:
    if consume_from is None:
        return []
    items: Iterable[Any] = [consume_from] if hasattr(consume_from, "topic") else consume_from
    sources = list(items)
    for source in sources:
        missing = [a for a in ("name", "topic", "group_id") if not hasattr(source, a)]
        if missing:
            raise ConfigError(
                f"KafkaSink consume_from takes Kafka sources (objects with name, topic and"
                f" group_id); {source!r} has no {', '.join(missing)}"
            )
    return sources


@dataclass(frozen=True, eq=False)
class KafkaSinkConfig:
    """Validated arguments of a KafkaSink; see :class:`~streamlet.kafka.sink.KafkaSink`.

    ``bootstrap_servers`` becomes a list, ``producer_config`` a dict, the
    timeouts floats; ``sources`` lists the ``consume_from`` sources.

    Raises:
        ConfigError: an argument is invalid; the message names it.
    """

    topic: str
    bootstrap_servers: str | Sequence[str]
    transactional: bool = True
    key: KeyFunction | None = None
    value: ValueFunction | None = None
    headers: HeadersFunction | None = None
    partitioner: Partitioner | None = None
    consume_from: ConsumedTopic | Sequence[ConsumedTopic] | None = None
    producer_config: Mapping[str, Any] | None = None
    transaction_timeout: float = 60.0
    open_timeout: float = 30.0
    sources: list[ConsumedTopic] = field(init=False, default_factory=list)
    """The ``consume_from`` sources, as a list."""

    def __post_init__(self) -> None:
        topic = self.topic
        if not isinstance(topic, str) or not topic:
            raise ConfigError(f"KafkaSink topic must be a non-empty str, not {topic!r}")
        bootstrap_servers = self.bootstrap_servers
        if isinstance(bootstrap_servers, str):
            servers = [bootstrap_servers]
        else:
            servers = list(bootstrap_servers)
        if not servers or not all(isinstance(s, str) and s for s in servers):
            raise ConfigError(
                f"KafkaSink bootstrap_servers must be 'host:port' or a list of them,"
                f" not {bootstrap_servers!r}"
            )
        for name, fn in (("key", self.key), ("value", self.value), ("headers", self.headers)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"KafkaSink {name} must be a function, not {type(fn).__name__}")
        partitioner = self.partitioner
        if partitioner is not None and not callable(partitioner):
            raise ConfigError(
                f"KafkaSink partitioner must be a function, not {type(partitioner).__name__}"
            )
        config = dict(self.producer_config or {})
        owned = sorted(_OWNED_SETTINGS.intersection(config))
        if owned:
            raise ConfigError(
                f"KafkaSink producer_config must not set {', '.join(owned)}: the sink sets"
                " them (use the sink's own arguments)"
            )
        for name, seconds in (
            ("transaction_timeout", self.transaction_timeout),
            ("open_timeout", self.open_timeout),
        ):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
                raise ConfigError(f"KafkaSink {name} must be > 0 seconds, not {seconds!r}")
        sources = _sources_of(self.consume_from)
        if sources and not self.transactional:
            raise ConfigError(
                "KafkaSink consume_from needs transactional=True: the offsets are committed"
                " in the batch's transaction (without transactions the source commits its"
                " own offsets after the batch)"
            )
        object.__setattr__(self, "bootstrap_servers", servers)
        object.__setattr__(self, "transactional", bool(self.transactional))
        object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "producer_config", config)
        object.__setattr__(self, "transaction_timeout", float(self.transaction_timeout))
        object.__setattr__(self, "open_timeout", float(self.open_timeout))

    @property
    def servers(self) -> list[str]:
        """The bootstrap servers, as a list."""
        return list(self.bootstrap_servers)

    def producer_settings(self, context: SinkContext, task: int | None = None) -> dict[str, Any]:
        """Keyword arguments for the sink's ``AIOKafkaProducer``, but for the partitioner.

        ``task``: the group-mode task the producer serves, which has a
        transactional id of its own (None: the app's one producer).
        """
        settings: dict[str, Any] = {
            "client_id": f"streamlet.{context.app}.{context.handler}",
            # A transaction begun right after the previous commit may be told
            # NOT_ENOUGH_REPLICAS for a moment; aiokafka's default 100 ms wait
            # before retrying made up the whole p99 of short batches.
            "retry_backoff_ms": 10,
        }
        settings.update(self.producer_config or {})
        settings["bootstrap_servers"] = self.servers
        if self.transactional:
            settings["transactional_id"] = transactional_id(context, task)
            settings["transaction_timeout_ms"] = int(self.transaction_timeout * 1000)
        else:
            settings["enable_idempotence"] = True
        return settings


def probe_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings of a plain producer that only reads markers: no transactional id."""
    probe = {
        k: v
        for k, v in settings.items()
        if k not in ("transactional_id", "transaction_timeout_ms", "enable_idempotence")
    }
    probe["client_id"] = f"{settings.get('client_id', 'streamlet')}.probe"
    return probe
