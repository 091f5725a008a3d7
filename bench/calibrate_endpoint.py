"""Calibrate the endpoint tolerances on real llama.cpp servings of SmolLM2.

Run: ``.venv/bin/python -m bench.calibrate_endpoint [--challenges 32]
[--json bench/results/endpoint_calibration.json]``

For each GGUF variant (rev_tasks/testing/ggufs.py) it starts a llama.cpp server, asks the
same committed challenges (one token, temperature 0, top-5 logprobs) and prints the
distribution of the per-challenge statistic s against the dequantised SmolLM2 weights in
torch, with the mismatch rate under each tolerance's delta, plus the serving noise of the f32
endpoint against itself. docs/statistics.md §13 quotes the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from rev_tasks.core.blackbox import ENDPOINT_TOLERANCES
from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.endpoints.calibration import calibrate_variant, self_noise, summarise
from rev_tasks.endpoints.client import EndpointClient
from rev_tasks.endpoints.reference import Reference
from rev_tasks.testing import ggufs
from rev_tasks.testing.servers import start_llama_server
from rev_tasks.testing.smollm2 import smollm2_dir

LABELS = {
    "f32": "GGUF f32 (same weights)",
    "f16": "GGUF f16 (same weights)",
    "q8_0": "Q8_0 re-quantisation",
    "q4_1": "original Q4_1 file",
    "q4_0": "Q4_0 re-quantisation",
    "noise": "1% weight noise (f16)",
    "finetune": "10 fine-tuning steps (f16)",
    "other": "another model (f16)",
}


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "inf" if x == float("inf") else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--challenges", type=int, default=32)
    ap.add_argument("--json", default="bench/results/endpoint_calibration.json")
    args = ap.parse_args()
    reference = Reference(smollm2_dir(), threads=1)
    rows: dict[str, dict] = {}
    noise: dict[str, dict] = {}
    for variant in LABELS:
        server = start_llama_server(ggufs.build(variant))
        try:
            with EndpointClient(server.url, server.alias) as client:
                values = calibrate_variant(reference, client, DEMO_KEY, args.challenges)
                rows[variant] = summarise(values) | {"values": values}
                if variant == "f32":
                    noise = {k: summarise(v) for k, v in self_noise(client, DEMO_KEY, 16).items()}
        finally:
            server.stop()
    doc = {
        "machine": platform.node(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "challenges": args.challenges,
        "deltas": {k: v.delta for k, v in ENDPOINT_TOLERANCES.items()},
        "variants": rows,
        "serving_noise_f32": noise,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print("| variant | median s | p90 | max | P(s > 0.05) weights | P(s > 0.4) quantised |")
    print("|---|---|---|---|---|---|")
    for variant, r in rows.items():
        print(
            f"| {LABELS[variant]} | {_fmt(r['median'])} | {_fmt(r['p90'])} | {_fmt(r['max'])} "
            f"| {r['rate_weights']:.2f} | {r['rate_quantised']:.2f} |"
        )
    for kind, r in noise.items():
        print(
            f"| f32 endpoint vs itself, {kind} | {_fmt(r['median'])} | {_fmt(r['p90'])} "
            f"| {_fmt(r['max'])} | {r['rate_weights']:.2f} | {r['rate_quantised']:.2f} |"
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
