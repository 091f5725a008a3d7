"""HTTP client for the farm and its ``rev`` subcommands: submit, status, wait, jobs, models.

The coordinator is found at ``REV_API_URL`` (default ``http://127.0.0.1:8000``); the API key
comes from ``REV_API_KEY``, else the file named by ``REV_API_KEY_FILE``, else ``.rev/api-key``
(the development key ``make up`` writes) in the current folder or the repository. Exit
statuses: 0 success (for ``wait``: the job succeeded), 1 the job failed, 2 the request could
not be made (connection error, or the API refused it: the one-line reason is on stderr),
3 ``wait`` timed out. Model paths are sent as absolute paths and resolved on the server, so
they must name folders under the farm's ``REV_MODEL_ROOTS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rev_tasks.settings import api_url

EXIT_OK, EXIT_JOB_FAILED, EXIT_REQUEST, EXIT_TIMEOUT = 0, 1, 2, 3
TERMINAL = ("succeeded", "failed")


class ClientError(Exception):
    """The request failed; ``str()`` is one line for the user."""


def find_api_key() -> str | None:
    """The key the CLI sends: ``REV_API_KEY``, ``REV_API_KEY_FILE`` or ``.rev/api-key``.

    Read from the environment or a file only (never a command-line argument, which other
    users can read in ``ps``).
    """
    token = os.environ.get("REV_API_KEY", "").strip()
    if token:
        return token
    named = os.environ.get("REV_API_KEY_FILE", "").strip()
    candidates = (
        [Path(named).expanduser()]
        if named
        else [
            Path.cwd() / ".rev" / "api-key",
            Path(__file__).resolve().parents[1] / ".rev" / "api-key",
        ]
    )
    for path in candidates:
        try:
            token = path.read_text().strip()
        except OSError:
            continue
        if token:
            return token
    return None


class FarmClient:
    """A small typed wrapper over the JSON API."""

    def __init__(
        self, base_url: str | None = None, timeout: float = 15.0, api_key: str | None = None
    ) -> None:
        self.base_url = (base_url or api_url()).rstrip("/")
        self.timeout = timeout
        self.api_key = api_key if api_key is not None else find_api_key()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        import requests

        url = f"{self.base_url}{path}"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            resp = requests.request(method, url, json=body, timeout=self.timeout, headers=headers)
        except requests.RequestException as exc:
            reason = type(exc).__name__
            raise ClientError(f"cannot reach the farm at {self.base_url} ({reason})") from exc
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            err = (data or {}).get("error") if isinstance(data, dict) else None
            if resp.status_code == 401 and not self.api_key:
                raise ClientError(
                    "401: no API key (set REV_API_KEY, or run `make up` to create .rev/api-key)"
                )
            if err:
                raise ClientError(f"{resp.status_code} {err.get('code')}: {err.get('message')}")
            raise ClientError(f"{resp.status_code} from {url}")
        return data

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/v1/jobs", body)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def jobs(self, limit: int = 20, cursor: str | None = None, status: str | None = None) -> Any:
        query = f"?limit={limit}"
        if cursor:
            query += f"&cursor={cursor}"
        if status:
            query += f"&status={status}"
        return self._request("GET", f"/v1/jobs{query}")

    def transcript(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/transcript")

    def certificate(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/certificate")

    def register_model(self, model_id: str, path: str) -> dict[str, Any]:
        return self._request("POST", "/v1/models", {"id": model_id, "path": path})

    def model(self, model_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{model_id}")

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/v1/models")

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        progress: Any = None,
    ) -> dict[str, Any]:
        """Poll until the job is succeeded or failed; ``TimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            doc = self.job(job_id)
            if progress is not None:
                progress(doc)
            if doc["status"] in TERMINAL:
                return doc
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {doc['status']} after {timeout}s")
            time.sleep(interval)


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
    if doc["kind"] == "identify" and doc["status"] == "succeeded":
        return f"{doc['id']} succeeded: best match {result.get('best')} ({result.get('verdict')})"
    if doc["status"] == "succeeded":
        votes = (result.get("consensus") or {}).get("agreeing")
        return (
            f"{doc['id']} succeeded: {result.get('verdict')} after "
            f"{result.get('challenges_used')} challenges ({votes}/5 validators agree)"
        )
    p = doc["progress"]
    return f"{doc['id']} {doc['status']} ({doc['stage']}): {p['challenges_done']}/{p['challenges_max']}"


def _run(fn: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(fn(args, FarmClient(args.api_url)) or 0)
        except ClientError as exc:
            print(f"rev: {exc}", file=sys.stderr)
            return EXIT_REQUEST
        except TimeoutError as exc:
            print(f"rev: {exc}", file=sys.stderr)
            return EXIT_TIMEOUT

    return wrapper


def cmd_submit(args: argparse.Namespace, client: FarmClient) -> int:
    body: dict[str, Any] = {
        "kind": "identify" if args.identify else "verify",
        "candidate": model_ref(args.candidate),
        "tolerance": args.tolerance,
        "alpha": args.alpha,
        "max_challenges": args.max_challenges,
        "device": args.device,
    }
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


def cmd_status(args: argparse.Namespace, client: FarmClient) -> int:
    doc = client.job(args.job_id)
    if args.json:
        _print(doc)
    else:
        print(_summary(doc))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace, client: FarmClient) -> int:
    return _wait_and_report(client, args.job_id, args)


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
        doc = client.register_model(args.model_id, os.path.abspath(os.path.expanduser(args.path)))
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
            print(f"{m['id']}\t{m['status']}\t{m['path']}")
    return EXIT_OK


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-url", default=None, help="coordinator URL (default $REV_API_URL)")
    p.add_argument("--json", action="store_true", help="print the JSON document")


def _waiting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=None, help="give up after SECONDS (exit 3)")
    p.add_argument("--interval", type=float, default=0.5, help="poll every SECONDS")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_commands(subparsers: Any) -> None:
    """Add the farm client commands to the ``rev`` CLI (called by rev_tasks.cli)."""
    from rev_tasks.inference.budget import memory_budget_arg

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
        "--memory-budget",
        type=memory_budget_arg,
        help="run the models layer by layer within e.g. 512MB (default: the worker's)",
    )
    s.add_argument("--wait", action="store_true", help="wait for the result (exit 0/1)")
    _common(s)
    _waiting(s)
    s.set_defaults(func=_run(cmd_submit))

    st = subparsers.add_parser("status", help="show a farm job")
    st.add_argument("job_id")
    _common(st)
    st.set_defaults(func=_run(cmd_status))

    w = subparsers.add_parser("wait", help="wait for a farm job (exit 0 succeeded, 1 failed)")
    w.add_argument("job_id")
    _common(w)
    _waiting(w)
    w.set_defaults(func=_run(cmd_wait))

    j = subparsers.add_parser("jobs", help="list farm jobs, newest first")
    j.add_argument("--limit", type=int, default=20)
    j.add_argument("--cursor", default=None)
    j.add_argument("--status", choices=("queued", "running", "succeeded", "failed"))
    _common(j)
    j.set_defaults(func=_run(cmd_jobs))

    m = subparsers.add_parser("models", help="list, show or register the farm's reference models")
    m.add_argument("action", nargs="?", choices=("list", "show", "register"), default="list")
    m.add_argument("model_id", nargs="?")
    m.add_argument("path", nargs="?")
    m.add_argument("--wait", action="store_true", help="register: wait for the fingerprint")
    _common(m)
    _waiting(m)
    m.set_defaults(func=_run(cmd_models))
