"""Endpoint fingerprints without a model: a small synthetic vocabulary, exact arithmetic.

The bound logic (a token outside the stored top-K) must never make the logprobs statistic
smaller than the full reference's; text mode's coarser classes must keep E[E] = 1 under H0.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.endpoints.evidence import (
    OTHER,
    bounded_gap,
    logprob_statistic,
    logprob_view,
    text_log_e,
    text_view,
)
from rev_tasks.endpoints.fingerprint import (
    FingerprintError,
    FingerprintReference,
    check_endpoint_fingerprint,
    make_endpoint_fingerprint,
)

VOCAB = 40
TOP_K = 8


class _Tok:
    bos_token_id = 0


class SyntheticReference:
    """The reference interface on a 40-token vocabulary: ids 30, 31 and 39 print as ""
    (partial bytes, EOS), 32 and 33 share a piece; a prompt's row is seeded by its text."""

    def __init__(self) -> None:
        self.tokenizer = _Tok()
        self.bos_token_id = 0
        self.add_bos = False
        self.max_challenges = None
        self.pieces = [f" p{i}" for i in range(VOCAB)]
        for i in (30, 31, 39):
            self.pieces[i] = ""
        self.pieces[32] = self.pieces[33] = " dup"
        by: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(self.pieces):
            by[p].append(i)
        self.ids_of_piece = dict(by)
        self.other_ids = [0, 30, 31, 32, 33, 39]
        self.single_piece = {
            p: i for i, p in enumerate(self.pieces) if i not in set(self.other_ids)
        }

    def next_logprobs(self, prompts: list[str]) -> np.ndarray:
        out = np.empty((len(prompts), VOCAB))
        for r, prompt in enumerate(prompts):
            seed = sum(prompt.encode()) + (7 if self.add_bos else 0)
            logits = np.random.default_rng(seed).normal(0, 3, VOCAB)
            out[r] = logits - np.logaddexp.reduce(logits)
        return out

    def rows(self, challenges):
        return self.next_logprobs([c.prompt for c in challenges])

    def piece_logprob(self, row: np.ndarray, piece: str) -> float:
        return float(np.logaddexp.reduce(row[self.ids_of_piece[piece]]))

    def probe_ids(self, probe: str) -> list[int]:
        return [5, 6, 7]

    def descriptor(self) -> dict:
        return {"name": "synthetic", "vocab_size": VOCAB}


def _body(top: dict[str, float] | None, text: str = "x") -> dict:
    lp = None if top is None else {"top_logprobs": [top], "tokens": [text]}
    return {"choices": [{"text": text, "logprobs": lp}]}


@pytest.fixture(scope="module")
def pair():
    full = SyntheticReference()
    doc = make_endpoint_fingerprint(full, DEMO_KEY, n=6, top_k=TOP_K)
    assert check_endpoint_fingerprint(doc) == []
    fp = FingerprintReference(doc)
    fp.check_key(DEMO_KEY)
    return full, fp


def test_bounded_gap() -> None:
    assert bounded_gap(-1.0, -20.0, -5.0) == 19.0  # above the interval: its far end
    assert bounded_gap(-30.0, -20.0, -5.0) == 25.0  # below it: its top
    assert bounded_gap(-10.0, -20.0, -5.0) == 10.0  # inside: the farther end
    with pytest.raises(ValueError):
        bounded_gap(0.0, -1.0, -2.0)
    view = {"pieces": {" a": -0.5, " b": {"at_least": -20.0, "at_most": -6.0}}}
    assert logprob_statistic(_body({" a": -0.4, " b": -3.0}), view) == 17.0


def test_statistic_never_below_the_full_reference(pair) -> None:
    """Random replies: equal to the full statistic when every piece is in the top-K, an upper
    bound otherwise; the empty-first reply is exact."""
    from rev_tasks.core.challenges import generate_challenges

    full, fp = pair
    rng = np.random.default_rng(1)
    cs = generate_challenges(DEMO_KEY, 6)
    for variant in (False, True):
        full.add_bos = fp.add_bos = variant
        full_rows, fp_rows = full.rows(cs), fp.rows(cs)
        inside = bounded = 0
        for full_row, fp_row in zip(full_rows, fp_rows, strict=True):
            for _ in range(200):
                ids = rng.choice(VOCAB, size=5, replace=False)
                top = {full.pieces[i]: float(full_row[i] + rng.normal(0, 0.05)) for i in ids}
                body = _body(top)
                s_full = logprob_statistic(body, logprob_view(full, full_row, body))
                s_fp = logprob_statistic(body, logprob_view(fp, fp_row, body))
                singles = [i for i in ids if len(full.ids_of_piece[full.pieces[i]]) == 1]
                if all(i in fp_row.ids for i in singles):
                    assert s_fp == pytest.approx(s_full, abs=1e-12)
                    inside += 1
                else:
                    assert s_fp >= s_full
                    bounded += 1
            empty = _body(None, text="")
            assert logprob_statistic(empty, logprob_view(fp, fp_row, empty)) == pytest.approx(
                logprob_statistic(empty, logprob_view(full, full_row, empty)), abs=1e-12
            )
        assert inside and bounded  # both branches ran


def test_text_mode_e_value_has_mean_one_under_h0(pair) -> None:
    """Sum over every token of p(token) * E(its class): 1 exactly when the stored OTHER and
    normalisers are right; pieces in the top-K get the full reference's numbers."""
    from rev_tasks.core.challenges import generate_challenges

    full, fp = pair
    full.add_bos = fp.add_bos = False
    cs = generate_challenges(DEMO_KEY, 6)
    for full_row, fp_row in zip(full.rows(cs), fp.rows(cs), strict=True):
        mean = 0.0
        for tok in range(VOCAB):
            view = text_view(fp, fp_row, _body(None, text=full.pieces[tok]))
            mean += math.exp(full_row[tok]) * math.exp(text_log_e(view, 0, 0))
            if view["class"] != OTHER:
                ref = text_view(full, full_row, _body(None, text=full.pieces[tok]))
                assert view["logp"] == pytest.approx(ref["logp"], abs=1e-12)
                assert view["tempered"] == pytest.approx(ref["tempered"], abs=1e-12)
        assert mean == pytest.approx(1.0, abs=1e-9)


def test_refuses_another_key_and_a_tampered_document(pair) -> None:
    _, fp = pair
    with pytest.raises(FingerprintError, match="made with key"):
        fp.check_key(b"another key, sixteen bytes or more")
    doc = dict(fp.doc)
    rows = [dict(r) for r in doc["rows"]["no_bos"]]
    rows[0]["logprobs"] = list(reversed(rows[0]["logprobs"]))
    doc["rows"] = {"no_bos": rows}
    assert "descending" in check_endpoint_fingerprint(doc)[0]
    with pytest.raises(FingerprintError):
        FingerprintReference({"format": "rev-fingerprint/1"})
