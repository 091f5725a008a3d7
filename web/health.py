"""``/healthz`` (the process answers) and ``/readyz`` (it can do useful work).

Ready means: the database answers, the broker answers, and every required queue
(``REV_REQUIRED_QUEUES``) has a live consumer in a worker census at most
``REV_INSPECT_CACHE_SECONDS`` old. Anything else is a 503 with the reason.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from rev_tasks import queues
from rev_tasks.db.session import session_scope
from web import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    return {"status": "ok"}


def _check_db() -> str | None:
    try:
        with session_scope() as s:
            s.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return f"database: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def _check_broker(redis_url: str) -> str | None:
    try:
        import redis

        redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0).ping()
    except Exception as exc:  # noqa: BLE001
        return f"broker: {type(exc).__name__}: {exc}"[:300]
    return None


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    settings = services.settings_of(current_app)
    checks: dict[str, Any] = {}
    problems: list[str] = []
    db = _check_db()
    checks["database"] = db or "ok"
    if db:
        problems.append(db)
    broker = _check_broker(settings.redis_url)
    checks["broker"] = broker or "ok"
    if broker:
        problems.append(broker)
    live: dict[str, int] = {}
    if not broker:
        inspector: services.QueueInspector = current_app.extensions["rev_inspector"]
        # Never a census older than one interval: a stopped worker must read as gone.
        live = inspector.live(max_age=settings.inspect_cache_seconds)
        if any(q not in live for q in settings.required_queues):
            live = inspector.live(refresh=True)  # a worker may have just started
    missing = [q for q in settings.required_queues if q not in live]
    checks["queues"] = {q: live.get(q, 0) for q in settings.required_queues}
    checks["gpu_queues"] = sorted(q for q in live if queues.is_gpu_queue(q))
    if missing:
        problems.append(f"no live worker for queue(s): {', '.join(missing)}")
    if problems:
        return {"status": "unavailable", "reason": "; ".join(problems), "checks": checks}, 503
    return {"status": "ready", "checks": checks}
