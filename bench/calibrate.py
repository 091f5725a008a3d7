"""Per-challenge distances of each variant of a real model: the data behind the tolerances.

Run: ``.venv/bin/python -m bench.calibrate --model minilm|smollm2 [--challenges 64]
[--dtype float32|float16|bfloat16] [--json bench/results/calibration-minilm.json]``

``--dtype`` loads the reference and every variant in that compute dtype, as a farm job with
that ``dtype`` does (the self-calibration then measures the casts in that dtype too).

For the real all-MiniLM-L6-v2 (6-layer encoder) or SmolLM2-135M (30-layer Llama), and every
variant (byte copy, the same weights in another process with one thread, fp16/bf16 casts,
Gaussian weight noise, fine-tuning steps, swapped blocks, re-initialised weights) it prints
the distribution of the per-challenge normalised Hamming distance against the original, the
mismatch rate under ``exact`` (δ = 0), under the old fixed δ = 0.0035, and under the
reference's self-calibrated ``precision`` δ (rev_tasks/core/calibration.py, measured here
exactly as a verification measures it), and the verdict the sequential test reaches on these
distances at α = 0.01. docs/statistics.md §9 quotes the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rev_tasks.core.calibration import FLOOR, MARGIN
from rev_tasks.core.challenges import generate_challenges
from rev_tasks.core.decision import TOLERANCES, decide
from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.engine import ModelSide, calibrate_reference, differing_bits, effective_spec
from rev_tasks.inference import load_model
from rev_tasks.testing import variants as V

BITS = 4096
FIXED_DELTA = 0.0035  # the fixed precision δ before self-calibration


def _builders(model: str) -> dict[str, tuple[str, Callable[[Any], Any] | None]]:
    """Row name -> (cache name, transform); None is a byte copy."""
    swap = (2, 3) if model == "minilm" else (10, 11)
    return {
        "copy": ("copy", None),
        "fp16": ("fp16", V.cast("float16")),
        "bf16": ("bf16", V.cast("bfloat16")),
        "noise 0.1%": ("noise-0.001", V.gaussian_noise(0.001)),
        "noise 0.5%": ("noise-0.005", V.gaussian_noise(0.005)),
        "noise 1%": ("noise-0.01", V.gaussian_noise(0.01)),
        "fine-tune 1 step": ("finetune-1", V.finetune(1)),
        "fine-tune 10 steps": ("finetune-10", V.finetune(10)),
        f"blocks {swap[0]},{swap[1]} swapped": (
            f"swap-{swap[0]}-{swap[1]}",
            V.swap_blocks(*swap),
        ),
        "re-initialised": ("reinit-7", V.reinitialise(7)),
    }


def _build(model: str, src: Path, slug: str, transform: Any, tmp: Path) -> tuple[Path, bool]:
    """The variant's folder and whether it is a temporary one (SmolLM2's are cached)."""
    if transform is None:
        return src, False  # a byte copy reads the same bytes
    if model == "smollm2":
        from rev_tasks.testing.smollm2 import variant_dir

        return variant_dir(slug, transform), False
    return V.save_transformed(src, tmp / slug, transform), True


def source(model: str) -> Path:
    if model == "minilm":
        return V.minilm_path()
    from rev_tasks.testing.smollm2 import smollm2_dir

    return smollm2_dir()


def _signatures(model: Any, n: int) -> list:
    side = ModelSide(model)
    challenges = generate_challenges(DEMO_KEY, n)
    out = []
    for start in range(0, n, 8):
        out += side.signatures(challenges[start : start + 8], model.sites, DEMO_KEY, BITS)
    return out


def _other_process_signatures(path: Path, n: int, tmp: Path, dtype: str = "float32") -> list:
    """The same model fingerprinted in a separate process with one torch thread."""
    out = tmp / "fp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "99"}
    subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", "fingerprint", str(path), "-o", str(out),
         "--challenges", str(n), "--dtype", dtype],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    from rev_tasks.engine import FingerprintSide

    side = FingerprintSide(json.loads(out.read_text()), DEMO_KEY)
    return side.signatures(generate_challenges(DEMO_KEY, n), side.sites, DEMO_KEY, BITS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--challenges", type=int, default=64)
    parser.add_argument("--json", help="write the table as JSON here")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    src = source(args.model)
    ref = load_model(src, dtype=args.dtype)
    sites = ref.sites
    total = BITS * len(sites)
    t0 = time.monotonic()
    cal = calibrate_reference(ref, DEMO_KEY, sites, BITS)
    cal_s = time.monotonic() - t0
    delta = effective_spec("precision", cal).delta
    ref_sigs = _signatures(ref, args.challenges)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cases: dict[str, Any] = {"other process, 1 thread": None, **_builders(args.model)}
        for name, case in cases.items():
            if case is None:
                sigs = _other_process_signatures(src, args.challenges, tmp_path, args.dtype)
            else:
                if case[1] is None:
                    path, temporary = V.copy_model(src, tmp_path / "copy"), True
                else:
                    path, temporary = _build(args.model, src, case[0], case[1], tmp_path)
                sigs = _signatures(load_model(path, dtype=args.dtype), args.challenges)
                if temporary:
                    V.shutil.rmtree(path, ignore_errors=True)
            d = np.array(
                [differing_bits(a, b, sites) / total for a, b in zip(ref_sigs, sigs, strict=True)]
            )
            row = {
                "variant": name,
                "mean": float(d.mean()),
                "min": float(d.min()),
                "p90": float(np.quantile(d, 0.9)),
                "max": float(d.max()),
                "mismatch_rate_exact": float((d > 0.0).mean()),
                "mismatch_rate_fixed": float((d > FIXED_DELTA).mean()),
                "mismatch_rate_precision": float((d > delta).mean()),
                "distances": [float(x) for x in d],
                "verdict_exact": decide(d, TOLERANCES["exact"], 0.01, args.challenges).verdict,
                "verdict_precision": decide(
                    d, effective_spec("precision", cal), 0.01, args.challenges
                ).verdict,
            }
            rows.append(row)
            print(f"  measured {name}", file=sys.stderr, flush=True)
    cal_d = cal.distances()
    print(
        f"{args.model}: {ref.descriptor['num_layers']} layers, {args.challenges} challenges, "
        f"{len(sites)} sites × {BITS} bits = {total} bits, demo key, CPU {args.dtype} compute"
    )
    means = {k: float(np.mean(v)) for k, v in cal_d.items()}
    print(
        f"self-calibration ({cal.challenges} calibration challenges, {cal_s:.1f} s): "
        f"fp16 mean {means['float16']:.6f} max {max(cal_d['float16']):.6f}, "
        f"bf16 mean {means['bfloat16']:.6f} max {max(cal_d['bfloat16']):.6f} -> "
        f"precision δ = max({FLOOR}, {MARGIN} × "
        f"{max(max(v) for v in cal_d.values()):.6f}) = {delta:.6f}"
    )
    print(
        "| variant | mean | min | p90 | max | P(d > 0) | P(d > 0.0035) | P(d > δ_cal) "
        "| exact | precision |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['mean']:.6f} | {r['min']:.6f} | {r['p90']:.6f} | "
            f"{r['max']:.6f} | {r['mismatch_rate_exact']:.2f} | {r['mismatch_rate_fixed']:.2f} | "
            f"{r['mismatch_rate_precision']:.2f} | {r['verdict_exact']} | "
            f"{r['verdict_precision']} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "model": args.model,
            "challenges": args.challenges,
            "total_bits": total,
            "dtype": args.dtype,
            "calibration": cal.to_dict(),
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
