"""The ``precision`` threshold derived from the reference itself: its own half-precision casts.

A fixed δ means "the same weights up to fp16/bf16 rounding" only on the model it was measured
on: per-challenge distances shrink with depth and with a few massive activations dominating
the pooled states (a bf16 cast of the 6-layer MiniLM moves ~0.0015 of the bits, of the
30-layer SmolLM2 ~0.0002). So at the start of a verification, and when a fingerprint is made,
the reference's weights are rounded to float16 and to bfloat16 (compute stays fp32) and run on
:data:`CALIBRATION_CHALLENGES` calibration challenges drawn from ``derive(key, "calibration",
0)``: a different PRF input from the job's challenges, so the candidate never sees them and
is never run on them. The threshold is

    δ = max(FLOOR, MARGIN × max_c d_c)

where d_c runs over both casts' distances on the calibration challenges. With 16
challenges the maximum is about the 94th percentile of a cast's distances, which is what
must fall below δ for a cast to read SAME (p0 = 0.05); MARGIN covers the sampling error of
that estimate. A mean times a constant does not transfer: MiniLM's bf16 cast flips ~25 bits a
challenge with a narrow spread, SmolLM2's ~3 with a Poisson-like one. The calibration block (the differing-bit
counts, total bits, margin and floor) goes into the transcript, so an auditor re-derives δ
with :func:`calibrated_delta` and then the verdict with ``decide``. docs/statistics.md §9 has
the measurements behind MARGIN and FLOOR.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CALIBRATION_CHALLENGES",
    "CALIBRATION_DTYPES",
    "CALIBRATION_FORMAT",
    "CALIBRATION_LABEL",
    "FLOOR",
    "MARGIN",
    "Calibration",
    "calibrated_delta",
    "check_calibration",
]

CALIBRATION_FORMAT = "rev-calibration/1"
#: ``derive`` label of the calibration challenge key; the job's challenges use "challenge".
CALIBRATION_LABEL = "calibration"
#: The reference's own roundings that ``precision`` must accept.
CALIBRATION_DTYPES = ("float16", "bfloat16")
#: Calibration challenges per cast (each costs one reference forward pass per cast).
CALIBRATION_CHALLENGES = 16
#: δ over the largest calibration distance. See docs/statistics.md §9 for the measurements.
MARGIN = 1.25
#: Smallest δ (fraction of the bits): keeps precision above cross-process float noise on a
#: model whose casts flip (almost) no bits.
FLOOR = 0.0002


def calibrated_delta(
    differing_bits: Mapping[str, Sequence[int]],
    total_bits: int,
    margin: float = MARGIN,
    floor: float = FLOOR,
) -> float:
    """δ = max(floor, margin × the largest calibration count / total_bits), from integer
    counts, so every process (engine, validator, auditor) computes the same float."""
    if total_bits <= 0:
        raise ValueError("total_bits must be positive")
    worst = max((int(b) for v in differing_bits.values() for b in v), default=0)
    delta = max(float(floor), float(margin) * worst / int(total_bits))
    return min(delta, 0.5)


@dataclass(frozen=True)
class Calibration:
    """The reference's own cast distances on the calibration challenges, and the δ they give."""

    challenges: int
    total_bits: int
    differing_bits: dict[str, list[int]]
    margin: float = MARGIN
    floor: float = FLOOR

    @property
    def delta(self) -> float:
        return calibrated_delta(
            self.differing_bits,
            self.total_bits,
            self.margin,
            self.floor,
        )

    def distances(self) -> dict[str, list[float]]:
        return {k: [b / self.total_bits for b in v] for k, v in self.differing_bits.items()}

    def to_dict(self) -> dict[str, Any]:
        """The JSON block stored in fingerprints and transcripts (``calibration``)."""
        return {
            "format": CALIBRATION_FORMAT,
            "label": CALIBRATION_LABEL,
            "challenges": self.challenges,
            "total_bits": self.total_bits,
            "differing_bits": {k: list(v) for k, v in self.differing_bits.items()},
            "margin": self.margin,
            "floor": self.floor,
            "delta": self.delta,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Calibration:
        """Parse a stored block; ``ValueError`` when it is malformed (see check_calibration)."""
        problems = check_calibration(doc, check_constants=False)
        if problems:
            raise ValueError(f"calibration: {problems[0]}")
        return cls(
            challenges=int(doc["challenges"]),
            total_bits=int(doc["total_bits"]),
            differing_bits={k: [int(b) for b in v] for k, v in doc["differing_bits"].items()},
            margin=float(doc["margin"]),
            floor=float(doc["floor"]),
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_calibration(doc: Any, *, check_constants: bool = True) -> list[str]:
    """Problems of a calibration block (empty when usable): shape, counts, and that its
    ``delta`` is the one its counts give. With ``check_constants`` the margin and floor must
    also be the current :data:`MARGIN` and :data:`FLOOR`."""
    if not isinstance(doc, Mapping):
        return ["expected an object"]
    if doc.get("format") != CALIBRATION_FORMAT:
        return [f"format is not {CALIBRATION_FORMAT}"]
    missing = [
        k
        for k in ("challenges", "total_bits", "differing_bits", "margin", "floor", "delta")
        if k not in doc
    ]
    if missing:
        return [f"missing {', '.join(missing)}"]
    n, total, counts = doc["challenges"], doc["total_bits"], doc["differing_bits"]
    if not _is_int(n) or n < 1 or not _is_int(total) or total < 1:
        return ["challenges and total_bits must be positive integers"]
    if not isinstance(counts, Mapping) or sorted(counts) != sorted(CALIBRATION_DTYPES):
        return [f"differing_bits must have exactly {', '.join(CALIBRATION_DTYPES)}"]
    for name, bits in counts.items():
        if not isinstance(bits, list) or len(bits) != n:
            return [f"{name}: expected {n} differing-bit counts"]
        if not all(_is_int(b) and 0 <= b <= total for b in bits):
            return [f"{name}: counts must be integers in [0, total_bits]"]
    for k in ("margin", "floor", "delta"):
        v = doc[k]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return [f"{k} must be a finite number"]
    if not (doc["margin"] >= 1.0 and 0.0 <= doc["floor"] < 0.5):
        return ["margin must be >= 1 and floor in [0, 0.5)"]
    problems = []
    expected = calibrated_delta(counts, total, float(doc["margin"]), float(doc["floor"]))
    if float(doc["delta"]) != expected:
        problems.append(f"delta {doc['delta']} is not the {expected} its counts give")
    if check_constants and (float(doc["margin"]), float(doc["floor"])) != (MARGIN, FLOOR):
        problems.append(
            f"margin/floor {doc['margin']}/{doc['floor']} differ from the current "
            f"{MARGIN}/{FLOOR} (audit with check_constants=False for an older transcript)"
        )
    return problems
