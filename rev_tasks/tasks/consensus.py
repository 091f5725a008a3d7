"""Consensus: five independent validators re-check a decided job; a quorum of four publishes.

Each ``validate`` audits the stored transcript (root, inclusion proofs, recomputed distances
and decision), checks it against the commitment made at ``prepare`` (re-deriving, with the
farm key, the job's challenge set from its nonce or pool draw), re-executes two
records drawn from the operating system's randomness once the transcript is stored (so the
inference worker cannot know them in advance; the draw is stored with the vote), and
votes. ``tally`` (the chord callback) reads the votes from the database and publishes the
verdict only when four of five agree with the transcript's decision, signing its
certificate in the same transaction (:mod:`rev_tasks.attest`); otherwise the job fails
with ``no_consensus`` and no verdict.

Votes are upserts keyed by (job, validator): a redelivered validator, or one of a chord the
watchdog sent again after the first was lost, leaves the first vote, so a job never has more
than five. Validators heartbeat the job while they check it.
A validator that crashes (an exception in its check) abstains instead of failing the chord:
the quorum of four out of five tolerates one such validator, exactly as it tolerates one
liar. A database outage is retried with backoff instead (``DB_RETRY``). A job that finished
meanwhile (cancelled) gets no vote: the validator checks the job first and again, under the
job's row lock, when it stores its vote; the tally finds it finished and publishes nothing.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from datetime import UTC
from typing import Any

from rev_tasks import attest, jobs, metrics
from rev_tasks.celery import app
from rev_tasks.certificates import vote_digest
from rev_tasks.db import repo
from rev_tasks.db.session import session_scope
from rev_tasks.db.tables import MODEL_READY, Fingerprint, Job, Transcript, Vote
from rev_tasks.queues import Task
from rev_tasks.settings import QUORUM, REEXEC_SAMPLE, VALIDATORS, get_settings
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


def _vote_doc(v: Vote) -> dict[str, Any]:
    return {
        "validator": v.validator,
        "verdict": v.verdict,
        "digest": v.digest,
        "reexecuted": v.reexecuted,
        "executed_on": v.executed_on,
    }


def draw_sample(n_records: int, k: int = REEXEC_SAMPLE) -> list[int]:
    """``k`` record positions from the OS's randomness, drawn after the transcript is stored.

    Not derived from anything the inference worker knows (the job id, the farm key, the
    transcript): a worker that forges some records cannot steer the validators away from
    them. Each of the five validators draws on its own; the draws are recorded in the votes.
    """
    return sorted(random.SystemRandom().sample(range(n_records), min(k, n_records)))


def _load_candidate(
    request: dict[str, Any],
    path: str,
    doc: dict[str, Any],
    executed_on: dict[str, Any],
    problems: list[str],
) -> Any:
    """The candidate loaded as the inference ran it (the job's dtype); where it ran goes in
    ``executed_on``, a transcript recorded in another dtype is a problem."""
    dtype = job_dtype(request)
    candidate = load_cached(path, memory_budget(request, path), dtype)
    executed_on.update(device=str(candidate.device), dtype=candidate.descriptor["dtype"])
    recorded_dtype = (doc.get("candidate") or {}).get("dtype")
    if recorded_dtype is not None and recorded_dtype != executed_on["dtype"]:
        problems.append(
            f"re-execution: the transcript's candidate ran in {recorded_dtype}, the job "
            f"asks for {executed_on['dtype']}"
        )
    return candidate


def _check(
    job_id: str, validator: int, executed_on: dict[str, Any] | None = None
) -> tuple[str, str, list[str], list[int]]:
    """(recorded verdict, root, problems, re-executed positions) for one validator's check.

    ``executed_on`` (filled in): the device and dtype this validator re-executed on.
    """
    from rev_tasks.core.transcript import audit, audit_challenges
    from rev_tasks.engine import reexecute_sample

    executed_on = {} if executed_on is None else executed_on

    with session_scope() as s:
        job, tr = s.get(Job, job_id), s.get(Transcript, job_id)
        identify = bool(job and tr and job.kind == "identify")
        ident: dict[str, Any] | None = None
        if identify and jobs.endpoint_of(job.request or {}) is not None:
            # An endpoint identify job: per-model endpoint transcripts, re-asked below.
            ident = {
                "doc": tr.document(),
                "root": tr.root,
                "recorded": tr.verdict,
                "request": dict(job.request or {}),
                "tenant": job.tenant,
                "started_at": job.started_at,
            }
            identify = False
        facts = _identification_facts(s, job, tr) if identify else None
    if ident is not None:
        from rev_tasks.tasks.endpoint import check_endpoint_identification

        problems, indices = check_endpoint_identification(**ident)
        return ident["recorded"], ident["root"], problems, indices
    if facts is not None:  # the models load and run outside the transaction
        return _check_identification(facts, executed_on)
    with session_scope() as s:
        job = s.get(Job, job_id)
        tr = s.get(Transcript, job_id)
        if job is None or tr is None:
            return "INVALID", tr.root if tr else "", ["no transcript stored for this job"], []
        doc = tr.document()
        recorded, root = tr.verdict, tr.root
        commitment = job.commitment
        nonce, drawn = job.challenge_nonce, job.challenge_indices
        ref_fp = repo.fingerprint_doc(s, job.reference_model_id) if job.reference_model_id else None
        ref_path, cand_path = job.reference_path, job.candidate_path
        # The validator runs the models as the inference did: a job that asked for a memory
        # budget is re-executed layer-streamed within it (same signatures, bit for bit).
        request = dict(job.request or {})
        tenant, reference_model_id = job.tenant, job.reference_model_id

    if jobs.endpoint_of(request) is not None:
        # An endpoint job: re-derive from the recorded replies and re-ask the endpoint.
        from rev_tasks.tasks.endpoint import check_endpoint_job

        problems, indices = check_endpoint_job(
            doc,
            root=root,
            request=request,
            tenant=tenant,
            job_commitment=commitment,
            reference_model_id=reference_model_id,
        )
        return recorded, root, problems, indices

    problems = [f"audit: {p}" for p in audit(doc)]
    if doc.get("root") != root:
        problems.append("stored transcript root differs from the document's root")
    if commitment is not None and doc.get("committed_root") != commitment:
        problems.append("transcript's challenge commitment differs from the one made at prepare")
    if doc.get("challenge_nonce") != nonce or doc.get("challenge_indices") != drawn:
        problems.append("transcript's challenge derivation differs from the job's")
    try:  # with the key: the committed root is that of the set the job derives
        problems += [f"challenges: {p}" for p in audit_challenges(doc, farm_key())]
    except FarmError as exc:
        problems.append(f"challenges not re-derived: {exc.message}")
    records = doc.get("records") or []
    indices = draw_sample(len(records))
    if indices:
        try:
            key = farm_key()
            candidate = _load_candidate(request, cand_path, doc, executed_on, problems)
            reference: Any = ref_fp
            if reference is None:
                budget = memory_budget(request, str(ref_path))
                reference = load_cached(str(ref_path), budget, job_dtype(request))
            problems += [
                f"re-execution: {p}"
                for p in reexecute_sample(doc, reference, candidate, key, indices)
            ]
        except FarmError as exc:
            problems.append(f"re-execution impossible: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - a model that no longer loads is a failed check
            problems.append(f"re-execution impossible: {type(exc).__name__}: {exc}"[:300])
    return recorded, root, problems, indices


def _identification_facts(session: Any, job: Job, tr: Transcript) -> dict[str, Any]:
    """What an identify job's check reads from the database, and the problems it finds there.

    Every model the tenant registered before the job must be listed; each compared or
    incompatible entry's reference must be that model's stored fingerprint (descriptor); a
    model listed as pending must not have been ready before the job started.
    """
    from rev_tasks.core.compat import dtype_mismatch
    from rev_tasks.core.identification import UNAVAILABLE
    from rev_tasks.core.keys import key_id

    doc = tr.document()
    entries = {e.get("model_id"): e for e in doc.get("entries") or [] if isinstance(e, dict)}
    comparisons: dict[str, Any] = doc.get("comparisons") or {}
    started = _aware(job.started_at) if job.started_at is not None else None
    references: dict[str, Any] = {}
    problems: list[str] = []
    try:
        farm_key_id: str | None = key_id(farm_key())
    except FarmError as exc:
        farm_key_id = None
        problems.append(f"listing not checked against the key: {exc.message}")
    for rec in repo.tenant_models(session, job.tenant):
        entry = entries.get(rec.id)
        if entry is None:
            if _aware(rec.created_at) <= _aware(job.created_at):
                problems.append(f"listing: {rec.id}, registered before the job, is not listed")
            continue
        fp = session.get(Fingerprint, rec.id)
        if entry.get("status") == UNAVAILABLE:
            # Unavailable is only believable for a model that had no usable fingerprint when
            # the job started, or whose pool had no unused challenge left.
            usable = (
                fp is not None
                and rec.status == MODEL_READY
                and fp.key_id == farm_key_id
                and started is not None
                and _aware(fp.created_at) < started
            )
            exhausted = str(entry.get("reason", "")).startswith("no unused challenge")
            # or one fingerprinted in another dtype than the job's (compared with none).
            job_dtype = {"dtype": (job.request or {}).get("dtype") or "float32"}
            other_dtype = fp is not None and (
                dtype_mismatch(fp.document().get("descriptor") or {}, job_dtype) is not None
            )
            if usable and not exhausted and not other_dtype:
                problems.append(
                    f"listing: {rec.id} is listed unavailable, but its fingerprint was ready "
                    "before the job started"
                )
            continue
        if fp is None:
            problems.append(f"listing: {rec.id} is compared but has no fingerprint")
            continue
        references[rec.id] = fp.document()
        if (comparisons.get(rec.id) or {}).get("reference") != references[rec.id]["descriptor"]:
            problems.append(f"{rec.id}: the transcript's reference is not its fingerprint's")
    return {
        "doc": doc,
        "recorded": tr.verdict,
        "root": tr.root,
        "problems": problems,
        "references": references,
        "candidate_path": job.candidate_path,
        "request": dict(job.request or {}),
    }


def _check_identification(
    facts: dict[str, Any], executed_on: dict[str, Any]
) -> tuple[str, str, list[str], list[int]]:
    """An identify job's check: the evidence, the registry it claims, and a re-execution.

    The document must audit (every model's transcript: proofs, roots, distances, decision
    replayed; the listing derived from them, ranked, rooted) and its challenge sets
    re-derive with the farm key. Against the database: every model the tenant registered
    before the job is listed; each compared or incompatible entry's reference is that
    model's stored fingerprint (descriptor), and the candidate's architecture is the one
    this validator loads; a model listed as pending was not ready before the job started.
    Then two records drawn at random over all comparisons are re-executed (the reference
    read back from the fingerprint, exactly; the candidate recomputed, within the noise
    allowance), as for a verify job.
    """
    from rev_tasks.core.compat import COMPARED_FIELDS
    from rev_tasks.core.identification import (
        audit_identification,
        audit_identification_challenges,
        recorded_verdict,
    )
    from rev_tasks.engine import reexecute_sample

    doc, recorded, root = facts["doc"], facts["recorded"], facts["root"]
    references: dict[str, Any] = facts["references"]
    comparisons: dict[str, Any] = doc.get("comparisons") or {}
    problems = [f"audit: {p}" for p in audit_identification(doc)] + facts["problems"]
    if doc.get("root") != root:
        problems.append("stored root differs from the document's root")
    if recorded_verdict(doc) != recorded:
        problems.append("stored verdict differs from the document's")
    try:
        problems += [f"challenges: {p}" for p in audit_identification_challenges(doc, farm_key())]
    except FarmError as exc:
        problems.append(f"challenges not re-derived: {exc.message}")
    flat = [
        (m, pos)
        for m, t in sorted(comparisons.items())
        if m in references
        for pos in range(len(t.get("records") or []))
    ]
    indices = draw_sample(len(flat))
    if comparisons:
        try:
            key = farm_key()
            path = facts["candidate_path"]
            candidate = _load_candidate(facts["request"], path, doc, executed_on, problems)
            have = {f: candidate.descriptor.get(f) for f in COMPARED_FIELDS}
            claimed = {f: (doc.get("candidate") or {}).get(f) for f in COMPARED_FIELDS}
            if have != claimed:
                problems.append(f"candidate: the document says {claimed}, the model is {have}")
            by_model: dict[str, list[int]] = {}
            for i in indices:
                m, pos = flat[i]
                by_model.setdefault(m, []).append(pos)
            for m, positions in by_model.items():
                problems += [
                    f"re-execution: {m}: {p}"
                    for p in reexecute_sample(
                        comparisons[m], references[m], candidate, key, positions
                    )
                ]
        except FarmError as exc:
            problems.append(f"re-execution impossible: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - a model that no longer loads is a failed check
            problems.append(f"re-execution impossible: {type(exc).__name__}: {exc}"[:300])
    return recorded, root, problems, indices


def _aware(ts: Any) -> Any:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


# Validator results are kept: the chord counts them before it calls ``tally``.
@app.task(name=Task.VALIDATE, **DB_RETRY)
def validate(job_id: str, validator: int) -> dict[str, Any]:
    """One validator's independent check and vote (stored before it is returned).

    A crash in the check is an abstention (no vote stored, the chord goes on), so that one
    broken validator cannot block a verdict that four others agree on.
    """
    abstain = {"validator": validator, "verdict": None, "abstained": True}
    with session_scope() as s:
        existing = s.query(Vote).filter_by(job_id=job_id, validator=validator).one_or_none()
        if existing is not None:
            return _vote_doc(existing)
        job = s.get(Job, job_id)
        if job is None or jobs.finished(job):
            log.info("validator %d: job %s is finished (cancelled?); not voting", validator, job_id)
            return abstain
        if s.get(Transcript, job_id) is None:
            # Nothing to validate (a stray or replayed message): casting INVALID here would
            # be a permanent vote against a transcript that does not exist yet.
            log.warning("validator %d: job %s has no transcript; not voting", validator, job_id)
            return abstain
        jobs.heartbeat(s, job_id)  # consensus is at work on it: the watchdog leaves it
    from celery import current_task

    hostname = getattr(getattr(current_task, "request", None), "hostname", None)
    executed_on: dict[str, Any] = {"worker": hostname, "device": None, "dtype": None}
    try:
        with metrics.validator_running(), heartbeat(job_id):
            faults.before_validation(validator)
            recorded, root, problems, indices = _check(job_id, validator, executed_on)
    except DB_ERRORS:
        raise  # retried with backoff: an outage is not a validator fault
    except Exception as exc:  # noqa: BLE001 - a crashing validator abstains
        log.error("validator %d on job %s crashed; it abstains: %s", validator, job_id, exc)
        return abstain
    verdict = faults.validator_verdict(validator, job_id, "INVALID" if problems else recorded)
    digest = vote_digest(job_id, root, verdict)
    with session_scope() as s:
        job = jobs.load(s, job_id)  # locked: a cancel cannot slip in between check and vote
        if job is None or jobs.finished(job):
            log.info(
                "validator %d: job %s finished during the check; not voting", validator, job_id
            )
            return abstain
        repo.store_vote(s, job_id, validator, verdict, digest, problems, indices, executed_on)
    with session_scope() as s:  # the stored vote, which is the first one on a race
        stored = s.query(Vote).filter_by(job_id=job_id, validator=validator).one()
        doc = _vote_doc(stored)
    metrics.validator_vote("reject" if doc["verdict"] == "INVALID" else "accept")
    if problems:
        log.warning("validator %d on job %s: %s", validator, job_id, "; ".join(problems[:3]))
    return doc


@app.task(name=Task.TALLY, bind=True, ignore_result=True, throws=(JobFailed,), **DB_RETRY)
def tally(self: Any, job_id: str, started: float | None = None) -> dict[str, Any]:
    """Publish the verdict when ≥ 4 of 5 votes agree with the transcript; else fail the job.

    The job row is locked (``FOR UPDATE``) while the tally runs, so two deliveries of the
    chord body (redelivery, a re-dispatched chord) finish the job exactly once: the second
    one finds it terminal and skips. A rejected transcript fails the job, then the task
    (:class:`JobFailed`, after the failure is committed). The chord's errback is for
    consensus tasks that broke, not for a verdict refused: it is not sent for that one.
    """
    try:
        with session_scope() as s:
            tallied = _tally(s, job_id)
    except jobs.IllegalTransition as exc:  # a stray tally for a job still in inference
        log.warning("%s; the tally is ignored", exc)
        tallied = None
    if tallied is None:
        return {"job_id": job_id, "skipped": True}
    outcome, status, verdict, agreeing, error = tallied
    metrics.consensus_round(outcome, (time.time() - started) if started is not None else None)
    if error is not None:
        self.request.errbacks = None  # Celery sends the errbacks of this request on failure
        raise JobFailed.of(*error)
    return {"job_id": job_id, "status": status, "verdict": verdict, "agreeing": agreeing}


def _tally(
    session: Any, job_id: str
) -> tuple[str, str, str | None, int, tuple[str, str] | None] | None:
    """(outcome, status, verdict, agreeing, error) once the job is finished; None if it was."""
    job = jobs.load(session, job_id)
    if job is None or jobs.finished(job):
        return None
    tr = session.get(Transcript, job_id)
    consensus, failure = count_votes(repo.votes_for(session, job_id), tr.verdict if tr else None)
    result = dict(tr.outcome) if tr is not None else {}
    result["consensus"] = consensus
    if failure is None:
        jobs.publish(session, job, result)
        # Signed in this transaction, so a published verdict and its certificate appear
        # together; a certificate that cannot be made is logged and never fails the verdict.
        attest.issue_on_publish(session, job_id, get_settings().cert_key_file)
        outcome = "published"
    else:
        result["verdict"] = None
        jobs.reject(session, job, result, *failure)
        outcome = "no_quorum"
    return outcome, job.status, result.get("verdict"), consensus["agreeing"], failure


def count_votes(
    votes: list[Vote], recorded: str | None
) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """The consensus document, and (code, message) unless the votes publish ``recorded``.

    Publishing needs a quorum of identical votes (verdict and digest) that agree with the
    transcript's own decision; a quorum for INVALID rejects the transcript.
    """
    counts = Counter((v.verdict, v.digest) for v in votes)
    (top_verdict, _digest), agreeing = counts.most_common(1)[0] if counts else ((None, None), 0)
    quorum = agreeing >= QUORUM
    agreed = quorum and top_verdict == recorded and top_verdict != "INVALID"
    consensus = {
        "validators": VALIDATORS,
        "quorum": QUORUM,
        "votes": [_vote_doc(v) for v in votes],
        "agreeing": agreeing,
        "verdict": top_verdict if quorum else None,
        "agreed": agreed,
        "abstained": sorted(set(range(VALIDATORS)) - {v.validator for v in votes}),
    }
    if agreed:
        return consensus, None
    if quorum and top_verdict == "INVALID":
        return consensus, (
            "invalid_transcript",
            f"{agreeing} of {VALIDATORS} validators found the transcript invalid",
        )
    return consensus, (
        "no_consensus",
        f"only {agreeing} of {VALIDATORS} validators agree on {top_verdict} "
        f"(quorum {QUORUM}); no verdict is published",
    )


@app.task(name=Task.CERTIFY, ignore_result=True, **DB_RETRY)
def certify(job_id: str) -> bool:
    """Sign a verdict published without a tally (identify jobs decided before identify had
    a consensus round; no job sends it now, it serves messages still queued).

    It runs here, on ``consensus``, because only the consensus workers hold the signing key.
    """
    with session_scope() as s:
        return attest.issue_on_publish(s, job_id, get_settings().cert_key_file)


@app.task(name=Task.CONSENSUS_FAILED, ignore_result=True, **DB_RETRY)
def consensus_failed(task_id: str, job_id: str) -> None:
    """Chord errback: a validator or the tally raised; the job must not stay running."""
    with session_scope() as s:
        failed = jobs.fail(
            s,
            job_id,
            "consensus_error",
            f"a consensus task failed (task {task_id}); no verdict is published",
        )
    if failed:
        metrics.consensus_round("failed")
