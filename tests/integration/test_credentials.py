"""Tenants' endpoint credentials over the real API, on real PostgreSQL: stored encrypted,
never returned, never logged, scoped to the tenant, rotatable (value and master key).

The central check stores a credential, then greps for its value in everything the farm
wrote: a ``pg_dump`` of the test database, every captured log record (SQL statements and
their parameters included: SQLAlchemy's engine logger is switched on), every API response
(bodies and headers), and the CLI's output. The value is found nowhere; its ciphertext is
found in the dump, and decrypts with the farm's key to the value bound to its tenant.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet, MultiFernet

from rev_tasks import credentials
from rev_tasks.db.session import read_scope, session_scope
from rev_tasks.db.tables import Credential
from tests.conftest import ROOT
from tests.integration.farm import authed_client

KEY1 = Fernet.generate_key().decode()
KEY2 = Fernet.generate_key().decode()


@pytest.fixture(scope="module")
def master_key(farm_env: dict[str, str]) -> Iterator[None]:
    """The farm's REV_CREDENTIAL_KEY (this process is the coordinator under test)."""
    before = os.environ.get(credentials.KEY_ENV)
    os.environ[credentials.KEY_ENV] = KEY1
    yield
    if before is None:
        os.environ.pop(credentials.KEY_ENV, None)
    else:
        os.environ[credentials.KEY_ENV] = before


class Seen:
    """Every response body and header value, for the grep."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, resp: Any) -> Any:
        self.texts.append(resp.get_data(as_text=True))
        self.texts.extend(f"{k}: {v}" for k, v in resp.headers.items())
        return resp


def _dump(database_url: str) -> str:
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    proc = subprocess.run(
        ["pg_dump", "--no-owner", url], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "COPY public.credentials" in proc.stdout  # the table is in the dump
    return proc.stdout


def test_a_stored_value_is_nowhere_but_its_ciphertext(
    app: Any,
    keys: dict[str, str],
    master_key: None,
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    value = "sk-live-" + secrets.token_urlsafe(24)
    seen = Seen()
    alpha = authed_client(app, keys["alpha"])
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")  # SQL and its parameters
    try:
        created = seen(alpha.put("/v1/credentials/openai", json={"value": value}))
        assert created.status_code == 201, created.get_json()
        doc = created.get_json()
        assert set(doc) == {"name", "created_at", "rotated_at"}
        assert doc["name"] == "openai" and doc["rotated_at"] is None
        assert created.headers["Location"] == "/v1/credentials/openai"
        listed = seen(alpha.get("/v1/credentials"))
        assert [c["name"] for c in listed.get_json()["credentials"]] == ["openai"]
        assert seen(alpha.get("/v1/credentials/openai")).get_json() == doc
        # errors about a value do not repeat it either
        for bad in (value + "\n", " " + value, value + "\x00", value * 400):
            refused = seen(alpha.put("/v1/credentials/openai", json={"value": bad}))
            assert refused.status_code == 422, refused.get_json()
            assert refused.get_json()["error"]["code"] == "invalid_request"
        assert (
            seen(alpha.post("/v1/credentials", json={"name": "-bad", "value": value})).status_code
            == 422
        )
        assert seen(alpha.put("/v1/credentials/openai", json={"value": 12345})).status_code == 422
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    with read_scope() as s:
        row = s.get(Credential, ("alpha", "openai"))
        assert row is not None
        ciphertext = row.ciphertext
        # the worker's path: the value comes back, for alpha only
        assert credentials.reveal(s, "alpha", "openai") == value

    dump = _dump(postgres_url)
    logs = "\n".join([caplog.text, *(r.getMessage() for r in caplog.records)])
    assert ciphertext in dump  # the row is there ...
    assert ciphertext[:40] in logs  # ... and SQL logging did write it (as ciphertext)
    for where, text in (("pg_dump", dump), ("logs", logs), ("responses", "\n".join(seen.texts))):
        assert value not in text, f"the credential's value appears in the {where}"
        assert value[8:] not in text, f"part of the credential's value appears in the {where}"
    # the dumped ciphertext is the value's, bound to its tenant and name
    plain = json.loads(MultiFernet([Fernet(KEY1)]).decrypt(ciphertext.encode()))
    assert plain == {"t": "alpha", "n": "openai", "v": value}


def test_rotation_and_tenant_scope(app: Any, keys: dict[str, str], master_key: None) -> None:
    alpha = authed_client(app, keys["alpha"])
    beta = authed_client(app, keys["beta"])
    admin = authed_client(app, keys["admin"])
    first, second = "key-one-" + secrets.token_hex(8), "key-two-" + secrets.token_hex(8)
    assert alpha.put("/v1/credentials/hf", json={"value": first}).status_code == 201
    with read_scope() as s:
        before = s.get(Credential, ("alpha", "hf"))
        assert before is not None
        old_cipher = before.ciphertext
    rotated = alpha.post("/v1/credentials", json={"name": "hf", "value": second})
    assert rotated.status_code == 200
    assert rotated.get_json()["rotated_at"] is not None
    with read_scope() as s:
        assert credentials.reveal(s, "alpha", "hf") == second
        assert s.get(Credential, ("alpha", "hf")).ciphertext != old_cipher

    # another tenant (and an admin, who acts for its own tenant) sees and touches nothing
    for other in (beta, admin):
        assert other.get("/v1/credentials/hf").status_code == 404
        assert "hf" not in [
            c["name"] for c in other.get("/v1/credentials").get_json()["credentials"]
        ]
        assert other.delete("/v1/credentials/hf").status_code == 404
    with read_scope() as s, pytest.raises(credentials.CredentialMissing):
        credentials.reveal(s, "beta", "hf")
    # beta may hold its own "hf"; each tenant reveals its own
    assert beta.put("/v1/credentials/hf", json={"value": "beta-" + first}).status_code == 201
    with read_scope() as s:
        assert credentials.reveal(s, "beta", "hf") == "beta-" + first
        assert credentials.reveal(s, "alpha", "hf") == second
    # a ciphertext copied into another tenant's row does not decrypt there
    with session_scope() as s:
        s.get(Credential, ("beta", "hf")).ciphertext = s.get(Credential, ("alpha", "hf")).ciphertext
    with read_scope() as s, pytest.raises(credentials.CredentialKeyError, match="bound") as err:
        credentials.reveal(s, "beta", "hf")
    assert second not in str(err.value)

    # scopes: a read-only key lists but cannot set or delete
    reader = authed_client(app, keys["alpha-reader"])
    assert reader.get("/v1/credentials").status_code == 200
    assert reader.put("/v1/credentials/hf", json={"value": "x" * 10}).status_code == 403
    assert reader.delete("/v1/credentials/hf").status_code == 403

    assert alpha.delete("/v1/credentials/hf").status_code == 204
    assert alpha.get("/v1/credentials/hf").status_code == 404
    assert beta.delete("/v1/credentials/hf").status_code == 204


def test_master_key_rotation_and_missing_key(
    app: Any, keys: dict[str, str], master_key: None, farm_env: dict[str, str]
) -> None:
    alpha = authed_client(app, keys["alpha"])
    value = "rotate-me-" + secrets.token_hex(8)
    assert alpha.put("/v1/credentials/rot", json={"value": value}).status_code in (200, 201)
    env = {**os.environ, **farm_env, credentials.KEY_ENV: f"{KEY2},{KEY1}"}
    proc = subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", "credentials", "rekey"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "re-encrypted" in proc.stdout and value not in proc.stdout + proc.stderr
    with read_scope() as s:
        assert credentials.reveal(s, "alpha", "rot", keys=MultiFernet([Fernet(KEY2)])) == value
        with pytest.raises(credentials.CredentialKeyError, match="does not decrypt") as err:
            credentials.reveal(s, "alpha", "rot", keys=MultiFernet([Fernet(KEY1)]))
        assert value not in str(err.value)

    # a farm without a master key refuses to store (503) but still lists
    os.environ.pop(credentials.KEY_ENV)
    try:
        refused = alpha.put("/v1/credentials/nokey", json={"value": value})
        assert refused.status_code == 503
        assert refused.get_json()["error"]["code"] == "credentials_unconfigured"
        assert "REV_CREDENTIAL_KEY" in refused.get_json()["error"]["message"]
        assert alpha.get("/v1/credentials").status_code == 200
    finally:
        os.environ[credentials.KEY_ENV] = KEY1


def test_cli_set_list_delete(
    app: Any, keys: dict[str, str], master_key: None, farm_env: dict[str, str]
) -> None:
    """``rev credentials`` over HTTP: the value goes in on stdin and is never printed."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, **farm_env, "REV_API_KEY": keys["alpha"]}
    env["REV_API_URL"] = f"http://127.0.0.1:{server.server_port}"
    value = "cli-secret-" + secrets.token_urlsafe(16)

    def rev(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "rev_tasks.cli", "credentials", *args],
            cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert value not in proc.stdout + proc.stderr
        return proc

    try:
        made = rev("set", "vllm", stdin=value + "\n")
        assert made.returncode == 0, made.stderr
        assert made.stdout.strip() == "stored credential vllm"
        again = rev("set", "vllm", stdin=value + "-2\n")
        assert again.returncode == 0 and again.stdout.strip() == "rotated credential vllm"
        with read_scope() as s:
            assert credentials.reveal(s, "alpha", "vllm") == value + "-2"
        listed = rev("list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert "vllm" in rows and rows["vllm"]["rotated_at"] is not None
        assert all(set(r) == {"name", "created_at", "rotated_at"} for r in rows.values())
        empty = rev("set", "vllm", stdin="")
        assert empty.returncode == 2 and "no credential value" in empty.stderr
        bad_name = rev("set", "../etc", stdin=value)
        assert bad_name.returncode == 2 and "credential name" in bad_name.stderr
        gone = rev("delete", "vllm")
        assert gone.returncode == 0 and gone.stdout.strip() == "deleted credential vllm"
        missing = rev("delete", "vllm")
        assert missing.returncode == 2 and "404 credential_not_found" in missing.stderr
    finally:
        server.shutdown()
