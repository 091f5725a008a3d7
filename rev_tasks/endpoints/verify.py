"""Black-box verification: a local reference against a model behind an OpenAI-compatible URL.

logprobs mode asks each committed challenge once for one token at temperature 0 with the
top-k (k=5) log-probabilities and feeds the per-challenge statistic to the SPRT of
rev_tasks/core/blackbox.py; it stops at the first crossing. text mode samples one token at
temperature 1 from each of a few committed prompts, round-robin, and feeds the e-values.
Queries go out in batches of ``max_in_flight``; results are consumed in challenge order, so
the verdict does not depend on which reply arrives first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rev_tasks.core.blackbox import ENDPOINT_TOLERANCES, LogprobSPRT, SamplingEProcess
from rev_tasks.core.challenges import Challenge, generate_challenges
from rev_tasks.core.keys import derive, key_id
from rev_tasks.endpoints.client import EndpointClient, Reply
from rev_tasks.endpoints.evidence import (
    NoLogprobs,
    first_top_logprobs,
    logprob_statistic,
    logprob_view,
    text_log_e,
    text_view,
)
from rev_tasks.endpoints.fingerprint import FingerprintError
from rev_tasks.endpoints.reference import PROBE, Reference, detect_bos
from rev_tasks.endpoints.transcript import build_endpoint_transcript, make_record

__all__ = ["EndpointOutcome", "EndpointParams", "verify_endpoint"]

MODES = ("logprobs", "text")
TOP_K = 5


@dataclass(frozen=True)
class EndpointParams:
    mode: str = "logprobs"
    tolerance: str = "weights"
    alpha: float = 0.01
    max_queries: int | None = None  # default: 64 (logprobs), 300 (text)
    text_prompts: int = 8
    batch: int = 4

    def budget(self) -> int:
        if self.max_queries is not None:
            return self.max_queries
        return 64 if self.mode == "logprobs" else 300


@dataclass
class EndpointOutcome:
    result: dict[str, Any]
    transcript: dict[str, Any]
    values: list[float] = field(default_factory=list)


def _fetch(client: EndpointClient, jobs: Sequence[dict[str, Any]], width: int) -> list[Reply]:
    with ThreadPoolExecutor(max_workers=max(1, width)) as pool:
        return list(pool.map(lambda kw: client.completion(**kw), jobs))


def verify_endpoint(
    reference: Reference | Any,
    client: EndpointClient,
    key: bytes,
    params: EndpointParams,
    progress: Callable[[int, int], None] | None = None,
) -> EndpointOutcome:
    """Run the test to a verdict; raises :class:`EndpointError` with a one-line reason."""
    if params.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {params.mode!r}")
    check_key = getattr(reference, "check_key", None)
    if check_key is not None:  # a fingerprint holds numbers for its own key's prompts only
        check_key(key)
    budget = params.budget()
    n_max = reference.max_challenges
    if n_max is not None and params.mode == "logprobs" and params.max_queries is None:
        budget = min(budget, n_max)
    needed = budget if params.mode == "logprobs" else params.text_prompts
    if n_max is not None and needed > n_max:
        raise FingerprintError(
            f"the fingerprint holds {n_max} challenges; this run needs {needed} "
            f"({'--max-queries' if params.mode == 'logprobs' else 'text prompts'})"
        )
    started = time.monotonic()
    client.check_model()
    parity = detect_bos(reference, client.tokenize(PROBE), PROBE)
    records: list[dict[str, Any]] = []
    values: list[float] = []
    used: list[Challenge] = []
    if params.mode == "logprobs":
        test: Any = LogprobSPRT(params.tolerance, params.alpha, budget)
        any_logprobs = False
        start = 0
        while test.decision is None:
            batch = generate_challenges(key, min(params.batch, budget - start), start)
            start += len(batch)
            replies = _fetch(
                client,
                [
                    {"prompt": c.prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": TOP_K}
                    for c in batch
                ],
                params.batch,
            )
            rows = reference.rows(batch)
            for c, reply, row in zip(batch, replies, rows, strict=True):
                if test.decision is not None:
                    break
                any_logprobs = any_logprobs or first_top_logprobs(reply.body) is not None
                view = logprob_view(reference, row, reply.body)
                value = logprob_statistic(reply.body, view)
                records.append(make_record(c, c.index, reply.raw, view, value))
                values.append(value)
                used.append(c)
                test.update(value)
                if progress:
                    progress(test.n, budget)
        if not any_logprobs:
            raise NoLogprobs()
        spec = ENDPOINT_TOLERANCES[params.tolerance]
        param_doc: dict[str, Any] = {
            "tolerance": spec.name,
            "delta": spec.delta,
            "p0": spec.p0,
            "p1": spec.p1,
            "alpha": params.alpha,
            "max_queries": budget,
            "top_k": TOP_K,
        }
    else:
        test = SamplingEProcess(params.alpha, budget)
        prompts = generate_challenges(key, params.text_prompts)
        rows_all = reference.rows(prompts)
        counts: dict[tuple[int, str], int] = {}
        seen: dict[int, int] = {}
        q = 0
        while test.decision is None:
            n = min(params.batch, budget - q)
            slots = [(q + j) % len(prompts) for j in range(n)]
            jobs = [
                {
                    "prompt": prompts[s].prompt,
                    "max_tokens": 1,
                    "temperature": 1.0,
                    "seed": int.from_bytes(derive(key, "endpoint-sample", q + j)[:4], "big"),
                }
                for j, s in enumerate(slots)
            ]
            replies = _fetch(client, jobs, params.batch)
            for s, reply in zip(slots, replies, strict=True):
                if test.decision is not None:
                    break
                view = text_view(reference, rows_all[s], reply.body)
                piece = view["class"]
                value = text_log_e(view, counts.get((s, piece), 0), seen.get(s, 0))
                counts[(s, piece)] = counts.get((s, piece), 0) + 1
                seen[s] = seen.get(s, 0) + 1
                records.append(make_record(prompts[s], s, reply.raw, view, value))
                values.append(value)
                test.update(value)
                if progress:
                    progress(test.n, budget)
            q += n
        used = [prompts[s] for s in sorted({int(r["slot"]) for r in records})]
        param_doc = {
            "alpha": params.alpha,
            "max_queries": budget,
            "prompts": len(prompts),
            "temperature": 1.0,
        }
    decision = test.decision
    assert decision is not None
    unique = {c.index: c for c in used}
    cost = client.cost.to_dict()
    cost["elapsed_s"] = round(time.monotonic() - started, 3)
    endpoint = {"url": client.public_url, "model": client.model}
    transcript = build_endpoint_transcript(
        key_id=key_id(key),
        mode=params.mode,
        params=param_doc,
        challenges=[unique[k] for k in sorted(unique)],
        reference=reference.describe(),
        endpoint=endpoint,
        records=records,
        decision=decision.to_dict(),
        cost=cost,
    )
    result = {
        "verdict": decision.verdict,
        "reason": decision.reason,
        "mode": params.mode,
        "queries_used": decision.queries_used,
        "queries_max": budget,
        "alpha": params.alpha,
        "parameters": param_doc,
        "endpoint": endpoint,
        "tokenization": parity,
        "reference": reference.describe(),
        "bounded_replies": sum(
            1
            for r in records
            if any(isinstance(v, dict) for v in (r["reference"].get("pieces") or {}).values())
        ),
        "cost": cost,
        "transcript_root": transcript["root"],
    }
    return EndpointOutcome(result, transcript, values)


def identify_endpoint(
    references: dict[str, Any],
    client: EndpointClient,
    key: bytes,
    params: EndpointParams,
    *,
    keep_transcripts: bool = False,
) -> dict[str, Any]:
    """Verify against each reference; rank SAME first, then by mismatch rate; "none of
    these" when every reference reads DIFFERENT. The ranking is derived from the
    transcripts (rev_tasks/endpoints/identification.py), as the farm's validators derive
    it; ``keep_transcripts`` returns them too (``transcripts``: name to transcript)."""
    from rev_tasks.endpoints.identification import entry_from_transcript, rank

    transcripts = {
        name: verify_endpoint(ref, client, key, params).transcript
        for name, ref in references.items()
    }
    rows = rank([entry_from_transcript(m, t) for m, t in transcripts.items()])
    best = rows[0]["reference"] if rows and rows[0]["verdict"] == "SAME" else None
    none = all(r["verdict"] == "DIFFERENT" for r in rows)
    out: dict[str, Any] = {
        "match": best,
        "none_of_these": none,
        "ranking": rows,
        "cost": client.cost.to_dict(),
    }
    if keep_transcripts:
        out["transcripts"] = transcripts
    return out
