"""``/v1/models``: register reference models (fingerprinted asynchronously) and read them.

Model ids are global and each model has one owner tenant. Other tenants get 404 on it and
``unknown_model`` when they name it in a job; admin keys see and use every model. The one
thing a tenant can learn about another's models is that an id is taken (409 on register):
docs/security.md explains why that was accepted.
"""

from __future__ import annotations

import re

from flask import Blueprint, current_app, url_for
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from sqlalchemy import select

from rev_tasks import queues
from rev_tasks.db.session import read_scope, session_scope
from rev_tasks.db.tables import (
    MODEL_FAILED,
    MODEL_PENDING,
    EndpointFingerprint,
    Fingerprint,
    ModelRecord,
)
from rev_tasks.queues import Task
from web import services
from web.errors import Conflict, NotFound
from web.inputs import check_query, json_body, validation_error
from web.schemas import MODEL_ID_PATTERN, ModelRegistration
from web.security import can_see, principal

_MODEL_ID = re.compile(MODEL_ID_PATTERN)

bp = Blueprint("models", __name__, url_prefix="/v1/models")


@bp.post("")
def register() -> ResponseReturnValue:
    """Store the model as ``pending`` and enqueue its fingerprint (after the commit)."""
    settings = services.settings_of(current_app)
    check_query()
    try:
        req = ModelRegistration.model_validate(json_body())
    except ValidationError as exc:
        raise validation_error(exc) from exc
    path = services.model_path(req.path, settings)
    inspector: services.QueueInspector = current_app.extensions["rev_inspector"]
    live = inspector.live()
    gpu_live = [q for q in live if queues.is_gpu_queue(q)]
    _device, queue = services.choose_queue(
        "auto", live, services.queue_backlog(settings.redis_url, gpu_live)
    )
    with session_scope() as s:
        if s.get(ModelRecord, req.id) is not None:
            raise Conflict(f"model {req.id!r} is already registered", code="model_exists")
        rec = ModelRecord(
            id=req.id,
            tenant=principal().tenant,
            path=path,
            status=MODEL_PENDING,
            dtype=req.dtype,
        )
        s.add(rec)
        s.flush()
        efp = None
        if req.endpoint_evidence:  # the fingerprint task computes it with the white-box one
            efp = EndpointFingerprint(model_id=req.id, status=MODEL_PENDING)
            s.add(efp)
            s.flush()
        doc = services.model_document(rec, None, efp)
        services.enqueue_after_commit(
            s,
            current_app.extensions["rev_celery"],
            Task.FINGERPRINT,
            [req.id],
            queue,
            on_failure=lambda: _fail_unsent(req.id),
        )
    url = url_for("models.get_model", model_id=req.id)
    return doc, 202, {"Location": url}


def _fail_unsent(model_id: str) -> None:
    with session_scope() as s:
        rec = s.get(ModelRecord, model_id)
        if rec is not None:
            rec.status = MODEL_FAILED
            rec.error = {"code": "broker_unavailable", "message": "could not be enqueued"}


@bp.get("")
def list_models() -> ResponseReturnValue:
    """The caller's models (every tenant's for an admin key), ordered by id."""
    check_query()
    models = select(ModelRecord).order_by(ModelRecord.id)
    fingerprints = select(Fingerprint).join(ModelRecord, ModelRecord.id == Fingerprint.model_id)
    if not principal().is_admin:
        models = models.where(ModelRecord.tenant == principal().tenant)
        fingerprints = fingerprints.where(ModelRecord.tenant == principal().tenant)
    with read_scope() as s:
        recs = list(s.scalars(models))
        fps = {fp.model_id: fp for fp in s.scalars(fingerprints)}
        ids = [r.id for r in recs]
        efps = {
            e.model_id: e
            for e in s.scalars(
                select(EndpointFingerprint).where(EndpointFingerprint.model_id.in_(ids))
            )
        }
        return {"models": [services.model_document(r, fps.get(r.id), efps.get(r.id)) for r in recs]}


@bp.get("/<model_id>")
def get_model(model_id: str) -> ResponseReturnValue:
    check_query()
    with read_scope() as s:
        rec = s.get(ModelRecord, model_id) if _MODEL_ID.fullmatch(model_id) else None
        if rec is None or not can_see(rec.tenant):
            raise NotFound(f"no model {model_id[:128]!r}", code="model_not_found")
        return services.model_document(
            rec, s.get(Fingerprint, model_id), s.get(EndpointFingerprint, model_id)
        )
