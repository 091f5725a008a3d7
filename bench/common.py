"""Helpers every benchmark shares: the result document, machine facts, percentiles.

Each ``bench/bench_*.py`` writes ``bench/results/<name>.json`` with the same top-level keys
(``name, machine, command, results, baseline, ratios, targets, met, guide, rows, notes``) so
that ``bench/report.py`` can render any of them without knowing the benchmark. ``rows`` is
the table a reader sees: one line per figure with ours, the baseline measured in the same
run, the reference figure (:data:`GUIDE`) and the target, already formatted.

The development machines are shared 2-core VMs: every document records the load average
before and after the run, so a reader can tell a slow figure from a busy neighbour.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Raw py-spy stacks are megabytes: they go under var/ (git-ignored), the summaries into JSON.
PROFILES = ROOT / "var" / "bench-profiles"

SHARED_NOTE = (
    "shared 2-core development VM: other engineers' test runs and services were active, "
    "so absolute figures carry their load; baselines run in the same process/run so the "
    "ratios are the comparable numbers"
)

# The reference figures the farm was specified against ("the guide's figure" in
# docs/performance.md), quoted beside ours; not measured here.
GUIDE = {
    "hamming_10k": "0.05 ms (target < 0.1 ms)",
    "inference_p50": "50-100 ms",
    "inference_p95": "100-180 ms",
    "inference_p99": "150-200 ms (target < 200 ms)",
    "memory": "52-440 MB per model (target < 500 MB)",
    "consensus": "10-30 ms (target < 50 ms)",
    "api": "100-300 ms response (target < 500 ms); rate limit 100 RPS",
}


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on Linux
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, memory, versions, load (the machine is shared)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "cores": cores,
        "mem_gib": _mem_gib(),
        "python": platform.python_version(),
        "loadavg_1m_start": loadavg(),
        "shared": True,
    }
    for mod in ("numpy", "torch", "transformers", "celery"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    if extra:
        info.update(extra)
    return info


def command() -> str:
    """The command line that produced this document (for the report)."""
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", _module(), *sys.argv[1:]])


def _module() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def pct(values: Sequence[float] | Iterable[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), or None for no values."""
    vals = sorted(values)
    if not vals:
        return None
    k = (len(vals) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def run_json(argv: Sequence[str], *, cwd: Path, env: dict[str, str], timeout: float) -> Any:
    """Run a measuring subprocess whose last stdout line is JSON; that object.

    Measurements that depend on a whole process (its memory, the code it imports) run in
    one of their own. A non-zero exit raises RuntimeError with the ends of both streams.
    """
    proc = subprocess.run(
        list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[-3:])} failed ({proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(
    figure: str,
    ours: str,
    baseline: str = "-",
    guide: str = "-",
    target: str = "-",
    met: bool | None = None,
) -> dict[str, Any]:
    """One line of the report table."""
    return {
        "figure": figure,
        "ours": ours,
        "baseline": baseline,
        "guide": guide,
        "target": target,
        "met": met,
    }


def document(
    name: str,
    *,
    results: dict[str, Any],
    baseline: dict[str, Any],
    ratios: dict[str, Any],
    targets: dict[str, Any],
    met: dict[str, bool | None],
    rows: list[dict[str, Any]],
    machine_info: dict[str, Any],
    notes: list[str] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """The result document every benchmark writes."""
    machine_info = dict(machine_info)
    machine_info["loadavg_1m_end"] = loadavg()
    return {
        "name": name,
        "machine": machine_info,
        "command": command(),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.perf_counter() - started, 1) if started is not None else None,
        "results": results,
        "baseline": baseline,
        "ratios": ratios,
        "targets": targets,
        "met": met,
        "rows": rows,
        "notes": [*(notes or []), SHARED_NOTE],
    }


def write(doc: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write the document to ``out`` (default bench/results/<name>.json)."""
    path = Path(out) if out else RESULTS / f"{doc['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first line, and ``--json [OUT]``."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--json", nargs="?", const="", default=None, metavar="OUT")
    return ap


def finish(doc: dict[str, Any], args: argparse.Namespace) -> int:
    """Write the document if ``--json`` asked for it; the exit status."""
    if args.json is not None:
        print(f"wrote {write(doc, args.json or None)}")
    return 0


def yes(flag: bool | None) -> str:
    return "-" if flag is None else ("met" if flag else "MISSED")
