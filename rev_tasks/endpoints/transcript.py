"""Endpoint transcripts (``rev-endpoint-transcript/1``): every raw response in a Merkle tree.

Record i holds the challenge, the endpoint's exact response bytes (base64) and their sha256,
the few reference numbers the evidence needs (see rev_tasks/endpoints/evidence.py) and the
per-query value the test consumed. Its Merkle leaf is the canonical JSON of all that but the
proof. :func:`audit_endpoint` checks hashes, proofs and the challenge commitment, recomputes
every value from the raw response and the committed reference numbers, and replays the
sequential test to the recorded verdict. The API key is never part of a transcript.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from rev_tasks.core.blackbox import (
    ENDPOINT_TOLERANCES,
    EndpointTolerance,
    LogprobSPRT,
    SamplingEProcess,
)
from rev_tasks.core.challenges import Challenge, commitment
from rev_tasks.core.merkle import all_inclusion_proofs, verify_inclusion
from rev_tasks.core.transcript import canonical_json
from rev_tasks.endpoints.client import EndpointError
from rev_tasks.endpoints.evidence import logprob_statistic, sampled_piece, text_log_e

__all__ = ["ENDPOINT_FORMAT", "audit_endpoint", "build_endpoint_transcript", "leaf_bytes"]

ENDPOINT_FORMAT = "rev-endpoint-transcript/1"


def _json_value(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _num(x: Any) -> float:
    if x == "inf":
        return math.inf
    if x == "-inf":
        return -math.inf
    return float(x)


def leaf_bytes(record: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in record.items() if k != "proof"})


def make_record(
    challenge: Challenge, prompt_slot: int, raw: bytes, view: dict[str, Any], value: float
) -> dict[str, Any]:
    return {
        "index": challenge.index,
        "slot": prompt_slot,
        "challenge": {
            "index": challenge.index,
            "template_id": challenge.template_id,
            "domain": challenge.domain,
            "prompt": challenge.prompt,
        },
        "response_b64": base64.b64encode(raw).decode("ascii"),
        "response_sha256": hashlib.sha256(raw).hexdigest(),
        "reference": view,
        "value": _json_value(value),
    }


def build_endpoint_transcript(
    *,
    key_id: str,
    mode: str,
    params: dict[str, Any],
    challenges: Sequence[Challenge],
    reference: dict[str, Any],
    endpoint: dict[str, Any],
    records: list[dict[str, Any]],
    decision: dict[str, Any],
    cost: dict[str, Any],
) -> dict[str, Any]:
    root, proofs = all_inclusion_proofs([leaf_bytes(r) for r in records])
    for rec, proof in zip(records, proofs, strict=True):
        rec["proof"] = [h.hex() for h in proof]
    return {
        "format": ENDPOINT_FORMAT,
        "key_id": key_id,
        "mode": mode,
        "challenge_commitment": commitment(challenges).hex(),
        "parameters": params,
        "reference": reference,
        "endpoint": endpoint,
        "records": records,
        "root": root.hex(),
        "decision": decision,
        "cost": cost,
    }


def replay(mode: str, params: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Any:
    """Recompute each record's value from its raw response and reference numbers; return
    (the test after replay, list of problems)."""
    problems: list[str] = []
    alpha = float(params["alpha"])
    max_queries = int(params["max_queries"])
    if mode == "logprobs":
        tol = EndpointTolerance(
            name=str(params["tolerance"]),
            delta=float(params["delta"]),
            p0=float(params["p0"]),
            p1=float(params["p1"]),
            description="",
        )
        test: Any = LogprobSPRT(tol, alpha, max_queries)
    elif mode == "text":
        test = SamplingEProcess(alpha, max_queries)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    counts: dict[tuple[int, str], int] = {}
    seen: dict[int, int] = {}
    for i, rec in enumerate(records):
        try:
            raw = base64.b64decode(rec["response_b64"], validate=True)
        except (binascii.Error, KeyError, TypeError):
            problems.append(f"record {i}: response_b64 is not base64")
            continue
        if hashlib.sha256(raw).hexdigest() != rec.get("response_sha256"):
            problems.append(f"record {i}: response_sha256 does not match the response bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            problems.append(f"record {i}: the recorded response is not JSON")
            continue
        view = rec.get("reference") or {}
        try:
            if mode == "logprobs":
                value = logprob_statistic(body, view)
            else:
                slot = int(rec["slot"])
                if view["piece"] != sampled_piece(body):
                    problems.append(f"record {i}: recorded piece is not the response's text")
                piece = view["class"]
                value = text_log_e(view, counts.get((slot, piece), 0), seen.get(slot, 0))
                counts[(slot, piece)] = counts.get((slot, piece), 0) + 1
                seen[slot] = seen.get(slot, 0) + 1
        except (EndpointError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"record {i}: cannot recompute its value: {exc}")
            continue
        recorded = _num(rec.get("value"))
        if not (value == recorded or abs(value - recorded) <= 1e-9 * max(1.0, abs(value))):
            problems.append(f"record {i}: value {recorded} recorded, {value} recomputed")
        if test.decision is not None:
            problems.append(f"record {i}: recorded after the decision point")
        test.update(value)
    return test, problems


def audit_endpoint(doc: Any) -> list[str]:
    """Every problem found in an endpoint transcript; an empty list means it checks out."""
    if not isinstance(doc, dict) or doc.get("format") != ENDPOINT_FORMAT:
        return [f"not an {ENDPOINT_FORMAT} document"]
    problems: list[str] = []
    records = doc.get("records")
    params = doc.get("parameters")
    if not isinstance(records, list) or not isinstance(params, dict):
        return ["records or parameters missing"]
    if doc.get("mode") == "logprobs":
        name = params.get("tolerance")
        spec = ENDPOINT_TOLERANCES.get(str(name))
        if spec is None or (spec.delta, spec.p0, spec.p1) != (
            params.get("delta"),
            params.get("p0"),
            params.get("p1"),
        ):
            problems.append(f"parameters do not match the constants of tolerance {name!r}")
    try:
        root = bytes.fromhex(str(doc.get("root")))
    except ValueError:
        return problems + ["root is not hex"]
    challenges: list[Challenge] = []
    for i, rec in enumerate(records):
        try:
            proof = [bytes.fromhex(h) for h in rec["proof"]]
            ok = verify_inclusion(leaf_bytes(rec), i, len(records), proof, root)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            problems.append(f"record {i}: Merkle proof does not lead to the root")
        try:
            challenges.append(Challenge(**rec["challenge"]))
        except (KeyError, TypeError):
            problems.append(f"record {i}: malformed challenge")
    unique = {c.index: c for c in challenges}
    ordered = [unique[k] for k in sorted(unique)]
    if commitment(ordered).hex() != doc.get("challenge_commitment"):
        problems.append("challenge_commitment does not match the recorded challenges")
    try:
        test, replay_problems = replay(str(doc.get("mode")), params, records)
    except (KeyError, TypeError, ValueError) as exc:
        return problems + [f"cannot replay the decision: {exc}"]
    problems += replay_problems
    decision = doc.get("decision") or {}
    got = test.decision
    if got is None:
        if decision.get("verdict") != "UNDECIDED":
            problems.append(
                f"recorded verdict {decision.get('verdict')} but the records reach no decision"
            )
    elif got.verdict != decision.get("verdict") or got.queries_used != decision.get("queries_used"):
        problems.append(
            f"recorded verdict {decision.get('verdict')} after {decision.get('queries_used')} "
            f"queries, replay gives {got.verdict} after {got.queries_used}"
        )
    return problems
