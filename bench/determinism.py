"""Are a model's pooled states and signatures bit-identical across processes? (A diagnostic.)

Run: ``.venv/bin/python -m bench.determinism [--processes 12] [--threads 1 2]
[--mode streamed|memory]``.

REV's ``exact`` tolerance and the validators' re-execution compare signatures computed in
different processes bit for bit. This runs the benchmark GPT-2 (24 × 1024, built once by
``bench.bench_streaming``) on the first 8 challenges of a fixed key, each sample in a fresh
process with the given torch thread count, and counts the distinct pooled-state results and
the distinct signature sets per thread count. One distinct result means the forward pass was
reproducible across those processes. Exits 1 when some thread count gave more than one.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

from bench import common

KEY = bytes(range(100, 132))  # the integration tests' farm key

_CHILD = r"""
import hashlib, json, sys
import torch
mode, threads, path, key_hex = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(threads)
from rev_tasks.core.challenges import generate_challenges
from rev_tasks.inference.signatures import site_signatures
key = bytes.fromhex(key_hex)
prompts = [c.prompt for c in generate_challenges(key, 8)]
if mode == "streamed":
    from rev_tasks.inference.streaming import load_streamed
    model = load_streamed(path, memory_budget_mb=512)
else:
    from rev_tasks.inference.loader import load_model
    model = load_model(path)
pooled = model.pooled_states(prompts, model.sites)
sigs = site_signatures(pooled, key, 4096)
digest = lambda chunks: hashlib.sha256(b"".join(chunks)).hexdigest()[:12]
print(json.dumps({
    "pooled": digest(pooled[s].tobytes() for s in sorted(pooled)),
    "signatures": digest(sig[s].tobytes() for sig in sigs for s in sorted(sig)),
}))
"""


def sample(model: Path, mode: str, threads: int, processes: int) -> dict[str, dict[str, int]]:
    """Counts of each pooled-state digest and each signature digest over fresh processes."""
    pooled: collections.Counter[str] = collections.Counter()
    signatures: collections.Counter[str] = collections.Counter()
    for _ in range(processes):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, mode, str(threads), str(model), KEY.hex()],
            cwd=common.ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"child failed:\n{proc.stderr[-2000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        pooled[out["pooled"]] += 1
        signatures[out["signatures"]] += 1
    return {"pooled": dict(pooled), "signatures": dict(signatures)}


def main(argv: list[str] | None = None) -> int:
    from bench.bench_streaming import build

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--processes", type=int, default=12)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mode", choices=("streamed", "memory"), default="streamed")
    args = ap.parse_args(argv)
    model = build("gpt2")
    stable = True
    for threads in args.threads:
        counts = sample(model, args.mode, threads, args.processes)
        stable &= len(counts["pooled"]) == 1
        for what in ("pooled", "signatures"):
            shown = ", ".join(f"{d} x{n}" for d, n in sorted(counts[what].items()))
            print(
                f"{args.mode}, {threads} thread(s), {what}: {len(counts[what])} distinct "
                f"in {args.processes} processes ({shown})"
            )
    return 0 if stable else 1


if __name__ == "__main__":
    raise SystemExit(main())
