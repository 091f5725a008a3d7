"""Hamming distances between packed binary signatures.

A signature is a 1-D ``np.ndarray`` of dtype uint8 holding bits packed by ``np.packbits``
(the project uses bit counts that are a multiple of 64, so the bytes view as whole uint64
words; other lengths work too, on a slower byte-wise path).

Why it is written this way (measured, see ``bench/bench_hamming.py``):

* Single pair: every numpy call costs ~0.3-0.7 µs of dispatch, so :func:`hamming` uses the
  fewest calls that stay exact: one XOR, one popcount over uint64 words, and a plain Python
  ``sum`` over the <= 64-valued per-word counts (cheaper than a numpy reduction for ~157
  words). Callers that compare one signature many times can convert it once with
  :func:`as_int` and pass Python ints, which is cheaper still.
* One against many: the XOR runs over whole cache-sized row blocks flattened to 1-D (one long
  SIMD loop instead of one short loop per row), the per-word popcounts (uint8) are copied
  into a float32 buffer, and a BLAS matrix-vector product against a ones vector sums each
  row: about twice as fast as ``np.add.reduce(..., axis=1, dtype=int64)``, whose casting
  reduction runs one short loop per row. Integer sums below 2**24 are exact in float32; the
  code switches to float64 above that.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_int", "hamming", "hamming_one_to_many", "normalized"]

_U8 = np.dtype(np.uint8)
_U64 = np.dtype(np.uint64)
_xor = np.bitwise_xor
_popcount = np.bitwise_count

# Bytes of B per block in hamming_one_to_many: 512 rows of 1,256 bytes (XOR buffer ~630 KiB,
# counts ~80 KiB, float32 counts ~310 KiB) measured fastest on a 1 MiB-L2 core; 256 rows
# was ~10% slower and 1024 rows ~25% slower.
_BLOCK_BYTES = 512 * 1256
# Above this many words per row the Python ``sum`` in hamming() loses to a numpy reduction.
_SUM_WORDS_MAX = 512
# float32 holds every integer up to 2**24 exactly.
_F32_EXACT = 1 << 24


def _check_sig(x: object, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a numpy uint8 array, got {type(x).__name__}")
    if x.dtype != _U8:
        raise ValueError(f"{name}: expected dtype uint8 (packed bits), got {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D signature, got shape {x.shape}")
    return x


def as_int(sig: np.ndarray) -> int:
    """Return the signature as one Python int (little-endian bytes) for repeated comparisons.

    ``hamming(as_int(a), as_int(b)) == hamming(a, b)``; the conversion costs about as much as
    one array comparison, so it pays off only when the same signature is compared often.
    """
    _check_sig(sig, "sig")
    return int.from_bytes(sig.tobytes(), "little")


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> int:
    """Number of differing bits between two packed signatures of equal length.

    Accepts two uint8 arrays of the same 1-D shape, or two ints from :func:`as_int`.
    """
    if type(a) is int and type(b) is int:
        if a < 0 or b < 0:
            raise ValueError("hamming: int signatures must be non-negative (use as_int)")
        return (a ^ b).bit_count()
    try:
        # Fast path: one attribute check each, no isinstance chains.
        ok = a.dtype is _U8 and b.dtype is _U8 and a.ndim == 1 and a.shape == b.shape  # type: ignore[union-attr]
    except AttributeError:
        ok = False
    if not ok:
        _check_sig(a, "a")
        _check_sig(b, "b")
        if a.shape != b.shape:  # type: ignore[union-attr]
            raise ValueError(
                f"hamming: signatures differ in length ({a.shape[0]} vs {b.shape[0]} bytes)"  # type: ignore[union-attr]
            )
    n = a.shape[0]  # type: ignore[union-attr]
    x = _xor(a, b)
    if n & 7 == 0:
        counts = _popcount(x.view(_U64))
        if n <= 8 * _SUM_WORDS_MAX:
            return sum(counts.tobytes())
        return int(np.add.reduce(counts, dtype=np.int64))
    return int(np.add.reduce(_popcount(x), dtype=np.int64))


def hamming_one_to_many(a: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Differing bits between signature ``a`` and every row of ``B`` (shape (m, nbytes)).

    Returns an int64 array of length m. Processes B in cache-sized row blocks so memory use
    stays flat for any m.
    """
    _check_sig(a, "a")
    if not isinstance(B, np.ndarray):
        raise ValueError(f"B: expected a numpy uint8 array, got {type(B).__name__}")
    if B.dtype != _U8:
        raise ValueError(f"B: expected dtype uint8 (packed bits), got {B.dtype}")
    if B.ndim != 2:
        raise ValueError(f"B: expected shape (m, nbytes), got shape {B.shape}")
    m, nbytes = B.shape
    if nbytes != a.shape[0]:
        raise ValueError(f"B has rows of {nbytes} bytes but a has {a.shape[0]} bytes")
    out = np.zeros(m, dtype=np.int64)
    if m == 0 or nbytes == 0:
        return out

    if nbytes % 8 == 0:
        wdt, w = _U64, nbytes // 8
    else:
        wdt, w = _U8, nbytes
    max_count = nbytes * 8
    fdt = np.float32 if max_count < _F32_EXACT else np.float64
    block = max(1, min(m, _BLOCK_BYTES // nbytes))

    a_w = np.ascontiguousarray(a).view(wdt)
    tile = np.tile(a_w, block)  # a repeated per row: the XOR becomes one flat loop
    xbuf = np.empty(block * w, dtype=wdt)
    cnt8 = np.empty(block * w, dtype=np.uint8)
    cbuf = np.empty(block * w, dtype=fdt)
    ones = np.ones(w, dtype=fdt)
    sums = np.empty(block, dtype=fdt)

    for start in range(0, m, block):
        stop = min(m, start + block)
        rows = stop - start
        k = rows * w
        blk = np.ascontiguousarray(B[start:stop]).view(wdt).reshape(k)
        x = xbuf[:k]
        c = cbuf[:k]
        _xor(blk, tile[:k], out=x)
        _popcount(x, out=cnt8[:k])  # uint8 output: no casting inside the popcount loop
        c[...] = cnt8[:k]
        np.matmul(c.reshape(rows, w), ones, out=sums[:rows])
        out[start:stop] = sums[:rows]
    return out


def normalized(a: np.ndarray | int, b: np.ndarray | int, bits: int | None = None) -> float:
    """Fraction of differing bits, in [0, 1].

    For arrays the bit count is the array length times 8; for ints pass ``bits``.
    """
    if bits is None:
        if type(a) is int or type(b) is int:
            raise ValueError("normalized: pass bits= when comparing int signatures")
        bits = 8 * _check_sig(a, "a").shape[0]
    if bits <= 0:
        raise ValueError("normalized: signatures must have at least one bit")
    return hamming(a, b) / bits
