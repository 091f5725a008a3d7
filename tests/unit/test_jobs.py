"""rev_tasks.jobs: every allowed transition works, every other one is refused, on a real
database (SQLite files; the integration tests run the same code on PostgreSQL)."""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from rev_tasks import jobs
from rev_tasks.db.session import make_engine
from rev_tasks.db.tables import Base, Job, Transcript
from rev_tasks.jobs import FAIL, TRANSITIONS, IllegalTransition, State

ROOT = Path(__file__).resolve().parents[2]
PAIRS = list(itertools.product(TRANSITIONS, State))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[object]:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: object) -> Iterator[Session]:
    with Session(engine) as s:  # type: ignore[arg-type]
        yield s


def _job_in(session: Session, state: State, job_id: str = "job-1") -> Job:
    """A committed job row put straight into ``state`` (test setup, not a transition)."""
    session.add(
        jobs.new_job(
            id=job_id,
            tenant="t",
            kind="verify",
            request={"max_challenges": 8},
            device="cpu",
            queue="q",
            candidate_path="/models/c",
            challenges_max=8,
        )
    )
    session.flush()
    session.execute(
        update(Job).where(Job.id == job_id).values(status=state.status, stage=state.stage)
    )
    session.commit()
    job = session.get(Job, job_id)
    assert job is not None
    session.refresh(job)
    return job


def _state_in_db(engine: object, job_id: str = "job-1") -> State:
    with Session(engine) as other:  # type: ignore[arg-type]
        job = other.get(Job, job_id)
        assert job is not None
        return State.of(job)


def test_statuses_and_stages_come_from_the_states() -> None:
    assert jobs.STATUSES == ("queued", "running", "succeeded", "failed", "cancelled")
    assert jobs.STAGES == ("queued", "prepared", "inference", "consensus", "done")
    assert {"succeeded", "failed", "cancelled"} == jobs.TERMINAL
    assert {"queued", "running"} == jobs.ACTIVE
    assert {s.status for s in State} == set(jobs.STATUSES)


def test_every_state_is_reachable_and_every_active_state_can_finish() -> None:
    edges = {(s, t.target) for t in TRANSITIONS for s in t.sources}
    reachable, frontier = {State.QUEUED}, [State.QUEUED]
    while frontier:
        here = frontier.pop()
        for source, target in edges:
            if source == here and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(State)
    assert all((s, State.FAILED) in edges for s in jobs.ACTIVE_STATES)
    assert all((s, State.CANCELLED) in edges for s in jobs.ACTIVE_STATES)
    assert not [e for e in edges if e[0] in jobs.TERMINAL_STATES]  # nothing leaves the end


@pytest.mark.parametrize(
    ("transition", "state"), PAIRS, ids=[f"{t.name}-from-{s.name}" for t, s in PAIRS]
)
def test_each_transition_from_each_state(
    engine: object, session: Session, transition: jobs.Transition, state: State
) -> None:
    job = _job_in(session, state)
    if state in transition.sources:
        jobs.apply(session, job, transition)
        assert State.of(job) == transition.target  # the loaded object follows the row
        session.commit()
        assert _state_in_db(engine) == transition.target
        assert (job.finished_at is not None) == (transition.target in jobs.TERMINAL_STATES)
    else:
        with pytest.raises(IllegalTransition, match=transition.name):
            jobs.apply(session, job, transition)
        session.rollback()
        assert _state_in_db(engine) == state


@pytest.mark.parametrize("state", list(State), ids=[s.name for s in State])
def test_fail_fails_any_active_job_once_and_never_a_finished_one(
    engine: object, session: Session, state: State
) -> None:
    _job_in(session, state)
    failed = jobs.fail(session, "job-1", "boom", "it broke", where="test")
    session.commit()
    assert failed == (state in FAIL.sources)
    assert _state_in_db(engine) == (State.FAILED if failed else state)
    assert jobs.fail(session, "job-1", "boom", "again") is False
    with Session(engine) as other:  # type: ignore[arg-type]
        job = other.get(Job, "job-1")
        assert job is not None
        if failed:
            assert job.error == {
                "code": "boom",
                "message": "it broke",
                "details": {"where": "test"},
            }
            assert job.finished_at is not None


def test_a_row_that_moved_since_it_was_read_is_not_overwritten(
    engine: object, session: Session
) -> None:
    job = _job_in(session, State.INFERENCE)
    with Session(engine) as other:  # type: ignore[arg-type]
        assert jobs.fail(other, "job-1", "stale", "reaped")  # another process finishes it
        other.commit()
    with pytest.raises(IllegalTransition, match="changed under it"):
        jobs.apply(session, job, jobs.DECIDE)  # ``job`` still says INFERENCE
    session.rollback()
    assert _state_in_db(engine) == State.FAILED


def test_a_pair_that_is_no_state_is_an_error(session: Session) -> None:
    job = _job_in(session, State.QUEUED)
    job.stage = "consensus"  # (queued, consensus): no such state
    with pytest.raises(jobs.UnknownState):
        State.of(job)
    with pytest.raises(jobs.LifecycleError):
        jobs.apply(session, job, jobs.START)


def test_progress_is_recorded_only_while_the_inference_runs(
    engine: object, session: Session
) -> None:
    for index, state in enumerate(State):
        job_id = f"job-{index}"
        _job_in(session, state, job_id)
        jobs.record_progress(session, job_id, 3, 8)
        session.commit()
        with Session(engine) as other:  # type: ignore[arg-type]
            row = other.get(Job, job_id)
            assert row is not None
            assert row.challenges_done == (3 if state == State.INFERENCE else 0), state


def test_a_verify_job_from_submit_to_published(engine: object, session: Session) -> None:
    job = _job_in(session, State.QUEUED)
    jobs.mark_prepared(session, job, "key-1", "ab" * 32, 6)
    assert (job.key_id, job.commitment, job.challenges_max) == ("key-1", "ab" * 32, 6)
    jobs.mark_prepared(session, job, "key-1")  # a redelivered prepare keeps the commitment
    assert job.commitment == "ab" * 32
    spec = jobs.mark_running(session, job, new_attempt=True)
    assert spec.attempts == 1 and spec.commitment == "ab" * 32 and job.started_at is not None
    spec = jobs.mark_running(session, job, new_attempt=False)  # Celery's retry: same attempt
    assert spec.attempts == 1
    session.commit()
    result = {"verdict": "SAME", "transcript_root": "cd" * 32, "challenges_used": 4}
    assert jobs.record_decision(session, "job-1", result, {"records": []})
    session.commit()
    assert _state_in_db(engine) == State.CONSENSUS
    assert not jobs.record_decision(session, "job-1", result, {"records": []})  # a late copy
    assert session.get(Transcript, "job-1") is not None
    jobs.record_consensus_dispatched(session, "job-1")
    job = jobs.load(session, "job-1")
    assert job is not None and job.consensus_dispatched_at is not None
    assert job.challenges_done == 4 and job.decided_at is not None
    jobs.publish(session, job, {**result, "consensus": {"agreed": True}})
    session.commit()
    assert _state_in_db(engine) == State.SUCCEEDED
    assert job.result is not None and job.result["consensus"] == {"agreed": True}
    assert job.error is None


def test_a_verify_job_the_validators_reject(engine: object, session: Session) -> None:
    job = _job_in(session, State.CONSENSUS)
    jobs.reject(session, job, {"verdict": None}, "no_consensus", "only 3 of 5 agree")
    session.commit()
    assert _state_in_db(engine) == State.FAILED
    assert job.error == {"code": "no_consensus", "message": "only 3 of 5 agree"}


def test_an_identify_job_succeeds_with_its_ranking(engine: object, session: Session) -> None:
    _job_in(session, State.INFERENCE)
    assert jobs.record_identification(session, "job-1", {"best": "m"}, 5)
    session.commit()
    assert _state_in_db(engine) == State.SUCCEEDED
    assert not jobs.record_identification(session, "job-1", {"best": "other"}, 5)
    job = session.get(Job, "job-1")
    assert job is not None and job.result == {"best": "m"} and job.challenges_done == 5


def test_silent_jobs_are_queued_without_change_or_running_without_heartbeat(
    engine: object, session: Session
) -> None:
    from datetime import timedelta

    from rev_tasks.db.tables import utcnow

    old, now = utcnow() - timedelta(minutes=10), utcnow()
    for state in State:
        _job_in(session, state, f"old-{state.name}")
        _job_in(session, state, f"new-{state.name}")
    session.execute(update(Job).where(Job.id.like("old-%")).values(updated_at=old))
    # A running job that heartbeats is not silent, however old its last change.
    _job_in(session, State.INFERENCE, "beating")
    session.execute(update(Job).where(Job.id == "beating").values(updated_at=old, heartbeat_at=now))
    _job_in(session, State.CONSENSUS, "beat-stopped")
    session.execute(update(Job).where(Job.id == "beat-stopped").values(heartbeat_at=old))
    session.commit()
    cutoff = utcnow() - timedelta(minutes=1)
    found = {j.id for j in jobs.silent(session, cutoff, cutoff)}
    assert found == {f"old-{s.name}" for s in jobs.ACTIVE_STATES} | {"beat-stopped"}


@pytest.mark.parametrize("state", list(State), ids=[s.name for s in State])
def test_resume_sends_an_active_job_back_and_counts_it(
    engine: object, session: Session, state: State
) -> None:
    job = _job_in(session, state)
    session.execute(update(Job).values(consensus_dispatched_at=jobs.utcnow()))
    session.commit()
    session.refresh(job)
    if state not in jobs.ACTIVE_STATES:  # a cancelled (or finished) job is never resumed
        with pytest.raises(IllegalTransition):
            jobs.resume(session, job)
        session.rollback()
        assert _state_in_db(engine) == state
        return
    transition = jobs.resume(session, job)
    session.commit()
    expected = {
        State.QUEUED: (jobs.RESUME_PREPARE, State.QUEUED),
        State.PREPARED: (jobs.RESUME_INFERENCE, State.PREPARED),
        State.INFERENCE: (jobs.RESUME_INFERENCE, State.PREPARED),
        State.CONSENSUS: (jobs.RESUME_CONSENSUS, State.CONSENSUS),
    }[state]
    assert (transition, _state_in_db(engine)) == expected
    assert job.resumes == 1 and job.heartbeat_at is not None
    # The chord is sent again: a redelivered inference must not think it was sent.
    assert (job.consensus_dispatched_at is None) == (state == State.CONSENSUS)
    jobs.resume(session, job)
    assert job.resumes == 2


def test_a_resume_loses_to_a_delivery_that_moved_the_job(engine: object, session: Session) -> None:
    job = _job_in(session, State.INFERENCE)
    with Session(engine) as other:  # type: ignore[arg-type]
        assert jobs.cancel(other, jobs.load(other, "job-1"))  # type: ignore[arg-type]
        other.commit()
    with pytest.raises(IllegalTransition, match="changed under it"):
        jobs.resume(session, job)  # ``job`` still says INFERENCE: the cancel wins
    session.rollback()
    assert _state_in_db(engine) == State.CANCELLED


def test_an_overtaken_delivery_stops_at_its_next_progress_write(
    engine: object, session: Session
) -> None:
    """After a resume, the old delivery (attempt 1) and the new one (attempt 2) may both run:
    the row's attempt decides which one goes on."""
    job = _job_in(session, State.PREPARED)
    first = jobs.mark_running(session, job, new_attempt=True)
    session.commit()
    assert jobs.record_progress(session, "job-1", 2, 8, first.attempts)
    assert jobs.heartbeat(session, "job-1", first.attempts)
    jobs.resume(session, job)
    assert not jobs.heartbeat(session, "job-1")  # prepared again: nobody works on it
    second = jobs.mark_running(session, job, new_attempt=True)
    session.commit()
    assert (first.attempts, second.attempts, second.resumes) == (1, 2, 1)
    assert not jobs.record_progress(session, "job-1", 4, 8, first.attempts)
    assert not jobs.heartbeat(session, "job-1", first.attempts)
    assert jobs.record_progress(session, "job-1", 2, 8, second.attempts)
    session.commit()
    row = session.get(Job, "job-1")
    assert row is not None and row.challenges_done == 2


def test_no_other_module_writes_a_job_status_or_stage() -> None:
    """Status and stage change only through rev_tasks.jobs (``stage`` is a job column only)."""
    found = []
    for path in sorted([*(ROOT / "rev_tasks").rglob("*.py"), *(ROOT / "web").rglob("*.py")]):
        if path == ROOT / "rev_tasks" / "jobs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            names = [t.attr for t in targets if isinstance(t, ast.Attribute)]
            names += [
                e.attr
                for t in targets
                if isinstance(t, ast.Tuple)
                for e in t.elts
                if isinstance(e, ast.Attribute)
            ]
            if isinstance(node, ast.Call):  # Job(stage=...), update(Job).values(stage=...)
                keywords = {kw.arg for kw in node.keywords}
                if "stage" in keywords or (_called(node) == "Job" and "status" in keywords):
                    names.append("stage")
            if "stage" in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def _called(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


# ----------------------------------------------------------------------------- cancel
@pytest.mark.parametrize("state", list(State), ids=[s.name for s in State])
def test_cancel_stops_any_active_job_once(engine: object, session: Session, state: State) -> None:
    job = _job_in(session, state)
    if state in jobs.ACTIVE_STATES:
        assert jobs.cancel(session, job) is True
        session.commit()
        assert _state_in_db(engine) == State.CANCELLED
        assert job.result is None and job.finished_at is not None
        assert jobs.cancel(session, job) is False  # again: nothing to do, no error
    elif state == State.CANCELLED:
        assert jobs.cancel(session, job) is False
    else:  # succeeded or failed: a finished job is not cancelled after the fact
        with pytest.raises(IllegalTransition, match="cancel"):
            jobs.cancel(session, job)
        session.rollback()
        assert _state_in_db(engine) == state


def test_a_cancelled_inference_sees_it_at_its_next_progress_write(
    engine: object, session: Session
) -> None:
    _job_in(session, State.INFERENCE)
    assert jobs.record_progress(session, "job-1", 2, 8) is True
    session.commit()
    with Session(engine) as other:  # type: ignore[arg-type]
        job = jobs.load(other, "job-1")
        assert job is not None and jobs.cancel(other, job)
        other.commit()
    assert jobs.record_progress(session, "job-1", 4, 8) is False
    session.commit()
    with Session(engine) as other:  # type: ignore[arg-type]
        row = other.get(Job, "job-1")
        assert row is not None and row.challenges_done == 2  # frozen where it was cancelled


# ----------------------------------------------------------------------------- counting
def _finished(kind: str, status: str, verdict: str = "none") -> float:
    from prometheus_client import REGISTRY

    labels = {"kind": kind, "status": status, "verdict": verdict}
    return REGISTRY.get_sample_value("rev_jobs_finished_total", labels) or 0.0


def test_every_finished_job_is_counted_once_when_its_move_commits(
    engine: object, session: Session
) -> None:
    """Whoever finishes a job (a task, the watchdog, the coordinator) counts it, here."""
    before = {
        "failed": _finished("verify", "failed"),
        "cancelled": _finished("verify", "cancelled"),
        "same": _finished("verify", "succeeded", "SAME"),
        "identified": _finished("identify", "succeeded", "DIFFERENT"),
    }
    _job_in(session, State.INFERENCE, "reaped")
    assert jobs.fail(session, "reaped", "lost", "its work was lost")
    assert _finished("verify", "failed") == before["failed"]  # not before the commit
    session.commit()
    assert _finished("verify", "failed") == before["failed"] + 1
    assert jobs.fail(session, "reaped", "stale", "again") is False
    session.commit()
    assert _finished("verify", "failed") == before["failed"] + 1  # a lost race counts nothing

    job = _job_in(session, State.QUEUED, "cancelled")
    jobs.cancel(session, job)
    session.rollback()  # a cancel that did not commit is no cancel
    assert _finished("verify", "cancelled") == before["cancelled"]
    job = jobs.load(session, "cancelled")
    assert job is not None
    jobs.cancel(session, job)
    session.commit()
    assert _finished("verify", "cancelled") == before["cancelled"] + 1

    job = _job_in(session, State.CONSENSUS, "published")
    jobs.publish(session, job, {"verdict": "SAME"})
    session.commit()
    assert _finished("verify", "succeeded", "SAME") == before["same"] + 1

    _job_in(session, State.INFERENCE, "identified")
    session.execute(update(Job).where(Job.id == "identified").values(kind="identify"))
    session.commit()
    assert jobs.record_identification(session, "identified", {"verdict": "DIFFERENT"}, 4)
    session.commit()
    assert _finished("identify", "succeeded", "DIFFERENT") == before["identified"] + 1
