"""Transcripts: a genuine one audits clean; every kind of tampering gives a specific problem."""

from __future__ import annotations

import base64
import copy
import json

import numpy as np
import pytest

from rev_tasks.core.challenges import Challenge, generate_challenges
from rev_tasks.core.decision import SequentialTest
from rev_tasks.core.keys import DEMO_KEY, key_id
from rev_tasks.core.merkle import merkle_root
from rev_tasks.core.transcript import FORMAT, Record, audit, build_transcript

SITES = [0, 3, 6]
BITS = 256
DESC = {"model_type": "gpt2", "family": "decoder", "num_layers": 6, "hidden_size": 64}


def make_transcript(
    flip_rate: float, tolerance: str = "exact", alpha: float = 0.01, seed: int = 7
) -> dict:
    """Run the real SequentialTest over synthetic signatures, as engine.verify does."""
    rng = np.random.default_rng(seed)
    budget = 64
    challenges = generate_challenges(DEMO_KEY, budget)
    test = SequentialTest(tolerance, alpha, budget)
    records = []
    for c in challenges:
        ref = {s: rng.integers(0, 256, BITS // 8, dtype=np.uint8) for s in SITES}
        cand = {}
        for s, sig in ref.items():
            flips = np.packbits(rng.random(BITS) < flip_rate)
            cand[s] = sig ^ flips
        rec = Record.from_signatures(c.index, c.digest(), ref, cand)
        records.append(rec)
        test.update(rec.distance)
        if test.decision is not None:
            break
    assert test.decision is not None
    params = {"tolerance": tolerance, "alpha": alpha, "max_challenges": budget,
              "bits_per_site": BITS}  # fmt: skip
    return build_transcript(
        records, challenges, key_id(DEMO_KEY), params, SITES, DESC, dict(DESC), test.decision
    )


def test_key_id_format_checked(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    doc["key_id"] = "x"
    assert audit(doc) == ["key_id: expected 32 lowercase hex digits"]


@pytest.fixture(scope="module")
def same_doc() -> dict:
    return make_transcript(0.0)


@pytest.fixture(scope="module")
def diff_doc() -> dict:
    return make_transcript(0.5)


def _flip_bit(b64: str, bit: int = 5) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[bit // 8] ^= 1 << (bit % 8)
    return base64.b64encode(bytes(raw)).decode()


def test_genuine_transcripts_pass(same_doc: dict, diff_doc: dict) -> None:
    assert same_doc["decision"]["verdict"] == "SAME"
    assert same_doc["decision"]["challenges_used"] == len(same_doc["records"]) == 8
    assert diff_doc["decision"]["verdict"] == "DIFFERENT"
    assert len(diff_doc["records"]) == 2
    for doc in (same_doc, diff_doc):
        assert audit(doc) == []
        assert audit(json.loads(json.dumps(doc))) == []  # survives a JSON round trip
        assert doc["format"] == FORMAT
        assert doc["parameters"] == {
            "tolerance": "exact", "alpha": 0.01, "max_challenges": 64, "delta": 0.0,
            "p0": 0.05, "p1": 0.5, "bits_per_site": BITS,
        }  # fmt: skip
        assert doc["sites"] == SITES
        assert doc["reference"] == DESC


def test_mixed_transcript_passes() -> None:
    doc = make_transcript(0.01, tolerance="precision", alpha=0.05, seed=3)
    assert audit(doc) == []


def test_document_fields(same_doc: dict) -> None:
    rec = same_doc["records"][0]
    assert set(rec) == {
        "index", "challenge", "challenge_hash", "reference", "candidate", "differing_bits",
        "total_bits", "proof",
    }  # fmt: skip
    assert set(rec["challenge"]) == {"index", "template_id", "domain", "prompt"}
    assert set(rec["reference"]) == {"0", "3", "6"}
    assert rec["total_bits"] == BITS * len(SITES)
    hashes = [bytes.fromhex(r["challenge_hash"]) for r in same_doc["records"]]
    assert same_doc["challenge_commitment"] == merkle_root(hashes).hex()
    assert same_doc["key_id"] == key_id(DEMO_KEY)


def test_leaf_bytes_are_canonical() -> None:
    r = Record(3, b"\xab" * 32, {"0": b"\x0f"}, {"0": b"\x0e"}, 1, 8)
    assert (
        r.leaf_bytes()
        == (
            '{"candidate":{"0":"Dg=="},"challenge_hash":"' + "ab" * 32 + '","differing_bits":1,'
            '"index":3,"reference":{"0":"Dw=="},"total_bits":8}'
        ).encode()
    )
    assert r.distance == 1 / 8


def test_record_from_signatures() -> None:
    a = np.array([0b1111_0000, 0], np.uint8)
    b = np.array([0b0000_0000, 1], np.uint8)
    r = Record.from_signatures(0, b"\x00" * 32, {1: a, 2: a}, {1: b, 2: a.tobytes()})
    assert (r.differing_bits, r.total_bits) == (5, 32)
    with pytest.raises(ValueError, match="sites differ"):
        Record.from_signatures(0, b"\x00" * 32, {1: a}, {2: a})
    with pytest.raises(ValueError, match="lengths differ"):
        Record.from_signatures(0, b"\x00" * 32, {1: a}, {1: a[:1]})


def _has(problems: list[str], *fragments: str) -> bool:
    return any(all(f in p for f in fragments) for p in problems)


def test_flipped_signature_bit(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    rec = doc["records"][3]
    rec["candidate"]["3"] = _flip_bit(rec["candidate"]["3"])
    problems = audit(doc)
    assert _has(problems, "record 3", "differing_bits 0 != 1 recomputed from the signatures")
    assert _has(problems, "record 3", "inclusion proof does not verify")
    assert _has(problems, "root: recomputed Merkle root")


def test_changed_differing_bits(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    doc["records"][2]["differing_bits"] = 1
    problems = audit(doc)
    assert _has(problems, "record 2", "differing_bits 1 != 0 recomputed")
    assert _has(problems, "record 2", "inclusion proof does not verify")


def test_changed_verdict(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    doc["decision"]["verdict"] = "DIFFERENT"
    problems = audit(doc)
    assert problems == [
        "decision: verdict 'DIFFERENT' but replaying the records gives 'SAME' after 8 challenges"
    ]


def test_removed_last_record(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    doc["records"].pop()
    problems = audit(doc)
    assert _has(problems, "records: 7 records but decision.challenges_used = 8")
    assert _has(problems, "decision: verdict 'SAME' but replaying the records gives 'UNDECIDED'")


def test_removed_middle_record(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    del doc["records"][4]
    problems = audit(doc)
    assert _has(problems, "record 4 (index 5)", "not in consecutive index order")
    assert _has(problems, "records: 7 records")


def test_reordered_records(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    recs = doc["records"]
    recs[1], recs[2] = recs[2], recs[1]
    problems = audit(doc)
    assert _has(problems, "record 1 (index 2)", "not in consecutive index order")
    assert _has(problems, "record 1 (index 2)", "inclusion proof does not verify")
    assert _has(problems, "challenge_commitment")


def test_changed_challenge_prompt(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    doc["records"][0]["challenge"]["prompt"] += " (edited)"
    problems = audit(doc)
    assert problems == [
        "record 0 (index 0): challenge_hash is not sha256 of the challenge's canonical bytes"
    ]


def test_changed_commitment_root_and_params(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    doc["challenge_commitment"] = "00" * 32
    assert audit(doc) == [
        "challenge_commitment: Merkle root of the records' challenge hashes differs"
    ]
    doc = copy.deepcopy(same_doc)
    doc["root"] = "11" * 32
    problems = audit(doc)
    assert _has(problems, "root: recomputed Merkle root")
    assert sum("inclusion proof does not verify" in p for p in problems) == 8
    doc = copy.deepcopy(same_doc)
    doc["parameters"]["delta"] = 0.3
    problems = audit(doc)
    assert _has(problems, "parameters: delta/p0/p1", "differ from the current 'exact'")
    assert audit(doc, check_constants=False) == []
    doc["format"] = "rev-transcript/2"
    assert audit(doc) == ["format: expected 'rev-transcript/1', got 'rev-transcript/2'"]


def test_changed_alpha_changes_replay(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    doc["parameters"]["alpha"] = 0.001  # SAME would need more challenges
    problems = audit(doc)
    assert _has(problems, "decision: verdict 'SAME' but replaying")


def test_bad_base64_and_missing_keys(same_doc: dict) -> None:
    doc = copy.deepcopy(same_doc)
    doc["records"][1]["reference"]["0"] = "!!not base64!!"
    problems = audit(doc)
    assert _has(problems, "record 1 (index 1): reference site 0: bad base64")
    assert _has(problems, "records: some records are malformed")
    doc = copy.deepcopy(same_doc)
    del doc["root"]
    assert audit(doc) == ["transcript: missing root"]
    doc = copy.deepcopy(same_doc)
    del doc["records"][0]["proof"]
    assert _has(audit(doc), "record 0: missing proof")
    doc = copy.deepcopy(same_doc)
    doc["records"][0]["reference"]["0"] = base64.b64encode(b"\x00" * 4).decode()
    assert _has(audit(doc), "reference site 0: signature has 32 bits, expected bits_per_site=256")
    doc = copy.deepcopy(same_doc)
    doc["records"][0]["reference"]["9"] = doc["records"][0]["reference"]["0"]
    assert _has(audit(doc), "reference sites", "differ from the transcript's")


@pytest.mark.parametrize("doc", [None, [], "x", 3, {}, {"format": FORMAT}])
def test_garbage_documents(doc: object) -> None:
    problems = audit(doc)
    assert problems and all(isinstance(p, str) for p in problems)


def test_no_exception_on_any_field_corruption(same_doc: dict) -> None:
    bad_values = [None, 1, -1, "x", "zz", [], {}, [1, "a"], True, 1.5, {"a": None}]
    top_keys = list(same_doc)
    rec_keys = list(same_doc["records"][0])
    param_keys = list(same_doc["parameters"])
    for value in bad_values:
        for k in top_keys:
            doc = copy.deepcopy(same_doc)
            doc[k] = value
            problems = audit(doc)
            # descriptors are free-form objects: only a non-object is a problem
            if not (k in ("reference", "candidate") and isinstance(value, dict)):
                assert problems, (k, value)
        for k in rec_keys:
            doc = copy.deepcopy(same_doc)
            doc["records"][0][k] = value
            assert audit(doc), (k, value)
        for k in param_keys:
            doc = copy.deepcopy(same_doc)
            doc["parameters"][k] = value
            assert audit(doc), (k, value)
        doc = copy.deepcopy(same_doc)
        doc["records"][0]["challenge"]["index"] = value
        assert audit(doc), value
        doc = copy.deepcopy(same_doc)
        doc["decision"]["challenges_used"] = value
        assert audit(doc), value


def test_build_rejects_inconsistent_input() -> None:
    cs = generate_challenges(DEMO_KEY, 4)
    recs = [Record.from_signatures(c.index, c.digest(), {0: b"\x00"}, {0: b"\x00"}) for c in cs]
    kid = key_id(DEMO_KEY)
    params = {"tolerance": "exact", "alpha": 0.05, "max_challenges": 64, "bits_per_site": 8}
    ok = {"verdict": "UNDECIDED", "challenges_used": 4}
    assert build_transcript(recs, cs, kid, params, [0], {}, {}, ok)["records"]
    fake = {"verdict": "SAME", "challenges_used": 3}
    with pytest.raises(ValueError, match="drop records past the decision point"):
        build_transcript(recs, cs, kid, params, [0], {}, {}, fake)
    other = [Challenge(c.index, c.template_id, c.domain, c.prompt + "!") for c in cs]
    with pytest.raises(ValueError, match="challenge_hash does not match"):
        build_transcript(recs, other, kid, params, [0], {}, {}, ok)
    with pytest.raises(ValueError, match="no challenge with that index"):
        build_transcript(recs, cs[:2], kid, params, [0], {}, {}, ok)
    with pytest.raises(ValueError, match="unknown tolerance"):
        build_transcript(recs, cs, kid, {**params, "tolerance": "x"}, [0], {}, {}, ok)
    with pytest.raises(ValueError, match="key_id must be 32 lowercase hex"):
        build_transcript(recs, cs, "k", params, [0], {}, {}, ok)


def test_record_normalises_int_sites_and_arrays() -> None:
    # sites 2 and 10 sort differently as ints and as strings: leaf bytes must not care
    a = np.arange(4, dtype=np.uint8)
    r1 = Record(0, b"\x01" * 32, {10: a, 2: a}, {10: a, 2: a}, 0, 64)
    r2 = Record(0, b"\x01" * 32, {"2": a.tobytes(), "10": a.tobytes()},
                {"10": a.tobytes(), "2": a.tobytes()}, 0, 64)  # fmt: skip
    assert r1.leaf_bytes() == r2.leaf_bytes()
    assert r1.reference == {"10": a.tobytes(), "2": a.tobytes()}
    with pytest.raises(ValueError, match="differing_bits"):
        Record(0, b"\x01" * 32, {}, {}, -1, 8)


def test_audit_with_unsorted_numeric_sites() -> None:
    rng = np.random.default_rng(1)
    cs = generate_challenges(DEMO_KEY, 8)
    sites = [2, 10]
    test = SequentialTest("exact", 0.05, 8)
    recs = []
    for c in cs:
        sig = {s: rng.integers(0, 256, 8, dtype=np.uint8) for s in sites}
        recs.append(Record(c.index, c.digest(), sig, dict(sig), 0, 128))
        test.update(0.0)
        if test.decision:
            break
    params = {"tolerance": "exact", "alpha": 0.05, "max_challenges": 8, "bits_per_site": 64}
    doc = build_transcript(recs, cs, key_id(DEMO_KEY), params, sites, {}, {}, test.decision)
    assert audit(doc) == []
