"""``/v1/jobs``: submit, list, read and fetch the transcript of verification jobs."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, current_app, request, url_for
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from sqlalchemy import and_, or_, select

from rev_tasks.db import repo
from rev_tasks.db.models import (
    MODEL_FAILED,
    MODEL_READY,
    QUEUED,
    Fingerprint,
    Job,
    ModelRecord,
    Transcript,
)
from rev_tasks.db.session import session_scope
from web import services
from web.errors import BadRequest, Conflict, NotFound, ServiceUnavailable, Unprocessable
from web.schemas import JOB_REQUEST, IdentifyJobRequest, PathRef, VerifyJobRequest

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

PREPARE_TASK = "rev_tasks.tasks.verify.prepare"
MAX_PAGE = 100


def json_body() -> Any:
    """The request's JSON, or a 400/415 in the API's error shape."""
    if not request.is_json:
        from web.errors import UnsupportedMediaType

        raise UnsupportedMediaType("send a JSON body with Content-Type: application/json")
    raw = request.get_data(cache=True)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}", code="malformed_json") from exc


def validation_error(exc: ValidationError) -> Unprocessable:
    details = [
        {"loc": [str(p) for p in err["loc"]], "message": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0] if details else {"loc": [], "message": "invalid"}
    where = ".".join(first["loc"]) or "body"
    return Unprocessable(f"{where}: {first['message']}", code="invalid_request", details=details)


def _reference_model(session: Any, model_id: str) -> tuple[ModelRecord, Fingerprint]:
    rec = session.get(ModelRecord, model_id)
    if rec is None:
        raise Unprocessable(f"unknown model id {model_id!r}", code="unknown_model")
    if rec.status == MODEL_FAILED:
        raise Conflict(f"model {model_id!r} failed to register", code="model_failed")
    fp = session.get(Fingerprint, model_id)
    if rec.status != MODEL_READY or fp is None:
        raise Conflict(f"model {model_id!r} is not ready yet", code="model_not_ready")
    return rec, fp


def _candidate_path(session: Any, ref: str | PathRef, roots: Any) -> str:
    if isinstance(ref, PathRef):
        return services.model_path(ref.path, roots)
    rec = session.get(ModelRecord, ref)
    if rec is None:
        raise Unprocessable(f"unknown model id {ref!r}", code="unknown_model")
    return rec.path


@bp.post("")
def submit() -> ResponseReturnValue:
    settings = services.settings_of(current_app)
    try:
        req = JOB_REQUEST.validate_python(json_body())
    except ValidationError as exc:
        raise validation_error(exc) from exc
    roots = settings.model_roots
    job_id = str(uuid.uuid4())
    with session_scope() as s:
        reference_model_id = reference_path = None
        budget = req.max_challenges
        if isinstance(req, VerifyJobRequest):
            if isinstance(req.reference, PathRef):
                reference_path = services.model_path(req.reference.path, roots)
            else:
                _rec, fp = _reference_model(s, req.reference)
                reference_model_id = req.reference
                budget = min(budget, fp.n_challenges)
        else:
            assert isinstance(req, IdentifyJobRequest)
        candidate_path = _candidate_path(s, req.candidate, roots)
        inspector: services.QueueInspector = current_app.extensions["rev_inspector"]
        live = inspector.live()
        gpu_live = [q for q in live if q.startswith(services.GPU_PREFIX)]
        device, queue = services.choose_queue(
            req.device, live, services.queue_backlog(settings.redis_url, gpu_live)
        )
        s.add(
            Job(
                id=job_id,
                kind=req.kind,
                status=QUEUED,
                stage="queued",
                request=req.model_dump(mode="json"),
                device=device,
                queue=queue,
                reference_model_id=reference_model_id,
                reference_path=reference_path,
                candidate_path=candidate_path,
                challenges_done=0,
                challenges_max=budget,
            )
        )
    # Enqueue only after the commit: a worker must find the row it is told about.
    try:
        services.enqueue(current_app.extensions["rev_celery"], PREPARE_TASK, [job_id], "default")
    except ServiceUnavailable:
        with session_scope() as s:
            repo.fail_job(s, job_id, "broker_unavailable", "the job could not be enqueued")
        raise
    _metric("job_submitted", req.kind)
    url = url_for("jobs.get_job", job_id=job_id)
    return {"id": job_id, "status": QUEUED, "url": url}, 202, {"Location": url}


def _metric(name: str, *args: Any) -> None:
    try:
        from rev_tasks import metrics

        getattr(metrics, name)(*args)
    except Exception:  # noqa: BLE001 - metrics never fail a request
        pass


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise BadRequest("invalid cursor", code="invalid_cursor") from exc


@bp.get("")
def list_jobs() -> ResponseReturnValue:
    """Newest first; ``next_cursor`` continues after the last job of this page."""
    raw_limit = request.args.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise BadRequest(f"limit must be an integer in 1..{MAX_PAGE}", code="invalid_limit")
    limit = int(raw_limit)
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id.desc())
    status = request.args.get("status")
    if status:
        if status not in ("queued", "running", "succeeded", "failed"):
            raise BadRequest(
                "status must be queued, running, succeeded or failed", code="invalid_status"
            )
        stmt = stmt.where(Job.status == status)
    cursor = request.args.get("cursor")
    if cursor:
        created, last_id = _decode_cursor(cursor)
        stmt = stmt.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id))
        )
    with session_scope() as s:
        jobs = list(s.scalars(stmt.limit(limit + 1)))
        page = jobs[:limit]
        next_cursor = _encode_cursor(page[-1]) if len(jobs) > limit else None
        return {"jobs": [services.job_document(j) for j in page], "next_cursor": next_cursor}


@bp.get("/<job_id>")
def get_job(job_id: str) -> ResponseReturnValue:
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        return services.job_document(job)


@bp.get("/<job_id>/transcript")
def get_transcript(job_id: str) -> ResponseReturnValue:
    """The committed transcript (``rev audit`` accepts it as it is)."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        if job.kind != "verify":
            raise NotFound("identify jobs have no transcript", code="transcript_not_found")
        tr = s.get(Transcript, job_id)
        if tr is None:
            if job.status in ("queued", "running"):
                raise Conflict("the job has not decided yet", code="transcript_not_ready")
            raise NotFound("the job ended without a transcript", code="transcript_not_found")
        doc = tr.document()
    body = json.dumps(doc, separators=(",", ":"))
    return Response(body, mimetype="application/json")
