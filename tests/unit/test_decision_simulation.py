"""Empirical and exact error rates of the SPRT in rev_tasks.core.decision.

Two independent checks of the guarantee documented in docs/statistics.md:

* Monte Carlo: thousands of Bernoulli mismatch sequences at p = p0 and p = p1, each fed to
  ``decide()`` itself (so the stopping rule is exactly the production one). The observed
  false-DIFFERENT rate at p0 and false-SAME rate at p1 must not exceed alpha, with no slack.
* Exact: a dynamic programme over (n, mismatches) gives the error probabilities and expected
  sample sizes without sampling noise, for the boundary points and for points inside the
  composite hypotheses (p < p0, p > p1). It also cross-checks the Monte Carlo rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

from rev_tasks.core.decision import _TIE_SLACK, TOLERANCES, ToleranceSpec, decide, thresholds

RUNS = 5000
ALPHAS = (0.01, 0.05)
BUDGETS = (64, 1024)


def exact_outcome(spec: ToleranceSpec, alpha: float, budget: int, p: float) -> dict[str, float]:
    """P(DIFFERENT), P(SAME), P(UNDECIDED) and E[N] for i.i.d. Bernoulli(p) mismatches."""
    lower, upper = thresholds(alpha)
    a, b = spec.step_mismatch, spec.step_match
    slack = _TIE_SLACK * upper
    mass = np.array([1.0])  # P(not stopped, k mismatches so far), k = 0..n
    p_diff = p_same = e_n = 0.0
    for n in range(1, budget + 1):
        new = np.zeros(n + 1)
        new[:-1] += mass * (1 - p)
        new[1:] += mass * p
        k = np.arange(n + 1)
        s = k * a + (n - k) * b
        diff = s >= upper - slack
        same = s <= lower + slack
        p_diff += new[diff].sum()
        p_same += new[same].sum()
        e_n += n * (new[diff].sum() + new[same].sum())
        new[diff | same] = 0.0
        mass = new
    undecided = mass.sum()
    e_n += budget * undecided
    return {"DIFFERENT": p_diff, "SAME": p_same, "UNDECIDED": undecided, "E[N]": e_n}


def simulate(
    spec: ToleranceSpec, alpha: float, budget: int, p: float, rng: np.random.Generator
) -> dict[str, int]:
    """Run ``decide`` on RUNS random sequences; distance 1.0 is a mismatch, 0.0 a match."""
    counts = {"SAME": 0, "DIFFERENT": 0, "UNDECIDED": 0}
    # Nearly every run stops within 64 challenges; extend only the rare long ones.
    first = min(budget, 64)
    x = (rng.random((RUNS, first)) < p).astype(np.float64)
    for row in x:
        seq = _extend(row.tolist(), budget - first, p, rng)
        counts[decide(seq, spec.name, alpha, budget).verdict] += 1
    return counts


def _extend(prefix: list[float], more: int, p: float, rng: np.random.Generator) -> Iterator[float]:
    """The prefix, then (only if decide() asks for it) ``more`` fresh Bernoulli draws."""
    yield from prefix
    if more <= 0:
        return
    tail = (rng.random(more) < p).astype(np.float64)
    yield from tail.tolist()


@pytest.mark.parametrize("tol", sorted(TOLERANCES))
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_error_rates_at_the_boundaries(tol: str, alpha: float, budget: int) -> None:
    spec = TOLERANCES[tol]
    seed = [ALPHAS.index(alpha), BUDGETS.index(budget), sorted(TOLERANCES).index(tol)]
    rng = np.random.default_rng([20240611, *seed])

    at_p0 = simulate(spec, alpha, budget, spec.p0, rng)
    at_p1 = simulate(spec, alpha, budget, spec.p1, rng)
    false_diff = at_p0["DIFFERENT"] / RUNS
    false_same = at_p1["SAME"] / RUNS
    assert false_diff <= alpha, (tol, alpha, budget, at_p0)
    assert false_same <= alpha, (tol, alpha, budget, at_p1)

    # The Monte Carlo agrees with the exact computation (binomial noise, 5 sigma).
    for p, counts, wrong in ((spec.p0, at_p0, "DIFFERENT"), (spec.p1, at_p1, "SAME")):
        ex = exact_outcome(spec, alpha, budget, p)
        assert ex[wrong] <= alpha
        sigma = math.sqrt(max(ex[wrong] * (1 - ex[wrong]), 1e-6) / RUNS)
        assert abs(counts[wrong] / RUNS - ex[wrong]) <= 5 * sigma + 1e-3


@pytest.mark.parametrize("tol", sorted(TOLERANCES))
@pytest.mark.parametrize("alpha", ALPHAS)
def test_exact_error_bounds_over_composite_hypotheses(tol: str, alpha: float) -> None:
    spec = TOLERANCES[tol]
    for budget in BUDGETS:
        for p in np.linspace(0.0, spec.p0, 6):
            assert exact_outcome(spec, alpha, budget, float(p))["DIFFERENT"] <= alpha
        for p in np.linspace(spec.p1, 1.0, 6):
            assert exact_outcome(spec, alpha, budget, float(p))["SAME"] <= alpha


@pytest.mark.parametrize("tol", sorted(TOLERANCES))
def test_identical_and_unrelated_decide_quickly(tol: str) -> None:
    same = decide([0.0] * 64, tol, 0.01, 1024)
    assert same.verdict == "SAME" and same.challenges_used <= 32
    diff = decide([1.0] * 64, tol, 0.01, 1024)
    assert diff.verdict == "DIFFERENT" and diff.challenges_used <= 8
    # Unrelated models have distance ~0.5 on every challenge.
    half = decide([0.5] * 64, tol, 0.01, 1024)
    assert half.verdict == "DIFFERENT" and half.challenges_used <= 8
