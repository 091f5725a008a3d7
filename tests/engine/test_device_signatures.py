"""On-device signatures (pool, project, pack where the model runs) against the host path.

Issue 17: on CUDA the float64 pooling and the numpy projection on the host dominated a batch.
The device path must not change what the CPU default computes (``auto`` keeps the host path
off CUDA), and forced onto the CPU (``REV_SIGNATURE_DEVICE=model``) it must give the host
path's bits: pooling is the same torch ops on the same device, packing is exact, and the
float64 product differs from numpy's only in summation order (docs/statistics.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rev_tasks.core.challenges import generate_challenges
from rev_tasks.core.keys import load_key
from rev_tasks.engine import ModelSide, differing_bits
from rev_tasks.inference.loader import load_model
from rev_tasks.inference.signatures import (
    ENV_SIGNATURE_DEVICE,
    on_model_device,
    pack_bits_torch,
    site_signatures,
)
from rev_tasks.inference.streaming import load_streamed

KEY = load_key(None)
CHALLENGES = generate_challenges(KEY, 32)
BITS = 4096


def test_packing_on_device_equals_numpy_packbits() -> None:
    rng = np.random.default_rng(0)
    for shape in ((1, 8), (3, 64), (32, 4096)):
        bits = rng.random(shape) > 0.5
        assert np.array_equal(pack_bits_torch(torch.from_numpy(bits)), np.packbits(bits, axis=1))
    with pytest.raises(ValueError):
        pack_bits_torch(torch.zeros((2, 12), dtype=torch.bool))


def test_device_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_SIGNATURE_DEVICE, raising=False)
    assert not on_model_device("cpu")  # the default keeps the CPU on the host path
    assert on_model_device("cuda:0")
    monkeypatch.setenv(ENV_SIGNATURE_DEVICE, "model")
    assert on_model_device("cpu") and not on_model_device("mps")  # MPS has no float64
    monkeypatch.setenv(ENV_SIGNATURE_DEVICE, "host")
    assert not on_model_device("cuda")
    monkeypatch.setenv(ENV_SIGNATURE_DEVICE, "gpu")
    with pytest.raises(ValueError, match=ENV_SIGNATURE_DEVICE):
        on_model_device("cuda")


def _host_reference(model: object, sites: list[int]) -> list[dict[int, np.ndarray]]:
    """The host path as it was before the device path existed: numpy pooling + projection."""
    out = []
    for i in range(0, len(CHALLENGES), 8):
        prompts = [c.prompt for c in CHALLENGES[i : i + 8]]
        out += site_signatures(model.pooled_states(prompts, sites), KEY, BITS)  # type: ignore[attr-defined]
    return out


def _side(model: object, sites: list[int]) -> list[dict[int, np.ndarray]]:
    side = ModelSide(model)  # type: ignore[arg-type]
    out = []
    for i in range(0, len(CHALLENGES), 8):
        out += side.signatures(CHALLENGES[i : i + 8], sites, KEY, BITS)
    return out


@pytest.fixture(scope="module", params=["minilm", "tiny-gpt2", "tiny-gpt2-streamed"])
def model(request: pytest.FixtureRequest, minilm: Path, tiny_gpt2: dict[str, Path]) -> object:
    if request.param == "minilm":
        return load_model(minilm)
    if request.param == "tiny-gpt2":
        return load_model(tiny_gpt2["a"])
    return load_streamed(tiny_gpt2["a"], memory_budget_mb=64)


def test_cpu_default_and_device_path_equal_host_bits(
    model: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    sites = model.sites  # type: ignore[attr-defined]
    reference = _host_reference(model, sites)
    monkeypatch.delenv(ENV_SIGNATURE_DEVICE, raising=False)
    default = _side(model, sites)
    monkeypatch.setenv(ENV_SIGNATURE_DEVICE, "model")
    on_device = _side(model, sites)
    for ref, a, b in zip(reference, default, on_device, strict=True):
        assert differing_bits(ref, a, sites) == 0  # the default path is unchanged
        assert differing_bits(ref, b, sites) == 0  # the CPU device path: identical bits
        assert all(b[s].dtype == np.uint8 and b[s].shape == (BITS // 8,) for s in sites)


def test_pooled_on_device_equals_host_pooling_on_cpu(model: object) -> None:
    prompts = [c.prompt for c in CHALLENGES[:8]]
    sites = model.sites  # type: ignore[attr-defined]
    host = model.pooled_states(prompts, sites)  # type: ignore[attr-defined]
    dev = model.pooled_states(prompts, sites, on_device=True)  # type: ignore[attr-defined]
    for s in sites:
        assert isinstance(dev[s], torch.Tensor) and dev[s].dtype == torch.float64
        assert np.array_equal(dev[s].numpy(), host[s])


@pytest.mark.gpu
def test_cuda_device_path_within_the_reexecution_allowance(tiny_gpt2: dict[str, Path]) -> None:
    """On a GPU the device path (the CUDA default) against the host path on the same GPU."""
    from rev_tasks.engine import reexecution_allowance

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = load_model(tiny_gpt2["a"], device="cuda")
    sites = gpu.sites
    host = _host_reference(gpu, sites)
    device = _side(gpu, sites)  # auto: on the device
    allow = reexecution_allowance(BITS * len(sites))
    assert max(differing_bits(a, b, sites) for a, b in zip(host, device, strict=True)) <= allow
