"""The chaos worker's configuration: read back as written, and refused clearly when malformed.

A worker that misreads its configuration would test another app than the
harness checks; one that fails on a bad file with a traceback would hide
which field is wrong. Every malformed file is a ``ConfigError`` naming the
file and the field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import streamlet as sl
from streamlet.testing.chaos.config import (
    CONFIG_ENV,
    KafkaInput,
    SequenceInput,
    TcpInput,
    WorkerConfig,
    load_config,
    parse_config,
)
from streamlet.testing.chaos.worker import build_app

REPO_ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, source: SequenceInput | TcpInput | KafkaInput) -> WorkerConfig:
    return WorkerConfig(
        pipeline="test",
        state_dir=str(tmp_path / "state"),
        files=str(tmp_path / "files"),
        db=str(tmp_path / "out.db"),
        dead_letter=str(tmp_path / "dead"),
        poison=True,
        source=source,
    )


@pytest.mark.parametrize(
    "source",
    [
        SequenceInput(partitions=3, limit=100, rate=50.0),
        SequenceInput(partitions=1, limit=0, rate=None),
        TcpInput(port=4321),
        KafkaInput(bootstrap="127.0.0.1:9092", mode="receiver"),
    ],
    ids=["sequence", "sequence-unpaced", "tcp", "kafka"],
)
def test_a_config_reads_back_as_written(
    tmp_path: Path, source: SequenceInput | TcpInput | KafkaInput
) -> None:
    config = _config(tmp_path, source)
    assert parse_config(config.to_json()) == config


def test_load_config_reads_the_file_the_variable_names(tmp_path: Path) -> None:
    config = _config(tmp_path, TcpInput(port=1))
    path = tmp_path / "worker.json"
    config.write(path)
    assert load_config({CONFIG_ENV: str(path)}) == config


def _valid() -> dict[str, object]:
    return {
        "pipeline": "sequence",
        "state_dir": "/s",
        "files": "/f",
        "db": "/d.db",
        "dead_letter": None,
        "poison": False,
        "source": {"kind": "sequence", "partitions": 3, "limit": 10, "rate": 5.0},
    }


def _with(**changes: object) -> str:
    body = _valid()
    for name, value in changes.items():
        if value is _DROP:
            del body[name]
        else:
            body[name] = value
    return json.dumps(body)


def _with_source(**changes: object) -> str:
    source = dict(_valid()["source"])  # type: ignore[call-overload]
    source.update(changes)
    return _with(source=source)


_DROP = object()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "chaos worker config: not JSON: "),
        ("[]", "the configuration must be a JSON object, not a JSON array"),
        (_with(db=_DROP), "the configuration has no 'db' (a file path)"),
        (_with(files=7), "'files' must be a directory path, not 7"),
        (_with(poison="yes"), "'poison' must be true or false, not 'yes'"),
        (_with(extra=1), "the configuration has unknown fields ['extra']"),
        (_with(source="tcp"), "'source' must be a JSON object, not 'tcp'"),
        (_with_source(kind="udp"), "source 'kind' must be one of sequence, tcp, kafka, not 'udp'"),
        (_with_source(partitions=0), "source 'partitions' must be an integer >= 1, not 0"),
        (_with_source(partitions=True), "source 'partitions' must be an integer >= 1, not True"),
        (_with_source(rate=-1), "source 'rate' must be > 0 or null, not -1"),
        (_with_source(port=80), "source has unknown fields ['port']"),
        (
            json.dumps({**_valid(), "source": {"kind": "kafka", "bootstrap": "b:1"}}),
            "source has no 'mode'",
        ),
        (
            json.dumps({**_valid(), "source": {"kind": "kafka", "bootstrap": "b", "mode": "x"}}),
            "source 'mode' must be 'direct' or 'receiver', not 'x'",
        ),
    ],
)
def test_a_malformed_config_is_a_config_error_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(sl.ConfigError) as caught:
        parse_config(text)
    assert str(caught.value).startswith("chaos worker config: ")
    assert message in str(caught.value)


def test_a_missing_config_says_who_writes_it(tmp_path: Path) -> None:
    with pytest.raises(
        sl.ConfigError, match=rf"{CONFIG_ENV} is not set: .* \(streamlet chaos\) writes"
    ):
        load_config({})
    missing = tmp_path / "nowhere.json"
    with pytest.raises(sl.ConfigError, match=f"cannot read the chaos worker config {missing}"):
        load_config({CONFIG_ENV: str(missing)})
    bad = tmp_path / "bad.json"
    bad.write_text(_with(poison=1))
    with pytest.raises(sl.ConfigError, match=f"chaos worker config {bad}: 'poison' must be"):
        load_config({CONFIG_ENV: str(bad)})


def test_the_worker_module_refuses_a_malformed_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "worker.json"
    bad.write_text(_with_source(kind="udp"))
    env = {**os.environ, CONFIG_ENV: str(bad), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "streamlet.testing.chaos.worker"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"error: chaos worker config {bad}: source 'kind' must be one of sequence, tcp, kafka,"
        " not 'udp'\n"
    )


def test_the_app_has_the_handlers_and_sinks_the_checks_read(tmp_path: Path) -> None:
    app = build_app(_config(tmp_path, SequenceInput(partitions=2, limit=5, rate=None)))
    manifest = app.manifest()
    text = json.dumps(manifest)
    for name in ("input", "to_files", "to_db"):
        assert name in text
    assert "to_kafka" not in text
