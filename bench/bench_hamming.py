"""Hamming-distance benchmark: single pair and one-vs-10,000, against naive baselines.

Run: ``.venv/bin/python -m bench.bench_hamming [--json [OUT]]`` (default OUT is
bench/results/hamming.json). Signatures are 10,048 bits: 10,000 bits padded up to a whole
number of uint64 words (157 words = 1,256 bytes), the project's packing rule. BLAS and
OpenMP are pinned to one thread before numpy loads, so the numbers are single-core.
Both baselines run in the same process on the same data, so ratios are comparable even on
a noisy shared machine; absolute numbers vary with load (the JSON records the load average).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import timeit  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from rev_tasks.core.hamming import as_int, hamming, hamming_one_to_many  # noqa: E402

SIG_BITS = 10_048  # 10,000 bits padded to 157 uint64 words
ROWS = 10_000
TARGETS = {"pair_us": 2.0, "many_per_s": 1e7}
DEFAULT_OUT = Path("bench/results/hamming.json")


def naive_pair(a: np.ndarray, b: np.ndarray) -> int:
    """Baseline: unpack to one byte per bit, compare, sum."""
    return int((np.unpackbits(a) != np.unpackbits(b)).sum())


def naive_many(a: np.ndarray, B: np.ndarray, chunk: int = 1000) -> np.ndarray:
    """Baseline: the same per row, vectorised over row chunks (bounded memory)."""
    ua = np.unpackbits(a)
    out = np.empty(B.shape[0], np.int64)
    for s in range(0, B.shape[0], chunk):
        out[s : s + chunk] = (np.unpackbits(B[s : s + chunk], axis=1) != ua).sum(axis=1)
    return out


def per_call_us(fn, number: int, repeat: int) -> float:
    """Median over ``repeat`` timing runs of ``number`` calls, in microseconds per call."""
    runs = timeit.repeat(fn, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e6


def per_run_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run() -> dict:
    rng = np.random.default_rng(0)
    nbytes = SIG_BITS // 8
    a = rng.integers(0, 256, nbytes, dtype=np.uint8)
    b = rng.integers(0, 256, nbytes, dtype=np.uint8)
    B = rng.integers(0, 256, (ROWS, nbytes), dtype=np.uint8)

    # correctness first: a fast wrong answer is worthless
    assert hamming(a, b) == naive_pair(a, b)
    np.testing.assert_array_equal(hamming_one_to_many(a, B), naive_many(a, B))
    ia, ib = as_int(a), as_int(b)
    assert hamming(ia, ib) == hamming(a, b)

    pair_us = per_call_us(lambda: hamming(a, b), number=2000, repeat=31)
    pair_naive_us = per_call_us(lambda: naive_pair(a, b), number=500, repeat=15)
    pair_int_us = per_call_us(lambda: hamming(ia, ib), number=2000, repeat=31)
    as_int_us = per_call_us(lambda: as_int(a), number=2000, repeat=15)

    hamming_one_to_many(a, B)  # warm caches and buffers
    many_s = per_run_s(lambda: hamming_one_to_many(a, B), repeat=21)
    many_naive_s = per_run_s(lambda: naive_many(a, B), repeat=3)
    many_per_s = ROWS / many_s
    many_naive_per_s = ROWS / many_naive_s

    results = {
        "sig_bits": SIG_BITS,
        "sig_words_u64": SIG_BITS // 64,
        "rows": ROWS,
        "pair_us": round(pair_us, 3),
        "pair_naive_us": round(pair_naive_us, 3),
        "pair_int_us": round(pair_int_us, 3),
        "as_int_us": round(as_int_us, 3),
        "many_ms": round(many_s * 1e3, 3),
        "many_per_s": round(many_per_s),
        "many_naive_ms": round(many_naive_s * 1e3, 3),
        "many_naive_per_s": round(many_naive_per_s),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    return {
        "name": "hamming",
        "results": results,
        "ratios": {
            "pair_speedup_vs_naive": round(pair_naive_us / pair_us, 2),
            "many_speedup_vs_naive": round(many_per_s / many_naive_per_s, 2),
        },
        "targets": TARGETS,
        "met": {
            "pair_us": pair_us <= TARGETS["pair_us"],
            "many_per_s": many_per_s >= TARGETS["many_per_s"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--json",
        nargs="?",
        const=str(DEFAULT_OUT),
        default=None,
        metavar="OUT",
        help=f"write the results as JSON (default path {DEFAULT_OUT})",
    )
    args = ap.parse_args(argv)
    doc = run()
    r, q, met = doc["results"], doc["ratios"], doc["met"]
    print(f"hamming benchmark: {SIG_BITS}-bit signatures ({SIG_BITS // 64} uint64 words), 1 thread")
    print(f"{'case':<34}{'ours':>14}{'naive':>14}{'speedup':>9}  target")
    print(
        f"{'single pair (us/call)':<34}{r['pair_us']:>14.3f}{r['pair_naive_us']:>14.3f}"
        f"{q['pair_speedup_vs_naive']:>9.1f}  <= {TARGETS['pair_us']:g} "
        f"{'MET' if met['pair_us'] else 'MISSED'}"
    )
    print(f"{'single pair, as_int ints (us/call)':<34}{r['pair_int_us']:>14.3f}")
    print(
        f"{'one vs 10,000 (distances/s)':<34}{r['many_per_s']:>14,.0f}"
        f"{r['many_naive_per_s']:>14,.0f}{q['many_speedup_vs_naive']:>9.1f}  "
        f">= {TARGETS['many_per_s']:,.0f} {'MET' if met['many_per_s'] else 'MISSED'}"
    )
    print(f"load average (1 min): {r['loadavg_1m']}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
