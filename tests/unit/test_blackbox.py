"""The black-box tests' guarantees, simulated: false verdicts stay below alpha."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rev_tasks.core.blackbox import ENDPOINT_TOLERANCES, LogprobSPRT, SamplingEProcess
from rev_tasks.endpoints.evidence import logprob_statistic, text_log_e

ALPHA = 0.01


def _run_sprt(p: float, rng: np.random.Generator, budget: int = 200) -> str:
    test = LogprobSPRT("weights", ALPHA, budget)
    delta = ENDPOINT_TOLERANCES["weights"].delta
    while test.decision is None:
        test.update(delta * 2 if rng.random() < p else 0.0)
    return test.decision.verdict


def test_sprt_error_rates_and_sample_sizes() -> None:
    rng = np.random.default_rng(0)
    spec = ENDPOINT_TOLERANCES["weights"]
    runs = 2000
    false_diff = sum(_run_sprt(spec.p0, rng) == "DIFFERENT" for _ in range(runs)) / runs
    false_same = sum(_run_sprt(spec.p1, rng) == "SAME" for _ in range(runs)) / runs
    assert false_diff <= ALPHA and false_same <= ALPHA
    # No mismatch at all: SAME after exactly 8 queries; two mismatches first: DIFFERENT after 2.
    t = LogprobSPRT("weights", ALPHA, 64)
    for _ in range(8):
        t.update(0.0)
    assert t.decision is not None and (t.decision.verdict, t.decision.queries_used) == ("SAME", 8)
    t = LogprobSPRT("weights", ALPHA, 64)
    t.update(math.inf)
    t.update(1.0)
    assert (t.decision.verdict, t.decision.queries_used) == ("DIFFERENT", 2)


def test_sampling_e_process_is_valid_under_h0() -> None:
    """y ~ p exactly: the e-process reaches 1/alpha in at most alpha of the runs."""
    rng = np.random.default_rng(1)
    runs, budget, prompts = 400, 150, 4
    false_diff = 0
    for _ in range(runs):
        dists = [rng.dirichlet(np.full(6, 0.5)) for _ in range(prompts)]
        test = SamplingEProcess(ALPHA, budget)
        counts: dict[tuple[int, int], int] = {}
        seen = [0] * prompts
        q = 0
        while test.decision is None:
            s = q % prompts
            p = dists[s]
            y = int(rng.choice(len(p), p=p))
            tempered = []
            for beta in (0.7, 1.4):
                pb = p**beta / (p**beta).sum()
                tempered.append(float(np.log(pb[y])))
            view = {"piece": str(y), "logp": float(np.log(p[y])), "tempered": tempered}
            test.update(text_log_e(view, counts.get((s, y), 0), seen[s]))
            counts[(s, y)] = counts.get((s, y), 0) + 1
            seen[s] += 1
            q += 1
        false_diff += test.decision.verdict == "DIFFERENT"
    assert false_diff / runs <= ALPHA * 2  # alpha plus Monte Carlo slack (400 runs)


def test_e_process_detects_a_different_sampler() -> None:
    rng = np.random.default_rng(2)
    p = np.array([0.5, 0.3, 0.1, 0.1])
    q = np.array([0.3, 0.5, 0.1, 0.1])
    test = SamplingEProcess(ALPHA, 2000)
    counts: dict[int, int] = {}
    n = 0
    while test.decision is None:
        y = int(rng.choice(4, p=q))
        tempered = [float(np.log((p**b / (p**b).sum())[y])) for b in (0.7, 1.4)]
        view = {"piece": str(y), "logp": float(np.log(p[y])), "tempered": tempered}
        test.update(text_log_e(view, counts.get(y, 0), n))
        counts[y] = counts.get(y, 0) + 1
        n += 1
    assert test.decision.verdict == "DIFFERENT"


def _body(top: dict[str, float] | None, text: str = "x") -> dict:
    lp = None if top is None else {"top_logprobs": [top], "tokens": [text]}
    return {"choices": [{"text": text, "logprobs": lp, "finish_reason": "length"}]}


def test_logprob_statistic() -> None:
    view = {"pieces": {" Paris": -0.25, " the": -2.7, "": "ambiguous"}, "max": -0.25, "empty": -9.0}
    assert logprob_statistic(_body({" Paris": -0.26, " the": -2.6}), view) == pytest.approx(0.1)
    assert logprob_statistic(_body({" Paris": -0.25, "": -5.0}), view) == 0.0  # ambiguous skipped
    unknown = {"pieces": {" Lyon": None}, "max": -0.25, "empty": -9.0}
    assert logprob_statistic(_body({" Lyon": -1.0}), unknown) == math.inf
    # Stopped at once: how far the reference is from stopping too.
    assert logprob_statistic(_body(None, text=""), view) == pytest.approx(8.75)
