"""Housekeeping run by beat on the ``maintenance`` queue: stale-job reaper, database backup."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

from rev_tasks import jobs
from rev_tasks.celery import app
from rev_tasks.db import idempotency
from rev_tasks.db.session import session_scope
from rev_tasks.db.tables import MODEL_FAILED, MODEL_PENDING, ModelRecord, utcnow
from rev_tasks.ops.backup import BackupError, backup_from_env
from rev_tasks.queues import Task
from rev_tasks.settings import get_settings

log = logging.getLogger(__name__)


@app.task(name=Task.REAP_STALE_JOBS, ignore_result=True)
def reap_stale_jobs() -> dict[str, int]:
    """Fail jobs and registrations that stopped making progress.

    A running job whose row has not changed for longer than the broker would take to
    redeliver it (visibility timeout) plus a whole job's time limit can no longer finish:
    it is failed with ``stale`` so that no client waits forever. Idempotency keys past
    their 24 hours are deleted here too.
    """
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.visibility_timeout + settings.job_time_limit)
    models = 0
    with session_scope() as s:
        failed = jobs.fail_stale(s, cutoff, "stale", "the job stopped making progress")
        for rec in s.scalars(
            select(ModelRecord).where(
                ModelRecord.status == MODEL_PENDING, ModelRecord.updated_at < cutoff
            )
        ):
            rec.status = MODEL_FAILED
            rec.error = {"code": "stale", "message": "fingerprinting never finished"}
            models += 1
        keys = idempotency.prune(s)
    if failed or models:
        log.warning("reaped %d stale job(s) and %d stale model registration(s)", failed, models)
    return {"jobs": failed, "models": models, "idempotency_keys": keys}


# The result is kept (not ignore_result): a failed backup must show as FAILURE in the
# result backend and in Flower, not only as a log line and a counter.
@app.task(name=Task.BACKUP)
def backup() -> dict[str, object]:
    """Back up the database into ``REV_BACKUP_DIR`` and prune to ``REV_BACKUP_KEEP``.

    Scheduled by beat (``REV_BACKUP_SCHEDULE``). ``backup_now`` counts the failure in
    ``rev_backup_failures_total``; this logs it as an error and re-raises, so the task
    ends FAILURE (acked, not retried: the next scheduled run tries again).
    """
    try:
        path = backup_from_env()
    except BackupError as exc:
        log.error("database backup failed: %s", exc)
        raise
    size = path.stat().st_size
    log.info("database backup written: %s (%d bytes)", path, size)
    return {"path": str(path), "bytes": size}
