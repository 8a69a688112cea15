"""Chaos harness: run a real worker, break it on purpose, and count every record.

A *scenario* injects one kind of fault into a *pipeline* while numbered input
flows, restarting the worker after each fault; at the end the harness checks
what a user relies on:

* every acknowledged input record is in every exactly-once sink (or, where
  the app sends failures aside, in the dead-letter sink), none twice, and
  nothing is there that was never sent;
* per key (a partition, a TCP client) the records come out in input order;
* ``streamlet wal verify`` finds the state directory's ``tracker/`` and
  ``data/`` logs clean.

The worker is always a real process, ``python -m streamlet run
streamlet.testing.chaos.worker:app``, configured by a JSON file the harness
writes into the run's directory; faults are real signals, real files
damaged on disk, and I/O errors injected into the worker's file layer
through the hooks of :mod:`streamlet._faults`. Random choices come from one
seed, printed with the report, so a failing run can be repeated.

Use it from the command line::

    streamlet chaos --profile short                 # the CI profile, a few minutes
    streamlet chaos --profile long --seed 7         # 1,000,000+ records, 200+ kills
    python -m streamlet.testing.chaos --scenarios sigkill_random,torn_tail --records 5000

or from Python::

    from streamlet.testing.chaos import run_scenario
    result = run_scenario("sigkill_random", "sequence", records=5000, faults=5, seed=1,
                          workdir=tmp_path)
    assert result.ok, result.describe()

The package, one job per module:

* :mod:`~streamlet.testing.chaos.config`: the worker's configuration (JSON)
  and the poison rule, what the harness and the worker agree on;
* :mod:`~streamlet.testing.chaos.worker`: the one app under test, built
  from that configuration;
* :mod:`~streamlet.testing.chaos.process`: a worker process seen from the
  harness (start, batches, signals);
* :mod:`~streamlet.testing.chaos.inputs` and
  :mod:`~streamlet.testing.chaos.kafka`: the pipelines, feeding their input
  (the Kafka ones with a broker of their own);
* :mod:`~streamlet.testing.chaos.faults`: how each scenario breaks the
  worker;
* :mod:`~streamlet.testing.chaos.scenarios`: scenarios, pipelines and
  profiles as data;
* :mod:`~streamlet.testing.chaos.readback` and
  :mod:`~streamlet.testing.chaos.checks`: reading the outputs back, and the
  pure checks over them;
* :mod:`~streamlet.testing.chaos.run`: one run and a profile of runs;
* :mod:`~streamlet.testing.chaos.report`: the report and its JSON.

Scenarios and pipelines are plug-ins: :func:`register` adds a
:class:`Scenario` (a function that injects faults through a :class:`Run`),
and :data:`PIPELINES` maps a name to a :class:`Pipeline` subclass (the
source its worker reads and the input it feeds). The worker writes each
record's value ``"<key>:<number>"`` to a FileSink in ``files/`` and to a
SQLiteSink table ``seen(v)`` in ``out.db``, and its dead letters (if any)
to a FileSink in ``dead/``; the checks read those.
"""

from __future__ import annotations

from streamlet.testing.chaos.checks import Outputs, SinkCheck, check_sink
from streamlet.testing.chaos.config import WorkerConfig, poisoned
from streamlet.testing.chaos.inputs import Pipeline
from streamlet.testing.chaos.process import Worker
from streamlet.testing.chaos.report import Report, ScenarioResult, write_report
from streamlet.testing.chaos.run import Run, run_profile, run_scenario
from streamlet.testing.chaos.scenarios import (
    PIPELINES,
    PROFILES,
    SCENARIOS,
    Plan,
    Scenario,
    register,
)

__all__ = [
    "PIPELINES",
    "PROFILES",
    "SCENARIOS",
    "Outputs",
    "Pipeline",
    "Plan",
    "Report",
    "Run",
    "Scenario",
    "ScenarioResult",
    "SinkCheck",
    "Worker",
    "WorkerConfig",
    "check_sink",
    "poisoned",
    "register",
    "run_profile",
    "run_scenario",
    "write_report",
]
