"""API benchmark: wrk at a constant 200 req/s against gunicorn, POST and GET mixed.

Run: ``.venv/bin/python -m bench.bench_api [--seconds 60] [--json [OUT]]``.

The coordinator runs with the production config (``deploy/gunicorn.conf.py``, sync workers,
``--web-workers`` of them: 4, the config's default) on loopback, on an isolated farm
(bench/farm.py: its own PostgreSQL database, Redis db 13). No Celery worker runs: the
POSTed jobs' messages wait in Redis and are flushed after.

**Generator: wrk** (Debian package ``wrk``; C, epoll, one thread per connection, a small
fraction of a core at this rate) with ``bench/wrk/constant_rate.lua``, which gives it
wrk2's open schedule: request n is due at t0 + n / rate whatever the server does, and its
latency is counted from that slot, so a stall is charged to every request queued behind it
(latency corrected for coordinated omission). Debian ships neither wrk2 nor oha; ``hey -q``
paces each worker with a ticker that drops ticks when the server is slow and times each
request from its actual send, so its percentiles omit exactly the stalls this measures.
wrk's own (send-to-answer) percentiles are kept beside ours to show the difference.

The mix: POST /v1/jobs (a valid verify body, authenticated) and GET /v1/jobs/<id> of real
ids (made before the run, then the ids the POSTs return) alternately, 100 + 100 req/s.

Same-run figures beside it:

* baseline: ``GET /healthz`` (no database, no key) at the same rate: the floor that gunicorn,
  Flask and loopback set on this machine at that moment;
* before: the same mix, shorter, against the code of ``--before`` (the commit before the
  fixes in bench/findings.md, extracted with ``git archive``) on the same farm;
* CPU per request of the web workers, the farm's PostgreSQL backends and Redis (psutil),
  and the round trips one request makes (bench/roundtrips.py), before and after;
* what-if: the same mix on gthread workers (``-k gthread``);
* py-spy profiles of both servers (bench/profiling.py), top frames in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.farm import BenchFarm, verify_body

TARGET_P99_MS = 25.0
RATE = 200
THREADS = 16  # wrk threads = connections; even, so POSTs and GETs alternate globally
LUA = common.ROOT / "bench" / "wrk" / "constant_rate.lua"
# main before the API fixes (key cache, reads without a transaction, idle-only pings, the
# folder walk): the "before" of the report
BEFORE_REV = "9c51ca71502f597c3761d1a730ac4a7683ca70b0"
KINDS = {"P": "post", "G": "get", "H": "healthz"}


# ----------------------------------------------------------------------------- the generator
def _stats(lat_ms: list[float]) -> dict[str, Any]:
    if not lat_ms:
        return {"n": 0}
    return {
        "n": len(lat_ms),
        "p50_ms": round(common.pct(lat_ms, 50) or 0.0, 2),
        "p95_ms": round(common.pct(lat_ms, 95) or 0.0, 2),
        "p99_ms": round(common.pct(lat_ms, 99) or 0.0, 2),
        "max_ms": round(max(lat_ms), 1),
    }


def parse_wrk_output(text: str, seconds: float, keep: bool = False) -> dict[str, Any]:
    """The per-answer lines constant_rate.lua writes → percentiles, errors, achieved rate.

    ``keep``: also every latency, by kind (``latencies_ms``).
    """
    lat: dict[str, list[float]] = {}
    status: dict[str, dict[str, int]] = {}
    summary: dict[str, int] = {}
    uncorrected: dict[str, float] = {}
    lost = 0
    late_max_us = 0.0
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] in KINDS and len(parts) == 3:
            kind = KINDS[parts[0]]
            lat.setdefault(kind, []).append(float(parts[2]) / 1e3)
            codes = status.setdefault(kind, {})
            codes[parts[1]] = codes.get(parts[1], 0) + 1
        elif parts[0] == "summary":
            summary = {k: int(v) for k, v in (p.split("=") for p in parts[1:])}
        elif parts[0] == "wrk_uncorrected_us":
            uncorrected = {k: int(v) / 1e3 for k, v in (p.split("=") for p in parts[1:])}
        elif parts[0] == "thread":
            fields = dict(p.split("=") for p in parts[1:])
            lost += int(fields["lost"])
            late_max_us = max(late_max_us, float(fields["late_max_us"]))
    socket_errors = sum(summary.get(k, 0) for k in ("connect", "read", "write", "timeout"))
    out: dict[str, Any] = {}
    answered = 0
    bad_total = 0
    for kind, values in lat.items():
        ok = 202 if kind == "post" else 200
        bad = sum(n for code, n in status[kind].items() if int(code) != ok)
        bad_total += bad
        answered += len(values)
        out[kind] = {**_stats(values), "status": status[kind], "errors": bad}
    out["all"] = _stats([x for values in lat.values() for x in values])
    out["errors"] = bad_total + socket_errors + lost
    out["socket_errors"] = socket_errors
    out["lost"] = lost
    out["scheduled_rps"] = None
    out["achieved_rps"] = round(answered / seconds, 1) if seconds else None
    out["send_late_max_ms"] = round(late_max_us / 1e3, 1)
    out["wrk_uncorrected_ms"] = uncorrected
    if keep:
        out["latencies_ms"] = lat
    return out


def run_wrk(
    url: str,
    rate: int,
    seconds: float,
    *,
    mode: str,
    workdir: Path,
    token: str | None = None,
    body: dict[str, Any] | None = None,
    ids: list[str] | None = None,
    threads: int = THREADS,
    keep: bool = False,
) -> dict[str, Any]:
    """One constant-rate wrk run; the parsed figures plus the generator's own CPU."""
    out = workdir / f"wrk-{mode}-{time.monotonic_ns()}.txt"
    env = {
        **os.environ,
        "REV_WRK_RATE": str(rate),
        "REV_WRK_THREADS": str(threads),
        "REV_WRK_MODE": mode,
        "REV_WRK_OUT": str(out),
    }
    if mode == "jobs":
        (workdir / "body.json").write_text(json.dumps(body))
        (workdir / "ids.txt").write_text("\n".join(ids or []) + "\n")
        env.update(
            REV_WRK_TOKEN=token or "",
            REV_WRK_BODY=str(workdir / "body.json"),
            REV_WRK_IDS=str(workdir / "ids.txt"),
        )
    argv = [
        "wrk", "-t", str(threads), "-c", str(threads), "-d", f"{seconds:g}s",
        "--timeout", "10s", "-s", str(LUA), url,
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    result = parse_wrk_output(out.read_text(), seconds, keep)
    result["scheduled_rps"] = rate
    result["generator_cpu_s"] = round(
        (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2
    )
    out.unlink()
    return result


# ----------------------------------------------------------------------------- CPU per request
class CpuMeter:
    """CPU seconds of the web workers, the farm database's backends and the Redis server."""

    def __init__(self, web_pid: int, database: str | None, redis_url: str) -> None:
        import psutil

        self.psutil = psutil
        self.web_pid = web_pid
        self.database = database
        self.redis_pid: int | None = None
        try:
            import redis

            pid = int(redis.Redis.from_url(redis_url).info("server")["process_id"])
            psutil.Process(pid).cpu_times()
            self.redis_pid = pid
        except Exception:  # noqa: BLE001 - a remote Redis: not counted
            self.redis_pid = None

    def _cpu(self, pids: list[int]) -> dict[int, float]:
        out = {}
        for pid in pids:
            try:
                t = self.psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
            except self.psutil.Error:
                pass
        return out

    def _pg_pids(self) -> list[int]:
        if not self.database:
            return []
        import psycopg

        from bench.farm import _pg_admin_url

        with psycopg.connect(_pg_admin_url(), autocommit=True, connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,)
            ).fetchall()
        return [int(r[0]) for r in rows]

    def snapshot(self) -> dict[str, dict[int, float]]:
        try:
            web = [self.web_pid, *(c.pid for c in self.psutil.Process(self.web_pid).children())]
        except self.psutil.Error:
            web = []
        return {
            "web": self._cpu(web),
            "postgresql": self._cpu(self._pg_pids()),
            "redis": self._cpu([self.redis_pid] if self.redis_pid else []),
        }

    @staticmethod
    def per_request(
        start: dict[str, dict[int, float]], end: dict[str, dict[int, float]], requests: int
    ) -> dict[str, float]:
        """ms of CPU per request for each part (a process new since ``start`` counts whole)."""
        out = {}
        for part, now in end.items():
            used = sum(v - start[part].get(pid, 0.0) for pid, v in now.items())
            out[part] = round(1e3 * used / max(1, requests), 2)
        return out


# ----------------------------------------------------------------------------- one server
def _checkout(rev: str, dest: Path) -> str | None:
    """``git archive rev`` into ``dest``; None when done, else why it could not be."""
    try:
        archive = subprocess.run(
            ["git", "archive", rev], cwd=common.ROOT, capture_output=True, timeout=120, check=True
        )
        dest.mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot extract {rev[:12]}: {exc}"
    return None


def _roundtrips(farm: BenchFarm, root: Path, body: dict[str, Any]) -> dict[str, Any]:
    env = farm.process_env(
        PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        REV_RT_TOKEN=farm.token or "",
        REV_RT_BODY=json.dumps(body),
    )
    try:
        return common.run_json(
            [sys.executable, str(common.ROOT / "bench" / "roundtrips.py")],
            cwd=root,
            env=env,
            timeout=120,
        )
    except RuntimeError as exc:  # the figure is explanatory: the run goes on without it
        return {"error": str(exc)[-800:]}


def _measure_server(
    farm: BenchFarm,
    args: argparse.Namespace,
    body: dict[str, Any],
    ids: list[str],
    work: Path,
    seconds: float,
    *,
    root: Path = common.ROOT,
    extra_args: tuple[str, ...] = (),
    healthz: bool = False,
    profile: str | None = None,
) -> dict[str, Any]:
    """Start a coordinator, warm it, run the mix (and the baseline), stop it."""
    api = farm.start_web(workers=args.web_workers, root=root, extra_args=extra_args)
    web = next(p for p in farm.procs if p.name == "web")
    out: dict[str, Any] = {}
    try:
        # warm-up: every worker's imports, pools, prepared statements
        run_wrk(api, RATE // 4, 5, mode="jobs", workdir=work, token=farm.token, body=body, ids=ids)
        if healthz:
            out["healthz"] = run_wrk(f"{api}/healthz", RATE, args.baseline_seconds, mode="path",
                                     workdir=work)  # fmt: skip
        meter = CpuMeter(web.pid, farm._pg_db, farm.env["REDIS_URL"])
        start = meter.snapshot()
        out["mix"] = run_wrk(
            api, RATE, seconds, mode="jobs", workdir=work, token=farm.token, body=body, ids=ids
        )
        out["cpu_ms_per_request"] = meter.per_request(
            start, meter.snapshot(), out["mix"]["all"].get("n", 0)
        )
        out["cpu_ms_per_request"]["generator"] = round(
            1e3 * out["mix"]["generator_cpu_s"] / max(1, out["mix"]["all"].get("n", 0)), 2
        )
        if profile and args.profile_seconds > 0:
            out["profile"] = _profile(farm, web.pid, api, body, ids, work, args, profile)
    finally:
        farm.stop(web)
    return out


def _profile(
    farm: BenchFarm,
    pid: int,
    api: str,
    body: dict[str, Any],
    ids: list[str],
    work: Path,
    args: argparse.Namespace,
    name: str,
) -> dict[str, Any]:
    from bench.profiling import PySpy, summarise

    out = common.PROFILES / f"api-{name}.txt"
    with PySpy(pid, out) as prof:
        run_wrk(api, RATE, args.profile_seconds, mode="jobs", workdir=work, token=farm.token,
                body=body, ids=ids)  # fmt: skip
    if prof.error:
        return {"error": prof.error}
    return {"file": str(out.relative_to(common.ROOT)), **summarise(out, focus="wsgi_app")}


# ----------------------------------------------------------------------------- the run
def config_worker_class(root: Path = common.ROOT) -> str:
    """The worker class deploy/gunicorn.conf.py sets (it only reads the environment)."""
    namespace: dict[str, Any] = {"__file__": str(root / "deploy" / "gunicorn.conf.py")}
    exec((root / "deploy" / "gunicorn.conf.py").read_text(), namespace)  # noqa: S102 - ours
    return str(namespace.get("worker_class", "sync"))


def _class_args(worker_class: str, threads: int) -> tuple[str, ...]:
    if worker_class == "gthread":
        return ("-k", "gthread", "--threads", str(threads))
    return ("-k", worker_class)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    machine = common.machine()
    if shutil.which("wrk") is None:
        raise SystemExit("bench_api: wrk not found (Debian package wrk; scripts/install_tools.sh)")
    from rev_tasks.testing.variants import build_tiny_causal_lm, copy_model

    deployed = config_worker_class()
    other = "gthread" if deployed != "gthread" else "sync"
    runs: dict[str, Any] = {"worker_class": deployed, "other_class": other}
    with BenchFarm("api") as farm, tempfile.TemporaryDirectory(prefix="rev-api-") as tmp:
        work = Path(tmp)
        ref = build_tiny_causal_lm(farm.models / "gpt2-a", "gpt2", seed=0)
        cand = copy_model(ref, farm.models / "gpt2-a-copy")
        body = verify_body(ref, cand, max_challenges=64)
        farm.start_web(workers=1)
        http = farm.session()
        ids = [farm.submit(http, body) for _ in range(20)]
        farm.stop(next(p for p in farm.procs if p.name == "web"))

        # the target run: the config as committed
        runs["after"] = _measure_server(
            farm, args, body, ids, work, args.seconds, healthz=True, profile="after",
            extra_args=_class_args(deployed, args.threads),
        )  # fmt: skip
        print(f"after, {deployed}: {_line(runs['after']['mix'])}", flush=True)
        runs["roundtrips_after"] = _roundtrips(farm, common.ROOT, body)
        if args.other_seconds > 0:
            runs["other"] = _measure_server(
                farm, args, body, ids, work, args.other_seconds,
                extra_args=_class_args(other, args.threads),
            )  # fmt: skip
            print(f"after, {other}: {_line(runs['other']['mix'])}", flush=True)

        # before/after of the code on gthread workers, where a connected client that has
        # not sent yet does not hold a worker (see the notes)
        before_root = work / "before"
        why = _checkout(args.before, before_root) if args.before_seconds > 0 else "skipped"
        if why is None:
            runs["before"] = _measure_server(
                farm, args, body, ids, work, args.before_seconds, root=before_root,
                profile="before", extra_args=_class_args("gthread", args.threads),
            )  # fmt: skip
            print(f"before ({args.before[:12]}), gthread: {_line(runs['before']['mix'])}")
            runs["roundtrips_before"] = _roundtrips(farm, before_root, body)
        else:
            runs["before_skipped"] = why
        facts = dict(farm.facts, web_workers=args.web_workers, threads=args.threads)
    return _document(runs, facts, machine, args, started)


def _line(mix: dict[str, Any]) -> str:
    post, get = mix.get("post", {}), mix.get("get", {})
    return (
        f"POST p50/p99 {post.get('p50_ms')}/{post.get('p99_ms')} ms, GET p50/p99 "
        f"{get.get('p50_ms')}/{get.get('p99_ms')} ms, {mix['errors']} errors, "
        f"{mix['achieved_rps']}/s of {mix['scheduled_rps']}/s"
    )


def _pcts(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "no answers"
    return f"{s['p50_ms']:.1f} / {s['p95_ms']:.1f} / {s['p99_ms']:.1f} / {s['max_ms']:.0f}"


def _p50_99(mix: dict[str, Any], kind: str) -> str:
    d = mix.get(kind) or {}
    return f"{d['p50_ms']:.1f} / {d['p99_ms']:.1f}" if d.get("n") else "no answers"


def _rt(rt: dict[str, Any], kind: str) -> str:
    d = rt.get(kind) or {}
    if "error" in rt or not d:
        return "?"
    return f"{d.get('postgresql', 0)} PostgreSQL + {d.get('redis', 0)} Redis"


def _cpu(c: dict[str, float]) -> str:
    return (
        f"web {c['web']:.2f}, PostgreSQL {c['postgresql']:.2f}, Redis {c['redis']:.2f} "
        f"(wrk {c['generator']:.2f})"
    )


def _miss_cause(runs: dict[str, Any], health: dict[str, Any], load: float | None) -> str:
    after = runs["after"]
    mix, cpu = after["mix"], after["cpu_ms_per_request"]
    cores = (cpu["web"] + cpu["postgresql"] + cpu["redis"] + cpu["generator"]) * RATE / 1e3
    total = common.machine()["cores"]
    parts = [
        f"the mix needs {cores:.2f} of this machine's {total} cores at {RATE}/s (CPU per "
        f"request x rate: {100 * cores / total:.0f}% busy), so requests queue behind one "
        f"another and the tail grows with the CPU each one costs here; load average {load} "
        "at the end, this run's own server, database and generator included"
    ]
    if mix["achieved_rps"] < 0.98 * RATE:
        parts.append(f"the server answered {mix['achieved_rps']:.0f}/s of {RATE}/s: saturated")
    other = runs.get("other")
    if (
        runs["worker_class"] == "sync"
        and other
        and other["mix"]["achieved_rps"] > mix["achieved_rps"]
    ):
        parts.append(
            "sync workers wait on connected clients that have not sent yet (see the notes): "
            f"gthread workers, same code, served {other['mix']['achieved_rps']:.0f}/s, p99 "
            f"{other['mix']['all'].get('p99_ms', 0):.0f} ms"
        )
    if health.get("p99_ms", 0) > TARGET_P99_MS:
        parts.append(
            f"GET /healthz alone (no database, no key) has p99 {health['p99_ms']:.0f} ms "
            "at the same rate: the machine's floor is above the target"
        )
    return "; ".join(parts)


def _document(
    runs: dict[str, Any],
    facts: dict[str, Any],
    machine: dict[str, Any],
    args: argparse.Namespace,
    started: float,
) -> dict[str, Any]:
    after = runs["after"]
    mix, health = after["mix"], after["healthz"]["all"]
    post, get = mix.get("post", {"n": 0}), mix.get("get", {"n": 0})
    p99 = max(post.get("p99_ms", float("inf")), get.get("p99_ms", float("inf")))
    met_p99 = p99 <= TARGET_P99_MS
    met_err = mix["errors"] == 0
    load = common.loadavg()
    cause = "" if met_p99 else f" (missed: {_miss_cause(runs, health, load)})"
    head = f"constant {RATE} req/s for {args.seconds:g} s, p50 / p95 / p99 / max ms"
    hz = f"GET /healthz @ {RATE}/s: {_pcts(health)}"
    rows = [
        common.row(
            f"POST /v1/jobs, half of a {head}",
            f"{_pcts(post)}; {post.get('errors', '?')} errors of {post.get('n', 0)}{cause}",
            hz,
            common.GUIDE["api"],
            f"p99 <= {TARGET_P99_MS:g} ms",
            post.get("p99_ms", 1e9) <= TARGET_P99_MS,
        ),
        common.row(
            "GET /v1/jobs/<id> (real ids), the other half, same run",
            f"{_pcts(get)}; {get.get('errors', '?')} errors of {get.get('n', 0)}"
            + (" (missed: as above)" if get.get("p99_ms", 1e9) > TARGET_P99_MS else ""),
            "(same baseline)",
            common.GUIDE["api"],
            f"p99 <= {TARGET_P99_MS:g} ms",
            get.get("p99_ms", 1e9) <= TARGET_P99_MS,
        ),
        common.row(
            "whole mix: errors (non-2xx, socket errors, lost) and achieved rate",
            f"{mix['errors']} errors; {mix['achieved_rps']:.0f}/s of {RATE}/s",
            f"healthz: {after['healthz']['errors']} errors, "
            f"{after['healthz']['achieved_rps']:.0f}/s",
            "-",
            "0 errors",
            met_err,
        ),
        common.row(
            "wrk's own send-to-answer p50 / p99 of the mix (not corrected, for comparison)",
            f"{mix['wrk_uncorrected_ms'].get('p50', 0):.1f} / "
            f"{mix['wrk_uncorrected_ms'].get('p99', 0):.1f}",
            f"corrected: {mix['all'].get('p50_ms', 0):.1f} / {mix['all'].get('p99_ms', 0):.1f}",
        ),
        common.row(
            "CPU per request of the mix (ms)",
            _cpu(after["cpu_ms_per_request"]),
            f"gthread before: {_cpu(runs['before']['cpu_ms_per_request'])}"
            if "before" in runs
            else "-",
        ),
    ]
    rt_a, rt_b = runs.get("roundtrips_after", {}), runs.get("roundtrips_before", {})
    rows.append(
        common.row(
            "round trips per request: POST | GET",
            f"{_rt(rt_a, 'post')} | {_rt(rt_a, 'get')}",
            f"before: {_rt(rt_b, 'post')} | {_rt(rt_b, 'get')}" if rt_b else "-",
        )
    )
    if "other" in runs:
        o = runs["other"]
        rows.append(
            common.row(
                f"what-if: {runs['other_class']} workers, same code, {args.other_seconds:g} s: "
                "POST | GET p50 / p95 / p99 / max ms",
                f"{_pcts(o['mix'].get('post', {}))} | {_pcts(o['mix'].get('get', {}))}; "
                f"{o['mix']['errors']} errors; {o['mix']['achieved_rps']:.0f}/s",
                f"CPU {_cpu(o['cpu_ms_per_request'])}",
                "-",
                "what-if (not the target run)",
            )
        )
    gthread_after = runs["after"] if runs["worker_class"] == "gthread" else runs.get("other")
    if "before" in runs and gthread_after is not None:
        bm, am = runs["before"]["mix"], gthread_after["mix"]
        rows.append(
            common.row(
                f"code before ({args.before[:7]}) -> after, gthread workers: "
                "POST | GET p50 / p99 ms; achieved rate",
                f"{_p50_99(bm, 'post')} -> {_p50_99(am, 'post')} | "
                f"{_p50_99(bm, 'get')} -> {_p50_99(am, 'get')}; "
                f"{bm['achieved_rps']:.0f} -> {am['achieved_rps']:.0f}/s; "
                f"errors {bm['errors']} -> {am['errors']}",
                f"CPU before: {_cpu(runs['before']['cpu_ms_per_request'])}",
                "-",
                "before/after of the fixes",
            )
        )
    for name in ("before", "after"):
        prof = runs.get(name, {}).get("profile") or {}
        if prof.get("inclusive_pct"):
            top = ", ".join(f"{n.split(' (')[0]} {v:.0f}%" for n, v in prof["inclusive_pct"][:6])
            leaf = ", ".join(f"{n.split(' (')[0]} {v:.0f}%" for n, v in prof["self_pct"][:4])
            rows.append(
                common.row(
                    f"py-spy, {name}: top frames (inclusive) | where samples land (self)",
                    f"{top} | {leaf}",
                    f"{prof['samples']} samples",
                )
            )
    ratios = {
        "post_p50_over_healthz": round(
            post.get("p50_ms", 0) / max(health.get("p50_ms", 1), 1e-6), 2
        ),
        "get_p50_over_healthz": round(get.get("p50_ms", 0) / max(health.get("p50_ms", 1), 1e-6), 2),
        "p99_over_target": round(p99 / TARGET_P99_MS, 2),
    }
    if "before" in runs and gthread_after is not None:
        b, a = runs["before"], gthread_after
        ratios["gthread_p99_before_over_after"] = round(
            b["mix"]["all"].get("p99_ms", 0) / max(a["mix"]["all"].get("p99_ms", 0), 1e-6), 2
        )
        ratios["gthread_web_cpu_before_over_after"] = round(
            b["cpu_ms_per_request"]["web"] / max(a["cpu_ms_per_request"]["web"], 1e-6), 2
        )
    notes = [
        f"generator: wrk {_wrk_version()} (Debian) + bench/wrk/constant_rate.lua: a constant "
        f"{RATE} req/s on {THREADS} connections, each request due at t0 + n/rate and timed "
        "from that slot (corrected for coordinated omission, as wrk2 does); Debian has no "
        "wrk2 or oha, and hey -q times from the actual send",
        f"gunicorn with deploy/gunicorn.conf.py, {facts['web_workers']} workers, class "
        f"{runs['worker_class']} (the config's) for the target run; gthread runs use "
        f"{facts['threads']} threads per worker; per-key rate limit raised for the bench "
        "(REV_RATE_LIMIT_RPS): one key drives all of it",
        "sync workers and this generator: wrk reconnects as soon as a sync worker closes "
        "the connection (it does after every answer) and sends when the slot comes, so a "
        "sync worker that accepted it waits idle for the request (up to one slot, "
        f"{THREADS}/{RATE} s) while due requests queue; gthread workers poll connections and "
        "take only those with a request. Behind the deployment's nginx, which sends gunicorn "
        "only whole requests, sync workers do not see this",
        "CPU per request: psutil CPU times of the web workers, the farm database's PostgreSQL "
        "backends and the Redis server over the run, divided by the answers; wrk's from "
        "getrusage",
        "round trips: bench/roundtrips.py counts the commands one warm request sends "
        "(Flask test client, same farm), for the current code and the before commit",
        "wrk, gunicorn, PostgreSQL and Redis share the machine's cores",
    ]
    if "before_skipped" in runs:
        notes.append(f"before run: {runs['before_skipped']}")
    return common.document(
        "api",
        results=runs,
        baseline={"healthz": after["healthz"]},
        ratios=ratios,
        targets={"p99_ms": TARGET_P99_MS, "errors": 0, "rate_per_s": RATE},
        met={"p99_ms": met_p99, "errors": met_err},
        rows=rows,
        machine_info={**machine, "farm": facts},
        notes=notes,
        started=started,
    )


def _wrk_version() -> str:
    try:
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    first = (out.stdout or out.stderr).split()
    return first[1] if len(first) > 1 else "?"


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--baseline-seconds", type=float, default=20.0)
    ap.add_argument("--before", default=BEFORE_REV, help="commit to measure as 'before'")
    ap.add_argument("--before-seconds", type=float, default=30.0, help="0: no before run")
    ap.add_argument(
        "--other-seconds", type=float, default=30.0, help="the other worker class; 0: none"
    )
    ap.add_argument("--threads", type=int, default=4, help="threads per gthread worker")
    ap.add_argument("--profile-seconds", type=float, default=10.0)
    ap.add_argument("--web-workers", type=int, default=4)
    args = ap.parse_args(argv)
    doc = run(args)
    print(f"met: {doc['met']}")
    return common.finish(doc, args)


if __name__ == "__main__":
    raise SystemExit(main())
