"""The coordinator's boundary: bad input is a 4xx JSON error and leaves no job and no message.

These tests run with no worker at all, so any message a bad request enqueued would still be
sitting in its queue: the check that nothing is stuck is exact. The Flask app talks to the
real PostgreSQL and Redis.
"""

from __future__ import annotations

import json
import os
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
    counted = _finished_count(FAILED)
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = _verify(model_dirs, device="cpu")
    _error(client.post("/v1/jobs", json=body, headers=key), 503, "broker_unavailable")
    (new,) = failed_ids() - before
    doc = client.get(f"/v1/jobs/{new}").get_json()
    assert doc["status"] == "failed" and doc["stage"] == "done", doc
    assert doc["error"]["code"] == "broker_unavailable" and doc["finished_at"], doc
    assert _finished_count(FAILED) == counted + 1  # failed by the coordinator, counted there
    # The key was given back with the unsent job: the client's retry makes a job that runs.
    retry = authed_client(create_app({"TESTING": True, "REV_SETTINGS": Settings.from_env(),
                                      "REV_METRICS": False}), keys["admin"])  # fmt: skip
    resp = retry.post("/v1/jobs", json=body, headers=key)
    assert resp.status_code == 202 and resp.get_json()["id"] != new
    assert "Idempotent-Replayed" not in resp.headers
    from tests.integration.farm import purge

    purge(farm_env["REDIS_URL"])

    model_id = f"unsent-{uuid.uuid4().hex[:8]}"
    body = {"id": model_id, "path": str(model_dirs["gpt2-a"])}
    _error(client.post("/v1/models", json=body), 503, "broker_unavailable")
    doc = client.get(f"/v1/models/{model_id}").get_json()
    assert doc["status"] == "failed" and doc["error"]["code"] == "broker_unavailable", doc


# ----------------------------------------------------------------------------- cancel
CANCELLED = {"kind": "verify", "status": "cancelled", "verdict": "none"}
FAILED = {"kind": "verify", "status": "failed", "verdict": "none"}


def _finished_count(labels: dict[str, str]) -> float:
    """This process's rev_jobs_finished_total (the app under test runs here)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("rev_jobs_finished_total", labels) or 0.0


def _queued_job(client: Any, model_dirs: dict[str, Path], **headers: str) -> str:
    resp = client.post("/v1/jobs", json=_verify(model_dirs, device="cpu"), headers=headers)
    assert resp.status_code == 202, resp.get_json()
    return str(resp.get_json()["id"])


@pytest.fixture()
def purged(farm_env: dict[str, str]) -> Any:
    """These tests enqueue real jobs (no worker takes them): their messages go afterwards."""
    from tests.integration.farm import purge

    yield
    purge(farm_env["REDIS_URL"])


def test_cancel_a_queued_job_owner_or_admin_once(
    client: Any, client_for: Any, keys: dict[str, str], model_dirs: dict[str, Path], purged: None
) -> None:
    alpha = client_for(keys["alpha"])
    job_id = _queued_job(alpha, model_dirs)
    before = _finished_count(CANCELLED)
    _error(client_for(keys["alpha-reader"]).post(f"/v1/jobs/{job_id}/cancel"), 403, "forbidden")
    _error(client_for(keys["beta"]).post(f"/v1/jobs/{job_id}/cancel"), 404, "job_not_found")
    assert alpha.get(f"/v1/jobs/{job_id}").get_json()["status"] == "queued"
    resp = alpha.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200, resp.get_json()
    doc = resp.get_json()
    assert (doc["status"], doc["stage"], doc["result"], doc["error"]) == (
        "cancelled", "done", None, None,
    )  # fmt: skip
    assert doc["finished_at"] and alpha.get(f"/v1/jobs/{job_id}").get_json() == doc
    for again in (alpha, client):  # idempotent, for the owner and for an admin
        resp = again.post(f"/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 200 and resp.get_json() == doc
    assert _finished_count(CANCELLED) == before + 1  # counted once, not per call
    listed = alpha.get("/v1/jobs?status=cancelled&limit=100").get_json()["jobs"]
    assert job_id in {d["id"] for d in listed}
    _error(alpha.post("/v1/jobs/not-a-job-id/cancel"), 404, "job_not_found")
    _error(alpha.post(f"/v1/jobs/{job_id}/cancel?force=1"), 400, "unknown_parameter")


def test_cancelling_a_finished_job_is_a_409(
    client_for: Any, keys: dict[str, str], model_dirs: dict[str, Path], purged: None
) -> None:
    from rev_tasks import jobs
    from rev_tasks.db.session import session_scope

    alpha = client_for(keys["alpha"])
    job_id = _queued_job(alpha, model_dirs)
    with session_scope() as s:
        assert jobs.fail(s, job_id, "model_load_error", "candidate: corrupt")
    error = _error(alpha.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_finished")
    assert "already failed" in error["message"]
    doc = alpha.get(f"/v1/jobs/{job_id}").get_json()
    assert doc["status"] == "failed" and doc["error"]["code"] == "model_load_error"


# ----------------------------------------------------------------------------- idempotency
def test_an_idempotency_key_returns_the_first_job(
    client_for: Any, keys: dict[str, str], model_dirs: dict[str, Path], purged: None
) -> None:
    import uuid
    from datetime import timedelta

    from sqlalchemy import update

    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import IdempotencyKey, utcnow

    alpha, beta = client_for(keys["alpha"]), client_for(keys["beta"])
    key = str(uuid.uuid4())
    body = _verify(model_dirs, device="cpu")
    first = alpha.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    job_id = first.get_json()["id"]
    jobs_now = _counts()[0]
    spelt_out = {**body, "tolerance": "exact", "alpha": 0.01}  # the same request, defaults given
    for again in (body, spelt_out):
        resp = alpha.post("/v1/jobs", json=again, headers={"Idempotency-Key": key})
        assert resp.status_code == 202, resp.get_json()
        assert resp.get_json() == first.get_json()
        assert resp.headers["Idempotent-Replayed"] == "true"
        assert resp.headers["Location"] == first.headers["Location"]
    assert _counts()[0] == jobs_now
    other_body = _verify(model_dirs, device="cpu", max_challenges=8)
    resp = alpha.post("/v1/jobs", json=other_body, headers={"Idempotency-Key": key})
    _error(resp, 422, "idempotency_key_reused")
    theirs = beta.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert theirs.status_code == 202 and theirs.get_json()["id"] != job_id  # keys are per tenant
    for bad in ("", "x" * 256, "two words", "caf\u00e9"):
        resp = alpha.post("/v1/jobs", json=body, headers={"Idempotency-Key": bad})
        _error(resp, 400, "invalid_idempotency_key")
    with session_scope() as s:  # 24 hours later the key names nothing any more
        s.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.tenant == "alpha", IdempotencyKey.key == key)
            .values(created_at=utcnow() - timedelta(hours=25))
        )
    later = alpha.post("/v1/jobs", json=other_body, headers={"Idempotency-Key": key})
    assert later.status_code == 202 and later.get_json()["id"] != job_id


def test_concurrent_submits_with_one_key_create_one_job(
    client_for: Any, keys: dict[str, str], model_dirs: dict[str, Path], purged: None
) -> None:
    """Threads released together on PostgreSQL: the (tenant, key) constraint lets one win."""
    import threading
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import func, select

    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import IdempotencyKey

    key, body, n = str(uuid.uuid4()), _verify(model_dirs, device="cpu"), 6
    clients = [client_for(keys["alpha"]) for _ in range(n)]
    gate = threading.Barrier(n)
    jobs_before = _counts()[0]

    def post(client: Any) -> Any:
        gate.wait()
        return client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(post, clients))
    assert [a.status_code for a in answers] == [202] * n, [a.get_json() for a in answers]
    assert len({a.get_json()["id"] for a in answers}) == 1
    assert sum("Idempotent-Replayed" not in a.headers for a in answers) == 1
    assert _counts()[0] == jobs_before + 1
    with session_scope() as s:
        bound = s.scalar(
            select(func.count()).select_from(IdempotencyKey).where(IdempotencyKey.key == key)
        )
    assert bound == 1


class _DropsFirstSubmit:
    """An HTTP front for the coordinator that loses the answer to the first ``POST /v1/jobs``.

    The request reaches the coordinator (the job is created); the client gets its connection
    closed without a response, as after a proxy timeout. Every Idempotency-Key seen is kept.
    """

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading

        import requests

        keys: list[str | None] = []
        created: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                resp = requests.request(
                    self.command, upstream + self.path, data=body, headers=headers, timeout=30
                )
                if self.command == "POST" and self.path == "/v1/jobs":
                    keys.append(self.headers.get("Idempotency-Key"))
                    if len(keys) == 1:
                        created.append(resp.json()["id"])
                        self.close_connection = True
                        return  # no answer at all
                self.send_response(resp.status_code)
                for name in ("Content-Type", "Location", "Idempotent-Replayed"):
                    if name in resp.headers:
                        self.send_header(name, resp.headers[name])
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_POST = _forward  # noqa: N815 - http.server's naming

            def log_message(self, *args: Any) -> None:
                pass

        self.keys, self.created = keys, created
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_rev_submit_retries_with_its_key_and_rev_cancel_cancels(
    app: Any, keys: dict[str, str], model_dirs: dict[str, Path], farm_env: dict[str, str],
    purged: None,
) -> None:  # fmt: skip
    """`rev submit` as a user runs it, behind a front that drops its first answer: the retry
    carries the same Idempotency-Key and returns the job the lost try made. The CLI finds
    the coordinator through REV_PORT alone; `rev cancel` then cancels the job."""
    import re
    import subprocess
    import sys
    import threading

    from werkzeug.serving import make_server

    from rev_tasks.testing.harness import ROOT

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    front = _DropsFirstSubmit(f"http://127.0.0.1:{server.server_port}")
    env = {**os.environ, **farm_env, "REV_PORT": str(front.port), "REV_API_KEY": keys["alpha"]}
    env.pop("REV_API_URL", None)

    def rev(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rev_tasks.cli", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    try:
        jobs_before = _counts()[0]
        ref, cand = str(model_dirs["gpt2-a"]), str(model_dirs["gpt2-b"])
        submitted = rev("submit", cand, "--reference", ref, "--device", "cpu")
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        assert front.created == [job_id] and _counts()[0] == jobs_before + 1
        assert len(front.keys) == 2 and front.keys[0] == front.keys[1], front.keys
        assert re.fullmatch(r"[0-9a-f-]{36}", front.keys[0] or "")
        again = rev("submit", cand, "--reference", ref, "--device", "cpu")  # a new invocation
        assert again.returncode == 0 and again.stdout.strip() != job_id  # ... a new key, job
        assert front.keys[2] != front.keys[0]

        cancelled = rev("cancel", job_id)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.strip() == f"{job_id} cancelled after 0/64 challenges"
        doc = json.loads(rev("cancel", job_id, "--json").stdout)
        assert doc["status"] == "cancelled"
        from rev_tasks import jobs
        from rev_tasks.db.session import session_scope

        with session_scope() as s:
            jobs.fail(s, again.stdout.strip(), "stale", "the job stopped making progress")
        refused = rev("cancel", again.stdout.strip())
        assert refused.returncode == 2
        assert refused.stderr.strip().startswith("rev: 409 job_finished: "), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    finally:
        front.close()
        server.shutdown()
