"""``rev submit|status|wait|cancel|jobs|models``: the farm's commands, over its HTTP API.

Exit statuses: 0 success (for ``wait``: the job succeeded), 1 the job failed or was
cancelled, 2 the request could not be made (connection error, or the API refused it: the
one-line reason is on stderr), 3 ``wait`` timed out. ``submit`` sends an Idempotency-Key
(a fresh UUID per invocation) and retries a submit that got no answer with the same key,
so the retry returns the job the first try may have created.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from rev_tasks.cli.common import over_http
from rev_tasks.client import TERMINAL, ClientError, FarmClient
from rev_tasks.core.compat import COMPUTE_DTYPES as JOB_DTYPES
from rev_tasks.inference.budget import memory_budget_arg
from rev_tasks.jobs import STATUSES

EXIT_OK, EXIT_JOB_FAILED = 0, 1


def model_ref(value: str) -> Any:
    """A registered id stays a string; anything that looks like a path becomes {"path": abs}."""
    looks_like_path = value.startswith(("/", ".", "~")) or os.sep in value or os.path.isdir(value)
    if looks_like_path:
        return {"path": os.path.abspath(os.path.expanduser(value))}
    return value


def progress_bar(stream: Any = None) -> Any:
    """A one-line progress bar on stderr, redrawn in place."""
    stream = stream or sys.stderr

    def show(doc: dict[str, Any]) -> None:
        done = doc["progress"]["challenges_done"]
        total = max(1, doc["progress"]["challenges_max"])
        width = 30
        filled = min(width, int(width * done / total))
        bar = "#" * filled + "." * (width - filled)
        line = f"\r[{bar}] {done}/{total} {doc['status']} ({doc.get('stage', '')})"
        waiting = doc["progress"].get("waiting") or {}
        if doc["status"] == "queued" and waiting and not waiting.get("done"):
            line += f" waiting for {len(waiting.get('pending') or [])} fingerprint(s)"
        stream.write(line.ljust(70))
        if doc["status"] in TERMINAL:
            stream.write("\n")
        stream.flush()

    return show


def _print(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=False))


def _summary(doc: dict[str, Any]) -> str:
    result = doc.get("result") or {}
    if doc["status"] == "failed":
        err = doc.get("error") or {}
        return f"{doc['id']} failed: {err.get('code')}: {err.get('message')}"
    if doc["status"] == "cancelled":
        p = doc["progress"]
        return (
            f"{doc['id']} cancelled after {p['challenges_done']}/{p['challenges_max']} challenges"
        )
    if doc["kind"] == "identify" and doc["status"] == "succeeded":
        votes = (result.get("consensus") or {}).get("agreeing")
        return (
            f"{doc['id']} succeeded: best match {result.get('best')} ({result.get('verdict')}); "
            f"{result.get('compared')} compared, {result.get('incompatible', 0)} incompatible, "
            f"{len(result.get('unavailable') or [])} unavailable ({votes}/5 validators agree)"
        )
    if doc["status"] == "succeeded":
        votes = (result.get("consensus") or {}).get("agreeing")
        return (
            f"{doc['id']} succeeded: {result.get('verdict')} after "
            f"{result.get('challenges_used')} challenges ({votes}/5 validators agree)"
        )
    p = doc["progress"]
    return f"{doc['id']} {doc['status']} ({doc['stage']}): {p['challenges_done']}/{p['challenges_max']}"


def cmd_submit(args: argparse.Namespace, client: FarmClient) -> int:
    body: dict[str, Any] = {
        "kind": "identify" if args.identify else "verify",
        "candidate": model_ref(args.candidate),
        "tolerance": args.tolerance,
        "alpha": args.alpha,
        "max_challenges": args.max_challenges,
        "device": args.device,
    }
    if args.dtype != "float32":  # the server's default; a plain request stays as before
        body["dtype"] = args.dtype
    if args.batch_size:
        body["batch_size"] = args.batch_size
    if args.memory_budget:
        body["memory_budget_mb"] = args.memory_budget
    if not args.identify:
        if not args.reference:
            raise ClientError("verify needs --reference (a model id or folder), or use --identify")
        body["reference"] = model_ref(args.reference)
    accepted = client.submit(body)
    if not args.wait:
        print(json.dumps(accepted) if args.json else accepted["id"])
        return EXIT_OK
    return _wait_and_report(client, accepted["id"], args)


def _wait_and_report(client: FarmClient, job_id: str, args: argparse.Namespace) -> int:
    show = None if args.quiet else progress_bar()
    doc = client.wait(job_id, timeout=args.timeout, interval=args.interval, progress=show)
    if args.json:
        _print(doc)
    else:
        print(_summary(doc))
    return EXIT_OK if doc["status"] == "succeeded" else EXIT_JOB_FAILED


def _show(doc: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        _print(doc)
    else:
        print(_summary(doc))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, client: FarmClient) -> int:
    return _show(client.job(args.job_id), args)


def cmd_wait(args: argparse.Namespace, client: FarmClient) -> int:
    return _wait_and_report(client, args.job_id, args)


def cmd_cancel(args: argparse.Namespace, client: FarmClient) -> int:
    return _show(client.cancel(args.job_id), args)


def cmd_jobs(args: argparse.Namespace, client: FarmClient) -> int:
    page = client.jobs(limit=args.limit, cursor=args.cursor, status=args.status)
    if args.json:
        _print(page)
        return EXIT_OK
    for doc in page["jobs"]:
        print(_summary(doc))
    if page.get("next_cursor"):
        print(f"more: rev jobs --cursor {page['next_cursor']}", file=sys.stderr)
    return EXIT_OK


def cmd_models(args: argparse.Namespace, client: FarmClient) -> int:
    if args.action == "register":
        if not args.model_id or not args.path:
            raise ClientError("usage: rev models register ID PATH")
        path = os.path.abspath(os.path.expanduser(args.path))
        doc = client.register_model(args.model_id, path, dtype=args.dtype)
        if args.wait:
            deadline = time.monotonic() + (args.timeout or 3600)
            while doc["status"] == "pending":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"model {args.model_id} still pending")
                time.sleep(args.interval)
                doc = client.model(args.model_id)
        _print(doc)
        return EXIT_OK if doc["status"] != "failed" else EXIT_JOB_FAILED
    if args.action == "show":
        if not args.model_id:
            raise ClientError("usage: rev models show ID")
        _print(client.model(args.model_id))
        return EXIT_OK
    docs = client.models()["models"]
    if args.json:
        _print(docs)
    else:
        for m in docs:
            print(f"{m['id']}\t{m['status']}\t{m.get('dtype', 'float32')}\t{m['path']}")
    return EXIT_OK


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-url", default=None, help="coordinator URL (default $REV_API_URL)")
    p.add_argument("--json", action="store_true", help="print the JSON document")


def _waiting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=None, help="give up after SECONDS (exit 3)")
    p.add_argument("--interval", type=float, default=0.5, help="poll every SECONDS")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_commands(subparsers: Any) -> None:
    """Add the farm client commands to the ``rev`` parser."""
    s = subparsers.add_parser("submit", help="submit a verify or identify job to the farm")
    s.add_argument("candidate", help="candidate: registered model id or model folder")
    s.add_argument("--reference", "-r", help="reference: registered model id or model folder")
    s.add_argument("--identify", action="store_true", help="rank registered models instead")
    s.add_argument("--tolerance", choices=("exact", "precision"), default="exact")
    s.add_argument("--alpha", type=float, default=0.01)
    s.add_argument("--max-challenges", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    s.add_argument(
        "--dtype",
        choices=JOB_DTYPES,
        default="float32",
        help="compute dtype of the job's models (as rev verify --dtype)",
    )
    s.add_argument(
        "--memory-budget",
        type=memory_budget_arg,
        help="run the models layer by layer within e.g. 512MB (default: the worker's)",
    )
    s.add_argument("--wait", action="store_true", help="wait for the result (exit 0/1)")
    _common(s)
    _waiting(s)
    s.set_defaults(func=over_http(cmd_submit))

    st = subparsers.add_parser("status", help="show a farm job")
    st.add_argument("job_id")
    _common(st)
    st.set_defaults(func=over_http(cmd_status))

    w = subparsers.add_parser("wait", help="wait for a farm job (exit 0 succeeded, 1 failed)")
    w.add_argument("job_id")
    _common(w)
    _waiting(w)
    w.set_defaults(func=over_http(cmd_wait))

    c = subparsers.add_parser(
        "cancel", help="cancel a queued or running farm job (again: the same answer)"
    )
    c.add_argument("job_id")
    _common(c)
    c.set_defaults(func=over_http(cmd_cancel))

    j = subparsers.add_parser("jobs", help="list farm jobs, newest first")
    j.add_argument("--limit", type=int, default=20)
    j.add_argument("--cursor", default=None)
    j.add_argument("--status", choices=STATUSES)
    _common(j)
    j.set_defaults(func=over_http(cmd_jobs))

    m = subparsers.add_parser("models", help="list, show or register the farm's reference models")
    m.add_argument("action", nargs="?", choices=("list", "show", "register"), default="list")
    m.add_argument("model_id", nargs="?")
    m.add_argument("path", nargs="?")
    m.add_argument("--wait", action="store_true", help="register: wait for the fingerprint")
    m.add_argument(
        "--dtype",
        choices=JOB_DTYPES,
        default="float32",
        help="register: compute the fingerprint in this dtype (jobs against it must match)",
    )
    _common(m)
    _waiting(m)
    m.set_defaults(func=over_http(cmd_models))
