"""The short chaos profile: each scenario breaks a real worker and every record is counted.

Every test runs one scenario of :mod:`streamlet.testing.chaos` on one
pipeline: real ``streamlet run`` processes, real signals, real files damaged
on disk and I/O faults injected through ``STREAMLET_FAULT_FS``. A run passes
when nothing acknowledged was lost, nothing was written twice, per-key order
held, both WALs verify clean, and the scenario's own expectations held (an
I/O fault stops the worker with exit 1 and a clear message, a bit flip is
reported by file and offset, ...). ``STREAMLET_TEST_SEED`` repeats a run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamlet.testing.chaos import PROFILES, SCENARIOS, run_scenario
from streamlet.testing.kafka import missing_tools

SEED = int(os.environ.get("STREAMLET_TEST_SEED", "20261125"))
SHORT = PROFILES["short"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _plan_params() -> list[object]:
    params: list[object] = []
    for p in SHORT:
        # Kafka runs start (and kill) a broker of their own, like tests/kafka need Java.
        marks = [pytest.mark.kafka] if p.pipeline.startswith("kafka") else []
        params.append(
            pytest.param(
                p.scenario,
                p.pipeline,
                p.records,
                p.faults,
                marks=marks,
                id=f"{p.scenario}-{p.pipeline}",
            )
        )
    return params


@pytest.mark.timeout(280)
@pytest.mark.parametrize(("scenario", "pipeline", "records", "faults"), _plan_params())
def test_scenario_loses_and_repeats_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scenario: str,
    pipeline: str,
    records: int,
    faults: int,
) -> None:
    if pipeline.startswith("kafka"):
        missing = missing_tools()
        if missing:
            message = f"the Kafka chaos runs need {' and '.join(missing)}"
            if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        if "STREAMLET_KAFKA_CACHE" not in os.environ:
            monkeypatch.setenv("STREAMLET_KAFKA_CACHE", str(REPO_ROOT / ".cache" / "kafka"))
    result = run_scenario(
        scenario, pipeline, records=records, faults=faults, seed=SEED, workdir=tmp_path
    )
    assert result.ok, result.describe()
    assert result.fault_count == faults, result.describe()
    assert result.records_in >= records
    for sink, count in result.records_out.items():
        assert count + result.dead_letters // 2 == result.records_in, (sink, result.describe())


def test_the_short_profile_covers_every_scenario() -> None:
    assert {p.scenario for p in SHORT} == set(SCENARIOS)


@pytest.mark.timeout(120)
def test_streamlet_chaos_prints_a_report_and_writes_its_json(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamlet",
            "chaos",
            "--scenarios",
            "sigkill_random",
            "--pipelines",
            "sequence",
            "--records",
            "900",
            "--faults",
            "2",
            "--seed",
            str(SEED),
            "--workdir",
            str(tmp_path / "work"),
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"seed {SEED}" in done.stdout
    assert "lost 0, duplicated 0" in done.stdout
    line = json.loads(done.stdout.splitlines()[-2])
    report = json.loads(output.read_text())
    assert line["totals"] == report["totals"]
    assert report["totals"]["process_kills"] == 2
    assert report["totals"]["records_in"] == 900
    assert report["runs"][0]["recovery_p50_s"] is not None
    assert not (tmp_path / "work").exists()  # deleted: every run passed
