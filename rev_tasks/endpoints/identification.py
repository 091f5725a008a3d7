"""An endpoint identify job's evidence: one endpoint transcript per registered model, ranked.

Document layout (``format`` = rev-endpoint-identification/1)::

    {"format", "key_id", "mode", "parameters": {tolerance, alpha, max_queries},
     "endpoint": {url, model},
     "entries": [{reference, verdict, queries_used, mean_value, inf_values,
                  transcript_root}, …],
     "transcripts": {model_id: rev-endpoint-transcript/1, …},
     "best", "none_of_these", "verdict", "root"}

Each entry is derived from its transcript by :func:`entry_from_transcript` (the worker and
the validators use that one function) and ``entries`` are in :func:`rank` order, so the
ranking follows from the recorded replies. ``root`` is the Merkle root of the entries'
canonical JSON: it commits to the listing and, through each ``transcript_root``, to every
recorded reply. ``verdict`` is the first entry's verdict (None when no model was compared;
the consensus round then votes on :data:`NO_MATCH`, :func:`recorded_verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rev_tasks.core.merkle import merkle_root
from rev_tasks.core.transcript import canonical_json
from rev_tasks.endpoints.transcript import _num, audit_endpoint

__all__ = [
    "FORMAT",
    "NO_MATCH",
    "audit_endpoint_identification",
    "build_endpoint_identification",
    "entry_from_transcript",
    "rank",
    "recorded_verdict",
]

FORMAT = "rev-endpoint-identification/1"
#: The verdict the consensus round votes on when no model could be compared.
NO_MATCH = "NONE"
_ORDER = {"SAME": 0, "UNDECIDED": 1, "DIFFERENT": 2}


def entry_from_transcript(name: str, transcript: Mapping[str, Any]) -> dict[str, Any]:
    """The ranking entry a model's endpoint transcript gives (verdict, mean statistic)."""
    decision = transcript.get("decision") or {}
    values = [_num(r.get("value")) for r in transcript.get("records") or []]
    finite = [v for v in values if math.isfinite(v)]
    return {
        "reference": name,
        "verdict": decision.get("verdict"),
        "queries_used": decision.get("queries_used"),
        "mean_value": (sum(finite) / len(finite)) if finite else None,
        "inf_values": len(values) - len(finite),
        "transcript_root": transcript.get("root"),
    }


def rank(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """SAME first, then UNDECIDED, then DIFFERENT; within each by mismatches, then name."""
    return sorted(
        (dict(e) for e in entries),
        key=lambda r: (
            _ORDER.get(str(r["verdict"]), 3),
            r["inf_values"],
            r["mean_value"] or 0.0,
            str(r["reference"]),
        ),
    )


def _listing(transcripts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    entries = rank([entry_from_transcript(m, t) for m, t in sorted(transcripts.items())])
    best = entries[0]["reference"] if entries and entries[0]["verdict"] == "SAME" else None
    return {
        "entries": entries,
        "best": best,
        "none_of_these": all(e["verdict"] == "DIFFERENT" for e in entries),
        "verdict": entries[0]["verdict"] if entries else None,
        "root": merkle_root([canonical_json(e) for e in entries]).hex(),
    }


def recorded_verdict(doc: Mapping[str, Any]) -> str:
    """What the validators vote on: the document's verdict, or :data:`NO_MATCH`."""
    return str(doc.get("verdict") or NO_MATCH)


def build_endpoint_identification(
    *,
    key_id: str,
    mode: str,
    parameters: dict[str, Any],
    endpoint: dict[str, Any],
    transcripts: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The evidence document of an endpoint identify job (layout in the module docstring)."""
    return {
        "format": FORMAT,
        "key_id": key_id,
        "mode": mode,
        "parameters": parameters,
        "endpoint": endpoint,
        "transcripts": {m: dict(t) for m, t in sorted(transcripts.items())},
        **_listing(transcripts),
    }


def audit_endpoint_identification(doc: Any) -> list[str]:
    """Problems of the document on its own: each transcript audits, the listing follows."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return [f"not a {FORMAT} document"]
    transcripts = doc.get("transcripts")
    if not isinstance(transcripts, dict):
        return ["transcripts: not a mapping"]
    problems: list[str] = []
    for m, t in sorted(transcripts.items()):
        problems += [f"{m}: {p}" for p in audit_endpoint(t)]
        if isinstance(t, dict):
            if t.get("mode") != doc.get("mode"):
                problems.append(f"{m}: the transcript's mode is not the document's")
            if t.get("endpoint") != doc.get("endpoint"):
                problems.append(f"{m}: the transcript names another endpoint")
    if problems:
        return problems
    derived = _listing(transcripts)
    for field in ("entries", "best", "none_of_these", "verdict", "root"):
        if doc.get(field) != derived[field]:
            problems.append(f"listing: {field} does not follow from the transcripts")
    return problems
