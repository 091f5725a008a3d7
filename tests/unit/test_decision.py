"""Sequential probability ratio test: constants, validation, stopping rule, edge cases."""

from __future__ import annotations

import json
import math

import pytest

from rev_tasks.core.decision import (
    TOLERANCES,
    Decision,
    SequentialTest,
    Tolerance,
    ToleranceSpec,
    decide,
    thresholds,
)


def n_same(spec: ToleranceSpec, alpha: float) -> int:
    return math.ceil(math.log(1 / alpha) / math.log((1 - spec.p0) / (1 - spec.p1)))


def n_diff(spec: ToleranceSpec, alpha: float) -> int:
    return math.ceil(math.log(1 / alpha) / math.log(spec.p1 / spec.p0))


def test_constants() -> None:
    assert set(TOLERANCES) == {"exact", "precision"}
    e, p = TOLERANCES["exact"], TOLERANCES["precision"]
    assert (e.name, e.delta, e.p0, e.p1) == ("exact", 0.0, 0.05, 0.5)
    assert (p.name, p.delta, p.p0, p.p1) == ("precision", 0.0035, 0.05, 0.5)
    assert e.description and p.description
    assert Tolerance("exact") is Tolerance.EXACT


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(delta=-0.1), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(delta=math.nan), "delta"),
        (dict(p0=0.5, p1=0.5), "p0 < p1"),
        (dict(p0=0.0), "p0 < p1"),
        (dict(p1=1.0), "p0 < p1"),
    ],
)
def test_tolerance_spec_validation(kw: dict, match: str) -> None:
    base = dict(name="t", delta=0.01, p0=0.05, p1=0.5, description="")
    with pytest.raises(ValueError, match=match):
        ToleranceSpec(**{**base, **kw})


@pytest.mark.parametrize("alpha", [0, 0.0, -0.1, 0.51, 1.0, math.nan, math.inf, "x", None, True])
def test_alpha_validation(alpha: object) -> None:
    with pytest.raises(ValueError, match="alpha"):
        SequentialTest("exact", alpha, 64)  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [0, -1, 4097, 1.5, "64", True, None])
def test_budget_validation(budget: object) -> None:
    with pytest.raises(ValueError, match="max_challenges"):
        decide([0.0], "exact", 0.05, budget)  # type: ignore[arg-type]


def test_tolerance_validation() -> None:
    with pytest.raises(ValueError, match="unknown tolerance 'loose'.*exact, precision"):
        decide([0.0], "loose", 0.05, 64)
    # accepted forms
    assert decide([0.0], Tolerance.PRECISION, 0.05, 64).verdict == "UNDECIDED"
    assert decide([0.0], TOLERANCES["exact"], 0.05, 64).verdict == "UNDECIDED"


@pytest.mark.parametrize("d", [-0.01, 1.01, math.nan, math.inf, -math.inf, "0.1", None, True])
def test_distance_validation(d: object) -> None:
    t = SequentialTest("exact", 0.05, 64)
    with pytest.raises(ValueError, match="distance"):
        t.update(d)  # type: ignore[arg-type]
    assert t.n == 0


def test_boundary_values_accepted() -> None:
    import numpy as np

    t = SequentialTest("exact", 0.5, 1)
    t.update(1.0)
    assert t.decision is not None
    SequentialTest("exact", 0.5, 4096).update(0.0)
    t = SequentialTest("exact", np.float64(0.05), 64)
    t.update(np.float32(0.25))
    t.update(np.int64(0))
    assert t.n == 2 and t.mismatches == 1


@pytest.mark.parametrize("tol", ["exact", "precision"])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.001])
def test_identical_reaches_same_at_formula(tol: str, alpha: float) -> None:
    spec = TOLERANCES[tol]
    d = decide([0.0] * 4096, tol, alpha, 4096)
    assert d.verdict == "SAME"
    assert d.challenges_used == n_same(spec, alpha)
    assert d.mismatches == 0
    assert d.statistic <= -math.log(1 / alpha)


@pytest.mark.parametrize("tol", ["exact", "precision"])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.001])
def test_all_mismatch_reaches_different_at_formula(tol: str, alpha: float) -> None:
    spec = TOLERANCES[tol]
    d = decide([0.5] * 4096, tol, alpha, 4096)
    assert d.verdict == "DIFFERENT"
    assert d.challenges_used == n_diff(spec, alpha)
    assert d.mismatches == d.challenges_used


def test_documented_numbers() -> None:
    # docs/statistics.md quotes these; p0=0.05, p1=0.5 for both tolerances.
    spec = TOLERANCES["exact"]
    assert (n_same(spec, 0.01), n_same(spec, 0.05)) == (8, 5)
    assert (n_diff(spec, 0.01), n_diff(spec, 0.05)) == (2, 2)


def test_exact_tie_counts_as_crossing() -> None:
    # log(1/0.01) == 2 * log(0.5/0.05) in real arithmetic: two mismatches must decide.
    d = decide([1.0, 1.0], "exact", 0.01, 64)
    assert (d.verdict, d.challenges_used) == ("DIFFERENT", 2)


def test_delta_boundary_is_a_match() -> None:
    spec = TOLERANCES["precision"]
    t = SequentialTest("precision", 0.05, 64)
    t.update(spec.delta)
    assert t.mismatches == 0
    t.update(math.nextafter(spec.delta, 1.0))
    assert t.mismatches == 1


def test_statistic_formula() -> None:
    spec = TOLERANCES["exact"]
    seq = [0.0, 0.3, 0.0, 0.0, 0.3, 0.0]
    t = SequentialTest("exact", 0.001, 64)
    for d in seq:
        t.update(d)
    k, n = 2, 6
    want = k * math.log(spec.p1 / spec.p0) + (n - k) * math.log((1 - spec.p1) / (1 - spec.p0))
    assert t.statistic == pytest.approx(want, rel=1e-15)
    st = t.state()
    assert st["n"] == 6 and st["mismatches"] == 2 and st["llr"] == t.statistic
    assert st["verdict"] is None and t.decision is None
    assert (st["lower"], st["upper"]) == thresholds(0.001)
    json.dumps(st)


def test_stops_at_first_crossing_and_ignores_rest() -> None:
    seq = [1.0, 1.0, math.nan, "garbage", -5]  # later entries are never looked at
    d = decide(seq, "exact", 0.05, 64)  # type: ignore[arg-type]
    assert (d.verdict, d.challenges_used, d.mismatches) == ("DIFFERENT", 2, 2)
    # SequentialTest: updates after the decision change nothing
    t = SequentialTest("exact", 0.05, 64)
    for x in [0.0] * 5:
        t.update(x)
    first = t.decision
    assert first is not None and first.verdict == "SAME" and first.challenges_used == 5
    t.update(1.0)
    t.update(1.0)
    assert t.decision == first and t.n == 5


def test_matches_sequential_test_on_mixed_sequence() -> None:
    seq = [0.0, 0.1, 0.0, 0.0, 0.2] + [0.0] * 20
    d = decide(seq, "precision", 0.01, 64)
    t = SequentialTest("precision", 0.01, 64)
    for x in seq:
        t.update(x)
        if t.decision:
            break
    assert t.decision == d
    assert (d.verdict, d.mismatches, d.challenges_used) == ("SAME", 2, 17)


def test_budget_gives_undecided() -> None:
    d = decide([0.0] * 100, "exact", 0.01, 3)
    assert (d.verdict, d.challenges_used) == ("UNDECIDED", 3)
    assert "budget of 3" in d.reason
    # crossing exactly at the budget wins over UNDECIDED
    d = decide([0.0] * 100, "exact", 0.01, 8)
    assert (d.verdict, d.challenges_used) == ("SAME", 8)
    # a mismatch rate inside the indifference zone stays undecided for a while
    alternating = [0.0, 0.0, 0.0, 1.0] * 10
    d = decide(alternating, "exact", 0.01, 40)
    assert d.verdict == "UNDECIDED" and d.challenges_used == 40


def test_short_sequence_is_undecided() -> None:
    d = decide([0.0, 0.0], "exact", 0.05, 64)
    assert (d.verdict, d.challenges_used) == ("UNDECIDED", 2)
    assert "only 2 distances" in d.reason
    assert decide([], "exact", 0.05, 64).challenges_used == 0


def test_decision_to_dict() -> None:
    d = decide([1.0] * 4, "exact", 0.05, 64)
    doc = d.to_dict()
    assert set(doc) == {"verdict", "challenges_used", "statistic", "mismatches", "reason"}
    assert json.loads(json.dumps(doc)) == doc
    assert Decision(**doc) == d
    assert d.reason.startswith("DIFFERENT:") and "alpha=0.05" in d.reason
