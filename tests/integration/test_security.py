"""The coordinator's security boundary on the real PostgreSQL and Redis (no worker).

Authentication (401 + WWW-Authenticate), scopes (403), tenant isolation (404, never 403),
per-key rate limits shared by two app instances through Redis (429 + headers), body size
(413), strict input, model-folder confinement (symlinks), size caps, the pickle rule,
security headers on every response, and the ``rev keys`` CLI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.testing.harness import ROOT
from tests.integration.farm import authed_client, create_key, purge

pytestmark = pytest.mark.integration

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


@pytest.fixture(scope="module", autouse=True)
def _purge_queues(farm_env: dict[str, str]) -> Iterator[None]:
    """Accepted jobs here are never run (no worker): drop their messages afterwards."""
    yield
    purge(farm_env["REDIS_URL"])


def _error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.is_json, resp.get_data(as_text=True)
    err = resp.get_json()["error"]
    if code is not None:
        assert err["code"] == code, err
    return err


def _app(**overrides: Any) -> Any:
    """A coordinator with some settings changed (a second instance, small limits …)."""
    from rev_tasks.settings import Settings
    from web import create_app

    settings = dataclasses.replace(Settings.from_env(), **overrides)
    return create_app({"TESTING": True, "REV_SETTINGS": settings, "REV_METRICS": False})


def _verify_body(model_dirs: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "verify",
        "reference": {"path": str(model_dirs["gpt2-a"])},
        "candidate": {"path": str(model_dirs["gpt2-a-copy"])},
        "device": "cpu",
    }
    body.update(overrides)
    return body


# ----------------------------------------------------------------------------- authentication
def test_requests_without_a_valid_key_get_401(app: Any, keys: dict[str, str]) -> None:
    anonymous = app.test_client()
    for method, url in (("get", "/v1/jobs"), ("post", "/v1/jobs"), ("get", "/v1/models"),
                        ("get", "/v1/jobs/00000000-0000-0000-0000-000000000000"),
                        ("get", "/v1/no-such-route")):  # fmt: skip
        resp = getattr(anonymous, method)(url, json={} if method == "post" else None)
        err = _error(resp, 401, "unauthorized")
        assert "Bearer" in err["message"]
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="rev-farm"'
    bad = [
        f"Basic {keys['alpha']}",  # wrong scheme
        "Bearer",  # no token
        "Bearer rev_0123456789abcdef_" + "A" * 43,  # well-formed, unknown
        f"Bearer {keys['alpha']}x",  # tampered
        "Bearer " + "x" * 5000,  # garbage
    ]
    for header in bad:
        resp = anonymous.get("/v1/jobs", headers={"Authorization": header})
        _error(resp, 401, "unauthorized")
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="rev-farm", error=')


def test_public_endpoints_need_no_key(app: Any) -> None:
    anonymous = app.test_client()
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/openapi.json").status_code == 200
    assert anonymous.get("/readyz").status_code in (200, 503)  # 503: no worker here
    spec = anonymous.get("/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    assert "401" in spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert "429" in spec["paths"]["/v1/jobs"]["get"]["responses"]


def test_metrics_stays_open() -> None:
    from rev_tasks.settings import Settings
    from web import create_app

    metrics_app = create_app({"TESTING": True, "REV_SETTINGS": Settings.from_env()})
    resp = metrics_app.test_client().get("/metrics")
    assert resp.status_code in (200, 404), resp.status_code  # 404 only if metrics are disabled
    assert resp.status_code != 401


def _new_key(tenant: str = "gamma") -> tuple[str, str]:
    from rev_tasks import apikeys
    from rev_tasks.db.session import session_scope

    with session_scope() as s:
        row, token = apikeys.create_key(s, tenant, "read")
        return row.id, token


def _revoke(key_id: str, token: str) -> None:
    from rev_tasks import apikeys
    from rev_tasks.db.session import session_scope

    with session_scope() as s:
        assert apikeys.revoke(s, key_id)
        stored = s.get(apikeys.ApiKey, key_id)
        assert stored is not None and stored.token_hash != token and token not in stored.token_hash


def test_revoked_key_is_refused_within_the_cache_ttl() -> None:
    """The key cache's bound, both sides of it: served from the cache just after the
    revocation (so the cache is really used), refused once the entry is older than the TTL."""
    key_id, token = _new_key()
    client = authed_client(_app(apikey_cache_seconds=2.0), token)
    assert client.get("/v1/jobs").status_code == 200
    _revoke(key_id, token)
    assert client.get("/v1/jobs").status_code == 200  # cached: within the stated bound
    time.sleep(2.1)
    _error(client.get("/v1/jobs"), 401, "unauthorized")
    _error(client.get("/v1/jobs"), 401, "unauthorized")  # a refused key is never cached


def test_without_the_cache_revocation_is_immediate() -> None:
    key_id, token = _new_key()
    client = authed_client(_app(apikey_cache_seconds=0.0), token)
    assert client.get("/v1/jobs").status_code == 200
    _revoke(key_id, token)
    _error(client.get("/v1/jobs"), 401, "unauthorized")


def test_scopes_are_enforced(app: Any, keys: dict[str, str], model_dirs: dict[str, Path]) -> None:
    reader = authed_client(app, keys["alpha-reader"])
    assert reader.get("/v1/jobs").status_code == 200
    resp = reader.post("/v1/jobs", json=_verify_body(model_dirs))
    _error(resp, 403, "forbidden")
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    _error(reader.post("/v1/models", json={"id": "x", "path": "y"}), 403, "forbidden")
    submitter = authed_client(app, create_key("alpha", "submit"))
    _error(submitter.get("/v1/jobs"), 403, "forbidden")


# ----------------------------------------------------------------------------- tenants
def test_tenants_cannot_see_each_other(
    app: Any, client: Any, keys: dict[str, str], model_dirs: dict[str, Path]
) -> None:
    alpha, beta = authed_client(app, keys["alpha"]), authed_client(app, keys["beta"])
    resp = alpha.post("/v1/jobs", json=_verify_body(model_dirs))
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["id"]
    resp = alpha.post("/v1/models", json={"id": "alpha-gpt2", "path": str(model_dirs["gpt2-a"])})
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["tenant"] == "alpha"

    # The owner and the admin see both.
    assert alpha.get(f"/v1/jobs/{job_id}").get_json()["tenant"] == "alpha"
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert client.get("/v1/models/alpha-gpt2").status_code == 200
    assert job_id in [j["id"] for j in client.get("/v1/jobs?limit=100").get_json()["jobs"]]
    assert "alpha-gpt2" in [m["id"] for m in client.get("/v1/models").get_json()["models"]]

    # Another tenant: 404 exactly like an id that does not exist, and absent from listings.
    missing = _error(beta.get("/v1/jobs/00000000-0000-0000-0000-000000000000"), 404)
    hidden = _error(beta.get(f"/v1/jobs/{job_id}"), 404)
    assert hidden["code"] == missing["code"] == "job_not_found"
    _error(beta.get(f"/v1/jobs/{job_id}/transcript"), 404, "job_not_found")
    _error(beta.get("/v1/models/alpha-gpt2"), 404, "model_not_found")
    assert job_id not in [j["id"] for j in beta.get("/v1/jobs?limit=100").get_json()["jobs"]]
    assert all(j["tenant"] == "beta" for j in beta.get("/v1/jobs?limit=100").get_json()["jobs"])
    assert "alpha-gpt2" not in [m["id"] for m in beta.get("/v1/models").get_json()["models"]]

    # Nor can it use alpha's model, as reference or as candidate: "unknown", like a typo.
    for body in (
        _verify_body(model_dirs, reference="alpha-gpt2"),
        _verify_body(model_dirs, candidate="alpha-gpt2"),
    ):
        _error(beta.post("/v1/jobs", json=body), 422, "unknown_model")
    # The documented limit of global ids: the id is taken (409), nothing more is revealed.
    resp = beta.post("/v1/models", json={"id": "alpha-gpt2", "path": str(model_dirs["gpt2-b"])})
    err = _error(resp, 409, "model_exists")
    assert "alpha" not in err["message"].replace("alpha-gpt2", "")


# ----------------------------------------------------------------------------- rate limits
def test_rate_limit_is_shared_by_two_coordinators(farm_env: dict[str, str]) -> None:
    """Two app instances (two gunicorn workers or hosts) draw from one bucket in Redis."""
    one, two = (
        _app(rate_limit_rps=0.5, rate_limit_burst=6),
        _app(rate_limit_rps=0.5, rate_limit_burst=6),
    )
    token = create_key("ratelimited", "read")
    clients = [authed_client(one, token), authed_client(two, token)]
    remaining = []
    for i in range(6):
        resp = clients[i % 2].get("/v1/jobs")
        assert resp.status_code == 200, resp.get_json()
        assert resp.headers["RateLimit-Limit"] == "6"
        assert int(resp.headers["RateLimit-Reset"]) >= 1
        remaining.append(int(resp.headers["RateLimit-Remaining"]))
        for name, value in SECURITY_HEADERS.items():
            assert resp.headers[name] == value
    assert remaining == [5, 4, 3, 2, 1, 0]
    for client in clients:
        resp = client.get("/v1/jobs")
        _error(resp, 429, "rate_limited")
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.headers["RateLimit-Remaining"] == "0"
        assert resp.headers["RateLimit-Limit"] == "6"
    # Another key has its own bucket.
    other = authed_client(one, create_key("ratelimited", "read"))
    assert other.get("/v1/jobs").status_code == 200


def test_rate_limiter_fails_open_when_redis_is_down(
    keys: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    down = _app(redis_url="redis://127.0.0.1:1/0")
    client = authed_client(down, keys["alpha"])
    with caplog.at_level(logging.WARNING, logger="web.ratelimit"):
        resp = client.get("/v1/jobs")
    assert resp.status_code == 200
    assert "RateLimit-Remaining" not in resp.headers
    assert any("failing open" in r.getMessage() for r in caplog.records)
    _error(down.test_client().get("/v1/jobs"), 401)  # authentication still applies


def test_default_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from rev_tasks.settings import Settings

    assert (Settings.from_env().rate_limit_rps, Settings.from_env().rate_limit_burst) == (100, 200)
    monkeypatch.setenv("REV_RATE_LIMIT_RPS", "5")
    monkeypatch.setenv("REV_RATE_LIMIT_BURST", "7")
    assert (Settings.from_env().rate_limit_rps, Settings.from_env().rate_limit_burst) == (5, 7)


# ----------------------------------------------------------------------------- input limits
def test_body_size_limit(client: Any) -> None:
    big = json.dumps({"kind": "verify", "pad": "x" * (2 << 20)})
    for url in ("/v1/jobs", "/v1/models"):
        resp = client.post(url, data=big, content_type="application/json")
        _error(resp, 413, "payload_too_large")
        for name, value in SECURITY_HEADERS.items():
            assert resp.headers[name] == value


def test_strict_json_and_query(client: Any, model_dirs: dict[str, Path]) -> None:
    for raw in (
        '{"kind": "verify", "kind": "identify", "candidate": "x"}',  # duplicate key
        '{"kind": "verify", "alpha": NaN, "reference": "a", "candidate": "b"}',
        '{"kind": "verify", "alpha": Infinity, "reference": "a", "candidate": "b"}',
        "[" * 100_000 + "]" * 100_000,  # nesting
        '{"kind": "verify", "reference": "a", "candidate": "b"} trailing',
    ):
        _error(
            client.post("/v1/jobs", data=raw, content_type="application/json"),
            400,
            "malformed_json",
        )
    for url in ("/v1/jobs?limit=5&x=1", "/v1/jobs?limit=1&limit=2", "/v1/models?x=1",
                "/v1/jobs/00000000-0000-0000-0000-000000000000?verbose=1"):  # fmt: skip
        _error(client.get(url), 400, "unknown_parameter")
    # Unknown fields, nested ones included, and control characters in paths are refused.
    for body in (
        _verify_body(model_dirs, extra=1),
        _verify_body(model_dirs, candidate={"path": str(model_dirs["gpt2-b"]), "sha": "x"}),
        _verify_body(model_dirs, candidate={"path": "/tmp/a\x00b"}),
        _verify_body(model_dirs, candidate={"path": "/tmp/a\nforged log line"}),
        {"kind": "identify", "candidate": "gpt2-a", "reference": "gpt2-b"},
    ):
        _error(client.post("/v1/jobs", json=body), 422, "invalid_request")
    _error(client.post("/v1/models", json={"id": "m", "path": "x", "owner": "beta"}), 422)
    # Path parameters that cannot be ids are plain 404s (never a database error).
    _error(client.get("/v1/jobs/%00"), 404, "job_not_found")
    _error(client.get("/v1/jobs/" + "a" * 5000), 404, "job_not_found")
    _error(client.get("/v1/models/%00bad"), 404, "model_not_found")
    _error(client.get("/v1/jobs?cursor=" + "A" * 1000), 400, "invalid_cursor")


def test_symlink_escapes_are_refused(
    client: Any, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = model_dirs["root"]
    # A folder inside the root whose weights link to a file outside every root.
    sneaky = root / "sneaky-weights"
    shutil.copytree(model_dirs["gpt2-a"], sneaky)
    outside = tmp_path_factory.mktemp("elsewhere") / "model.safetensors"
    shutil.copy(model_dirs["gpt2-b"] / "model.safetensors", outside)
    (sneaky / "model.safetensors").unlink()
    (sneaky / "model.safetensors").symlink_to(outside)
    err = _error(
        client.post("/v1/jobs", json=_verify_body(model_dirs, candidate={"path": str(sneaky)})),
        422,
        "path_outside_roots",
    )
    assert "model.safetensors" in err["message"]
    _error(client.post("/v1/models", json={"id": "sneaky", "path": str(sneaky)}), 422,
           "path_outside_roots")  # fmt: skip
    # The whole folder as a link (tests/integration/conftest.py's escape-link), and `..`.
    outside = model_dirs["outside"]
    for path in (model_dirs["escape-link"], root / ".." / outside.parent.name / outside.name):
        body = _verify_body(model_dirs, candidate={"path": str(path)})
        _error(client.post("/v1/jobs", json=body), 422, "path_outside_roots")


def test_oversized_model_folder_is_refused(
    keys: dict[str, str], model_dirs: dict[str, Path]
) -> None:
    small = authed_client(_app(max_model_bytes=10_000), keys["alpha"])
    err = _error(small.post("/v1/jobs", json=_verify_body(model_dirs)), 422, "model_too_large")
    assert "REV_MAX_MODEL_BYTES" in err["message"]
    resp = small.post("/v1/models", json={"id": "too-big", "path": str(model_dirs["gpt2-a"])})
    _error(resp, 422, "model_too_large")


def test_pickle_only_folder_is_refused(
    client: Any, keys: dict[str, str], model_dirs: dict[str, Path]
) -> None:
    pickled = model_dirs["root"] / "pickle-only"
    if not pickled.exists():
        shutil.copytree(model_dirs["gpt2-a"], pickled)
        (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    body = _verify_body(model_dirs, candidate={"path": str(pickled)})
    err = _error(client.post("/v1/jobs", json=body), 422, "unsafe_weights")
    assert "REV_ALLOW_PICKLE" in err["message"]
    # An operator may allow pickle explicitly (REV_ALLOW_PICKLE=1): the folder then passes.
    from web import services

    allowing = dataclasses.replace(_app().config["REV_SETTINGS"], allow_pickle=True)
    services.check_model_folder(pickled, allowing)


def test_security_headers_on_every_response(app: Any, client: Any) -> None:
    anonymous = app.test_client()
    responses = [
        anonymous.get("/healthz"),
        anonymous.get("/openapi.json"),
        anonymous.get("/v1/jobs"),  # 401
        client.get("/v1/jobs"),
        client.get("/v1/jobs/nope"),  # 404
        client.post("/v1/jobs", json={"kind": "x"}),  # 422
        client.delete("/v1/jobs"),  # 405
    ]
    for resp in responses:
        for name, value in SECURITY_HEADERS.items():
            assert resp.headers.get(name) == value, (resp.status_code, name)
        assert "Strict-Transport-Security" not in resp.headers
    hsts = _app(hsts=True).test_client().get("/healthz")
    assert hsts.headers["Strict-Transport-Security"].startswith("max-age=")


def test_tokens_never_reach_the_logs(
    app: Any, keys: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    from rev_tasks.redact import RedactSecrets

    caplog.handler.addFilter(RedactSecrets())
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("web").warning("request headers: Authorization: Bearer %s", keys["alpha"])
        authed_client(app, keys["alpha"] + "tampered").get("/v1/jobs")
    secret = keys["alpha"].rsplit("_", 1)[1]
    assert secret not in caplog.text
    assert "[REDACTED]" in caplog.text


# ----------------------------------------------------------------------------- rev keys
def _rev(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_rev_keys_cli(app: Any, farm_env: dict[str, str], tmp_path: Path) -> None:
    created = _rev("keys", "create", "--tenant", "cli-t", "--scopes", "read", "--name", "ci",
                   "--json", env=farm_env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    doc = json.loads(created.stdout)
    assert doc["tenant"] == "cli-t" and doc["scopes"] == ["read"]
    client = authed_client(app, doc["token"])
    assert client.get("/v1/jobs").status_code == 200
    listed = _rev("keys", "list", "--tenant", "cli-t", "--json", env=farm_env)
    assert listed.returncode == 0
    assert doc["token"] not in listed.stdout
    assert [k["id"] for k in json.loads(listed.stdout)] == [doc["id"]]
    bad = _rev("keys", "create", "--tenant", "cli-t", "--scopes", "root", env=farm_env)
    assert bad.returncode == 2 and "scopes" in bad.stderr
    revoked = _rev("keys", "revoke", doc["id"], env=farm_env)
    assert revoked.returncode == 0, revoked.stderr
    assert _rev("keys", "revoke", doc["id"], env=farm_env).returncode == 1
    _error(client.get("/v1/jobs"), 401)
    # The development key of `make up`: created once, kept while valid, file mode 0600.
    key_file = tmp_path / ".rev" / "api-key"
    first = _rev("keys", "ensure-dev", "--file", str(key_file), env=farm_env)
    assert first.returncode == 0 and "created" in first.stdout, first.stderr
    assert key_file.stat().st_mode & 0o777 == 0o600
    token = key_file.read_text().strip()
    second = _rev("keys", "ensure-dev", "--file", str(key_file), env=farm_env)
    assert "kept" in second.stdout and key_file.read_text().strip() == token
    assert authed_client(app, token).get("/v1/models").status_code == 200
