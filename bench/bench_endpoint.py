"""Queries to a decision for endpoint verification, per case and mode, with cost.

Run: ``.venv/bin/python -m bench.bench_endpoint --json [--text-budget 250]`` (writes
bench/results/endpoint.json; ``make bench`` renders it into docs/performance.md).

Reference: the dequantised SmolLM2 weights in torch. Candidates: llama.cpp servers of the
GGUF variants (rev_tasks/testing/ggufs.py), one thread, 4 requests in flight, alpha = 0.01.
logprobs mode: one token at temperature 0 with top-5 logprobs per query; text mode: a server
started without logprobs, one sampled token per query. docs/performance.md quotes the table.
"""

from __future__ import annotations

import time

from bench import common
from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.endpoints.client import EndpointClient
from rev_tasks.endpoints.reference import Reference
from rev_tasks.endpoints.verify import EndpointParams, verify_endpoint
from rev_tasks.testing import ggufs
from rev_tasks.testing.servers import start_llama_server
from rev_tasks.testing.smollm2 import smollm2_dir

LOGPROB_CASES = ("f32", "f16", "q8_0", "q4_1", "q4_0", "noise", "finetune", "other")
TEXT_CASES = ("f32", "q4_0", "noise", "finetune", "other")
LABELS = {
    "f32": "GGUF f32 (same weights)",
    "f16": "GGUF f16 (same weights)",
    "q8_0": "a Q8_0 re-quantisation",
    "q4_1": "the original Q4_1 file",
    "q4_0": "a Q4_0 (4-bit) re-quantisation",
    "noise": "a 1%-noised copy",
    "finetune": "a fine-tuned copy (10 steps)",
    "other": "another model",
}
# The acceptance verdicts (None: reported, no target).
EXPECTED = {
    "logprobs": {
        "f32": "SAME",
        "f16": "SAME",
        "q4_0": "DIFFERENT",
        "noise": "DIFFERENT",
        "finetune": "DIFFERENT",
        "other": "DIFFERENT",
    },
    "text": {
        "q4_0": "DIFFERENT",
        "noise": "DIFFERENT",
        "finetune": "DIFFERENT",
        "other": "DIFFERENT",
    },
}


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


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--text-budget", type=int, default=250)
    ap.add_argument("--skip-text", action="store_true")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    info = common.machine()
    reference = Reference(smollm2_dir(), threads=1)
    cases = [_case(reference, v, "logprobs", None) for v in LOGPROB_CASES]
    if not args.skip_text:
        cases += [_case(reference, v, "text", args.text_budget) for v in TEXT_CASES]
    rows = []
    met: dict[str, bool | None] = {}
    for c in cases:
        expect = EXPECTED[c["mode"]].get(c["variant"])
        goal = 24 if c["mode"] == "logprobs" else args.text_budget
        ok = None
        if expect is not None:
            ok = c["verdict"] == expect and c["queries"] <= goal
            met[f"{c['mode']}_{c['variant']}"] = ok
        rows.append(
            common.row(
                f"{c['mode']} mode, endpoint serving {LABELS[c['variant']]}",
                f"{c['verdict']} after {c['queries']} queries; {c['requests']} requests, "
                f"{c['prompt_tokens']} + {c['completion_tokens']} tokens, {c['wall_s']} s",
                target=(f"{expect} in <= {goal} queries" if expect else "reported"),
                met=ok,
            )
        )
    doc = common.document(
        "endpoint",
        results={"cases": cases},
        baseline={},
        ratios={},
        targets={"logprobs_queries": 24, "text_generations": args.text_budget},
        met=met,
        rows=rows,
        machine_info=info,
        notes=[
            "reference: the dequantised SmolLM2-135M-Instruct folder in torch (fp32, 1 thread); "
            "endpoint: python -m llama_cpp.server (llama-cpp-python 0.3.36, portable AVX2 "
            "build), n_ctx 256, 1 thread; 4 requests in flight; alpha 0.01; demo key",
            "wall time includes the reference's forward passes and the endpoint's requests, "
            "not the server's start",
            "text mode: one token sampled at temperature 1 per query from 8 committed prompts; "
            "it can answer DIFFERENT or UNDECIDED, never SAME",
        ],
        started=started,
    )
    for c in cases:
        print(
            f"{c['mode']:9} {c['variant']:9} {c['verdict']:10} {c['queries']:4} queries "
            f"{c['requests']:4} requests {c['prompt_tokens']}+{c['completion_tokens']} tokens "
            f"{c['wall_s']} s"
        )
    return common.finish(doc, args)


if __name__ == "__main__":
    raise SystemExit(main())
