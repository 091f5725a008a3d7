"""``rev worker --gpu N | --cpu | --consensus | --endpoint``: a farm worker on the right queues.

GPU pinning is a deployment fact, decided here and nowhere else: ``--gpu N`` sets
``CUDA_VISIBLE_DEVICES=N`` (and ``REV_WORKER_DEVICE=cuda``) in the environment *before* the
Celery process, and so torch, starts, then execs ``celery -A rev_tasks worker`` consuming
that GPU's queue (``rev_tasks.queues.gpu_queue(N)``) with ``-c 1``: one process per device,
and task code never picks one. ``--endpoint`` runs the endpoint jobs' I/O: the ``endpoint``
queue on a threads pool (``-P threads -c 32``), since its tasks wait on HTTP. The workers
that run models (gpu, cpu, consensus) start with jemalloc preloaded when it is installed
(``REV_WORKER_ALLOCATOR``, rev_tasks/ops/memory.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rev_tasks.ops.memory import allocator_env
from rev_tasks.queues import (
    CONSENSUS_WORKER_QUEUES,
    ENDPOINT_WORKER_QUEUES,
    INFERENCE_CPU,
    gpu_queue,
)
from rev_tasks.settings import get_settings


def worker_command(
    role: str,
    gpu: int | None = None,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    hostname: str | None = None,
    extra_queues: tuple[str, ...] = (),
    environ: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment for one worker of ``role`` (cpu | gpu | consensus | endpoint)."""
    env = dict(os.environ if environ is None else environ)
    pool = "prefork"
    if role == "gpu":
        if gpu is None or gpu < 0:
            raise ValueError("--gpu needs a device index ≥ 0")
        count = get_settings().gpu_count
        if gpu >= count:
            raise ValueError(
                f"--gpu {gpu}: only {gpu_queue(0)}..{count - 1} are declared (REV_GPU_COUNT)"
            )
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        env["REV_WORKER_DEVICE"] = "cuda"
        queues: tuple[str, ...] = (gpu_queue(gpu),)
        concurrency = 1
        name = hostname or f"gpu{gpu}@%h"
    elif role == "consensus":
        env["REV_WORKER_DEVICE"] = "cpu"
        queues = CONSENSUS_WORKER_QUEUES
        concurrency = concurrency or 2
        name = hostname or "consensus@%h"
    elif role == "cpu":
        env["REV_WORKER_DEVICE"] = "cpu"
        queues = (INFERENCE_CPU,)
        concurrency = concurrency or 2
        name = hostname or "cpu@%h"
    elif role == "endpoint":
        env["REV_WORKER_DEVICE"] = "cpu"
        queues = ENDPOINT_WORKER_QUEUES
        pool = "threads"  # the tasks wait on HTTP: threads, not processes
        concurrency = concurrency or 32
        name = hostname or "endpoint@%h"
    else:
        raise ValueError(f"unknown worker role {role!r}")
    if role != "endpoint":  # the processes that run models: glibc's heap fragments
        env = allocator_env(env)
    queues = tuple(dict.fromkeys(queues + tuple(extra_queues)))
    argv = [
        sys.executable, "-m", "celery", "-A", "rev_tasks", "worker",
        "-P", pool, "-c", str(concurrency), "-Q", ",".join(queues), "-n", name,
        "-O", "fair", "-E", "--loglevel", loglevel,
    ]  # fmt: skip
    return argv, env


def _prepare_metrics_dir(env: dict[str, str], name: str) -> None:
    """Per-worker prometheus multiprocess directory, created before celery imports anything."""
    if env.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    safe = name.split("@")[0].replace("%", "")
    path = Path(get_settings().var_dir) / "prometheus" / f"worker-{safe}"
    try:
        from rev_tasks.ops.multiproc import prepare_multiproc_dir

        saved = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prepare_multiproc_dir(path))
        if saved is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    except (ImportError, RuntimeError, OSError):
        pass


def cmd_worker(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        role = "gpu"
    elif args.consensus:
        role = "consensus"
    elif args.endpoint:
        role = "endpoint"
    else:
        role = "cpu"
    try:
        argv, env = worker_command(
            role,
            gpu=args.gpu,
            concurrency=args.concurrency,
            loglevel=args.loglevel,
            hostname=args.hostname,
            extra_queues=tuple(q for q in (args.queues or "").split(",") if q),
        )
    except ValueError as exc:
        print(f"rev: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        shown = ("CUDA_VISIBLE_DEVICES", "REV_WORKER_DEVICE", "LD_PRELOAD")
        pinned = {k: env[k] for k in shown if k in env}
        prefix = " ".join(f"{k}={v}" for k, v in pinned.items())
        print(f"{prefix} {' '.join(argv)}".strip())
        return 0
    _prepare_metrics_dir(env, argv[argv.index("-n") + 1])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
    return 0  # pragma: no cover - exec does not return


def add_commands(subparsers: Any) -> None:
    """Add ``rev worker`` to the ``rev`` parser."""
    p = subparsers.add_parser("worker", help="start a farm worker (cpu, one GPU, or consensus)")
    role = p.add_mutually_exclusive_group()
    role.add_argument(
        "--gpu",
        type=int,
        metavar="N",
        help=f"pin to GPU N: only its queue ({gpu_queue(0)} for N=0), -c 1",
    )
    role.add_argument(
        "--cpu", action="store_true", help=f"CPU inference: queue {INFERENCE_CPU} (default)"
    )
    role.add_argument(
        "--consensus", action="store_true", help=f"validators: {','.join(CONSENSUS_WORKER_QUEUES)}"
    )
    role.add_argument(
        "--endpoint",
        action="store_true",
        help=f"endpoint jobs: {','.join(ENDPOINT_WORKER_QUEUES)} on a threads pool (-c 32)",
    )
    p.add_argument(
        "-c", "--concurrency", type=int, default=None, help="pool children (not with --gpu)"
    )
    p.add_argument("-Q", "--queues", default=None, help="extra queues to consume, comma-separated")
    p.add_argument("-n", "--hostname", default=None, help="worker node name (default ROLE@%%h)")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=cmd_worker)
