"""The fault hooks: injected fsync errors, a full disk, slow fsyncs, clock jumps."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamlet._faults import FaultyFileSystem, file_system, parse_fs_faults
from streamlet.errors import ConfigError
from streamlet.fs import OsFileSystem


def test_fault_specs_parse_and_bad_ones_say_what_is_wrong() -> None:
    faults = parse_fs_faults("fsync_eio:*/tracker/*:3; enospc:*/out/*:100;slow_fsync:50")
    assert [(f.kind, f.pattern, f.amount) for f in faults] == [
        ("fsync_eio", "*/tracker/*", 3),
        ("enospc", "*/out/*", 100),
        ("slow_fsync", "*", 50),
    ]
    for bad in ("fsync_eio:3", "explode:*:1", "enospc:*:lots"):
        with pytest.raises(ConfigError, match="STREAMLET_FAULT_FS"):
            parse_fs_faults(bad)


def test_the_real_file_system_unless_the_variable_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMLET_FAULT_FS", raising=False)
    assert type(file_system()) is OsFileSystem
    monkeypatch.setenv("STREAMLET_FAULT_FS", "slow_fsync:1")
    assert isinstance(file_system(), FaultyFileSystem)


def test_fsync_fails_with_eio_after_n_and_stays_failed(tmp_path: Path) -> None:
    fs = FaultyFileSystem(parse_fs_faults(f"fsync_eio:{tmp_path}/a*:2"))
    file = fs.create(str(tmp_path / "a.log"))
    other = fs.create(str(tmp_path / "b.log"))
    file.append(b"x")
    file.sync()
    file.sync()
    other.sync()  # does not match: never fails, not counted
    for _ in range(2):
        with pytest.raises(OSError, match=r"a\.log") as caught:
            file.sync()
        assert caught.value.errno == errno.EIO
    file.close()
    other.close()


def test_a_full_disk_writes_what_fits_then_refuses(tmp_path: Path) -> None:
    fs = FaultyFileSystem(parse_fs_faults(f"enospc:{tmp_path}/*:10"))
    file = fs.create(str(tmp_path / "out"))
    file.append(b"123456")
    with pytest.raises(OSError, match="No space left") as caught:
        file.append(b"abcdefgh")
    assert caught.value.errno == errno.ENOSPC
    file.close()
    assert (tmp_path / "out").read_bytes() == b"123456abcd"
    with pytest.raises(OSError, match="No space left") as created:
        fs.create(str(tmp_path / "more"))
    assert created.value.errno == errno.ENOSPC


def test_slow_fsync_sleeps_before_each_matching_sync(tmp_path: Path) -> None:
    slept: list[float] = []
    fs = FaultyFileSystem(parse_fs_faults("slow_fsync:250"), sleep=slept.append)
    file = fs.create(str(tmp_path / "f"))
    file.sync()
    file.close()
    fs.sync_dir(str(tmp_path))
    assert slept == [0.25, 0.25]


def test_the_clock_jumps_in_a_worker_process_and_monotonic_does_not() -> None:
    code = (
        "import time; real = time.time; import streamlet, streamlet._faults\n"
        "assert time.time is real, 'importing streamlet replaced time.time'\n"
        "streamlet._faults.install_clock()\n"
        "t0, m0 = time.time(), time.monotonic(); time.sleep(0.3)\n"
        "print(time.time() - t0, time.monotonic() - m0)"
    )
    env = {**os.environ, "STREAMLET_FAULT_CLOCK": "-3600@0.1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    wall, mono = map(float, done.stdout.split())
    assert -3600 < wall < -3599
    assert 0.25 < mono < 5


def test_a_malformed_crash_point_is_a_config_error_when_the_app_starts_not_at_import() -> None:
    code = (
        "import streamlet, streamlet._faults\n"
        "try:\n"
        "    streamlet._faults.check_environment()\n"
        "except streamlet.ConfigError as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = {**os.environ, "STREAMLET_CRASH_AT": "after_sink_comit:x"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "refused: STREAMLET_CRASH_AT='after_sink_comit:x'" in done.stdout
    assert "after_sink_commit" in done.stdout  # the known points are listed
