"""Sequential decisions of a black-box (endpoint) verification; docs/statistics.md §13.

logprobs mode: for challenge i the endpoint's top-k next-token log-probabilities give one
number s_i >= 0, the largest |log p_endpoint(t) - log p_reference(t)| over its top tokens
(rev_tasks/endpoints/evidence.py). The challenges are i.i.d. draws of the keyed generator, so
the events X_i = 1{s_i > delta} are i.i.d. Bernoulli(p) for a fixed (reference, endpoint)
pair, and Wald's SPRT of p <= p0 against p >= p1 decides SAME / DIFFERENT with each wrong
verdict bounded by alpha at any stopping time (Ville's inequality), exactly as the white-box
test of rev_tasks/core/decision.py.

text mode: the endpoint samples one token at temperature 1 per query. Under H0 (it samples
the reference's distribution) the product of per-query e-values E_i = q_i(y_i) / p_i(y_i),
where q_i is any alternative fixed before y_i is seen, is a nonnegative martingale with mean 1,
so DIFFERENT when it reaches 1/alpha has false-DIFFERENT probability at most alpha. Sampling
alone cannot certify SAME with a bounded error against every alternative: text mode answers
DIFFERENT or UNDECIDED.

All constants live in :data:`ENDPOINT_TOLERANCES`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = [
    "ENDPOINT_TOLERANCES",
    "EndpointTolerance",
    "LogprobSPRT",
    "SamplingEProcess",
    "TextDecision",
]

Verdict = Literal["SAME", "DIFFERENT", "UNDECIDED"]
_TIE_SLACK = 1e-12


@dataclass(frozen=True)
class EndpointTolerance:
    """delta in nats on s_i; p0 / p1 the event rates that define SAME / DIFFERENT."""

    name: str
    delta: float
    p0: float
    p1: float
    description: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"tolerance {self.name!r}: delta must be > 0")
        if not (0.0 < self.p0 < self.p1 < 1.0):
            raise ValueError(f"tolerance {self.name!r}: need 0 < p0 < p1 < 1")


ENDPOINT_TOLERANCES: dict[str, EndpointTolerance] = {
    "weights": EndpointTolerance(
        name="weights",
        delta=0.05,
        p0=0.05,
        p1=0.5,
        description=(
            "the reference's weights at f32/f16 on another engine: a challenge is a mismatch "
            "when a top-5 log-probability differs by more than 0.05 nats (serving noise of "
            "f32/f16 GGUF in llama.cpp stays below it; Q8_0/Q4_1 quantisation, 1% noise and "
            "ten fine-tuning steps exceed it)"
        ),
    ),
    "quantised": EndpointTolerance(
        name="quantised",
        delta=0.4,
        p0=0.05,
        p1=0.5,
        description=(
            "accepts an 8-bit or the original Q4_1 serving of the reference: mismatch above "
            "0.4 nats; it does NOT separate small fine-tunes or 1% noise from quantisation"
        ),
    ),
}


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, float | int) and 0.0 < float(alpha) < 0.5):
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class TextDecision:
    """A verdict and what it stopped on (``statistic``: the log-likelihood ratio or log E)."""

    verdict: Verdict
    queries_used: int
    statistic: float
    mismatches: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LogprobSPRT:
    """Wald's SPRT on X_i = 1{s_i > delta}; recomputed from integer counts at every step."""

    def __init__(self, tolerance: str | EndpointTolerance, alpha: float, max_queries: int) -> None:
        if isinstance(tolerance, str):
            if tolerance not in ENDPOINT_TOLERANCES:
                raise ValueError(
                    f"unknown endpoint tolerance {tolerance!r}; "
                    f"one of {', '.join(ENDPOINT_TOLERANCES)}"
                )
            tolerance = ENDPOINT_TOLERANCES[tolerance]
        self.spec = tolerance
        self.alpha = _check_alpha(alpha)
        if max_queries < 1:
            raise ValueError("max_queries must be at least 1")
        self.max_queries = max_queries
        self.upper = math.log(1.0 / self.alpha)
        self.lower = -self.upper
        self.n = 0
        self.mismatches = 0
        self.statistic = 0.0
        self.decision: TextDecision | None = None

    def update(self, s: float) -> None:
        """Add one challenge's statistic (nats; +inf for an unmatched token). Ignored once decided."""
        if self.decision is not None:
            return
        if math.isnan(s) or s < 0:
            raise ValueError(f"statistic must be >= 0, got {s!r}")
        sp = self.spec
        self.n += 1
        self.mismatches += int(s > sp.delta)
        k, n = self.mismatches, self.n
        self.statistic = k * math.log(sp.p1 / sp.p0) + (n - k) * math.log((1 - sp.p1) / (1 - sp.p0))
        common = (
            f"{k} of {n} challenges differ by more than delta={sp.delta:g} nats "
            f"(tolerance '{sp.name}', p0={sp.p0:g}, p1={sp.p1:g})"
        )
        slack = _TIE_SLACK * self.upper
        if self.statistic >= self.upper - slack:
            self.decision = TextDecision(
                "DIFFERENT",
                n,
                self.statistic,
                k,
                f"DIFFERENT: {common}; log-likelihood ratio {self.statistic:.3f} >= "
                f"log(1/alpha) = {self.upper:.3f}",
            )
        elif self.statistic <= self.lower + slack:
            self.decision = TextDecision(
                "SAME",
                n,
                self.statistic,
                k,
                f"SAME: {common}; log-likelihood ratio {self.statistic:.3f} <= "
                f"-log(1/alpha) = {self.lower:.3f}",
            )
        elif n >= self.max_queries:
            self.decision = TextDecision(
                "UNDECIDED",
                n,
                self.statistic,
                k,
                f"UNDECIDED: {common}; log-likelihood ratio {self.statistic:.3f} stayed inside "
                f"({self.lower:.3f}, {self.upper:.3f}) for the budget of {self.max_queries}",
            )


class SamplingEProcess:
    """Test of "the endpoint samples the reference's distribution" by betting.

    :meth:`update` takes log E_i = log q_i(y_i) - log p_i(y_i) for an alternative q_i chosen
    before y_i was drawn. DIFFERENT once the running sum reaches log(1/alpha).
    """

    def __init__(self, alpha: float, max_queries: int) -> None:
        self.alpha = _check_alpha(alpha)
        if max_queries < 1:
            raise ValueError("max_queries must be at least 1")
        self.max_queries = max_queries
        self.upper = math.log(1.0 / self.alpha)
        self.n = 0
        self.statistic = 0.0
        self.decision: TextDecision | None = None

    def update(self, log_e: float) -> None:
        if self.decision is not None:
            return
        if math.isnan(log_e):
            raise ValueError("log e-value is NaN")
        self.n += 1
        self.statistic += log_e
        if self.statistic >= self.upper * (1 - _TIE_SLACK):
            self.decision = TextDecision(
                "DIFFERENT",
                self.n,
                self.statistic,
                0,
                f"DIFFERENT: after {self.n} sampled tokens the e-process log E = "
                f"{self.statistic:.3f} >= log(1/alpha) = {self.upper:.3f}: the endpoint does not "
                "sample the reference's distribution (false DIFFERENT at most alpha)",
            )
        elif self.n >= self.max_queries:
            self.decision = TextDecision(
                "UNDECIDED",
                self.n,
                self.statistic,
                0,
                f"UNDECIDED: log E = {self.statistic:.3f} < {self.upper:.3f} after the budget of "
                f"{self.max_queries} sampled tokens; text mode can refute, never certify, SAME",
            )
