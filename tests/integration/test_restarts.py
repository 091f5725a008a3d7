"""Rolling restarts in the middle of jobs lose nothing and duplicate nothing.

Two workers (prefork ``-c 1``, every queue) run a batch of jobs while the test keeps
restarting them, one at a time, the way a deployment does: SIGTERM to the worker's main
process (what tini, ``docker stop`` and Kubernetes send), wait for it to exit, start a
replacement. Two kinds of stop alternate:

- *warm*: SIGTERM only. Celery stops consuming, finishes the running task and acks it.
- *impatient*: SIGTERM, then SIGQUIT 0.3 s later (a grace period running out).
  Celery cancels the running task; its message was never acked (``acks_late``), so the
  worker hands it back to Redis as it closes and another worker runs it again.

Every restart is taken while the worker runs a task (checked with ``inspect().active()``).
At the end every job has exactly one result, five votes from validators 0..4 (no duplicate
vote rows), one transcript, and was counted finished exactly once across every worker
process that ever ran (the shared Prometheus multiprocess directory keeps dead workers'
counters). The broker is empty afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.farm import assert_drained, submit, wait_job

pytestmark = pytest.mark.integration

N_JOBS = 6
RESTARTS = 4  # alternating warm, impatient
SLOW_BATCH_S = 0.25  # the fault-injection hook's per-batch delay: inference takes ~2 s


def _active_tasks(worker: Any) -> list[dict[str, Any]]:
    from rev_tasks.celery import app

    replies = app.control.inspect([worker.name], timeout=1.0).active() or {}
    return list(replies.get(worker.name) or [])


def _inference_job(tasks: list[dict[str, Any]]) -> str | None:
    """The job id of the run_inference task among a worker's active tasks, if any."""
    for task in tasks:
        if task["name"].endswith(".run_inference"):
            args = task.get("args")
            if isinstance(args, (list, tuple)) and args:
                return str(args[0])
            found = re.search(r"[0-9a-f-]{36}", str(args))
            return found.group(0) if found else None
    return None


def _pick(client: Any, workers: list[Any], impatient: bool) -> tuple[int, list[str]] | None:
    """A worker in the middle of inference (the long task) and what it runs; None if none.

    Only early enough in the job that the outcome is certain: a warm stop must find the
    task still running when SIGTERM lands (at most 5 of ~8 challenges done), an impatient
    one must leave it unable to finish within the grace period (at most 2 done).
    """
    limit = 2 if impatient else 5
    for i, worker in enumerate(workers):
        tasks = _active_tasks(worker)
        job = _inference_job(tasks)
        if job is None:
            continue
        if client.get(f"/v1/jobs/{job}").get_json()["progress"]["challenges_done"] <= limit:
            return i, [t["name"].rsplit(".", 1)[-1] for t in tasks]
    return None


def _restart(
    worker: Any, impatient: bool, running: list[str], start: Any, name: str
) -> tuple[Any, dict[str, Any]]:
    """Stop ``worker`` as a deployment would and start its replacement; report what ran."""
    assert worker.proc is not None
    t0 = time.monotonic()
    os.kill(worker.proc.pid, signal.SIGTERM)  # the main process only, like tini forwards it
    if impatient:
        time.sleep(0.3)
        if worker.proc.alive():
            os.kill(worker.proc.pid, signal.SIGQUIT)
    code = worker.proc.popen.wait(timeout=120)
    after = worker.log_tail(200_000).split("Warm shutdown", 1)[-1]
    worker.stop()  # closes the log; nothing is left to kill
    event = {
        "kind": "impatient" if impatient else "warm",
        "running": running,
        "exit": code,
        # finished: a task completed after SIGTERM; handed back: the worker returned an
        # unacked message to Redis ("Restoring 1 unacknowledged message(s)"): the task it
        # was running (impatient), or one it had received but not started yet.
        "finished": " succeeded in " in after,
        "handed_back": "Restoring" in after,
        "stop_s": round(time.monotonic() - t0, 1),
    }
    t1 = time.monotonic()
    replacement = start(name=name)
    event["start_s"] = round(time.monotonic() - t1, 1)
    return replacement, event


def test_restarts_lose_no_job_and_duplicate_no_vote(
    client: Any, start_worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    from prometheus_client import CollectorRegistry, multiprocess
    from sqlalchemy import func, select

    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Job, Transcript, Vote

    prom = tmp_path_factory.mktemp("prom-restarts")

    def start(name: str) -> Any:
        # A slow model (SLOW_BATCH_S per batch, the fault-injection hook) keeps jobs in
        # flight long enough that restarts land inside inference, not only between tasks.
        return start_worker(
            name=name,
            PROMETHEUS_MULTIPROC_DIR=str(prom),
            REV_ENABLE_FAULT_INJECTION="1",
            REV_TEST_SLOW_BATCH_SECONDS=str(SLOW_BATCH_S),
        )

    workers = [start("r0"), start("r1")]
    body = {
        "kind": "verify",
        "reference": {"path": str(model_dirs["gpt2-a"])},
        "candidate": {"path": str(model_dirs["gpt2-a-copy"])},
        "batch_size": 1,
    }
    # Jobs arrive over time, as in production: two at first, then one before each restart.
    # So there is always work in flight when a worker is restarted, however slow this
    # machine is.
    job_ids = [submit(client, body) for _ in range(N_JOBS - RESTARTS)]
    events: list[dict[str, Any]] = []
    for n in range(RESTARTS):
        job_ids.append(submit(client, body))
        impatient = n % 2 == 1
        began = time.monotonic()
        choice = None
        while choice is None and time.monotonic() < began + 120:
            choice = _pick(client, workers, impatient)
            if choice is None:
                time.sleep(0.1)
        assert choice is not None, f"no worker was ever busy ({events})"
        i, running = choice
        waited = round(time.monotonic() - began, 1)
        workers[i], event = _restart(workers[i], impatient, running, start, f"r{n + 2}")
        event["waited_s"] = waited
        events.append(event)

    docs = [wait_job(client, j, timeout=240) for j in job_ids]
    summary = {
        "jobs": len(job_ids),
        "restarts": len(events),
        "warm": sum(e["kind"] == "warm" for e in events),
        "impatient": sum(e["kind"] == "impatient" for e in events),
        "finished_after_sigterm": sum(e["finished"] for e in events),
        "handed_back": sum(e["handed_back"] for e in events),
        "events": events,
    }
    print(f"\nrestart test: {summary}")
    assert len(events) == RESTARTS and len(job_ids) == N_JOBS, summary
    assert all(e["running"] for e in events), summary  # every restart hit a running task
    assert all(e["exit"] == 0 for e in events), summary
    # Warm: the running task finished after SIGTERM. Impatient: inference had barely begun,
    # so the task was cancelled and its message handed back.
    assert all(e["finished"] for e in events if e["kind"] == "warm"), summary
    assert all(e["handed_back"] for e in events if e["kind"] == "impatient"), summary

    for doc in docs:
        assert doc["status"] == "succeeded", doc
        assert doc["result"]["verdict"] == "SAME"
        votes = doc["result"]["consensus"]["votes"]
        assert sorted(v["validator"] for v in votes) == [0, 1, 2, 3, 4]
        assert doc["result"]["consensus"]["agreed"] is True
    with session_scope() as s:
        vote_rows = dict(
            s.execute(
                select(Vote.job_id, func.count(Vote.id))
                .where(Vote.job_id.in_(job_ids))
                .group_by(Vote.job_id)
            ).all()
        )
        transcripts = s.scalar(
            select(func.count()).select_from(Transcript).where(Transcript.job_id.in_(job_ids))
        )
        finished = s.scalars(select(Job.finished_at).where(Job.id.in_(job_ids))).all()
    assert vote_rows == dict.fromkeys(job_ids, 5), vote_rows
    assert transcripts == len(job_ids) and all(finished)

    # Counters of every worker process that ever ran, the killed and restarted ones too.
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(prom))
    samples = [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples]
    published = sum(
        v
        for n, lab, v in samples
        if n == "rev_jobs_finished_total" and lab.get("status") == "succeeded"
    )
    assert published == len(job_ids), samples  # each job's verdict was published exactly once

    for w in workers:
        w.stop()
    assert_drained(farm_env["REDIS_URL"])
