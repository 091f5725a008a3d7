"""Hamming distances against a naive unpackbits reference, on both implementations.

Every case runs on the numpy fallback and on the C extension (``rev_tasks.core._popcount``,
skipped when it is not built), so a machine without a compiler still gets correct answers and
the fast path can never drift from the reference.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import pytest

import rev_tasks.core.hamming as H
from rev_tasks.core.hamming import as_int, hamming, hamming_one_to_many, normalized


def naive(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(np.unpackbits(a) != np.unpackbits(b)))


def naive_many(a: np.ndarray, B: np.ndarray) -> np.ndarray:
    return np.count_nonzero(np.unpackbits(B, axis=1) != np.unpackbits(a)[None, :], axis=1)


class Impl(NamedTuple):
    name: str
    pair: Callable[..., int]
    many: Callable[[np.ndarray, np.ndarray], np.ndarray]


def _numpy_many(a: np.ndarray, B: np.ndarray) -> np.ndarray:
    return H._one_to_many_numpy(*H._check_many(a, B))


def _c_many(a: np.ndarray, B: np.ndarray) -> np.ndarray:
    return H._one_to_many_c(*H._check_many(a, B))


@pytest.fixture(params=["numpy", "c-scalar", "c-avx512"])
def impl(request: pytest.FixtureRequest) -> Iterator[Impl]:
    """Each implementation in turn; the C kernels are selected explicitly, then reset."""
    if request.param == "numpy":
        yield Impl("numpy", H._hamming_numpy, _numpy_many)
        return
    if H._ext is None:
        pytest.skip("C extension rev_tasks.core._popcount not built (pip install -e .)")
    kernel = request.param.removeprefix("c-")
    try:
        H._ext._select(kernel)
    except ValueError as exc:
        pytest.skip(f"C kernel {kernel} unavailable here: {exc}")
    try:
        yield Impl(request.param, hamming, _c_many)
    finally:
        H._ext._select("auto")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.mark.parametrize("nbytes", [0, 1, 7, 8, 9, 16, 31, 33, 100, 1250, 1256, 1280, 4104, 5001])
def test_pair_matches_naive(impl: Impl, rng: np.random.Generator, nbytes: int) -> None:
    for _ in range(5):
        a = rng.integers(0, 256, nbytes, dtype=np.uint8)
        b = rng.integers(0, 256, nbytes, dtype=np.uint8)
        want = naive(a, b)
        assert impl.pair(a, b) == want
        assert impl.pair(as_int(a), as_int(b)) == want
        assert impl.pair(a, a) == 0


def test_pair_extremes_and_views(impl: Impl, rng: np.random.Generator) -> None:
    z = np.zeros(1256, np.uint8)
    o = np.full(1256, 255, np.uint8)
    assert impl.pair(z, o) == 8 * 1256
    big = rng.integers(0, 256, 2 * 1256, dtype=np.uint8)
    a, b = big[::2], big[1::2]  # non-contiguous views
    assert impl.pair(a, b) == naive(a, b)
    # unaligned buffers (every offset within a word)
    raw = rng.integers(0, 256, 1264, dtype=np.uint8).tobytes()
    for off in range(8):
        u = np.frombuffer(raw, np.uint8, count=1256, offset=off)
        assert impl.pair(u, z) == naive(u, z)
        assert impl.pair(u, o) == naive(u, o)


def test_normalized_and_types(rng: np.random.Generator) -> None:
    z = np.zeros(1256, np.uint8)
    o = np.full(1256, 255, np.uint8)
    assert normalized(z, o) == 1.0
    assert normalized(z, z) == 0.0
    a = rng.integers(0, 256, 1256, dtype=np.uint8)
    b = rng.integers(0, 256, 1256, dtype=np.uint8)
    assert type(hamming(a, b)) is int
    assert type(H._hamming_numpy(a, b)) is int
    assert type(normalized(a, b)) is float
    B = np.vstack([a, b, a ^ b])
    got = hamming_one_to_many(a, B)  # the public function, whichever backend serves it
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, naive_many(a, B))


@pytest.mark.parametrize(
    "m,nbytes",
    [(0, 8), (1, 8), (1, 1256), (37, 24), (300, 1256), (257, 1256), (5, 13), (3, 1), (4, 0)],
)
def test_one_to_many_matches_naive(
    impl: Impl, rng: np.random.Generator, m: int, nbytes: int
) -> None:
    a = rng.integers(0, 256, nbytes, dtype=np.uint8)
    B = rng.integers(0, 256, (m, nbytes), dtype=np.uint8)
    got = impl.many(a, B)
    assert got.dtype == np.int64
    assert got.shape == (m,)
    np.testing.assert_array_equal(got, naive_many(a, B))


def test_one_to_many_layouts(impl: Impl, rng: np.random.Generator) -> None:
    a = rng.integers(0, 256, 64, dtype=np.uint8)
    wide = rng.integers(0, 256, (50, 80), dtype=np.uint8)
    B = wide[:, 8:72]  # rows not contiguous with each other
    want = naive_many(a, B)
    np.testing.assert_array_equal(impl.many(a, B), want)
    np.testing.assert_array_equal(impl.many(a, np.asfortranarray(B)), want)
    np.testing.assert_array_equal(impl.many(a, B[::-1]), want[::-1])
    a2 = rng.integers(0, 256, 128, dtype=np.uint8)[::2]
    np.testing.assert_array_equal(impl.many(a2, B), naive_many(a2, B))
    # extremes and agreement with the single-pair function
    B2 = np.vstack([np.zeros(64, np.uint8), np.full(64, 255, np.uint8), a])
    z = np.zeros(64, np.uint8)
    np.testing.assert_array_equal(impl.many(z, B2), [0, 512, impl.pair(z, a)])


def test_one_to_many_big_non_contiguous(impl: Impl, rng: np.random.Generator) -> None:
    # More rows than one copy block: the C path copies a strided B block by block.
    a = rng.integers(0, 256, 1256, dtype=np.uint8)
    wide = rng.integers(0, 256, (1500, 1264), dtype=np.uint8)
    B = wide[:, 4:1260]
    np.testing.assert_array_equal(impl.many(a, B), naive_many(a, B))


def test_one_to_many_float64_path_for_huge_rows(impl: Impl, rng: np.random.Generator) -> None:
    # Rows of 2**24 bits exceed float32's exact-integer range: numpy must switch to float64.
    nbytes = 1 << 21
    a = rng.integers(0, 256, nbytes, dtype=np.uint8)
    B = np.vstack([~a, a, rng.integers(0, 256, nbytes, dtype=np.uint8)])
    got = impl.many(a, B)
    assert got[0] == 8 * nbytes
    assert got[1] == 0
    assert got[2] == naive(a, B[2])


@pytest.mark.parametrize(
    "a,b,match",
    [
        (np.zeros(8, np.int8), np.zeros(8, np.uint8), "dtype uint8"),
        (np.zeros(8, np.uint8), np.zeros(4, np.uint16), "dtype uint8"),
        (np.zeros(8, np.float64), np.zeros(8, np.float64), "dtype uint8"),
        (np.zeros((2, 8), np.uint8), np.zeros((2, 8), np.uint8), "1-D"),
        (np.zeros(8, np.uint8), np.zeros(16, np.uint8), "differ in length"),
        ([0] * 8, np.zeros(8, np.uint8), "numpy uint8 array"),
        (bytes(8), np.zeros(8, np.uint8), "numpy uint8 array"),
        (bytes(8), bytes(8), "numpy uint8 array"),
        (np.zeros(1, np.uint8), np.zeros(1, bool), "dtype uint8"),
        (np.zeros(8, np.uint8), 3, "numpy uint8 array"),
    ],
)
def test_pair_validation(impl: Impl, a: object, b: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        impl.pair(a, b)


def test_int_and_normalized_validation() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        hamming(-1, 3)
    with pytest.raises(ValueError, match="bits="):
        normalized(1, 3)
    assert normalized(0b1010, 0b0110, bits=4) == 0.5
    with pytest.raises(ValueError, match="at least one bit"):
        normalized(np.zeros(0, np.uint8), np.zeros(0, np.uint8))
    with pytest.raises(ValueError, match="dtype uint8"):
        as_int(np.zeros(8, np.int64))


def test_one_to_many_validation(impl: Impl) -> None:
    a = np.zeros(16, np.uint8)
    with pytest.raises(ValueError, match="rows of 8 bytes"):
        impl.many(a, np.zeros((3, 8), np.uint8))
    with pytest.raises(ValueError, match="shape \\(m, nbytes\\)"):
        impl.many(a, np.zeros(16, np.uint8))
    with pytest.raises(ValueError, match="shape \\(m, nbytes\\)"):
        impl.many(a, np.zeros((1, 1, 16), np.uint8))
    with pytest.raises(ValueError, match="B: expected dtype uint8"):
        impl.many(a, np.zeros((3, 16), np.int32))
    with pytest.raises(ValueError, match="a: expected a 1-D"):
        impl.many(np.zeros((1, 16), np.uint8), np.zeros((3, 16), np.uint8))
    with pytest.raises(ValueError, match="numpy uint8 array"):
        impl.many(a, [[0] * 16])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the C module
@pytest.fixture
def ext() -> object:
    if H._ext is None:
        pytest.skip("C extension rev_tasks.core._popcount not built (pip install -e .)")
    return H._ext


def test_ext_kernel_selection(ext: object) -> None:
    auto = ext._select("auto")  # type: ignore[attr-defined]
    assert auto in ("scalar", "avx512")
    assert auto == ext.KERNEL  # type: ignore[attr-defined]
    assert ext._select("scalar") == "scalar" == ext.KERNEL  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown kernel"):
        ext._select("gpu")  # type: ignore[attr-defined]
    assert ext._select("auto") == auto  # type: ignore[attr-defined]
    assert H.backend_info()["kernel"] == auto


def test_ext_takes_any_contiguous_u8_buffer(ext: object, rng: np.random.Generator) -> None:
    a = rng.integers(0, 256, 37, dtype=np.uint8)
    b = rng.integers(0, 256, 37, dtype=np.uint8)
    want = naive(a, b)
    assert ext.hamming(a.tobytes(), memoryview(bytearray(b.tobytes()))) == want  # type: ignore[attr-defined]
    B = np.vstack([a, b])
    out = np.full(2, -1, np.int64)
    assert ext.one_to_many(a, B, out) is None  # type: ignore[attr-defined]
    np.testing.assert_array_equal(out, [0, want])


@pytest.mark.parametrize(
    "args,exc",
    [
        ((np.zeros(8, np.uint8),), TypeError),
        ((np.zeros(8, np.uint8), np.zeros(8, np.int8)), TypeError),
        ((np.zeros(8, np.uint8), np.zeros(9, np.uint8)), ValueError),
        ((np.zeros((2, 4), np.uint8), np.zeros((2, 4), np.uint8)), ValueError),
        ((np.zeros(16, np.uint8)[::2], np.zeros(8, np.uint8)), (ValueError, BufferError)),
        ((1, 2), TypeError),
    ],
)
def test_ext_hamming_rejects(ext: object, args: tuple, exc: type) -> None:
    with pytest.raises(exc):
        ext.hamming(*args)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "out,exc",
    [
        (np.zeros(3, np.int32), TypeError),
        (np.zeros(3, np.float64), TypeError),
        (np.zeros(2, np.int64), ValueError),
        (np.zeros((3, 1), np.int64), TypeError),
        (np.zeros(3, np.dtype(">i8")), (TypeError, ValueError, BufferError)),
    ],
)
def test_ext_one_to_many_rejects_bad_out(ext: object, out: np.ndarray, exc: type) -> None:
    with pytest.raises(exc):
        ext.one_to_many(np.zeros(8, np.uint8), np.zeros((3, 8), np.uint8), out)  # type: ignore[attr-defined]


def test_ext_one_to_many_rejects_readonly_out_and_bad_rows(ext: object) -> None:
    out = np.zeros(3, np.int64)
    out.setflags(write=False)
    with pytest.raises((ValueError, BufferError, TypeError)):
        ext.one_to_many(np.zeros(8, np.uint8), np.zeros((3, 8), np.uint8), out)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="rows of 8 bytes"):
        ext.one_to_many(np.zeros(9, np.uint8), np.zeros((3, 8), np.uint8), np.zeros(3, np.int64))  # type: ignore[attr-defined]


def test_ext_one_to_many_threads(ext: object, rng: np.random.Generator) -> None:
    # Large inputs run without the GIL: concurrent calls must not interfere.
    a = rng.integers(0, 256, 1256, dtype=np.uint8)
    Bs = [rng.integers(0, 256, (400, 1256), dtype=np.uint8) for _ in range(4)]
    outs = [np.empty(400, np.int64) for _ in Bs]
    threads = [
        threading.Thread(target=ext.one_to_many, args=(a, B, o))  # type: ignore[attr-defined]
        for B, o in zip(Bs, outs, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for B, o in zip(Bs, outs, strict=True):
        np.testing.assert_array_equal(o, naive_many(a, B))


# ----------------------------------------------------------------------------- the fallback
@pytest.fixture
def without_ext(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """rev_tasks.core.hamming re-imported as on a machine where the extension is missing."""
    import rev_tasks.core

    monkeypatch.setitem(sys.modules, "rev_tasks.core._popcount", None)  # import -> ImportError
    monkeypatch.delattr(rev_tasks.core, "_popcount", raising=False)
    try:
        yield importlib.reload(H)
    finally:
        monkeypatch.undo()
        importlib.reload(H)


def test_fallback_without_extension(without_ext: object, rng: np.random.Generator) -> None:
    mod = without_ext
    assert mod.BACKEND == "numpy"  # type: ignore[attr-defined]
    assert mod.backend_info() == {"backend": "numpy", "hw_popcnt": None, "kernel": None}  # type: ignore[attr-defined]
    a = rng.integers(0, 256, 1256, dtype=np.uint8)
    B = rng.integers(0, 256, (20, 1256), dtype=np.uint8)
    assert mod.hamming(a, B[3]) == naive(a, B[3])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(mod.hamming_one_to_many(a, B), naive_many(a, B))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="differ in length"):
        mod.hamming(a, B[3][:8])  # type: ignore[attr-defined]
