"""One engine per process and one session per unit of work.

Workers fork: the parent's pooled connections must not be shared with children, so
``worker_process_init`` calls :func:`dispose_engine` (``close=False`` leaves the parent's
sockets alone, as the SQLAlchemy docs advise for forked processes). SQLite, the embedded
default, gets WAL and a busy timeout because web and several workers write to one file.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from rev_tasks.settings import get_settings

_lock = threading.Lock()
_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None


def make_engine(url: str) -> Engine:
    """An engine with the pragmas and pool settings this farm relies on."""
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
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=connect_args
    )


def get_engine() -> Engine:
    global _engine, _factory
    with _lock:
        if _engine is None:
            _engine = make_engine(get_settings().database_url)
            _factory = sessionmaker(bind=_engine, expire_on_commit=False)
        return _engine


def dispose_engine(close: bool = True) -> None:
    """Drop the pool (``close=False`` after fork); the next use builds a fresh engine."""
    global _engine, _factory
    with _lock:
        if _engine is not None:
            _engine.dispose(close=close)
        _engine = None
        _factory = None


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success, rolls back on error and always closes."""
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
        session.close()
