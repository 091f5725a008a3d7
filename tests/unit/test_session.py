"""session_scope + after_commit: a message that names a row is sent only once the row is
committed, never after a rollback (SQLite file; the farm tests run it on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from rev_tasks.db import session as db
from rev_tasks.settings import reset_settings


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'unit.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    reset_settings()
    db.dispose_engine()
    with db.session_scope() as s:
        s.execute(text("CREATE TABLE rows (name TEXT PRIMARY KEY)"))
    yield url
    db.dispose_engine()
    monkeypatch.undo()
    reset_settings()


def _committed_rows(url: str) -> list[str]:
    """What another connection sees: only committed rows."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT name FROM rows ORDER BY name"))]
    finally:
        engine.dispose()


def test_callbacks_run_after_the_commit_in_order(database: str) -> None:
    seen: list[tuple[str, list[str]]] = []
    with db.session_scope() as s:
        s.execute(text("INSERT INTO rows VALUES ('a')"))
        db.after_commit(s, lambda: seen.append(("first", _committed_rows(database))))
        db.after_commit(s, lambda: seen.append(("second", _committed_rows(database))))
        assert seen == []  # nothing is sent while the transaction is open
    assert seen == [("first", ["a"]), ("second", ["a"])]


def test_a_rolled_back_unit_of_work_sends_nothing(database: str) -> None:
    sent: list[str] = []
    with pytest.raises(RuntimeError, match="refused"), db.session_scope() as s:
        s.execute(text("INSERT INTO rows VALUES ('b')"))
        db.after_commit(s, lambda: sent.append("b"))
        raise RuntimeError("refused")
    assert sent == [] and _committed_rows(database) == []
    with db.session_scope() as s:  # the next unit of work does not inherit the callback
        s.execute(text("INSERT INTO rows VALUES ('c')"))
    assert sent == []


def test_a_failing_callback_propagates_and_the_commit_stands(database: str) -> None:
    def broker_down() -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError), db.session_scope() as s:
        s.execute(text("INSERT INTO rows VALUES ('d')"))
        db.after_commit(s, broker_down)
    assert _committed_rows(database) == ["d"]


def test_read_scope_reads_committed_rows_and_refuses_writes(database: str) -> None:
    with db.session_scope() as s:
        s.execute(text("INSERT INTO rows VALUES ('r')"))
    with db.read_scope() as s:
        assert s.execute(text("SELECT name FROM rows")).scalars().all() == ["r"]
    from rev_tasks.db.tables import ApiKey

    with pytest.raises(RuntimeError, match="read_scope"), db.read_scope() as s:
        s.add(ApiKey(id="x", tenant="t", scopes="read", token_hash="h"))
        s.flush()
