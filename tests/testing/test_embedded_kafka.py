"""The embedded broker's tooling: clear hints when tools are missing, cached jars."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamlet.testing.kafka import EmbeddedKafka, ensure_broker_jars, missing_tools


def test_missing_tools_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    hints = missing_tools()
    assert any(h.startswith("java") and "JDK 17" in h for h in hints)
    assert any(h.startswith("mvn") and "Maven" in h for h in hints)


@pytest.mark.kafka
def test_second_run_reuses_cached_jars_without_maven(
    kafka_broker: EmbeddedKafka | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if kafka_broker is None:
        pytest.skip("an external broker is in use; no jars were fetched")
    # With no mvn (nor anything else) on PATH, only the cache can answer.
    monkeypatch.setenv("PATH", str(tmp_path))
    libs = ensure_broker_jars(kafka_broker.cache_dir)
    jars = {p.name for p in libs.iterdir()}
    assert any(name.startswith("kafka_2.13-") for name in jars)
    assert any(name.startswith("kafka-clients-") for name in jars)
