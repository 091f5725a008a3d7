"""text mode: a real llama.cpp server started without logprobs, sampled at temperature 1."""

from __future__ import annotations

from rev_tasks.cli import main as cli_main
from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.endpoints.client import EndpointClient
from rev_tasks.endpoints.transcript import audit_endpoint
from rev_tasks.endpoints.verify import EndpointParams, verify_endpoint


def test_logprobs_mode_on_a_text_only_server_says_use_text_mode(capsys, smollm2, serve) -> None:
    server = serve("f32", logprobs=False)
    code = cli_main(
        ["verify", str(smollm2), "--endpoint", server.url, "--endpoint-model", server.alias]
    )
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--mode text" in lines[0], err


def test_text_mode_same_weights_is_not_refuted(reference, serve) -> None:
    server = serve("f32", logprobs=False)
    with EndpointClient(server.url, server.alias) as client:
        out = verify_endpoint(
            reference, client, DEMO_KEY, EndpointParams(mode="text", max_queries=48)
        )
    assert out.result["verdict"] == "UNDECIDED", out.result["reason"]
    assert audit_endpoint(out.transcript) == []


def test_text_mode_refutes_another_model(reference, serve) -> None:
    server = serve("other", logprobs=False)
    with EndpointClient(server.url, server.alias) as client:
        out = verify_endpoint(
            reference, client, DEMO_KEY, EndpointParams(mode="text", max_queries=48)
        )
    assert out.result["verdict"] == "DIFFERENT", out.result["reason"]
    assert out.result["queries_used"] <= 48
    assert audit_endpoint(out.transcript) == []
