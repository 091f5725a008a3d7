"""When two models can be compared site for site.

Signatures at a site are projections of that site's hidden states, so both models need the
same number of blocks (the sites are chosen by depth) and the same hidden width (the
projection matrix's shape). Anything else is DIFFERENT by construction; the engine and the
transcript audit both call this one rule.
"""

from __future__ import annotations

from typing import Any

COMPARED_FIELDS = ("num_layers", "hidden_size")
_LABELS = {"num_layers": "layers", "hidden_size": "hidden size"}


def differences(reference: dict[str, Any], candidate: dict[str, Any]) -> list[str]:
    """The compared fields that differ, short (``"hidden size 384 vs 128"``), reference first."""
    return [
        f"{_LABELS[name]} {reference.get(name)} vs {candidate.get(name)}"
        for name in COMPARED_FIELDS
        if reference.get(name) != candidate.get(name)
    ]


def incompatibility(reference: dict[str, Any], candidate: dict[str, Any]) -> str | None:
    """Why two model descriptors cannot be compared site for site, or None when they can."""
    diff = differences(reference, candidate)
    if not diff:
        return None
    return (
        f"architectures differ ({', '.join(diff)}): reference {reference.get('model_type')} "
        f"with {reference.get('num_layers')} layers × {reference.get('hidden_size')} hidden, "
        f"candidate {candidate.get('model_type')} with {candidate.get('num_layers')} "
        f"layers × {candidate.get('hidden_size')} hidden; sites cannot be compared one for one"
    )


#: The compute dtypes a job, a registration or ``rev verify --dtype`` may name.
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def dtype_mismatch(reference: dict[str, Any], candidate: dict[str, Any]) -> str | None:
    """Why a stored reference (a fingerprint) and a candidate computed in another dtype
    cannot be compared, or None when both name the same compute dtype (or one names none).

    Signatures of the same weights computed in float32 and in bfloat16 differ by that
    compute rounding, which neither tolerance is calibrated for: ``exact`` would call every
    such pair DIFFERENT, and ``precision``'s δ (the reference's own weight casts, computed in
    the reference's dtype) does not bound it. So the farm refuses the pair with this reason
    instead of giving a verdict; docs/statistics.md §9 states the rule.
    """
    ref, cand = reference.get("dtype"), candidate.get("dtype")
    if ref is None or cand is None or ref == cand:
        return None
    return (
        f"compute dtypes differ: the reference's signatures were computed in {ref}, the "
        f"candidate's in {cand}; run the candidate in {ref} (job or --dtype {ref}) or "
        f"fingerprint the reference in {cand}"
    )
