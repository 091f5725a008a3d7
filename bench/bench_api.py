"""API benchmark: POST /v1/jobs and GET /v1/jobs/<id> through gunicorn at 200 req/s.

Run: ``.venv/bin/python -m bench.bench_api [--seconds 60] [--json [OUT]]``.

The coordinator runs as ``make up`` runs it (gunicorn, ``deploy/gunicorn.conf.py``, two sync
workers, loopback) on an isolated farm (bench/farm.py: PostgreSQL database, Redis db 13).
The load generator is ``hey`` (Debian package ``hey``; a Go binary, so it takes little of
the two cores from the server): one instance POSTs verify jobs at 100 req/s and another GETs
a job at 100 req/s, at the same time, for ``--seconds`` (200 req/s in all). ``hey -q`` is a
per-connection rate, so 10 connections x 10 req/s each. Without ``hey`` on PATH a small
open-loop Python generator (threads, latency measured from each request's scheduled send
time) stands in, and the document says so.

Baseline, same run, same server: ``GET /healthz`` (no database, no auth) at 200 req/s: the
floor that gunicorn + Flask + loopback set on this machine.

No Celery worker runs: the POSTed jobs' messages wait in Redis db 13 and are flushed after.
The submit path asks the workers which queues are live (``inspect().active_queues()``, cached
for ``REV_INSPECT_CACHE_SECONDS``); a second, shorter run with that cache made long shows
what that call costs the tail (see the notes).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import common
from bench.farm import BenchFarm, verify_body

TARGET_P99_MS = 50.0
RATE = 200


def _parse_hey(text: str) -> dict[str, Any]:
    """Latency percentiles, status codes and errors from hey's text summary."""
    pct = {
        int(m.group(1)): float(m.group(2)) * 1e3
        for m in re.finditer(r"^\s+(\d+)% in ([\d.]+) secs", text, re.M)
    }
    status = {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(r"^\s+\[(\d{3})\]\s+(\d+) responses", text, re.M)
    }
    errors = 0
    if "Error distribution:" in text:
        tail = text.split("Error distribution:", 1)[1]
        errors = sum(int(m.group(1)) for m in re.finditer(r"^\s+\[(\d+)\]\s", tail, re.M))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    slowest = re.search(r"Slowest:\s+([\d.]+) secs", text)
    total = sum(status.values())
    bad = sum(n for code, n in status.items() if code >= 400) + errors
    return {
        "requests": total + errors,
        "rps": round(float(rps.group(1)), 1) if rps else None,
        "p50_ms": round(pct.get(50, float("nan")), 2),
        "p90_ms": round(pct.get(90, float("nan")), 2),
        "p99_ms": round(pct.get(99, float("nan")), 2),
        "max_ms": round(float(slowest.group(1)) * 1e3, 1) if slowest else None,
        "status": status,
        "errors": bad,
    }


def _hey(
    url: str, seconds: float, rate: int, token: str | None, body: dict | None
) -> subprocess.Popen[str]:
    conns = max(1, rate // 10)
    argv = ["hey", "-z", f"{seconds:g}s", "-c", str(conns), "-q", f"{rate / conns:g}"]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    if body is not None:
        argv += ["-m", "POST", "-T", "application/json", "-d", json.dumps(body)]
    return subprocess.Popen(
        argv + [url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


class _PyLoad:
    """Open-loop fallback: send at fixed intervals from a thread pool; latency from schedule."""

    def __init__(self, url: str, seconds: float, rate: int, token: str | None, body: Any) -> None:
        self.url, self.seconds, self.rate, self.body = url, seconds, rate, body
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.lat: list[float] = []
        self.status: dict[int, int] = {}
        self.errors = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _one(self, scheduled: float) -> None:
        import requests

        s = getattr(self._local, "s", None) or requests.Session()
        self._local.s = s
        try:
            if self.body is None:
                r = s.get(self.url, headers=self.headers, timeout=10)
            else:
                r = s.post(self.url, json=self.body, headers=self.headers, timeout=10)
            code: int | None = r.status_code
        except Exception:  # noqa: BLE001 - any failure is an error for the report
            code = None
        dt = time.perf_counter() - scheduled
        with self._lock:
            if code is None:
                self.errors += 1
            else:
                self.status[code] = self.status.get(code, 0) + 1
                self.lat.append(dt)

    def _run(self) -> None:
        interval = 1.0 / self.rate
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=32) as pool:
            i = 0
            while (scheduled := t0 + i * interval) < t0 + self.seconds:
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(self._one, scheduled)
                i += 1
        self.wall = time.perf_counter() - t0

    def result(self) -> dict[str, Any]:
        self.thread.join()
        lat = [x * 1e3 for x in self.lat]
        bad = sum(n for c, n in self.status.items() if c >= 400) + self.errors
        return {
            "requests": len(lat) + self.errors,
            "rps": round(len(lat) / self.wall, 1),
            "p50_ms": round(common.pct(lat, 50) or 0.0, 2),
            "p90_ms": round(common.pct(lat, 90) or 0.0, 2),
            "p99_ms": round(common.pct(lat, 99) or 0.0, 2),
            "max_ms": round(max(lat), 1) if lat else None,
            "status": self.status,
            "errors": bad,
        }


def load(
    targets: list[tuple[str, int, dict | None]], seconds: float, token: str | None
) -> tuple[str, list[dict[str, Any]]]:
    """Run every (url, rate, body) target at once for ``seconds``; one result per target."""
    if shutil.which("hey"):
        procs = [_hey(url, seconds, rate, token, body) for url, rate, body in targets]
        outs = [p.communicate(timeout=seconds + 120)[0] for p in procs]
        return "hey", [_parse_hey(o) for o in outs]
    loads = [_PyLoad(url, seconds, rate, token, body) for url, rate, body in targets]
    return "python open-loop (hey not installed)", [x.result() for x in loads]


def _profile_web(farm: BenchFarm, seconds: float, targets: list, out: Path) -> dict[str, Any]:
    from bench.profiling import PySpy, summarise

    web = next(p for p in farm.procs if p.name == "web")
    load([(url, 20, body) for url, _rate, body in targets], 3, farm.token)  # warm workers
    with PySpy(web.pid, out) as prof:
        load(targets, seconds, farm.token)
    if prof.error:
        return {"error": prof.error}
    return {"file": str(out.relative_to(common.ROOT)), **summarise(out, focus="wsgi_app")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    machine = common.machine()
    from rev_tasks.testing.variants import build_tiny_causal_lm, copy_model

    runs: dict[str, Any] = {}
    with BenchFarm("api", extra_env={"REV_INSPECT_CACHE_SECONDS": "5"}) as farm:
        ref = build_tiny_causal_lm(farm.models / "gpt2-a", "gpt2", seed=0)
        cand = copy_model(ref, farm.models / "gpt2-a-copy")
        api = farm.start_web(workers=args.web_workers)
        http = farm.session()
        body = verify_body(ref, cand, max_challenges=64)
        job_id = farm.submit(http, body)
        half = RATE // 2
        jobs_url, job_url = f"{api}/v1/jobs", f"{api}/v1/jobs/{job_id}"
        # warm-up: connections, DB pool, imports in every gunicorn worker
        load([(jobs_url, 20, body), (job_url, 20, None)], 3, farm.token)

        generator, (health,) = load([(f"{api}/healthz", RATE, None)], args.baseline_seconds, None)
        runs["healthz"] = health
        print(f"baseline GET /healthz @{RATE}/s: {health}", flush=True)
        _, (post, get) = load(
            [(jobs_url, half, body), (job_url, half, None)], args.seconds, farm.token
        )
        runs["post"], runs["get"] = post, get
        print(f"POST /v1/jobs @{half}/s: {post}\nGET /v1/jobs/<id> @{half}/s: {get}", flush=True)
        farm.stop(next(p for p in farm.procs if p.name == "web"))

        if args.tuned_seconds > 0:
            # Same server code, inspect() answer cached for an hour: the tail without it.
            farm.env["REV_INSPECT_CACHE_SECONDS"] = "3600"
            api = farm.start_web(workers=args.web_workers)
            jobs_url, job_url = f"{api}/v1/jobs", f"{api}/v1/jobs/{job_id}"
            load([(jobs_url, 20, body), (job_url, 20, None)], 3, farm.token)
            _, (tpost, tget) = load(
                [(jobs_url, half, body), (job_url, half, None)], args.tuned_seconds, farm.token
            )
            runs["tuned_post"], runs["tuned_get"] = tpost, tget
            print(f"inspect cached 1 h: POST {tpost}\n  GET {tget}", flush=True)
            farm.env["REV_INSPECT_CACHE_SECONDS"] = "5"
            farm.stop(next(p for p in farm.procs if p.name == "web"))
        if args.profile_seconds > 0:
            api = farm.start_web(workers=args.web_workers)
            jobs_url, job_url = f"{api}/v1/jobs", f"{api}/v1/jobs/{job_id}"
            runs["profile"] = _profile_web(
                farm,
                args.profile_seconds,
                [(jobs_url, half, body), (job_url, half, None)],
                common.PROFILES / "api-web.txt",
            )
        facts = dict(farm.facts, generator=generator, web_workers=args.web_workers)
    return _document(runs, facts, machine, args, started)


def _document(
    runs: dict[str, Any],
    facts: dict[str, Any],
    machine: dict[str, Any],
    args: argparse.Namespace,
    started: float,
) -> dict[str, Any]:
    post, get, health = runs["post"], runs["get"], runs["healthz"]
    p99 = max(post["p99_ms"], get["p99_ms"])
    errors = post["errors"] + get["errors"]
    met = {"p99_ms": p99 <= TARGET_P99_MS, "errors": errors == 0}
    rows = [
        common.row(
            f"POST /v1/jobs @ {RATE // 2}/s for {args.seconds:g} s (p50 / p99 ms; errors)",
            f"{post['p50_ms']:.1f} / {post['p99_ms']:.1f}; {post['errors']} errors of "
            f"{post['requests']} ({post['rps']:.0f}/s achieved)",
            f"GET /healthz @ {RATE}/s: {health['p50_ms']:.1f} / {health['p99_ms']:.1f}",
            common.GUIDE["api"],
            f"p99 <= {TARGET_P99_MS:g} ms, no errors",
            post["p99_ms"] <= TARGET_P99_MS and post["errors"] == 0,
        ),
        common.row(
            f"GET /v1/jobs/<id> @ {RATE // 2}/s, same time (p50 / p99 ms; errors)",
            f"{get['p50_ms']:.1f} / {get['p99_ms']:.1f}; {get['errors']} errors of "
            f"{get['requests']} ({get['rps']:.0f}/s achieved)",
            "(same baseline)",
            common.GUIDE["api"],
            f"p99 <= {TARGET_P99_MS:g} ms, no errors",
            get["p99_ms"] <= TARGET_P99_MS and get["errors"] == 0,
        ),
    ]
    if "tuned_post" in runs:
        tp, tg = runs["tuned_post"], runs["tuned_get"]
        rows.append(
            common.row(
                f"same, inspect() cached for 1 h ({args.tuned_seconds:g} s): POST / GET p50, p99",
                f"POST {tp['p50_ms']:.1f}, {tp['p99_ms']:.1f}; GET {tg['p50_ms']:.1f}, "
                f"{tg['p99_ms']:.1f}; {tp['errors'] + tg['errors']} errors",
                "-",
                "-",
                "what-if (not the target run)",
                None,
            )
        )
    ratios = {
        "post_p50_over_healthz": round(post["p50_ms"] / health["p50_ms"], 2),
        "get_p50_over_healthz": round(get["p50_ms"] / health["p50_ms"], 2),
        "p99_over_target": round(p99 / TARGET_P99_MS, 2),
    }
    return common.document(
        "api",
        results={k: v for k, v in runs.items() if k != "healthz"},
        baseline={"healthz": health},
        ratios=ratios,
        targets={"p99_ms": TARGET_P99_MS, "errors": 0, "rate_per_s": RATE},
        met=met,
        rows=rows,
        machine_info={**machine, "farm": facts},
        notes=[
            f"load generator: {facts['generator']}; gunicorn sync workers: "
            f"{facts['web_workers']}; per-key rate limit raised for the bench "
            "(REV_RATE_LIMIT_RPS) because one key drives all 200 req/s",
            "the load generator, gunicorn, PostgreSQL and Redis share the same 2 cores",
        ],
        started=started,
    )


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--baseline-seconds", type=float, default=15.0)
    ap.add_argument("--tuned-seconds", type=float, default=20.0)
    ap.add_argument("--profile-seconds", type=float, default=10.0)
    ap.add_argument("--web-workers", type=int, default=2)
    args = ap.parse_args(argv)
    doc = run(args)
    print(f"met: {doc['met']}")
    return common.finish(doc, args)


if __name__ == "__main__":
    raise SystemExit(main())
