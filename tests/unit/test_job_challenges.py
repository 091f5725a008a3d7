"""Per-job challenge sets through the engine: nonce and pool transcripts, audited with the key.

The sides are deterministic stand-ins (a signature is a hash of the prompt and the site), so
the engine, the transcript and both audits run for real without a model.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import numpy as np
import pytest

from rev_tasks.core.challenges import NONCE_BYTES, Challenge, commitment, job_challenges
from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.core.transcript import audit, audit_challenges
from rev_tasks.engine import (
    FINGERPRINT_FORMAT,
    Verification,
    VerifyParams,
    extend_fingerprint,
    reexecute_sample,
)

KEY = hashlib.sha256(b"farm key").digest()
BITS = 64


class HashSide:
    """Signatures from sha256(salt, prompt, site): two sides with one salt are the SAME."""

    def __init__(self, salt: bytes) -> None:
        self.salt = salt
        self.descriptor = {"model_type": "toy", "num_layers": 4, "hidden_size": 8}

    def signatures(
        self, challenges: Sequence[Challenge], sites: Sequence[int], key: bytes, bits: int
    ) -> list[dict[int, np.ndarray]]:
        out = []
        for c in challenges:
            sig = {}
            for s in sites:
                digest = hashlib.sha256(self.salt + c.prompt.encode() + bytes([s])).digest()
                sig[s] = np.frombuffer(digest[: bits // 8], dtype=np.uint8).copy()
            out.append(sig)
        return out


PARAMS = VerifyParams(max_challenges=32, batch_size=4, bits=BITS)


def _run(**kw: object) -> dict:
    v = Verification(HashSide(b"a"), HashSide(b"b"), KEY, PARAMS, **kw)  # type: ignore[arg-type]
    return v.run().transcript


def test_nonce_transcript_audits_offline_and_with_the_key() -> None:
    nonce = b"\x07" * NONCE_BYTES
    doc = _run(nonce=nonce)
    assert doc["challenge_nonce"] == nonce.hex() and "challenge_indices" not in doc
    assert doc["decision"]["verdict"] == "DIFFERENT"
    assert [r["index"] for r in doc["records"]] == list(range(len(doc["records"])))
    assert doc["committed_root"] == commitment(job_challenges(KEY, 32, nonce=nonce)).hex()
    assert audit(doc) == [] and audit_challenges(doc, KEY) == []
    # Another nonce: another committed set, no shared prompt.
    other = _run(nonce=b"\x08" * NONCE_BYTES)
    assert other["committed_root"] != doc["committed_root"]
    prompts = {r["challenge"]["prompt"] for r in doc["records"]}
    assert not prompts & {r["challenge"]["prompt"] for r in other["records"]}


def test_pool_transcript_names_its_draw() -> None:
    drawn = [40, 7, 19, 3, 88, 61, 25, 12, 70, 33, 5, 90, 14, 51, 2, 77]
    doc = _run(indices=drawn)
    assert doc["challenge_indices"] == drawn  # budget capped at the draw
    assert doc["parameters"]["max_challenges"] == len(drawn)
    assert [r["index"] for r in doc["records"]] == drawn[: len(doc["records"])]
    assert audit(doc) == [] and audit_challenges(doc, KEY) == []


def test_tampered_derivations_fail() -> None:
    nonce = b"\x07" * NONCE_BYTES
    doc = _run(nonce=nonce)
    swapped = copy.deepcopy(doc)
    swapped["challenge_nonce"] = (b"\x09" * NONCE_BYTES).hex()
    assert audit(swapped) == []  # offline the nonce is only a field ...
    assert any("committed_root" in p for p in audit_challenges(swapped, KEY))  # ... the key knows
    assert audit_challenges(doc, DEMO_KEY)  # another key derives other challenges
    bad = copy.deepcopy(doc)
    bad["challenge_nonce"] = "zz"
    assert any("challenge_nonce" in p for p in audit(bad))

    pool = _run(indices=list(range(100, 116)))
    moved = copy.deepcopy(pool)
    moved["challenge_indices"][0] = 999  # the records no longer follow the draw
    assert any("challenge_indices" in p for p in audit(moved))
    dup = copy.deepcopy(pool)
    dup["challenge_indices"][1] = dup["challenge_indices"][0]
    assert any("distinct" in p for p in audit(dup))
    short = copy.deepcopy(pool)
    short["challenge_indices"] = short["challenge_indices"][:-1]
    assert any("max_challenges" in p for p in audit(short))
    both = copy.deepcopy(pool)
    both["challenge_nonce"] = nonce.hex()
    assert any("not both" in p for p in audit(both))
    assert audit_challenges({"garbage": 1}, KEY)  # problems, no exception


def test_reexecution_uses_the_jobs_derivation() -> None:
    nonce = b"\x07" * NONCE_BYTES
    doc = _run(nonce=nonce)
    n = len(doc["records"])
    assert reexecute_sample(doc, HashSide(b"a"), HashSide(b"b"), KEY, range(n)) == []
    forged = copy.deepcopy(doc)
    del forged["challenge_nonce"]  # re-derived as the key's sequence: other challenges
    problems = reexecute_sample(forged, HashSide(b"a"), HashSide(b"b"), KEY, [0])
    assert problems and "challenge hash" in problems[0]


def test_extend_fingerprint_merges_fresh_indices() -> None:
    def entry(i: int) -> dict:
        return {"index": i, "challenge_hash": hashlib.sha256(bytes([i])).hexdigest(), "sigs": {}}

    base = {
        "format": FINGERPRINT_FORMAT,
        "key_id": "k",
        "sites": [1],
        "bits": BITS,
        "signatures": [entry(0), entry(1)],
    }
    more = dict(base, signatures=[entry(1), entry(2), entry(3)])
    out = extend_fingerprint(base, more)
    assert [e["index"] for e in out["signatures"]] == [0, 1, 2, 3]
    assert out["challenge_commitment"]
    with pytest.raises(ValueError, match="bits"):
        extend_fingerprint(base, dict(more, bits=128))
