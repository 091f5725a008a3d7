"""HTTP client of the farm's coordinator, for ``rev``'s farm commands and ``make demo``.

The coordinator is found at ``REV_API_URL`` (default ``http://127.0.0.1:$REV_PORT``, port 8000
when ``REV_PORT`` is unset too: the port ``make up`` serves on); the API key
comes from ``REV_API_KEY``, else the file named by ``REV_API_KEY_FILE``, else ``.rev/api-key``
(the development key ``make up`` writes) in the current folder or the repository. Model paths
are sent as absolute paths and resolved on the server, so they must name folders under the
farm's ``REV_MODEL_ROOTS``.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from rev_tasks.settings import api_url

TERMINAL = ("succeeded", "failed", "cancelled")
#: Answers after which a submit is sent again (with the same Idempotency-Key): no answer
#: at all, or a proxy's "try later". Anything else is the coordinator's own decision.
RETRY_STATUSES = frozenset({502, 503, 504})
SUBMIT_ATTEMPTS = 3


class ClientError(Exception):
    """The request failed; ``str()`` is one line for the user."""


class Unreachable(ClientError):
    """No answer from the coordinator, or a 502/503/504: the request may be tried again."""


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

    def _request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        """The response's JSON (None when the body is not JSON); errors as ClientError."""
        resp = self._send(method, path, body, headers)
        try:
            return resp.json()
        except ValueError:
            return None

    def _send(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        import requests

        url = f"{self.base_url}{path}"
        headers = dict(headers or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            resp = requests.request(method, url, json=body, timeout=self.timeout, headers=headers)
        except requests.RequestException as exc:
            reason = type(exc).__name__
            raise Unreachable(f"cannot reach the farm at {self.base_url} ({reason})") from exc
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
            error = ClientError if resp.status_code not in RETRY_STATUSES else Unreachable
            if err:
                raise error(f"{resp.status_code} {err.get('code')}: {err.get('message')}")
            raise error(f"{resp.status_code} from {url}")
        return resp

    def submit(
        self, body: dict[str, Any], idempotency_key: str | None = None, backoff: float = 1.0
    ) -> dict[str, Any]:
        """Submit a job; retried with one Idempotency-Key, so a retry never makes a second job.

        Up to :data:`SUBMIT_ATTEMPTS` tries when there was no answer (connection refused or
        reset, a timeout: the job may or may not exist) or a 502/503/504; the coordinator
        returns the job of the first try that reached it. The key is a fresh UUID unless
        given.
        """
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            try:
                return self._request("POST", "/v1/jobs", body, headers)
            except Unreachable:
                if attempt == SUBMIT_ATTEMPTS:
                    raise
                time.sleep(backoff * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

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

    def certificate(self, job_id: str) -> bytes:
        """The certificate file's exact bytes (any other form fails verification)."""
        return bytes(self._send("GET", f"/v1/jobs/{job_id}/certificate").content)

    def public_key(self, keyid: str | None = None) -> bytes:
        """The farm's certificate public key as PEM (the current one, or ``keyid``'s)."""
        query = f"?keyid={keyid}" if keyid else ""
        return bytes(self._send("GET", f"/v1/certificates/key{query}").content)

    def register_model(self, model_id: str, path: str, dtype: str | None = None) -> dict[str, Any]:
        """Register a model folder; ``dtype``: its fingerprint's compute dtype (server
        default float32)."""
        body: dict[str, Any] = {"id": model_id, "path": path}
        if dtype is not None:
            body["dtype"] = dtype
        return self._request("POST", "/v1/models", body)

    def model(self, model_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{model_id}")

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/v1/models")

    def set_credential(self, name: str, value: str) -> dict[str, Any]:
        """Create or rotate a credential; the answer names it, never repeats the value."""
        return self._request("PUT", f"/v1/credentials/{name}", {"value": value})

    def credentials(self) -> dict[str, Any]:
        return self._request("GET", "/v1/credentials")

    def delete_credential(self, name: str) -> None:
        self._send("DELETE", f"/v1/credentials/{name}")

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        progress: Any = None,
    ) -> dict[str, Any]:
        """Poll until the job is finished (:data:`TERMINAL`); ``TimeoutError`` after ``timeout``."""
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
