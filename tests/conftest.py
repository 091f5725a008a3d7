"""Shared fixtures: the real services the integration tests run against.

* ``redis_url``: ``REDIS_URL`` or ``redis://127.0.0.1:6379/15``.
* ``postgres_url``: a dedicated database ``rev_test`` created (and dropped afterwards) on
  the server named by ``REV_TEST_PG_ADMIN_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``),
  migrated with ``alembic upgrade head``.

When ``CI=true`` a missing service FAILS the test (CI must never go green by skipping);
on a developer machine it skips with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CI = os.environ.get("CI", "").lower() == "true"
DEFAULT_TEST_REDIS = "redis://127.0.0.1:6379/15"
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# REV_TEST_DB lets two people (or CI jobs) share one PostgreSQL server without dropping
# each other's database.
TEST_DB = os.environ.get("REV_TEST_DB") or "rev_test"


def service_unavailable(reason: str) -> None:
    """Fail under CI, skip locally: a CI run must not pass by skipping its integration tests."""
    if CI:
        pytest.fail(f"required service unavailable (CI=true): {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("REDIS_URL") or DEFAULT_TEST_REDIS
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        service_unavailable(f"Redis at {url} is not reachable: {exc}")
    return url


def _pg_admin_url() -> str:
    return os.environ.get("REV_TEST_PG_ADMIN_URL") or DEFAULT_PG_ADMIN


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh ``rev_test`` database, migrated to head; dropped at the end of the session."""
    try:
        import psycopg

        admin = psycopg.connect(_pg_admin_url(), autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        service_unavailable(f"PostgreSQL at {_pg_admin_url()} is not reachable: {exc}")
        raise  # unreachable: skip/fail raise
    from psycopg.conninfo import conninfo_to_dict

    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{TEST_DB}"')
    info = conninfo_to_dict(_pg_admin_url())
    info["dbname"] = TEST_DB
    host, port = info.get("host", "127.0.0.1"), info.get("port", "5432")
    user = info.get("user", "postgres")
    url = f"postgresql+psycopg://{user}@{host}:{port}/{TEST_DB}"
    if info.get("password"):
        url = f"postgresql+psycopg://{user}:{info['password']}@{host}:{port}/{TEST_DB}"
    env = {**os.environ, "DATABASE_URL": url}
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"alembic upgrade head failed:\n{proc.stderr}"
    yield url
    with psycopg.connect(_pg_admin_url(), autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)')
