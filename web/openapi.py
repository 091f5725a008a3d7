"""``/openapi.json``: an OpenAPI 3.1 document generated from the pydantic schemas.

Paths are written here by hand (they are few); every request and response body comes from
``web.schemas`` so the document cannot drift from what the handlers validate.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue
from pydantic import TypeAdapter

from rev_tasks import __version__
from web import schemas as S

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
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "malformed JSON or query parameters",
        404: "not found",
        409: "conflict with the current state (model not ready, no GPU worker, duplicate id)",
        415: "the body is not JSON",
        422: "validation failed (unknown fields, out-of-range values, bad paths, unknown models)",
        503: "broker unavailable",
    }
    return {str(c): _json("ErrorResponse", text[c]) for c in codes}


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
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("JobRequest")}},
                },
                "responses": {
                    "202": _json("JobAccepted", "accepted; poll the url"),
                    **_errors(400, 409, 415, 422, 503),
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
                        "schema": {
                            "type": "string",
                            "enum": ["queued", "running", "succeeded", "failed"],
                        },
                    },
                ],
                "responses": {"200": _json("JobPage", "one page of jobs"), **_errors(400)},
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "summary": "A job's status, progress and result",
                "operationId": "getJob",
                "parameters": [_id_param("job_id")],
                "responses": {"200": _json("JobDocument", "the job"), **_errors(404)},
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
                    },
                    **_errors(404, 409),
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
                    "202": _json("ModelDocument", "registered; status pending"),
                    **_errors(400, 409, 415, 422, 503),
                },
            },
            "get": {
                "summary": "List registered models",
                "operationId": "listModels",
                "responses": {"200": _json("ModelList", "all models")},
            },
        },
        "/v1/models/{model_id}": {
            "get": {
                "summary": "A registered model and its fingerprint",
                "operationId": "getModel",
                "parameters": [_id_param("model_id")],
                "responses": {"200": _json("ModelDocument", "the model"), **_errors(404)},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "operationId": "healthz",
                "responses": {"200": _json("Health", "the process answers")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: database, broker, a live worker per required queue",
                "operationId": "readyz",
                "responses": {
                    "200": _json("Health", "ready"),
                    "503": _json("Health", "not ready; reason says why"),
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "REV Farm coordinator",
            "version": __version__,
            "description": "Behavioural model-identity verification jobs. See docs/api.md.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }


@bp.get("/openapi.json")
def openapi() -> ResponseReturnValue:
    return build_spec()
