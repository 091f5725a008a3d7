"""Cancelling jobs on the real farm: mid-inference, queued behind another, in consensus.

One worker (prefork ``-c 1``, every queue) runs slow batches (``REV_TEST_SLOW_BATCH_SECONDS``,
honoured only with ``REV_ENABLE_FAULT_INJECTION=1``), so that a job can be caught in the
middle of its inference. A cancelled job must end ``cancelled`` at once in the API, its
inference must stop at its next batch, the worker must go on to the next job, and nothing
(transcript, vote, verdict) may be written for it afterwards.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.queues import CONSENSUS, Task, inference_task_id
from tests.integration.farm import assert_drained, submit, wait_job

pytestmark = pytest.mark.integration

SLOW = 1.5  # seconds per batch
CANCELLED = {"kind": "verify", "status": "cancelled", "verdict": "none"}


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    w = start_worker(
        name="cancel", REV_ENABLE_FAULT_INJECTION="1", REV_TEST_SLOW_BATCH_SECONDS=str(SLOW)
    )
    yield w
    w.stop()


def _body(model_dirs: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {
        "kind": "verify",
        "reference": {"path": str(model_dirs["gpt2-a"])},
        "candidate": {"path": str(model_dirs["gpt2-a-copy"])},
        "device": "cpu",
        "batch_size": 1,
        **extra,
    }


def _written(job_id: str) -> tuple[int, bool]:
    """(votes, whether a transcript exists) for the job, from PostgreSQL."""
    from sqlalchemy import func, select

    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Transcript, Vote

    with session_scope() as s:
        votes = s.scalar(select(func.count()).select_from(Vote).where(Vote.job_id == job_id))
        return int(votes or 0), s.get(Transcript, job_id) is not None


def _cancelled_count() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("rev_jobs_finished_total", CANCELLED) or 0.0


def test_a_job_cancelled_mid_inference_stops_at_its_next_batch(
    client: Any, worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str]
) -> None:
    import redis
    from celery.result import AsyncResult

    from rev_tasks.celery import app

    warm = wait_job(client, submit(client, _body(model_dirs, batch_size=8, max_challenges=8)))
    assert warm["status"] == "succeeded", warm  # models loaded: what follows is inference
    counted = _cancelled_count()
    running = submit(client, _body(model_dirs))
    behind = submit(client, _body(model_dirs))  # -c 1: it waits for the first
    pubsub = redis.Redis.from_url(farm_env["REDIS_URL"]).pubsub()
    pubsub.subscribe(f"celery-task-meta-{inference_task_id(running)}")
    deadline = time.monotonic() + 120
    doc = client.get(f"/v1/jobs/{running}").get_json()
    while doc["progress"]["challenges_done"] < 2:
        assert time.monotonic() < deadline and doc["status"] in ("queued", "running"), doc
        time.sleep(0.2)
        doc = client.get(f"/v1/jobs/{running}").get_json()

    resp = client.post(f"/v1/jobs/{running}/cancel")
    cancelled_at = time.monotonic()
    assert resp.status_code == 200, resp.get_json()
    doc = resp.get_json()
    assert doc["status"] == "cancelled" and doc["result"] is None, doc
    done = doc["progress"]["challenges_done"]
    queued = client.post(f"/v1/jobs/{behind}/cancel").get_json()
    assert queued["status"] == "cancelled" and queued["started_at"] is None, queued

    outcome = AsyncResult(inference_task_id(running), app=app).get(timeout=120)
    stopped_after = time.monotonic() - cancelled_at
    assert outcome == "cancelled"
    # The batch in flight ends (its pause included), the next one finds the job cancelled.
    assert stopped_after < 2 * SLOW + 10, stopped_after
    states = []  # every state the inference task stored since before the cancel
    while (msg := pubsub.get_message(timeout=0.5)) is not None:
        if msg["type"] == "message":
            states.append(json.loads(msg["data"]))
    pubsub.close()
    assert states and states[-1]["status"] == "SUCCESS", states[-3:]
    recorded = [s["result"]["challenges_done"] for s in states if s["status"] == "PROGRESS"]
    assert all(n <= done for n in recorded), (done, recorded)  # no batch past the cancel
    assert f"stopped after {done} challenges" in worker.log_tail(200_000)

    # Its worker serves the next job.
    following = wait_job(client, submit(client, _body(model_dirs, batch_size=8, max_challenges=8)))
    assert following["status"] == "succeeded" and following["result"]["verdict"] == "SAME"
    assert_drained(farm_env["REDIS_URL"])
    # Nothing was, or is later, written for the cancelled jobs.
    for job_id, expected in ((running, doc), (behind, queued)):
        assert client.get(f"/v1/jobs/{job_id}").get_json() == expected
        assert _written(job_id) == (0, False)
    assert _cancelled_count() == counted + 2


def test_validators_and_tally_write_nothing_for_a_job_cancelled_in_consensus(
    client: Any, worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str]
) -> None:
    """A decided job cancelled while its validators wait: they vote nothing, no verdict.

    The job is a copy of a finished one's row and transcript put in the consensus stage
    (test setup, not a transition); the validators and the tally then come from the broker.
    """
    from sqlalchemy import update

    from rev_tasks.celery import app
    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Job, Transcript

    done = wait_job(client, submit(client, _body(model_dirs, batch_size=8, max_challenges=8)))
    assert done["status"] == "succeeded", done
    job_id = str(uuid.uuid4())
    with session_scope() as s:
        source = s.get(Job, done["id"])
        transcript = s.get(Transcript, done["id"])
        assert source is not None and transcript is not None
        columns = {c.name: getattr(source, c.name) for c in Job.__table__.columns}
        s.add(Job(**{**columns, "id": job_id, "result": None, "finished_at": None}))
        s.flush()
        s.execute(update(Job).where(Job.id == job_id).values(status="running", stage="consensus"))
        s.add(
            Transcript(
                job_id=job_id,
                root=transcript.root,
                verdict=transcript.verdict,
                outcome=transcript.outcome,
                doc=transcript.doc,
            )
        )
    assert client.get(f"/v1/jobs/{job_id}").get_json()["stage"] == "consensus"
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel").get_json()
    assert cancelled["status"] == "cancelled", cancelled
    for validator in range(5):
        app.send_task(Task.VALIDATE, [job_id, validator], queue=CONSENSUS)
    app.send_task(Task.TALLY, [job_id, time.time()], queue=CONSENSUS)
    assert_drained(farm_env["REDIS_URL"])
    assert _written(job_id) == (0, True)  # the transcript it had; not one vote
    assert client.get(f"/v1/jobs/{job_id}").get_json() == cancelled
    assert "is finished (cancelled?); not voting" in worker.log_tail(200_000)
