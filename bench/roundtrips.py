"""Count what one API request sends to PostgreSQL and Redis (run by bench/bench_api.py).

Run as a script (``python bench/roundtrips.py``) with ``PYTHONPATH`` naming the checkout to
measure, so the API benchmark counts the "before" code and the current code alike, in the
farm's environment (``DATABASE_URL``, ``REDIS_URL``), with ``REV_RT_TOKEN`` (an API key) and
``REV_RT_BODY`` (a POST /v1/jobs body, JSON). Prints one JSON object: per request kind, the
commands each service received.

It hooks the client libraries' send paths (psycopg's command and query sends, redis-py's
``send_packed_command``): private functions of the pinned versions, which is acceptable for
a measurement that only explains a figure and fails loudly if they move. Each counted
command is one round trip: none of these clients pipelines them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from typing import Any


def _hook() -> tuple[Counter[str], list[str]]:
    from psycopg import _connection_base, _cursor_base
    from redis import connection as redis_connection

    counts: Counter[str] = Counter()
    seen: list[str] = []

    def wrap(owner: Any, name: str, label: str, describe: Any) -> None:
        original = getattr(owner, name)

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[label] += 1
            seen.append(f"{label}: {describe(args)}")
            return original(self, *args, **kwargs)

        setattr(owner, name, counted)

    def sql(args: Any) -> str:
        query = args[0]
        text = getattr(query, "query", query)
        text = text.decode() if isinstance(text, bytes | bytearray) else str(text)
        return " ".join(text.split()[:3])

    def redis_cmd(args: Any) -> str:
        raw = args[0]
        raw = b"".join(raw) if isinstance(raw, list) else raw
        parts = raw.split(b"\r\n")
        return parts[2].decode(errors="replace") if len(parts) > 2 else "?"

    wrap(_connection_base.BaseConnection, "_exec_command", "postgresql", sql)
    wrap(_cursor_base.BaseCursor, "_execute_send", "postgresql", sql)
    wrap(_cursor_base.BaseCursor, "_send_query_prepared", "postgresql", sql)
    wrap(redis_connection.AbstractConnection, "send_packed_command", "redis", redis_cmd)
    return counts, seen


def main() -> int:
    counts, seen = _hook()
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="rev-rt-"))
    from web import create_app

    app = create_app()
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {os.environ['REV_RT_TOKEN']}"
    body = json.loads(os.environ["REV_RT_BODY"])
    job_id = ""
    for _ in range(8):  # warm: pools, prepared statements, the key's cache entry if any
        resp = client.post("/v1/jobs", json=body)
        assert resp.status_code == 202, resp.get_data(as_text=True)
        job_id = resp.get_json()["id"]
        client.get(f"/v1/jobs/{job_id}")
    out: dict[str, Any] = {}
    for kind, call in (
        ("post", lambda: client.post("/v1/jobs", json=body)),
        ("get", lambda: client.get(f"/v1/jobs/{job_id}")),
    ):
        counts.clear()
        seen.clear()
        status = call().status_code
        out[kind] = {"status": status, **dict(counts), "commands": list(seen)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
