"""Certificates over the API: a job's signed envelope and the farm's public keys.

``GET /v1/jobs/<id>/certificate`` serves the envelope stored when the verdict was published
(tenant rules as for the job). ``GET /v1/certificates/key`` is the current public key as
PEM, ``?keyid=`` any key that ever signed (rotation keeps old certificates verifiable), and
``GET /v1/certificates/keys`` lists them all. The key routes are public: a third party
checks a certificate without an account. The coordinator holds no private key.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request
from flask.typing import ResponseReturnValue

from rev_tasks import attest, jobs
from rev_tasks.db.session import session_scope
from rev_tasks.db.tables import iso
from web.errors import Conflict, NotFound
from web.inputs import check_query
from web.jobs import visible_job

bp = Blueprint("certificates", __name__, url_prefix="/v1")

PEM_TYPE = "application/x-pem-file"
PUBLIC_PATHS = frozenset({"/v1/certificates/key", "/v1/certificates/keys"})


@bp.get("/jobs/<job_id>/certificate")
def job_certificate(job_id: str) -> ResponseReturnValue:
    check_query()
    with session_scope() as s:
        job = visible_job(s, job_id)
        text = attest.stored_certificate(s, job_id)
        status = job.status
    if text is None:
        if status in jobs.ACTIVE:
            raise Conflict("the job has not published a verdict yet", code="certificate_not_ready")
        if status in (jobs.FAILED, jobs.CANCELLED):
            raise NotFound("the job published no verdict", code="certificate_not_found")
        raise NotFound(
            "no certificate was issued for this job (an operator can run "
            "`rev certificate issue JOB_ID` where the signing key is)",
            code="certificate_not_found",
        )
    return Response(text, mimetype="application/json")


@bp.get("/certificates/key")
def public_key() -> ResponseReturnValue:
    check_query("keyid")
    wanted = request.args.get("keyid")
    with session_scope() as s:
        keys = attest.signing_keys(s)
        match = [k for k in keys if wanted is None or k.keyid == wanted]
        if not match:
            what = f"no signing key {wanted[:64]!r}" if wanted else "no certificate signed yet"
            raise NotFound(what, code="key_not_found")
        key = match[0]
        pem, kid = key.public_pem, key.keyid
    resp = Response(pem, mimetype=PEM_TYPE)
    resp.headers["Rev-Key-Id"] = kid
    return resp


@bp.get("/certificates/keys")
def public_keys() -> ResponseReturnValue:
    check_query()
    with session_scope() as s:
        keys = attest.signing_keys(s)
        return {
            "keys": [
                {
                    "keyid": k.keyid,
                    "public_pem": k.public_pem,
                    "first_used_at": iso(k.created_at),
                    "current": i == 0,
                }
                for i, k in enumerate(keys)
            ]
        }


def _text(description: str, media: str) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def openapi_paths(errors: Any, ok_headers: Any) -> dict[str, Any]:
    """This module's operations for ``/openapi.json`` (``errors``/``ok_headers`` from there)."""
    keyid = {"name": "keyid", "in": "query", "schema": {"type": "string"}}
    return {
        "/v1/jobs/{job_id}/certificate": {
            "get": {
                "summary": "The job's signed certificate (DSSE envelope of an in-toto Statement)",
                "operationId": "getCertificate",
                "parameters": [
                    {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "the certificate file (input of `rev certificate verify`)",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                        "headers": ok_headers,
                    },
                    **errors(400, 404, 409),
                },
            }
        },
        "/v1/certificates/key": {
            "get": {
                "summary": "The farm's current certificate public key, or the one named by keyid",
                "operationId": "getCertificateKey",
                "security": [],
                "parameters": [keyid],
                "responses": {
                    "200": _text("Ed25519 public key (PEM)", PEM_TYPE),
                    "400": errors(400)["400"],
                    "404": errors(404)["404"],
                },
            }
        },
        "/v1/certificates/keys": {
            "get": {
                "summary": "Every key that has signed a certificate, current first",
                "operationId": "listCertificateKeys",
                "security": [],
                "responses": {
                    "200": {
                        "description": "the keys",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": errors(400)["400"],
                },
            }
        },
    }
