"""Consensus benchmark: the real chord of five validators vs a trivial five-task chord.

Run: ``.venv/bin/python -m bench.bench_consensus [--rounds 20] [--json [OUT]]``.

On an isolated farm (bench/farm.py: Redis db 13, a fresh PostgreSQL database, our own
workers) it first runs a real verify job to a 64-challenge transcript (a model against its
byte copy with alpha = 1e-18, so that the sequential test needs the whole budget and ends
UNDECIDED with 64 records), for a tiny GPT-2 and for MiniLM. Then, round after round on the
consensus worker (``-c 2``, as ``make up`` runs it), it times from dispatch to the callback's
result:

* the real chord, built exactly as ``rev_tasks.tasks.verify.dispatch_consensus`` builds it
  (five ``validate.si(job, i)`` into ``tally.si`` with the ``consensus_failed`` errback; the
  tally's result is stored for this call so that the bench can wait on it). Before
  each round the job's votes are deleted and the job is set back to ``running`` so that every
  validator does its full check (transcript audit, commitment check, re-execution of two
  sampled challenges on both models, vote upsert) and the tally publishes again;
* the baseline: a chord of five no-op tasks into a no-op body (bench/chord_tasks.py), same
  queue, worker and backend, alternating with the real rounds so that load hits both alike.

The first rounds warm each prefork child's model cache and are not counted.
Target: real p50 <= 1.5 x trivial p50. The reference figures (``GUIDE`` in bench/common.py)
quote 10-30 ms for "consensus time".
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench import common
from bench.farm import BenchFarm, verify_body
from rev_tasks.queues import CONSENSUS, DEFAULT, INFERENCE_CPU, MAINTENANCE
from rev_tasks.testing.variants import build_tiny_causal_lm, copy_model, minilm_path

TARGET_RATIO = 1.5
ALPHA_FULL_BUDGET = 1e-18  # all-match SPRT needs 65 challenges at this alpha: 64 records


def _reset(job_id: str) -> None:
    """Forget the votes and the published result, as if the chord were dispatched now."""
    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Job, Vote
    from rev_tasks.jobs import RUNNING

    with session_scope() as s:
        s.query(Vote).filter(Vote.job_id == job_id).delete()
        job = s.get(Job, job_id)
        assert job is not None
        job.status, job.stage, job.error, job.finished_at = RUNNING, "consensus", None, None


def _real_chord(job_id: str) -> Any:
    from celery import chord

    from rev_tasks.settings import VALIDATORS
    from rev_tasks.tasks.consensus import consensus_failed, tally, validate

    header = [validate.si(job_id, i) for i in range(VALIDATORS)]
    body = tally.si(job_id, time.time()).on_error(consensus_failed.s(job_id))
    # tally is declared ignore_result=True; this call stores its result so that the bench
    # can wait on it (one extra Redis SET + PUBLISH, which the trivial body pays too).
    return chord(header)(body.set(ignore_result=False))


def _trivial_chord() -> Any:
    from celery import chord

    from bench.chord_tasks import done, noop

    header = [noop.si(i).set(queue=CONSENSUS) for i in range(5)]
    return chord(header)(done.si().set(queue=CONSENSUS))


def _timed(fn: Any, timeout: float = 120.0) -> tuple[float, Any]:
    t0 = time.perf_counter()
    res = fn()
    value = res.get(timeout=timeout, propagate=True)
    return time.perf_counter() - t0, value


def _rounds(name: str, job_id: str, warmup: int, rounds: int) -> tuple[list[float], list[float]]:
    """Alternate real and trivial chords; the first ``warmup`` pairs are not kept."""
    real: list[float] = []
    trivial: list[float] = []
    for i in range(warmup + rounds):
        _reset(job_id)
        dt_real, out = _timed(lambda: _real_chord(job_id))
        if not out.get("agreeing") or out.get("status") != "succeeded":
            raise RuntimeError(f"{name}: consensus round did not publish: {out}")
        dt_triv, _ = _timed(_trivial_chord)
        if i >= warmup:
            real.append(dt_real)
            trivial.append(dt_triv)
    return real, trivial


def _stats(xs: list[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "p50_ms": round(1e3 * statistics.median(xs), 2),
        "p95_ms": round(1e3 * (common.pct(xs, 95) or 0.0), 2),
        "min_ms": round(1e3 * min(xs), 2),
        "max_ms": round(1e3 * max(xs), 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    machine = common.machine()

    pairs: dict[str, dict[str, Any]] = {}
    with BenchFarm("consensus") as farm:
        gpt2 = build_tiny_causal_lm(farm.models / "gpt2-a", "gpt2", seed=0)
        models = {"gpt2-tiny": (gpt2, copy_model(gpt2, farm.models / "gpt2-a-copy"))}
        if not args.skip_minilm:
            src = minilm_path()
            models["minilm"] = (src, copy_model(src, farm.models / "minilm-copy"))
        farm.start_web()
        farm.start_worker(f"{INFERENCE_CPU},{DEFAULT}", 1, "cpu")
        consensus = farm.start_worker(
            f"{CONSENSUS},{MAINTENANCE}", args.consensus_concurrency, "consensus",
            include="bench.chord_tasks",
        )  # fmt: skip
        http = farm.session()
        for name, (ref, cand) in models.items():
            body = verify_body(ref, cand, max_challenges=64, alpha=ALPHA_FULL_BUDGET)
            t0 = time.perf_counter()
            job_id = farm.submit(http, body)
            doc = farm.wait(http, job_id, timeout=600)
            if doc["status"] != "succeeded" or doc["progress"]["challenges_done"] != 64:
                raise RuntimeError(f"{name}: setup job ended {doc['status']}: {doc.get('error')}")
            pairs[name] = {
                "job_id": job_id,
                "setup_job_s": round(time.perf_counter() - t0, 2),
                "records": doc["progress"]["challenges_done"],
                "verdict": doc["result"]["verdict"],
            }

        for name, info in pairs.items():
            job_id = info["job_id"]
            rounds = args.rounds if name != "minilm" else args.minilm_rounds
            real, trivial = _rounds(name, job_id, args.warmup, rounds)
            info["real"] = _stats(real)
            info["trivial"] = _stats(trivial)
            info["ratio_p50"] = round(statistics.median(real) / statistics.median(trivial), 2)
            info["met"] = info["ratio_p50"] <= TARGET_RATIO
            if args.profile:
                # Extra rounds under py-spy (not timed): where the validators spend their time.
                from bench.profiling import PySpy, summarise

                out = common.PROFILES / f"consensus-{name}.txt"
                with PySpy(consensus.pid, out) as prof:
                    for _ in range(args.profile_rounds):
                        _reset(job_id)
                        _timed(lambda: _real_chord(job_id))  # noqa: B023
                info["profile"] = (
                    {"error": prof.error}
                    if prof.error
                    else {
                        "file": str(out.relative_to(common.ROOT)),
                        **summarise(out, focus="validate"),
                    }
                )
            print(
                f"{name:<10} real chord p50 {info['real']['p50_ms']:.1f} ms p95 "
                f"{info['real']['p95_ms']:.1f} | trivial p50 {info['trivial']['p50_ms']:.1f} ms "
                f"p95 {info['trivial']['p95_ms']:.1f} | ratio {info['ratio_p50']:.2f} "
                f"(target <= {TARGET_RATIO}) {common.yes(info['met'])}",
                flush=True,
            )
        if args.blas_what_if and "minilm" in pairs:
            # What-if for a worker-level fix: numpy's OpenBLAS starts one thread per core in
            # every prefork child (only torch's threads are pinned, rev_tasks/celery.py), and
            # two BLAS threads per child on two busy cores slow the signature product down.
            farm.stop(consensus)
            farm.start_worker(
                f"{CONSENSUS},{MAINTENANCE}", args.consensus_concurrency, "consensus-blas1",
                include="bench.chord_tasks", OPENBLAS_NUM_THREADS="1",
            )  # fmt: skip
            real, trivial = _rounds("minilm", pairs["minilm"]["job_id"], 2, args.minilm_rounds)
            pairs["minilm"]["what_if_openblas_1_thread"] = {
                "real": _stats(real),
                "trivial": _stats(trivial),
                "ratio_p50": round(statistics.median(real) / statistics.median(trivial), 2),
            }
            print(f"minilm, OPENBLAS_NUM_THREADS=1 in the workers: {_stats(real)}", flush=True)
        facts = dict(farm.facts)
        facts["consensus_worker"] = f"-c {args.consensus_concurrency}"
    return _document(pairs, facts, machine, args, started)


def _document(
    pairs: dict[str, dict[str, Any]],
    facts: dict[str, Any],
    machine: dict[str, Any],
    args: argparse.Namespace,
    started: float,
) -> dict[str, Any]:
    rows = []
    met: dict[str, bool | None] = {}
    for name, info in pairs.items():
        met[f"{name}_p50_ratio"] = info["met"]
        rows.append(
            common.row(
                f"chord of 5 validators + tally, 64-challenge transcript, {name} (p50 / p95 ms)",
                f"{info['real']['p50_ms']:.1f} / {info['real']['p95_ms']:.1f}",
                f"trivial 5-task chord {info['trivial']['p50_ms']:.1f} / "
                f"{info['trivial']['p95_ms']:.1f}; ratio {info['ratio_p50']:.2f}",
                common.GUIDE["consensus"],
                f"p50 <= {TARGET_RATIO} x trivial",
                info["met"],
            )
        )
    wi = pairs.get("minilm", {}).get("what_if_openblas_1_thread")
    if wi:
        base = pairs["minilm"]["real"]["p50_ms"]
        rows.append(
            common.row(
                "what-if: minilm, workers started with OPENBLAS_NUM_THREADS=1 (p50 / p95 ms)",
                f"{wi['real']['p50_ms']:.1f} / {wi['real']['p95_ms']:.1f} "
                f"({wi['real']['p50_ms'] / base - 1:+.0%} vs as deployed)",
                f"trivial {wi['trivial']['p50_ms']:.1f}; ratio {wi['ratio_p50']:.2f}",
            )
        )
    return common.document(
        "consensus",
        results={name: {k: v for k, v in i.items() if k != "trivial"} for name, i in pairs.items()},
        baseline={name: i["trivial"] for name, i in pairs.items()},
        ratios={f"{name}_p50_ratio": i["ratio_p50"] for name, i in pairs.items()},
        targets={"p50_ratio_max": TARGET_RATIO},
        met=met,
        rows=rows,
        machine_info={**machine, "farm": facts},
        notes=[
            f"{args.rounds} (tiny GPT-2) / {args.minilm_rounds} (MiniLM) timed rounds after "
            f"{args.warmup} warm-up rounds; real "
            "and trivial chords alternate; time = dispatch to the body's result (Redis "
            "result backend, pub/sub)",
            "each validator re-executes 2 sampled challenges on both models (4 forward passes "
            "of batch 1), audits 64 inclusion proofs and upserts its vote in PostgreSQL",
        ],
        started=started,
    )


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds, tiny GPT-2")
    ap.add_argument("--minilm-rounds", type=int, default=10, help="timed rounds, MiniLM")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--no-blas-what-if",
        dest="blas_what_if",
        action="store_false",
        help="skip the MiniLM rounds with OPENBLAS_NUM_THREADS=1 in the workers",
    )
    ap.add_argument("--consensus-concurrency", type=int, default=2)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the extra py-spy rounds on the consensus worker",
    )
    ap.add_argument("--profile-rounds", type=int, default=5)
    args = ap.parse_args(argv)
    doc = run(args)
    return common.finish(doc, args)


if __name__ == "__main__":
    raise SystemExit(main())
