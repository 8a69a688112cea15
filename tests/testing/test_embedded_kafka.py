"""The embedded broker's tooling: clear hints when tools are missing, cached jars."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
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


def test_fetches_started_at_once_run_maven_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two chaos runs (threads) or test processes starting on a fresh cache: one fetches,
    the other waits and uses its jars. Both fetching into one folder broke Maven's copy."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "mvn"
    # A stand-in for Maven: slow enough to overlap, it "copies" one jar into -DoutputDirectory.
    fake.write_text(
        "#!/bin/sh\n"
        f'echo run >> "{calls}"\n'
        "sleep 0.5\n"
        'for arg in "$@"; do case "$arg" in -DoutputDirectory=*) out="${arg#*=}";; esac; done\n'
        'mkdir -p "$out" && touch "$out/kafka-clients-test.jar"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = list(pool.map(ensure_broker_jars, [cache, cache]))
    assert found[0] == found[1]
    assert [p.name for p in found[0].iterdir()] == ["kafka-clients-test.jar"]
    assert calls.read_text().split() == ["run"]
