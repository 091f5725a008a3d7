"""Hamming distances against a naive unpackbits reference, on random and odd shapes."""

from __future__ import annotations

import numpy as np
import pytest

from rev_tasks.core.hamming import as_int, hamming, hamming_one_to_many, normalized


def naive(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(np.unpackbits(a) != np.unpackbits(b)))


def naive_many(a: np.ndarray, B: np.ndarray) -> np.ndarray:
    return np.count_nonzero(np.unpackbits(B, axis=1) != np.unpackbits(a)[None, :], axis=1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.mark.parametrize("nbytes", [0, 1, 7, 8, 9, 16, 100, 1250, 1256, 1280, 4104, 5001])
def test_pair_matches_naive(rng: np.random.Generator, nbytes: int) -> None:
    for _ in range(5):
        a = rng.integers(0, 256, nbytes, dtype=np.uint8)
        b = rng.integers(0, 256, nbytes, dtype=np.uint8)
        want = naive(a, b)
        assert hamming(a, b) == want
        assert hamming(as_int(a), as_int(b)) == want
        assert hamming(a, a) == 0


def test_pair_extremes_and_views(rng: np.random.Generator) -> None:
    z = np.zeros(1256, np.uint8)
    o = np.full(1256, 255, np.uint8)
    assert hamming(z, o) == 8 * 1256
    assert normalized(z, o) == 1.0
    assert normalized(z, z) == 0.0
    big = rng.integers(0, 256, 2 * 1256, dtype=np.uint8)
    a, b = big[::2], big[1::2]  # non-contiguous views
    assert hamming(a, b) == naive(a, b)
    # unaligned buffer (offset 1 byte)
    raw = rng.integers(0, 256, 1257, dtype=np.uint8).tobytes()
    u = np.frombuffer(raw, np.uint8, count=1256, offset=1)
    assert hamming(u, z) == naive(u, z)


def test_returns_python_int(rng: np.random.Generator) -> None:
    a = rng.integers(0, 256, 1256, dtype=np.uint8)
    b = rng.integers(0, 256, 1256, dtype=np.uint8)
    assert type(hamming(a, b)) is int
    assert type(normalized(a, b)) is float


@pytest.mark.parametrize(
    "m,nbytes",
    [(0, 8), (1, 8), (1, 1256), (37, 24), (300, 1256), (257, 1256), (5, 13), (3, 1), (4, 0)],
)
def test_one_to_many_matches_naive(rng: np.random.Generator, m: int, nbytes: int) -> None:
    a = rng.integers(0, 256, nbytes, dtype=np.uint8)
    B = rng.integers(0, 256, (m, nbytes), dtype=np.uint8)
    got = hamming_one_to_many(a, B)
    assert got.dtype == np.int64
    assert got.shape == (m,)
    np.testing.assert_array_equal(got, naive_many(a, B))


def test_one_to_many_layouts(rng: np.random.Generator) -> None:
    a = rng.integers(0, 256, 64, dtype=np.uint8)
    wide = rng.integers(0, 256, (50, 80), dtype=np.uint8)
    B = wide[:, 8:72]  # rows not contiguous with each other
    want = naive_many(a, B)
    np.testing.assert_array_equal(hamming_one_to_many(a, B), want)
    np.testing.assert_array_equal(hamming_one_to_many(a, np.asfortranarray(B)), want)
    np.testing.assert_array_equal(hamming_one_to_many(a, B[::-1]), want[::-1])
    a2 = rng.integers(0, 256, 128, dtype=np.uint8)[::2]
    np.testing.assert_array_equal(hamming_one_to_many(a2, B), naive_many(a2, B))
    # extremes and agreement with the single-pair function
    B2 = np.vstack([np.zeros(64, np.uint8), np.full(64, 255, np.uint8), a])
    z = np.zeros(64, np.uint8)
    np.testing.assert_array_equal(hamming_one_to_many(z, B2), [0, 512, hamming(z, a)])


def test_one_to_many_float64_path_for_huge_rows(rng: np.random.Generator) -> None:
    # Rows of 2**24 bits exceed float32's exact-integer range: the float64 path must be used.
    nbytes = 1 << 21
    a = rng.integers(0, 256, nbytes, dtype=np.uint8)
    B = np.vstack([~a, a, rng.integers(0, 256, nbytes, dtype=np.uint8)])
    got = hamming_one_to_many(a, B)
    assert got[0] == 8 * nbytes
    assert got[1] == 0
    assert got[2] == hamming(a, B[2])


@pytest.mark.parametrize(
    "a,b,match",
    [
        (np.zeros(8, np.int8), np.zeros(8, np.uint8), "dtype uint8"),
        (np.zeros(8, np.uint8), np.zeros(4, np.uint16), "dtype uint8"),
        (np.zeros(8, np.float64), np.zeros(8, np.float64), "dtype uint8"),
        (np.zeros((2, 8), np.uint8), np.zeros((2, 8), np.uint8), "1-D"),
        (np.zeros(8, np.uint8), np.zeros(16, np.uint8), "differ in length"),
        ([0] * 8, np.zeros(8, np.uint8), "numpy uint8 array"),
        (np.zeros(1, np.uint8), np.zeros(1, bool), "dtype uint8"),
    ],
)
def test_pair_validation(a: object, b: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hamming(a, b)  # type: ignore[arg-type]


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


def test_one_to_many_validation() -> None:
    a = np.zeros(16, np.uint8)
    with pytest.raises(ValueError, match="rows of 8 bytes"):
        hamming_one_to_many(a, np.zeros((3, 8), np.uint8))
    with pytest.raises(ValueError, match="shape \\(m, nbytes\\)"):
        hamming_one_to_many(a, np.zeros(16, np.uint8))
    with pytest.raises(ValueError, match="shape \\(m, nbytes\\)"):
        hamming_one_to_many(a, np.zeros((1, 1, 16), np.uint8))
    with pytest.raises(ValueError, match="B: expected dtype uint8"):
        hamming_one_to_many(a, np.zeros((3, 16), np.int32))
    with pytest.raises(ValueError, match="a: expected a 1-D"):
        hamming_one_to_many(np.zeros((1, 16), np.uint8), np.zeros((3, 16), np.uint8))
    with pytest.raises(ValueError, match="numpy uint8 array"):
        hamming_one_to_many(a, [[0] * 16])  # type: ignore[arg-type]
