"""Render bench/results/*.json into docs/performance.md (the last step of ``make bench``).

Every benchmark document carries ready-made ``rows`` (figure, ours, baseline measured in the
same run, the reference figure of ``bench/common.py`` ``GUIDE``, target, met), so this file
only lays them out:
a summary of the targets, then one table per benchmark with the command that produced it,
its notes and the machine's load while it ran. ``bench/findings.md`` (the profile findings,
written by hand because they explain code changes) is appended as it is. Documents without
``rows`` (calibration, GPU: other scripts' formats) are listed, not rendered.

Run: ``.venv/bin/python -m bench.report [--out docs/performance.md]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench import common

ORDER = [
    "hamming",
    "inference",
    "inference-cuda",
    "device-signatures",
    "memory",
    "streaming",
    "streaming-shapes",
    "llm",
    "consensus",
    "api",
    "e2e",
    "scaling",
    "endpoint",
]
TITLES = {
    "hamming": "Hamming distance (10,048-bit signatures, one core)",
    "inference": "Inference (per-challenge latency and throughput, CPU)",
    "inference-cuda": "Inference on CUDA",
    "memory": "Memory (a prefork worker holding MiniLM or SmolLM2)",
    "consensus": "Consensus (chord of five validators on Redis)",
    "api": "API (wrk at a constant 200 req/s, gunicorn on loopback)",
    "e2e": "End to end (submit to result)",
    "scaling": "Scaling (-c 1 vs -c 2, backlog drain)",
    "streaming": "Layer-streamed verification (1.13 GiB model, 512 MB budget)",
    "streaming-shapes": "Layer-streamed verification: other shapes (>= 1 GiB, 512 MB budget)",
    "device-signatures": "On-device signatures (pool, project, pack on the model's device)",
    "endpoint": "Endpoint verification (llama.cpp server, SmolLM2 GGUF variants)",
    "llm": "Real LLM (SmolLM2-135M)",
}
FINDINGS = common.ROOT / "bench" / "findings.md"
DEFAULT_OUT = common.ROOT / "docs" / "performance.md"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _met(flag: Any) -> str:
    return {True: "**met**", False: "**missed**"}.get(flag, "-")


def _load(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    return f"load average {m.get('loadavg_1m_start')} -> {m.get('loadavg_1m_end')}"


def _summary(docs: dict[str, dict[str, Any]]) -> list[str]:
    out = [
        "| benchmark | target | met? | key figure |",
        "| --- | --- | --- | --- |",
    ]
    for name in ORDER:
        doc = docs.get(name)
        if doc is None:
            continue
        if doc.get("error"):
            out.append(f"| {TITLES.get(name, name)} | - | not run | {_cell(doc['error'])} |")
            continue
        for r in doc.get("rows", []):
            if r.get("met") is None:
                continue
            out.append(
                f"| {TITLES.get(name, name)} | {_cell(r['target'])} | {_met(r['met'])} | "
                f"{_cell(r['figure'])}: {_cell(r['ours'])} |"
            )
    return out


def _section(name: str, doc: dict[str, Any]) -> list[str]:
    out = [f"## {TITLES.get(name, name)}", ""]
    out.append(f"Command: `{doc.get('command', '?')}` ({doc.get('generated', '?')}, ")
    out[-1] += f"{doc.get('wall_s', '?')} s, {_load(doc)})"
    m = doc.get("machine", {})
    if m.get("gpu"):
        out[-1] += f". Machine: {m['gpu']} on a {m.get('cores')}-core {m.get('cpu')} host"
    out.append("")
    if doc.get("error"):
        out += [f"**Not run: {doc['error']}**", ""]
        if doc.get("log_tail"):
            out += ["```", doc["log_tail"][-1500:].rstrip(), "```", ""]
        return out
    out += [
        "| figure | ours | baseline (same run) | guide's figure | target | met? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc.get("rows", []):
        out.append(
            f"| {_cell(r['figure'])} | {_cell(r['ours'])} | {_cell(r['baseline'])} | "
            f"{_cell(r['guide'])} | {_cell(r['target'])} | {_met(r['met'])} |"
        )
    out.append("")
    if doc.get("ratios"):
        ratios = ", ".join(f"{k} {v}" for k, v in doc["ratios"].items() if v is not None)
        out += [f"Ratios: {ratios}.", ""]
    for note in doc.get("notes", []):
        if note != common.SHARED_NOTE:
            out.append(f"- {note}")
    out.append("")
    return out


def render(results: Path, total_seconds: str | None = None) -> str:
    docs: dict[str, dict[str, Any]] = {}
    others: list[str] = []
    for path in sorted(results.glob("*.json")):
        if path.name == "run_all.json":
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows = doc.get("rows") if isinstance(doc, dict) else None
        ours = isinstance(rows, list) and all(isinstance(r, dict) and "figure" in r for r in rows)
        if isinstance(doc, dict) and "machine" in doc and (ours or "error" in doc):
            docs[str(doc.get("name", path.stem))] = doc
        else:
            others.append(path.name)
    machine = next((d["machine"] for d in docs.values() if "machine" in d), {})
    lines = [
        "# Performance",
        "",
        "<!-- Generated by `make bench` (bench/run_all.py, then bench/report.py). "
        "Do not edit: change the benchmarks or bench/findings.md and run it again. -->",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        + (f"; all benchmarks took {total_seconds} s" if total_seconds else "")
        + ". Each figure sits beside a baseline measured in the same run and the guide's "
        "figure (the reference figures the farm was specified against, quoted in "
        "bench/common.py as GUIDE; not measured here); medians unless a percentile is named.",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('mem_gib', '?')} GiB, Python {machine.get('python', '?')}. "
        f"**{common.SHARED_NOTE[0].upper()}{common.SHARED_NOTE[1:]}.** Each section gives the 1-minute load "
        "average before and after it ran.",
        "",
        "## Targets",
        "",
        *_summary(docs),
        "",
    ]
    for name in ORDER + sorted(set(docs) - set(ORDER)):
        if name in docs:
            lines += _section(name, docs[name])
    if FINDINGS.exists():
        lines += [FINDINGS.read_text().rstrip(), ""]
    if others:
        lines += [
            "## Other result files",
            "",
            "Written by other scripts in their own formats (see their docs): "
            + ", ".join(f"`bench/results/{o}`" for o in others)
            + ".",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--results", default=str(common.RESULTS))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--total-seconds", default=None)
    args = ap.parse_args(argv)
    text = render(Path(args.results), args.total_seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
