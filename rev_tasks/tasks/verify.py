"""The job pipeline's first two steps: ``prepare`` (commit challenges) and ``run_inference``.

``prepare`` runs on ``default``: it fixes the challenge commitment before any model sees a
challenge, then hands the job to the device queue chosen at submit time. ``run_inference``
runs the engine's batch loop there (progress written to the database after each batch,
stopping at the decision), stores the transcript and starts the consensus chord. The job's
state moves through :mod:`rev_tasks.jobs`.

Both are safe to run twice: a finished job is left alone, and a decided one only gets its
consensus chord dispatched if that had not happened yet. A database outage is retried with
backoff (``DB_RETRY``), never turned into a failed job. A job that fails is stored as
failed first, then the task raises :class:`JobFailed` so that it ends FAILURE (Flower's
failed tasks). A cancelled job's inference stops at its next batch: the progress write
after each batch finds the row no longer in inference.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from rev_tasks import attest, jobs, metrics
from rev_tasks.celery import app
from rev_tasks.db import repo
from rev_tasks.db.session import after_commit, session_scope
from rev_tasks.db.tables import Fingerprint, Job, Transcript, utcnow
from rev_tasks.queues import Task, inference_task_id
from rev_tasks.settings import get_settings
from rev_tasks.tasks.common import (
    DB_ERRORS,
    DB_RETRY,
    FarmError,
    JobFailed,
    farm_key,
    heartbeat,
    job_dtype,
    load_cached,
    memory_budget,
)
from rev_tasks.testing import faults

log = logging.getLogger(__name__)

# Messages a task sends (the next step, the consensus chord) ride out a broker restart: the
# publish is retried for about a minute before the task gives up. Celery's default (three
# tries within a second) would fail a job whose transcript is already stored.
PUBLISH_RETRY = {"max_retries": 40, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 2}


def _params(request: dict[str, Any]) -> Any:
    from rev_tasks.engine import VerifyParams

    return VerifyParams(
        tolerance=request.get("tolerance", "exact"),
        alpha=float(request.get("alpha", 0.01)),
        max_challenges=int(request.get("max_challenges", 64)),
        batch_size=int(request.get("batch_size") or get_settings().default_batch_size),
    )


def _fail(job_id: str, code: str, message: str) -> str:
    """Store the job's failure, then raise :class:`JobFailed` (the task ends FAILURE).

    Returns instead when the job had already finished (another delivery, a cancel): this
    delivery failed nothing, and its task is no failure.
    """
    with session_scope() as s:
        failed = jobs.fail(s, job_id, code, message)
    if not failed:
        return "already finished"
    log.warning("job %s failed: %s: %s", job_id, code, message)
    raise JobFailed.of(code, message)


class _LeftInference(Exception):
    """The job's row left the inference while its batches ran (cancelled, resumed, lost, decided)."""


@app.task(name=Task.PREPARE, ignore_result=True, throws=(JobFailed,), **DB_RETRY)
def prepare(job_id: str, waiting_since: float | None = None) -> str:
    """Commit the job's challenge set (root stored on the job), then enqueue inference.

    ``waiting_since``: when this job began to wait for its reference's pool top-up (the
    prepare it sends itself while it waits carries it).
    """
    try:
        return _prepare(job_id, waiting_since)
    except FarmError as exc:
        return _fail(job_id, exc.code, exc.message)
    except jobs.IllegalTransition:  # the inference of a duplicate message overtook it
        return "already running"


def _prepare(job_id: str, waiting_since: float | None) -> str:
    from rev_tasks.core.keys import key_id

    key = farm_key()
    with session_scope() as s:
        job = jobs.load(s, job_id)
        if job is None or jobs.finished(job):
            return "skipped"
        if not jobs.allows(job, jobs.PREPARE):  # a redelivered prepare: inference has it
            return "already running"
        since = time.time() if waiting_since is None else waiting_since
        if job.kind == "identify" and _waits_for_fingerprints(s, job, since):
            # Models registered before the job still have their fingerprint pending: the
            # job stays queued and prepare looks again after a countdown (no worker sleeps).
            again = partial(
                prepare.apply_async,
                (job_id, since),
                countdown=get_settings().identify_poll_seconds,
                retry=True,
                retry_policy=PUBLISH_RETRY,
            )
            after_commit(s, again)
            return "waiting for fingerprints"
        challenge_set = _challenge_set(s, job, key, since)
        if challenge_set is _WAIT:
            # The reference's pool cannot serve this job yet: a top-up is on its way, and
            # prepare runs again in a few seconds (the job stays queued meanwhile).
            again = partial(
                prepare.apply_async,
                (job_id, since),
                countdown=POOL_RETRY_S,
                retry=True,
                retry_policy=PUBLISH_RETRY,
            )
            after_commit(s, again)
            return "waiting for the challenge pool"
        assert not isinstance(challenge_set, str)
        jobs.mark_prepared(s, job, key_id(key), **challenge_set)
        # Sent after the commit, so the inference task always sees the commitment.
        step = run_inference if jobs.endpoint_of(job.request) is None else _run_endpoint()
        send = partial(
            step.apply_async,
            (job_id,),
            queue=job.queue,
            task_id=inference_task_id(job_id),
            retry=True,
            retry_policy=PUBLISH_RETRY,
        )
        after_commit(s, send)
    return "prepared"


def _run_endpoint() -> Any:
    """The endpoint jobs' task (rev_tasks/tasks/endpoint.py), imported when first needed."""
    from rev_tasks.tasks.endpoint import run_endpoint

    return run_endpoint


#: Seconds between two prepares of a job that waits for its reference's pool top-up.
POOL_RETRY_S = 3
#: A job that waited this long for a top-up fails with ``challenge_pool_exhausted``.
POOL_WAIT_S = 900
#: A top-up enqueued this long ago and not stored yet is taken as lost and sent again.
TOPUP_RESEND_S = 600
_WAIT = "wait"


def _challenge_set(
    session: Any, job: Job, key: bytes, waiting_since: float
) -> dict[str, Any] | str:
    """The values :func:`jobs.mark_prepared` stores for a verify job's challenge set.

    Two model folders: a fresh secret nonce (32 bytes from :mod:`secrets`) and the
    commitment of its challenges. A registered reference: a random draw from the model's
    pool among the challenges no stored transcript has shown and no other unfinished job
    holds; when fewer are left than the job needs, :data:`_WAIT` (a top-up is enqueued).
    Empty for identify jobs and for a job that already has its commitment.
    """
    from rev_tasks.core.challenges import NONCE_BYTES, commitment, job_challenges
    from rev_tasks.core.keys import key_id

    if job.commitment is not None or job.kind != "verify":
        return {}
    if jobs.endpoint_of(job.request) is not None:  # the farm key's challenges 0..n-1
        from rev_tasks.tasks.endpoint import endpoint_commitment

        return endpoint_commitment(session, job, key)
    budget = int(job.request.get("max_challenges", 64))
    if job.reference_model_id is None:
        nonce = secrets.token_bytes(NONCE_BYTES)
        root = commitment(job_challenges(key, budget, nonce=nonce)).hex()
        return {"commitment": root, "challenges_max": budget, "challenge_nonce": nonce.hex()}
    # Locked: two jobs of one model draw one after the other, never the same challenge.
    fp = session.get(Fingerprint, job.reference_model_id, with_for_update=True)
    if fp is None:
        raise FarmError("model_not_ready", "the reference has no fingerprint")
    if fp.key_id != key_id(key):
        raise FarmError(
            "key_mismatch",
            "the reference fingerprint was made with another farm key; register the model again",
        )
    need = min(budget, get_settings().fingerprint_challenges)
    available = repo.available_indices(session, fp, job.id)
    if len(available) < need:
        _request_topup(session, fp, job.queue)
        if time.time() - waiting_since > POOL_WAIT_S:
            raise FarmError(
                "challenge_pool_exhausted",
                f"the reference's challenge pool had {len(available)} unused challenges, the "
                f"job needs {need}, and no top-up arrived within {POOL_WAIT_S} s",
            )
        log.info("job %s waits for a pool top-up of %s", job.id, fp.model_id)
        return _WAIT
    drawn = random.SystemRandom().sample(available, need)
    if len(available) - need < need:  # the next such job would wait: top up now
        _request_topup(session, fp, job.queue)
    root = commitment(job_challenges(key, need, indices=drawn)).hex()
    return {"commitment": root, "challenges_max": need, "challenge_indices": drawn}


def _waits_for_fingerprints(session: Any, job: Job, since: float) -> bool:
    """Whether an identify job keeps waiting for the fingerprints of models registered
    before it; the wait is recorded on the job (its ``progress`` shows it).

    Bounded by ``REV_IDENTIFY_WAIT_SECONDS`` from the first prepare (kept in the job's
    ``waiting``, so a prepare the watchdog sends again does not restart the clock); the
    models still pending after it are listed unavailable by the identification.
    """
    pending = repo.pending_models(session, job.tenant, job.created_at)
    previous = job.waiting or {}
    first = float(previous.get("since_epoch", since))
    bound = get_settings().identify_wait_seconds
    now = time.time()
    waits = bool(pending) and now - first < bound
    if not pending and not previous:
        return False  # nothing to wait for, and nothing was waited for: no record
    jobs.record_waiting(
        session,
        job,
        {
            "for": "fingerprints",
            "pending": pending,
            "since": datetime.fromtimestamp(first, UTC).isoformat(),
            "since_epoch": first,
            "until": datetime.fromtimestamp(first + bound, UTC).isoformat(),
            "waited_s": round(now - first, 3),
            "done": not waits,
        },
    )
    if waits:
        log.info("identify job %s waits for the fingerprints of %s", job.id, ", ".join(pending))
    return waits


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _request_topup(session: Any, fp: Fingerprint, queue: str) -> None:
    """Enqueue one pool top-up for the model (after the commit), unless one is pending."""
    now = utcnow()
    pending = fp.topup_requested_at
    if pending is not None and (now - _aware(pending)).total_seconds() < TOPUP_RESEND_S:
        return
    fp.topup_requested_at = now
    model_id = fp.model_id
    send = partial(
        app.send_task,
        Task.FINGERPRINT,
        (model_id, True),
        queue=queue,
        retry=True,
        retry_policy=PUBLISH_RETRY,
    )
    after_commit(session, send)
    log.info("challenge pool of %s runs low: top-up enqueued on %s", model_id, queue)


# Results are kept (unlike the other pipeline steps) so that the PROGRESS state written
# after every batch ends in SUCCESS/FAILURE instead of staying PROGRESS in the backend.
@app.task(name=Task.RUN_INFERENCE, bind=True, throws=(JobFailed,), **DB_RETRY)
def run_inference(self: Any, job_id: str) -> str:
    """Run the job's batches on this worker's device; persist; start consensus.

    A job whose inference keeps killing its worker (a model that exhausts memory, a crash
    in native code) fails with ``worker_lost`` after ``REV_MAX_ATTEMPTS`` instead of being
    redelivered forever (:func:`deliver`).
    """

    def work(spec: jobs.JobSpec) -> str:
        faults.before_inference(spec.candidate_path)
        return _identify(spec, self) if spec.kind == "identify" else _verify(spec, self)

    return deliver(
        self,
        job_id,
        work,
        lambda interrupted: (
            f"the inference was interrupted {interrupted} times (worker killed: out "
            "of memory, or a crash in native code); it is not retried again"
        ),
    )


def deliver(
    task: Any,
    job_id: str,
    work: Callable[[jobs.JobSpec], str],
    interrupted: Callable[[int], str],
) -> str:
    """One delivery of a job's device step (``run_inference``, ``run_endpoint``) to its outcome.

    Shared so that both steps count attempts, stop and fail alike. Each delivery that starts
    the job counts as an attempt (a database retry does not); while ``work`` runs, the job
    heartbeats, and its progress writes carry its attempt, so that a delivery overtaken by a
    later one (after the watchdog resumed the job) stops. Past ``REV_MAX_ATTEMPTS`` the job
    fails with ``worker_lost`` and ``interrupted(attempts - 1)`` as its message. ``work``
    returns ``decided`` when it stored the transcript (the consensus chord is dispatched), and
    raises :class:`FarmError` for a failure of the job.
    """
    try:
        spec, outcome = _start(job_id, new_attempt=not task.request.retries)
    except jobs.IllegalTransition as exc:  # another delivery moved the job meanwhile
        log.warning("%s; this delivery leaves the job alone", exc)
        return "skipped"
    if spec is None:
        return outcome
    try:
        if spec.attempts > get_settings().max_attempts:
            raise FarmError("worker_lost", interrupted(spec.attempts - 1))
        with heartbeat(job_id, spec.attempts):  # the watchdog resumes a job that goes silent
            outcome = work(spec)
    except _LeftInference:
        return _left(job_id)
    except FarmError as exc:
        return _fail(job_id, exc.code, exc.message)
    except SoftTimeLimitExceeded:
        return _fail(job_id, "timeout", "the job ran past REV_JOB_TIME_LIMIT")
    except DB_ERRORS:
        raise  # the database is down: retried with backoff, the job is not failed
    except Exception as exc:
        log.exception("job %s: unexpected error", job_id)
        with session_scope() as s:
            jobs.fail(s, job_id, "internal_error", f"{type(exc).__name__}: {exc}"[:500])
        raise
    if outcome == "decided":
        dispatch_consensus(job_id)
    return outcome


def _left(job_id: str) -> str:
    """What this delivery returns once its job left the inference under it."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        status = job.status if job is not None else None
        done = job.challenges_done if job is not None else 0
    if status == jobs.CANCELLED:
        log.info("job %s was cancelled: its inference stopped after %d challenges", job_id, done)
        return "cancelled"
    log.info("job %s left the inference (%s); this delivery stops", job_id, status)
    return "skipped"


def _start(job_id: str, new_attempt: bool) -> tuple[jobs.JobSpec | None, str]:
    """The job's spec once this delivery started it, or (None, what happened instead)."""
    with session_scope() as s:
        job = jobs.load(s, job_id)
        if job is None or jobs.finished(job):
            return None, "skipped"
        if s.get(Transcript, job_id) is None:
            return jobs.mark_running(s, job, new_attempt=new_attempt), "started"
        if job.consensus_dispatched_at is not None:
            return None, "already decided"
    # Decided before this redelivery, but the validators were never sent.
    dispatch_consensus(job_id)
    return None, "consensus dispatched"


def _load(path: str, side: str, request: dict[str, Any]) -> Any:
    from rev_tasks.inference import ModelLoadError

    try:
        return load_cached(path, memory_budget(request, path), job_dtype(request))
    except ModelLoadError as exc:
        raise _load_error(side, exc) from exc


def _load_error(side: str, exc: Exception) -> FarmError:
    """A model that cannot run here: a permanent job failure with a stable code."""
    from rev_tasks.inference.streaming import MemoryBudgetError

    if isinstance(exc, MemoryBudgetError):
        return FarmError("memory_budget_too_small", f"{side}: {exc}")
    return FarmError("model_load_error", f"{side}: {exc}")


def _progress(
    job_id: str, family: str, device: str, task: Any = None, attempt: int | None = None
) -> Any:
    """The engine's per-batch callback: metrics, the job row, and the task's PROGRESS state.

    The database row is what the API and ``rev wait`` read; the PROGRESS state (meta
    ``challenges_done``/``challenges_max``) is what Flower and ``AsyncResult`` show. The
    row's write is also the cancellation check: once the job is no longer in inference
    (cancelled), it raises :class:`_LeftInference` and the batches stop.
    """
    last = [time.perf_counter(), 0]

    def report(done: int, maximum: int) -> None:
        now = time.perf_counter()
        if done > last[1]:
            per = (now - last[0]) / (done - last[1])
            for _ in range(done - last[1]):
                metrics.observe_inference(family, device, per)
        last[0], last[1] = now, done
        with session_scope() as s:
            running = jobs.record_progress(s, job_id, done, maximum, attempt)
        if not running:
            raise _LeftInference(job_id)
        faults.after_batch()
        if task is not None and getattr(task.request, "id", None):
            try:
                task.update_state(
                    state="PROGRESS",
                    meta={"job_id": job_id, "challenges_done": done, "challenges_max": maximum},
                )
            except Exception:  # noqa: BLE001 - a result-backend hiccup must not fail the job
                log.debug("job %s: progress state not stored", job_id, exc_info=True)

    return report


def _verify(spec: jobs.JobSpec, task: Any = None) -> str:
    """Run the verification: ``decided`` when this delivery stored the job's transcript."""
    from rev_tasks.engine import DtypeMismatch, Verification
    from rev_tasks.inference import ModelLoadError

    key = farm_key()
    params = _params(spec.request)
    if spec.reference_model_id is not None:
        with session_scope() as s:
            reference: Any = repo.fingerprint_doc(s, spec.reference_model_id)
        if reference is None:
            raise FarmError("model_not_ready", "the reference model has no fingerprint")
    else:
        assert spec.reference_path is not None
        reference = _load(spec.reference_path, "reference", spec.request)
    candidate = _load(spec.candidate_path, "candidate", spec.request)
    computed = faults.computed_candidate(spec.candidate_path, reference, candidate)
    recorded_ref, recorded_cand = faults.recorded_sides(
        spec.candidate_path, reference, computed, key
    )
    try:
        verification = Verification(
            recorded_ref,
            recorded_cand,
            key,
            params,
            nonce=bytes.fromhex(spec.challenge_nonce) if spec.challenge_nonce else None,
            indices=spec.challenge_indices,
        )
    except DtypeMismatch as exc:  # refused at submit already (web/jobs.py); kept as a guard
        raise FarmError("dtype_mismatch", str(exc)) from exc
    except ValueError as exc:
        raise FarmError("verification_error", str(exc)) from exc
    if spec.commitment is not None and verification.committed_root != spec.commitment:
        raise FarmError(
            "commitment_mismatch",
            "the challenge set differs from the one committed at prepare (key rotated?)",
        )
    family = str(candidate.descriptor.get("family", "unknown"))
    try:
        report = _progress(spec.id, family, candidate.device, task, spec.attempts)
        with faults.device_noise(spec.candidate_path, [reference, candidate]):
            outcome = verification.run(progress=report)
    except ModelLoadError as exc:  # a streamed block that does not fit this batch's budget
        raise _load_error("inference", exc) from exc
    except ValueError as exc:
        raise FarmError("verification_error", str(exc)) from exc
    result = dict(outcome.result)
    result["executed_on"] = _executed_on(candidate, reference)
    result.update(attest.weights_digests(spec.candidate_path, spec.reference_path))
    with session_scope() as s:
        decided = jobs.record_decision(s, spec.id, result, outcome.transcript)
        if decided and spec.reference_model_id is not None:
            # The stored transcript can be downloaded from now on: the pool challenges it
            # shows are never drawn again (the rest of the draw returns to the pool).
            shown = [int(r["index"]) for r in outcome.transcript["records"]]
            repo.retire_challenges(s, spec.reference_model_id, shown, spec.id)
    if not decided:  # the first delivery to finish wins; a cancelled job keeps no result
        log.info("job %s: decided by another delivery, or finished; result discarded", spec.id)
        return "already decided"
    return "decided"


def _executed_on(model: Any, reference: Any = None) -> dict[str, Any]:
    """Which worker, device and dtype ran the inference (operators ask; GPU pinning is
    checked), and the dtype of each side: ``reference`` is the loaded reference model, or
    a fingerprint document (computed at registration, in the dtype it names)."""
    from celery import current_task

    hostname = getattr(getattr(current_task, "request", None), "hostname", None)
    budget = getattr(model, "memory_budget_mb", None)  # set on layer-streamed models only
    out: dict[str, Any] = {
        "worker": hostname,
        "device": str(model.device),
        "dtype": model.descriptor.get("dtype"),
        "execution": "streamed" if hasattr(model, "memory_budget_mb") else "in_memory",
        "memory_budget_mb": budget,
    }
    if reference is not None:
        ref_doc = reference if isinstance(reference, dict) else None
        ref_dtype = (ref_doc or {}).get("descriptor", {}).get("dtype")
        if ref_doc is None:
            ref_dtype = reference.descriptor.get("dtype")
        out["sides"] = {
            "candidate": {"dtype": model.descriptor.get("dtype"), "device": str(model.device)},
            "reference": (
                {"dtype": ref_dtype, "device": None, "source": "fingerprint"}
                if ref_doc is not None
                else {"dtype": ref_dtype, "device": str(reference.device), "source": "model"}
            ),
        }
    return out


def _registry(
    spec: jobs.JobSpec, key_id: str
) -> tuple[dict[str, Any], dict[str, list[int]], dict[str, str], dict[str, Any] | None]:
    """What the identify job compares: usable fingerprints, their unretired pools, and why
    every other model of the tenant is unavailable; and the job's wait record."""
    fingerprints: dict[str, Any] = {}
    pools: dict[str, list[int]] = {}
    unavailable: dict[str, str] = {}
    with session_scope() as s:
        job = s.get(Job, spec.id)
        waiting = dict(job.waiting) if job is not None and job.waiting else None
        created = job.created_at if job is not None else utcnow()
        queue = job.queue if job is not None else None
        retired = repo.retired_indices(s, [r.id for r in repo.tenant_models(s, spec.tenant)])
        # Only the job's own tenant's models: identify never reveals (or compares against)
        # another tenant's registry.
        for rec in repo.tenant_models(s, spec.tenant):
            fp = s.get(Fingerprint, rec.id)
            reason = repo.unusable_reason(rec, fp, key_id)
            if reason == "fingerprint still pending":
                if _aware(rec.created_at) > _aware(created):
                    reason += " (registered after the job was submitted)"
                elif waiting is not None:
                    reason += (
                        f" after the job waited {waiting['waited_s']:g} s "
                        "(REV_IDENTIFY_WAIT_SECONDS)"
                    )
            if reason is not None:
                unavailable[rec.id] = reason
                continue
            assert fp is not None
            fingerprints[rec.id] = fp.document()
            # Compared on challenges no released transcript has shown (an identify job's
            # evidence goes to the validators only, so it shows none and holds none).
            pools[rec.id] = [
                i for i in repo.pool_indices(fingerprints[rec.id]) if i not in retired[rec.id]
            ]
            if not pools[rec.id] and queue is not None:
                _request_topup(s, fp, queue)
    return fingerprints, pools, unavailable, waiting


def _identify(spec: jobs.JobSpec, task: Any = None) -> str:
    """Compare the candidate with every model of the tenant and commit the evidence.

    ``decided`` when this delivery stored the job's evidence: the validators' chord follows
    (:func:`dispatch_consensus`), as for a verify job.
    """
    from rev_tasks.core.identification import COMPARED, INCOMPATIBLE, recorded_verdict
    from rev_tasks.core.keys import key_id
    from rev_tasks.engine import identify_registry
    from rev_tasks.inference import ModelLoadError

    key = farm_key()
    params = _params(spec.request)
    fingerprints, pools, unavailable, waiting = _registry(spec, key_id(key))
    candidate = _load(spec.candidate_path, "candidate", spec.request)
    family = str(candidate.descriptor.get("family", "unknown"))
    report = _progress(spec.id, family, candidate.device, task, spec.attempts)
    try:
        ident = identify_registry(
            candidate, fingerprints, key, params, pools, unavailable, progress=report
        )
    except ModelLoadError as exc:
        raise _load_error("candidate", exc) from exc
    except ValueError as exc:
        raise FarmError("verification_error", str(exc)) from exc
    doc = ident.document
    statuses = [e["status"] for e in ident.entries]
    result = {
        "ranking": ident.ranking,
        "unavailable": ident.unavailable,
        "best": doc["best"],
        "verdict": doc["verdict"],
        "compared": statuses.count(COMPARED),
        "incompatible": statuses.count(INCOMPATIBLE),
        "registered": len(statuses),
        "transcript_root": doc["root"],
        "challenges_used": ident.challenges_used,
        "challenges_max": ident.challenges_max,
        "tolerance": params.tolerance,
        "alpha": params.alpha,
        "key_id": key_id(key),
        "waited": waiting,
        "notes": ident.notes,
        "candidate": candidate.descriptor,
        "executed_on": _executed_on(candidate),
        **attest.weights_digests(spec.candidate_path, None),
    }
    with session_scope() as s:
        decided = jobs.record_decision(s, spec.id, result, doc, verdict=recorded_verdict(doc))
    if not decided:
        log.info("job %s: identified by another delivery, or finished; discarded", spec.id)
        return "already decided"
    return "decided"


def dispatch_consensus(job_id: str) -> None:
    """One chord: five validators on ``consensus`` into ``tally``, with an errback."""
    from celery import chord

    from rev_tasks.settings import VALIDATORS
    from rev_tasks.tasks.consensus import consensus_failed, tally, validate

    header = [validate.si(job_id, i) for i in range(VALIDATORS)]
    body = tally.si(job_id, time.time()).on_error(consensus_failed.s(job_id))
    chord(header)(body, retry=True, retry_policy=PUBLISH_RETRY)
    with session_scope() as s:
        jobs.record_consensus_dispatched(s, job_id)
