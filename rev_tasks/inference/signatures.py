"""Similarity-preserving binary signatures: seeded random projection, sign, pack.

For two activation vectors at angle θ, each projected sign bit differs with probability θ/π
(Charikar's SimHash), so the normalised Hamming distance between signatures estimates how far
the activations moved: float noise flips almost no bits, a changed weight flips a few, an
unrelated model flips about half. The projection comes from the secret key through SHAKE-256,
so it is fixed by the key alone, the same on every machine and numpy version.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import numpy as np

from rev_tasks.core.keys import derive

DEFAULT_BITS = 4096


def _check_bits(bits: int) -> None:
    if bits < 64 or bits % 64:
        raise ValueError(f"bits per site must be a positive multiple of 64, not {bits}")


@lru_cache(maxsize=64)
def projection(key: bytes, site: int, hidden_size: int, bits: int = DEFAULT_BITS) -> np.ndarray:
    """A ±1 matrix of shape (hidden_size, bits), stored as int8, derived from key and site.

    Stored as int8 (one byte per entry instead of eight) so that a worker caching the
    projections of several large models stays small; :func:`sign_signatures` widens it to
    float64 for the product, which gives exactly the same signs.
    """
    _check_bits(bits)
    seed = derive(key, f"projection/{hidden_size}x{bits}", site)
    raw = hashlib.shake_256(seed).digest(hidden_size * bits // 8)
    signs = np.unpackbits(np.frombuffer(raw, dtype=np.uint8)).reshape(hidden_size, bits)
    matrix = (signs.astype(np.int8) << 1) - 1
    matrix.setflags(write=False)
    return matrix


_COLUMN_BLOCK = 512  # int8 -> float64 widening in cache-sized column blocks


@lru_cache(maxsize=1)
def _single_threaded_blas() -> None:
    """Pin numpy's BLAS to one thread in this process, once.

    The products here are small (a batch of pooled vectors times a 512-column block);
    OpenBLAS's thread hand-off costs more than the arithmetic (measured 8× slower at batch 8
    on the 2-core machine), and farm workers already run one process per core.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return
    threadpool_limits(limits=1, user_api="blas")


def sign_signatures(pooled: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Packed sign bits of ``pooled @ matrix`` in float64: shape (batch, bits // 8), uint8.

    The int8 projection is widened to float64 one column block at a time, so the product
    needs a small cache-resident temporary instead of a full float64 copy of the matrix.
    """
    if pooled.ndim != 2 or pooled.shape[1] != matrix.shape[0]:
        raise ValueError(f"pooled states {pooled.shape} do not fit projection {matrix.shape}")
    _single_threaded_blas()
    x = pooled.astype(np.float64, copy=False)
    bits = np.empty((x.shape[0], matrix.shape[1]), dtype=bool)
    block = np.empty((matrix.shape[0], _COLUMN_BLOCK), dtype=np.float64)
    for start in range(0, matrix.shape[1], _COLUMN_BLOCK):
        stop = min(start + _COLUMN_BLOCK, matrix.shape[1])
        widened = block[:, : stop - start]
        np.copyto(widened, matrix[:, start:stop], casting="unsafe")
        np.greater(x @ widened, 0.0, out=bits[:, start:stop])
    return np.packbits(bits, axis=1)


def site_signatures(
    pooled_by_site: dict[int, np.ndarray], key: bytes, bits: int = DEFAULT_BITS
) -> list[dict[int, np.ndarray]]:
    """Per-challenge signatures ``[{site: packed bits}, ...]`` from pooled states by site."""
    sites = sorted(pooled_by_site)
    if not sites:
        return []
    batch = pooled_by_site[sites[0]].shape[0]
    packed = {
        s: sign_signatures(pooled_by_site[s], projection(key, s, pooled_by_site[s].shape[1], bits))
        for s in sites
    }
    return [{s: packed[s][i] for s in sites} for i in range(batch)]


# -- on the model's device (issue 17) -------------------------------------------------------
#
# Once the forward pass runs on a GPU, moving every site's hidden states to the host, pooling
# them there in float64 and projecting with numpy dominated a batch (REV 2.5x / 10.6x / 1.8x
# the bare forward at batch 1 / 8 / 32 on an H200). The device path pools, projects and packs
# where the hidden states already are, in float64 (exact widening of the states, the same
# ±1 matrix), and moves only the packed bits (512 bytes per site and challenge) to the host.

ENV_SIGNATURE_DEVICE = "REV_SIGNATURE_DEVICE"
SIGNATURE_DEVICES = ("auto", "host", "model")
_PACK_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # np.packbits' big-endian bit order


def signature_device_setting() -> str:
    """``REV_SIGNATURE_DEVICE``: ``host``, ``model`` or ``auto`` (default; a bad value: ``ValueError``)."""
    import os

    value = (os.environ.get(ENV_SIGNATURE_DEVICE) or "auto").strip().lower()
    if value not in SIGNATURE_DEVICES:
        raise ValueError(
            f"{ENV_SIGNATURE_DEVICE} must be one of {', '.join(SIGNATURE_DEVICES)}, not {value!r}"
        )
    return value


def on_model_device(model_device: str, setting: str | None = None) -> bool:
    """Whether signatures of a model on ``model_device`` are computed there.

    ``auto`` (the default) uses the device path on CUDA only, so CPU runs keep the host path
    and its bits; ``model`` forces it on any device that has float64 (not MPS); ``host``
    never.
    """
    setting = setting or signature_device_setting()
    kind = str(model_device).split(":", 1)[0]
    if setting == "host" or kind == "mps":
        return False
    if setting == "model":
        return True
    return kind == "cuda"


@lru_cache(maxsize=8)
def device_projection(
    key: bytes, site: int, hidden_size: int, bits: int, device: str
) -> Any:  # torch.Tensor
    """:func:`projection` widened to float64 on ``device``, cached.

    8 bytes per entry on the device (32 MiB per site of a 1024-wide model at 4,096 bits; at
    most 8 cached): cheap on a GPU, which is why ``auto`` leaves CPU runs on the host path and
    its int8 matrices.
    """
    import torch

    matrix = projection(key, site, hidden_size, bits)
    return torch.from_numpy(np.array(matrix, copy=True)).to(device).to(torch.float64)


def pack_bits_torch(bits: Any) -> np.ndarray:
    """``np.packbits(bits, axis=1)`` of a (batch, n) boolean tensor, packed on its device."""
    import torch

    batch, n = bits.shape
    if n % 8:
        raise ValueError("the bit count must be a multiple of 8")
    weights = torch.tensor(_PACK_WEIGHTS, dtype=torch.uint8, device=bits.device)
    grouped = bits.reshape(batch, n // 8, 8).to(torch.uint8)
    packed = (grouped * weights).sum(dim=2, dtype=torch.uint8)
    return packed.cpu().numpy()


def sign_signatures_torch(pooled: Any, matrix: Any) -> np.ndarray:
    """:func:`sign_signatures` for float64 tensors on one device: packed on that device."""
    if pooled.ndim != 2 or pooled.shape[1] != matrix.shape[0]:
        raise ValueError(f"pooled states {tuple(pooled.shape)} do not fit {tuple(matrix.shape)}")
    return pack_bits_torch((pooled @ matrix) > 0.0)


def site_signatures_torch(
    pooled_by_site: dict[int, Any], key: bytes, bits: int = DEFAULT_BITS
) -> list[dict[int, np.ndarray]]:
    """:func:`site_signatures` of float64 tensors pooled on the model's device."""
    sites = sorted(pooled_by_site)
    if not sites:
        return []
    packed = {}
    for s in sites:
        x = pooled_by_site[s]
        matrix = device_projection(key, s, int(x.shape[1]), bits, str(x.device))
        packed[s] = sign_signatures_torch(x, matrix)
    batch = packed[sites[0]].shape[0]
    return [{s: packed[s][i] for s in sites} for i in range(batch)]


def model_signatures(
    model: Any, prompts: list[str], sites: list[int], key: bytes, bits: int = DEFAULT_BITS
) -> list[dict[int, np.ndarray]]:
    """Signatures of ``prompts`` on ``model`` (in memory or streamed), on the device
    :func:`on_model_device` picks; any other object with ``pooled_states`` uses the host."""
    device = getattr(model, "device", "cpu")
    if getattr(model, "device_pooling", False) and on_model_device(device):
        return site_signatures_torch(model.pooled_states(prompts, sites, on_device=True), key, bits)
    return site_signatures(model.pooled_states(prompts, sites), key, bits)
