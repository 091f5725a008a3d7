"""rev_tasks.ops.watchdog: which jobs are lost, what is done to each, on a real SQLite file
and a real Redis (the messages the farm's own Celery app writes)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from rev_tasks import jobs
from rev_tasks.db import session as db
from rev_tasks.db.tables import Base, Job, utcnow
from rev_tasks.jobs import State
from rev_tasks.ops import watchdog
from rev_tasks.queues import INFERENCE_CPU
from rev_tasks.settings import reset_settings

THRESHOLDS = watchdog.Thresholds(grace_seconds=60, stale_seconds=60, max_resumes=3)


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'watchdog.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    reset_settings()
    db.dispose_engine()
    Base.metadata.create_all(db.get_engine())
    yield url
    db.dispose_engine()
    monkeypatch.undo()
    reset_settings()


def _job(job_id: str, state: State, silent_for: float, resumes: int = 0) -> None:
    """A job put straight into ``state``, last changed (and heartbeating) ``silent_for`` ago."""
    then = utcnow() - timedelta(seconds=silent_for)
    with db.session_scope() as s:
        s.add(
            jobs.new_job(
                id=job_id,
                tenant="t",
                kind="verify",
                request={},
                device="cpu",
                queue=INFERENCE_CPU,
                candidate_path="/m",
            )
        )
        s.flush()
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=state.status,
                stage=state.stage,
                updated_at=then,
                heartbeat_at=then if state in jobs.WORKING_STATES else None,
                resumes=resumes,
            )
        )


def _sweep(in_broker: set[str]) -> tuple[list[watchdog.Action], list[tuple[str, str, str]]]:
    sent: list[tuple[str, str, str]] = []
    with db.session_scope() as s:
        actions = watchdog.sweep(
            s, in_broker, THRESHOLDS, lambda j, q, t: sent.append((j, q, t.name))
        )
        assert sent == []  # nothing is sent before the resume commits
    return actions, sent


def _state(job_id: str) -> tuple[State, int, dict | None]:
    with db.session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return State.of(job), job.resumes, job.error


def test_lost_jobs_are_resumed_from_their_state(database: str) -> None:
    for state in jobs.ACTIVE_STATES:
        _job(f"lost-{state.name}", state, silent_for=600)
        _job(f"fresh-{state.name}", state, silent_for=1)
        _job(f"waiting-{state.name}", state, silent_for=600)  # its message is in a queue
    _job("done", State.SUCCEEDED, silent_for=600)
    _job("cancelled", State.CANCELLED, silent_for=600)
    waiting = {f"waiting-{s.name}" for s in jobs.ACTIVE_STATES}
    actions, sent = _sweep(waiting)
    assert sorted(sent) == [
        ("lost-CONSENSUS", INFERENCE_CPU, "resume_consensus"),
        ("lost-INFERENCE", INFERENCE_CPU, "resume_inference"),
        ("lost-PREPARED", INFERENCE_CPU, "resume_inference"),
        ("lost-QUEUED", INFERENCE_CPU, "resume_prepare"),
    ]
    assert {a.action for a in actions} == {"resumed"}
    assert _state("lost-INFERENCE")[:2] == (State.PREPARED, 1)
    assert _state("lost-QUEUED")[:2] == (State.QUEUED, 1)
    for job_id in ("done", "cancelled", *waiting, *(f"fresh-{s.name}" for s in State)):
        if job_id.startswith("fresh-") and State[job_id[6:]] in jobs.TERMINAL_STATES:
            continue
        assert _state(job_id)[1] == 0, job_id
    assert _state("cancelled")[0] == State.CANCELLED
    # Just resumed: a fresh window before the next round looks at them again.
    assert _sweep(waiting) == ([], [])


def test_a_job_that_keeps_losing_its_work_fails_as_lost(database: str) -> None:
    _job("again", State.INFERENCE, silent_for=600, resumes=3)
    actions, sent = _sweep(set())
    assert sent == [] and [(a.action, a.state) for a in actions] == [("failed", "inference")]
    state, resumes, error = _state("again")
    assert (state, resumes) == (State.FAILED, 3)
    assert error is not None and error["code"] == "lost"
    assert error["details"] == {"state": "inference", "resumes": 3}


def test_the_broker_names_the_jobs_of_waiting_messages() -> None:
    """Real messages from the farm's Celery app in a real Redis: queued ones count, and a
    delivery only while it is younger than the grace period."""
    import redis

    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis at {url} is not reachable: {exc}")
        pytest.skip(f"Redis at {url} is not reachable: {exc}")
    from rev_tasks import queues
    from rev_tasks.celery import app
    from rev_tasks.queues import Task

    queue = queues.MAINTENANCE  # nothing consumes it during the unit tests
    r = redis.Redis.from_url(url)
    r.delete(queue)
    # Published to the test's Redis, whatever broker the app was configured with.
    conn = app.connection_for_write(url)
    try:
        app.send_task(
            Task.PREPARE,
            ["job-a"],
            queue=queue,
            task_id=queues.prepare_task_id("job-a"),
            connection=conn,
        )
        app.send_task(Task.VALIDATE, ["job-b", 3], queue=queue, connection=conn)
        names = watchdog.broker_names(url, [queue], young_seconds=60)
        assert {"job-a", "job-b"} <= names and "job-c" not in names
        # A delivery a worker holds (unacked): young, it counts; old, it does not.
        r.delete(queue)
        app.send_task(Task.VALIDATE, ["job-b", 3], queue=queue, connection=conn)
        raw = r.rpop(queue)
        r.hset("unacked", "tag-1", b"[" + raw + b', "", "maintenance"]')
        r.zadd("unacked_index", {"tag-1": 0})  # delivered at the epoch: long ago
        assert "job-b" not in watchdog.broker_names(url, [queue], young_seconds=60)
        r.zadd("unacked_index", {"tag-1": time.time()})
        assert "job-b" in watchdog.broker_names(url, [queue], young_seconds=60)
    finally:
        conn.release()
        r.delete(queue)
        r.hdel("unacked", "tag-1")
        r.zrem("unacked_index", "tag-1")
    with pytest.raises(watchdog.BrokerUnreadable):
        watchdog.broker_names("redis://127.0.0.1:1/0", [queue], young_seconds=60)


def test_a_send_that_fails_does_not_keep_the_others_from_going_out(database: str) -> None:
    _job("first", State.QUEUED, silent_for=600)
    _job("second", State.QUEUED, silent_for=600)
    sent: list[str] = []

    def dispatch(job_id: str, _queue: str, _transition: jobs.Transition) -> None:
        if job_id == "first":
            raise ConnectionError("the broker went away again")
        sent.append(job_id)

    with db.session_scope() as s:
        watchdog.sweep(s, set(), THRESHOLDS, dispatch)
    assert sent == ["second"]
    assert _state("first")[:2] == (State.QUEUED, 1)  # resumed: a later round sends it again
