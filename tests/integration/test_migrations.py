"""Alembic: ``upgrade head`` from empty creates exactly the models' schema; ``downgrade base``
removes it again, on PostgreSQL and on the embedded SQLite default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from rev_tasks.testing.harness import ROOT

pytestmark = pytest.mark.integration

TABLES = {
    "models",
    "fingerprints",
    "jobs",
    "transcripts",
    "votes",
    "api_keys",
    "certificates",
    "signing_keys",
    "idempotency_keys",
}


def _alembic(url: str, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def _roundtrip(url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from rev_tasks.db.tables import Base

    _alembic(url, "upgrade", "head")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= TABLES
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], diff
        _alembic(url, "downgrade", "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_postgres_upgrade_and_downgrade() -> None:
    from tests.conftest import TEST_DB, _pg_admin_url, service_unavailable

    try:
        import psycopg

        admin = psycopg.connect(_pg_admin_url(), autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        service_unavailable(f"PostgreSQL is not reachable: {exc}")
        return
    name = f"{TEST_DB}_migrations"
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(_pg_admin_url())
    url = (
        f"postgresql+psycopg://{info.get('user', 'postgres')}@"
        f"{info.get('host', '127.0.0.1')}:{info.get('port', '5432')}/{name}"
    )
    try:
        _roundtrip(url)
    finally:
        with psycopg.connect(_pg_admin_url(), autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_sqlite_upgrade_and_downgrade(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'rev.db'}")
