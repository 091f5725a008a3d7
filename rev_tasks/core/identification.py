"""An identify job's evidence: one committed transcript per registered model, and its listing.

An identify job compares one candidate with every registered model its tenant can see. Each
model ends up in exactly one of three states, and the listing says which (never silently
absent):

* ``compared``: a full ``rev-transcript/1`` (:mod:`rev_tasks.core.transcript`) of the
  candidate against the model's fingerprint, decided by the sequential test;
* ``incompatible``: an architecture the candidate cannot be compared with site for site
  (:func:`rev_tasks.core.compat.incompatibility`): an incompatible transcript, DIFFERENT,
  with the reason (``"hidden size 384 vs 128"``);
* ``unavailable``: no usable fingerprint (still pending past the job's wait, failed, made
  with another key, no unused pool challenge), with the reason.

Document layout (``format`` = rev-identification/1)::

    {"format", "key_id", "candidate", "parameters": {tolerance, alpha, max_challenges},
     "entries": [{model_id, status, verdict, reason, mean_distance, statistic,
                  challenges_used, challenges_max, transcript_root}, …],
     "comparisons": {model_id: rev-transcript/1, …}, "root", "best", "verdict"}

``entries`` are in rank order: compared models by mean distance (then id), incompatible ones,
unavailable ones. Each compared or incompatible entry is derived from its transcript by
:func:`entry_from_transcript` (the worker and the validators use that one function), and
``root`` is the Merkle root of the entries' canonical JSON, so the root commits to the whole
listing and, through each ``transcript_root``, to every signature behind it. ``best`` and
``verdict`` are the first ranked model that is not unavailable and its verdict (None when
there is none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rev_tasks.core.compat import incompatibility
from rev_tasks.core.merkle import merkle_root
from rev_tasks.core.transcript import audit, audit_challenges, canonical_json

__all__ = [
    "COMPARED",
    "FORMAT",
    "INCOMPATIBLE",
    "NO_MATCH",
    "UNAVAILABLE",
    "audit_identification",
    "audit_identification_challenges",
    "build_identification",
    "entry_from_transcript",
    "rank",
    "recorded_verdict",
    "unavailable_entry",
]

FORMAT = "rev-identification/1"
COMPARED, INCOMPATIBLE, UNAVAILABLE = "compared", "incompatible", "unavailable"
STATUSES = (COMPARED, INCOMPATIBLE, UNAVAILABLE)
#: The verdict the consensus round votes on when no model could be ranked at all.
NO_MATCH = "NONE"
_ENTRY_KEYS = (
    "model_id",
    "status",
    "verdict",
    "reason",
    "mean_distance",
    "statistic",
    "challenges_used",
    "challenges_max",
    "transcript_root",
)


def entry_from_transcript(model_id: str, transcript: Mapping[str, Any]) -> dict[str, Any]:
    """The listing entry a comparison's transcript gives (its status, verdict and distances)."""
    records = transcript.get("records") or []
    decision = transcript.get("decision") or {}
    distances = [r["differing_bits"] / r["total_bits"] for r in records if r.get("total_bits")]
    incompatible = transcript.get("incompatible") is True
    return {
        "model_id": model_id,
        "status": INCOMPATIBLE if incompatible else COMPARED,
        "verdict": decision.get("verdict"),
        "reason": decision.get("reason"),
        "mean_distance": sum(distances) / len(distances) if distances else None,
        "statistic": decision.get("statistic"),
        "challenges_used": len(records),
        "challenges_max": int((transcript.get("parameters") or {}).get("max_challenges", 0)),
        "transcript_root": transcript.get("root"),
    }


def unavailable_entry(model_id: str, reason: str) -> dict[str, Any]:
    """A model that was not compared, and why (pending, failed, another key, no challenges)."""
    return {
        "model_id": model_id,
        "status": UNAVAILABLE,
        "verdict": None,
        "reason": reason,
        "mean_distance": None,
        "statistic": None,
        "challenges_used": 0,
        "challenges_max": 0,
        "transcript_root": None,
    }


def _rank_key(entry: Mapping[str, Any]) -> tuple[int, float, str]:
    status = STATUSES.index(entry["status"]) if entry.get("status") in STATUSES else 3
    mean = entry.get("mean_distance")
    return status, float("inf") if mean is None else float(mean), str(entry.get("model_id"))


def rank(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Compared models nearest first (ties by id), then incompatible, then unavailable ones."""
    return [dict(e) for e in sorted(entries, key=_rank_key)]


def _best(entries: Sequence[Mapping[str, Any]]) -> tuple[str | None, str | None]:
    for e in entries:
        if e["status"] != UNAVAILABLE:
            return str(e["model_id"]), e["verdict"]
    return None, None


def build_identification(
    key_id: str,
    candidate: Mapping[str, Any],
    parameters: Mapping[str, Any],
    comparisons: Mapping[str, Mapping[str, Any]],
    unavailable: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Assemble the document from each model's transcript and the unavailable models' entries."""
    ids = [str(m) for m in comparisons] + [str(e["model_id"]) for e in unavailable]
    if len(set(ids)) != len(ids):
        raise ValueError("a model is listed twice")
    entries = rank(
        [entry_from_transcript(m, t) for m, t in comparisons.items()] + list(unavailable)
    )
    best, verdict = _best(entries)
    return {
        "format": FORMAT,
        "key_id": key_id,
        "candidate": dict(candidate),
        "parameters": dict(parameters),
        "entries": entries,
        "comparisons": {m: dict(t) for m, t in comparisons.items()},
        "root": listing_root(entries),
        "best": best,
        "verdict": verdict,
    }


def listing_root(entries: Sequence[Mapping[str, Any]]) -> str:
    """The Merkle root (hex) of the entries' canonical JSON, in listed order."""
    return merkle_root([canonical_json(dict(e)) for e in entries]).hex()


def recorded_verdict(doc: Mapping[str, Any]) -> str:
    """What the validators vote on: the best model's verdict, or :data:`NO_MATCH`."""
    return str(doc.get("verdict") or NO_MATCH)


def audit_identification(doc: Any, *, check_constants: bool = True) -> list[str]:
    """Re-check the document offline; one line per problem (empty = valid); never raises.

    Every transcript is audited (:func:`rev_tasks.core.transcript.audit`: proofs, roots,
    recomputed distances, the decision replayed); every entry must be the one its transcript
    gives, the candidate and parameters the same in all of them, the order the ranking rule's,
    ``best``/``verdict`` the first ranked model's, and ``root`` the listing's.
    """
    problems: list[str] = []
    try:
        _audit(doc, problems, check_constants)
    except Exception as e:  # noqa: BLE001 - report, never raise
        problems.append(f"identification: malformed document ({type(e).__name__}: {e})")
    return problems


def _audit(doc: Any, problems: list[str], check_constants: bool) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        problems.append(f"format: expected a {FORMAT} document")
        return
    entries, comparisons = doc.get("entries"), doc.get("comparisons")
    if not isinstance(entries, list) or not isinstance(comparisons, dict):
        problems.append("identification: entries must be a list and comparisons an object")
        return
    ids = [e.get("model_id") if isinstance(e, dict) else None for e in entries]
    if len(set(ids)) != len(ids):
        problems.append("entries: a model is listed twice")
    if set(comparisons) - set(ids):
        problems.append(f"comparisons: {sorted(set(comparisons) - set(ids))} are not listed")
    params = doc.get("parameters") or {}
    for e in entries:
        if not isinstance(e, dict) or sorted(e) != sorted(_ENTRY_KEYS):
            problems.append(f"entry {e!r:.80}: expected exactly {list(_ENTRY_KEYS)}")
            continue
        m = e["model_id"]
        if e["status"] == UNAVAILABLE:
            if m in comparisons or e["verdict"] is not None or not e["reason"]:
                problems.append(f"{m}: an unavailable model has a reason and no comparison")
            continue
        tr = comparisons.get(m)
        if tr is None:
            problems.append(f"{m}: listed {e['status']} without a transcript")
            continue
        problems += [f"{m}: {p}" for p in audit(tr, check_constants=check_constants)]
        if entry_from_transcript(m, tr) != e:
            problems.append(f"{m}: the entry is not the one its transcript gives")
        if tr.get("candidate") != doc.get("candidate"):
            problems.append(f"{m}: the transcript's candidate differs from the document's")
        tparams = tr.get("parameters") or {}
        for k in ("tolerance", "alpha"):
            if tparams.get(k) != params.get(k):
                problems.append(f"{m}: parameters.{k} differs from the job's")
        if tr.get("key_id") != doc.get("key_id"):
            problems.append(f"{m}: the transcript was made under another key")
        if e["status"] == INCOMPATIBLE and (
            not e["reason"] or e["reason"] != incompatibility(tr["reference"], tr["candidate"])
        ):
            problems.append(f"{m}: the incompatibility reason is not the descriptors'")
    if rank([e for e in entries if isinstance(e, dict) and "status" in e]) != entries:
        problems.append("entries: not in ranking order")
    best, verdict = _best([e for e in entries if isinstance(e, dict) and "status" in e])
    if (doc.get("best"), doc.get("verdict")) != (best, verdict):
        problems.append(
            f"best/verdict: {doc.get('best')}/{doc.get('verdict')}, not {best}/{verdict}"
        )
    if doc.get("root") != listing_root([e for e in entries if isinstance(e, dict)]):
        problems.append("root: the Merkle root of the entries differs from the root")


def audit_identification_challenges(doc: Mapping[str, Any], key: bytes) -> list[str]:
    """With the farm key: each transcript's committed challenge set re-derived and checked."""
    problems: list[str] = []
    for m, tr in (doc.get("comparisons") or {}).items():
        problems += [f"{m}: {p}" for p in audit_challenges(tr, key)]
    return problems
