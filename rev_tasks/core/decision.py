"""Anytime-valid sequential decision: Wald's SPRT on a per-challenge mismatch event.

For challenge i with normalised Hamming distance d_i in [0, 1], the event is
X_i = 1{d_i > delta}. For a fixed model pair the challenges are i.i.d. draws from the keyed
generator, so X_1, X_2, ... are i.i.d. Bernoulli(p). We test

    H_SAME: p <= p0        against        H_DIFF: p >= p1        (p0 < p1)

with the log-likelihood ratio S_n = k log(p1/p0) + (n - k) log((1-p1)/(1-p0)) (k mismatches
in n challenges), and decide DIFFERENT once S_n >= log(1/alpha), SAME once S_n <= -log(1/alpha),
UNDECIDED when n reaches max_challenges. exp(S_n) is a nonnegative martingale with mean 1
under p = p0 (and exp(-S_n) under p = p1), so Ville's inequality bounds each wrong verdict by
alpha at any stopping time; by monotone likelihood ratio the same bound holds for every p in
the composite hypotheses. docs/statistics.md has the derivation and the numbers, and
tests/unit/test_decision_simulation.py checks the bounds empirically.

All constants live in :data:`TOLERANCES`; change them there and nowhere else.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Literal

__all__ = [
    "MAX_CHALLENGES_LIMIT",
    "TOLERANCES",
    "Decision",
    "SequentialTest",
    "Tolerance",
    "ToleranceSpec",
    "Verdict",
    "decide",
    "thresholds",
]

Verdict = Literal["SAME", "DIFFERENT", "UNDECIDED"]

#: Largest challenge budget accepted (the committed challenge set is bounded by it).
MAX_CHALLENGES_LIMIT = 4096

# Relative slack on the crossing test so that exact ties in real arithmetic (for example
# log(1/0.01) == 2*log(10) at p1/p0 = 10) count as crossings despite rounding. It inflates
# the error bound by a factor below 1 + 1e-11; see docs/statistics.md.
_TIE_SLACK = 1e-12


class Tolerance(StrEnum):
    """Named meanings of "the same model"."""

    EXACT = "exact"
    PRECISION = "precision"


@dataclass(frozen=True)
class ToleranceSpec:
    """Constants of one tolerance.

    ``delta`` is the per-challenge threshold on the fraction of differing bits above which a
    challenge counts as a mismatch; ``p0``/``p1`` are the mismatch rates that define SAME and
    DIFFERENT (the interval between them is the indifference zone).
    """

    name: str
    delta: float
    p0: float
    p1: float
    description: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delta) and 0.0 <= self.delta < 1.0):
            raise ValueError(f"tolerance {self.name!r}: delta must be in [0, 1), got {self.delta}")
        if not (0.0 < self.p0 < self.p1 < 1.0):
            raise ValueError(
                f"tolerance {self.name!r}: need 0 < p0 < p1 < 1, got p0={self.p0}, p1={self.p1}"
            )

    @property
    def step_mismatch(self) -> float:
        """Increment of S_n for a mismatch: log(p1/p0) > 0."""
        return math.log(self.p1 / self.p0)

    @property
    def step_match(self) -> float:
        """Increment of S_n for a match: log((1-p1)/(1-p0)) < 0."""
        return math.log((1.0 - self.p1) / (1.0 - self.p0))


# The lead recalibrates delta from measured float noise (`make calibrate`); docs/statistics.md
# records where the numbers come from. Keep every constant here.
TOLERANCES: dict[str, ToleranceSpec] = {
    Tolerance.EXACT.value: ToleranceSpec(
        name="exact",
        delta=0.0,
        p0=0.05,
        p1=0.5,
        description=(
            "same weights and dtype: a challenge is a mismatch when any signature bit differs "
            "(float noise across processes, thread counts and batch shapes flipped none in "
            "calibration; p0 still allows 5% of challenges to show a stray flip)"
        ),
    ),
    Tolerance.PRECISION.value: ToleranceSpec(
        name="precision",
        # The fixed delta only where the reference has no self-calibration (transcripts and
        # fingerprints made before it, streamed references); a verification otherwise uses
        # rev_tasks.core.calibration's delta, measured on the reference's own casts.
        delta=0.0035,
        p0=0.05,
        p1=0.5,
        description=(
            "same weights up to fp16/bf16 casting: a challenge is a mismatch when more of "
            "its signature bits differ than 1.25x the most the reference's own fp16 and "
            "bf16 casts flip on 16 calibration challenges (fixed 0.35% without calibration)"
        ),
    ),
}


def _spec(tolerance: str | Tolerance | ToleranceSpec) -> ToleranceSpec:
    if isinstance(tolerance, ToleranceSpec):
        return tolerance
    name = tolerance.value if isinstance(tolerance, Tolerance) else tolerance
    if not isinstance(name, str) or name not in TOLERANCES:
        raise ValueError(
            f"unknown tolerance {tolerance!r}; expected one of: {', '.join(sorted(TOLERANCES))}"
        )
    return TOLERANCES[name]


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha must be a number in (0, 0.5], got {alpha!r}")
    a = float(alpha)
    if not (math.isfinite(a) and 0.0 < a <= 0.5):
        raise ValueError(f"alpha must be in (0, 0.5], got {alpha!r}")
    return a


def _check_budget(max_challenges: int) -> int:
    if isinstance(max_challenges, bool) or not isinstance(max_challenges, int):
        raise ValueError(
            f"max_challenges must be an int in [1, {MAX_CHALLENGES_LIMIT}], got {max_challenges!r}"
        )
    if not 1 <= max_challenges <= MAX_CHALLENGES_LIMIT:
        raise ValueError(
            f"max_challenges must be in [1, {MAX_CHALLENGES_LIMIT}], got {max_challenges}"
        )
    return max_challenges


def _check_distance(distance: float) -> float:
    if isinstance(distance, bool) or not isinstance(distance, numbers.Real):
        raise ValueError(f"distance must be a finite number in [0, 1], got {distance!r}")
    d = float(distance)
    if not (math.isfinite(d) and 0.0 <= d <= 1.0):
        raise ValueError(f"distance must be a finite number in [0, 1], got {distance!r}")
    return d


def thresholds(alpha: float) -> tuple[float, float]:
    """(lower, upper) = (-log(1/alpha), log(1/alpha)): SAME at or below, DIFFERENT at or above."""
    a = math.log(1.0 / _check_alpha(alpha))
    return -a, a


@dataclass(frozen=True)
class Decision:
    """Outcome of a sequential test: the verdict and the evidence it stopped on."""

    verdict: Verdict
    challenges_used: int
    statistic: float
    mismatches: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the transcript's ``decision`` object)."""
        return asdict(self)


class SequentialTest:
    """Incremental SPRT: feed per-challenge distances with :meth:`update` until decided.

    The statistic is recomputed from the integer counts (n, mismatches) at every step, so
    the result does not depend on float summation order: the CLI, the farm and the auditor
    replaying a transcript reach the same verdict at the same challenge.
    """

    def __init__(
        self,
        tolerance: str | Tolerance | ToleranceSpec,
        alpha: float,
        max_challenges: int,
    ) -> None:
        self.spec = _spec(tolerance)
        self.alpha = _check_alpha(alpha)
        self.max_challenges = _check_budget(max_challenges)
        self.lower, self.upper = thresholds(self.alpha)
        self._a = self.spec.step_mismatch
        self._b = self.spec.step_match
        self.n = 0
        self.mismatches = 0
        self.statistic = 0.0
        self._decision: Decision | None = None

    @property
    def decision(self) -> Decision | None:
        """The verdict once reached (SAME, DIFFERENT or, at the budget, UNDECIDED), else None."""
        return self._decision

    def update(self, distance: float) -> None:
        """Add one challenge's normalised distance. Ignored once a decision exists.

        Ignoring (rather than raising) lets a caller feed a whole batch and read
        :attr:`decision` afterwards; the decision point is fixed at the first crossing.
        """
        d = _check_distance(distance)
        if self._decision is not None:
            return
        self.n += 1
        if d > self.spec.delta:
            self.mismatches += 1
        k, n = self.mismatches, self.n
        self.statistic = k * self._a + (n - k) * self._b
        self._decision = self._check()

    def _check(self) -> Decision | None:
        s, n, k, sp = self.statistic, self.n, self.mismatches, self.spec
        slack = _TIE_SLACK * self.upper
        common = (
            f"{k} of {n} challenges differ by more than delta={sp.delta:g} "
            f"(tolerance '{sp.name}', p0={sp.p0:g}, p1={sp.p1:g})"
        )
        if s >= self.upper - slack:
            return Decision(
                "DIFFERENT",
                n,
                s,
                k,
                f"DIFFERENT: {common}; log-likelihood ratio {s:.3f} >= log(1/alpha) = "
                f"{self.upper:.3f}, so a false DIFFERENT has probability at most "
                f"alpha={self.alpha:g}.",
            )
        if s <= self.lower + slack:
            return Decision(
                "SAME",
                n,
                s,
                k,
                f"SAME: {common}; log-likelihood ratio {s:.3f} <= -log(1/alpha) = "
                f"{self.lower:.3f}, so a false SAME has probability at most alpha={self.alpha:g}.",
            )
        if n >= self.max_challenges:
            return Decision(
                "UNDECIDED",
                n,
                s,
                k,
                f"UNDECIDED: {common}; log-likelihood ratio {s:.3f} stayed inside "
                f"({self.lower:.3f}, {self.upper:.3f}) for the whole budget of "
                f"{self.max_challenges} challenges (mismatch rate between p0 and p1, or too "
                f"small a budget).",
            )
        return None

    def state(self) -> dict[str, Any]:
        """Progress snapshot for logs and job status (JSON-ready)."""
        return {
            "tolerance": self.spec.name,
            "alpha": self.alpha,
            "max_challenges": self.max_challenges,
            "n": self.n,
            "mismatches": self.mismatches,
            "llr": self.statistic,
            "lower": self.lower,
            "upper": self.upper,
            "verdict": None if self._decision is None else self._decision.verdict,
        }


def decide(
    distances: Iterable[float],
    tolerance: str | Tolerance | ToleranceSpec,
    alpha: float,
    max_challenges: int,
) -> Decision:
    """Replay a sequence of distances; stop at the first crossing and ignore the rest.

    If the sequence ends before any crossing and before the budget, the result is
    UNDECIDED with the evidence so far (the reason says the sequence ran out).
    """
    test = SequentialTest(tolerance, alpha, max_challenges)
    for d in distances:
        test.update(d)
        if test.decision is not None:
            return test.decision
    sp = test.spec
    return Decision(
        "UNDECIDED",
        test.n,
        test.statistic,
        test.mismatches,
        f"UNDECIDED: only {test.n} distances were given (budget {test.max_challenges}); "
        f"{test.mismatches} differ by more than delta={sp.delta:g} (tolerance '{sp.name}'), "
        f"log-likelihood ratio {test.statistic:.3f} inside "
        f"({test.lower:.3f}, {test.upper:.3f}).",
    )
