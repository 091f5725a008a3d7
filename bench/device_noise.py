"""How many signature bits a device's rounding flips, simulated: the reach of the allowance.

Run: ``.venv/bin/python -m bench.device_noise [--layers 24] [--hidden 128] [--challenges 32]
[--eps 1e-6 1e-5 1e-4 3e-4 1e-3] [--json FILE]``

A GPU computes the same fp32 forward pass as the CPU up to its own rounding of every matrix
product (relative ~1e-6). This multiplies every linear layer's output of a seeded GPT-2 by
(1 + eps·g), g a fixed normal draw per layer (``faults.device_noise``, the fault the farm
test tests/integration/test_noise_consensus.py injects), and counts per challenge the
signature bits (all sites) that differ from the unperturbed model in the same process. The
validators allow ``engine.reexecution_allowance`` bits per side (docs/statistics.md §11).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

KEY = bytes(range(100, 132))  # the integration tests' farm key


def measure(layers: int, hidden: int, challenges: int, eps: list[float]) -> dict[str, Any]:
    """Per eps: the per-challenge differing bits, their maximum and how many are non-zero."""
    import torch

    from rev_tasks.core.challenges import job_challenges
    from rev_tasks.engine import ModelSide, differing_bits, reexecution_allowance
    from rev_tasks.inference.loader import default_sites, load_model
    from rev_tasks.inference.signatures import DEFAULT_BITS
    from rev_tasks.testing import faults
    from rev_tasks.testing.variants import build_tiny_causal_lm

    torch.set_num_threads(1)
    sites = default_sites(layers)
    chs = job_challenges(KEY, challenges)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_causal_lm(Path(tmp) / "m", "gpt2", seed=0, layers=layers, hidden=hidden)
        model = load_model(str(path))
        side = ModelSide(model)
        base = side.signatures(chs, sites, KEY, DEFAULT_BITS)
        rows = []
        for e in eps:
            os.environ.update({faults.ENABLE: "1", "REV_TEST_DEVICE_NOISE": f"device:{e!r}"})
            faults.reset()
            with faults.device_noise("device", [model]):
                noisy = side.signatures(chs, sites, KEY, DEFAULT_BITS)
            bits = [differing_bits(a, b, sites) for a, b in zip(base, noisy, strict=True)]
            rows.append(
                {"eps": e, "max": max(bits), "nonzero": sum(b > 0 for b in bits), "bits": bits}
            )
    faults.reset()
    return {
        "model": f"gpt2 {layers} layers x {hidden}",
        "challenges": challenges,
        "allowance_bits": reexecution_allowance(DEFAULT_BITS * len(sites)),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--challenges", type=int, default=32)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 3e-4, 1e-3])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = measure(args.layers, args.hidden, args.challenges, args.eps)
    print(f"{out['model']}, {out['challenges']} challenges, allowance {out['allowance_bits']}")
    print("| relative error | max bits | challenges with flipped bits |")
    print("|---|---|---|")
    for row in out["rows"]:
        print(f"| {row['eps']:g} | {row['max']} | {row['nonzero']} of {out['challenges']} |")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
