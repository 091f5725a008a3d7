"""GPU inference benchmark and cross-device agreement, for a machine with a CUDA device.

Run: ``python -m bench.bench_gpu --json bench/results/gpu.json``

It builds a MiniLM-shaped BERT (the real MiniLM config and tokenizer, weights drawn at random
so that the script needs no 87 MB download on the GPU machine) and a tiny GPT-2, then for
CPU fp32, CUDA fp32 and CUDA fp16 measures per-challenge latency and challenges/s by batch
size, and the per-challenge distance of each CUDA configuration's signatures to the CPU fp32
signatures with the verdict each tolerance would reach. Speed on the same machine, same run:
the CPU row is the baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rev_tasks.core.challenges import generate_challenges
from rev_tasks.core.decision import decide
from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.engine import ModelSide, differing_bits
from rev_tasks.inference import load_model
from rev_tasks.testing import variants as V

BITS = 4096
N = 64


def _minilm_shaped(src_config_dir: Path, dst: Path) -> Path:
    """A BERT with MiniLM's config and tokenizer and random weights."""
    import torch
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(src_config_dir, local_files_only=True)
    torch.manual_seed(0)
    model = BertModel(config)
    model.save_pretrained(dst, safe_serialization=True)
    for f in src_config_dir.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy2(f, dst / f.name)
    return dst


def _time_batches(model: Any, prompts: list[str], batch: int, device: str) -> dict[str, float]:
    import torch

    sites = model.sites
    model.pooled_states(prompts[:batch], sites)  # warm-up (kernels, allocator)
    per_challenge = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        model.pooled_states(prompts[i : i + batch], sites)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        per_challenge += [dt / len(prompts[i : i + batch])] * len(prompts[i : i + batch])
    total = time.perf_counter() - start
    arr = np.array(per_challenge) * 1e3
    return {
        "batch": batch,
        "challenges_per_s": len(prompts) / total,
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "p99_ms": float(np.percentile(arr, 99)),
    }


def _signatures(model: Any) -> list:
    challenges = generate_challenges(DEMO_KEY, N)
    side = ModelSide(model)
    out = []
    for i in range(0, N, 8):
        out += side.signatures(challenges[i : i + 8], model.sites, DEMO_KEY, BITS)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", default="bench/assets/minilm-config")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    prompts = [c.prompt for c in generate_challenges(DEMO_KEY, N)]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "challenges": N,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = {
            "minilm-shaped": _minilm_shaped(Path(args.config_dir), root / "minilm"),
            "tiny-gpt2": V.build_tiny_causal_lm(root / "gpt2", "gpt2", seed=0),
        }
        for name, path in paths.items():
            rows = []
            cpu = load_model(path, dtype="float32", device="cpu")
            cpu_sigs = _signatures(cpu)
            sites = cpu.sites
            total = BITS * len(sites)
            for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "float16")):
                model = cpu if device == "cpu" else load_model(path, dtype=dtype, device=device)
                timings = [_time_batches(model, prompts, b, device) for b in (1, 8, 32)]
                row: dict[str, Any] = {"device": device, "dtype": dtype, "timings": timings}
                if device != "cpu":
                    sigs = _signatures(model)
                    d = [
                        differing_bits(a, b, sites) / total
                        for a, b in zip(cpu_sigs, sigs, strict=True)
                    ]
                    row["distance_to_cpu_fp32"] = {
                        "mean": float(np.mean(d)),
                        "max": float(np.max(d)),
                    }
                    row["verdict_vs_cpu_fp32"] = {
                        tol: decide(d, tol, 0.01, N).verdict for tol in ("exact", "precision")
                    }
                rows.append(row)
                print(json.dumps({"model": name, **row}))
            report["models"][name] = rows
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
