"""Health checks for the coordinator's ``/readyz`` and the operator's ``rev health``.

Each check returns a :class:`CheckResult` instead of raising, so one dead dependency never
hides the state of the others: an operator at 03:00 wants the whole table at once.

:func:`readiness` covers what a coordinator needs to accept jobs, the database and the
broker, and leaves workers out unless asked: a probe that fails whenever a worker pool
restarts would pull every coordinator out of the load balancer at once (they share the
workers), turning queued jobs into 502s. The deploy manifests therefore probe
``/healthz``; worker presence is an operator question, answered by ``rev health`` and
the WorkerDown alerts. ``rev health`` understands both readiness bodies: the
:func:`readiness_response` list and the coordinator's own ``/readyz`` (``web/health.py``).
"""

from __future__ import annotations

import importlib
import json
import math
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rev_tasks import queues

#: Queues that must have a consumer for a job to finish (``rev health`` default).
#: Same default as the farm's settings (``REV_REQUIRED_QUEUES``).
DEFAULT_REQUIRED_QUEUES: tuple[str, ...] = queues.CPU_WORKER_QUEUES


@dataclass(frozen=True)
class CheckResult:
    """One dependency's state: ``ok`` with a one-line ``detail`` and how long it took."""

    name: str
    ok: bool
    detail: str
    latency_ms: float
    skipped: bool = False

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else ("UP" if self.ok else "DOWN")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckResult:
        return cls(
            name=str(data["name"]),
            ok=bool(data["ok"]),
            detail=str(data.get("detail", "")),
            latency_ms=float(data.get("latency_ms", 0.0)),
            skipped=bool(data.get("skipped", False)),
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _timed(name: str, probe: Callable[[], tuple[bool, str]]) -> CheckResult:
    start = time.perf_counter()
    try:
        ok, detail = probe()
    except Exception as exc:  # a check reports failures, it never raises them
        ok, detail = False, _one_line(exc)
    return CheckResult(name, ok, detail, round((time.perf_counter() - start) * 1000, 1))


def check_database(url: str, timeout: float = 3.0) -> CheckResult:
    """Connect, run a query, and report the server version and Alembic revision."""
    from sqlalchemy.engine import make_url

    def probe() -> tuple[bool, str]:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        if backend == "postgresql":
            import psycopg

            conninfo = parsed.set(drivername="postgresql", password=None).render_as_string(
                hide_password=False
            )
            with psycopg.connect(
                conninfo,
                password=parsed.password,
                connect_timeout=max(1, math.ceil(timeout)),
                autocommit=True,
            ) as conn:
                version = conn.execute("SHOW server_version").fetchone()
                exists = conn.execute("SELECT to_regclass('alembic_version')").fetchone()
                revision = None
                if exists and exists[0] is not None:
                    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                    revision = row[0] if row else None
            server = f"PostgreSQL {version[0].split()[0] if version else '?'}"
        elif backend == "sqlite":
            if not parsed.database or parsed.database == ":memory:":
                return False, "in-memory SQLite is not a shared database"
            path = Path(parsed.database)
            if not path.is_file():
                return False, f"SQLite file {path} does not exist"
            con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
            try:
                con.execute("SELECT 1").fetchone()
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
                revision = None
                if "alembic_version" in tables:
                    row = con.execute("SELECT version_num FROM alembic_version").fetchone()
                    revision = row[0] if row else None
            finally:
                con.close()
            server = f"SQLite {sqlite3.sqlite_version} ({path})"
        else:
            return False, f"unsupported database {backend!r}"
        schema = f"schema {revision}" if revision else "schema not migrated"
        return revision is not None, f"{server}, {schema}"

    return _timed("database", probe)


def check_broker(redis_url: str, timeout: float = 2.0) -> CheckResult:
    """PING the Redis broker; report its version and whether AOF persistence is on.

    AOF off is reported, not failed: queued jobs are lost on a broker restart without it,
    which an operator should see, but the farm still works.
    """

    def probe() -> tuple[bool, str]:
        import redis

        client = redis.Redis.from_url(
            redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        try:
            client.ping()
            server = client.info("server")
            persistence = client.info("persistence")
        finally:
            client.close()
        aof = "aof on" if persistence.get("aof_enabled") else "aof OFF"
        return True, f"Redis {server.get('redis_version', '?')}, {aof}"

    return _timed("broker", probe)


def check_workers(
    celery_app: Any, required_queues: Sequence[str], timeout: float = 1.0
) -> CheckResult:
    """Ask live workers which queues they consume; every required queue needs one.

    One broadcast (``inspect().active_queues()``) waiting ``timeout`` seconds: only
    workers that are up and connected to the broker answer.
    """

    def probe() -> tuple[bool, str]:
        replies = celery_app.control.inspect(timeout=timeout).active_queues() or {}
        if not replies:
            return False, f"no worker answered within {timeout:g} s"
        counts: dict[str, int] = {}
        for consumed in replies.values():
            for q in consumed or ():
                counts[q["name"]] = counts.get(q["name"], 0) + 1
        missing = [q for q in required_queues if q not in counts]
        shown = ", ".join(f"{q}×{n}" for q, n in sorted(counts.items()))
        workers = f"{len(replies)} worker{'s' if len(replies) != 1 else ''}"
        if missing:
            return False, f"no worker consumes {', '.join(missing)} ({workers}: {shown})"
        return True, f"{workers}: {shown}"

    return _timed("workers", probe)


def readiness(
    database_url: str,
    redis_url: str | None,
    celery_app: Any | None = None,
    required_queues: Sequence[str] = (),
) -> tuple[bool, list[CheckResult]]:
    """Run the checks and say whether all passed (skipped ones count as passed).

    The coordinator calls it without ``celery_app`` (see module docstring); ``redis_url``
    None means the embedded broker, which is not checked from outside.
    """
    results = [check_database(database_url)]
    if redis_url:
        results.append(check_broker(redis_url))
    else:
        results.append(_skipped("broker", "REDIS_URL not set: embedded broker"))
    if celery_app is not None and required_queues:
        results.append(check_workers(celery_app, required_queues))
    return all(r.ok or r.skipped for r in results), results


def readiness_response(database_url: str, redis_url: str | None) -> tuple[dict[str, Any], int]:
    """Body and status for ``GET /readyz``: ``{"ok", "checks": [...]}``, 200 or 503.

    ``rev health`` parses exactly this shape, so the coordinator should return it as is.
    """
    ok, results = readiness(database_url, redis_url)
    return {"ok": ok, "checks": [r.as_dict() for r in results]}, 200 if ok else 503


def _skipped(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail, 0.0, skipped=True)


def check_api(api_url: str, timeout: float = 3.0) -> tuple[CheckResult, list[CheckResult]]:
    """GET ``{api_url}/readyz``: the coordinator's own row and the checks it reports.

    A 503 with the readiness body means the coordinator is up but a dependency is not;
    the coordinator row is then UP and the dependency rows tell which.
    """
    url = api_url.rstrip("/") + "/readyz"
    start = time.perf_counter()
    status: int | None = None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator URL
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except Exception as exc:
        ms = round((time.perf_counter() - start) * 1000, 1)
        return CheckResult("coordinator", False, f"{url}: {_one_line(exc)}", ms), []
    ms = round((time.perf_counter() - start) * 1000, 1)
    try:
        checks = _parse_readiness(json.loads(body))
    except (ValueError, KeyError, TypeError, AttributeError):
        return CheckResult(
            "coordinator", False, f"{url}: HTTP {status}, not a readiness body", ms
        ), []
    return CheckResult("coordinator", True, f"{url}: HTTP {status}", ms), checks


def _parse_readiness(payload: dict[str, Any]) -> list[CheckResult]:
    """Rows from a readiness body: our list of checks, or the coordinator's dict.

    The coordinator (``web/health.py``) answers ``{"checks": {"database": "ok" | reason,
    "broker": ..., "queues": {name: live consumers}}}``.
    """
    checks = payload["checks"]
    if isinstance(checks, list):
        return [CheckResult.from_dict(c) for c in checks]
    rows: list[CheckResult] = []
    for name in ("database", "broker"):
        if name in checks:
            value = str(checks[name])
            rows.append(CheckResult(name, value == "ok", f"{value} (via coordinator)", 0.0))
    queues = checks.get("queues")
    if isinstance(queues, dict):
        missing = [q for q, n in queues.items() if not n]
        shown = ", ".join(f"{q}×{n}" for q, n in sorted(queues.items()) if n)
        detail = f"no live worker for {', '.join(missing)}" if missing else shown
        if missing and shown:
            detail += f" ({shown})"
        rows.append(CheckResult("workers", not missing, detail or "no queues reported", 0.0))
    if not rows:
        raise ValueError("empty readiness body")
    return rows


def _load_celery_app(target: str) -> Any:
    """``module`` or ``module:attribute``; a bare module must expose ``app``."""
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr or "app")


def render_table(results: Sequence[CheckResult]) -> str:
    """The health table: ``service | status | detail`` with latency in the detail."""
    rows = [("service", "status", "detail")]
    for r in results:
        latency = "" if r.skipped else f" ({r.latency_ms:g} ms)"
        rows.append((r.name, r.status, f"{r.detail}{latency}"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}} | {b:<{w1}} | {c}" for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}-+-{'-' * w1}-+-{'-' * 6}")
    return "\n".join(lines)


def run_health(
    *,
    api_url: str | None,
    database_url: str,
    redis_url: str | None,
    required_queues: Sequence[str],
    celery_app_target: str | None,
    timeout: float = 3.0,
    api_optional: bool = False,
) -> tuple[bool, list[CheckResult]]:
    """What ``rev health`` checks: through the coordinator if it answers, else directly.

    ``api_optional``: the URL is only the default guess (REV_API_URL unset), so a
    coordinator that does not answer there is skipped rather than reported down.
    """
    results: list[CheckResult] = []
    via_api = False
    if api_url:
        coordinator, reported = check_api(api_url, timeout)
        if coordinator.ok:
            results.append(coordinator)
            results.extend(reported)
            via_api = True
        elif api_optional:
            detail = f"not answering at {api_url} (REV_API_URL unset): checked directly"
            results.append(_skipped("coordinator", detail))
        else:
            results.append(coordinator)
    if not via_api:
        results.append(check_database(database_url, timeout))
        if redis_url:
            results.append(check_broker(redis_url, timeout))
        else:
            results.append(_skipped("broker", "REDIS_URL not set: embedded broker"))
    if not required_queues or any(r.name == "workers" for r in results):
        return all(r.ok or r.skipped for r in results), results  # none asked, or reported
    if not redis_url:
        results.append(_skipped("workers", "no broker URL: cannot reach workers"))
    elif celery_app_target is None:
        results.append(_skipped("workers", "worker check disabled"))
    else:
        try:
            app = _load_celery_app(celery_app_target)
        except Exception as exc:
            results.append(
                CheckResult(
                    "workers", False, f"cannot load {celery_app_target}: {_one_line(exc)}", 0.0
                )
            )
        else:
            results.append(check_workers(app, required_queues, timeout=min(timeout, 2.0)))
    return all(r.ok or r.skipped for r in results), results
