"""Run every benchmark under one time budget, then render docs/performance.md (``make bench``).

Each benchmark runs as its own process (``python -m bench.<module> --json``) with a timeout,
so one that fails or hangs leaves a result document saying so and the others still run; the
report then shows the failure instead of a stale figure. Benchmarks that would not fit in
what is left of ``--budget`` are skipped and recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import common

# (result name, module, extra args, typical seconds on the 2-core dev VM, hard limit)
PLAN: list[tuple[str, str, list[str], int, int]] = [
    ("hamming", "bench.bench_hamming", [], 5, 120),
    ("inference", "bench.bench_inference", [], 110, 300),
    ("memory", "bench.bench_memory", [], 420, 720),
    ("consensus", "bench.bench_consensus", [], 120, 300),
    ("e2e", "bench.bench_e2e", [], 100, 300),
    ("api", "bench.bench_api", [], 240, 420),
    ("scaling", "bench.bench_scaling", [], 170, 420),
    ("streaming", "bench.bench_streaming", [], 120, 600),
    ("streaming-shapes", "bench.bench_streaming", ["--shapes"], 420, 1200),
    ("device-signatures", "bench.bench_device_signatures", [], 120, 600),
    ("llm", "bench.bench_llm", [], 300, 900),
]


def _failed(name: str, module: str, why: str, log: str) -> None:
    common.write(
        {
            "name": name,
            "machine": common.machine(),
            "command": f".venv/bin/python -m {module} --json",
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "error": why,
            "log_tail": log[-3000:],
            "results": {},
            "baseline": {},
            "ratios": {},
            "targets": {},
            "met": {},
            "rows": [],
            "notes": [why, common.SHARED_NOTE],
        }
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--budget", type=float, default=2400.0, help="seconds for all benchmarks")
    ap.add_argument("--only", help="comma-separated result names to run (default: all)")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    t0 = time.monotonic()
    summary = []
    for name, module, extra, typical, limit in PLAN:
        if only and name not in only:
            continue
        left = args.budget - (time.monotonic() - t0)
        if left < typical:
            why = (
                f"skipped: {left:.0f} s of the {args.budget:.0f} s budget left, needs ~{typical} s"
            )
            print(f"[bench] {name}: {why}", flush=True)
            _failed(name, module, why, "")
            summary.append((name, "skipped", 0.0))
            continue
        print(f"[bench] {name} (python -m {module})", flush=True)
        start = time.monotonic()
        cmd = [sys.executable, "-m", module, *extra, "--json"]
        try:
            proc = subprocess.run(
                cmd,
                cwd=common.ROOT,
                capture_output=True,
                text=True,
                timeout=min(limit, max(left, typical)),
                check=False,
            )
            out = proc.stdout + proc.stderr
            ok = proc.returncode == 0
            why = "" if ok else f"exited with {proc.returncode}"
        except subprocess.TimeoutExpired as exc:
            out = (
                (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            )
            ok, why = False, f"timed out after {exc.timeout:.0f} s"
        lines = [ln for ln in out.splitlines() if ln.strip()]
        for ln in lines[-12:] if ok else lines[-40:]:
            print(f"    {ln}", flush=True)
        if not ok:
            _failed(name, module, why, out)
        summary.append((name, "ok" if ok else why, time.monotonic() - start))
    total = time.monotonic() - t0
    print(f"[bench] benchmarks took {total:.0f} s", flush=True)
    for name, status, secs in summary:
        print(f"    {name:<10} {status:<28} {secs:6.0f} s", flush=True)
    from bench import report

    report.main(["--total-seconds", f"{total:.0f}"])
    Path(common.RESULTS / "run_all.json").write_text(
        json.dumps(
            {"total_s": round(total), "runs": [[n, s, round(x, 1)] for n, s, x in summary]},
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
