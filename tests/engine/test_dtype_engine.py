"""Compute dtypes in the engine: the self-calibration of a fp16/bf16 reference, and the
refusal to compare a fingerprint with a candidate computed in another dtype.

Real weights (the tiny GPT-2 of the engine fixtures, MiniLM for the calibration): the
calibration's cast copies must be, bit for bit, the cast checkpoints loaded in the job's
dtype, since that is what a cast candidate is in such a job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rev_tasks.cli import main as rev
from rev_tasks.core.compat import COMPUTE_DTYPES, dtype_mismatch
from rev_tasks.engine import (
    DtypeMismatch,
    ModelSide,
    Verification,
    VerifyParams,
    _float32_weights,
    calibrate_reference,
    calibration_challenges,
    differing_bits,
    fingerprint_model,
    identify,
    rounded_copy,
)
from rev_tasks.inference import load_model
from rev_tasks.testing import variants as V

KEY = bytes(range(32))  # the bytes of the key_file fixture


@pytest.mark.parametrize(("job", "cast"), [("bfloat16", "float16"), ("float16", "bfloat16")])
def test_a_cast_copy_is_the_cast_checkpoint_loaded_in_the_jobs_dtype(
    tiny_gpt2: dict[str, Path], tmp_path: Path, job: str, cast: str
) -> None:
    """fp32 → cast → job dtype, as a cast candidate runs in that job (double rounding
    included), not a cast of the reference's already rounded weights."""
    src = tiny_gpt2["a"]
    reference = load_model(src, dtype=job)
    copy = rounded_copy(reference, cast, _float32_weights(reference))
    saved = load_model(V.save_transformed(src, tmp_path / cast, V.cast(cast)), dtype=job)
    want = saved.model.state_dict()
    got = copy.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # And it is not what rounding the loaded (already job-dtype) weights would give.
    naive = rounded_copy(reference, cast).model.state_dict()
    assert any(not torch.equal(naive[k], want[k]) for k in want)


def test_a_float32_reference_rounds_its_own_weights(tiny_gpt2: dict[str, Path]) -> None:
    reference = load_model(tiny_gpt2["a"])
    assert _float32_weights(reference) is None  # no second load for the fp32 default


def test_bf16_calibration_measures_the_casts_as_a_bf16_job_runs_them(
    minilm: Path, tmp_path: Path
) -> None:
    """In bf16 compute the bf16 cast is the reference itself (0 bits on every calibration
    challenge); the fp16 cast differs only by double rounding, and the calibration's count
    is exactly the distance of the saved fp16 checkpoint loaded in bf16."""
    reference = load_model(minilm, dtype="bfloat16")
    sites = reference.sites
    cal = calibrate_reference(reference, KEY, sites, 256, n=4)
    assert cal.differing_bits["bfloat16"] == [0, 0, 0, 0]
    fp16 = load_model(V.save_transformed(minilm, tmp_path / "fp16", V.cast("float16")), "bfloat16")
    challenges = calibration_challenges(KEY, 4)
    ref_sigs = ModelSide(reference).signatures(challenges, sites, KEY, 256)
    fp16_sigs = ModelSide(fp16).signatures(challenges, sites, KEY, 256)
    want = [differing_bits(a, b, sites) for a, b in zip(ref_sigs, fp16_sigs, strict=True)]
    assert cal.differing_bits["float16"] == want


def test_a_fingerprint_is_compared_only_in_its_own_dtype(
    tiny_gpt2: dict[str, Path], tmp_path: Path, key_file: Path
) -> None:
    assert COMPUTE_DTYPES == ("float32", "float16", "bfloat16")
    path = tiny_gpt2["a"]
    doc = fingerprint_model(load_model(path, dtype="bfloat16"), KEY, n=8, bits=256)
    assert doc["descriptor"]["dtype"] == "bfloat16"
    params = VerifyParams(max_challenges=8, bits=256)
    same = Verification(doc, load_model(tiny_gpt2["a_copy"], dtype="bfloat16"), KEY, params)
    outcome = same.run()
    assert outcome.result["verdict"] == "SAME"
    assert outcome.result["candidate"]["dtype"] == "bfloat16"
    fp32 = load_model(tiny_gpt2["a_copy"])
    with pytest.raises(DtypeMismatch, match="computed in bfloat16, the candidate's in float32"):
        Verification(doc, fp32, KEY, params)
    # identify never ranks a fingerprint of another dtype (the farm lists it with the reason)
    assert identify(fp32, {"a-bf16": doc}, KEY, params) == []
    ranked = identify(load_model(tiny_gpt2["a_copy"], "bfloat16"), {"a-bf16": doc}, KEY, params)
    assert [(r["model_id"], r["verdict"]) for r in ranked] == [("a-bf16", "SAME")]
    assert dtype_mismatch({"dtype": "float16"}, {"dtype": "float16"}) is None
    assert dtype_mismatch({}, {"dtype": "float16"}) is None  # a descriptor without one
    # `rev verify FP CANDIDATE` says so, and exits non-zero instead of a verdict.
    fp_file = tmp_path / "fp.json"
    fp_file.write_text(json.dumps(doc))
    argv = ["verify", str(fp_file), str(tiny_gpt2["a_copy"]), "--key-file", str(key_file)]
    assert rev([*argv, "--bits", "256", "--max-challenges", "8"]) == 2
    assert rev([*argv, "--bits", "256", "--max-challenges", "8", "--dtype", "bfloat16"]) == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_signatures_do_not_depend_on_the_batch(minilm: Path, dtype: str) -> None:
    """Each prompt alone in fp16/bf16: the same bits in a batch of 8, of 3 or of 1 (the
    fingerprint, the job and a validator's two records all batch differently)."""
    from rev_tasks.core.challenges import generate_challenges

    model = load_model(minilm, dtype=dtype)
    side = ModelSide(model)
    challenges = generate_challenges(KEY, 8)
    sites = model.sites
    whole = side.signatures(challenges, sites, KEY, 1024)
    alone = [side.signatures([c], sites, KEY, 1024)[0] for c in challenges]
    threes = [
        sig
        for start in range(0, 8, 3)
        for sig in side.signatures(challenges[start : start + 3], sites, KEY, 1024)
    ]
    for a, b, c in zip(whole, alone, threes, strict=True):
        assert differing_bits(a, b, sites) == differing_bits(a, c, sites) == 0


def test_fp16_records_reexecuted_in_other_batches_pass_and_forgeries_fail(
    minilm: Path, tmp_path: Path
) -> None:
    """A fp16 MiniLM job (batches of 8) re-executed two records at a time, as validators do:
    every pair reproduces bit for bit (allowance 0), the job's own fp16 self-calibration too,
    and a candidate forged from the reference's records is caught under the usual 4 bits."""
    from rev_tasks.engine import reexecute_sample

    reference = load_model(minilm, dtype="float16")
    cast = load_model(V.save_transformed(minilm, tmp_path / "bf16", V.cast("bfloat16")), "float16")
    params = VerifyParams(tolerance="precision", max_challenges=16)
    out = Verification(reference, cast, KEY, params, nonce=bytes(range(32))).run()
    assert out.result["verdict"] == "SAME"
    doc = out.transcript
    n = len(doc["records"])
    for i in range(0, n - 1, 2):
        assert reexecute_sample(doc, reference, cast, KEY, [i, i + 1], allowance_bits=0) == []
    noisy = load_model(
        V.save_transformed(minilm, tmp_path / "noisy", V.gaussian_noise(0.01)), "float16"
    )
    exact = VerifyParams(max_challenges=8)
    different = Verification(reference, noisy, KEY, exact, nonce=bytes(range(32))).run()
    assert different.result["verdict"] == "DIFFERENT"
    forged = json.loads(json.dumps(different.transcript))
    for rec in forged["records"]:
        rec["candidate"] = dict(rec["reference"])
        rec["differing_bits"] = 0
    problems = reexecute_sample(forged, reference, noisy, KEY, [0])
    assert problems and problems[0].startswith("record 0: candidate signatures differ"), problems
    assert "(allowance 4)" in problems[0]
