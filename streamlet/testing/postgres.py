"""A real PostgreSQL server on loopback, for tests and benchmarks.

The server is the system's own PostgreSQL (Debian's ``postgresql`` package:
``initdb`` and ``postgres`` under ``/usr/lib/postgresql/<version>/bin``, or
wherever ``pg_config --bindir`` says), initialised in a fresh temporary
directory and run as a child process listening on a free loopback port.
PostgreSQL refuses to run as root, so when this process is root the server
runs as an unprivileged user (``nobody`` by default) that owns the data
directory. Nothing is mocked: transactions, locks, deadlock detection and
crash recovery are the server's own.

Usage::

    server = EmbeddedPostgres()
    server.start()                 # initdb on first start, waits until ready
    ...  # server.dsn == "postgresql://streamlet:<password>@127.0.0.1:PORT/postgres"
    server.stop("fast")            # or "immediate" (crash recovery on the next start)
    server.start()                 # same data, same port
    server.cleanup()

The superuser is ``streamlet`` with a random password (scram-sha-256), so a
connection without it is refused, as in production. The settings suit a
disposable server: ``fsync=off`` (a process crash, even ``immediate``, keeps
every commit: the WAL is written to the kernel at commit; only a machine
crash would lose it), a short ``deadlock_timeout``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = [
    "EmbeddedPostgres",
    "PostgresError",
    "database_dsn",
    "find_bindir",
    "missing_tools",
]

ShutdownMode = Literal["smart", "fast", "immediate"]

#: postgres(1): SIGTERM is a smart shutdown, SIGINT fast, SIGQUIT immediate.
_SHUTDOWN_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
_USER = "streamlet"


class PostgresError(RuntimeError):
    """The embedded server could not be set up, started or stopped."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None when there is none.

    ``STREAMLET_POSTGRES_BINDIR`` first, then ``pg_config --bindir``, then the
    newest ``/usr/lib/postgresql/<version>/bin`` (Debian puts the server
    binaries there, off PATH).
    """
    candidates: list[Path] = []
    configured = os.environ.get("STREAMLET_POSTGRES_BINDIR")
    if configured:
        candidates.append(Path(configured))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    candidates.extend(
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    )
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    return None


def missing_tools() -> list[str]:
    """What must be installed before :class:`EmbeddedPostgres` can run (empty: nothing)."""
    if find_bindir() is None:
        return ["PostgreSQL's server binaries (Debian: apt-get install postgresql)"]
    return []


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def database_dsn(dsn: str, database: str) -> str:
    """``dsn`` with its database replaced by ``database``."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database)))


class EmbeddedPostgres:
    """A disposable PostgreSQL server; see the module docstring.

    Args:
        run_as: the user the server runs as when this process is root
            (ignored otherwise: the server then runs as this process's user).
        port: the loopback port (0: a free one, chosen at the first start).
        settings: ``postgresql.conf`` settings over the defaults above, as
            they are written there (``{"fsync": "on"}`` for a benchmark).
    """

    def __init__(
        self, *, run_as: str = "nobody", port: int = 0, settings: dict[str, str] | None = None
    ) -> None:
        self.port = port
        self._settings = dict(settings or {})
        self.password = secrets.token_urlsafe(18)
        self.startup_seconds = 0.0
        self._run_as = run_as if os.geteuid() == 0 else None
        self._work: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        """The superuser's connection URL for database ``postgres``."""
        return f"postgresql://{_USER}:{quote(self.password)}@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        if self._work is None:
            raise PostgresError("the server was never started")
        return self._work / "data"

    @property
    def log_path(self) -> Path:
        if self._work is None:
            raise PostgresError("the server was never started")
        return self._work / "server.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (its session id too), while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, PostgresError):
            return ""

    def _ids(self) -> tuple[int, int] | None:
        if self._run_as is None:
            return None
        entry = pwd.getpwnam(self._run_as)
        return entry.pw_uid, entry.pw_gid

    def _popen_user(self) -> dict[str, object]:
        ids = self._ids()
        if ids is None:
            return {}
        return {"user": ids[0], "group": ids[1], "extra_groups": []}

    def _init(self, bindir: Path) -> None:
        # Not under pytest's tmp_path: its parents are private to root, and
        # the server's user must reach its data directory.
        work = Path(tempfile.mkdtemp(prefix="streamlet-postgres-"))
        ids = self._ids()
        if ids is not None:
            os.chown(work, *ids)
        self._work = work
        pwfile = work / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if ids is not None:
            os.chown(pwfile, *ids)
        done = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(work / "data"),
                "-U",
                _USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=work,
            **self._popen_user(),  # type: ignore[call-overload]
        )
        pwfile.unlink()
        if done.returncode != 0:
            raise PostgresError(f"initdb failed:\n{(done.stdout + done.stderr)[-3000:]}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{work}'",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "deadlock_timeout": "100ms",
            "log_min_messages": "warning",
            **self._settings,
        }
        with (work / "data" / "postgresql.conf").open("a") as conf:
            conf.write("\n# streamlet.testing.postgres\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self, timeout: float = 60.0) -> None:
        """Initialise (first start) and start the server; wait until it accepts connections.

        Raises:
            PostgresError: the binaries are missing, or the server did not
                come up (with the tail of its log).
        """
        if self.running:
            return
        bindir = find_bindir()
        if bindir is None:
            raise PostgresError("cannot run PostgreSQL; missing: " + "; ".join(missing_tools()))
        began = time.monotonic()
        if self._work is None:
            self._init(bindir)
        if not self.port:
            self.port = _free_port()
        with self.log_path.open("ab") as log:
            if self._ids() is not None:
                os.chown(self.log_path, *self._ids())  # type: ignore[misc]
            self._process = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self._work,
                **self._popen_user(),  # type: ignore[call-overload]
            )
        ready = bindir / "pg_isready"
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise PostgresError(
                    f"postgres exited with code {code} during start-up; log {self.log_path}:\n"
                    + self.log_tail()
                )
            probe = subprocess.run(
                [str(ready), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-t", "2"],
                check=False,
                timeout=10,
            )
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop("immediate")
                raise PostgresError(
                    f"postgres did not accept connections within {timeout:.0f}s; log"
                    f" {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - began

    def stop(self, mode: ShutdownMode = "fast", timeout: float = 30.0) -> None:
        """Shut the server down: ``smart``, ``fast`` (clients disconnected, a checkpoint)
        or ``immediate`` (processes quit at once; crash recovery at the next start).
        SIGKILL after ``timeout``.
        """
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(_SHUTDOWN_SIGNALS[mode])
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._process = None

    def restart(self, mode: ShutdownMode = "fast", *, down_for: float = 0.0) -> None:
        """Stop with ``mode``, stay down ``down_for`` seconds, start again."""
        self.stop(mode)
        time.sleep(down_for)
        self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its directory."""
        self.stop("immediate")
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
