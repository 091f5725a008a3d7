"""Faulty validators, faulty models and duplicate deliveries on the real farm.

Byzantine validators are injected in the worker, only when ``REV_ENABLE_FAULT_INJECTION=1``:
``REV_TEST_FAULTY_VALIDATORS="2"`` makes validator 2 lie (the opposite verdict),
``"2:random"`` vote at random, ``"2:crash"`` raise inside its check;
``REV_TEST_FORGE_INFERENCE_PATH`` makes the inference worker forge a consistent transcript.
One faulty validator of
five leaves the right verdict published (quorum 4); two colluding liars leave no quorum, so
no SAME/DIFFERENT is published; even four colluding liars cannot publish a verdict that
contradicts the transcript's own decision.

Faulty models: corrupt and truncated weights, a folder swapped for a symlink after it was
accepted, a folder over the worker's size cap, and a model slower than the time limit:
each fails its job with the reason, and the worker keeps serving the next job.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.queues import CONSENSUS, DEFAULT, INFERENCE_CPU, MAINTENANCE, Task
from tests.integration.farm import assert_drained, register, submit, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def _same_job(client: Any, model_dirs: dict[str, Path], **extra: Any) -> dict[str, Any]:
    body = {
        "kind": "verify",
        "reference": {"path": str(model_dirs["gpt2-a"])},
        "candidate": {"path": str(model_dirs["gpt2-a-copy"])},
        "device": "cpu",
        **extra,
    }
    return wait_job(client, submit(client, body))


def _with_faults(start_worker: Any, name: str, spec: str) -> Any:
    return start_worker(name=name, REV_ENABLE_FAULT_INJECTION="1", REV_TEST_FAULTY_VALIDATORS=spec)


# ----------------------------------------------------------------------------- validators
def test_one_liar_leaves_the_verdict_unchanged(
    client: Any, start_worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str]
) -> None:
    worker = _with_faults(start_worker, "liar1", "2")
    try:
        doc = _same_job(client, model_dirs)
    finally:
        worker.stop()
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["verdict"] == "SAME"
    consensus = doc["result"]["consensus"]
    assert consensus["agreed"] is True and consensus["agreeing"] == 4
    votes = {v["validator"]: v for v in consensus["votes"]}
    assert len(votes) == 5
    assert votes[2]["verdict"] == "DIFFERENT"
    assert all(votes[i]["verdict"] == "SAME" for i in (0, 1, 3, 4))
    assert len({votes[i]["digest"] for i in (0, 1, 3, 4)}) == 1
    assert votes[2]["digest"] != votes[0]["digest"]
    assert_drained(farm_env["REDIS_URL"])


def test_one_crashing_validator_abstains(
    client: Any, start_worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str]
) -> None:
    worker = _with_faults(start_worker, "crash1", "1:crash")
    try:
        doc = _same_job(client, model_dirs)
        assert worker.alive()
    finally:
        worker.stop()
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["verdict"] == "SAME"
    consensus = doc["result"]["consensus"]
    assert consensus["agreed"] is True and consensus["agreeing"] == 4
    assert consensus["abstained"] == [1]
    assert sorted(v["validator"] for v in consensus["votes"]) == [0, 2, 3, 4]
    assert_drained(farm_env["REDIS_URL"])


def test_one_random_validator_cannot_change_the_verdict(
    client: Any, start_worker: Any, model_dirs: dict[str, Path]
) -> None:
    worker = _with_faults(start_worker, "random1", "4:random")
    try:
        docs = [_same_job(client, model_dirs, max_challenges=32 + i) for i in range(2)]
    finally:
        worker.stop()
    for doc in docs:
        assert doc["status"] == "succeeded", doc
        assert doc["result"]["verdict"] == "SAME"
        consensus = doc["result"]["consensus"]
        assert consensus["agreeing"] >= 4 and consensus["agreed"] is True
        honest = [v for v in consensus["votes"] if v["validator"] != 4]
        assert all(v["verdict"] == "SAME" for v in honest)


def test_two_liars_publish_no_verdict(
    client: Any, start_worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str]
) -> None:
    worker = _with_faults(start_worker, "liar2", "0,3")
    try:
        doc = _same_job(client, model_dirs)
    finally:
        worker.stop()
    assert doc["status"] == "failed", doc
    assert doc["error"]["code"] == "no_consensus"
    # The tally that refused the verdict ends FAILURE (Flower counts it), as an expected
    # outcome; the chord's errback is not sent for it (the broker is drained below).
    expected = f"raised expected: JobFailed('no_consensus: {doc['error']['message']}')"
    assert expected in worker.log_tail(500_000)
    assert doc["result"]["verdict"] is None
    consensus = doc["result"]["consensus"]
    assert consensus["agreed"] is False and consensus["agreeing"] == 3
    assert len(consensus["votes"]) == 5
    assert {v["validator"] for v in consensus["votes"] if v["verdict"] == "DIFFERENT"} == {0, 3}
    assert_drained(farm_env["REDIS_URL"])


def test_four_colluding_liars_cannot_publish_a_wrong_verdict(
    client: Any, start_worker: Any, model_dirs: dict[str, Path]
) -> None:
    """A quorum that contradicts the transcript's decision publishes nothing."""
    worker = _with_faults(start_worker, "liar4", "0,1,2,3")
    try:
        doc = _same_job(client, model_dirs)
    finally:
        worker.stop()
    assert doc["status"] == "failed", doc
    assert doc["result"]["verdict"] is None
    consensus = doc["result"]["consensus"]
    assert consensus["agreeing"] == 4 and consensus["verdict"] == "DIFFERENT"
    assert consensus["agreed"] is False
    assert doc["error"]["code"] == "no_consensus"


def test_a_forging_inference_worker_is_caught_by_re_execution(
    client: Any, start_worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str]
) -> None:
    """A lying inference worker: it runs the reference in gpt2-b's place and stores a
    transcript that is internally consistent and claims SAME. The audit alone cannot see it;
    every validator's re-execution of the real gpt2-b does, on whichever records it drew."""
    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Vote

    worker = start_worker(
        name="forger", REV_ENABLE_FAULT_INJECTION="1", REV_TEST_FORGE_INFERENCE_PATH="gpt2-b"
    )
    try:
        body = {
            "kind": "verify",
            "reference": {"path": str(model_dirs["gpt2-a"])},
            "candidate": {"path": str(model_dirs["gpt2-b"])},
            "device": "cpu",
        }
        doc = wait_job(client, submit(client, body))
    finally:
        worker.stop()
    assert doc["status"] == "failed", doc
    assert doc["error"]["code"] == "invalid_transcript", doc["error"]
    assert doc["result"]["verdict"] is None
    transcript = client.get(f"/v1/jobs/{doc['id']}/transcript").get_json()
    assert transcript["decision"]["verdict"] == "SAME"  # what the forger claimed
    n_records = len(transcript["records"])
    consensus = doc["result"]["consensus"]
    assert [v["verdict"] for v in consensus["votes"]] == ["INVALID"] * 5
    for vote in consensus["votes"]:  # two distinct records each, drawn from the transcript
        drawn = vote["reexecuted"]
        assert len(drawn) == 2 and drawn == sorted(set(drawn))
        assert all(0 <= i < n_records for i in drawn)
    with session_scope() as s:
        problems = [p for v in s.query(Vote).filter_by(job_id=doc["id"]) for p in v.problems]
    assert problems and all(p.startswith("re-execution: record ") for p in problems)
    assert all("candidate signatures differ from a re-execution" in p for p in problems)
    assert_drained(farm_env["REDIS_URL"])


def test_fault_switch_needs_the_enable_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from rev_tasks.testing.faults import Faults

    monkeypatch.setenv("REV_TEST_FAULTY_VALIDATORS", "0,3:random,4:crash")
    monkeypatch.setenv("REV_TEST_SLOW_BATCH_SECONDS", "2")
    monkeypatch.setenv("REV_TEST_FORGE_INFERENCE_PATH", "gpt2-b")
    monkeypatch.setenv("REV_TEST_KILL_INFERENCE_PATH", "oom-bomb")
    monkeypatch.delenv("REV_ENABLE_FAULT_INJECTION", raising=False)
    off = Faults.from_env()
    assert off.faulty_validators == frozenset()
    assert off.validator_mode(0) is None and off.slow_batch_seconds == 0
    assert off.forge_path == "" and off.kill_path == ""
    monkeypatch.setenv("REV_ENABLE_FAULT_INJECTION", "1")
    on = Faults.from_env()
    assert on.faulty_validators == frozenset({0, 3, 4})
    assert [on.validator_mode(i) for i in range(5)] == ["lie", None, None, "random", "crash"]
    assert on.slow_batch_seconds == 2
    assert on.forge_path == "gpt2-b" and on.kill_path == "oom-bomb"
    monkeypatch.setenv("REV_TEST_FAULTY_VALIDATORS", "1:sleepy")
    with pytest.raises(ValueError, match="mode"):
        Faults.from_env()


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def bad_models(model_dirs: dict[str, Path]) -> dict[str, Path]:
    """Truncated weights, an oversized folder, and a folder whose weights get swapped later."""
    root = model_dirs["root"]
    out: dict[str, Path] = {}
    truncated = root / "truncated"
    if not truncated.exists():
        shutil.copytree(model_dirs["gpt2-a"], truncated)
        weights = truncated / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out["truncated"] = truncated
    oversized = root / "oversized"
    if not oversized.exists():
        shutil.copytree(model_dirs["gpt2-a"], oversized)
        with open(oversized / "padding.bin", "wb") as fh:  # sparse: no disk used
            fh.truncate(50_000_000)
    out["oversized"] = oversized
    swapped = root / "swapped-later"
    if not swapped.exists():
        shutil.copytree(model_dirs["gpt2-a"], swapped)
    out["swapped"] = swapped
    bomb = root / "oom-bomb"
    if not bomb.exists():
        shutil.copytree(model_dirs["gpt2-a"], bomb)
    out["bomb"] = bomb
    return out


def _hardened(start_worker: Any) -> Any:
    """8 s time limit, 5 MB model cap, slow batches (1.5 s), 2 attempts, an "OOM" model.

    ``REV_TEST_KILL_INFERENCE_PATH=oom-bomb``: the pool child SIGKILLs itself when it starts
    the inference of a candidate under ``oom-bomb`` (what the OOM killer does to a worker
    that loads a model too big for it).
    """
    worker = start_worker(
        name="hardened",
        REV_JOB_TIME_LIMIT="8",
        REV_MAX_MODEL_BYTES="5000000",
        REV_MAX_ATTEMPTS="2",
        REV_ENABLE_FAULT_INJECTION="1",
        REV_TEST_SLOW_BATCH_SECONDS="1.5",
        REV_TEST_KILL_INFERENCE_PATH="oom-bomb",
    )
    return worker


def _verify(client: Any, model_dirs: dict[str, Path], candidate: Path, **extra: Any) -> str:
    body = {
        "kind": "verify",
        "reference": {"path": str(model_dirs["gpt2-a"])},
        "candidate": {"path": str(candidate)},
        "device": "cpu",
        **extra,
    }
    return submit(client, body)


def test_faulty_models_fail_their_jobs_and_the_worker_survives(
    client: Any,
    start_worker: Any,
    model_dirs: dict[str, Path],
    bad_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    hardened = _hardened(start_worker)
    try:
        _faulty_models(client, hardened, model_dirs, bad_models, tmp_path_factory)
    finally:
        hardened.stop()  # it consumes every queue: it must not outlive this test


def _faulty_models(
    client: Any,
    hardened: Any,
    model_dirs: dict[str, Path],
    bad_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Warm the worker's child first (imports and model cache): the time limit must fire in
    # the middle of inference. (Fired inside a first-time `transformers` import it would
    # leave that module half-initialised in the child: docs/security.md, limitations.)
    warm = wait_job(client, _verify(client, model_dirs, model_dirs["gpt2-a-copy"]))
    assert warm["status"] == "succeeded", warm
    # Slower than the time limit: batches of one challenge, 1.5 s each, limit 8 s.
    slow = _verify(client, model_dirs, model_dirs["gpt2-a-copy"], batch_size=1)
    # Accepted at submit (the coordinator's cap is 20 GB), refused by the worker's 5 MB cap.
    oversized = _verify(client, model_dirs, bad_models["oversized"])
    # Accepted while clean; its weights become a link outside the roots before it is loaded
    # (it waits behind the slow job).
    swapped = _verify(client, model_dirs, bad_models["swapped"])
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "model.safetensors"
    shutil.copy(model_dirs["gpt2-b"] / "model.safetensors", elsewhere)
    (bad_models["swapped"] / "model.safetensors").unlink()
    (bad_models["swapped"] / "model.safetensors").symlink_to(elsewhere)
    truncated = _verify(client, model_dirs, bad_models["truncated"])
    corrupt = _verify(client, model_dirs, model_dirs["corrupt"])

    doc = wait_job(client, slow)
    assert doc["status"] == "failed" and doc["error"]["code"] == "timeout", doc
    assert "REV_JOB_TIME_LIMIT" in doc["error"]["message"]
    expectations = {
        oversized: "REV_MAX_MODEL_BYTES",
        swapped: "outside the model roots",
        truncated: "weights",
        corrupt: "weights",
    }
    for job_id, reason in expectations.items():
        doc = wait_job(client, job_id)
        assert doc["status"] == "failed", doc
        assert doc["error"]["code"] == "model_load_error", doc["error"]
        assert reason in doc["error"]["message"] and "candidate" in doc["error"]["message"]
        assert doc["result"] is None
    assert hardened.alive()
    # A model that kills its worker every time: failed after REV_MAX_ATTEMPTS, not forever.
    bomb = wait_job(client, _verify(client, model_dirs, bad_models["bomb"]))
    assert bomb["status"] == "failed" and bomb["error"]["code"] == "worker_lost", bomb
    assert hardened.alive()
    good = wait_job(client, _verify(client, model_dirs, model_dirs["gpt2-a-copy"]))
    assert good["status"] == "succeeded" and good["result"]["verdict"] == "SAME", good
    assert hardened.alive()


# ----------------------------------------------------------------------------- duplicates
def test_every_step_delivered_twice_while_the_job_runs(
    client: Any,
    client_for: Any,
    keys: dict[str, str],
    start_worker: Any,
    model_dirs: dict[str, Path],
    farm_env: dict[str, str],
) -> None:
    """Duplicates of prepare, run_inference, fingerprint and consensus_failed during a job."""
    from sqlalchemy import func, select

    from rev_tasks.celery import app
    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Transcript, Vote

    # Tenant beta's own registry: a copy of gpt2-a registered for the admin's tenant would
    # tie with gpt2-a in any later identify job of that tenant (test_farm's ranking).
    beta = client_for(keys["beta"])
    worker = start_worker(name="dups")
    try:
        model = register(beta, "dup-gpt2", model_dirs["gpt2-a"])
        assert model["status"] == "ready"
        app.send_task(Task.FINGERPRINT, ["dup-gpt2"], queue=INFERENCE_CPU)
        body = {
            "kind": "verify",
            "reference": "dup-gpt2",
            "candidate": {"path": str(model_dirs["gpt2-a-copy"])},
            "device": "cpu",
        }
        job_id = submit(beta, body)
        for _ in range(2):
            app.send_task(Task.PREPARE, [job_id], queue=DEFAULT)
            app.send_task(Task.RUN_INFERENCE, [job_id], queue=INFERENCE_CPU)
        doc = wait_job(client, job_id)
        assert doc["status"] == "succeeded" and doc["result"]["verdict"] == "SAME", doc
        # Late duplicates after the end, the chord errback included, change nothing.
        app.send_task(Task.CONSENSUS_FAILED, ["t", job_id], queue=CONSENSUS)
        app.send_task(Task.TALLY, [job_id], queue=CONSENSUS)
        app.send_task(Task.WATCHDOG, [], queue=MAINTENANCE)
        assert_drained(farm_env["REDIS_URL"])
        assert client.get(f"/v1/jobs/{job_id}").get_json() == doc
        # The duplicate registration changed nothing; the pool grew by the one top-up the
        # job's draw of all 64 challenges asked for (docs/security.md, "Challenges").
        after = dict(client.get("/v1/models/dup-gpt2").get_json()["fingerprint"])
        assert after.pop("challenges") == 2 * model["fingerprint"]["challenges"]
        assert after == {k: v for k, v in model["fingerprint"].items() if k != "challenges"}
        with session_scope() as s:
            votes = s.scalar(select(func.count()).select_from(Vote).where(Vote.job_id == job_id))
            transcripts = s.scalar(
                select(func.count()).select_from(Transcript).where(Transcript.job_id == job_id)
            )
        assert (votes, transcripts) == (5, 1)
    finally:
        worker.stop()
