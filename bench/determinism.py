"""How many float variants of a forward pass appear across processes, and how many signature
bits they flip: the data behind the validators' re-execution allowance.

Run: ``.venv/bin/python -m bench.determinism [--processes 4] [--models minilm gpt2 llama]
[--modes memory streamed] [--threads 1 2] [--batches 1 8] [--dtype float16] [--challenges 8]
[--json FILE]``

``--dtype`` (default float32) is the compute dtype the models are loaded in, as a job's
``dtype``: the data behind computing half precision one prompt at a time
(``engine.pooled_states``).

For each model (the real all-MiniLM-L6-v2, and a 24-layer, 256-wide GPT-2 and Llama built
from a seed by ``rev_tasks.testing.variants``) and each path (in-memory transformers,
layer-streamed), ``--processes`` fresh processes each compute the first 8 challenges of a
fixed key under every combination of torch threads (1, 2, all cores) and batch size (1 and
8). Per (threads, batch) condition it counts the distinct pooled-state results and the
distinct signature sets across processes; across all conditions, processes and both paths it
reports the distinct signature sets and the most bits any challenge's signatures (all sites)
differ by from the first process's run in the first path at the fewest threads and first batch size
(1 thread, batch 1, in memory by default). Exits 1 when a condition gave more
than one pooled-state variant across processes (the old diagnostic's meaning).
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

KEY = bytes(range(100, 132))  # the integration tests' farm key
CHALLENGES = 8
DEEP_LAYERS = 24
DEEP_HIDDEN = 256

_CHILD = r"""
import base64, hashlib, json, sys
import torch
mode, path, key_hex, threads, batches, dtype, n = sys.argv[1:8]
from rev_tasks.core.challenges import generate_challenges
from rev_tasks.inference.signatures import site_signatures
key = bytes.fromhex(key_hex)
prompts = [c.prompt for c in generate_challenges(key, int(n))]
if mode == "streamed":
    from rev_tasks.inference.streaming import load_streamed
    model = load_streamed(path, dtype=dtype)
else:
    from rev_tasks.inference.loader import load_model
    model = load_model(path, dtype=dtype)
out = {}
for t in map(int, threads.split(",")):
    torch.set_num_threads(t)
    for b in map(int, batches.split(",")):
        pooled, sigs = [], []
        for start in range(0, len(prompts), b):
            p = model.pooled_states(prompts[start:start + b], model.sites)
            pooled += [p[s].tobytes() for s in sorted(p)]
            sigs += site_signatures(p, key, 4096)
        digest = hashlib.sha256(b"".join(pooled)).hexdigest()[:12]
        packed = [base64.b64encode(b"".join(sig[s].tobytes() for s in sorted(sig))).decode()
                  for sig in sigs]
        out[f"{t},{b}"] = {"pooled": digest, "signatures": packed}
print(json.dumps(out))
"""


def models(root: Path, names: list[str]) -> dict[str, Path]:
    """The real MiniLM and deep, narrow causal LMs (built once under ``root``)."""
    from rev_tasks.testing import variants as V

    out: dict[str, Path] = {}
    for name in names:
        if name == "minilm":
            out[name] = V.minilm_path()
            continue
        if name == "gpt2-1024":  # the 24 x 1024 GPT-2 of bench.bench_streaming (1.2 GB)
            from bench.bench_streaming import build

            out[name] = build("gpt2")
            continue
        path = root / f"{name}-{DEEP_LAYERS}x{DEEP_HIDDEN}"
        if not (path / "model.safetensors").is_file():
            V.build_tiny_causal_lm(path, name, seed=0, layers=DEEP_LAYERS, hidden=DEEP_HIDDEN)
        out[name] = path
    return out


def _run_child(
    mode: str,
    path: Path,
    threads: list[int],
    batches: list[int],
    dtype: str = "float32",
    challenges: int = CHALLENGES,
) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(path), KEY.hex(),
         ",".join(map(str, threads)), ",".join(map(str, batches)), dtype, str(challenges)],
        cwd=common.ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bits(a: str, b: str) -> int:
    x = np.frombuffer(base64.b64decode(a), np.uint8) ^ np.frombuffer(base64.b64decode(b), np.uint8)
    return int(np.unpackbits(x).sum())


def measure(
    path: Path,
    modes: list[str],
    threads: list[int],
    batches: list[int],
    processes: int,
    dtype: str = "float32",
    challenges: int = CHALLENGES,
) -> dict[str, Any]:
    """Per-condition variant counts and the largest per-challenge bit flip, for one model."""
    runs = {
        m: [_run_child(m, path, threads, batches, dtype, challenges) for _ in range(processes)]
        for m in modes
    }
    base = runs[modes[0]][0][f"{threads[0]},{batches[0]}"]["signatures"]
    conditions = []
    all_sets: set[tuple[str, ...]] = set()
    worst_overall = 0
    for mode in modes:
        for cond in runs[mode][0]:
            pooled = collections.Counter(r[cond]["pooled"] for r in runs[mode])
            sig_sets = [tuple(r[cond]["signatures"]) for r in runs[mode]]
            all_sets.update(sig_sets)
            worst = max(_bits(x, y) for s in sig_sets for x, y in zip(s, base, strict=True))
            worst_overall = max(worst_overall, worst)
            t, b = cond.split(",")
            conditions.append(
                {
                    "mode": mode,
                    "threads": int(t),
                    "batch": int(b),
                    "pooled_variants": len(pooled),
                    "signature_variants": len(set(sig_sets)),
                    "max_bits_vs_base": worst,
                }
            )
    return {
        "conditions": conditions,
        "signature_variants_overall": len(all_sets),
        "max_bits_overall": worst_overall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument(
        "--models", nargs="+", choices=("minilm", "gpt2", "llama", "gpt2-1024"),
        default=["minilm", "gpt2", "llama"],
    )  # fmt: skip
    ap.add_argument("--modes", nargs="+", choices=("memory", "streamed"), default=["memory", "streamed"])  # fmt: skip
    ap.add_argument("--threads", type=int, nargs="+", help="default: 1, 2 and all cores")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument("--challenges", type=int, default=CHALLENGES, help="prompts per run")
    ap.add_argument("--json", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    threads = sorted(set(args.threads or [1, 2, cores]))
    batches = list(args.batches)
    root = Path.home() / ".cache" / "rev-farm" / "determinism"
    stable = True
    report: dict[str, Any] = {
        "processes": args.processes,
        "cores": cores,
        "challenges": args.challenges,
        "dtype": args.dtype,
        "bits_per_challenge": "4 sites x 4096",
        "models": {},
    }
    print(
        f"{args.processes} fresh processes per model and path; threads {threads} "
        f"(all = {cores} cores); batch {batches}; {args.challenges} challenges, 4 sites × 4096 bits; "
        f"{args.dtype} compute"
    )
    print("| model | path | threads | batch | pooled variants | signature variants | max bits |")
    print("|---|---|---|---|---|---|---|")
    for name, path in models(root, args.models).items():
        res = measure(
            path, args.modes, threads, batches, args.processes, args.dtype, args.challenges
        )
        report["models"][name] = res
        for c in res["conditions"]:
            stable &= c["pooled_variants"] == 1
            print(
                f"| {name} | {c['mode']} | {c['threads']} | {c['batch']} | "
                f"{c['pooled_variants']} | {c['signature_variants']} | {c['max_bits_vs_base']} |"
            )
        print(
            f"| {name} | all | all | all | | {res['signature_variants_overall']} | "
            f"{res['max_bits_overall']} |",
            flush=True,
        )
    print(
        "max bits: the most signature bits (of 16,384 per challenge) any challenge differs by "
        f"from the first process's run at {threads[0]} thread(s), batch {batches[0]}, "
        f"{args.modes[0]} path"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if stable else 1


if __name__ == "__main__":
    raise SystemExit(main())
