"""Queries to a decision for endpoint verification, per case and mode, with cost.

Run: ``.venv/bin/python -m bench.bench_endpoint [--text-budget 250]
[--json bench/results/endpoint.json]``

Reference: the dequantised SmolLM2 weights in torch. Candidates: llama.cpp servers of the
GGUF variants (rev_tasks/testing/ggufs.py), one thread, 4 requests in flight, alpha = 0.01.
logprobs mode: one token at temperature 0 with top-5 logprobs per query; text mode: a server
started without logprobs, one sampled token per query. docs/performance.md quotes the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.endpoints.client import EndpointClient
from rev_tasks.endpoints.reference import Reference
from rev_tasks.endpoints.verify import EndpointParams, verify_endpoint
from rev_tasks.testing import ggufs
from rev_tasks.testing.servers import start_llama_server
from rev_tasks.testing.smollm2 import smollm2_dir

LOGPROB_CASES = ("f32", "f16", "q8_0", "q4_1", "q4_0", "noise", "finetune", "other")
TEXT_CASES = ("f32", "q4_0", "noise", "finetune", "other")


def _case(reference: Reference, variant: str, mode: str, budget: int | None) -> dict:
    server = start_llama_server(ggufs.build(variant), logprobs=(mode == "logprobs"))
    try:
        with EndpointClient(server.url, server.alias, max_in_flight=4) as client:
            start = time.monotonic()
            out = verify_endpoint(
                reference, client, DEMO_KEY, EndpointParams(mode=mode, max_queries=budget)
            )
            wall = time.monotonic() - start
    finally:
        server.stop()
    r = out.result
    return {
        "variant": variant,
        "mode": mode,
        "verdict": r["verdict"],
        "queries": r["queries_used"],
        "requests": r["cost"]["requests"],
        "prompt_tokens": r["cost"]["prompt_tokens"],
        "completion_tokens": r["cost"]["completion_tokens"],
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-budget", type=int, default=250)
    ap.add_argument("--json", default="bench/results/endpoint.json")
    ap.add_argument("--skip-text", action="store_true")
    args = ap.parse_args()
    reference = Reference(smollm2_dir(), threads=1)
    rows = [_case(reference, v, "logprobs", None) for v in LOGPROB_CASES]
    if not args.skip_text:
        rows += [_case(reference, v, "text", args.text_budget) for v in TEXT_CASES]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"alpha": 0.01, "rows": rows}, indent=1) + "\n")
    print(
        "| candidate | mode | verdict | queries | requests | prompt + completion tokens | wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['mode']} | {r['verdict']} | {r['queries']} | {r['requests']} "
            f"| {r['prompt_tokens']} + {r['completion_tokens']} | {r['wall_s']} |"
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
