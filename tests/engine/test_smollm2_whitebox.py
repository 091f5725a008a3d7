"""White-box REV on a real 30-layer Llama: the dequantised SmolLM2-135M-Instruct folder.

fingerprint, verify against it in memory and layer-streamed within a memory budget, and
identify among fingerprints, with the fewest challenges a SAME needs at alpha 0.01 (8).
"""

from __future__ import annotations

from pathlib import Path

from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.engine import VerifyParams, fingerprint_model, identify, verify
from rev_tasks.inference.loader import load_model
from rev_tasks.inference.streaming import load_streamed
from rev_tasks.testing.smollm2 import smollm2_dir

PARAMS = VerifyParams(max_challenges=8, batch_size=8)


def test_fingerprint_verify_streamed_and_identify(tmp_path: Path) -> None:
    """One fingerprint (8 challenges) serves every check, so the 135M model runs 32 challenges."""
    from rev_tasks.testing.variants import build_tiny_llama

    folder = smollm2_dir()
    loaded = load_model(folder)
    fp = fingerprint_model(loaded, DEMO_KEY, n=8, batch_size=8)
    out = verify(fp, loaded, DEMO_KEY, PARAMS)  # in memory
    assert out.result["verdict"] == "SAME", out.result["reason"]
    streamed = load_streamed(folder, memory_budget_mb=400)
    out = verify(fp, streamed, DEMO_KEY, PARAMS)  # layer-streamed within 400 MB
    assert out.result["verdict"] == "SAME", out.result["reason"]
    assert out.result["distances"]["mean"] == 0.0
    other = load_model(build_tiny_llama(tmp_path / "tiny"))
    ranked = identify(
        loaded,
        {"smollm2": fp, "tiny": fingerprint_model(other, DEMO_KEY, n=8, batch_size=8)},
        DEMO_KEY,
        PARAMS,
    )
    assert ranked[0]["model_id"] == "smollm2" and ranked[0]["verdict"] == "SAME"
