"""Hamming distances between packed binary signatures.

A signature is a 1-D ``np.ndarray`` of dtype uint8 holding bits packed by ``np.packbits``
(the project uses bit counts that are a multiple of 64, so the bytes view as whole uint64
words; other lengths work too).

Two implementations, one contract (``tests/unit/test_hamming.py`` checks both against a
naive unpack-and-compare):

* ``rev_tasks.core._popcount`` (C, built by ``pip install -e .`` when a compiler exists): a
  popcount loop over 64-bit words behind one METH_FASTCALL call (AVX-512 VPOPCNTDQ where the
  CPU has it, chosen at import). A 10,048-bit pair costs ~0.3 µs (numpy: ~2.4 µs, nearly
  all ufunc dispatch) and one-vs-10,000 runs at ~13-20 M distances/s on one core with the
  scalar kernel, ~30-45 M/s with AVX-512 (numpy: ~4-6 M/s); see ``bench/bench_hamming.py``.
* the numpy fallback below, used when the extension is not built (``BACKEND == "numpy"``)
  and for inputs the C path does not take (non-contiguous views, ints from :func:`as_int`).
  Its design notes, measured before the C path existed:

  - Single pair: every numpy call costs ~0.3-0.7 µs of dispatch, so it uses the fewest calls
    that stay exact: one XOR, one popcount over uint64 words, and a plain Python ``sum``
    over the <= 64-valued per-word counts (cheaper than a numpy reduction for ~157 words).
  - One against many: the XOR runs over whole cache-sized row blocks flattened to 1-D (one
    long SIMD loop instead of one short loop per row), the per-word popcounts (uint8) are
    copied into a float32 buffer, and a BLAS matrix-vector product against a ones vector
    sums each row: about twice as fast as ``np.add.reduce(..., axis=1, dtype=int64)``.
    Integer sums below 2**24 are exact in float32; the code switches to float64 above that.

The C path is only tried for exact ``np.ndarray`` arguments, so that both backends accept
and reject the same inputs with the same messages.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # built by setup.py (optional=True); absent on a machine without a C compiler
    from rev_tasks.core import _popcount as _ext
except ImportError:  # pragma: no cover - exercised by reloading with the module hidden
    _ext = None

__all__ = ["BACKEND", "as_int", "hamming", "hamming_one_to_many", "normalized"]

BACKEND = "c" if _ext is not None else "numpy"
"""Which implementation serves arrays: ``"c"`` (the extension) or ``"numpy"``."""

_ND = np.ndarray
_U8 = np.dtype(np.uint8)
_U64 = np.dtype(np.uint64)
_xor = np.bitwise_xor
_popcount = np.bitwise_count
# What the C functions raise for inputs they do not take (non-contiguous, wrong format or
# shape): the numpy path then either handles the input or raises the documented ValueError.
_FALLBACK = (TypeError, ValueError, BufferError)

# Bytes of B per block in the numpy one-to-many path: 512 rows of 1,256 bytes (XOR buffer
# ~630 KiB, counts ~80 KiB, float32 counts ~310 KiB) measured fastest on a 1 MiB-L2 core;
# 256 rows was ~10% slower and 1024 rows ~25% slower. The C path uses it only to bound the
# copy of a non-contiguous B.
_BLOCK_BYTES = 512 * 1256
# Above this many words per row the Python ``sum`` in the numpy pair path loses to a numpy
# reduction.
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


def _check_many(a: object, B: object) -> tuple[np.ndarray, np.ndarray]:
    a = _check_sig(a, "a")
    if not isinstance(B, np.ndarray):
        raise ValueError(f"B: expected a numpy uint8 array, got {type(B).__name__}")
    if B.dtype != _U8:
        raise ValueError(f"B: expected dtype uint8 (packed bits), got {B.dtype}")
    if B.ndim != 2:
        raise ValueError(f"B: expected shape (m, nbytes), got shape {B.shape}")
    if B.shape[1] != a.shape[0]:
        raise ValueError(f"B has rows of {B.shape[1]} bytes but a has {a.shape[0]} bytes")
    return a, B


def as_int(sig: np.ndarray) -> int:
    """Return the signature as one Python int (little-endian bytes).

    ``hamming(as_int(a), as_int(b)) == hamming(a, b)``. Before the C extension this was the
    fast way to compare one signature many times (~0.8 µs a pair); with the extension built,
    arrays are faster (~0.3 µs) and this is kept for callers that store ints.
    """
    _check_sig(sig, "sig")
    return int.from_bytes(sig.tobytes(), "little")


def _hamming_numpy(a: np.ndarray | int, b: np.ndarray | int) -> int:
    """The validating numpy implementation of :func:`hamming` (also the ints path)."""
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


def _one_to_many_numpy(a: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The numpy implementation of :func:`hamming_one_to_many` (arguments validated)."""
    m, nbytes = B.shape
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


def _one_to_many_c(a: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The C implementation (arguments validated); copies only a non-contiguous B, blockwise."""
    assert _ext is not None
    m, nbytes = B.shape
    out = np.empty(m, dtype=np.int64)
    a = np.ascontiguousarray(a)
    if B.flags.c_contiguous:
        _ext.one_to_many(a, B, out)
        return out
    block = max(1, _BLOCK_BYTES // max(1, nbytes))
    for start in range(0, m, block):
        stop = min(m, start + block)
        _ext.one_to_many(a, np.ascontiguousarray(B[start:stop]), out[start:stop])
    return out


if _ext is not None:
    _c_hamming = _ext.hamming

    def hamming(a: np.ndarray | int, b: np.ndarray | int) -> int:
        """Number of differing bits between two packed signatures of equal length.

        Accepts two uint8 arrays of the same 1-D shape, or two ints from :func:`as_int`.
        """
        if type(a) is _ND and type(b) is _ND:
            try:
                return _c_hamming(a, b)
            except _FALLBACK:
                pass  # non-contiguous or invalid: the numpy path handles or explains it
        return _hamming_numpy(a, b)

    def hamming_one_to_many(a: np.ndarray, B: np.ndarray) -> np.ndarray:
        """Differing bits between signature ``a`` and every row of ``B`` (shape (m, nbytes)).

        Returns an int64 array of length m. Runs without the GIL for large B; a
        non-contiguous B is copied in cache-sized row blocks, so memory use stays flat.
        """
        return _one_to_many_c(*_check_many(a, B))

else:

    def hamming(a: np.ndarray | int, b: np.ndarray | int) -> int:
        """Number of differing bits between two packed signatures of equal length.

        Accepts two uint8 arrays of the same 1-D shape, or two ints from :func:`as_int`.
        """
        return _hamming_numpy(a, b)

    def hamming_one_to_many(a: np.ndarray, B: np.ndarray) -> np.ndarray:
        """Differing bits between signature ``a`` and every row of ``B`` (shape (m, nbytes)).

        Returns an int64 array of length m. Processes B in cache-sized row blocks so memory
        use stays flat for any m.
        """
        return _one_to_many_numpy(*_check_many(a, B))


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


def backend_info() -> dict[str, Any]:
    """Which implementation is active and how it was built (benchmarks record this)."""
    if _ext is None:
        return {"backend": BACKEND, "hw_popcnt": None, "kernel": None}
    return {
        "backend": BACKEND,
        "hw_popcnt": bool(getattr(_ext, "HW_POPCNT", 0)),
        "kernel": str(getattr(_ext, "KERNEL", "scalar")),
    }
