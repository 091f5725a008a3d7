"""The endpoint identify evidence (rev_tasks/endpoints/identification.py) without a server:
the ranking is a function of the transcripts, and a listing that does not follow is caught.
Real transcripts and their audit are exercised in tests/endpoints/test_endpoint_farm.py."""

from __future__ import annotations

from typing import Any

from rev_tasks.core.merkle import merkle_root
from rev_tasks.endpoints.identification import (
    NO_MATCH,
    audit_endpoint_identification,
    build_endpoint_identification,
    entry_from_transcript,
    rank,
    recorded_verdict,
)


def _transcript(verdict: str, values: list[Any], root: str) -> dict[str, Any]:
    return {
        "decision": {"verdict": verdict, "queries_used": len(values)},
        "records": [{"value": v} for v in values],
        "root": root,
    }


def test_entries_follow_from_the_transcripts_and_rank_same_first() -> None:
    ts = {
        "a": _transcript("DIFFERENT", [0.9, "inf", 0.7], "aa"),
        "b": _transcript("SAME", [0.01, 0.03], "bb"),
        "c": _transcript("UNDECIDED", [0.2], "cc"),
    }
    entries = rank([entry_from_transcript(m, t) for m, t in ts.items()])
    assert [e["reference"] for e in entries] == ["b", "c", "a"]
    assert entries[2]["inf_values"] == 1 and entries[2]["mean_value"] == (0.9 + 0.7) / 2
    assert entries[0]["transcript_root"] == "bb" and entries[0]["queries_used"] == 2


def test_an_empty_listing_votes_none_and_a_changed_listing_fails_the_audit() -> None:
    doc = build_endpoint_identification(
        key_id="k",
        mode="logprobs",
        parameters={},
        endpoint={"url": "u", "model": "m"},
        transcripts={},
    )
    assert doc["verdict"] is None and recorded_verdict(doc) == NO_MATCH
    assert doc["root"] == merkle_root([]).hex() and doc["none_of_these"] is True
    assert audit_endpoint_identification(doc) == []
    for field, value in (("best", "x"), ("verdict", "SAME"), ("root", "00" * 32)):
        forged = {**doc, field: value}
        assert audit_endpoint_identification(forged) == [
            f"listing: {field} does not follow from the transcripts"
        ]
    assert audit_endpoint_identification({**doc, "format": "rev-identification/1"})
    assert audit_endpoint_identification({**doc, "transcripts": {"m": {}}})  # cannot audit
