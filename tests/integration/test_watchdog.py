"""No job left behind: a killed broker or a killed worker, and the watchdog resumes the jobs.

The module runs its own farm: a private ``redis-server`` on a spare port (restarted with its
AOF, or without any persistence, so that it comes back empty), real PostgreSQL, a *stable*
worker on ``consensus,default,maintenance``, a *victim* on ``inference.cpu`` that is killed,
and a real ``celery beat`` that sends the watchdog every ``REV_WATCHDOG_INTERVAL`` seconds.

The visibility timeout is left at its production value (two hours): a job whose worker was
killed gets back only because the watchdog sees its heartbeat stop and re-dispatches it from
the database. Thresholds are seconds here (the environment below), minutes in production.
Each check: every job succeeded with the right verdict, published once, five votes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.queues import CONSENSUS_WORKER_QUEUES, INFERENCE_CPU
from rev_tasks.testing.harness import ROOT, GroupProcess, free_port
from tests.integration.chaos import (
    RedisServer,
    Submitted,
    bodies,
    check_outcomes,
    rows,
    wait_mid_inference,
)
from tests.integration.farm import farm_environment

pytestmark = [pytest.mark.integration, pytest.mark.faults]

WATCHDOG_ENV = {
    "REV_HEARTBEAT_SECONDS": "1",
    "REV_WATCHDOG_INTERVAL": "2",
    "REV_WATCHDOG_STALE_SECONDS": "6",
    "REV_WATCHDOG_GRACE_SECONDS": "5",
    "REV_WATCHDOG_MAX_RESUMES": "3",
}
VICTIM_ENV = {"REV_ENABLE_FAULT_INJECTION": "1", "REV_TEST_SLOW_BATCH_SECONDS": "0.25"}
JOBS = 4
FIGURES: dict[str, Any] = {}
SUBMITTED = Submitted("watchdog")
submit = SUBMITTED.submit


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path_factory.mktemp("watchdog-redis"), free_port(6430)).start()
    try:
        yield redis
    finally:
        redis.stop()
        if FIGURES:
            out = ROOT / "var" / "faults" / "watchdog.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(FIGURES, indent=2) + "\n")
            print("\nwatchdog figures:", json.dumps(FIGURES, indent=2))


@pytest.fixture(scope="module")
def farm_env(
    broker: RedisServer, postgres_url: str, model_dirs: dict[str, Path], tmp_path_factory: Any
) -> Iterator[dict[str, str]]:
    """This module's farm: the private Redis, the production visibility timeout, short
    watchdog thresholds."""
    with farm_environment(
        broker.url, postgres_url, model_dirs, tmp_path_factory, **WATCHDOG_ENV
    ) as env:
        yield env


@pytest.fixture(scope="module", autouse=True)
def _no_job_left_running(farm_env: dict[str, str]) -> Iterator[None]:
    """A failed test must not leave jobs running for the modules that follow."""
    yield
    SUBMITTED.fail_unfinished()


@pytest.fixture(scope="module")
def stable(start_worker: Any) -> Any:
    return start_worker(queues=",".join(CONSENSUS_WORKER_QUEUES), name="stable")


@pytest.fixture(scope="module")
def beat(farm_env: dict[str, str], tmp_path_factory: Any) -> Iterator[GroupProcess]:
    """``celery beat`` as the local stack runs it: the watchdog's only scheduler here."""
    folder = tmp_path_factory.mktemp("beat")
    argv = [sys.executable, "-m", "celery", "-A", "rev_tasks", "beat", "--loglevel", "INFO",
            "-s", str(folder / "celerybeat-schedule")]  # fmt: skip
    proc = GroupProcess("beat", argv, {**os.environ, **farm_env}, folder / "beat.log")
    yield proc
    proc.stop(10)


def _resumes(job_ids: list[str]) -> dict[str, int]:
    from sqlalchemy import select

    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Job

    with session_scope() as s:
        return dict(s.execute(select(Job.id, Job.resumes).where(Job.id.in_(job_ids))).all())


def _submit_and_catch_one_running(client: Any, model_dirs: dict[str, Path]) -> dict[str, str]:
    expected = {submit(client, body): verdict for body, verdict in bodies(model_dirs, JOBS)}
    wait_mid_inference(list(expected))
    waiting = [j for j, (status, _, _) in rows(list(expected)).items() if status == "queued"]
    assert waiting, "no job was still queued when the fault came"
    return expected


def test_a_killed_worker_s_job_is_resumed_by_the_watchdog(
    client: Any,
    start_worker: Any,
    stable: Any,
    beat: GroupProcess,
    model_dirs: dict[str, Path],
) -> None:
    """SIGKILL of the whole inference worker (its process group) with one job running and
    others queued; the worker comes back at once (what ``make up`` does for a dead member),
    but its running job's message stays unacked for the two-hour visibility timeout."""
    started = time.monotonic()
    victim = start_worker(queues=INFERENCE_CPU, name="victim", **VICTIM_ENV)
    expected = _submit_and_catch_one_running(client, model_dirs)
    running = [j for j, (_, stage, _) in rows(list(expected)).items() if stage == "inference"]
    victim.kill()
    killed_at = time.monotonic()
    victim = start_worker(queues=INFERENCE_CPU, name="victim-again", **VICTIM_ENV)
    docs = check_outcomes(client, expected, stable, timeout=240)
    resumes = _resumes(list(expected))
    assert all(resumes[j] >= 1 for j in running), resumes  # the watchdog, not Redis, did it
    assert "resumed by resume_inference" in stable.log_tail(10_000_000)
    FIGURES["worker_sigkill"] = {
        "jobs": len(expected),
        "running_when_killed": len(running),
        "resumes": sorted(resumes.values()),
        "visibility_timeout_s": 7200,
        "last_job_finished_s_after_kill": round(time.monotonic() - killed_at, 1),
        "outcome": "every job succeeded once with the expected verdict, 5 distinct votes each",
        "wall_s": round(time.monotonic() - started, 1),
    }
    assert all(d["status"] == "succeeded" for d in docs.values())
    victim.stop()


# AOF first: a server started without persistence later leaves no stale AOF to replay.
@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
def test_a_killed_broker_loses_no_job(
    appendonly: bool,
    client: Any,
    start_worker: Any,
    stable: Any,
    beat: GroupProcess,
    broker: RedisServer,
    model_dirs: dict[str, Path],
) -> None:
    """Redis SIGKILLed with jobs queued and one running, back 2 s later: with its AOF it has
    every message; without persistence every queue, delivery and chord counter is gone and
    the watchdog re-dispatches each job from the database."""
    started = time.monotonic()
    victim = start_worker(queues=INFERENCE_CPU, name=f"victim-{appendonly}", **VICTIM_ENV)
    import redis

    expected = _submit_and_catch_one_running(client, model_dirs)
    queued = redis.Redis.from_url(broker.url).llen(INFERENCE_CPU)
    assert queued >= 1
    broker.appendonly = appendonly
    broker.restart(down_for=2.0)
    after = redis.Redis.from_url(broker.url).llen(INFERENCE_CPU)
    if appendonly:  # the AOF kept them (one may have been taken just before the kill)
        assert queued - 1 <= after <= queued and after >= 1, (queued, after)
    else:
        assert after == 0, (queued, after)
    check_outcomes(client, expected, stable, timeout=240)
    resumes = _resumes(list(expected))
    if not appendonly:  # the queued jobs' messages were lost: resumed, not waited for
        assert sum(1 for n in resumes.values() if n) >= 1, resumes
    assert victim.alive() and stable.alive() and beat.alive()
    FIGURES[f"broker_kill_{'aof' if appendonly else 'no_persistence'}"] = {
        "jobs": len(expected),
        "down_s": 2.0,
        "resumes": sorted(resumes.values()),
        "outcome": "every job succeeded once with the expected verdict, 5 distinct votes each",
        "wall_s": round(time.monotonic() - started, 1),
    }
    victim.stop()


def test_a_killed_consensus_worker_s_round_is_sent_again_with_no_sixth_vote(
    client: Any,
    start_worker: Any,
    stable: Any,
    beat: GroupProcess,
    broker: RedisServer,
    model_dirs: dict[str, Path],
) -> None:
    """SIGKILL of the whole consensus worker while a job has some votes but not five and the
    worker holds one of its validators (unacked for two hours): its chord never completes. The worker comes back, the watchdog sends the round again, the
    validators that voted return their votes, and the job publishes once with five.

    Last in the module: it replaces the module's stable worker."""
    from tests.integration.chaos import votes

    started = time.monotonic()
    stable.stop()  # in its place, one whose validators take a second: a kill lands in one
    slow = start_worker(
        queues=",".join(CONSENSUS_WORKER_QUEUES),
        name="stable-slow",
        REV_ENABLE_FAULT_INJECTION="1",
        REV_TEST_SLOW_VALIDATION_SECONDS="1",
    )
    victim = start_worker(queues=INFERENCE_CPU, name="victim-consensus", **VICTIM_ENV)
    expected: dict[str, str] = {}
    caught = None
    deadline = time.monotonic() + 180
    while caught is None:
        assert time.monotonic() < deadline, rows(list(expected))
        found = rows(list(expected))
        if all(status in ("succeeded", "failed") for status, _, _ in found.values()):
            for body, verdict in bodies(model_dirs, 2):  # (again) two jobs to catch
                expected[submit(client, body)] = verdict
            continue
        for job_id, (_, stage, _) in found.items():
            held = _held_for(broker, job_id)
            # Delivered 0.2-0.7 s ago: the validator sleeps in its check and has not voted.
            if stage == "consensus" and 1 <= len(votes(job_id)) <= 4 and 0.2 < held < 0.7:
                caught = job_id
                break
        time.sleep(0.02)
    slow.kill()
    cast_before = len(votes(caught))
    again = start_worker(queues=",".join(CONSENSUS_WORKER_QUEUES), name="stable-again")
    logs = _Logs(stable, slow, again)
    check_outcomes(client, expected, logs, timeout=240)
    assert _resumes([caught])[caught] >= 1
    assert "resumed by resume_consensus" in again.log_tail(10_000_000)
    FIGURES["consensus_worker_sigkill"] = {
        "jobs": len(expected),
        "votes_when_killed": cast_before,
        "outcome": "the round was sent again; published once, 5 distinct votes",
        "wall_s": round(time.monotonic() - started, 1),
    }
    victim.stop()


class _Logs:
    """The logs of the consensus workers one after the other (check_outcomes reads them)."""

    def __init__(self, *workers: Any) -> None:
        self.workers = workers

    def log_tail(self, n: int) -> str:
        return "".join(w.log_tail(n) for w in self.workers)


def _held_for(broker: RedisServer, job_id: str) -> float:
    """Seconds since a worker was delivered (and has not acked) a message naming the job;
    infinity when none is held."""
    import redis

    from rev_tasks.ops.watchdog import _named

    r = redis.Redis.from_url(broker.url)
    ages = [
        time.time() - score
        for tag, score in r.zrange("unacked_index", 0, -1, withscores=True)
        if job_id in _named(r.hget("unacked", tag) or b"")
    ]
    return min(ages, default=float("inf"))
