"""Issue and read the certificates of published jobs (database glue for ``certificates``).

The inference task records the weights digests of the models it ran (:func:`weights_digests`)
in the job's result, so a certificate names the weights that were verified, not whatever
the folder holds later. The consensus tally calls :func:`issue_on_publish` in the
transaction that publishes a verdict, so a job is certified exactly when it is published
and by the key the consensus workers hold; the coordinator only serves what was stored and
never holds the private key. ``rev certificate issue`` calls :func:`issue` for jobs
published before certificates existed (or while the key file was missing).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from rev_tasks import certificates as C
from rev_tasks.db.repo import upsert
from rev_tasks.db.tables import (
    Certificate,
    Fingerprint,
    Job,
    ModelRecord,
    SigningKey,
    Transcript,
    iso,
    utcnow,
)

log = logging.getLogger(__name__)


def _label(ref: Any, path: str | None) -> str:
    """How the job named a model: its registered id, else the folder's name."""
    if isinstance(ref, str):
        return ref
    return Path(path).name if path else "unknown"


def weights_digests(candidate_path: str, reference_path: str | None) -> dict[str, str | None]:
    """``candidate_digest`` (and ``reference_digest`` for a folder reference) for a result.

    Taken by the inference task right after the models ran. A folder that cannot be read
    now is None, logged: the verdict stands, and the job is not certified (a digest taken
    later could name other weights).
    """
    out: dict[str, str | None] = {}
    paths = {"candidate_digest": candidate_path, "reference_digest": reference_path}
    for field, path in paths.items():
        if path is None:
            continue
        try:
            out[field] = C.weights_digest(path)
        except (C.CertificateError, OSError) as exc:
            log.error("%s: no weights digest of %s: %s", field, path, exc)
            out[field] = None
    return out


def _recorded_digest(result: dict[str, Any], field: str, path: str) -> str:
    """The digest the inference recorded; for jobs decided before it did, the folder's now."""
    if field not in result:
        return C.weights_digest(path)
    digest = result[field]
    if not digest:
        raise C.CertificateError(f"the inference could not digest {path}; not certified")
    return str(digest)


def _candidate(job: Job) -> dict[str, Any]:
    request, result = job.request or {}, job.result or {}
    endpoint = request.get("endpoint") or result.get("endpoint")
    if isinstance(endpoint, dict) and endpoint.get("url"):
        return C.endpoint_subject(str(endpoint["url"]), str(endpoint.get("model", "")))
    digest = _recorded_digest(result, "candidate_digest", job.candidate_path)
    return C.model_subject(_label(request.get("candidate"), job.candidate_path), digest)


def _reference(session: Session, job: Job) -> dict[str, Any]:
    result = job.result or {}
    if job.kind == "identify":
        return {"registry": {"compared": result.get("compared"), "key_id": result.get("key_id")}}
    descriptor = result.get("reference")
    if job.reference_model_id is not None:
        fp = session.get(Fingerprint, job.reference_model_id)
        rec = session.get(ModelRecord, job.reference_model_id)
        out: dict[str, Any] = {
            "model_id": job.reference_model_id,
            "fingerprint_commitment": fp.commitment if fp else None,
            "descriptor": descriptor,
        }
        if rec is not None and Path(rec.path).is_dir():
            out["digest"] = {C.SUBJECT_DIGEST: C.weights_digest(rec.path)}
        return out
    path = job.reference_path or ""
    return {
        "name": _label((job.request or {}).get("reference"), path),
        "digest": {C.SUBJECT_DIGEST: _recorded_digest(result, "reference_digest", path)},
        "descriptor": descriptor,
    }


def job_view(job: Job) -> dict[str, Any]:
    """The fields of the API's job document that a statement reads."""
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "result": job.result,
        "finished_at": iso(job.finished_at),
    }


def issue(session: Session, job_id: str, key: Ed25519PrivateKey) -> str:
    """The job's certificate file (text), signed and stored now unless one exists already.

    Insert-only: a second call, or a racing one, returns the certificate stored first.
    """
    stored = session.get(Certificate, job_id)
    if stored is not None:
        return stored.envelope
    job = session.get(Job, job_id)
    if job is None:
        raise C.CertificateError(f"no job {job_id}")
    tr = session.get(Transcript, job_id)
    statement = C.build_statement(
        job_view(job),
        tr.document() if tr is not None else None,
        subject=_candidate(job),
        reference=_reference(session, job),
    )
    envelope = C.envelope_bytes(C.sign(statement, key)).decode("utf-8")
    kid = C.keyid(key)
    upsert(
        session,
        SigningKey,
        {"keyid": kid, "public_pem": C.public_pem(key), "created_at": utcnow()},
        keys=["keyid"],
    )
    upsert(
        session,
        Certificate,
        {"job_id": job_id, "keyid": kid, "envelope": envelope, "created_at": utcnow()},
        keys=["job_id"],
    )
    session.flush()
    return session.scalars(select(Certificate.envelope).where(Certificate.job_id == job_id)).one()


def issue_on_publish(session: Session, job_id: str, key_file: str | Path) -> bool:
    """The tally's hook: certify a verdict it just published; never fails the publication.

    A missing key file or an unreadable model folder is logged; the verdict stays published
    and ``rev certificate issue JOB_ID`` can certify it later. Only a database error
    propagates: the publication's own transaction is lost with it, and the tally retries.
    """
    try:
        key = C.load_signing_key(key_file)
        issue(session, job_id, key)
    except (C.CertificateError, OSError) as exc:
        log.error("job %s: no certificate issued: %s", job_id, exc)
        return False
    except SQLAlchemyError:
        raise
    except Exception:  # noqa: BLE001 - a bug in signing must not withhold a verdict
        log.exception("job %s: no certificate issued", job_id)
        return False
    return True


def stored_certificate(session: Session, job_id: str) -> str | None:
    row = session.get(Certificate, job_id)
    return row.envelope if row is not None else None


def signing_keys(session: Session) -> list[SigningKey]:
    """Every key that has signed, newest first (the first one is the current key)."""
    return list(
        session.scalars(select(SigningKey).order_by(SigningKey.created_at.desc(), SigningKey.keyid))
    )
