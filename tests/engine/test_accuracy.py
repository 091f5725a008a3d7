"""Issue 2 acceptance: verdicts on real MiniLM variants and tiny GPT-2s, in few challenges.

Each case runs the same in-process engine as ``rev verify`` at alpha = 0.01 with a budget of
64 challenges. The expectations are the issue's table: ``exact`` accepts only identical
weights; ``precision`` also accepts fp16/bf16 casts and rejects real modifications.
"""

from __future__ import annotations

import pytest

from rev_tasks.core.keys import load_key
from rev_tasks.core.transcript import audit
from rev_tasks.engine import VerifyParams, verify
from rev_tasks.inference import load_model

EXACT = {
    "copy": "SAME",
    "fp16": "DIFFERENT",
    "bf16": "DIFFERENT",
    "noise_0.1pct": "DIFFERENT",
    "noise_1pct": "DIFFERENT",
    "finetune_1": "DIFFERENT",
    "finetune_10": "DIFFERENT",
    "swapped_2_3": "DIFFERENT",
}
PRECISION = {
    "copy": "SAME",
    "fp16": "SAME",
    "bf16": "SAME",
    "noise_1pct": "DIFFERENT",
    "finetune_10": "DIFFERENT",
    "swapped_2_3": "DIFFERENT",
}


@pytest.fixture(scope="module")
def reference(minilm):
    return load_model(minilm)


@pytest.fixture(scope="module")
def loaded_variants(minilm_variants):
    return {name: load_model(path) for name, path in minilm_variants.items()}


def _run(ref, cand, tolerance, key):
    return verify(ref, cand, key, VerifyParams(tolerance=tolerance, alpha=0.01, max_challenges=64))


@pytest.mark.parametrize("variant,expected", sorted(EXACT.items()))
def test_exact_tolerance(reference, loaded_variants, key_file, variant, expected):
    out = _run(reference, loaded_variants[variant], "exact", load_key(key_file))
    assert out.result["verdict"] == expected, out.result
    assert out.result["challenges_used"] <= 64
    if expected == "SAME":
        assert out.result["challenges_used"] <= 32


@pytest.mark.parametrize("variant,expected", sorted(PRECISION.items()))
def test_precision_tolerance(reference, loaded_variants, key_file, variant, expected):
    out = _run(reference, loaded_variants[variant], "precision", load_key(key_file))
    assert out.result["verdict"] == expected, out.result
    assert out.result["challenges_used"] <= 64
    if expected == "SAME":
        assert out.result["challenges_used"] <= 32


@pytest.mark.parametrize("tolerance", ["exact", "precision"])
def test_tiny_gpt2_pairs(tiny_gpt2, key_file, tolerance):
    key = load_key(key_file)
    a, b, a_copy = (load_model(tiny_gpt2[k]) for k in ("a", "b", "a_copy"))
    same = _run(a, a_copy, tolerance, key)
    assert same.result["verdict"] == "SAME"
    assert same.result["challenges_used"] <= 32
    different = _run(a, b, tolerance, key)
    assert different.result["verdict"] == "DIFFERENT"
    assert different.result["challenges_used"] <= 8  # unrelated models: DIFFERENT within 8
    assert different.result["distances"]["mean"] > 0.3


def test_unrelated_architectures_are_different_with_reason(reference, tiny_gpt2, key_file):
    out = _run(reference, load_model(tiny_gpt2["a"]), "exact", load_key(key_file))
    assert out.result["verdict"] == "DIFFERENT"
    assert out.result["challenges_used"] == 0
    assert "architectures differ" in out.result["reason"]
    assert audit(out.transcript) == []  # the incompatible verdict is auditable too
    forged = {**out.transcript, "candidate": out.transcript["reference"]}
    assert any("compared site for site" in p for p in audit(forged))


def test_unrelated_minilm_vs_random_bert_decides_within_8(reference, tmp_path, key_file):
    """A randomly initialised network of the same shape is 'unrelated' and must be quick."""
    from rev_tasks.testing import variants as V

    path = V.save_transformed(reference.path, tmp_path / "random-minilm", V.reinitialise(7))
    out = _run(reference, load_model(path), "exact", load_key(key_file))
    assert out.result["verdict"] == "DIFFERENT"
    assert out.result["challenges_used"] <= 8


def test_identical_models_stop_early_and_the_transcript_matches(reference, loaded_variants):
    out = _run(reference, loaded_variants["copy"], "exact", load_key(None))
    assert out.result["verdict"] == "SAME"
    assert len(out.transcript["records"]) == out.result["challenges_used"]
    assert out.result["transcript_root"] == out.transcript["root"]
    assert out.result["distances"]["max"] == 0.0
    assert audit(out.transcript) == []
