"""``rev health``: the dependency table of :mod:`rev_tasks.ops.health`, for operators."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from rev_tasks.ops import health
from rev_tasks.ops.backup import BackupSettings
from rev_tasks.settings import api_url, get_settings


def _default_database_url() -> str:
    """DATABASE_URL, else the farm's default (SQLite under REV_VAR_DIR)."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    return BackupSettings.from_env().database_url


def _default_redis_url() -> str | None:
    """REDIS_URL, else the farm's default broker; None when the farm's settings are invalid."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    try:
        return get_settings().redis_url
    except ValueError:  # invalid farm settings: the other checks still run
        return None


def _default_api_url() -> str | None:
    return api_url()


def _cmd_health(args: argparse.Namespace) -> int:
    queues = tuple(q.strip() for q in args.queues.split(",") if q.strip())
    api = args.api or os.environ.get("REV_API_URL") or None
    ok, results = health.run_health(
        api_url=api or _default_api_url(),
        api_optional=api is None,
        database_url=_default_database_url(),
        redis_url=_default_redis_url(),
        required_queues=queues,
        celery_app_target=None if args.skip_workers else args.celery_app,
        timeout=args.timeout,
    )
    if args.json:
        print(json.dumps({"ok": ok, "checks": [r.as_dict() for r in results]}))
    else:
        print(health.render_table(results))
    return 0 if ok else 1


def add_commands(subparsers: Any) -> None:
    """Add ``rev health``; it sets ``func`` (exit 0 all up, 1 something down)."""
    p = subparsers.add_parser(
        "health",
        help="check coordinator, database, broker and workers",
        description="Print service | status | detail for each dependency; exit 1 if any is down.",
    )
    p.add_argument(
        "--api",
        default=None,
        help="coordinator base URL (REV_API_URL, else the farm's default); its /readyz is "
        "used when it answers, else the database and broker are checked directly",
    )
    p.add_argument(
        "--queues",
        default=os.environ.get("REV_REQUIRED_QUEUES", ",".join(health.DEFAULT_REQUIRED_QUEUES)),
        help="comma-separated queues that need a consumer (REV_REQUIRED_QUEUES)",
    )
    p.add_argument(
        "--celery-app",
        default=os.environ.get("REV_CELERY_APP", "rev_tasks.celery"),
        help="module[:attr] of the Celery app used to ask workers (default rev_tasks.celery)",
    )
    p.add_argument("--skip-workers", action="store_true", help="do not ask the workers")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per check (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cmd_health)
