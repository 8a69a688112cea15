"""What the chaos harness and its worker agree on: the app's configuration and the poison rule.

The harness describes the app under test as data, a :class:`WorkerConfig`
written as JSON to a file whose path is in ``STREAMLET_CHAOS_WORKER``, and
the one worker module, :mod:`streamlet.testing.chaos.worker`, builds the app
from it. Data rather than generated source keeps the worker an ordinary
module that ruff and ``mypy --strict`` check, and keeps a failed run
repeatable by hand: the file stays in the run's directory. The file looks
like::

    {"pipeline": "tcp", "state_dir": "/run/state", "files": "/run/files",
     "db": "/run/out.db", "dead_letter": null, "poison": false,
     "source": {"kind": "tcp", "port": 41234}}

with ``source`` one of ``{"kind": "sequence", "partitions", "limit", "rate"}``,
``{"kind": "tcp", "port"}`` or ``{"kind": "kafka", "bootstrap", "mode"}``.

Every record's value is ``"<key>:<number>"`` (a partition ``p0``, a TCP
client ``c1``, ...); the checks read the outputs back in that format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypeVar

from streamlet.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "HANDLER_TIMEOUT",
    "WORKER_TARGET",
    "KafkaInput",
    "SequenceInput",
    "SourceConfig",
    "TcpInput",
    "WorkerConfig",
    "load_config",
    "parse_config",
    "parse_value",
    "poisoned",
]

CONFIG_ENV = "STREAMLET_CHAOS_WORKER"
"""The environment variable naming the worker's JSON configuration file."""

WORKER_TARGET = "streamlet.testing.chaos.worker:app"
"""What ``streamlet run`` is given to run the worker (named here: the harness never imports it)."""

# With the poison rule on, the handlers raise on, or hang over, records whose
# number n has n % EVERY == AT; a batch holding one goes to the dead-letter sink whole.
RAISE_EVERY, RAISE_AT = 997, 13
HANG_EVERY, HANG_AT = 4999, 2500
HANDLER_TIMEOUT = 2.0
"""The dead-letter app's handler timeout: what ends a hanging handler."""


def poisoned(number: int) -> Literal["raise", "hang"] | None:
    """How the poisoned app's handlers treat record ``number``: "raise", "hang" or None."""
    if number % RAISE_EVERY == RAISE_AT:
        return "raise"
    if number % HANG_EVERY == HANG_AT:
        return "hang"
    return None


def parse_value(value: str) -> tuple[str, int] | None:
    """``"<key>:<number>"`` as (key, number); None for anything else."""
    key, sep, number = value.rpartition(":")
    if not sep or not number.isdigit():
        return None
    return key, int(number)


@dataclass(frozen=True)
class SequenceInput:
    """A ``SequenceSource``: ``partitions`` partitions of ``limit`` records each.

    ``rate`` is records per second per partition (None: all at once). Values
    are ``p<partition>:<offset>``.
    """

    partitions: int
    limit: int
    rate: float | None


@dataclass(frozen=True)
class TcpInput:
    """A ``TcpSource`` listening on 127.0.0.1:``port``; the harness's clients send the values."""

    port: int


@dataclass(frozen=True)
class KafkaInput:
    """A ``KafkaSource`` on topic ``input`` and a transactional ``KafkaSink`` to topic ``output``.

    Both on the broker at ``bootstrap``; ``mode`` is the source's mode.
    """

    bootstrap: str
    mode: Literal["direct", "receiver"]


SourceConfig = SequenceInput | TcpInput | KafkaInput

_KINDS: dict[str, type[SourceConfig]] = {
    "sequence": SequenceInput,
    "tcp": TcpInput,
    "kafka": KafkaInput,
}


@dataclass(frozen=True)
class WorkerConfig:
    """The app under test: where its state and outputs go, what it reads, how it fails.

    Attributes:
        pipeline: the pipeline's name, for the reader of the file.
        state_dir: the app's state directory.
        files: the FileSink's directory (handler ``to_files``).
        db: the SQLiteSink's database, table ``seen(v)`` (handler ``to_db``).
        dead_letter: the dead-letter FileSink's directory; with it the app
            sends failed batches aside (``on_failure="dead_letter"``,
            :data:`HANDLER_TIMEOUT`, one retry) instead of stopping.
        poison: the handlers follow :func:`poisoned`.
        source: what the app reads.
    """

    pipeline: str
    state_dir: str
    files: str
    db: str
    dead_letter: str | None
    poison: bool
    source: SourceConfig

    def to_json(self) -> str:
        """The JSON text :func:`parse_config` reads back."""
        body = asdict(self)
        kind = next(name for name, cls in _KINDS.items() if isinstance(self.source, cls))
        body["source"] = {"kind": kind, **body["source"]}
        return json.dumps(body, indent=2) + "\n"

    def write(self, path: Path) -> None:
        """Write the configuration to ``path`` for a worker to read."""
        path.write_text(self.to_json())


_T = TypeVar("_T")


class _Fields:
    """Reads one JSON object's fields, each checked, naming the field in every error."""

    def __init__(self, where: str, body: object, label: str, prefix: str) -> None:
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: {label} must be a JSON object, not {_show(body)}")
        self.where = where
        self.body: dict[str, object] = body
        self.label = label
        """What the object is, in messages about it as a whole."""
        self.prefix = prefix
        """What comes before a field's name in messages about the field."""
        self.taken: set[str] = set()

    def get(self, name: str, kind: type[_T] | tuple[type, ...], what: str) -> _T:
        self.taken.add(name)
        if name not in self.body:
            raise ConfigError(f"{self.where}: {self.label} has no {name!r} ({what})")
        value = self.body[name]
        # bool is an int to Python, never to this file.
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            raise ConfigError(f"{self.where}: {self.prefix}{name!r} must be {what}, not {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(
                f"{self.where}: {self.prefix}{name!r} must be {what}, not {_show(value)}"
            )
        return value  # type: ignore[return-value]

    def done(self) -> None:
        unknown = sorted(set(self.body) - self.taken)
        if unknown:
            raise ConfigError(
                f"{self.where}: {self.label} has unknown fields {unknown};"
                f" known: {sorted(self.taken)}"
            )


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _show(value: object) -> str:
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    return repr(value)


def _positive_int(fields: _Fields, name: str, *, minimum: int) -> int:
    value: int = fields.get(name, int, f"an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(
            f"{fields.where}: {fields.prefix}{name!r} must be an integer >= {minimum}, not {value}"
        )
    return value


def _source(where: str, body: object) -> SourceConfig:
    fields = _Fields(where, body, "source", "source ")
    kind: str = fields.get("kind", str, f"one of {', '.join(_KINDS)}")
    if kind not in _KINDS:
        raise ConfigError(
            f"{where}: source 'kind' must be one of {', '.join(_KINDS)}, not {kind!r}"
        )
    source: SourceConfig
    if kind == "sequence":
        rate: float | int | None = fields.get("rate", (int, float, type(None)), "a number or null")
        if rate is not None and not rate > 0:
            raise ConfigError(f"{where}: source 'rate' must be > 0 or null, not {rate}")
        source = SequenceInput(
            partitions=_positive_int(fields, "partitions", minimum=1),
            limit=_positive_int(fields, "limit", minimum=0),
            rate=None if rate is None else float(rate),
        )
    elif kind == "tcp":
        source = TcpInput(port=_positive_int(fields, "port", minimum=1))
    else:
        mode: str = fields.get("mode", str, '"direct" or "receiver"')
        if mode not in ("direct", "receiver"):
            raise ConfigError(
                f"{where}: source 'mode' must be 'direct' or 'receiver', not {mode!r}"
            )
        source = KafkaInput(
            bootstrap=fields.get("bootstrap", str, "host:port of the broker"),
            mode="direct" if mode == "direct" else "receiver",
        )
    fields.done()
    return source


def parse_config(text: str, where: str = "chaos worker config") -> WorkerConfig:
    """Read a :class:`WorkerConfig` from its JSON text.

    Raises:
        ConfigError: the text is not JSON or a field is missing, unknown or
            of the wrong type; the message starts with ``where`` and names
            the field.
    """
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not JSON: {exc}") from None
    fields = _Fields(where, body, "the configuration", "")
    config = WorkerConfig(
        pipeline=fields.get("pipeline", str, "the pipeline's name"),
        state_dir=fields.get("state_dir", str, "a directory path"),
        files=fields.get("files", str, "a directory path"),
        db=fields.get("db", str, "a file path"),
        dead_letter=fields.get("dead_letter", (str, type(None)), "a directory path or null"),
        poison=fields.get("poison", bool, "true or false"),
        source=_source(where, fields.get("source", dict, "a JSON object")),
    )
    fields.done()
    return config


def load_config(environ: Mapping[str, str] = os.environ) -> WorkerConfig:
    """Read the configuration file named by ``STREAMLET_CHAOS_WORKER``.

    Raises:
        ConfigError: the variable is not set, the file cannot be read, or it
            is malformed (see :func:`parse_config`).
    """
    path = environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(
            f"{CONFIG_ENV} is not set: it names the chaos worker's JSON configuration,"
            " which the harness (streamlet chaos) writes"
        )
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the chaos worker config {path} ({CONFIG_ENV}): {exc}"
        ) from None
    return parse_config(text, where=f"chaos worker config {path}")
