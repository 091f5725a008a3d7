"""The job lifecycle: a job's states, the moves between them, and the functions that make them.

A job's state is its (status, stage) pair: the API shows ``status``; ``stage`` says where in
the pipeline a job is. The states and the allowed transitions are data (:class:`State`,
:data:`TRANSITIONS`), and every write of a job's status or stage goes through this module,
from the coordinator (:func:`new_job`, :func:`fail` when the broker refuses the job,
:func:`cancel`) and from the tasks (prepare → start → decide → publish or reject; identify;
fail; the watchdog's resume and its ``lost`` failure). Each move into a terminal state is counted in ``rev_jobs_finished_total``
when it commits.

A transition is a compare-and-set on the row: it applies only if the row is still in the
state it was read in, so a move that the data does not allow, or one that a concurrent
delivery overtook, raises :class:`IllegalTransition` instead of overwriting the row.
:func:`fail` is the one that is expected to lose races (a redelivered errback, the
watchdog, a late failure of a job another delivery finished): it returns False instead of
raising. The same compare-and-set settles a job that two deliveries run at once after a
resume: progress and heartbeats carry the attempt they belong to, and a delivery whose
attempt is no longer the row's stops at its next batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import event, func, or_, select, tuple_, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from rev_tasks import metrics
from rev_tasks.db import repo
from rev_tasks.db.tables import Job, Transcript, utcnow


# ----------------------------------------------------------------------------- data
class State(Enum):
    """The states a job can be in, each one (status, stage) pair."""

    QUEUED = ("queued", "queued")  # the coordinator stored it and enqueued ``prepare``
    PREPARED = ("queued", "prepared")  # its challenge set is committed; inference is enqueued
    INFERENCE = ("running", "inference")  # a worker runs its batches
    CONSENSUS = ("running", "consensus")  # its transcript is stored; the validators vote
    SUCCEEDED = ("succeeded", "done")
    FAILED = ("failed", "done")
    CANCELLED = ("cancelled", "done")  # its owner cancelled it; it has no verdict

    @property
    def status(self) -> str:
        return self.value[0]

    @property
    def stage(self) -> str:
        return self.value[1]

    @classmethod
    def of(cls, job: Job) -> State:
        """The state of a job row (:class:`UnknownState` for a pair no state has)."""
        try:
            return cls((job.status, job.stage))
        except ValueError:
            raise UnknownState(job.id, job.status, job.stage) from None


QUEUED, RUNNING = State.QUEUED.status, State.INFERENCE.status
SUCCEEDED, FAILED = State.SUCCEEDED.status, State.FAILED.status
CANCELLED = State.CANCELLED.status
#: Every status a job can have, as the API shows it.
STATUSES = tuple(dict.fromkeys(s.status for s in State))
#: Where in the pipeline a job is (``done`` once it is finished, whichever way).
STAGES = tuple(dict.fromkeys(s.stage for s in State))
#: States a job never leaves: every state whose stage is ``done``.
TERMINAL_STATES = frozenset(s for s in State if s.stage == "done")
#: States of a job that is not finished yet.
ACTIVE_STATES = frozenset(State) - TERMINAL_STATES
#: Statuses of finished jobs (what queries and clients compare with).
TERMINAL = frozenset(s.status for s in TERMINAL_STATES)
#: Statuses of jobs that are not finished.
ACTIVE = frozenset(s.status for s in ACTIVE_STATES)


@dataclass(frozen=True)
class Transition:
    """One allowed move: from any of ``sources`` to ``target``."""

    name: str
    sources: frozenset[State]
    target: State


#: A redelivered ``prepare`` prepares again (same commitment): PREPARED → PREPARED.
PREPARE = Transition("prepare", frozenset({State.QUEUED, State.PREPARED}), State.PREPARED)
#: Inference may begin before ``prepare`` ran (a duplicate message) and begins again on a
#: redelivery (a killed worker): INFERENCE → INFERENCE starts over.
START = Transition(
    "start", frozenset({State.QUEUED, State.PREPARED, State.INFERENCE}), State.INFERENCE
)
DECIDE = Transition("decide", frozenset({State.INFERENCE}), State.CONSENSUS)
IDENTIFY = Transition("identify", frozenset({State.INFERENCE}), State.SUCCEEDED)
PUBLISH = Transition("publish", frozenset({State.CONSENSUS}), State.SUCCEEDED)
REJECT = Transition("reject", frozenset({State.CONSENSUS}), State.FAILED)
FAIL = Transition("fail", ACTIVE_STATES, State.FAILED)
#: Cancelling stops a job wherever it is; the tasks still queued for it find it finished.
CANCEL = Transition("cancel", ACTIVE_STATES, State.CANCELLED)
# The watchdog's moves: a job whose work is no longer anywhere (its message lost with the
# broker, its worker killed) goes back to the state its stored data can be sent again from.
# Never from a finished state: a cancelled job is not resumed.
#: The ``prepare`` message was lost: send it again.
RESUME_PREPARE = Transition("resume_prepare", frozenset({State.QUEUED}), State.QUEUED)
#: The inference message or its worker was lost: the job waits for a new delivery.
RESUME_INFERENCE = Transition(
    "resume_inference", frozenset({State.PREPARED, State.INFERENCE}), State.PREPARED
)
#: The validators' chord was lost (its messages or its counter): send it again.
RESUME_CONSENSUS = Transition("resume_consensus", frozenset({State.CONSENSUS}), State.CONSENSUS)
RESUMES: tuple[Transition, ...] = (RESUME_PREPARE, RESUME_INFERENCE, RESUME_CONSENSUS)
TRANSITIONS: tuple[Transition, ...] = (
    PREPARE,
    START,
    DECIDE,
    IDENTIFY,
    PUBLISH,
    REJECT,
    FAIL,
    CANCEL,
    *RESUMES,
)
#: States in which a worker is working on the job and heartbeats.
WORKING_STATES = frozenset({State.INFERENCE, State.CONSENSUS})


class LifecycleError(Exception):
    """A job's state does not permit what was asked."""


class UnknownState(LifecycleError):
    """A row whose (status, stage) pair is none of the states (written by something else)."""

    def __init__(self, job_id: str, status: str, stage: str) -> None:
        super().__init__(f"job {job_id}: ({status!r}, {stage!r}) is not a job state")
        self.job_id = job_id


class IllegalTransition(LifecycleError):
    """The transition is not allowed from the job's state (or the row moved meanwhile)."""

    def __init__(self, job_id: str, state: State, transition: Transition, moved: bool = False):
        why = "the row changed under it" if moved else f"not allowed from {state.name}"
        super().__init__(f"job {job_id}: {transition.name} → {transition.target.name} {why}")
        self.job_id = job_id
        self.state = state
        self.transition = transition


@dataclass(frozen=True)
class JobSpec:
    """What the inference step needs from the job row, read in one short session."""

    id: str
    tenant: str
    kind: str
    request: dict[str, Any]
    reference_model_id: str | None
    reference_path: str | None
    candidate_path: str
    commitment: str | None
    attempts: int
    challenge_nonce: str | None = None
    challenge_indices: list[int] | None = None
    resumes: int = 0


def endpoint_of(request: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``candidate.endpoint`` of an endpoint job's request; None for a model job."""
    candidate = (request or {}).get("candidate")
    endpoint = candidate.get("endpoint") if isinstance(candidate, dict) else None
    return endpoint if isinstance(endpoint, dict) else None


# ----------------------------------------------------------------------------- moves
def _states(states: Iterable[State]) -> Any:
    """A WHERE clause: the row is in one of ``states``."""
    return tuple_(Job.status, Job.stage).in_([s.value for s in states])


def _compare_and_set(
    session: Session, job_id: str, expected: Any, target: State, values: dict[str, Any]
) -> dict[str, Any] | None:
    """UPDATE the row to ``target`` with ``values`` if it matches ``expected``.

    Returns every column written, or None when the row did not match.
    """
    now = utcnow()
    values = {"status": target.status, "stage": target.stage, "updated_at": now, **values}
    terminal = target in TERMINAL_STATES
    if terminal:
        values.setdefault("finished_at", now)
    stmt = (
        update(Job)
        .where(Job.id == job_id, expected)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not terminal:
        return values if session.execute(stmt).rowcount else None
    kind = session.execute(stmt.returning(Job.kind)).scalar()
    if kind is None:
        return None
    _count_when_committed(session, kind, target, values)
    return values


# ----------------------------------------------------------------------------- counting
_FINISHED = "rev_finished_jobs"


def _count_when_committed(session: Session, kind: str, target: State, values: Any) -> None:
    """Count a job in ``rev_jobs_finished_total`` once the move that finished it commits.

    Every move into a terminal state comes through :func:`_compare_and_set`, whoever makes
    it (a task, the watchdog, the coordinator when the broker refuses a job, a cancel), so
    this is the one place a finished job is counted. A rolled-back move counts nothing.
    """
    verdict = (values.get("result") or {}).get("verdict")
    session.info.setdefault(_FINISHED, []).append((kind, target.status, verdict))


@event.listens_for(Session, "after_commit")
def _count_finished(session: Session) -> None:
    for kind, status, verdict in session.info.pop(_FINISHED, ()):
        metrics.job_finished(kind, status, verdict)  # never raises: metrics cannot fail a task


@event.listens_for(Session, "after_rollback")
def _forget_finished(session: Session) -> None:
    session.info.pop(_FINISHED, None)


def allows(job: Job, transition: Transition) -> bool:
    """Whether ``transition`` may be applied to ``job`` in its current state."""
    return State.of(job) in transition.sources


def finished(job: Job) -> bool:
    """Whether the job is in a terminal state (nothing may move it any more)."""
    return State.of(job) in TERMINAL_STATES


def apply(session: Session, job: Job, transition: Transition, **values: Any) -> None:
    """Move ``job`` by ``transition`` and write ``values`` with it, in one UPDATE.

    Raises :class:`IllegalTransition` when the data does not allow the move from the job's
    state, or when the row is no longer in the state ``job`` was read in.
    """
    state = State.of(job)
    if state not in transition.sources:
        raise IllegalTransition(job.id, state, transition)
    written = _compare_and_set(session, job.id, _states([state]), transition.target, values)
    if written is None:
        raise IllegalTransition(job.id, state, transition, moved=True)
    for column, value in written.items():  # the loaded object says what the row now says
        set_committed_value(job, column, value)


def load(session: Session, job_id: str) -> Job | None:
    """The job row, locked until the session ends (a transition follows)."""
    return session.get(Job, job_id, with_for_update=True)


def new_job(**columns: Any) -> Job:
    """A job row in the first state; the coordinator adds it and enqueues ``prepare``."""
    return Job(status=State.QUEUED.status, stage=State.QUEUED.stage, challenges_done=0, **columns)


def mark_prepared(
    session: Session,
    job: Job,
    key_id: str,
    commitment: str | None = None,
    challenges_max: int | None = None,
    **challenges: Any,
) -> None:
    """The challenge set is committed (a verify job's root; identify jobs have none).

    ``challenges``: how the set was derived (``challenge_nonce`` or ``challenge_indices``).
    """
    values: dict[str, Any] = {"key_id": key_id}
    if commitment is not None:
        values.update(commitment=commitment, challenges_max=challenges_max, **challenges)
    apply(session, job, PREPARE, **values)


def mark_running(session: Session, job: Job, *, new_attempt: bool) -> JobSpec:
    """A delivery starts the inference (again): progress restarts at zero.

    ``new_attempt`` is False for Celery's own retry of the same delivery (a database
    outage), which is not another attempt at the job.
    """
    attempts = (job.attempts or 0) + (1 if new_attempt else 0)
    now = utcnow()
    apply(
        session,
        job,
        START,
        started_at=job.started_at or now,
        challenges_done=0,
        attempts=attempts,
        heartbeat_at=now,
    )
    return JobSpec(
        id=job.id,
        tenant=job.tenant,
        kind=job.kind,
        request=dict(job.request),
        reference_model_id=job.reference_model_id,
        reference_path=job.reference_path,
        candidate_path=job.candidate_path,
        commitment=job.commitment,
        attempts=attempts,
        challenge_nonce=job.challenge_nonce,
        challenge_indices=list(job.challenge_indices) if job.challenge_indices else None,
        resumes=job.resumes or 0,
    )


def record_progress(
    session: Session, job_id: str, done: int, maximum: int, attempt: int | None = None
) -> bool:
    """Challenges done so far, while the inference runs (a no-op in any other state).

    False when the job is no longer in inference (cancelled, failed as lost, resumed, or
    decided by another delivery) or, with ``attempt``, when a later delivery started it
    again: the caller stops its batches, at no cost beyond the write it makes anyway.
    The write is also the job's heartbeat.
    """
    now = utcnow()
    where = [Job.id == job_id, _states([State.INFERENCE])]
    if attempt is not None:
        where.append(Job.attempts == attempt)
    res = session.execute(
        update(Job)
        .where(*where)
        .values(challenges_done=done, challenges_max=maximum, updated_at=now, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(res.rowcount)


def heartbeat(session: Session, job_id: str, attempt: int | None = None) -> bool:
    """The worker running the job is alive: ``heartbeat_at`` = now, in a working state only.

    False when the job left inference and consensus (finished, resumed) or, with
    ``attempt``, when another delivery started its inference since. ``updated_at`` is not
    touched: it still says when the job last changed.
    """
    where = [Job.id == job_id, _states(WORKING_STATES)]
    if attempt is not None:
        where.append(Job.attempts == attempt)
    res = session.execute(
        update(Job)
        .where(*where)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(res.rowcount)


def record_decision(
    session: Session,
    job_id: str,
    result: dict[str, Any],
    transcript: dict[str, Any],
    verdict: str | None = None,
) -> bool:
    """Store the transcript and hand the job to consensus; False when another delivery did.

    Under the row lock: two deliveries of one job can run at once (a redelivery while the
    first still runs), and a late one must neither replace a transcript the validators
    already checked nor reopen a finished job.
    """
    job = load(session, job_id)
    if job is None or finished(job) or session.get(Transcript, job_id) is not None:
        return False
    apply(
        session,
        job,
        DECIDE,
        challenges_done=int(result["challenges_used"]),
        challenges_max=int(result.get("challenges_max", job.challenges_max)),
        decided_at=utcnow(),
        heartbeat_at=utcnow(),
    )
    repo.store_transcript(session, job_id, result, transcript, verdict)
    return True


def record_waiting(session: Session, job: Job, waiting: dict[str, Any]) -> None:
    """An identify job (queued, read with :func:`load`) waits for pending fingerprints.

    Not a transition (the job stays queued); the write also tells the watchdog that the
    job's prepare is alive.
    """
    if State.of(job) not in (State.QUEUED, State.PREPARED):
        raise IllegalTransition(job.id, State.of(job), PREPARE)
    job.waiting = waiting
    job.updated_at = utcnow()


def record_identification(
    session: Session, job_id: str, result: dict[str, Any], challenges_used: int
) -> bool:
    """An identify job's ranking is its result: it succeeds at once (no consensus)."""
    job = load(session, job_id)
    if job is None or finished(job):
        return False
    now = utcnow()
    apply(
        session,
        job,
        IDENTIFY,
        result=result,
        challenges_done=challenges_used,
        decided_at=now,
        finished_at=now,
    )
    return True


def record_consensus_dispatched(session: Session, job_id: str) -> None:
    """The validators' chord was sent (a redelivered inference sends it only if not)."""
    job = session.get(Job, job_id)
    if job is not None and job.consensus_dispatched_at is None:
        job.consensus_dispatched_at = job.heartbeat_at = utcnow()


def publish(session: Session, job: Job, result: dict[str, Any]) -> None:
    """The validators agree with the transcript: the verdict is the job's result."""
    apply(session, job, PUBLISH, result=result, error=None)


def reject(session: Session, job: Job, result: dict[str, Any], code: str, message: str) -> None:
    """The validators did not confirm the transcript: the job fails and publishes no verdict."""
    apply(session, job, REJECT, result=result, error={"code": code, "message": message})


def fail(session: Session, job_id: str, code: str, message: str, **details: Any) -> bool:
    """Fail the job unless it already finished; True when this call failed it."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    # By status, not (status, stage): a row whose pair no state has must still be failable.
    active = Job.status.in_(sorted({s.status for s in FAIL.sources}))
    return _compare_and_set(session, job_id, active, FAIL.target, {"error": error}) is not None


def cancel(session: Session, job: Job) -> bool:
    """Cancel ``job`` (read with :func:`load`); False if it was already cancelled.

    No verdict is kept: a job cancelled during consensus loses the result its tally would
    have published. Raises :class:`IllegalTransition` for a job that finished otherwise.
    """
    if State.of(job) == State.CANCELLED:
        return False
    apply(session, job, CANCEL, result=None)
    return True


def silent(
    session: Session, queued_before: datetime, working_before: datetime, lock: bool = False
) -> list[Job]:
    """Active jobs nothing has been heard of: the watchdog's candidates.

    Queued or prepared jobs whose row has not changed since ``queued_before`` (their
    message should have been taken by now), and running jobs whose last heartbeat (or
    change, before the first heartbeat) is older than ``working_before``. With ``lock``,
    the rows are locked for the caller's transaction, skipping rows another one holds (a
    task that holds a job's row is working on it).
    """
    waiting = [State.QUEUED, State.PREPARED]
    last = func.coalesce(Job.heartbeat_at, Job.updated_at)
    stmt = (
        select(Job)
        .where(
            or_(
                _states(waiting) & (Job.updated_at < queued_before),
                _states(WORKING_STATES) & (last < working_before),
            )
        )
        .order_by(Job.created_at, Job.id)
    )
    if lock:
        stmt = stmt.with_for_update(skip_locked=True)
    return list(session.scalars(stmt))


def resume(session: Session, job: Job) -> Transition:
    """Send ``job`` back to where its stored state can be dispatched again; one more resume.

    Returns the transition made (what to send: ``prepare``, the inference, or the
    validators' chord). Raises :class:`IllegalTransition` for a finished job, or one that
    moved since it was read (a late delivery got to it first: nothing to resume).
    """
    state = State.of(job)
    transition = next((t for t in RESUMES if state in t.sources), None)
    if transition is None:
        raise IllegalTransition(job.id, state, RESUME_PREPARE)
    values: dict[str, Any] = {"resumes": (job.resumes or 0) + 1, "heartbeat_at": utcnow()}
    if transition is RESUME_CONSENSUS:
        values["consensus_dispatched_at"] = None
    apply(session, job, transition, **values)
    return transition
