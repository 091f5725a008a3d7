"""``/v1/jobs``: submit, list, read, cancel and fetch the transcript of verification jobs."""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, request, url_for
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from sqlalchemy import and_, or_, select

from rev_tasks import jobs, metrics, queues
from rev_tasks.db import idempotency as idempotency_keys
from rev_tasks.db.session import after_commit, read_scope, session_scope
from rev_tasks.db.tables import (
    MODEL_FAILED,
    MODEL_READY,
    EndpointFingerprint,
    Fingerprint,
    Job,
    ModelRecord,
    Transcript,
)
from rev_tasks.queues import Task
from web import idempotency, services
from web.errors import BadRequest, Conflict, NotFound, Unprocessable
from web.inputs import check_query, json_body, validation_error
from web.schemas import (
    JOB_REQUEST,
    EndpointRef,
    IdentifyJobRequest,
    PathRef,
    VerifyJobRequest,
)
from web.security import can_see, principal

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.register_error_handler(idempotency.Replayed, idempotency.replayed)

MAX_PAGE = 100
MAX_CURSOR = 256
JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def visible_job(session: Any, job_id: str, lock: bool = False) -> Job:
    """The job if it exists and the caller may see it; otherwise the same 404 either way.

    ``lock``: read it ``FOR UPDATE`` (a transition follows).
    """
    found = JOB_ID.fullmatch(job_id)
    job = session.get(Job, job_id, with_for_update=lock or None) if found else None
    if job is None or not can_see(job.tenant):
        raise NotFound(f"no job {job_id[:64]!r}", code="job_not_found")
    return job


def _visible_model(session: Any, model_id: str) -> ModelRecord:
    """A registered model the caller may use; another tenant's model is 'unknown' too."""
    rec = session.get(ModelRecord, model_id)
    if rec is None or not can_see(rec.tenant):
        raise Unprocessable(f"unknown model id {model_id!r}", code="unknown_model")
    return rec


def _reference_model(session: Any, model_id: str) -> tuple[ModelRecord, Fingerprint]:
    rec = _visible_model(session, model_id)
    if rec.status == MODEL_FAILED:
        raise Conflict(f"model {model_id!r} failed to register", code="model_failed")
    fp = session.get(Fingerprint, model_id)
    if rec.status != MODEL_READY or fp is None:
        raise Conflict(f"model {model_id!r} is not ready yet", code="model_not_ready")
    return rec, fp


def _check_dtype(rec: ModelRecord, dtype: str) -> None:
    """A registered reference's signatures were computed in its registration dtype: a job
    in another dtype cannot be compared with them (docs/statistics.md §9)."""
    have = rec.dtype or "float32"
    if have != dtype:
        raise Unprocessable(
            f"model {rec.id!r} was fingerprinted in {have}; this job computes in {dtype}: "
            f"submit it with dtype {have!r}, or register the model again in {dtype}",
            code="dtype_mismatch",
        )


def _candidate_path(session: Any, ref: str | PathRef | EndpointRef, settings: Any) -> str:
    assert not isinstance(ref, EndpointRef)
    if isinstance(ref, PathRef):
        return services.model_path(ref.path, settings)
    return _visible_model(session, ref).path


@bp.post("")
def submit() -> ResponseReturnValue:
    settings = services.settings_of(current_app)
    check_query()
    key = idempotency.request_key()
    try:
        req = JOB_REQUEST.validate_python(json_body())
    except ValidationError as exc:
        raise validation_error(exc) from exc
    digest = idempotency_keys.request_hash(req.model_dump(mode="json"))
    if key is not None:
        with session_scope() as s:
            known = idempotency_keys.find(s, principal().tenant, key, digest)
        if known is not None:
            return idempotency.answer(known)
    job_id = str(uuid.uuid4())
    if isinstance(req.candidate, EndpointRef):
        return _submit_endpoint(req, req.candidate, settings, key, digest, job_id)
    with session_scope() as s:
        reference_model_id = reference_path = None
        budget = req.max_challenges
        if isinstance(req, VerifyJobRequest):
            if isinstance(req.reference, PathRef):
                reference_path = services.model_path(req.reference.path, settings)
            else:
                rec, fp = _reference_model(s, req.reference)
                _check_dtype(rec, req.dtype)
                reference_model_id = req.reference
                budget = min(budget, fp.n_challenges)
        else:
            assert isinstance(req, IdentifyJobRequest)
        candidate_path = _candidate_path(s, req.candidate, settings)
        if req.memory_budget_mb is not None:
            services.check_streamable([p for p in (reference_path, candidate_path) if p])
        inspector: services.QueueInspector = current_app.extensions["rev_inspector"]
        # A CPU job needs no worker census; only auto/cuda look for live GPU queues.
        live = {} if req.device == "cpu" else inspector.live()
        gpu_live = [q for q in live if queues.is_gpu_queue(q)]
        device, queue = services.choose_queue(
            req.device, live, services.queue_backlog(settings.redis_url, gpu_live)
        )
        job = jobs.new_job(
            id=job_id,
            tenant=principal().tenant,
            kind=req.kind,
            request=req.model_dump(mode="json"),
            device=device,
            queue=queue,
            reference_model_id=reference_model_id,
            reference_path=reference_path,
            candidate_path=candidate_path,
            challenges_max=budget,
        )
        status = _add_and_enqueue(s, job, key, digest)
    return _accepted(req.kind, job_id, status)


def _add_and_enqueue(session: Any, job: Job, key: str | None, digest: str) -> str:
    """Store the new job (and its idempotency key) and send its prepare task once the
    transaction commits: a job is never sent that was not stored, nor stored unsent."""
    session.add(job)
    status = job.status
    job_id = job.id
    if key is not None:
        raced = idempotency_keys.remember(session, principal().tenant, key, digest, job_id)
        if raced is not None:
            raise idempotency.Replayed(raced)
    services.enqueue_after_commit(
        session,
        current_app.extensions["rev_celery"],
        Task.PREPARE,
        [job_id],
        queues.DEFAULT,
        on_failure=lambda: _fail_unsent(job_id),
        task_id=queues.prepare_task_id(job_id),
    )
    return status


def _accepted(kind: str, job_id: str, status: str) -> ResponseReturnValue:
    metrics.job_submitted(kind)
    url = url_for("jobs.get_job", job_id=job_id)
    return {"id": job_id, "status": status, "url": url}, 202, {"Location": url}


def _endpoint_reference(session: Any, model_id: str) -> tuple[ModelRecord, EndpointFingerprint]:
    """A registered reference for an endpoint job: ready, with its endpoint fingerprint."""
    rec = _visible_model(session, model_id)
    if rec.status == MODEL_FAILED:
        raise Conflict(f"model {model_id!r} failed to register", code="model_failed")
    efp = session.get(EndpointFingerprint, model_id)
    if efp is None or efp.status == MODEL_FAILED:
        raise Conflict(
            f"model {model_id!r} has no endpoint fingerprint (register it with "
            "endpoint_evidence: true; a model that is no causal LM cannot have one)",
            code="endpoint_evidence_missing",
        )
    if rec.status != MODEL_READY or efp.status != MODEL_READY:
        raise Conflict(f"model {model_id!r} is not ready yet", code="model_not_ready")
    return rec, efp


def _submit_endpoint(
    req: Any, candidate: EndpointRef, settings: Any, key: str | None, digest: str, job_id: str
) -> ResponseReturnValue:
    """An endpoint job: the URL checked by the egress guard now (a 422 when refused) and
    again by the worker; the job goes to the ``endpoint`` queue. The credential is stored
    by name only: the worker reveals it."""
    ep = candidate.endpoint
    if req.memory_budget_mb is not None or req.batch_size is not None:
        raise Unprocessable(
            "memory_budget_mb and batch_size are for model candidates, not endpoints",
            code="invalid_request",
        )
    public_url = services.endpoint_target(ep.url)
    with session_scope() as s:
        services.check_credential(s, principal().tenant, ep.credential)
        reference_model_id = reference_path = None
        if isinstance(req, VerifyJobRequest):
            if isinstance(req.reference, PathRef):
                reference_path = services.model_path(req.reference.path, settings)
            else:
                _endpoint_reference(s, req.reference)
                reference_model_id = req.reference
        job = jobs.new_job(
            id=job_id,
            tenant=principal().tenant,
            kind=req.kind,
            request=req.model_dump(mode="json"),
            device="endpoint",
            queue=queues.ENDPOINT,
            reference_model_id=reference_model_id,
            reference_path=reference_path,
            candidate_path=public_url,
            challenges_max=ep.max_queries or (64 if ep.mode == "logprobs" else 300),
        )
        status = _add_and_enqueue(s, job, key, digest)
    return _accepted(req.kind, job_id, status)


def _fail_unsent(job_id: str) -> None:
    with session_scope() as s:
        jobs.fail(s, job_id, "broker_unavailable", "the job could not be enqueued")
        idempotency_keys.forget_job(s, job_id)  # a retry with the same key makes a new job


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a page ends at; anything else, however crafted, is a 400."""
    try:
        if len(cursor) > MAX_CURSOR:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        if (
            not isinstance(created, str)
            or not isinstance(job_id, str)
            or not JOB_ID.fullmatch(job_id)
        ):
            raise ValueError("bad cursor fields")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when, job_id
    except (binascii.Error, ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise BadRequest("invalid cursor", code="invalid_cursor") from exc


@bp.get("")
def list_jobs() -> ResponseReturnValue:
    """Newest first; ``next_cursor`` continues after the last job of this page.

    A tenant lists its own jobs; an admin key lists every tenant's.
    """
    check_query("limit", "cursor", "status")
    raw_limit = request.args.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise BadRequest(f"limit must be an integer in 1..{MAX_PAGE}", code="invalid_limit")
    limit = int(raw_limit)
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id.desc())
    if not principal().is_admin:
        stmt = stmt.where(Job.tenant == principal().tenant)
    status = request.args.get("status")
    if status is not None:
        if status not in jobs.STATUSES:
            choices = ", ".join(jobs.STATUSES[:-1]) + f" or {jobs.STATUSES[-1]}"
            raise BadRequest(f"status must be {choices}", code="invalid_status")
        stmt = stmt.where(Job.status == status)
    docs, next_cursor = page_of(stmt, request.args.get("cursor"), limit)
    return {"jobs": docs, "next_cursor": next_cursor}


def page_of(stmt: Any, cursor: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """One page of a newest-first job query after ``cursor``: (job documents, next cursor).

    Shared with the browser's jobs list (web/reports.py), so both page the same way.
    """
    if cursor:
        created, last_id = _decode_cursor(cursor)
        stmt = stmt.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id))
        )
    with read_scope() as s:
        rows = list(s.scalars(stmt.limit(limit + 1)))
        page = rows[:limit]
        next_cursor = _encode_cursor(page[-1]) if len(rows) > limit else None
        return [services.job_document(j) for j in page], next_cursor


@bp.get("/<job_id>")
def get_job(job_id: str) -> ResponseReturnValue:
    check_query()
    with read_scope() as s:
        return services.job_document(visible_job(s, job_id))


@bp.post("/<job_id>/cancel")
def cancel_job(job_id: str) -> ResponseReturnValue:
    """Cancel a queued or running job: 200 with its document, again for a cancelled one.

    The job's tasks still queued are revoked once the cancel commits, and each task checks
    the job first anyway (a worker started later never heard of the revoke); a running
    inference stops at its next batch. A job that finished otherwise is a 409.
    """
    check_query()
    with session_scope() as s:
        job = visible_job(s, job_id, lock=True)
        if jobs.finished(job) and job.status != jobs.CANCELLED:
            raise Conflict(
                f"job {job_id} already {job.status}: only a queued or running job can be cancelled",
                code="job_finished",
            )
        if jobs.cancel(s, job):
            celery_app = current_app.extensions["rev_celery"]
            after_commit(s, lambda: services.revoke_job_tasks(celery_app, job_id))
        return services.job_document(job)


@bp.get("/<job_id>/transcript")
def get_transcript(job_id: str) -> ResponseReturnValue:
    """The committed transcript (``rev audit`` accepts it as it is)."""
    check_query()
    with read_scope() as s:
        job = visible_job(s, job_id)
        if job.kind != "verify":
            raise NotFound(
                "an identify job's evidence is checked by its validators and not released "
                "(its challenges stay in the models' pools)",
                code="transcript_not_found",
            )
        tr = s.get(Transcript, job_id)
        if tr is None:
            if not jobs.finished(job):
                raise Conflict("the job has not decided yet", code="transcript_not_ready")
            raise NotFound("the job ended without a transcript", code="transcript_not_found")
        doc = tr.document()
    body = json.dumps(doc, separators=(",", ":"))
    return Response(body, mimetype="application/json")
