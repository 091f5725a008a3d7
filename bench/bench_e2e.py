"""End-to-end benchmark: submit-to-result time of MiniLM SAME and DIFFERENT jobs, cold and warm.

Run: ``.venv/bin/python -m bench.bench_e2e [--warm 3] [--json [OUT]]``.

The whole farm on an isolated stack (bench/farm.py): the coordinator under gunicorn, a CPU
inference worker (``-Q inference.cpu,default``, ``-c 1`` so that "warm" means one child that
has the models cached) and a consensus worker (``-Q consensus,maintenance -c 2``, as
``make up`` runs it). A job is timed from the POST until its row says ``succeeded`` (the
bench reads PostgreSQL every 20 ms, which costs the farm far less CPU than polling the API;
the finished document is then read once through the API), so the figure includes prepare,
inference, the five validators and the tally, i.e. what a user waits for.

* SAME: MiniLM (the real weights) against a byte copy; DIFFERENT: against a copy with 1 %
  Gaussian weight noise (the ``make demo`` pair). Default job parameters (exact, alpha 0.01,
  64-challenge budget, batch 8).
* cold: the first job after the workers start (the models are loaded inside the job);
  the workers are restarted before the cold DIFFERENT job. warm: the next ``--warm`` jobs of
  the same kind (models cached in every child); the median is reported.

Baseline, same run: the same verification in-process with ``rev_tasks.engine.Verification``
(no farm: no queues, no database, no validators), with the models already loaded (warm) and
including the load (cold). Target: warm <= 5 s. Also recorded: each worker child's RSS after
the warm jobs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.farm import BenchFarm, verify_body
from rev_tasks.queues import CONSENSUS, DEFAULT, INFERENCE_CPU, MAINTENANCE
from rev_tasks.testing import variants

TARGET_WARM_S = 5.0


def _engine_baseline(ref: Path, cand: Path, key: bytes) -> dict[str, float]:
    """The same verification in this process: cold (loads included) and warm."""
    import torch

    from rev_tasks.engine import Verification, VerifyParams
    from rev_tasks.inference import load_model

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    r, c = load_model(ref), load_model(cand)
    Verification(r, c, key, VerifyParams()).run()
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(3):
        t = time.perf_counter()
        out = Verification(r, c, key, VerifyParams()).run()
        warm.append(time.perf_counter() - t)
    return {
        "cold_s": round(cold, 3),
        "warm_s": round(statistics.median(warm), 3),
        "verdict": out.decision.verdict,
        "challenges": out.decision.challenges_used,
    }


def _job(farm: BenchFarm, http: Any, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    job_id = farm.submit(http, body)
    farm.wait_db([job_id], timeout=600, poll=0.02)
    elapsed = time.perf_counter() - t0
    doc = farm.wait(http, job_id, timeout=30)  # the user's view of the finished job
    if doc["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {doc['status']}: {doc.get('error')}")
    result = doc.get("result") or {}
    return {
        "s": round(elapsed, 3),
        "verdict": result.get("verdict"),
        "challenges": result.get("challenges_used"),
    }


def _workers(farm: BenchFarm) -> tuple[Any, Any]:
    cpu = farm.start_worker(f"{INFERENCE_CPU},{DEFAULT}", 1, "cpu")
    consensus = farm.start_worker(f"{CONSENSUS},{MAINTENANCE}", 2, "consensus")
    return cpu, consensus


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    machine = common.machine()

    cases: dict[str, dict[str, Any]] = {}
    rss: dict[str, list[float]] = {}
    with BenchFarm("e2e") as farm:
        src = variants.minilm_path()
        pairs = {
            "SAME": (src, variants.copy_model(src, farm.models / "minilm-copy")),
            "DIFFERENT": (
                src,
                variants.save_transformed(
                    src, farm.models / "minilm-noisy", variants.gaussian_noise(0.01, seed=0)
                ),
            ),
        }
        farm.start_web()
        http = farm.session()
        for i, (kind, (ref, cand)) in enumerate(pairs.items()):
            if i:  # cold again: fresh worker processes, empty model caches
                for p in [p for p in farm.procs if p.name.startswith("bench-")]:
                    farm.stop(p)
            cpu, consensus = _workers(farm)
            body = verify_body(ref, cand)
            cold = _job(farm, http, body)
            warm = [_job(farm, http, body) for _ in range(args.warm)]
            cases[kind] = {
                "cold_s": cold["s"],
                "warm_s": round(statistics.median(w["s"] for w in warm), 3),
                "warm_all_s": [w["s"] for w in warm],
                "verdict": cold["verdict"],
                "challenges": cold["challenges"],
                "met": statistics.median(w["s"] for w in warm) <= TARGET_WARM_S,
            }
            for name, proc in (("cpu", cpu), ("consensus", consensus)):
                rss[f"{kind}/{name}"] = [
                    round(c.memory_info().rss / 2**20, 1) for c in farm.worker_children(proc)
                ]
            print(
                f"{kind:<9} cold {cold['s']:.2f} s, warm median {cases[kind]['warm_s']:.2f} s "
                f"({cold['verdict']}, {cold['challenges']} challenges)",
                flush=True,
            )
        key = farm.env["REV_SECRET_KEY_FILE"]
        from rev_tasks.core.keys import load_key

        baseline = {kind: _engine_baseline(r, c, load_key(key)) for kind, (r, c) in pairs.items()}
        facts = dict(farm.facts, workers=f"cpu -c 1 ({INFERENCE_CPU},{DEFAULT}); consensus -c 2")
    for kind, b in baseline.items():
        print(f"{kind:<9} engine in-process: cold {b['cold_s']:.2f} s, warm {b['warm_s']:.2f} s")
    return _document(cases, baseline, rss, facts, machine, args, started)


def _document(
    cases: dict[str, Any],
    baseline: dict[str, Any],
    rss: dict[str, list[float]],
    facts: dict[str, Any],
    machine: dict[str, Any],
    args: argparse.Namespace,
    started: float,
) -> dict[str, Any]:
    rows = []
    for kind, c in cases.items():
        b = baseline[kind]
        rows.append(
            common.row(
                f"MiniLM {kind} job, submit to result: cold / warm (s)",
                f"{c['cold_s']:.2f} / {c['warm_s']:.2f} ({c['verdict']}, {c['challenges']} "
                "challenges)",
                f"engine in-process {b['cold_s']:.2f} / {b['warm_s']:.2f}; farm overhead warm "
                f"x{c['warm_s'] / b['warm_s']:.1f}",
                "-",
                f"warm <= {TARGET_WARM_S:g} s",
                c["met"],
            )
        )
    rows.append(
        common.row(
            "worker child RSS after the warm jobs (MB)",
            "; ".join(f"{k}: {', '.join(f'{x:.0f}' for x in v)}" for k, v in rss.items()),
        )
    )
    return common.document(
        "e2e",
        results={"cases": cases, "worker_child_rss_mb": rss},
        baseline={"engine_in_process": baseline},
        ratios={
            f"{k}_warm_over_engine": round(c["warm_s"] / baseline[k]["warm_s"], 2)
            for k, c in cases.items()
        },
        targets={"warm_s": TARGET_WARM_S},
        met={f"{k}_warm_s": c["met"] for k, c in cases.items()},
        rows=rows,
        machine_info={**machine, "farm": facts},
        notes=[
            f"{args.warm} warm jobs per kind (median); cold = first "
            "job after the workers started (model loads inside the job); completion read from "
            "PostgreSQL every 20 ms",
            "engine baseline: rev_tasks.engine.Verification in the bench process, 1 torch "
            "thread, same key and default parameters",
        ],
        started=started,
    )


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--warm", type=int, default=3)
    args = ap.parse_args(argv)
    doc = run(args)
    return common.finish(doc, args)


if __name__ == "__main__":
    raise SystemExit(main())
