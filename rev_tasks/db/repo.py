"""Small repository functions shared by the tasks and the web coordinator.

A job's status and stage are not written here: :mod:`rev_tasks.jobs` owns them.

Writes that a redelivered task may repeat are upserts keyed by their natural key (job id for
a transcript, (job, validator) for a vote), so running a step twice stores one row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from rev_tasks.db.tables import (
    MODEL_FAILED,
    MODEL_PENDING,
    MODEL_READY,
    Fingerprint,
    Job,
    ModelRecord,
    RetiredChallenge,
    Transcript,
    Vote,
    pack_json,
    utcnow,
)

# Job statuses that still hold their pool draw (a job in consensus may yet be re-run).
_HOLDING = ("queued", "running")


def _insert(session: Session, model: type[Any]) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise RuntimeError(f"unsupported database dialect {dialect!r}")


def upsert(
    session: Session,
    model: type[Any],
    values: dict[str, Any],
    keys: Sequence[str],
    update_columns: Sequence[str] | None = None,
) -> None:
    """INSERT … ON CONFLICT (keys) DO UPDATE/NOTHING, on PostgreSQL and SQLite alike."""
    stmt = _insert(session, model).values(**values)
    if update_columns:
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys), set_={c: stmt.excluded[c] for c in update_columns}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    session.execute(stmt)


def store_transcript(
    session: Session,
    job_id: str,
    outcome: dict[str, Any],
    transcript: dict[str, Any],
    verdict: str | None = None,
) -> None:
    """``verdict``: what the validators vote on, when it is not the outcome's (identify)."""
    upsert(
        session,
        Transcript,
        {
            "job_id": job_id,
            "root": str(outcome["transcript_root"]),
            "verdict": str(verdict if verdict is not None else outcome["verdict"]),
            "outcome": outcome,
            "doc": pack_json(transcript),
            "created_at": utcnow(),
        },
        keys=["job_id"],
        update_columns=["root", "verdict", "outcome", "doc"],
    )


def store_vote(
    session: Session,
    job_id: str,
    validator: int,
    verdict: str,
    digest: str,
    problems: list[str],
    reexecuted: list[int] | None = None,
    executed_on: dict[str, Any] | None = None,
) -> None:
    """First vote wins: a redelivered validator cannot change its recorded vote.

    ``executed_on``: the validator's worker, and the device and dtype it re-executed on.
    """
    upsert(
        session,
        Vote,
        {
            "job_id": job_id,
            "validator": validator,
            "verdict": verdict,
            "digest": digest,
            "problems": problems,
            "reexecuted": reexecuted,
            "executed_on": executed_on,
            "created_at": utcnow(),
        },
        keys=["job_id", "validator"],
    )


def votes_for(session: Session, job_id: str) -> list[Vote]:
    return list(session.scalars(select(Vote).where(Vote.job_id == job_id).order_by(Vote.validator)))


def store_fingerprint(session: Session, model_id: str, doc: dict[str, Any]) -> None:
    upsert(
        session,
        Fingerprint,
        {
            "model_id": model_id,
            "key_id": doc["key_id"],
            "n_challenges": len(doc["signatures"]),
            "bits": int(doc["bits"]),
            "sites": list(doc["sites"]),
            "descriptor": doc["descriptor"],
            "commitment": doc.get("challenge_commitment"),
            "doc": pack_json(doc),
            "created_at": utcnow(),
        },
        keys=["model_id"],
        update_columns=[
            "key_id",
            "n_challenges",
            "bits",
            "sites",
            "descriptor",
            "commitment",
            "doc",
        ],
    )


def ready_fingerprints(
    session: Session, key_id: str | None = None, tenant: str | None = None
) -> dict[str, dict[str, Any]]:
    """Every ready model's fingerprint document (optionally one key's, one tenant's)."""
    stmt = (
        select(Fingerprint)
        .join(ModelRecord, ModelRecord.id == Fingerprint.model_id)
        .where(ModelRecord.status == MODEL_READY)
        .order_by(Fingerprint.model_id)
    )
    if key_id is not None:
        stmt = stmt.where(Fingerprint.key_id == key_id)
    if tenant is not None:
        stmt = stmt.where(ModelRecord.tenant == tenant)
    return {fp.model_id: fp.document() for fp in session.scalars(stmt)}


def tenant_models(session: Session, tenant: str) -> list[ModelRecord]:
    """Every model the tenant registered (what its identify jobs list), by id."""
    stmt = select(ModelRecord).where(ModelRecord.tenant == tenant).order_by(ModelRecord.id)
    return list(session.scalars(stmt))


def pending_models(session: Session, tenant: str, registered_before: Any) -> list[str]:
    """The tenant's models registered before ``registered_before`` whose fingerprint is pending."""
    stmt = (
        select(ModelRecord.id)
        .where(
            ModelRecord.tenant == tenant,
            ModelRecord.status == MODEL_PENDING,
            ModelRecord.created_at <= registered_before,
        )
        .order_by(ModelRecord.id)
    )
    return list(session.scalars(stmt))


def unusable_reason(rec: ModelRecord, fp: Fingerprint | None, key_id: str) -> str | None:
    """Why an identify job cannot compare with this model now (None: its fingerprint is usable)."""
    if rec.status == MODEL_FAILED:
        err = rec.error or {}
        return f"fingerprint failed: {err.get('code', 'error')}: {err.get('message', '')}".strip()
    if rec.status == MODEL_PENDING:
        return "fingerprint still pending"
    if fp is None:
        return "no fingerprint stored"
    if fp.key_id != key_id:
        return "fingerprint made with another farm key; register the model again"
    return None


def fingerprint_doc(session: Session, model_id: str) -> dict[str, Any] | None:
    fp = session.get(Fingerprint, model_id)
    return fp.document() if fp is not None else None


# ----------------------------------------------------------------------------- challenge pools
def pool_indices(doc: dict[str, Any]) -> list[int]:
    """Every challenge index a fingerprint document has signatures for, ascending."""
    return sorted(int(e["index"]) for e in doc["signatures"])


def retired_indices(session: Session, model_ids: Sequence[str]) -> dict[str, set[int]]:
    """The retired pool challenges of each model (shown by a stored transcript)."""
    out: dict[str, set[int]] = {m: set() for m in model_ids}
    if not model_ids:
        return out
    rows = session.execute(
        select(RetiredChallenge.model_id, RetiredChallenge.challenge_index).where(
            RetiredChallenge.model_id.in_(list(model_ids))
        )
    )
    for model_id, index in rows:
        out[model_id].add(int(index))
    return out


def reserved_indices(session: Session, model_id: str, except_job: str) -> set[int]:
    """Pool challenges drawn by the model's other unfinished jobs (not to be drawn twice)."""
    rows = session.scalars(
        select(Job.challenge_indices).where(
            Job.reference_model_id == model_id,
            Job.status.in_(_HOLDING),
            Job.id != except_job,
            Job.challenge_indices.is_not(None),
        )
    )
    return {int(i) for drawn in rows if drawn for i in drawn}


def available_indices(session: Session, fp: Fingerprint, except_job: str) -> list[int]:
    """The model's pool challenges no stored transcript showed and no other job holds."""
    taken = retired_indices(session, [fp.model_id])[fp.model_id]
    taken |= reserved_indices(session, fp.model_id, except_job)
    return [i for i in pool_indices(fp.document()) if i not in taken]


def retire_challenges(
    session: Session, model_id: str, indices: Sequence[int], job_id: str | None
) -> None:
    """Retire pool challenges a stored transcript shows (a no-op for retired ones)."""
    if session.get(Fingerprint, model_id) is None:  # the model was deleted meanwhile
        return
    for index in indices:
        upsert(
            session,
            RetiredChallenge,
            {
                "model_id": model_id,
                "challenge_index": int(index),
                "job_id": job_id,
                "retired_at": utcnow(),
            },
            keys=["model_id", "challenge_index"],
        )
