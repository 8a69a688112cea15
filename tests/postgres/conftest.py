"""Fixtures: a real PostgreSQL server for the session, and a fresh database per test.

``postgres_dsn`` is the superuser URL of a real server. With
``STREAMLET_TEST_POSTGRES=postgresql://...`` set, that server is used (its
user must be allowed to create databases); otherwise the system's
PostgreSQL binaries (Debian's ``postgresql`` package, which ``scripts/test``
installs when it runs as root) are run on loopback by
:class:`~streamlet.testing.postgres.EmbeddedPostgres` and stopped at the end.
Without either, the tests are skipped with what to install, except under
``CI=true``, where they fail: CI must never pass without a server.

``own_postgres`` is a server of the test's own, which the test may stop and
start (a shared or external server cannot be restarted under other tests).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from streamlet.testing.postgres import (
    EmbeddedPostgres,
    PostgresError,
    database_dsn,
    missing_tools,
)

POSTGRES_ENV = "STREAMLET_TEST_POSTGRES"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def _embedded() -> EmbeddedPostgres:
    missing = missing_tools()
    if missing:
        _unavailable(
            "the PostgreSQL tests need a server; install "
            + " and ".join(missing)
            + f", or set {POSTGRES_ENV}=postgresql://user:password@host:port/db to use your own"
        )
    server = EmbeddedPostgres()
    try:
        server.start()
    except PostgresError as exc:
        server.cleanup()
        pytest.fail(f"the embedded PostgreSQL server did not start: {exc}", pytrace=False)
    return server


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """The superuser URL of the session's real PostgreSQL server."""
    external = os.environ.get(POSTGRES_ENV)
    if external:
        yield external
        return
    server = _embedded()
    print(f"\nembedded PostgreSQL on port {server.port} ready in {server.startup_seconds:.1f}s")
    try:
        yield server.dsn
    finally:
        server.cleanup()


async def _create_database(dsn: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def _drop_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def pg_database(postgres_dsn: str) -> AsyncIterator[str]:
    """The URL of a new, empty database on the session's server; dropped afterwards."""
    try:
        name = await _create_database(postgres_dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"cannot create a database on the test server: {exc}", pytrace=False)
    try:
        yield database_dsn(postgres_dsn, name)
    finally:
        await _drop_database(postgres_dsn, name)


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A server of this test's own, which it may stop, crash and start again."""
    server = _embedded()
    try:
        yield server
    finally:
        server.cleanup()
