"""A careful client of an OpenAI-compatible endpoint (``/v1/models``, ``/v1/completions``).

Built on ``httpx``. What it guarantees, because a verification must not die on a flaky
service nor leak the caller's credentials:

- timeouts on connect and read; retries with exponential backoff on connection errors, 429
  and 5xx, honouring ``Retry-After`` (seconds or an HTTP date, capped);
- at most ``max_in_flight`` requests at once (a semaphore shared by all threads);
- every failure is an :class:`EndpointError` with one line of text (unreachable, not
  OpenAI-compatible, unknown model, ...); the API key never appears in one, in a log line or in
  the raw responses kept for the transcript (it is sent only in the Authorization header, and
  a reply that echoes it is discarded with an error);
- with ``allow`` or ``target`` (the farm always passes one), the egress guard
  (:mod:`rev_tasks.endpoints.egress`) checks the URL, resolves it once and pins every
  connection to the checked address; a redirect outside the allow-list raises
  :class:`~rev_tasks.endpoints.egress.EgressRefused`. Without either (``rev verify
  --endpoint``, run by an operator on a URL of their choosing) no guard applies. Redirects
  are never followed;
- :class:`Cost` counts requests, retries, prompt and completion tokens and wall time;
- on the farm (rev_tasks/tasks/endpoint.py) also: a shared :class:`~rev_tasks.endpoints.
  politeness.EndpointGate` before every request (a 429's ``Retry-After`` pauses every
  worker), a request and a token budget (:class:`BudgetExceeded`) and an ``observer`` that
  records metrics.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from rev_tasks import redact
from rev_tasks.endpoints.egress import AllowList, Target, check_url, pinned_client

__all__ = ["BudgetExceeded", "Cost", "EndpointClient", "EndpointError", "NoLogprobs", "Reply"]

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_MAX_RETRY_AFTER_S = 30.0


class EndpointError(Exception):
    """A one-line, credential-free reason why the endpoint cannot be used."""


class BudgetExceeded(EndpointError):
    """The job's request or token budget is spent (not retried)."""


class NoLogprobs(EndpointError):
    """The endpoint answers without log-probabilities, or refuses to give them."""

    def __init__(self, detail: str = "") -> None:
        extra = f" ({detail})" if detail else ""
        super().__init__(
            "the endpoint returned no log-probabilities (use --mode text for such endpoints)"
            + extra
        )


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ""
    if not isinstance(body, dict):
        return ""
    err = body.get("error", body.get("detail", ""))
    return str(err.get("message", "")) if isinstance(err, dict) else str(err)


@dataclass
class Cost:
    """What the verification spent at the endpoint."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "retries": self.retries,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "wall_s": round(self.wall_s, 3),
            }


@dataclass(frozen=True)
class Reply:
    """One answered request: the exact bytes (hashed into the transcript) and their JSON."""

    raw: bytes
    body: dict[str, Any]


def _public_url(url: str) -> str:
    """The URL without user info, query or fragment: safe to print."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def normalise_base_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` all mean ``http://h:p/v1``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointError(f"endpoint URL must be http(s)://host[:port][/v1], got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(when - time.time(), 0.0), _MAX_RETRY_AFTER_S)


class EndpointClient:
    """Requests to one model at one endpoint; thread-safe."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_in_flight: int = 4,
        allow: AllowList | None = None,
        target: Target | None = None,
        gate: Any = None,
        max_requests: int | None = None,
        max_tokens: int | None = None,
        observer: Any = None,
    ) -> None:
        if target is None and allow is not None:
            # The guard first: a refused URL is an EgressRefused, whatever else is wrong.
            target = check_url(base_url, allow)  # resolves the host, once
        self.base_url = normalise_base_url(base_url)
        self.public_url = _public_url(self.base_url)
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.cost = Cost()
        self._key = api_key
        self._slots = threading.BoundedSemaphore(max(1, max_in_flight))
        self.gate = gate
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.observer = observer
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
            redact.remember_secret(api_key)  # no log line of this process shows it
        timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.target = target
        if target is not None:
            # Checked once; every connection goes to target.address (no second lookup).
            if (urlsplit(self.base_url).hostname or "").rstrip(".") != target.host:
                raise ValueError("the pinned target is not the endpoint's host")
            self._http = pinned_client(
                target, allow=allow, base_url=self.base_url + "/", headers=headers, timeout=timeout
            )
        else:
            self._http = httpx.Client(
                base_url=self.base_url + "/",
                headers=headers,
                timeout=timeout,
                follow_redirects=False,
            )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EndpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------

    def _clean(self, text: str) -> str:
        """One line, no API key."""
        text = " ".join(str(text).split())
        if self._key:
            text = text.replace(self._key, "***")
        return text[:300]

    def _observe(self, event: str, *args: Any) -> None:
        """Tell the observer (the farm's metrics) what happened; never fails a request."""
        if self.observer is None:
            return
        with contextlib.suppress(Exception):
            getattr(self.observer, event)(*args)

    def _check_request_budget(self) -> None:
        with self.cost._lock:
            spent = self.cost.requests
        if self.max_requests is not None and spent >= self.max_requests:
            self._observe("error", "budget")
            raise BudgetExceeded(
                f"the job's query budget of {self.max_requests} requests is spent "
                "(retries included)"
            )

    def _echoes_key(self, raw: bytes) -> bool:
        """Whether the reply carries the API key (plain or JSON-escaped)."""
        if not self._key:
            return False
        escaped = json.dumps(self._key)[1:-1]
        return any(form.encode() in raw for form in {self._key, escaped})

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Reply:
        url = f"{self.public_url}/{path}"
        route = path.split("/")[-1] or "other"
        attempt = 0
        while True:
            self._check_request_budget()
            retry_in: float | None = None
            reason = ""
            klass = ""
            gate = self.gate.slot() if self.gate is not None else contextlib.nullcontext()
            with self._slots, gate:
                start = time.monotonic()
                try:
                    resp = self._http.request(method, path, json=payload)
                except httpx.TimeoutException:
                    reason, klass = f"endpoint {url} timed out", "timeout"
                except httpx.TransportError as exc:
                    reason = f"endpoint {url} unreachable: {self._clean(exc) or type(exc).__name__}"
                    klass = "connect"
                else:
                    resp_status = resp.status_code
                    raw = resp.content
                finally:
                    elapsed = time.monotonic() - start
                    with self.cost._lock:
                        self.cost.wall_s += elapsed
                        self.cost.requests += 1
            if not reason and self._echoes_key(raw):
                # The reply would be recorded byte for byte in the transcript: refuse it.
                self._observe("request", route, elapsed, "error")
                self._observe("error", "invalid_reply")
                raise EndpointError(
                    f"endpoint {url} echoed the API key in its reply (HTTP {resp_status}); "
                    "the reply was discarded"
                )
            if not reason:
                wants_logprobs = bool(payload and payload.get("logprobs") is not None)
                if wants_logprobs and resp_status >= 400 and "logprob" in _error_message(raw):
                    # A refusal, not a transient failure: no retries.
                    self._observe("request", route, elapsed, "error")
                    self._observe("error", "no_logprobs")
                    raise NoLogprobs(self._clean(_error_message(raw))[:120])
                if resp_status in _RETRY_STATUS:
                    retry_in = _retry_after(resp.headers.get("retry-after"))
                    reason = f"endpoint {url} answered HTTP {resp_status}"
                    klass = "http_429" if resp_status == 429 else "http_5xx"
                    if resp_status == 429 and retry_in and self.gate is not None:
                        self.gate.pause(retry_in)  # every worker waits, not only this request
                else:
                    try:
                        reply = self._parse(url, resp_status, raw)
                    except EndpointError:
                        self._observe("request", route, elapsed, "error")
                        self._observe(
                            "error", "http_4xx" if resp_status >= 400 else "invalid_reply"
                        )
                        raise
                    self._observe("request", route, elapsed, "ok")
                    return reply
            self._observe("request", route, elapsed, "error")
            self._observe("error", klass)
            if attempt >= self.max_retries:
                raise EndpointError(f"{reason} (gave up after {attempt + 1} attempts)")
            with self.cost._lock:
                self.cost.retries += 1
            self._observe("retry", klass)
            delay = retry_in if retry_in is not None else self.backoff_s * (2**attempt)
            time.sleep(min(delay, _MAX_RETRY_AFTER_S))
            attempt += 1

    def _parse(self, url: str, status: int, raw: bytes) -> Reply:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if 300 <= status < 400:
            raise EndpointError(
                f"endpoint {url} redirected (HTTP {status}); redirects are not followed"
            )
        if status == 401 or status == 403:
            raise EndpointError(f"endpoint {url} refused the credentials (HTTP {status})")
        if status == 404 and not isinstance(body, dict):
            raise EndpointError(f"endpoint {url} is not OpenAI-compatible (HTTP 404)")
        if status >= 400:
            message = _error_message(raw)
            raise EndpointError(
                f"endpoint {url} answered HTTP {status}: {self._clean(message) or 'no details'}"
            )
        if not isinstance(body, dict):
            raise EndpointError(f"endpoint {url} is not OpenAI-compatible (the reply is not JSON)")
        return Reply(raw, body)

    # -- the API --------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Model ids from ``/v1/models``."""
        reply = self._request("GET", "models")
        data = reply.body.get("data")
        if not isinstance(data, list):
            raise EndpointError(
                f"endpoint {self.public_url}/models is not OpenAI-compatible (no 'data' list)"
            )
        return [str(m.get("id")) for m in data if isinstance(m, dict)]

    def check_model(self) -> None:
        """Fail early, in one line, when the endpoint does not serve the named model."""
        served = self.models()
        if self.model not in served:
            listed = ", ".join(served[:5]) or "none"
            raise EndpointError(
                f"model {self.model!r} is unknown at {self.public_url} (it serves: {listed})"
            )

    def completion(
        self,
        prompt: str,
        *,
        max_tokens: int = 1,
        temperature: float = 0.0,
        logprobs: int | None = None,
        seed: int | None = None,
    ) -> Reply:
        """One ``/v1/completions`` request; checks the reply's shape and counts its tokens.

        Sampling is plain (top_p 1; llama.cpp's extensions top_k, min_p and repeat_penalty
        switched off) so that temperature 1 samples the model's own distribution.
        """
        payload: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
            "n": 1,
        }
        if logprobs is not None:
            payload["logprobs"] = logprobs
        if seed is not None:
            payload["seed"] = seed
        reply = self._request("POST", "completions", payload)
        choices = reply.body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise EndpointError(
                f"endpoint {self.public_url}/completions is not OpenAI-compatible (no 'choices')"
            )
        usage = reply.body.get("usage")
        if isinstance(usage, dict):
            prompt_t = int(usage.get("prompt_tokens") or 0)
            completion_t = int(usage.get("completion_tokens") or 0)
            with self.cost._lock:
                self.cost.prompt_tokens += prompt_t
                self.cost.completion_tokens += completion_t
                spent = self.cost.prompt_tokens + self.cost.completion_tokens
            self._observe("tokens", prompt_t, completion_t)
            if self.max_tokens is not None and spent > self.max_tokens:
                self._observe("error", "budget")
                raise BudgetExceeded(
                    f"the job's token budget of {self.max_tokens} tokens is spent ({spent} used)"
                )
        return reply

    def tokenize(self, text: str) -> list[int] | None:
        """The server's own token ids for ``text`` where it offers a tokenizer route
        (llama-cpp-python ``/extras/tokenize``, llama.cpp ``/tokenize``); else None."""
        root = self.base_url[: -len("/v1")]
        for path, payload in (
            ("extras/tokenize", {"input": text, "model": self.model}),
            ("tokenize", {"content": text, "add_special": True}),
        ):
            try:
                resp = self._http.post(f"{root}/{path}", json=payload)
            except httpx.HTTPError:
                return None
            if resp.status_code != 200:
                continue
            try:
                tokens = resp.json().get("tokens")
            except (ValueError, AttributeError):
                continue
            if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
                return tokens
        return None
