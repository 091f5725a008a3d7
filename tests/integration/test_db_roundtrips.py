"""What a unit of work sends to the real PostgreSQL: reads without a transaction, and a
pooled connection pinged only after it sat idle (rev_tasks/db/session.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import exc, text

from rev_tasks.db import session as db
from rev_tasks.settings import reset_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def database(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    reset_settings()
    db.dispose_engine()
    yield postgres_url
    db.dispose_engine()
    monkeypatch.undo()
    reset_settings()


def _terminate(pid: int) -> None:
    admin = (
        os.environ.get("REV_TEST_PG_ADMIN_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    with psycopg.connect(admin, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    time.sleep(0.2)  # the backend exits asynchronously


def test_read_scope_sends_no_begin(database: str) -> None:
    with db.read_scope() as s:
        assert s.execute(text("SELECT 1")).scalar() == 1
        raw: Any = s.connection().connection.dbapi_connection
        # autocommit: the SELECT ran without BEGIN, and nothing is left to COMMIT
        assert raw.autocommit and raw.info.transaction_status == TransactionStatus.IDLE
    with db.session_scope() as s:  # the writer's pool connection is transactional again
        s.execute(text("SELECT 1"))
        raw = s.connection().connection.dbapi_connection
        assert not raw.autocommit and raw.info.transaction_status == TransactionStatus.INTRANS


def _backend_pid(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar())


def test_an_idle_connection_is_pinged_and_replaced(database: str) -> None:
    engine = db.make_engine(database, 0.3)
    try:
        pid = _backend_pid(engine)
        _terminate(pid)
        time.sleep(0.3)  # idle past the threshold: the checkout pings, fails, reconnects
        assert _backend_pid(engine) != pid
    finally:
        engine.dispose()


def test_a_hot_connection_is_not_pinged(database: str) -> None:
    """The price of the saved round trip, measured: a connection broken while it was hot
    fails its one statement, and the pool is replaced for the next unit of work."""
    engine = db.make_engine(database, 60.0)
    try:
        pid = _backend_pid(engine)
        _terminate(pid)
        with pytest.raises(exc.OperationalError), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert _backend_pid(engine) != pid
    finally:
        engine.dispose()
