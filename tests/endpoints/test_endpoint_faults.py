"""The client against faults injected in front of a real llama.cpp server: 429 with
Retry-After, a server that dies mid-run, malformed JSON, a closed port, an unknown model.
Every failure is one line without a traceback, and the API key appears nowhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.endpoints.client import EndpointClient, EndpointError
from rev_tasks.endpoints.verify import EndpointParams, verify_endpoint
from rev_tasks.testing.endpoint_faults import FaultProxy
from rev_tasks.testing.servers import free_port

SECRET = "sk-test-0123456789-very-secret"


def _upstream(serve) -> str:
    return serve("f16").url[: -len("/v1")]


def test_retry_after_is_honoured_and_the_key_never_leaks(reference, serve) -> None:
    with (
        FaultProxy(_upstream(serve), rate_limited=2, retry_after="1") as proxy,
        EndpointClient(proxy.url, "smollm2", api_key=SECRET, backoff_s=0.05) as client,
    ):
        start = time.monotonic()
        out = verify_endpoint(reference, client, DEMO_KEY, EndpointParams(max_queries=16))
        elapsed = time.monotonic() - start
    assert out.result["verdict"] == "SAME"
    assert client.cost.retries == 2
    assert elapsed >= 2.0  # two Retry-After: 1 waits
    assert any(h.get("Authorization") == f"Bearer {SECRET}" for h in proxy.headers_seen)
    assert SECRET not in json.dumps(out.transcript) and SECRET not in json.dumps(out.result)


def test_persistent_429_gives_up_in_one_line() -> None:
    with (
        FaultProxy("http://127.0.0.1:9", rate_limited=10**6, retry_after="0") as proxy,
        EndpointClient(proxy.url, "m", api_key=SECRET, max_retries=2) as client,
        pytest.raises(EndpointError) as err,
    ):
        client.models()
    assert "HTTP 429" in str(err.value) and "gave up after 3 attempts" in str(err.value)
    assert SECRET not in str(err.value)


def _cli(smollm2, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, REV_TEST_KEY=SECRET)
    return subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", "verify", str(smollm2), "--endpoint", url,
         "--endpoint-model", "smollm2", "--api-key-env", "REV_TEST_KEY", "--timeout", "10", *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def _one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert SECRET not in proc.stderr + proc.stdout


def test_server_dying_mid_run(smollm2, serve) -> None:
    with FaultProxy(_upstream(serve), die_after=4) as proxy:
        proc = _cli(smollm2, proxy.url)
    _one_line_error(proc, "unreachable")


def test_malformed_json(smollm2, serve) -> None:
    with FaultProxy(_upstream(serve), malformed=True) as proxy:
        proc = _cli(smollm2, proxy.url)
    _one_line_error(proc, "not OpenAI-compatible")


def test_closed_port(smollm2) -> None:
    _one_line_error(_cli(smollm2, f"http://127.0.0.1:{free_port()}"), "unreachable")


def test_unknown_model(smollm2, serve) -> None:
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", "verify", str(smollm2), "--endpoint",
         serve("f16").url, "--endpoint-model", "gpt-9"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    _one_line_error(proc, "unknown")


def test_missing_key_variable_is_a_usage_error(smollm2) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REV_NO_SUCH_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", "verify", str(smollm2), "--endpoint",
         "http://127.0.0.1:9/v1", "--endpoint-model", "m", "--api-key-env", "REV_NO_SUCH_KEY"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and "REV_NO_SUCH_KEY is not set" in proc.stderr
