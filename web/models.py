"""``/v1/models``: register reference models (fingerprinted asynchronously) and read them."""

from __future__ import annotations

from flask import Blueprint, current_app, url_for
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from sqlalchemy import select

from rev_tasks.db.models import MODEL_FAILED, MODEL_PENDING, Fingerprint, ModelRecord
from rev_tasks.db.session import session_scope
from web import services
from web.errors import Conflict, NotFound, ServiceUnavailable
from web.jobs import json_body, validation_error
from web.schemas import ModelRegistration

bp = Blueprint("models", __name__, url_prefix="/v1/models")

FINGERPRINT_TASK = "rev_tasks.tasks.models.fingerprint"


@bp.post("")
def register() -> ResponseReturnValue:
    """Store the model as ``pending`` and enqueue its fingerprint (after the commit)."""
    settings = services.settings_of(current_app)
    try:
        req = ModelRegistration.model_validate(json_body())
    except ValidationError as exc:
        raise validation_error(exc) from exc
    path = services.model_path(req.path, settings.model_roots)
    inspector: services.QueueInspector = current_app.extensions["rev_inspector"]
    live = inspector.live()
    gpu_live = [q for q in live if q.startswith(services.GPU_PREFIX)]
    _device, queue = services.choose_queue(
        "auto", live, services.queue_backlog(settings.redis_url, gpu_live)
    )
    with session_scope() as s:
        if s.get(ModelRecord, req.id) is not None:
            raise Conflict(f"model {req.id!r} is already registered", code="model_exists")
        rec = ModelRecord(id=req.id, path=path, status=MODEL_PENDING)
        s.add(rec)
        s.flush()
        doc = services.model_document(rec, None)
    try:
        services.enqueue(current_app.extensions["rev_celery"], FINGERPRINT_TASK, [req.id], queue)
    except ServiceUnavailable:
        with session_scope() as s:
            rec = s.get(ModelRecord, req.id)
            if rec is not None:
                rec.status = MODEL_FAILED
                rec.error = {"code": "broker_unavailable", "message": "could not be enqueued"}
        raise
    url = url_for("models.get_model", model_id=req.id)
    return doc, 202, {"Location": url}


@bp.get("")
def list_models() -> ResponseReturnValue:
    with session_scope() as s:
        recs = list(s.scalars(select(ModelRecord).order_by(ModelRecord.id)))
        fps = {fp.model_id: fp for fp in s.scalars(select(Fingerprint))}
        return {"models": [services.model_document(r, fps.get(r.id)) for r in recs]}


@bp.get("/<model_id>")
def get_model(model_id: str) -> ResponseReturnValue:
    with session_scope() as s:
        rec = s.get(ModelRecord, model_id)
        if rec is None:
            raise NotFound(f"no model {model_id!r}", code="model_not_found")
        return services.model_document(rec, s.get(Fingerprint, model_id))
