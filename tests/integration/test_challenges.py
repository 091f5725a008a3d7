"""Fresh challenges per job on the real farm (HTTP → Redis → celery worker → PostgreSQL).

Two tenants' jobs on one pair get disjoint challenge sets; a registered model's jobs draw
from its pool and never reuse a challenge a stored transcript has shown; a job that finds
the pool used up waits for the top-up (the reference re-run on fresh challenges); and the
transcripts still pass ``rev audit``, with the farm key too, while tampered ones fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.core.challenges import job_challenges
from rev_tasks.core.keys import load_key
from tests.integration.farm import register, rev_verify, submit, wait_job

pytestmark = pytest.mark.integration

POOL = 64  # REV_FINGERPRINT_CHALLENGES of the test farm


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    w = start_worker(name="challenges")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def farm_key(farm_env: dict[str, str]) -> bytes:
    return load_key(farm_env["REV_SECRET_KEY_FILE"])


def _transcript(client: Any, job_id: str) -> dict[str, Any]:
    resp = client.get(f"/v1/jobs/{job_id}/transcript")
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def _audit_cli(path: Path, key_file: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "rev_tasks.cli", "audit", str(path)]
    if key_file:
        cmd += ["--key-file", key_file]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _committed_prompts(doc: dict[str, Any], key: bytes) -> set[str]:
    """Every prompt of the job's committed set (all of it, not only the records)."""
    nonce = doc.get("challenge_nonce")
    derived = job_challenges(
        key,
        doc["parameters"]["max_challenges"],
        nonce=bytes.fromhex(nonce) if nonce else None,
        indices=doc.get("challenge_indices"),
    )
    return {c.prompt for c in derived}


def test_two_tenants_on_one_pair_share_no_challenge(
    client_for: Any,
    keys: dict[str, str],
    worker: Any,
    model_dirs: dict[str, Path],
    farm_key: bytes,
    farm_env: dict[str, str],
    tmp_path: Path,
) -> None:
    body = {
        "kind": "verify",
        "reference": {"path": str(model_dirs["gpt2-a"])},
        "candidate": {"path": str(model_dirs["gpt2-a-copy"])},
        "max_challenges": 32,
        "batch_size": 8,
    }
    alpha, beta = client_for(keys["alpha"]), client_for(keys["beta"])
    ids = {"alpha": submit(alpha, body), "beta": submit(beta, body)}
    docs = {"alpha": wait_job(alpha, ids["alpha"]), "beta": wait_job(beta, ids["beta"])}
    for doc in docs.values():
        assert doc["status"] == "succeeded", doc
        assert doc["result"]["verdict"] == "SAME"
        assert "challenge_nonce" not in json.dumps(doc)  # the job document never shows it
    transcripts = {t: _transcript(c, ids[t]) for t, c in (("alpha", alpha), ("beta", beta))}
    a, b = transcripts["alpha"], transcripts["beta"]
    assert a["committed_root"] != b["committed_root"]
    assert a["challenge_commitment"] != b["challenge_commitment"]
    assert a["challenge_nonce"] != b["challenge_nonce"]
    shown_a = {r["challenge"]["prompt"] for r in a["records"]}
    shown_b = {r["challenge"]["prompt"] for r in b["records"]}
    assert len(shown_a) == len(a["records"]) >= 1
    assert not shown_a & shown_b
    # The whole committed sets, re-derived with the key, are disjoint as well.
    assert not _committed_prompts(a, farm_key) & _committed_prompts(b, farm_key)

    # Anyone with the farm key re-runs the job in-process on its own challenges: the same
    # transcript, bit for bit.
    key_file = farm_env["REV_SECRET_KEY_FILE"]
    local = rev_verify(
        model_dirs["gpt2-a"],
        model_dirs["gpt2-a-copy"],
        key_file,
        max_challenges=32,
        batch_size=8,
        nonce=a["challenge_nonce"],
    )
    assert local["transcript_root"] == a["root"] == docs["alpha"]["result"]["transcript_root"]
    assert local["committed_root"] == a["committed_root"]

    # `rev audit` passes, offline and with the farm key; tampering fails it.
    good = tmp_path / "a.json"
    good.write_text(json.dumps(a))
    for kf in (None, key_file):
        proc = _audit_cli(good, kf)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    swapped = dict(a, challenge_nonce=b["challenge_nonce"])  # beta's nonce on alpha's records
    path = tmp_path / "swapped.json"
    path.write_text(json.dumps(swapped))
    proc = _audit_cli(path, key_file)
    assert proc.returncode == 1 and "committed_root" in proc.stdout, proc.stdout
    edited = json.loads(json.dumps(a))
    edited["records"][0]["challenge"]["prompt"] += " "
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))
    proc = _audit_cli(path)
    assert proc.returncode == 1 and "challenge_hash" in proc.stdout, proc.stdout


def _model(client: Any, model_id: str) -> dict[str, Any]:
    resp = client.get(f"/v1/models/{model_id}")
    assert resp.status_code == 200
    return resp.get_json()


def test_registered_model_never_reuses_a_shown_challenge(
    client: Any, worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str], tmp_path: Path
) -> None:
    """Job 1 draws the whole pool; the top-up it asks for serves job 2, which avoids job 1's."""
    doc = register(client, "pool-gpt2", model_dirs["gpt2-a"])
    assert doc["status"] == "ready" and doc["fingerprint"]["challenges"] == POOL
    body = {"kind": "verify", "reference": "pool-gpt2", "candidate": {"path": ""}}
    first = wait_job(
        client, submit(client, dict(body, candidate={"path": str(model_dirs["gpt2-a-copy"])}))
    )
    assert first["status"] == "succeeded" and first["result"]["verdict"] == "SAME", first
    t1 = _transcript(client, first["id"])
    drawn1 = t1["challenge_indices"]
    assert sorted(drawn1) == list(range(POOL))  # the whole pool, in a random order
    assert drawn1 != sorted(drawn1)
    used1 = {r["index"] for r in t1["records"]}
    assert len(used1) == first["result"]["challenges_used"] >= 1

    second = wait_job(
        client, submit(client, dict(body, candidate={"path": str(model_dirs["gpt2-b"])}))
    )
    assert second["status"] == "succeeded" and second["result"]["verdict"] == "DIFFERENT"
    t2 = _transcript(client, second["id"])
    drawn2 = t2["challenge_indices"]
    assert len(drawn2) == len(set(drawn2)) == POOL
    assert not set(drawn2) & used1  # nothing a released transcript has shown
    assert max(drawn2) >= POOL  # served by the top-up's fresh challenges
    assert _model(client, "pool-gpt2")["fingerprint"]["challenges"] >= 2 * POOL
    key_file = farm_env["REV_SECRET_KEY_FILE"]
    for t in (t1, t2):
        path = tmp_path / f"{t['root'][:8]}.json"
        path.write_text(json.dumps(t))
        proc = _audit_cli(path, key_file)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_job_that_finds_the_pool_used_up_waits_for_the_top_up(
    client: Any, worker: Any, model_dirs: dict[str, Path]
) -> None:
    """Two jobs at once on a fresh pool of 64: the second cannot draw until the top-up lands."""
    doc = register(client, "pool-llama", model_dirs["llama-a"])
    assert doc["status"] == "ready" and doc["fingerprint"]["challenges"] == POOL
    body = {
        "kind": "verify",
        "reference": "pool-llama",
        "candidate": {"path": str(model_dirs["llama-a"])},
    }
    ids = [submit(client, body), submit(client, body)]
    docs = [wait_job(client, i) for i in ids]
    assert all(d["status"] == "succeeded" and d["result"]["verdict"] == "SAME" for d in docs), docs
    transcripts = [_transcript(client, i) for i in ids]
    drawn = [set(t["challenge_indices"]) for t in transcripts]
    used = [{r["index"] for r in t["records"]} for t in transcripts]
    assert all(len(d) == POOL for d in drawn)
    # Whichever drew second drew after the first had drawn (and maybe shown) its
    # challenges: it holds none the first showed, and it needed the fresh challenges.
    assert not drawn[0] & used[1] and not drawn[1] & used[0]
    assert max(max(d) for d in drawn) >= POOL
    assert _model(client, "pool-llama")["fingerprint"]["challenges"] >= 2 * POOL
