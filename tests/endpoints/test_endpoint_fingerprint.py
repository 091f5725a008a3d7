"""An endpoint fingerprint as the reference: the same verdicts as the weights, on real servers.

The fingerprint is made by ``rev fingerprint --endpoint-evidence`` from the dequantised
SmolLM2 folder; the endpoints are the session's llama.cpp servers. alpha = 0.01.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rev_tasks.cli import main as cli_main
from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.endpoints.client import EndpointClient
from rev_tasks.endpoints.fingerprint import FingerprintReference
from rev_tasks.endpoints.transcript import audit_endpoint
from rev_tasks.endpoints.verify import EndpointParams, verify_endpoint

N = 24  # challenges in the fingerprint: every logprobs verdict here comes within 24 queries


@pytest.fixture(scope="session")
def fingerprint(reference, smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``reference`` first: its one-thread torch setting then holds for the CLI's model too."""
    out = tmp_path_factory.mktemp("endpoint-fp") / "smollm2.fp.json"
    code = cli_main(
        ["fingerprint", str(smollm2), "-o", str(out), "--endpoint-evidence",
         "--challenges", str(N)]
    )  # fmt: skip
    assert code == 0
    return out


def _run(reference, server, **kw):
    with EndpointClient(server.url, server.alias, max_in_flight=4) as client:
        params = EndpointParams(alpha=0.01, max_queries=N, **kw)
        return verify_endpoint(reference, client, DEMO_KEY, params)


@pytest.mark.parametrize(
    ("variant", "expected"), [("f32", "SAME"), ("q4_0", "DIFFERENT"), ("other", "DIFFERENT")]
)
def test_fingerprint_reads_as_the_weights_do(
    reference, fingerprint: Path, serve, variant: str, expected: str
) -> None:
    server = serve(variant)
    fp = FingerprintReference.load(fingerprint)
    weights, printed = _run(reference, server), _run(fp, server)
    assert printed.result["verdict"] == weights.result["verdict"] == expected
    assert printed.result["queries_used"] == weights.result["queries_used"]
    assert printed.result["tokenization"] == weights.result["tokenization"]
    assert printed.result["reference"]["top_k"] == 128
    # Per query: the fingerprint's statistic equals the weights' unless a reply named a token
    # outside the stored top-K, where it is an upper bound.
    for rec, w, f in zip(
        printed.transcript["records"], weights.values, printed.values, strict=True
    ):
        bounded = any(isinstance(v, dict) for v in rec["reference"]["pieces"].values())
        if bounded:
            assert f >= w
        else:
            assert f == pytest.approx(w, abs=1e-6)
    assert audit_endpoint(printed.transcript) == []


def test_fingerprint_in_text_mode_refutes_another_model(fingerprint: Path, serve) -> None:
    server = serve("other", logprobs=False)
    out = _run(FingerprintReference.load(fingerprint), server, mode="text")
    assert out.result["verdict"] == "DIFFERENT", out.result["reason"]
    assert audit_endpoint(out.transcript) == []


def test_cli_identify_with_a_fingerprint_and_a_folder(capsys, fingerprint: Path, serve) -> None:
    from rev_tasks.testing.ggufs import other_folder

    server = serve("f32")
    other = str(other_folder())
    code = cli_main(
        ["identify", str(fingerprint), other, "--endpoint", server.url,
         "--endpoint-model", server.alias, "--max-queries", str(N), "--json"]
    )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["match"] == str(fingerprint) and not out["none_of_these"]
    assert [(r["reference"], r["verdict"]) for r in out["ranking"]] == [
        (str(fingerprint), "SAME"),
        (other, "DIFFERENT"),
    ]


def test_cli_refuses_a_wrong_key_and_the_wrong_kind(capsys, fingerprint, serve, tmp_path) -> None:
    from rev_tasks.testing.variants import minilm_path

    server = serve("f32")
    endpoint = ["--endpoint", server.url, "--endpoint-model", server.alias]
    key = tmp_path / "other.key"
    key.write_bytes(bytes(range(32)))
    assert cli_main(["verify", str(fingerprint), *endpoint, "--key-file", str(key)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rev: error:") and "made with key" in err and "\n" not in err, err
    assert cli_main(["identify", str(fingerprint), *endpoint, "--key-file", str(key)]) == 2
    assert "made with key" in capsys.readouterr().err
    # A white-box fingerprint (signatures) cannot serve an endpoint ...
    whitebox = tmp_path / "wb.json"
    assert (
        cli_main(["fingerprint", str(minilm_path()), "-o", str(whitebox), "--challenges", "2"]) == 0
    )
    capsys.readouterr()
    assert cli_main(["verify", str(whitebox), *endpoint]) == 2
    err = capsys.readouterr().err
    assert "white-box fingerprint" in err and "--endpoint-evidence" in err, err
    # ... and an endpoint fingerprint cannot serve a white-box verification.
    assert cli_main(["verify", str(fingerprint), str(minilm_path())]) == 2
    assert "endpoint fingerprint" in capsys.readouterr().err
