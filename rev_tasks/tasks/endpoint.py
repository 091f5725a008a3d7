"""Endpoint jobs: verify or identify a model behind a tenant's OpenAI-compatible URL.

``prepare`` (rev_tasks/tasks/verify.py) commits the challenges the job may ask (the farm
key's challenges 0..n-1, :func:`committed_count`) and sends :func:`run_endpoint` to the
``endpoint`` queue, whose workers run a threads pool (the work is waiting on HTTP). The
worker re-checks the URL with the egress guard, reveals the tenant's credential (it goes
to the Authorization header only), and runs the black-box test of rev_tasks/endpoints/
verify.py against the reference: a registered model's endpoint fingerprint (no reference
inference at job time) or a model folder. Every request passes the endpoint's farm-wide
gate (rev_tasks/endpoints/politeness.py) and the job's request and token budgets; an
endpoint that stops answering fails the job with the client's one-line reason after its
bounded retries.

Validators (:func:`check_endpoint_job`, called by rev_tasks/tasks/consensus.py) run on the
``consensus`` queue like every other job's: not on the endpoint workers, so that the worker
that recorded the replies never votes on them. Each re-derives the decision from the
recorded bytes (``audit_endpoint``), checks the challenges against the commitment, and asks
the endpoint again a random sample of the recorded challenges: the new answers must lie
within the job's tolerance (the calibrated serving noise) of the recorded ones. An identify
job stores one document of per-model transcripts and the ranking derived from them
(rev_tasks/endpoints/identification.py); its validators
(:func:`check_endpoint_identification`) run the same checks on every transcript and re-ask
a sample drawn over all of them.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import asdict
from typing import Any

from rev_tasks import jobs, metrics
from rev_tasks.celery import app
from rev_tasks.db.session import session_scope
from rev_tasks.db.tables import MODEL_READY, EndpointFingerprint, ModelRecord
from rev_tasks.queues import Task
from rev_tasks.settings import get_settings
from rev_tasks.tasks.common import (
    DB_RETRY,
    FarmError,
    JobFailed,
    check_folder,
    farm_key,
)
from rev_tasks.testing import faults

log = logging.getLogger(__name__)

#: Requests in flight per job (the CLI's ``--in-flight`` default: same batches, same verdict).
IN_FLIGHT = 4
#: Recorded challenges each validator asks the endpoint again.
REQUERY_SAMPLE = 3


def endpoint_params(request: dict[str, Any]) -> Any:
    """The black-box test's parameters from a job request (the CLI's defaults otherwise)."""
    from rev_tasks.endpoints.verify import EndpointParams

    ep = jobs.endpoint_of(request) or {}
    return EndpointParams(
        mode=str(ep.get("mode", "logprobs")),
        tolerance=str(ep.get("tolerance", "weights")),
        alpha=float(request.get("alpha", 0.01)),
        max_queries=ep.get("max_queries"),
        batch=IN_FLIGHT,
    )


def committed_count(params: Any, n_max: int | None) -> int:
    """How many of the farm key's challenges (0..n-1) the job may ask: what ``prepare``
    commits. logprobs: the query budget (capped by a fingerprint's challenges, as
    ``verify_endpoint`` caps it); text: the prompts it samples from."""
    if params.mode == "text":
        return int(params.text_prompts)
    budget = int(params.budget())
    if n_max is not None and params.max_queries is None:
        budget = min(budget, n_max)
    return budget


def _fingerprint_size(session: Any, model_id: str | None) -> int | None:
    if model_id is None:
        return None
    row = session.get(EndpointFingerprint, model_id)
    return None if row is None else row.n_challenges


def endpoint_commitment(session: Any, job: Any, key: bytes) -> dict[str, Any]:
    """What ``prepare`` stores for an endpoint verify job: the root of its challenges.

    Identify jobs commit nothing here (several references, each its own n); their
    validators check each transcript's challenges against :func:`committed_count` for that
    model's fingerprint."""
    from rev_tasks.core.challenges import commitment, generate_challenges

    n = committed_count(
        endpoint_params(job.request), _fingerprint_size(session, job.reference_model_id)
    )
    return {"commitment": commitment(generate_challenges(key, n)).hex(), "challenges_max": n}


def _request_budget(params: Any, references: int) -> int:
    """Requests a job may send, retries included: twice what its tests can use."""
    per = params.budget() + params.batch + 2
    return 2 * max(1, references) * per


def _client(spec: jobs.JobSpec, params: Any, references: int) -> Any:
    """The job's client: egress re-checked, credential revealed, gate, budgets, metrics."""
    from rev_tasks.endpoints.access import open_client

    ep = jobs.endpoint_of(spec.request) or {}
    settings = get_settings()
    max_tokens = min(
        int(ep.get("max_tokens") or settings.endpoint_max_tokens), settings.endpoint_max_tokens
    )
    client = open_client(
        ep,
        spec.tenant,
        settings,
        max_requests=int(ep.get("max_requests") or _request_budget(params, references)),
        max_tokens=max_tokens,
        observer=metrics.EndpointObserver,
        in_flight=IN_FLIGHT,
    )
    return faults.endpoint_client(client)  # the farm's own fault tests only


def _reference(spec: jobs.JobSpec) -> Any:
    """A registered model's endpoint fingerprint, or the reference folder's weights."""
    from rev_tasks.endpoints.fingerprint import FingerprintReference

    if spec.reference_model_id is not None:
        with session_scope() as s:
            row = s.get(EndpointFingerprint, spec.reference_model_id)
            doc = row.document() if row is not None and row.status == MODEL_READY else None
        if doc is None:
            raise FarmError(
                "endpoint_evidence_missing",
                f"model {spec.reference_model_id!r} has no endpoint fingerprint "
                "(register it with endpoint_evidence: true)",
            )
        return FingerprintReference(doc)
    assert spec.reference_path is not None
    from rev_tasks.endpoints.reference import Reference

    try:
        check_folder(spec.reference_path)
        return Reference(spec.reference_path)
    except Exception as exc:  # noqa: BLE001 - a folder that is no causal LM: the job's failure
        raise FarmError(
            "model_load_error", f"reference: {type(exc).__name__}: {exc}"[:500]
        ) from exc


def _executed_on() -> dict[str, Any]:
    from celery import current_task

    hostname = getattr(getattr(current_task, "request", None), "hostname", None)
    return {"worker": hostname, "device": "endpoint", "execution": "endpoint"}


def _as_farm_error(exc: Exception) -> FarmError:
    """An endpoint failure as the job's error: a stable code and the one-line reason."""
    from rev_tasks.endpoints.access import EndpointRefused
    from rev_tasks.endpoints.client import BudgetExceeded, NoLogprobs
    from rev_tasks.endpoints.egress import EgressRefused

    if isinstance(exc, EndpointRefused):
        metrics.EndpointObserver.error("refused")
        return FarmError(exc.code, str(exc))
    if isinstance(exc, EgressRefused):  # a redirect or connection outside the allow-list
        metrics.EndpointObserver.error("refused")
        return FarmError("endpoint_refused", f"egress guard: {exc.reason}")
    if isinstance(exc, BudgetExceeded):
        return FarmError("endpoint_budget_exceeded", str(exc))
    if isinstance(exc, NoLogprobs):
        return FarmError("endpoint_no_logprobs", str(exc))
    return FarmError("endpoint_error", str(exc))


@app.task(name=Task.RUN_ENDPOINT, bind=True, throws=(JobFailed,), **DB_RETRY)
def run_endpoint(self: Any, job_id: str) -> str:
    """Query the job's endpoint to a verdict (verify) or a ranking (identify); persist.

    Started, counted, stopped and failed like an inference (:func:`deliver`); an endpoint
    that fails is the job's failure with the client's one-line reason.
    """
    from rev_tasks.endpoints.client import EndpointError
    from rev_tasks.endpoints.egress import EgressRefused
    from rev_tasks.endpoints.fingerprint import FingerprintError
    from rev_tasks.tasks.verify import deliver

    def work(spec: jobs.JobSpec) -> str:
        try:
            return _identify(spec) if spec.kind == "identify" else _verify(spec)
        except (EndpointError, EgressRefused) as exc:
            raise _as_farm_error(exc) from exc
        except FingerprintError as exc:
            raise FarmError("verification_error", str(exc)) from exc

    return deliver(
        self,
        job_id,
        work,
        lambda interrupted: (
            f"the endpoint job was interrupted {interrupted} times; not retried again"
        ),
    )


def _progress(job_id: str, attempt: int) -> Any:
    """After each consumed reply: the job row (what the API shows); stop when it left."""
    from rev_tasks.tasks.verify import _LeftInference

    def report(done: int, maximum: int) -> None:
        with session_scope() as s:
            running = jobs.record_progress(s, job_id, done, maximum, attempt)
        if not running:
            raise _LeftInference(job_id)

    return report


def _verify(spec: jobs.JobSpec) -> str:
    from rev_tasks import certificates as C
    from rev_tasks.core.challenges import commitment, generate_challenges
    from rev_tasks.endpoints.verify import verify_endpoint

    key = farm_key()
    params = endpoint_params(spec.request)
    client = _client(spec, params, 1)
    try:
        client.check_model()  # fail fast, before a reference folder is loaded
        reference = _reference(spec)
        n = committed_count(params, getattr(reference, "max_challenges", None))
        if commitment(generate_challenges(key, n)).hex() != spec.commitment:
            raise FarmError(
                "commitment_mismatch",
                "the challenge set differs from the one committed at prepare (key rotated?)",
            )
        outcome = verify_endpoint(
            reference, client, key, params, progress=_progress(spec.id, spec.attempts)
        )
    finally:
        client.close()
    result = dict(outcome.result)
    result["challenges_used"] = int(result["queries_used"])
    result["challenges_max"] = int(result["queries_max"])
    result["executed_on"] = _executed_on()
    if spec.reference_path is not None:
        try:
            result["reference_digest"] = C.weights_digest(spec.reference_path)
        except (C.CertificateError, OSError) as exc:
            log.error("no weights digest of %s: %s", spec.reference_path, exc)
            result["reference_digest"] = None
    with session_scope() as s:
        decided = jobs.record_decision(s, spec.id, result, outcome.transcript)
    if not decided:
        log.info("job %s: decided by another delivery, or finished; result discarded", spec.id)
        return "already decided"
    return "decided"


def _identify(spec: jobs.JobSpec) -> str:
    """Verify the endpoint against every model of the tenant and commit the evidence.

    ``decided`` when this delivery stored the job's evidence document
    (rev_tasks/endpoints/identification.py): the validators' chord follows, as for an
    endpoint verify job.
    """
    from rev_tasks.core.keys import key_id
    from rev_tasks.endpoints.fingerprint import FingerprintReference
    from rev_tasks.endpoints.identification import build_endpoint_identification, recorded_verdict
    from rev_tasks.endpoints.verify import identify_endpoint

    key = farm_key()
    kid = key_id(key)
    params = endpoint_params(spec.request)
    with session_scope() as s:
        # The job's own tenant's models only, as for model identify jobs.
        rows = (
            s.query(EndpointFingerprint)
            .join(ModelRecord, ModelRecord.id == EndpointFingerprint.model_id)
            .filter(
                ModelRecord.tenant == spec.tenant,
                ModelRecord.status == MODEL_READY,
                EndpointFingerprint.status == MODEL_READY,
                EndpointFingerprint.key_id == kid,
            )
            .order_by(EndpointFingerprint.model_id)
        )
        docs = {row.model_id: row.document() for row in rows}
    refs = {m: FingerprintReference(doc) for m, doc in docs.items() if doc is not None}
    ep = jobs.endpoint_of(spec.request) or {}
    endpoint = {"url": _public(ep), "model": ep.get("model")}
    out: dict[str, Any] = {"transcripts": {}, "cost": {}}
    if refs:
        client = _client(spec, params, len(refs))
        try:
            out = identify_endpoint(refs, client, key, params, keep_transcripts=True)
        finally:
            client.close()
    doc = build_endpoint_identification(
        key_id=kid,
        mode=params.mode,
        parameters={
            "tolerance": params.tolerance,
            "alpha": params.alpha,
            "max_queries": params.max_queries,
        },
        endpoint=endpoint,
        transcripts=out["transcripts"],
    )
    ranking = [
        {
            "model_id": r["reference"],
            "verdict": r["verdict"],
            "queries_used": r["queries_used"],
            "mean_distance": r["mean_value"],
            "inf_values": r["inf_values"],
            "transcript_root": r["transcript_root"],
        }
        for r in doc["entries"]
    ]
    used = max((r["queries_used"] for r in ranking), default=0)
    result = {
        "ranking": ranking,
        "best": doc["best"],
        "verdict": doc["verdict"],
        "none_of_these": doc["none_of_these"],
        "compared": len(ranking),
        "registered": len(refs),
        "key_id": kid,
        "mode": params.mode,
        "endpoint": endpoint,
        "cost": out["cost"],
        "transcript_root": doc["root"],
        "challenges_used": used,
        "challenges_max": max(
            (committed_count(params, ref.max_challenges) for ref in refs.values()), default=0
        ),
        "executed_on": _executed_on(),
    }
    with session_scope() as s:
        decided = jobs.record_decision(s, spec.id, result, doc, verdict=recorded_verdict(doc))
    if not decided:
        log.info("job %s: identified by another delivery, or finished; discarded", spec.id)
        return "already decided"
    return "decided"


def _public(ep: dict[str, Any]) -> str:
    from rev_tasks.endpoints.client import _public_url, normalise_base_url

    return _public_url(normalise_base_url(str(ep.get("url", ""))))


# ----------------------------------------------------------------------------- validators
def _transcript_problems(
    doc: dict[str, Any], params: Any, ep: dict[str, Any], key: bytes, n: int
) -> list[str]:
    """One transcript against the job: its mode, endpoint, parameters, and every recorded
    challenge the farm key's challenge of its index among the ``n`` the job may ask."""
    from rev_tasks.core.challenges import generate_challenges

    problems: list[str] = []
    if doc.get("mode") != params.mode:
        problems.append(f"transcript mode {doc.get('mode')!r}, the job asked {params.mode!r}")
    if doc.get("endpoint") != {"url": _public(ep), "model": ep.get("model")}:
        problems.append("the transcript names another endpoint or model than the job")
    recorded_params = doc.get("parameters") or {}
    if recorded_params.get("alpha") != params.alpha:
        problems.append("the transcript's alpha is not the job's")
    if params.mode == "logprobs" and recorded_params.get("tolerance") != params.tolerance:
        problems.append("the transcript's tolerance is not the job's")
    derived = generate_challenges(key, n)
    for i, rec in enumerate(doc.get("records") or []):
        index = rec.get("index") if isinstance(rec, dict) else None
        if not isinstance(index, int) or not 0 <= index < n:
            problems.append(f"challenges: record {i} names a challenge outside the committed set")
        elif rec.get("challenge") != asdict(derived[index]):
            problems.append(f"challenges: record {i} is not the committed challenge {index}")
    return problems


def _requery(
    request: dict[str, Any],
    tenant: str,
    key: bytes,
    sample: list[tuple[str, int, dict[str, Any]]],
) -> list[str]:
    """Ask the endpoint again each sampled record ((label, position, record)): the answer
    must lie within the tolerance of the recorded one (logprobs) or sample the recorded
    piece with the recorded seed (text)."""
    from rev_tasks.core.blackbox import ENDPOINT_TOLERANCES
    from rev_tasks.core.keys import derive
    from rev_tasks.endpoints.access import open_client
    from rev_tasks.endpoints.calibration import requery_gap
    from rev_tasks.endpoints.evidence import sampled_piece
    from rev_tasks.endpoints.verify import TOP_K

    if not sample:
        return []
    ep = jobs.endpoint_of(request) or {}
    params = endpoint_params(request)
    client = open_client(
        ep,
        tenant,
        get_settings(),
        max_requests=4 * (len(sample) + 1),
        observer=metrics.EndpointObserver,
        in_flight=1,
    )
    delta = ENDPOINT_TOLERANCES[params.tolerance].delta
    problems: list[str] = []
    try:
        for label, i, rec in sample:
            body = json.loads(base64.b64decode(rec["response_b64"]))
            prompt = rec["challenge"]["prompt"]
            if params.mode == "logprobs":
                again = client.completion(
                    prompt, max_tokens=1, temperature=0.0, logprobs=TOP_K
                ).body
                gap = requery_gap(body, again)
                if not gap <= delta:
                    problems.append(
                        f"re-query: {label}record {i}: the endpoint now answers {gap:.3f} nats "
                        f"from the recorded reply (tolerance {delta})"
                    )
            else:
                seed = int.from_bytes(derive(key, "endpoint-sample", i)[:4], "big")
                again = client.completion(prompt, max_tokens=1, temperature=1.0, seed=seed).body
                if sampled_piece(again) != sampled_piece(body):
                    problems.append(
                        f"re-query: {label}record {i}: the endpoint samples another piece with "
                        "the recorded seed"
                    )
    finally:
        client.close()
    return problems


def check_endpoint_job(
    doc: dict[str, Any],
    *,
    root: str,
    request: dict[str, Any],
    tenant: str,
    job_commitment: str | None,
    reference_model_id: str | None,
) -> tuple[list[str], list[int]]:
    """One validator's check of an endpoint verify job: (problems, re-queried positions).

    Re-derives the decision from the recorded bytes, checks the recorded challenges
    against the commitment (with the farm key), then re-asks the endpoint a random sample
    of them. An endpoint that cannot be reached now raises :class:`EndpointError`: the
    validator abstains (no evidence of forgery either way).
    """
    from rev_tasks.core.challenges import commitment, generate_challenges
    from rev_tasks.endpoints.transcript import audit_endpoint
    from rev_tasks.tasks.consensus import draw_sample

    problems = [f"audit: {p}" for p in audit_endpoint(doc)]
    if doc.get("root") != root:
        problems.append("stored transcript root differs from the document's root")
    params = endpoint_params(request)
    key = farm_key()
    with session_scope() as s:
        n = committed_count(params, _fingerprint_size(s, reference_model_id))
    if job_commitment is not None and commitment(generate_challenges(key, n)).hex() != (
        job_commitment
    ):
        problems.append("challenges: the job's commitment is not that of the farm key's set")
    problems += _transcript_problems(doc, params, jobs.endpoint_of(request) or {}, key, n)
    if problems:
        return problems, []
    records = doc.get("records") or []
    indices = draw_sample(len(records), REQUERY_SAMPLE)
    problems += _requery(request, tenant, key, [("", i, records[i]) for i in indices])
    return problems, indices


def check_endpoint_identification(
    doc: dict[str, Any],
    *,
    root: str,
    recorded: str,
    request: dict[str, Any],
    tenant: str,
    started_at: Any,
) -> tuple[list[str], list[int]]:
    """One validator's check of an endpoint identify job: (problems, re-queried positions).

    The document must audit (every model's transcript replays to its decision; the ranking,
    verdict and root follow from the transcripts), each transcript passes the verify job's
    checks (the job's endpoint and parameters; every challenge the farm key's of its index
    among those the job may ask that model, :func:`committed_count` with its fingerprint's
    size: identify jobs commit nothing at ``prepare``), and names the model's stored
    fingerprint. The listing covers every model of the tenant whose endpoint fingerprint
    (farm key) was ready when the job started. Then :data:`REQUERY_SAMPLE` records drawn
    over all transcripts (positions in the sorted models' concatenated records) are asked
    again, as for a verify job.
    """
    from rev_tasks.core.keys import key_id
    from rev_tasks.endpoints.fingerprint import FingerprintReference
    from rev_tasks.endpoints.identification import audit_endpoint_identification, recorded_verdict
    from rev_tasks.tasks.consensus import _aware, draw_sample

    problems = [f"audit: {p}" for p in audit_endpoint_identification(doc)]
    if doc.get("root") != root:
        problems.append("stored root differs from the document's root")
    if recorded_verdict(doc) != recorded:
        problems.append("stored verdict differs from the document's")
    params = endpoint_params(request)
    ep = jobs.endpoint_of(request) or {}
    key = farm_key()
    kid = key_id(key)
    if doc.get("key_id") != kid:
        problems.append("the document was made with another key than the farm's")
    transcripts: dict[str, Any] = doc.get("transcripts") or {}
    started = _aware(started_at) if started_at is not None else None
    with session_scope() as s:
        rows = (
            s.query(EndpointFingerprint, ModelRecord)
            .join(ModelRecord, ModelRecord.id == EndpointFingerprint.model_id)
            .filter(ModelRecord.tenant == tenant)
            .all()
        )
        usable = {
            efp.model_id: efp
            for efp, rec in rows
            if rec.status == MODEL_READY and efp.status == MODEL_READY and efp.key_id == kid
        }
        for m, efp in sorted(usable.items()):
            if m not in transcripts and started is not None and _aware(efp.created_at) < started:
                problems.append(f"listing: {m}, ready before the job started, is not listed")
        for m, t in sorted(transcripts.items()):
            efp = usable.get(m)
            if efp is None:
                problems.append(f"listing: {m} has no ready endpoint fingerprint of the tenant")
                continue
            stored = FingerprintReference(efp.document()).describe()
            named = (t or {}).get("reference") or {}
            if any(named.get(f) != stored[f] for f in ("fingerprint_sha256", "descriptor")):
                problems.append(f"{m}: the transcript's reference is not its fingerprint")
            n = committed_count(params, efp.n_challenges)
            problems += [f"{m}: {p}" for p in _transcript_problems(t, params, ep, key, n)]
    if problems:
        return problems, []
    flat = [
        (m, i, rec)
        for m, t in sorted(transcripts.items())
        for i, rec in enumerate(t.get("records") or [])
    ]
    indices = draw_sample(len(flat), REQUERY_SAMPLE)
    problems += _requery(
        request, tenant, key, [(f"{flat[j][0]}: ", flat[j][1], flat[j][2]) for j in indices]
    )
    return problems, indices
