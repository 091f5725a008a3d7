"""End to end on the real farm: HTTP (Flask test client) → Redis → celery workers → PostgreSQL.

One worker process (prefork, -c 1) consumes every queue, exactly as ``celery -A rev_tasks
worker`` runs in production. The tests follow one registry of models through verify and
identify jobs, compare the farm's verdicts with the in-process engine, and end by checking
that nothing is left in any queue.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.queues import CONSENSUS, DEFAULT, INFERENCE_CPU, Task
from tests.integration.farm import (
    assert_drained,
    authed_client,
    register,
    rev_verify,
    submit,
    wait_job,
    worker_fixture,
)

pytestmark = pytest.mark.integration


worker = worker_fixture("farm")


@pytest.fixture(scope="module")
def registry(client: Any, worker: Any, model_dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """gpt2-a, gpt2-b, llama-a and MiniLM registered, fingerprints ready."""
    out = {}
    for model_id in ("gpt2-a", "gpt2-b", "llama-a", "minilm"):
        doc = register(client, model_id, model_dirs[model_id])
        assert doc["status"] == "ready", doc
        assert doc["fingerprint"]["challenges"] == 64
        out[model_id] = doc
    return out


def _consensus_ok(doc: dict[str, Any]) -> None:
    consensus = doc["result"]["consensus"]
    assert consensus["agreed"] is True
    assert consensus["validators"] == 5 and consensus["quorum"] == 4
    assert len(consensus["votes"]) == 5
    assert sorted(v["validator"] for v in consensus["votes"]) == [0, 1, 2, 3, 4]
    assert all(v["verdict"] == doc["result"]["verdict"] for v in consensus["votes"])
    assert len({v["digest"] for v in consensus["votes"]}) == 1


def test_model_registry(client: Any, registry: dict[str, Any]) -> None:
    listed = client.get("/v1/models").get_json()["models"]
    assert {m["id"] for m in listed} >= set(registry)
    doc = client.get("/v1/models/gpt2-a").get_json()
    assert doc["descriptor"]["model_type"] == "gpt2"
    assert doc["fingerprint"]["key_id"]
    assert client.get("/v1/models/nope").status_code == 404


@pytest.mark.parametrize(
    ("reference", "candidate", "expected"),
    [
        ("gpt2-a", "gpt2-a-copy", "SAME"),
        ("gpt2-a", "gpt2-b", "DIFFERENT"),
        ("minilm", "minilm-copy", "SAME"),
        ("minilm", "minilm-noisy", "DIFFERENT"),
    ],
)
def test_verify_against_registered_model(
    client: Any,
    registry: dict[str, Any],
    model_dirs: dict[str, Path],
    reference: str,
    candidate: str,
    expected: str,
    farm_env: dict[str, str],
) -> None:
    job_id = submit(
        client,
        {
            "kind": "verify",
            "reference": reference,
            "candidate": {"path": str(model_dirs[candidate])},
        },
    )
    doc = wait_job(client, job_id)
    assert doc["status"] == "succeeded", doc
    result = doc["result"]
    assert result["verdict"] == expected
    _consensus_ok(doc)
    assert doc["device"] == "cpu" and doc["queue"] == INFERENCE_CPU
    assert doc["progress"]["challenges_done"] == result["challenges_used"] >= 1
    assert doc["progress"]["challenges_max"] == 64
    assert result["distances"]["count"] == result["challenges_used"]
    assert result["transcript_root"] and result["sites"]
    assert doc["started_at"] and doc["finished_at"] and doc["created_at"]
    # The farm's verdict equals the in-process engine (`rev verify`) on the same pair and key.
    local = rev_verify(
        model_dirs[reference], model_dirs[candidate], farm_env["REV_SECRET_KEY_FILE"]
    )
    assert local["verdict"] == result["verdict"]


def test_verify_two_paths_and_transcript_audit(
    client: Any, worker: Any, model_dirs: dict[str, Path], tmp_path: Path, farm_env: dict[str, str]
) -> None:
    """Both sides run on the worker; the served transcript passes `rev audit`."""
    body = {
        "kind": "verify",
        "reference": {"path": str(model_dirs["gpt2-a"])},
        "candidate": {"path": str(model_dirs["gpt2-b"])},
        "max_challenges": 32,
        "batch_size": 4,
        "device": "cpu",
    }
    doc = wait_job(client, submit(client, body))
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["verdict"] == "DIFFERENT"
    _consensus_ok(doc)
    local = rev_verify(
        model_dirs["gpt2-a"],
        model_dirs["gpt2-b"],
        farm_env["REV_SECRET_KEY_FILE"],
        max_challenges=32,
        batch_size=4,
    )
    assert local["verdict"] == doc["result"]["verdict"]
    assert local["challenges_used"] == doc["result"]["challenges_used"]
    # Early stop: never more than one batch past the decision.
    assert doc["progress"]["challenges_done"] <= doc["result"]["challenges_used"] + 4

    resp = client.get(f"/v1/jobs/{doc['id']}/transcript")
    assert resp.status_code == 200
    transcript = resp.get_json()
    assert transcript["root"] == doc["result"]["transcript_root"]
    from rev_tasks.core.transcript import audit

    assert audit(transcript) == []
    path = tmp_path / "transcript.json"
    path.write_text(json.dumps(transcript))
    proc = subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", "audit", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_identify_ranks_true_model_first(
    client: Any, registry: dict[str, Any], model_dirs: dict[str, Path]
) -> None:
    body = {"kind": "identify", "candidate": {"path": str(model_dirs["gpt2-a-copy"])}}
    doc = wait_job(client, submit(client, body))
    assert doc["status"] == "succeeded", doc
    ranking = doc["result"]["ranking"]
    assert ranking[0]["model_id"] == "gpt2-a"
    assert doc["result"]["best"] == "gpt2-a"
    # Another architecture is listed last, DIFFERENT with the reason, never skipped.
    assert (ranking[-1]["model_id"], ranking[-1]["status"]) == ("minilm", "incompatible")
    assert (
        ranking[-1]["verdict"] == "DIFFERENT" and "hidden size 384 vs 64" in ranking[-1]["reason"]
    )
    assert ranking[0]["mean_distance"] < ranking[1]["mean_distance"]
    assert doc["result"]["consensus"]["agreeing"] >= 4  # five validators, as for verify
    assert client.get(f"/v1/jobs/{doc['id']}/transcript").status_code == 404


def test_identify_minilm(
    client: Any, registry: dict[str, Any], model_dirs: dict[str, Path]
) -> None:
    doc = wait_job(
        client,
        submit(client, {"kind": "identify", "candidate": {"path": str(model_dirs["minilm-copy"])}}),
    )
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["ranking"][0]["model_id"] == "minilm"
    assert doc["result"]["ranking"][0]["verdict"] == "SAME"


def test_a_tenant_identifies_only_against_its_own_models(
    app: Any, keys: dict[str, str], registry: dict[str, Any], model_dirs: dict[str, Path]
) -> None:
    """The registry above belongs to the admin's tenant: tenant alpha neither sees nor uses it."""
    alpha = authed_client(app, keys["alpha"])
    body = {"kind": "identify", "candidate": {"path": str(model_dirs["gpt2-a-copy"])}}
    doc = wait_job(alpha, submit(alpha, body))
    assert doc["status"] == "succeeded", doc
    assert doc["tenant"] == "alpha"
    assert doc["result"]["registered"] == 0 and doc["result"]["ranking"] == []
    assert doc["result"]["best"] is None
    verify = {"kind": "verify", "reference": "gpt2-a", "candidate": body["candidate"]}
    resp = alpha.post("/v1/jobs", json=verify)
    assert resp.status_code == 422 and resp.get_json()["error"]["code"] == "unknown_model"
    assert alpha.get("/v1/models").get_json() == {"models": []}


def test_model_that_fails_to_load_fails_its_job_and_worker_lives_on(
    client: Any, worker: Any, registry: dict[str, Any], model_dirs: dict[str, Path]
) -> None:
    bad = wait_job(
        client,
        submit(
            client,
            {
                "kind": "verify",
                "reference": "gpt2-a",
                "candidate": {"path": str(model_dirs["corrupt"])},
            },
        ),
    )
    assert bad["status"] == "failed"
    assert bad["error"]["code"] == "model_load_error"
    assert "candidate" in bad["error"]["message"] and "weights" in bad["error"]["message"]
    assert bad["result"] is None
    assert worker.alive()
    good = wait_job(
        client,
        submit(
            client,
            {
                "kind": "verify",
                "reference": "gpt2-a",
                "candidate": {"path": str(model_dirs["gpt2-a-copy"])},
            },
        ),
    )
    assert good["status"] == "succeeded" and good["result"]["verdict"] == "SAME"
    assert worker.alive()


def test_registering_a_corrupt_model_fails_with_reason(
    client: Any, worker: Any, model_dirs: dict[str, Path]
) -> None:
    doc = register(client, "corrupt", model_dirs["corrupt"])
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == "model_load_error"
    resp = client.post(
        "/v1/jobs", json={"kind": "verify", "reference": "corrupt", "candidate": "gpt2-a"}
    )
    assert resp.status_code == 409
    assert resp.get_json()["error"]["code"] == "model_failed"


def test_job_listing_paginates(client: Any, worker: Any) -> None:
    first = client.get("/v1/jobs?limit=2").get_json()
    assert len(first["jobs"]) == 2 and first["next_cursor"]
    second = client.get(f"/v1/jobs?limit=2&cursor={first['next_cursor']}").get_json()
    ids = [j["id"] for j in first["jobs"]] + [j["id"] for j in second["jobs"]]
    assert len(ids) == len(set(ids))
    everything = client.get("/v1/jobs?limit=100").get_json()["jobs"]
    assert ids == [j["id"] for j in everything][: len(ids)]
    assert all(j["status"] in ("succeeded", "failed") for j in everything)
    failed = client.get("/v1/jobs?status=failed&limit=100").get_json()["jobs"]
    assert failed and all(j["status"] == "failed" for j in failed)


def test_readyz_with_worker(client: Any, worker: Any) -> None:
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["checks"]["queues"][INFERENCE_CPU] >= 1


def test_redelivered_tasks_are_idempotent(
    client: Any, worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str]
) -> None:
    """Every step delivered again for a finished job changes nothing and leaves no message."""
    from sqlalchemy import func, select

    from rev_tasks.celery import app
    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Vote

    body = {
        "kind": "verify",
        "reference": "gpt2-a",
        "candidate": {"path": str(model_dirs["gpt2-a-copy"])},
    }
    doc = wait_job(client, submit(client, body))
    assert doc["status"] == "succeeded"
    job_id = doc["id"]
    app.send_task(Task.PREPARE, [job_id], queue=DEFAULT)
    app.send_task(Task.RUN_INFERENCE, [job_id], queue=INFERENCE_CPU)
    for i in range(5):
        app.send_task(Task.VALIDATE, [job_id, i], queue=CONSENSUS)
    app.send_task(Task.TALLY, [job_id], queue=CONSENSUS)
    assert_drained(farm_env["REDIS_URL"])
    assert client.get(f"/v1/jobs/{job_id}").get_json() == doc
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Vote).where(Vote.job_id == job_id)) == 5


def test_queues_drained(farm_env: dict[str, str], worker: Any) -> None:
    """After the module: no message left in any queue, nothing unacked, no chord pending."""
    assert_drained(farm_env["REDIS_URL"])
