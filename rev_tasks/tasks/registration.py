"""Fingerprint a registered reference model (its status: pending → ready | failed).

The same task tops up a ready model's challenge pool: it signs the next fresh challenges
of the farm key's sequence and adds them to the fingerprint, when the jobs' draws and the
retired challenges leave too few (``prepare`` asks for it).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from rev_tasks.celery import app
from rev_tasks.db import repo
from rev_tasks.db.session import session_scope
from rev_tasks.db.tables import (
    MODEL_FAILED,
    MODEL_PENDING,
    MODEL_READY,
    EndpointFingerprint,
    Fingerprint,
    ModelRecord,
    pack_json,
)
from rev_tasks.queues import Task
from rev_tasks.settings import get_settings
from rev_tasks.tasks.common import (
    DB_ERRORS,
    DB_RETRY,
    FarmError,
    farm_key,
    load_cached,
    memory_budget,
)

log = logging.getLogger(__name__)


def _mark_failed(model_id: str, code: str, message: str) -> None:
    with session_scope() as s:
        rec = s.get(ModelRecord, model_id)
        if rec is not None and rec.status == MODEL_PENDING:
            rec.status = MODEL_FAILED
            rec.error = {"code": code, "message": message}
    log.warning("model %s failed: %s: %s", model_id, code, message)


@app.task(name=Task.FINGERPRINT, ignore_result=True, **DB_RETRY)
def fingerprint(model_id: str, top_up: bool = False) -> str:
    """Compute the model's signatures under the farm key and store them as its fingerprint.

    ``top_up``: add fresh challenges to a ready model's pool instead.
    """
    from rev_tasks.engine import fingerprint_model
    from rev_tasks.inference import ModelLoadError

    if top_up:
        return _top_up(model_id)
    with session_scope() as s:
        rec = s.get(ModelRecord, model_id)
        if rec is None or rec.status != MODEL_PENDING:
            return "skipped"
        path, dtype = rec.path, rec.dtype or "float32"
    settings = get_settings()
    try:
        key = farm_key()
        # In the registration's dtype: the signatures, and the self-calibration that fixes
        # precision's delta, are computed the way the jobs against it run their candidates.
        model = load_cached(path, memory_budget(None, path), dtype)  # worker default budget
        doc = fingerprint_model(
            model,
            key,
            n=settings.fingerprint_challenges,
            batch_size=settings.default_batch_size,
        )
    except FarmError as exc:
        _mark_failed(model_id, exc.code, exc.message)
        return "failed"
    except ModelLoadError as exc:
        _mark_failed(model_id, "model_load_error", str(exc))
        return "failed"
    except SoftTimeLimitExceeded:
        _mark_failed(model_id, "timeout", "fingerprinting ran past REV_JOB_TIME_LIMIT")
        return "failed"
    except DB_ERRORS:
        raise  # retried with backoff (DB_RETRY)
    except Exception as exc:
        log.exception("model %s: unexpected error", model_id)
        _mark_failed(model_id, "internal_error", f"{type(exc).__name__}: {exc}"[:500])
        raise
    endpoint = _endpoint_fingerprint(model_id, path)
    with session_scope() as s:
        rec = s.get(ModelRecord, model_id)
        if rec is None:
            return "deleted"
        repo.store_fingerprint(s, model_id, doc)
        if endpoint is not None:
            row = s.get(EndpointFingerprint, model_id)
            if row is not None:
                for field, value in endpoint.items():
                    setattr(row, field, value)
        rec.status = MODEL_READY
        rec.descriptor = doc["descriptor"]
        rec.error = None
    return "ready"


def _endpoint_fingerprint(model_id: str, path: str) -> dict[str, Any] | None:
    """The columns of the model's endpoint fingerprint when registration asked for one.

    A ``rev-endpoint-fingerprint/1`` document under the farm key (its challenges 0..n-1,
    ``REV_FINGERPRINT_CHALLENGES``): endpoint jobs against the model read it instead of
    running the weights. A model that is no causal LM gets a failed row with the reason;
    the model itself stays usable for model jobs.
    """
    from rev_tasks.core.keys import key_id
    from rev_tasks.endpoints.fingerprint import make_endpoint_fingerprint
    from rev_tasks.endpoints.reference import Reference

    with session_scope() as s:
        row = s.get(EndpointFingerprint, model_id)
        if row is None or row.status != MODEL_PENDING:
            return None
    settings = get_settings()
    try:
        key = farm_key()
        doc = make_endpoint_fingerprint(Reference(path), key, n=settings.fingerprint_challenges)
    except DB_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - not a causal LM, or its tokenizer is missing
        log.warning("model %s: no endpoint fingerprint: %s", model_id, exc)
        return {
            "status": MODEL_FAILED,
            "error": {
                "code": "no_endpoint_evidence",
                "message": f"{type(exc).__name__}: {exc}"[:500],
            },
        }
    return {
        "status": MODEL_READY,
        "key_id": key_id(key),
        "n_challenges": int(doc["challenges"]),
        "doc": pack_json(doc),
        "error": None,
    }


def _top_up(model_id: str) -> str:
    """Sign ``REV_FINGERPRINT_CHALLENGES`` fresh challenges past the pool's last index."""
    from rev_tasks.core.keys import key_id
    from rev_tasks.engine import extend_fingerprint, fingerprint_model

    with session_scope() as s:
        rec = s.get(ModelRecord, model_id)
        fp = s.get(Fingerprint, model_id)
        if rec is None or fp is None or rec.status != MODEL_READY:
            return "skipped"
        path, bits, start = rec.path, fp.bits, max(repo.pool_indices(fp.document())) + 1
        fp_key, dtype = fp.key_id, rec.dtype or "float32"
    settings = get_settings()
    try:
        key = farm_key()
        if key_id(key) != fp_key:  # its jobs fail with key_mismatch; nothing to add
            return "skipped"
        model = load_cached(path, memory_budget(None, path), dtype)  # as the first signatures
        more = fingerprint_model(
            model,
            key,
            n=settings.fingerprint_challenges,
            bits=bits,
            batch_size=settings.default_batch_size,
            start=start,
        )
    except DB_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - the jobs keep waiting, then fail with a reason
        # topup_requested_at stays: the waiting jobs ask again only after TOPUP_RESEND_S,
        # instead of a failing top-up every few seconds.
        log.error("model %s: pool top-up failed: %s", model_id, exc)
        return "failed"
    with session_scope() as s:
        fp = s.get(Fingerprint, model_id, with_for_update=True)
        if fp is None:
            return "deleted"
        doc = extend_fingerprint(fp.document(), more)
        fp.doc = pack_json(doc)
        fp.n_challenges = len(doc["signatures"])
        fp.commitment = doc["challenge_commitment"]
        fp.topup_requested_at = None
    log.info("model %s: pool topped up to %d challenges", model_id, len(doc["signatures"]))
    return "topped up"
