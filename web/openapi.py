"""``/openapi.json``: an OpenAPI 3.1 document generated from the pydantic schemas.

Paths are written here by hand (they are few); every request and response body comes from
``web.schemas`` so the document cannot drift from what the handlers validate.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue
from pydantic import TypeAdapter

from rev_tasks import __version__, jobs
from web import certificates
from web import schemas as S
from web.idempotency import HEADER as IDEMPOTENCY_HEADER

bp = Blueprint("openapi", __name__)

_COMPONENTS: dict[str, Any] = {
    "JobRequest": (S.JOB_REQUEST, "validation"),
    "ModelRegistration": (TypeAdapter(S.ModelRegistration), "validation"),
    "ErrorResponse": (TypeAdapter(S.ErrorResponse), "serialization"),
    "JobAccepted": (TypeAdapter(S.JobAccepted), "serialization"),
    "JobDocument": (TypeAdapter(S.JobDocument), "serialization"),
    "JobPage": (TypeAdapter(S.JobPage), "serialization"),
    "ModelDocument": (TypeAdapter(S.ModelDocument), "serialization"),
    "ModelList": (TypeAdapter(S.ModelList), "serialization"),
    "Health": (TypeAdapter(S.Health), "serialization"),
    "CredentialSet": (TypeAdapter(S.CredentialSet), "validation"),
    "CredentialValue": (TypeAdapter(S.CredentialValue), "validation"),
    "CredentialDocument": (TypeAdapter(S.CredentialDocument), "serialization"),
    "CredentialList": (TypeAdapter(S.CredentialList), "serialization"),
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


_RATE_HEADERS = {
    "RateLimit-Limit": "bucket size (burst) of this key",
    "RateLimit-Remaining": "requests left in the bucket now",
    "RateLimit-Reset": "seconds until the bucket is full again",
}


def _headers(*names: str) -> dict[str, Any]:
    text = {**_RATE_HEADERS, "Retry-After": "seconds to wait before retrying"}
    return {n: {"description": text[n], "schema": {"type": "integer"}} for n in names}


def _errors(*codes: int) -> dict[str, Any]:
    """Error responses of an authenticated operation: the given codes plus 401/403/429/503."""
    text = {
        400: "malformed JSON or query parameters (unknown or repeated parameters included)",
        401: "no API key, or an invalid or revoked one (see WWW-Authenticate)",
        403: "the key lacks the scope this operation needs",
        404: "not found (or owned by another tenant)",
        409: "conflict with the current state (model not ready, no GPU worker, duplicate id, "
        "a finished job)",
        408: "the body did not arrive within REV_BODY_TIMEOUT; the connection is closed",
        413: "the body is larger than REV_MAX_BODY_BYTES (declared or sent chunked)",
        415: "the body is not JSON",
        422: "validation failed (unknown fields, out-of-range values, bad paths, unknown models, "
        "an Idempotency-Key reused for another body)",
        429: "rate limit exceeded for this key (for the client IP while no key is known); "
        "Retry-After says when to retry",
        503: "database or broker unavailable; retry later",
    }
    out = {}
    for c in sorted({*codes, 401, 403, 429, 503}):
        out[str(c)] = _json("ErrorResponse", text[c])
        if c == 429:
            out[str(c)]["headers"] = _headers("Retry-After", *_RATE_HEADERS)
        elif c == 503:
            out[str(c)]["headers"] = _headers("Retry-After")
    return out


def _ok(name: str, description: str) -> dict[str, Any]:
    """A success response of an authenticated operation, with its RateLimit headers."""
    return {**_json(name, description), "headers": _headers(*_RATE_HEADERS)}


_PUBLIC: list[dict[str, Any]] = []  # `security: []` — no key needed


def _id_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def build_spec() -> dict[str, Any]:
    """The whole OpenAPI document (pure function: tests validate it)."""
    keys = [(name, mode, adapter) for name, (adapter, mode) in _COMPONENTS.items()]
    refs, defs = TypeAdapter.json_schemas(keys, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    for (name, _mode), schema in refs.items():
        if schema.get("$ref") != f"#/components/schemas/{name}":  # a union: inline it
            schemas[name] = schema
    paths: dict[str, Any] = {
        "/v1/jobs": {
            "post": {
                "summary": "Submit a verify or identify job",
                "operationId": "submitJob",
                "parameters": [
                    {
                        "name": IDEMPOTENCY_HEADER,
                        "in": "header",
                        "required": False,
                        "description": "a key of the client's choosing (a UUID): the same key "
                        "with the same body within 24 h returns the first job instead of "
                        "creating another (Idempotent-Replayed: true); with another body, 422",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("JobRequest")}},
                },
                "responses": {
                    "202": _ok("JobAccepted", "accepted; poll the url"),
                    **_errors(400, 408, 409, 413, 415, 422),
                },
            },
            "get": {
                "summary": "List jobs, newest first",
                "operationId": "listJobs",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(jobs.STATUSES)},
                    },
                ],
                "responses": {"200": _ok("JobPage", "one page of jobs"), **_errors(400)},
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "summary": "A job's status, progress and result",
                "operationId": "getJob",
                "parameters": [_id_param("job_id")],
                "responses": {"200": _ok("JobDocument", "the job"), **_errors(400, 404)},
            }
        },
        "/v1/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a queued or running job (idempotent)",
                "description": "Its queued tasks are revoked and a running inference stops "
                "at its next batch; the job ends `cancelled` with no verdict. Cancelling a "
                "cancelled job answers the same document; a job that finished otherwise is "
                "a 409 `job_finished`.",
                "operationId": "cancelJob",
                "parameters": [_id_param("job_id")],
                "responses": {
                    "200": _ok("JobDocument", "the cancelled job"),
                    **_errors(400, 404, 409),
                },
            }
        },
        "/v1/jobs/{job_id}/transcript": {
            "get": {
                "summary": "The job's committed transcript (input of `rev audit`)",
                "operationId": "getTranscript",
                "parameters": [_id_param("job_id")],
                "responses": {
                    "200": {
                        "description": "rev-transcript/1 document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                        "headers": _headers(*_RATE_HEADERS),
                    },
                    **_errors(400, 404, 409),
                },
            }
        },
        "/v1/models": {
            "post": {
                "summary": "Register a reference model (fingerprinted asynchronously)",
                "operationId": "registerModel",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ModelRegistration")}},
                },
                "responses": {
                    "202": _ok("ModelDocument", "registered; status pending"),
                    **_errors(400, 408, 409, 413, 415, 422),
                },
            },
            "get": {
                "summary": "List registered models",
                "operationId": "listModels",
                "responses": {"200": _ok("ModelList", "the caller's models"), **_errors(400)},
            },
        },
        "/v1/models/{model_id}": {
            "get": {
                "summary": "A registered model and its fingerprint",
                "operationId": "getModel",
                "parameters": [_id_param("model_id")],
                "responses": {"200": _ok("ModelDocument", "the model"), **_errors(400, 404)},
            }
        },
        "/v1/credentials": {
            "post": {
                "summary": "Store or rotate a named endpoint credential (the value is never "
                "returned)",
                "description": "Encrypted at rest with the farm's REV_CREDENTIAL_KEY and scoped "
                "to the caller's tenant; an endpoint job names it. 201 when created, 200 when "
                "an existing value was replaced (rotated_at).",
                "operationId": "setCredential",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CredentialSet")}},
                },
                "responses": {
                    "201": _ok("CredentialDocument", "created"),
                    "200": _ok("CredentialDocument", "rotated"),
                    **_errors(400, 408, 413, 415, 422),
                },
            },
            "get": {
                "summary": "List the tenant's credentials (names and timestamps, no values)",
                "operationId": "listCredentials",
                "responses": {
                    "200": _ok("CredentialList", "the caller's tenant's credentials"),
                    **_errors(400),
                },
            },
        },
        "/v1/credentials/{name}": {
            "put": {
                "summary": "Store or rotate the named credential",
                "operationId": "putCredential",
                "parameters": [_id_param("name")],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CredentialValue")}},
                },
                "responses": {
                    "201": _ok("CredentialDocument", "created"),
                    "200": _ok("CredentialDocument", "rotated"),
                    **_errors(400, 408, 413, 415, 422),
                },
            },
            "get": {
                "summary": "One credential's name and timestamps",
                "operationId": "getCredential",
                "parameters": [_id_param("name")],
                "responses": {
                    "200": _ok("CredentialDocument", "the credential"),
                    **_errors(400, 404),
                },
            },
            "delete": {
                "summary": "Delete the credential",
                "operationId": "deleteCredential",
                "parameters": [_id_param("name")],
                "responses": {
                    "204": {"description": "deleted", "headers": _headers(*_RATE_HEADERS)},
                    **_errors(400, 404),
                },
            },
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "operationId": "healthz",
                "security": _PUBLIC,
                "responses": {"200": _json("Health", "the process answers")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: database, broker, a live worker per required queue",
                "operationId": "readyz",
                "security": _PUBLIC,
                "responses": {
                    "200": _json("Health", "ready"),
                    "429": {
                        **_json("ErrorResponse", "too many requests from this client IP"),
                        "headers": _headers("Retry-After"),
                    },
                    "503": _json("Health", "not ready; reason says why"),
                },
            }
        },
    }
    paths.update(certificates.openapi_paths(_errors, _headers(*_RATE_HEADERS)))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "REV Farm coordinator",
            "version": __version__,
            "description": (
                "Behavioural model-identity verification jobs. Every /v1 operation needs "
                "`Authorization: Bearer <API key>` (create keys with `rev keys create`) and is "
                "rate limited per key. See docs/api.md and docs/security.md."
            ),
        },
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key `rev_<id>_<secret>` from `rev keys create`",
                }
            },
        },
    }


@bp.get("/openapi.json")
def openapi() -> ResponseReturnValue:
    return build_spec()
