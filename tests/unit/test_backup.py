"""rev_tasks.ops.backup against real databases: SQLite files and the PostgreSQL server.

The PostgreSQL round trip uses throw-away databases (rev_backup_test_src/_dst) created and
dropped here; with CI=true an unreachable server fails the test instead of skipping it.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from rev_tasks import queues
from rev_tasks.ops import backup
from rev_tasks.queues import Task

PG_ADMIN = os.environ.get("REV_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SRC_DB, DST_DB = "rev_backup_test_src", "rev_backup_test_dst"


def _failures() -> float:
    return REGISTRY.get_sample_value("rev_backup_failures_total") or 0.0


def _make_sqlite(path: Path, rows: int = 50) -> None:
    con = sqlite3.connect(path)
    with con:
        con.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, verdict TEXT, payload BLOB)")
        con.execute("CREATE TABLE votes (job_id TEXT REFERENCES jobs(id), voter INT, vote TEXT)")
        con.execute("CREATE INDEX votes_job ON votes(job_id)")
        con.executemany(
            "INSERT INTO jobs VALUES (?, ?, ?)",
            [
                (f"job-{i}", "SAME" if i % 2 else "DIFFERENT", bytes([i % 256]) * 64)
                for i in range(rows)
            ],
        )
        con.executemany(
            "INSERT INTO votes VALUES (?, ?, ?)",
            [(f"job-{i}", v, "accept") for i in range(rows) for v in range(5)],
        )
    con.close()


def _dump_sqlite(path: Path) -> dict[str, list[tuple]]:
    con = sqlite3.connect(path)
    try:
        return {
            t: con.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("jobs", "votes")
        }
    finally:
        con.close()


# --------------------------------------------------------------------------- SQLite
def test_sqlite_backup_list_prune_restore_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "rev.db"
    _make_sqlite(src)
    dest = tmp_path / "backups"
    dest.mkdir()
    (dest / "notes.txt").write_text("not ours")
    (dest / "rev-latest.dump").write_text("not ours either: wrong name pattern")

    made = [backup.backup_now(f"sqlite:///{src}", dest, keep=3) for _ in range(5)]
    assert all(p.suffix == ".sqlite3" and p.name.startswith("rev-") for p in made)
    listed = backup.list_backups(dest)
    assert [b.path for b in listed] == made[-3:]  # newest three, oldest first
    assert all(b.kind == "sqlite" and b.size_bytes > 0 for b in listed)
    assert (dest / "notes.txt").exists() and (dest / "rev-latest.dump").exists()
    assert not list(dest.glob(".rev-*"))  # no temporary left behind

    target = tmp_path / "restored" / "rev.db"
    backup.restore(listed[-1].path, f"sqlite:///{target}")
    assert _dump_sqlite(target) == _dump_sqlite(src)

    with pytest.raises(backup.BackupInputError, match="not empty"):
        backup.restore(listed[-1].path, f"sqlite:///{target}")
    con = sqlite3.connect(target)
    with con:
        con.execute("DELETE FROM votes")
    con.close()
    backup.restore(listed[-1].path, f"sqlite:///{target}", force=True)
    assert _dump_sqlite(target) == _dump_sqlite(src)


def test_sqlite_backup_is_consistent_while_a_writer_is_open(tmp_path: Path) -> None:
    src = tmp_path / "rev.db"
    _make_sqlite(src, rows=10)
    writer = sqlite3.connect(src, isolation_level=None)
    writer.execute("BEGIN")
    writer.execute("INSERT INTO jobs VALUES ('uncommitted', 'SAME', x'00')")
    try:
        path = backup.backup_now(f"sqlite:///{src}", tmp_path / "b")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    con = sqlite3.connect(path)
    ids = {r[0] for r in con.execute("SELECT id FROM jobs")}
    con.close()
    assert len(ids) == 10 and "uncommitted" not in ids


def test_failures_are_one_line_and_counted(tmp_path: Path) -> None:
    before = _failures()
    with pytest.raises(backup.BackupInputError, match="not found"):
        backup.backup_now(f"sqlite:///{tmp_path / 'missing.db'}", tmp_path / "b")
    with pytest.raises(backup.BackupInputError, match="keep must be at least 1"):
        backup.backup_now(f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "b", keep=0)
    with pytest.raises(backup.BackupInputError, match="unsupported database"):
        backup.backup_now("mysql://u@h/db", tmp_path / "b")
    assert _failures() == before + 3
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())


def test_restore_refuses_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "rev.db"
    _make_sqlite(src, rows=2)
    good = backup.backup_now(f"sqlite:///{src}", tmp_path / "b")
    junk = tmp_path / "junk.dump"
    junk.write_bytes(b"hello")
    with pytest.raises(backup.BackupInputError, match="no such backup file"):
        backup.restore(tmp_path / "nope.dump", f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(backup.BackupInputError, match="not a backup this tool made"):
        backup.restore(junk, f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(
        backup.BackupInputError, match="is a sqlite backup but the target is postgresql"
    ):
        backup.restore(good, "postgresql://postgres@127.0.0.1/whatever")


def test_prune_keeps_newest_and_only_touches_its_own_files(tmp_path: Path) -> None:
    for stamp in ("20250101T030000Z", "20250103T030000Z", "20250102T030000Z"):
        (tmp_path / f"rev-{stamp}.dump").write_bytes(b"PGDMP")
    (tmp_path / "rev-20250103T030000Z-1.dump").write_bytes(b"PGDMP")  # same second, later
    (tmp_path / "keep-me.dump").write_bytes(b"PGDMP")
    removed = backup.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [
        "rev-20250101T030000Z.dump",
        "rev-20250102T030000Z.dump",
    ]
    assert [b.path.name for b in backup.list_backups(tmp_path)] == [
        "rev-20250103T030000Z.dump",
        "rev-20250103T030000Z-1.dump",
    ]
    assert (tmp_path / "keep-me.dump").exists()


# --------------------------------------------------------------------------- CLI
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rev")
    sub = parser.add_subparsers(dest="command", required=True)
    backup.add_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_backup_list_restore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.delenv("REV_BACKUP_KEEP", raising=False)
    src = tmp_path / "rev.db"
    _make_sqlite(src, rows=3)
    url = f"sqlite:///{src}"
    assert _cli(["backup", "now", "--dir", str(tmp_path / "b"), "--database-url", url]) == 0
    assert "backup written:" in capsys.readouterr().out
    assert _cli(["backup", "list", "--dir", str(tmp_path / "b")]) == 0
    listing = capsys.readouterr().out.strip().splitlines()
    assert len(listing) == 1 and "sqlite" in listing[0]
    file = listing[0].split()[0]

    assert _cli(["restore", file, "--database-url", url]) == 2  # source is not empty
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to restore" in err and "--force" in err
    assert _cli(["restore", str(tmp_path / "missing.dump"), "--database-url", url]) == 2
    assert _cli(["restore", file, "--database-url", f"sqlite:///{tmp_path / 'new.db'}"]) == 0
    assert "alembic upgrade head" in capsys.readouterr().out
    assert _cli(["backup", "list", "--dir", str(tmp_path / "empty")]) == 0
    assert "no backups" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        _cli(["backup"])
    assert exc.value.code == 2


def test_settings_from_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", "sqlite:///x.db")
    monkeypatch.setenv("REV_BACKUP_DIR", str(tmp_path))
    monkeypatch.setenv("REV_BACKUP_KEEP", "3")
    s = backup.BackupSettings.from_env()
    assert (s.database_url, s.backup_dir, s.keep) == ("sqlite:///x.db", tmp_path, 3)
    monkeypatch.setenv("REV_BACKUP_KEEP", "many")
    with pytest.raises(backup.BackupInputError, match="REV_BACKUP_KEEP"):
        backup.BackupSettings.from_env()


# --------------------------------------------------------------------------- beat
def test_beat_schedule_entry(monkeypatch) -> None:
    from celery.schedules import crontab

    monkeypatch.delenv("REV_BACKUP_SCHEDULE", raising=False)
    entry = backup.beat_schedule_entry()
    assert entry["task"] == Task.BACKUP
    assert entry["options"]["queue"] == queues.MAINTENANCE and entry["options"]["expires"] > 0
    assert entry["schedule"] == crontab(minute="0", hour="3")
    monkeypatch.setenv("REV_BACKUP_SCHEDULE", "900")
    assert backup.beat_schedule_entry()["schedule"] == 900.0
    assert backup.beat_schedule_entry()["options"]["expires"] == 900.0
    assert backup.beat_schedule_entry("30 */6 * * 1-5")["schedule"] == crontab(
        minute="30", hour="*/6", day_of_week="1-5"
    )
    for bad in ("daily", "0 3 * *", "-5"):
        with pytest.raises(ValueError, match="REV_BACKUP_SCHEDULE"):
            backup.beat_schedule_entry(bad)


# --------------------------------------------------------------------------- PostgreSQL
@pytest.fixture
def pg_databases() -> Iterator[tuple[str, str]]:
    """Two empty throw-away databases; dropped afterwards even if the test fails."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        msg = f"PostgreSQL not reachable at {PG_ADMIN}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    with admin:
        for db in (SRC_DB, DST_DB):
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{db}"')
    info = conninfo_to_dict(PG_ADMIN)
    auth = info.get("user", "postgres") + (f":{info['password']}" if info.get("password") else "")
    base = f"postgresql+psycopg://{auth}@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}"
    try:
        yield f"{base}/{SRC_DB}", f"{base}/{DST_DB}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            for db in (SRC_DB, DST_DB):
                admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _pg(url: str):
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(
        host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database
    )


def _pg_rows(url: str) -> list[tuple]:
    with _pg(url) as conn:
        return conn.execute(
            "SELECT id, verdict, payload, meta::text FROM jobs ORDER BY id"
        ).fetchall()


def test_postgres_round_trip(pg_databases: tuple[str, str], tmp_path: Path) -> None:
    src, dst = pg_databases
    with _pg(src) as conn:
        conn.execute(
            "CREATE TABLE jobs (id SERIAL PRIMARY KEY, verdict TEXT NOT NULL, payload BYTEA, meta JSONB)"
        )
        conn.execute(
            "INSERT INTO jobs (verdict, payload, meta) "
            "SELECT CASE WHEN g % 2 = 0 THEN 'SAME' ELSE 'DIFFERENT' END, "
            "decode(md5(g::text), 'hex'), jsonb_build_object('n', g) FROM generate_series(1, 200) g"
        )
    before = _pg_rows(src)

    path = backup.backup_now(src, tmp_path / "b", keep=2)
    assert path.suffix == ".dump" and path.read_bytes()[:5] == b"PGDMP"
    assert [b.kind for b in backup.list_backups(tmp_path / "b")] == ["postgresql"]

    backup.restore(path, dst)
    assert _pg_rows(dst) == before
    with _pg(dst) as conn:  # the sequence came along: the next id continues after 200
        assert (
            conn.execute("INSERT INTO jobs (verdict) VALUES ('SAME') RETURNING id").fetchone()[0]
            == 201
        )

    with pytest.raises(backup.BackupInputError, match=r"not empty \(1 tables: public\.jobs\)"):
        backup.restore(path, dst)
    backup.restore(path, dst, force=True)  # drops and recreates what the dump holds
    assert _pg_rows(dst) == before


def test_postgres_errors_hide_the_password(pg_databases: tuple[str, str], tmp_path: Path) -> None:
    src, _ = pg_databases
    from sqlalchemy.engine import make_url

    bad = make_url(src).set(database="rev_backup_test_absent", password="s3cret-pw")
    url = bad.render_as_string(hide_password=False)
    before = _failures()
    with pytest.raises(backup.BackupError) as exc:
        backup.backup_now(url, tmp_path / "b")
    message = str(exc.value)
    assert "pg_dump failed" in message and "rev_backup_test_absent" in message
    assert "s3cret-pw" not in message and "\n" not in message
    assert _failures() == before + 1
    with pytest.raises(backup.BackupError) as exc:
        backup.restore(tmp_path / "nothing.dump", url)
    assert "s3cret-pw" not in str(exc.value)
