"""Chaos on the real farm: SIGKILLed workers, a crashed Redis, an unreachable PostgreSQL.

The module runs its own farm: a private ``redis-server`` (AOF, fsync always) on a spare
port and a TCP proxy in front of PostgreSQL, so that both can fail for real without
touching the shared services. Workers are ``celery worker`` subprocesses: a *stable* one on
``consensus,default,maintenance`` and a *victim* on ``inference.cpu`` that is killed.

What happens on SIGKILL, measured here rather than assumed:

* **pool child killed** (the OOM killer's way): the worker's main process sees the child
  die, rejects the message with requeue (``task_reject_on_worker_lost``) and forks a new
  child; the job is redelivered at once.
* **whole worker killed** (node loss): nobody is left to reject or restore the message; it
  stays in Redis's ``unacked`` table. Kombu restores unacked messages older than the
  visibility timeout when a worker starts (``on_poll_init``) and every
  ``unacked_restore_interval × unacked_restore_throttle`` (10 s × 10 = 100 s by default)
  afterwards. So redelivery takes the visibility timeout (here ``REV_VISIBILITY_TIMEOUT=3``;
  in production hours) plus up to one sweep period. The test restarts the worker once the
  message is older than the timeout, so the new worker's startup sweep restores it.

``REV_TEST_SLOW_BATCH_SECONDS`` (fault injection) stretches each inference batch so that a
kill lands between batches of a running inference, not before or after it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.queues import CONSENSUS_WORKER_QUEUES, INFERENCE_CPU
from rev_tasks.testing.harness import ROOT, free_port
from tests.integration.chaos import (
    RedisServer,
    Submitted,
    TcpProxy,
    bodies,
    check_outcomes,
    rows,
    wait_mid_inference,
)
from tests.integration.farm import TERMINAL, farm_environment

pytestmark = [pytest.mark.integration, pytest.mark.faults]

VISIBILITY = 3
VICTIM_ENV = {"REV_ENABLE_FAULT_INJECTION": "1", "REV_TEST_SLOW_BATCH_SECONDS": "0.25"}
FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def services(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from sqlalchemy.engine import make_url

    redis = RedisServer(tmp_path_factory.mktemp("chaos-redis"), free_port(6390)).start()
    pg = make_url(postgres_url)
    proxy = TcpProxy(pg.host or "127.0.0.1", pg.port or 5432).start()
    url = pg.set(port=proxy.port).render_as_string(hide_password=False)
    try:
        yield {"redis": redis, "proxy": proxy, "database_url": url}
    finally:
        proxy.stop()
        redis.stop()
        if FIGURES:  # the suite's own numbers, for docs/security.md and reviews
            out = ROOT / "var" / "faults" / "chaos.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(FIGURES, indent=2) + "\n")
            print("\nchaos figures:", json.dumps(FIGURES, indent=2))


@pytest.fixture(scope="module")
def farm_env(
    services: dict[str, Any], model_dirs: dict[str, Path], tmp_path_factory: Any
) -> Iterator[dict[str, str]]:
    """This module's farm: the private Redis, PostgreSQL through the proxy, short visibility."""
    with farm_environment(
        services["redis"].url,
        services["database_url"],
        model_dirs,
        tmp_path_factory,
        REV_VISIBILITY_TIMEOUT=str(VISIBILITY),
    ) as env:
        yield env


SUBMITTED = Submitted("chaos")
submit = SUBMITTED.submit


@pytest.fixture(scope="module", autouse=True)
def _no_job_left_running(farm_env: dict[str, str]) -> Iterator[None]:
    """A failed chaos test must not leave jobs running for the modules that follow."""
    yield
    SUBMITTED.fail_unfinished()


@pytest.fixture(scope="module")
def stable(start_worker: Any) -> Any:
    return start_worker(queues=",".join(CONSENSUS_WORKER_QUEUES), name="stable")


def _unacked_oldest_needed(redis_url: str) -> float:
    """Seconds to wait until every unacked delivery is older than the visibility timeout."""
    import redis

    scores = [
        s
        for _, s in redis.Redis.from_url(redis_url).zrange("unacked_index", 0, -1, withscores=True)
    ]
    if not scores:
        return 0.0
    return max(0.0, max(scores) + VISIBILITY + 0.5 - time.time())


def test_sigkill_mid_inference_again_and_again(
    client: Any,
    start_worker: Any,
    stable: Any,
    model_dirs: dict[str, Path],
    farm_env: dict[str, str],
) -> None:
    """≥ 20 kills, each while a job's inference is between batches; every job ends once.

    Two of every three kills take the pool child (the worker forks a new one), the third
    the whole worker (restarted by the test once the visibility timeout has passed).
    """
    started = time.monotonic()
    wanted_kills = 20
    expected: dict[str, str] = {}
    for body, verdict in bodies(model_dirs, wanted_kills):
        expected[submit(client, body)] = verdict
    victim = start_worker(queues=INFERENCE_CPU, name="victim", **VICTIM_ENV)
    logs = [victim]
    kills = {"child": 0, "worker": 0}
    killed: set[str] = set()
    armed: set[str] = set()
    deadline = time.monotonic() + 330
    while True:
        found = rows(list(expected))
        done = all(status in TERMINAL for status, _, _ in found.values())
        if done and sum(kills.values()) >= wanted_kills:
            break
        if done:  # a run slipped past the detector: give it more jobs to kill
            for body, verdict in bodies(model_dirs, 2):
                expected[submit(client, body)] = verdict
            continue
        assert time.monotonic() < deadline, (kills, found)
        for job_id, (status, stage, progress) in found.items():
            if status != "running" or stage != "inference":
                continue
            if progress == 0:
                armed.add(job_id)  # this run started over: the next progress is this run's
            elif job_id in armed and job_id not in killed and progress >= 2:
                if sum(kills.values()) % 3 != 2:  # two pool-child kills, then a whole worker
                    victim.kill_child()
                    kills["child"] += 1
                else:
                    victim.kill()
                    kills["worker"] += 1
                    time.sleep(_unacked_oldest_needed(farm_env["REDIS_URL"]))
                    victim = start_worker(queues=INFERENCE_CPU, name="victim", **VICTIM_ENV)
                    logs.append(victim)
                killed.add(job_id)
                armed.clear()
                break
        time.sleep(0.05)
    check_outcomes(client, expected, stable)
    assert victim.alive()
    runs = sum(
        len(re.findall(r"run_inference\[[^\]]+\] received", w.log_tail(10_000_000))) for w in logs
    )
    FIGURES["sigkill"] = {
        "jobs": len(expected),
        "kills": kills,
        "worker_restarts": kills["worker"],
        "child_respawns": kills["child"],
        "inference_deliveries": runs,
        "outcome": "every job succeeded once with the expected verdict, 5 distinct votes each",
        "wall_s": round(time.monotonic() - started, 1),
    }
    assert sum(kills.values()) >= wanted_kills
    assert runs >= len(expected) + sum(kills.values())  # each kill cost one more delivery
    victim.stop()


def test_redis_crash_and_restart_loses_no_job(
    client: Any,
    start_worker: Any,
    stable: Any,
    model_dirs: dict[str, Path],
    services: dict[str, Any],
) -> None:
    started = time.monotonic()
    victim = start_worker(queues=INFERENCE_CPU, name="victim-redis", **VICTIM_ENV)
    expected = {submit(client, body): verdict for body, verdict in bodies(model_dirs, 6)}
    wait_mid_inference(list(expected))
    services["redis"].restart(down_for=2.0)
    check_outcomes(client, expected, stable, timeout=150)
    assert victim.alive() and stable.alive()
    FIGURES["redis_restart"] = {
        "jobs": len(expected),
        "restarts": services["redis"].restarts,
        "down_s": 2.0,
        "outcome": "no job lost: all succeeded with the expected verdict",
        "wall_s": round(time.monotonic() - started, 1),
    }
    victim.stop()


def test_postgres_outage_503_then_jobs_finish(
    client: Any,
    start_worker: Any,
    stable: Any,
    model_dirs: dict[str, Path],
    services: dict[str, Any],
) -> None:
    started = time.monotonic()
    victim = start_worker(queues=INFERENCE_CPU, name="victim-pg", **VICTIM_ENV)
    jobs_and_verdicts = bodies(model_dirs, 4)
    expected = {submit(client, body): verdict for body, verdict in jobs_and_verdicts}
    job_id = wait_mid_inference(list(expected))
    services["proxy"].stop()
    try:
        resp = client.post("/v1/jobs", json=jobs_and_verdicts[0][0])
        assert resp.status_code == 503, resp.get_data(as_text=True)
        assert resp.get_json()["error"]["code"] == "database_unavailable"
        assert resp.headers["Retry-After"]
        resp = client.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 503 and resp.is_json
        time.sleep(6.0)  # the workers hit the outage and back off
    finally:
        services["proxy"].start()
    check_outcomes(client, expected, stable)
    retries = sum(w.log_tail(10_000_000).count("Retry in") for w in (victim, stable))
    assert retries >= 1, "no task retried while PostgreSQL was unreachable"
    FIGURES["postgres_outage"] = {
        "jobs": len(expected),
        "down_s": 6.0,
        "task_retries": retries,
        "outcome": "POST/GET answered 503 JSON; all jobs succeeded after the database returned",
        "wall_s": round(time.monotonic() - started, 1),
    }
    victim.stop()
