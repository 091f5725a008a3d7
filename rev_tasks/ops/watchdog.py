"""The watchdog: the database says which jobs are active; this finds those whose work is gone.

A job's work lives in a broker message (queued, prepared, consensus waiting for a free
validator) or in a worker that heartbeats (inference, consensus). Both can vanish: a broker
that restarts without persistence comes back with empty queues, and a worker killed as a
whole (node loss, SIGKILL of its process group) leaves its message unacked in Redis until the
visibility timeout (hours) and stops heartbeating. The watchdog does not wait for either:

* a **queued or prepared** job whose row has not changed for ``REV_WATCHDOG_GRACE_SECONDS``
  and that no message waiting in a queue names (nor a delivery younger than the grace);
* a **running** job (inference or consensus) whose heartbeat is older than
  ``REV_WATCHDOG_STALE_SECONDS`` and that no waiting message names

is *lost*. It is resumed from its stored state (:func:`rev_tasks.jobs.resume`: back to
queued or prepared, or its validators' chord sent again) and counted in ``jobs.resumes``;
once it has been resumed ``REV_WATCHDOG_MAX_RESUMES`` times it fails with ``lost``
instead. A duplicate that the resume creates (the old message restored later, the killed
worker's delivery back after the visibility timeout) is harmless: every step is a
compare-and-set on the job row, and votes are unique per (job, validator).

This module holds the decision and reads the broker; :mod:`rev_tasks.tasks.maintenance` is
the beat task that runs it and sends the messages.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from rev_tasks import jobs, queues
from rev_tasks.db.session import after_commit
from rev_tasks.db.tables import utcnow
from rev_tasks.settings import Settings

log = logging.getLogger(__name__)

#: The code of a job failed because its work was lost once too often.
LOST = "lost"


class BrokerUnreadable(Exception):
    """The broker could not be read: the watchdog decides nothing this round."""


@dataclass(frozen=True)
class Thresholds:
    """How long silence must last before a job counts as lost, and how often to resume."""

    grace_seconds: float
    stale_seconds: float
    max_resumes: int

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        # A heartbeat missed once (a slow write, a GC pause) is no loss: at least three.
        stale = max(settings.watchdog_stale_seconds, 3 * settings.heartbeat_seconds)
        return cls(settings.watchdog_grace_seconds, stale, settings.watchdog_max_resumes)


@dataclass(frozen=True)
class Action:
    """What the watchdog did to one job: ``resumed`` (with the transition) or ``failed``;
    ``resumes``: the job's count of resumes after this action."""

    job_id: str
    state: str
    action: str
    transition: str | None
    resumes: int


def _queue_keys(name: str) -> list[str]:
    """The Redis keys of one queue: the list and its priority lists (kombu's naming)."""
    return [name] + [f"{name}\x06\x16{p}" for p in (3, 6, 9)]


def _named(raw: bytes | str) -> set[str]:
    """Every string a kombu message names: its task id and its positional arguments."""
    try:
        msg = json.loads(raw)
    except ValueError:
        return set()
    if isinstance(msg, list) and msg:  # an unacked entry: [message, exchange, routing_key]
        msg = msg[0]
    if not isinstance(msg, dict):
        return set()
    headers = msg.get("headers") or {}
    names = {str(headers.get("id", ""))}
    try:
        body: Any = msg.get("body", "")
        if (msg.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, TypeError, IndexError, KeyError):
        args = []
    names.update(a for a in args if isinstance(a, str))
    # A task id derived from the job (``prepare-<job>``, ``inference-<job>``) names it too.
    names.update(n.split("-", 1)[1] for n in list(names) if n.startswith(_DERIVED))
    return names


_DERIVED = (queues.prepare_task_id(""), queues.inference_task_id(""))


def broker_names(redis_url: str, queue_names: Iterable[str], young_seconds: float) -> set[str]:
    """Strings named by messages that still carry work: waiting in a queue, or delivered
    less than ``young_seconds`` ago (a worker is about to move the job).

    A delivery older than that (an unacked message of a worker that may be dead) does not
    count: a live worker's job heartbeats, and that is what decides for running jobs.
    Raises :class:`BrokerUnreadable` when Redis cannot be read.
    """
    import redis

    try:
        r = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        names: set[str] = set()
        for q in queue_names:
            for key in _queue_keys(q):
                for raw in r.lrange(key, 0, -1):
                    names |= _named(raw)
        since = time.time() - young_seconds
        for tag in r.zrangebyscore("unacked_index", since, "+inf"):
            raw = r.hget("unacked", tag)
            if raw is not None:
                names |= _named(raw)
    except redis.RedisError as exc:
        raise BrokerUnreadable(f"{type(exc).__name__}: {exc}") from exc
    return names


def sweep(
    session: Session,
    in_broker: set[str],
    thresholds: Thresholds,
    dispatch: Callable[[str, str, jobs.Transition], None],
) -> list[Action]:
    """Resume or fail every lost job; ``dispatch(job_id, queue, transition)`` after commit.

    Candidates are locked (``FOR UPDATE SKIP LOCKED`` on PostgreSQL): a row a task holds is
    being worked on and is left for the next round. Each resume is a compare-and-set, so a
    job that a late delivery moved meanwhile is left alone too.
    """
    now = utcnow()
    candidates = jobs.silent(
        session,
        queued_before=now - timedelta(seconds=thresholds.grace_seconds),
        working_before=now - timedelta(seconds=thresholds.stale_seconds),
        lock=True,
    )
    actions: list[Action] = []
    for job in candidates:
        if job.id in in_broker:
            continue
        state = jobs.State.of(job).name.lower()
        if (job.resumes or 0) >= thresholds.max_resumes:
            message = (
                f"the job's work was lost {job.resumes + 1} times (broker restarted without "
                f"its messages, or its worker died); resumed {job.resumes} times, not again"
            )
            if jobs.fail(session, job.id, LOST, message, state=state, resumes=job.resumes):
                actions.append(Action(job.id, state, "failed", None, job.resumes))
            continue
        try:
            transition = jobs.resume(session, job)
        except jobs.IllegalTransition:
            continue
        after_commit(session, _bound(dispatch, job.id, job.queue, transition))
        actions.append(Action(job.id, state, "resumed", transition.name, job.resumes))
    for a in actions:
        if a.transition is not None:
            log.warning(
                "watchdog: job %s (%s) resumed by %s (resume %d of %d)",
                a.job_id,
                a.state,
                a.transition,
                a.resumes,
                thresholds.max_resumes,
            )
        else:
            log.warning(
                "watchdog: job %s (%s) failed as lost after %d resume(s)",
                a.job_id,
                a.state,
                a.resumes,
            )
    return actions


def _bound(
    dispatch: Callable[[str, str, jobs.Transition], None],
    job_id: str,
    queue: str,
    transition: jobs.Transition,
) -> Callable[[], None]:
    def send() -> None:
        # One job's failed send (the broker went away again) must not keep the others'
        # messages from going out; that job is resumed again by a later round.
        try:
            dispatch(job_id, queue, transition)
        except Exception:  # noqa: BLE001
            log.exception("watchdog: job %s resumed but its message could not be sent", job_id)

    return send
