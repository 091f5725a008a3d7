"""Housekeeping run by beat on the ``maintenance`` queue: the job watchdog, database backup."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

import celeryconfig
from rev_tasks import jobs, metrics, queues
from rev_tasks.celery import app
from rev_tasks.db import idempotency
from rev_tasks.db.session import session_scope
from rev_tasks.db.tables import MODEL_FAILED, MODEL_PENDING, ModelRecord, utcnow
from rev_tasks.ops import watchdog as watchdog_ops
from rev_tasks.ops.backup import BackupError, backup_from_env
from rev_tasks.queues import Task
from rev_tasks.settings import get_settings

log = logging.getLogger(__name__)


@app.task(name=Task.WATCHDOG, ignore_result=True)
def watchdog() -> dict[str, int]:
    """Resume (or fail as ``lost``) jobs whose work is no longer anywhere; prune.

    The decision is :func:`rev_tasks.ops.watchdog.sweep`'s: the database says which jobs are
    active, the broker and the heartbeats say which of them still have their work somewhere.
    A broker that cannot be read decides nothing (the next round tries again). Model
    registrations still pending after the visibility timeout plus a job's time limit are
    failed with ``stale``, and idempotency keys past their 24 hours are deleted.
    """
    settings = get_settings()
    counts = {"resumed": 0, "lost": 0, "models": 0, "idempotency_keys": 0}
    thresholds = watchdog_ops.Thresholds.of(settings)
    try:
        in_broker = watchdog_ops.broker_names(
            settings.redis_url, celeryconfig.ALL_QUEUES, thresholds.grace_seconds
        )
    except watchdog_ops.BrokerUnreadable as exc:
        log.warning("watchdog: the broker cannot be read (%s); no job is resumed", exc)
        in_broker = None
    if in_broker is not None:
        with session_scope() as s:
            actions = watchdog_ops.sweep(s, in_broker, thresholds, _dispatch)
        counts["resumed"] = sum(a.action == "resumed" for a in actions)
        counts["lost"] = sum(a.action == "failed" for a in actions)
        for a in actions:
            metrics.watchdog_action(a.action, a.state)
    cutoff = utcnow() - timedelta(seconds=settings.visibility_timeout + settings.job_time_limit)
    with session_scope() as s:
        for rec in s.scalars(
            select(ModelRecord).where(
                ModelRecord.status == MODEL_PENDING, ModelRecord.updated_at < cutoff
            )
        ):
            rec.status = MODEL_FAILED
            rec.error = {"code": "stale", "message": "fingerprinting never finished"}
            counts["models"] += 1
        counts["idempotency_keys"] = idempotency.prune(s)
    if counts["models"]:
        log.warning("failed %d stale model registration(s)", counts["models"])
    return counts


def _dispatch(job_id: str, queue: str, transition: jobs.Transition) -> None:
    """Send a resumed job's next message, as the step before it would have (same task ids)."""
    from rev_tasks.tasks import verify

    if transition is jobs.RESUME_PREPARE:
        verify.prepare.apply_async(
            (job_id,),
            queue=queues.DEFAULT,
            task_id=queues.prepare_task_id(job_id),
            retry=True,
            retry_policy=verify.PUBLISH_RETRY,
        )
    elif transition is jobs.RESUME_INFERENCE:
        step = verify._run_endpoint() if queue == queues.ENDPOINT else verify.run_inference
        step.apply_async(
            (job_id,),
            queue=queue,
            task_id=queues.inference_task_id(job_id),
            retry=True,
            retry_policy=verify.PUBLISH_RETRY,
        )
    else:
        verify.dispatch_consensus(job_id)


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
