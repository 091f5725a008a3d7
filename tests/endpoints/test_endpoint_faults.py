"""The client against faults injected in front of a real llama.cpp server: 429 with
Retry-After, a server that dies mid-run, malformed JSON, a closed port, an unknown model.
Every failure is one line without a traceback, and the API key appears nowhere."""

from __future__ import annotations

import json
import time

import pytest

from rev_tasks.cli import main as cli_main
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
    assert any(h.get("authorization") == f"Bearer {SECRET}" for h in proxy.headers_seen)
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


def _cli(capsys, monkeypatch, smollm2, url: str, model: str = "smollm2") -> tuple[int, str, str]:
    """``rev verify`` in-process (the console script's main), with the key in the environment."""
    monkeypatch.setenv("REV_TEST_KEY", SECRET)
    code = cli_main(
        ["verify", str(smollm2), "--endpoint", url, "--endpoint-model", model,
         "--api-key-env", "REV_TEST_KEY", "--timeout", "10"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(result: tuple[int, str, str], needle: str) -> None:
    code, out, err = result
    assert code == 1, out + err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert SECRET not in err + out


def test_server_dying_mid_run(capsys, monkeypatch, smollm2, serve) -> None:
    with FaultProxy(_upstream(serve), die_after=4) as proxy:
        result = _cli(capsys, monkeypatch, smollm2, proxy.url)
    _one_line_error(result, "unreachable")


def test_malformed_json(capsys, monkeypatch, smollm2, serve) -> None:
    with FaultProxy(_upstream(serve), malformed=True) as proxy:
        result = _cli(capsys, monkeypatch, smollm2, proxy.url)
    _one_line_error(result, "not OpenAI-compatible")


def test_closed_port(capsys, monkeypatch, smollm2) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    _one_line_error(_cli(capsys, monkeypatch, smollm2, url), "unreachable")


def test_unknown_model(capsys, monkeypatch, smollm2, serve) -> None:
    _one_line_error(_cli(capsys, monkeypatch, smollm2, serve("f16").url, "gpt-9"), "unknown")


def test_missing_key_variable_is_a_usage_error(capsys, monkeypatch, smollm2) -> None:
    monkeypatch.delenv("REV_NO_SUCH_KEY", raising=False)
    code = cli_main(
        ["verify", str(smollm2), "--endpoint", "http://127.0.0.1:9/v1", "--endpoint-model", "m",
         "--api-key-env", "REV_NO_SUCH_KEY"]
    )  # fmt: skip
    assert code == 2 and "REV_NO_SUCH_KEY is not set" in capsys.readouterr().err
