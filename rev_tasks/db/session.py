"""One engine per process and one session per unit of work.

Workers fork: the parent's pooled connections must not be shared with children, so
``worker_process_init`` calls :func:`dispose_engine` (``close=False`` leaves the parent's
sockets alone, as the SQLAlchemy docs advise for forked processes). SQLite, the embedded
default, gets WAL and a busy timeout because web and several workers write to one file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
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
