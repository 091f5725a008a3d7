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
