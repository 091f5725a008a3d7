"""Endpoint jobs on the farm (issue 15): over HTTP, real Redis and PostgreSQL, real Celery
workers, real llama.cpp servers on loopback (allowed explicitly: REV_ENDPOINT_ALLOW=127.0.0.1).

One prefork worker registers SmolLM2 (white-box and endpoint fingerprints) and runs the
validators; one threads-pool worker consumes the ``endpoint`` queue. The forging worker of
the last test replaces it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rev_tasks import queues
from rev_tasks.endpoints.transcript import audit_endpoint
from rev_tasks.testing.endpoint_faults import FaultProxy
from rev_tasks.testing.harness import ROOT
from tests.integration.farm import (
    TEST_KEY,
    FarmWorker,
    assert_drained,
    authed_client,
    create_key,
    farm_environment,
    purge,
    register,
    submit,
    wait_certificate,
    wait_job,
)

pytestmark = pytest.mark.integration

SECRET = "sk-farm-test-4f1c9a2b7e-do-not-leak"
MODEL = "smollm2"


def _threads_worker(env: dict[str, str], log_dir: Path, name: str, **extra: str) -> FarmWorker:
    """An endpoint worker as deployed: ``-Q endpoint -P threads`` (-c 4 on the 2-core VM)."""
    cmd = [
        sys.executable, "-m", "celery", "-A", "rev_tasks", "worker", "-P", "threads",
        "-c", "4", "-Q", queues.ENDPOINT, "--loglevel", "INFO",
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    worker = FarmWorker(
        {**env, "REV_WORKER_PRELOAD": "0", **extra}, log_dir, name=name, command=cmd
    )
    return worker.start()


@pytest.fixture(scope="module")
def farm(
    redis_url: str, postgres_url: str, smollm2: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    from rev_tasks import credentials
    from rev_tasks.db.session import session_scope
    from rev_tasks.settings import Settings
    from web import create_app

    roots = {"root": smollm2.parent, "minilm": smollm2.parent}
    extra = {
        "REV_MODEL_ROOTS": str(smollm2.parent),
        "REV_ENDPOINT_ALLOW": "127.0.0.1",
        "REV_CREDENTIAL_KEY": credentials.generate_key(),
        "REV_ENDPOINT_TIMEOUT": "10",
        "REV_ENDPOINT_MAX_RETRIES": "2",
        "REV_ENDPOINT_RATE": "50",
        "REV_FINGERPRINT_CHALLENGES": "16",  # registration time on the 2-core VM
        "OMP_NUM_THREADS": "1",
    }
    log_dir = tmp_path_factory.mktemp("endpoint-farm-logs")
    with farm_environment(redis_url, postgres_url, roots, tmp_path_factory, **extra) as env:
        cpu = FarmWorker(
            env,
            log_dir,
            queues=",".join(
                [queues.INFERENCE_CPU, queues.CONSENSUS, queues.DEFAULT, queues.MAINTENANCE]
            ),
            name="epcpu",
        ).start()
        endpoint = _threads_worker(env, log_dir, "ep")
        app = create_app(
            {"TESTING": True, "REV_SETTINGS": Settings.from_env(), "REV_METRICS": False}
        )
        client = authed_client(app, create_key("ops", "admin,read,submit"))
        with session_scope() as s:
            credentials.set_credential(s, "ops", "llm-key", SECRET)
        state = {
            "env": env,
            "client": client,
            "cpu": cpu,
            "endpoint": endpoint,
            "log_dir": log_dir,
            "key_file": env["REV_SECRET_KEY_FILE"],
        }
        try:
            # SmolLM2 with its endpoint fingerprint: the status waits for both.
            doc = register(client, MODEL, smollm2, 900.0, {"endpoint_evidence": True}, new=True)
            assert doc["status"] == "ready" and doc["endpoint_fingerprint"], doc
            state["model"] = doc
            yield state
        finally:
            for w in (state["endpoint"], cpu):
                w.stop()
            purge(env["REDIS_URL"])


def _endpoint_body(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "verify",
        "reference": MODEL,
        "candidate": {"endpoint": {"url": url, "model": MODEL, "mode": "logprobs", **extra}},
    }


def _cli_verify(reference: str, url: str, key_file: str) -> dict[str, Any]:
    """``rev verify REFERENCE --endpoint URL`` with the farm's key: what a user runs."""
    cmd = [
        sys.executable, "-m", "rev_tasks.cli", "verify", reference, "--endpoint", url,
        "--endpoint-model", MODEL, "--key-file", key_file, "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _votes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["result"]["consensus"]["votes"]


# ----------------------------------------------------------------------------- submit
def test_registration_stores_an_endpoint_fingerprint(farm) -> None:
    efp = farm["model"]["endpoint_fingerprint"]
    assert efp["status"] == "ready" and efp["challenges"] == 16
    from rev_tasks.core.keys import key_id

    assert efp["key_id"] == key_id(TEST_KEY)


def test_refused_submits_are_422_with_the_reason(farm, serve) -> None:
    client = farm["client"]
    port = serve("f32").port
    cases = [
        (f"http://127.0.0.2:{port}/v1", "endpoint_refused"),  # loopback, not listed
        ("file:///etc/passwd", "endpoint_refused"),
        (f"http://user:pw@127.0.0.1:{port}/v1", "endpoint_refused"),  # a secret in the URL
    ]
    for url, code in cases:
        resp = client.post("/v1/jobs", json=_endpoint_body(url))
        assert resp.status_code == 422, (url, resp.get_json())
        assert resp.get_json()["error"]["code"] == code, resp.get_json()
    resp = client.post(
        "/v1/jobs", json=_endpoint_body(serve("f32").url, credential="no-such-credential")
    )
    assert resp.status_code == 422 and resp.get_json()["error"]["code"] == "credential_missing"
    resp = client.post("/v1/jobs", json=_endpoint_body(serve("f32").url, mode="chat"))  # not a mode
    assert resp.status_code == 422


class _Redirector(BaseHTTPRequestHandler):
    """An allowed endpoint (127.0.0.1) that answers every request with a 307 to the trap."""

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _redirect(self) -> None:
        self.server.seen.append(self.command + " " + self.path)  # type: ignore[attr-defined]
        self.send_response(307)
        self.send_header("Location", self.server.target + self.path)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _redirect  # noqa: N815 - http.server's names


def test_live_submits_never_reach_a_disallowed_address(farm) -> None:
    """A listening socket on 127.0.0.2 (loopback, outside REV_ENDPOINT_ALLOW=127.0.0.1): named
    directly, the submit is a 422; behind an allowed host that redirects there, the job fails
    with the reason. Either way the socket saw no connection at all."""
    from tests.endpoints.egress_traps import Trap

    trap = Trap()
    probe = socket.create_connection((trap.host, trap.port), timeout=2)  # the trap is real
    probe.close()
    assert trap.connections() == 1
    redirector = ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    redirector.daemon_threads = True
    redirector.seen = []  # type: ignore[attr-defined]
    redirector.target = trap.url  # type: ignore[attr-defined]
    threading.Thread(target=redirector.serve_forever, daemon=True).start()
    client = farm["client"]
    try:
        resp = client.post("/v1/jobs", json=_endpoint_body(f"{trap.url}/v1"))
        assert resp.status_code == 422, resp.get_json()
        assert resp.get_json()["error"]["code"] == "endpoint_refused"
        assert "127.0.0.2" in resp.get_json()["error"]["message"]

        port = redirector.server_address[1]
        doc = wait_job(client, submit(client, _endpoint_body(f"http://127.0.0.1:{port}/v1")))
        assert doc["status"] == "failed", doc
        assert "redirect" in doc["error"]["message"].lower(), doc["error"]
        assert "127.0.0.2" in doc["error"]["message"], doc["error"]
        assert redirector.seen, "the allowed endpoint was never asked"  # type: ignore[attr-defined]
        assert trap.connections() == 0
    finally:
        redirector.shutdown()
        redirector.server_close()
        trap.sock.close()


# ----------------------------------------------------------------------------- verdicts
def test_same_and_different_jobs_get_five_votes_and_the_clis_verdicts(
    farm, serve, smollm2: Path, tmp_path: Path
) -> None:
    client = farm["client"]
    same_url, other_url = serve("f32").url, serve("other").url
    jobs = {
        "SAME": submit(client, _endpoint_body(same_url)),
        "DIFFERENT": submit(client, _endpoint_body(other_url)),
    }
    docs = {want: wait_job(client, job_id, timeout=600) for want, job_id in jobs.items()}
    # The reference as a user has it: the model folder (torch), and the farm's own
    # endpoint fingerprint as a file (the same numbers the jobs read).
    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import EndpointFingerprint

    with session_scope() as s:
        fp_doc = s.get(EndpointFingerprint, MODEL).document()
    fp_file = tmp_path / "smollm2.endpoint-fp.json"
    fp_file.write_text(json.dumps({"format": fp_doc["format"], **fp_doc}))
    for want, doc in docs.items():
        assert doc["status"] == "succeeded", doc["error"]
        assert doc["queue"] == queues.ENDPOINT and doc["device"] == "endpoint"
        result = doc["result"]
        assert result["verdict"] == want, result["reason"]
        consensus = result["consensus"]
        assert consensus["agreeing"] == 5 and consensus["agreed"] is True
        votes = _votes(doc)
        assert len(votes) == 5 and {v["verdict"] for v in votes} == {want}
        assert all(v["reexecuted"] for v in votes)  # each re-asked the endpoint
        url = same_url if want == "SAME" else other_url
        cli_folder = _cli_verify(str(smollm2), url, farm["key_file"])
        cli_fp = _cli_verify(str(fp_file), url, farm["key_file"])
        assert cli_folder["verdict"] == want == cli_fp["verdict"]
        assert cli_fp["queries_used"] == result["queries_used"]
        transcript = client.get(f"/v1/jobs/{doc['id']}/transcript")
        assert transcript.status_code == 200
        assert audit_endpoint(transcript.get_json()) == []


def test_an_identify_job_gets_five_votes_and_a_certificate(farm, serve) -> None:
    """An endpoint identify job goes through the five-validator consensus as a verify job."""
    client = farm["client"]
    body = {
        "kind": "identify",
        "candidate": {"endpoint": {"url": serve("f32").url, "model": MODEL}},
    }
    ident = wait_job(client, submit(client, body), timeout=300)
    _check_identified(client, ident, "SAME")
    assert ident["result"]["best"] == MODEL and ident["result"]["none_of_these"] is False
    assert ident["result"]["ranking"][0]["verdict"] == "SAME"


def _check_identified(client: Any, ident: dict[str, Any], want: str) -> dict[str, Any]:
    """An endpoint identify job went through consensus: five agreeing votes that re-asked
    the endpoint, a certificate signed in the tally, and evidence whose ranking follows
    from its per-model transcripts. Returns the stored evidence document."""
    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Transcript
    from rev_tasks.endpoints.identification import audit_endpoint_identification

    assert ident["status"] == "succeeded", ident["error"]
    result = ident["result"]
    assert result["verdict"] == want
    consensus = result["consensus"]
    assert consensus["agreeing"] == 5 and consensus["agreed"] is True, consensus
    votes = _votes(ident)
    assert len(votes) == 5 and {v["verdict"] for v in votes} == {want}
    assert all(v["reexecuted"] for v in votes)  # each re-asked the endpoint
    envelope = json.loads(wait_certificate(client, ident["id"]))  # signed in the tally
    predicate = json.loads(base64.b64decode(envelope["payload"]))["predicate"]
    assert predicate["verdict"] == want and predicate["consensus"]["agreeing"] == 5
    assert predicate["evidence_root"] == result["transcript_root"]
    with session_scope() as s:
        tr = s.get(Transcript, ident["id"])
        doc, root, recorded = tr.document(), tr.root, tr.verdict
    assert (root, recorded) == (result["transcript_root"], want)
    assert audit_endpoint_identification(doc) == []
    assert sorted(doc["transcripts"]) == [r["model_id"] for r in result["ranking"]] == [MODEL]
    for model_id, t in doc["transcripts"].items():
        assert audit_endpoint(t) == [] and t["decision"]["verdict"] == want, model_id
    # A ranking that does not follow from the transcripts fails the audit.
    forged = json.loads(json.dumps(doc))
    forged["entries"][0]["verdict"] = "DIFFERENT" if want == "SAME" else "SAME"
    assert "listing: entries does not follow from the transcripts" in (
        audit_endpoint_identification(forged)
    )
    return doc


def test_a_text_mode_job_is_refuted_and_its_seeded_samples_re_asked(farm, serve) -> None:
    """Text mode against a server without log-probabilities: another model reads DIFFERENT,
    and the validators' re-queries with the recorded seeds get the recorded pieces."""
    client = farm["client"]
    doc = wait_job(
        client,
        submit(client, _endpoint_body(serve("other", logprobs=False).url, mode="text")),
        timeout=300,
    )
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["result"]["verdict"] == "DIFFERENT" and doc["result"]["mode"] == "text"
    votes = _votes(doc)
    assert len(votes) == 5 and {v["verdict"] for v in votes} == {"DIFFERENT"}


# ----------------------------------------------------------------------------- politeness
def test_429_with_retry_after_is_honoured_and_the_credential_stays_secret(farm, serve) -> None:
    client = farm["client"]
    upstream = serve("f32").url[: -len("/v1")]
    with FaultProxy(upstream, rate_limited=2, retry_after="2") as proxy:
        job_id = submit(client, _endpoint_body(proxy.url + "/v1", credential="llm-key"))
        doc = wait_job(client, job_id, timeout=300)
        seen = list(proxy.seen)
        headers = list(proxy.headers_seen)
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["result"]["verdict"] == "SAME"
    assert doc["result"]["cost"]["retries"] == 2
    statuses = [status for _, status in seen]
    assert statuses[:3] == [429, 429, 200]
    # Retry-After: 2, twice: the first answered request came >= 4 s after the first 429.
    assert seen[2][0] - seen[0][0] >= 3.9
    assert any(h.get("authorization") == f"Bearer {SECRET}" for h in headers)
    transcript = client.get(f"/v1/jobs/{job_id}/transcript").get_data(as_text=True)
    everything = json.dumps(doc) + transcript
    for path in farm["log_dir"].glob("*.log"):
        everything += path.read_text(errors="replace")
    assert SECRET not in everything
    assert doc["request"]["candidate"]["endpoint"]["credential"] == "llm-key"


def test_a_server_that_dies_mid_job_fails_it_and_the_worker_lives_on(farm, serve) -> None:
    client = farm["client"]
    upstream = serve("f32").url[: -len("/v1")]
    with FaultProxy(upstream, die_after=4) as proxy:
        start = time.monotonic()
        doc = wait_job(client, submit(client, _endpoint_body(proxy.url + "/v1")), timeout=300)
        elapsed = time.monotonic() - start
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == "endpoint_error", doc["error"]
    message = doc["error"]["message"]
    assert "unreachable" in message and "gave up after 3 attempts" in message, message
    assert elapsed < 120
    assert farm["endpoint"].alive()
    later = wait_job(client, submit(client, _endpoint_body(serve("f32").url)), timeout=300)
    assert later["status"] == "succeeded" and later["result"]["verdict"] == "SAME"


def test_the_query_and_token_budgets_fail_the_job_with_the_reason(farm, serve) -> None:
    client = farm["client"]
    url = serve("f32").url
    few_tokens = submit(client, _endpoint_body(url, max_tokens=30))
    few_requests = submit(client, _endpoint_body(url, max_requests=3))
    tokens = wait_job(client, few_tokens, timeout=300)
    requests = wait_job(client, few_requests, timeout=300)
    assert tokens["status"] == "failed" and requests["status"] == "failed"
    assert tokens["error"]["code"] == "endpoint_budget_exceeded", tokens["error"]
    assert "token budget of 30 tokens" in tokens["error"]["message"]
    assert requests["error"]["code"] == "endpoint_budget_exceeded", requests["error"]
    assert "query budget of 3 requests" in requests["error"]["message"]


# ----------------------------------------------------------------------------- consensus
def test_a_worker_that_forges_the_replies_is_voted_invalid(farm, serve) -> None:
    """The forging worker shifts every recorded log-probability by 0.5 nats and computes a
    consistent transcript from that (it audits clean): the validators' re-queries see that
    the endpoint never answered so, and all five vote INVALID, on a verify job and on an
    identify job."""
    farm["endpoint"].stop()
    farm["endpoint"] = _threads_worker(
        farm["env"],
        farm["log_dir"],
        "forger",
        REV_ENABLE_FAULT_INJECTION="1",
        REV_TEST_FORGE_ENDPOINT="1",
    )
    client = farm["client"]
    doc = wait_job(client, submit(client, _endpoint_body(serve("f32").url)), timeout=300)
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == "invalid_transcript", doc["error"]
    votes = _votes(doc)
    assert len(votes) == 5 and {v["verdict"] for v in votes} == {"INVALID"}
    transcript = client.get(f"/v1/jobs/{doc['id']}/transcript").get_json()
    assert audit_endpoint(transcript) == []  # self-consistent: only the re-query exposes it
    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Vote

    with session_scope() as s:
        problems = [p for v in s.query(Vote).filter_by(job_id=doc["id"]) for p in v.problems]
    assert problems and all(p.startswith("re-query: record") for p in problems), problems
    # An identify job through the same forger: its evidence audits clean (the ranking follows
    # from the forged transcripts), and the re-queries drawn over them vote it INVALID.
    from rev_tasks.db.tables import Transcript
    from rev_tasks.endpoints.identification import audit_endpoint_identification

    body = {
        "kind": "identify",
        "candidate": {"endpoint": {"url": serve("f32").url, "model": MODEL}},
    }
    ident = wait_job(client, submit(client, body), timeout=300)
    assert ident["status"] == "failed"
    assert ident["error"]["code"] == "invalid_transcript", ident["error"]
    votes = _votes(ident)
    assert len(votes) == 5 and {v["verdict"] for v in votes} == {"INVALID"}
    with session_scope() as s:
        evidence = s.get(Transcript, ident["id"]).document()
        problems = [p for v in s.query(Vote).filter_by(job_id=ident["id"]) for p in v.problems]
    assert audit_endpoint_identification(evidence) == []
    prefix = f"re-query: {MODEL}: record"
    assert problems and all(p.startswith(prefix) for p in problems), problems
    assert_drained(farm["env"]["REDIS_URL"])
