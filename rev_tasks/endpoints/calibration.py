"""Per-challenge logprobs statistics of served variants: the data behind ENDPOINT_TOLERANCES.

Unlike a verification it never stops early: each variant answers the same ``n`` challenges,
and the table reports the distribution of s (nats) and the mismatch rate under each
tolerance's delta. Serving noise is measured endpoint against itself: the same challenges
asked twice one at a time (repeat) and while other requests are in flight (concurrent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rev_tasks.core.blackbox import ENDPOINT_TOLERANCES
from rev_tasks.core.challenges import generate_challenges
from rev_tasks.endpoints.client import EndpointClient
from rev_tasks.endpoints.evidence import first_top_logprobs, logprob_statistic, logprob_view
from rev_tasks.endpoints.reference import Reference, detect_bos
from rev_tasks.endpoints.verify import TOP_K

__all__ = ["calibrate_variant", "requery_gap", "self_noise", "summarise"]


def _ask(client: EndpointClient, prompts: Sequence[str], width: int) -> list[Any]:
    def one(p: str) -> Any:
        return client.completion(p, max_tokens=1, temperature=0.0, logprobs=TOP_K).body

    with ThreadPoolExecutor(max_workers=width) as pool:
        return list(pool.map(one, prompts))


def calibrate_variant(
    reference: Reference, client: EndpointClient, key: bytes, n: int
) -> list[float]:
    """s for challenges 0..n-1 of ``key`` against the reference."""
    probe = "The capital of France is"
    detect_bos(reference, client.tokenize(probe), probe)
    challenges = generate_challenges(key, n)
    prompts = [c.prompt for c in challenges]
    bodies = _ask(client, prompts, 4)
    rows = reference.next_logprobs(prompts)
    return [
        logprob_statistic(b, logprob_view(reference, r, b))
        for b, r in zip(bodies, rows, strict=True)
    ]


def _pairwise(a: Any, b: Any) -> float:
    ta, tb = first_top_logprobs(a), first_top_logprobs(b)
    if ta is None or tb is None:
        return 0.0 if ta == tb else math.inf
    common = set(ta) & set(tb)
    return max((abs(ta[k] - tb[k]) for k in common), default=0.0)


def requery_gap(recorded: Any, again: Any) -> float:
    """How far the endpoint's answer now is from the recorded one (nats, the serving-noise
    measure of :func:`self_noise`); +inf when the two top-k lists share no piece.

    The farm's validators re-ask a sample of a job's challenges and hold this to the job's
    tolerance delta: the endpoint against itself stays within the serving noise the
    tolerances were calibrated on (docs/endpoints.md), a forged record does not.
    """
    ta, tb = first_top_logprobs(recorded), first_top_logprobs(again)
    if ta is not None and tb is not None and not set(ta) & set(tb):
        return math.inf
    return _pairwise(recorded, again)


def self_noise(client: EndpointClient, key: bytes, n: int) -> dict[str, list[float]]:
    """Endpoint against itself: one at a time twice, then with 4 requests in flight."""
    prompts = [c.prompt for c in generate_challenges(key, n)]
    first = _ask(client, prompts, 1)
    again = _ask(client, prompts, 1)
    concurrent = _ask(client, prompts, 4)
    return {
        "repeat": [_pairwise(x, y) for x, y in zip(first, again, strict=True)],
        "concurrent": [_pairwise(x, y) for x, y in zip(first, concurrent, strict=True)],
    }


def summarise(values: Sequence[float]) -> dict[str, Any]:
    v = np.array([x if math.isfinite(x) else np.inf for x in values], dtype=float)
    finite = v[np.isfinite(v)]
    out: dict[str, Any] = {
        "n": int(v.size),
        "median": float(np.median(v)) if v.size else None,
        "p90": float(np.quantile(finite, 0.9)) if finite.size else None,
        "max": float(v.max()) if v.size else None,
        "unmatched": int(v.size - finite.size),
    }
    for name, spec in ENDPOINT_TOLERANCES.items():
        out[f"rate_{name}"] = float(np.mean(v > spec.delta)) if v.size else None
    return out
