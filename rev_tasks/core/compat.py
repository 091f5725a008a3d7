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
