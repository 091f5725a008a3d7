"""Idempotency keys of ``POST /v1/jobs``: one job per (tenant, key) for :data:`TTL`.

A client that times out does not know whether its job was created; it sends the request
again with the same ``Idempotency-Key`` and gets the first job back. The keys live in the
database, in the transaction that creates the job: a key exists exactly when its job was
stored, and the primary key (tenant, key) lets only one of two concurrent requests create
one (the other's insert waits for the first commit, fails, and it answers with the winner).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rev_tasks.db.tables import IdempotencyKey, utcnow

#: How long a key names its job; after that the same key creates a new job.
TTL = timedelta(hours=24)
#: Longest key accepted (Stripe's limit; a UUID is 36).
MAX_LENGTH = 255


@dataclass(frozen=True)
class Remembered:
    """The job a key already names, and whether the request that made it was this one."""

    job_id: str
    same_request: bool


def request_hash(request: dict[str, Any]) -> str:
    """SHA-256 of the validated request's canonical JSON (what "the same body" means)."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _live(row: IdempotencyKey | None, now: datetime) -> bool:
    if row is None:
        return False
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=now.tzinfo)
    return now - created < TTL


def find(session: Session, tenant: str, key: str, digest: str) -> Remembered | None:
    """The job ``key`` names for ``tenant``, unless it is unknown or expired."""
    row = session.get(IdempotencyKey, (tenant, key), populate_existing=True)
    if not _live(row, utcnow()):
        return None
    assert row is not None
    return Remembered(row.job_id, row.request_hash == digest)


def remember(
    session: Session, tenant: str, key: str, digest: str, job_id: str
) -> Remembered | None:
    """Bind ``key`` to the new job ``job_id`` (already added to ``session``).

    None when it is bound; otherwise what the key already names (a concurrent request with
    the same key committed first), and the caller must roll back its job. An expired
    binding is replaced.
    """
    now = utcnow()
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.tenant == tenant,
            IdempotencyKey.key == key,
            IdempotencyKey.created_at <= now - TTL,
        )
    )
    session.flush()  # the job row first: the key's foreign key needs it
    try:
        with session.begin_nested():
            session.add(
                IdempotencyKey(
                    tenant=tenant, key=key, request_hash=digest, job_id=job_id, created_at=now
                )
            )
    except IntegrityError:
        won = find(session, tenant, key, digest)
        if won is None:  # the winner's binding vanished meanwhile (expired, pruned)
            raise
        return won
    return None


def forget_job(session: Session, job_id: str) -> None:
    """Unbind the keys of a job that was never enqueued, so that a retry creates a job."""
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.job_id == job_id))


def prune(session: Session, now: datetime | None = None) -> int:
    """Delete expired keys (the beat watchdog calls this); how many were deleted."""
    cutoff = (now or utcnow()) - TTL
    res = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at <= cutoff))
    return int(res.rowcount or 0)
