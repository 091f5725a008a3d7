"""The coordinator's boundary: bad input is a 4xx JSON error and leaves no job and no message.

These tests run with no worker at all, so any message a bad request enqueued would still be
sitting in its queue: the check that nothing is stuck is exact. The Flask app talks to the
real PostgreSQL and Redis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rev_tasks.testing.harness import backlog

pytestmark = pytest.mark.integration


def _counts() -> tuple[int, int]:
    from sqlalchemy import func, select

    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Job, ModelRecord

    with session_scope() as s:
        return (
            s.scalar(select(func.count()).select_from(Job)) or 0,
            s.scalar(select(func.count()).select_from(ModelRecord)) or 0,
        )


@pytest.fixture()
def nothing_left(farm_env: dict[str, str]) -> Any:
    """Each bad request must create no row and enqueue no message."""
    before = _counts()
    yield
    assert _counts() == before
    left = {k: v for k, v in backlog(farm_env["REDIS_URL"]).items() if v}
    assert not left, f"a rejected request enqueued something: {left}"


def _error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.is_json
    body = resp.get_json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _verify(model_dirs: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "verify",
        "reference": {"path": str(model_dirs["gpt2-a"])},
        "candidate": {"path": str(model_dirs["gpt2-b"])},
    }
    body.update(overrides)
    return body


def test_unknown_model_id(client: Any, model_dirs: dict[str, Path], nothing_left: None) -> None:
    _error(
        client.post("/v1/jobs", json=_verify(model_dirs, reference="no-such-model")),
        422,
        "unknown_model",
    )
    _error(
        client.post("/v1/jobs", json=_verify(model_dirs, candidate="no-such-model")),
        422,
        "unknown_model",
    )
    body = {"kind": "identify", "candidate": "no-such-model"}
    _error(client.post("/v1/jobs", json=body), 422, "unknown_model")


def test_path_outside_roots(client: Any, model_dirs: dict[str, Path], nothing_left: None) -> None:
    for path in (model_dirs["outside"], model_dirs["escape-link"], Path("/etc"), Path("../../etc")):
        resp = client.post("/v1/jobs", json=_verify(model_dirs, candidate={"path": str(path)}))
        _error(resp, 422, "path_outside_roots")
    resp = client.post("/v1/models", json={"id": "escape", "path": str(model_dirs["escape-link"])})
    _error(resp, 422, "path_outside_roots")


def test_folder_that_is_not_a_model(
    client: Any, model_dirs: dict[str, Path], nothing_left: None
) -> None:
    resp = client.post(
        "/v1/jobs", json=_verify(model_dirs, reference={"path": str(model_dirs["not-a-model"])})
    )
    err = _error(resp, 422, "not_a_model")
    assert "config.json" in err["message"]
    missing = model_dirs["root"] / "does-not-exist"
    _error(
        client.post("/v1/jobs", json=_verify(model_dirs, candidate={"path": str(missing)})),
        422,
        "path_not_found",
    )
    resp = client.post("/v1/models", json={"id": "nam", "path": str(model_dirs["not-a-model"])})
    _error(resp, 422, "not_a_model")


def test_malformed_json(client: Any, nothing_left: None) -> None:
    for url in ("/v1/jobs", "/v1/models"):
        resp = client.post(url, data='{"kind": "verify",', content_type="application/json")
        _error(resp, 400, "malformed_json")
        _error(client.post(url, data="kind=verify", content_type="text/plain"), 415)
        _error(client.post(url, json=["not", "an", "object"]), 422, "invalid_request")


@pytest.mark.parametrize(
    "overrides",
    [
        {"alpha": 0},
        {"alpha": 0.6},
        {"alpha": "0.01"},
        {"max_challenges": 0},
        {"max_challenges": 1025},
        {"max_challenges": True},
        {"batch_size": 0},
        {"batch_size": 257},
        {"tolerance": "fuzzy"},
        {"device": "tpu"},
        {"kind": "train"},
        {"reference": {"path": ""}},
        {"reference": "../etc"},
        {"reference": 17},
    ],
)
def test_out_of_range_fields(
    client: Any, model_dirs: dict[str, Path], overrides: dict[str, Any], nothing_left: None
) -> None:
    err = _error(
        client.post("/v1/jobs", json=_verify(model_dirs, **overrides)), 422, "invalid_request"
    )
    assert err["details"], err


@pytest.mark.parametrize(
    "body",
    [
        {"max_challenge": 10},
        {"extra": True},
        {"reference": {"path": "x", "sha": "y"}},
    ],
)
def test_unknown_fields(
    client: Any, model_dirs: dict[str, Path], body: dict[str, Any], nothing_left: None
) -> None:
    err = _error(client.post("/v1/jobs", json=_verify(model_dirs, **body)), 422, "invalid_request")
    assert any(d["type"] == "extra_forbidden" for d in err["details"]), err
    resp = client.post("/v1/models", json={"id": "m", "path": str(model_dirs["gpt2-a"]), "x": 1})
    _error(resp, 422, "invalid_request")


def test_missing_fields(client: Any, model_dirs: dict[str, Path], nothing_left: None) -> None:
    _error(
        client.post("/v1/jobs", json={"kind": "verify", "candidate": "x"}), 422, "invalid_request"
    )
    _error(
        client.post("/v1/jobs", json={"reference": "x", "candidate": "y"}), 422, "invalid_request"
    )
    _error(client.post("/v1/models", json={"id": "bad id with spaces", "path": "x"}), 422)


def test_cuda_without_gpu_worker_is_refused(
    client: Any, model_dirs: dict[str, Path], nothing_left: None
) -> None:
    _error(client.post("/v1/jobs", json=_verify(model_dirs, device="cuda")), 409, "no_gpu_worker")


def test_unknown_job_and_routes(client: Any) -> None:
    _error(client.get("/v1/jobs/00000000-0000-0000-0000-000000000000"), 404, "job_not_found")
    _error(client.get("/v1/jobs/nope/transcript"), 404, "job_not_found")
    _error(client.get("/v1/nothing-here"), 404, "not_found")
    _error(client.delete("/v1/jobs"), 405, "method_not_allowed")
    _error(client.get("/v1/jobs?limit=0"), 400, "invalid_limit")
    _error(client.get("/v1/jobs?cursor=%%%"), 400, "invalid_cursor")
    _error(client.get("/v1/jobs?status=lost"), 400, "invalid_status")


def test_health_and_readiness_without_workers(client: Any) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    resp = client.get("/readyz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["status"] == "unavailable"
    assert "no live worker" in body["reason"]
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"] == "ok"


def test_openapi_document_is_valid(client: Any) -> None:
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/transcript", "/v1/models",
            "/v1/models/{model_id}", "/healthz", "/readyz"} <= set(spec["paths"])  # fmt: skip
    try:
        from openapi_spec_validator import validate
    except ImportError:
        validate = None
    if validate is not None:
        validate(spec)
    # Always: every component is a valid JSON Schema (OpenAPI 3.1 uses draft 2020-12) and
    # every $ref resolves.
    import json
    import re

    from jsonschema import Draft202012Validator

    schemas = spec["components"]["schemas"]
    for name, schema in schemas.items():
        Draft202012Validator.check_schema(schema), name
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert refs <= set(schemas)
    # The request schema accepts a valid request and rejects an unknown field.
    resolver_doc = {"$defs": schemas, **schemas["VerifyJobRequest"]}
    text = json.dumps(resolver_doc).replace("#/components/schemas/", "#/$defs/")
    validator = Draft202012Validator(json.loads(text))
    assert validator.is_valid({"kind": "verify", "reference": "m", "candidate": {"path": "/x"}})
    assert not validator.is_valid({"kind": "verify", "reference": "m", "candidate": "c", "x": 1})


def test_a_broker_outage_at_submit_is_a_503_and_the_row_says_so(
    farm_env: dict[str, str], keys: dict[str, str], model_dirs: dict[str, Path]
) -> None:
    """The row is committed before the send; when the send fails it is failed, not left queued."""
    import uuid

    from celery import Celery

    from rev_tasks.settings import Settings
    from tests.integration.farm import authed_client
    from web import create_app

    dead = Celery("dead-broker", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app = create_app(
        {"TESTING": True, "REV_SETTINGS": Settings.from_env(), "REV_METRICS": False,
         "CELERY_APP": dead}
    )  # fmt: skip
    client = authed_client(app, keys["admin"])

    def failed_ids() -> set[str]:
        docs = client.get("/v1/jobs?status=failed&limit=100").get_json()["jobs"]
        return {d["id"] for d in docs}

    before = failed_ids()
    _error(
        client.post("/v1/jobs", json=_verify(model_dirs, device="cpu")), 503, "broker_unavailable"
    )
    (new,) = failed_ids() - before
    doc = client.get(f"/v1/jobs/{new}").get_json()
    assert doc["status"] == "failed" and doc["stage"] == "done", doc
    assert doc["error"]["code"] == "broker_unavailable" and doc["finished_at"], doc

    model_id = f"unsent-{uuid.uuid4().hex[:8]}"
    body = {"id": model_id, "path": str(model_dirs["gpt2-a"])}
    _error(client.post("/v1/models", json=body), 503, "broker_unavailable")
    doc = client.get(f"/v1/models/{model_id}").get_json()
    assert doc["status"] == "failed" and doc["error"]["code"] == "broker_unavailable", doc
