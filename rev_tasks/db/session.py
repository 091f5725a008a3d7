"""One engine per process and one session per unit of work.

Workers fork: the parent's pooled connections must not be shared with children, so
``worker_process_init`` calls :func:`dispose_engine` (``close=False`` leaves the parent's
sockets alone, as the SQLAlchemy docs advise for forked processes). SQLite, the embedded
default, gets WAL and a busy timeout because web and several workers write to one file.

Round trips are what a request of the coordinator costs (docs/performance.md): reads go
through :func:`read_scope` (no BEGIN/COMMIT), and a pooled connection is pinged only when
it sat idle (see :func:`make_engine`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

from rev_tasks.settings import get_settings

_lock = threading.Lock()
_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None
_read_factory: sessionmaker[Session] | None = None
_READ_ONLY = "rev_read_only"


def _ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """Ping a pooled connection at checkout only if it sat idle ``idle_seconds`` or more.

    ``pool_pre_ping`` pings on every checkout: one more round trip for each unit of work,
    as many as the statement itself for a read of one row. A connection back in the pool a
    moment ago is almost always alive; one that sat idle is the one a database restart or
    a dropped proxy left broken, and the ping (SQLAlchemy's own, failing as a
    ``DisconnectionError``) makes the pool replace it before any request sees it. A
    connection that breaks under load fails its statement instead, and SQLAlchemy's
    disconnect handling then invalidates the whole pool, so one unit of work per process
    sees the error (a 503), not every pooled connection. ``idle_seconds <= 0`` pings always.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["rev_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("rev_idle_since")
        if since is None or time.monotonic() - since < idle_seconds:
            return  # a new connection, or one in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as err:  # noqa: BLE001 - any failure: replace the connection
            raise exc.DisconnectionError(f"pooled connection failed its ping: {err}") from err


def make_engine(url: str, ping_idle_seconds: float | None = None) -> Engine:
    """An engine with the pragmas and pool settings this farm relies on.

    ``ping_idle_seconds``: ping a pooled PostgreSQL connection before use only after it
    sat idle that long (``REV_DB_PING_IDLE_SECONDS``); ``None`` takes the setting.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # connect_timeout: a database behind a dead network path fails a request (503) or a
    # task (retried) in seconds instead of hanging it for the kernel's TCP timeout.
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    # pool_size: a sync gunicorn worker or a prefork child holds one connection at a time;
    # a gthread worker up to one per thread plus the read and write sessions of a request.
    engine = create_engine(url, pool_size=5, max_overflow=5, connect_args=connect_args)
    if ping_idle_seconds is None:
        ping_idle_seconds = get_settings().db_ping_idle_seconds
    _ping_when_idle(engine, ping_idle_seconds)
    return engine


def _refuse_writes(session: Session, _context: Any, _instances: Any) -> None:
    if session.info.get(_READ_ONLY):
        raise RuntimeError("read_scope() sessions are for reads: write in a session_scope()")


def get_engine() -> Engine:
    global _engine, _factory, _read_factory
    with _lock:
        if _engine is None:
            _engine = make_engine(get_settings().database_url)
            _factory = sessionmaker(bind=_engine, expire_on_commit=False)
            _read_factory = sessionmaker(
                bind=_engine.execution_options(isolation_level="AUTOCOMMIT"),
                expire_on_commit=False,
                info={_READ_ONLY: True},
            )
            event.listen(_read_factory, "before_flush", _refuse_writes)
        return _engine


def dispose_engine(close: bool = True) -> None:
    """Drop the pool (``close=False`` after fork); the next use builds a fresh engine."""
    global _engine, _factory, _read_factory
    with _lock:
        if _engine is not None:
            _engine.dispose(close=close)
        _engine = None
        _factory = None
        _read_factory = None


_AFTER_COMMIT = "rev_after_commit"


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` once ``session`` (a :func:`session_scope`) has committed and closed.

    How every message that names a row is sent: the worker that receives it must find the
    row, so the send waits for the commit, and a rolled-back unit of work sends nothing.
    Callbacks run in order; an exception from one propagates (the commit stands).
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success, rolls back on error and always closes.

    After a successful commit it runs the session's :func:`after_commit` callbacks.
    """
    get_engine()
    assert _factory is not None
    session = _factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        callbacks = session.info.pop(_AFTER_COMMIT, [])
        session.close()
    for callback in callbacks:
        callback()


@contextmanager
def read_scope() -> Iterator[Session]:
    """A session for reads: each statement commits by itself (autocommit), then it closes.

    A read in :func:`session_scope` costs BEGIN, the SELECT and COMMIT: three round trips
    where one does, and a request that only reads has nothing to commit. Each statement
    sees the data committed when it runs (PostgreSQL's READ COMMITTED gives no more within
    a transaction either). A flush raises: writes belong in a :func:`session_scope`.
    """
    get_engine()
    assert _read_factory is not None
    session = _read_factory()
    try:
        yield session
    finally:
        session.close()
