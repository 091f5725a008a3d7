"""An identify run lists every model: compared, incompatible (with the reason) or unavailable.

Real tiny GPT-2 models and their real fingerprints; the evidence document is audited the way
the validators audit it, and each kind of tampering a worker could try is caught.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.core.identification import (
    COMPARED,
    INCOMPATIBLE,
    NO_MATCH,
    UNAVAILABLE,
    audit_identification,
    audit_identification_challenges,
    build_identification,
    listing_root,
    rank,
    recorded_verdict,
    unavailable_entry,
)

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """gpt2 a and b (2 × 64), a wider gpt2 (2 × 128), each loaded, with 16-challenge fingerprints."""
    from rev_tasks.engine import fingerprint_model
    from rev_tasks.inference import load_model
    from rev_tasks.testing.variants import build_tiny_causal_lm, build_tiny_gpt2

    root: Path = tmp_path_factory.mktemp("identify")
    loaded = {
        "a": load_model(build_tiny_gpt2(root / "a", seed=0)),
        "b": load_model(build_tiny_gpt2(root / "b", seed=1)),
        "wide": load_model(build_tiny_causal_lm(root / "wide", "gpt2", layers=2, hidden=128)),
    }
    fps = {m: fingerprint_model(x, KEY, n=16) for m, x in loaded.items()}
    return {"loaded": loaded, "fps": fps}


@pytest.fixture(scope="module")
def run(models: dict[str, Any]) -> Any:
    from rev_tasks.engine import VerifyParams, identify_registry

    seen: list[tuple[int, int]] = []
    ident = identify_registry(
        models["loaded"]["a"],
        models["fps"],
        KEY,
        VerifyParams(max_challenges=16),
        unavailable={"late": "fingerprint still pending after the job waited 3 s"},
        progress=lambda done, total: seen.append((done, total)),
    )
    return ident, seen


def test_every_model_is_listed_and_the_true_one_ranks_first(run: Any) -> None:
    ident, _ = run
    by_id = {e["model_id"]: e for e in ident.entries}
    assert [e["model_id"] for e in ident.entries] == ["a", "b", "wide", "late"]
    assert by_id["a"]["status"] == COMPARED and by_id["a"]["verdict"] == "SAME"
    assert by_id["a"]["mean_distance"] == 0.0
    assert by_id["b"]["status"] == COMPARED and by_id["b"]["verdict"] == "DIFFERENT"
    assert by_id["b"]["mean_distance"] > 0.1 and by_id["b"]["challenges_used"] >= 1
    wide = by_id["wide"]
    assert wide["status"] == INCOMPATIBLE and wide["verdict"] == "DIFFERENT"
    assert "hidden size 128 vs 64" in wide["reason"] and wide["challenges_used"] == 0
    late = by_id["late"]
    assert late["status"] == UNAVAILABLE and late["verdict"] is None and "pending" in late["reason"]
    assert [e["model_id"] for e in ident.ranking] == ["a", "b", "wide"]
    assert [e["model_id"] for e in ident.unavailable] == ["late"]
    assert (ident.document["best"], ident.document["verdict"]) == ("a", "SAME")
    assert recorded_verdict(ident.document) == "SAME"


def test_progress_counts_challenges_over_all_comparisons(run: Any) -> None:
    ident, seen = run
    assert seen, "no progress reported"
    assert all(total == ident.challenges_max == 32 for _, total in seen)  # a and b: 16 each
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1][0] == ident.challenges_used == sum(e["challenges_used"] for e in ident.entries)


def test_the_evidence_audits_and_its_challenges_rederive(run: Any) -> None:
    ident, _ = run
    assert audit_identification(ident.document) == []
    assert audit_identification_challenges(ident.document, KEY) == []
    other = bytes(range(1, 33))
    assert audit_identification_challenges(ident.document, other)


def _tampered(doc: dict[str, Any], change: Any) -> list[str]:
    doc = copy.deepcopy(doc)
    change(doc)
    return audit_identification(doc)


def test_tampering_with_the_listing_is_caught(run: Any) -> None:
    doc = run[0].document

    def flip_verdict(d: dict[str, Any]) -> None:
        d["entries"][1]["verdict"] = "SAME"

    def drop_comparison(d: dict[str, Any]) -> None:
        del d["comparisons"]["a"]

    def swap_order(d: dict[str, Any]) -> None:
        d["entries"][0], d["entries"][1] = d["entries"][1], d["entries"][0]
        d["root"] = listing_root(d["entries"])

    def hide_incompatible(d: dict[str, Any]) -> None:  # a compatible model called incompatible
        d["entries"][1].update(status=INCOMPATIBLE, reason="hidden size 1 vs 2")

    def forge_record(d: dict[str, Any]) -> None:  # b's candidate signatures copied from a's ref
        rec = d["comparisons"]["b"]["records"][0]
        rec["candidate"] = dict(rec["reference"])

    def wrong_best(d: dict[str, Any]) -> None:
        d["best"] = "b"

    for change in (flip_verdict, drop_comparison, swap_order, hide_incompatible, forge_record,
                   wrong_best):  # fmt: skip
        assert _tampered(doc, change), change.__name__


def test_rank_orders_compared_then_incompatible_then_unavailable() -> None:
    def entry(m: str, status: str, mean: float | None) -> dict[str, Any]:
        return {**unavailable_entry(m, "x"), "status": status, "mean_distance": mean}

    shuffled = [
        entry("z-gone", UNAVAILABLE, None),
        entry("y-wide", INCOMPATIBLE, None),
        entry("b", COMPARED, 0.3),
        entry("a2", COMPARED, 0.3),
        entry("c", COMPARED, 0.0),
        entry("a-gone", UNAVAILABLE, None),
    ]
    assert [e["model_id"] for e in rank(shuffled)] == ["c", "a2", "b", "y-wide", "a-gone", "z-gone"]


def test_nothing_comparable_has_no_best_and_votes_on_none() -> None:
    doc = build_identification(
        "0" * 32, {"num_layers": 2, "hidden_size": 64}, {"tolerance": "exact", "alpha": 0.01},
        {}, [unavailable_entry("m", "fingerprint failed: model_load_error: bad weights")],
    )  # fmt: skip
    assert (doc["best"], doc["verdict"]) == (None, None)
    assert recorded_verdict(doc) == NO_MATCH
    assert audit_identification(doc) == []
    with pytest.raises(ValueError, match="listed twice"):
        build_identification("0" * 32, {}, {}, {}, [unavailable_entry("m", "x")] * 2)


def test_the_incompatibility_reason_names_what_differs() -> None:
    from rev_tasks.core.compat import differences, incompatibility

    minilm = {"model_type": "bert", "num_layers": 6, "hidden_size": 384}
    tiny = {"model_type": "gpt2", "num_layers": 2, "hidden_size": 64}
    assert differences(minilm, tiny) == ["layers 6 vs 2", "hidden size 384 vs 64"]
    assert differences(minilm, {**minilm, "hidden_size": 128}) == ["hidden size 384 vs 128"]
    assert incompatibility(minilm, minilm) is None
    reason = incompatibility(minilm, tiny)
    assert reason is not None and reason.startswith(
        "architectures differ (layers 6 vs 2, hidden size 384 vs 64): reference bert"
    )
