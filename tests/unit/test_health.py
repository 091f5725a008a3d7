"""rev_tasks.ops.health against real services: SQLite, PostgreSQL, Redis, a real Celery
worker (in-process, solo pool) and a real HTTP coordinator stand-in."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rev_tasks.cli import health as health_cli
from rev_tasks.ops import health
from rev_tasks.queues import CONSENSUS, INFERENCE_CPU, MAINTENANCE

REDIS_TEST_URL = os.environ.get("REV_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
PG_URL = os.environ.get("REV_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _unavailable(msg: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def redis_url() -> str:
    result = health.check_broker(REDIS_TEST_URL)
    if not result.ok:
        _unavailable(f"Redis not reachable at {REDIS_TEST_URL}: {result.detail}")
    return REDIS_TEST_URL


def _migrated_sqlite(path: Path, revision: str | None = "abc123") -> str:
    con = sqlite3.connect(path)
    with con:
        con.execute("CREATE TABLE jobs (id TEXT)")
        if revision:
            con.execute("CREATE TABLE alembic_version (version_num TEXT)")
            con.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    con.close()
    return f"sqlite:///{path}"


def test_check_database_sqlite(tmp_path: Path) -> None:
    ok = health.check_database(_migrated_sqlite(tmp_path / "a.db"))
    assert ok.ok and "schema abc123" in ok.detail and ok.latency_ms >= 0
    bare = health.check_database(_migrated_sqlite(tmp_path / "b.db", revision=None))
    assert not bare.ok and "not migrated" in bare.detail
    missing = health.check_database(f"sqlite:///{tmp_path / 'none.db'}")
    assert not missing.ok and "does not exist" in missing.detail
    assert not (tmp_path / "none.db").exists()  # a check must not create the database


def test_check_database_postgres() -> None:
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL).set(drivername="postgresql+psycopg").render_as_string(False)
    result = health.check_database(url)
    if "PostgreSQL" not in result.detail:
        _unavailable(f"PostgreSQL not reachable at {PG_URL}: {result.detail}")
    assert result.detail.startswith("PostgreSQL ")
    dead = health.check_database("postgresql+psycopg://postgres@127.0.0.1:1/x", timeout=1)
    assert not dead.ok and "\n" not in dead.detail


def test_check_broker(redis_url: str) -> None:
    result = health.check_broker(redis_url)
    assert result.ok and result.detail.startswith("Redis ") and "aof" in result.detail
    dead = health.check_broker("redis://127.0.0.1:1/0", timeout=0.5)
    assert not dead.ok and dead.status == "DOWN"


@pytest.fixture
def celery_app(redis_url: str):
    from celery import Celery
    from kombu import Queue

    app = Celery("health-test", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.task_queues = [Queue(INFERENCE_CPU), Queue(CONSENSUS)]
    app.conf.worker_hijack_root_logger = False
    return app


def test_check_workers_with_a_real_worker(celery_app) -> None:
    from celery.contrib.testing.worker import start_worker

    none = health.check_workers(celery_app, [INFERENCE_CPU], timeout=0.3)
    assert not none.ok and "no worker answered" in none.detail
    with start_worker(celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
        # The in-thread worker answers broadcasts only once its consumer is up: wait for its
        # first answer (a loaded 2-core machine can take seconds), then check as /readyz does.
        deadline = time.monotonic() + 30
        while not celery_app.control.inspect(timeout=1.0).ping():
            assert time.monotonic() < deadline, "the in-thread worker never answered a ping"
        up = health.check_workers(celery_app, [INFERENCE_CPU, CONSENSUS], timeout=3.0)
        short = health.check_workers(celery_app, [INFERENCE_CPU, MAINTENANCE], timeout=3.0)
    assert up.ok, up.detail
    assert f"{INFERENCE_CPU}×1" in up.detail
    assert not short.ok and "no worker consumes maintenance" in short.detail


def test_readiness_leaves_workers_out_by_default(tmp_path: Path, redis_url: str) -> None:
    ok, results = health.readiness(_migrated_sqlite(tmp_path / "a.db"), redis_url)
    assert ok and [r.name for r in results] == ["database", "broker"]
    body, status = health.readiness_response(f"sqlite:///{tmp_path / 'no.db'}", redis_url)
    assert status == 503 and body["ok"] is False
    assert {c["name"] for c in body["checks"]} == {"database", "broker"}


def test_render_table() -> None:
    table = health.render_table(
        [
            health.CheckResult("database", True, "PostgreSQL 15.2, schema x", 3.2),
            health.CheckResult("workers", False, "no worker answered within 1 s", 1000.0),
            health.CheckResult("broker", True, "embedded", 0.0, skipped=True),
        ]
    )
    lines = table.splitlines()
    assert lines[0].split("|")[0].strip() == "service"
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["UP", "DOWN", "SKIP"]


# --------------------------------------------------------------------------- rev health
@pytest.fixture
def coordinator() -> Iterator[tuple[str, dict]]:
    """A stand-in coordinator whose /readyz body the test sets (the farm's shape)."""
    from flask import Flask
    from werkzeug.serving import make_server

    state: dict = {"status": 200, "body": {}}
    app = Flask("fake-coordinator")

    @app.get("/readyz")
    def readyz():
        return state["body"], state["status"]

    server = make_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", state
    finally:
        server.shutdown()


def _rev_health(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rev")
    sub = parser.add_subparsers(dest="command", required=True)
    health_cli.add_commands(sub)
    args = parser.parse_args(["health", *argv])
    return args.func(args)


def test_rev_health_through_the_coordinator(coordinator, capsys) -> None:
    url, state = coordinator
    state["body"] = {
        "status": "ready",
        "checks": {
            "database": "ok",
            "broker": "ok",
            "queues": {INFERENCE_CPU: 2, CONSENSUS: 1},
        },
    }
    assert _rev_health(["--api", url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and [c["name"] for c in out["checks"]] == [
        "coordinator",
        "database",
        "broker",
        "workers",
    ]
    state["status"] = 503
    state["body"] = {
        "status": "unavailable",
        "checks": {
            "database": "ok",
            "broker": "ok",
            "queues": {INFERENCE_CPU: 0, CONSENSUS: 1},
        },
    }
    assert _rev_health(["--api", url]) == 1
    table = capsys.readouterr().out
    assert "coordinator | UP" in table and f"no live worker for {INFERENCE_CPU}" in table
    # our own readiness shape is understood as well
    state["body"] = {
        "ok": True,
        "checks": [health.CheckResult("database", True, "x", 1.0).as_dict()],
    }
    assert health.check_api(url)[1][0].name == "database"


def test_rev_health_falls_back_to_direct_checks(
    tmp_path: Path, monkeypatch, capsys, redis_url
) -> None:
    monkeypatch.setenv("DATABASE_URL", _migrated_sqlite(tmp_path / "a.db"))
    monkeypatch.setenv("REDIS_URL", redis_url)
    code = _rev_health(
        ["--api", "http://127.0.0.1:1", "--celery-app", "no_such_module_for_rev", "--timeout", "1"]
    )
    table = capsys.readouterr().out
    assert code == 1
    rows = {ln.split("|")[0].strip(): ln.split("|")[1].strip() for ln in table.splitlines()[2:]}
    assert rows == {"coordinator": "DOWN", "database": "UP", "broker": "UP", "workers": "DOWN"}
    monkeypatch.setenv("REV_API_URL", "")
    monkeypatch.setattr(health_cli, "_default_api_url", lambda: "http://127.0.0.1:1")
    assert _rev_health(["--skip-workers", "--timeout", "1"]) == 0  # no coordinator: direct
    assert "coordinator | SKIP" in capsys.readouterr().out
