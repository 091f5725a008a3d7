"""Job dtype on the real farm: fp16 and bf16 jobs and registrations, end to end.

HTTP (Flask test client, and the ``rev`` client over a real werkzeug server) → Redis →
one ``celery worker`` subprocess (every queue) → PostgreSQL, on the real MiniLM. An fp16
verify job's verdict and challenge count equal ``rev verify --dtype float16`` on the job's
own challenges (its nonce); a model registered in bf16 is fingerprinted in bf16, verified
and identified by bf16 jobs, and refused (422, or listed unavailable with the reason) to float32 ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.testing import variants as V
from tests.integration.farm import (
    api_url_fixture,
    assert_drained,
    farm_env_fixture,
    register,
    rev_verify,
    submit,
    wait_job,
    worker_fixture,
)

pytestmark = pytest.mark.integration


# 32-challenge fingerprints (MiniLM registers twice).
farm_env = farm_env_fixture(REV_FINGERPRINT_CHALLENGES="32")
worker = worker_fixture("dtype")
api_url = api_url_fixture()


@pytest.fixture(scope="module")
def bf16_cast(model_dirs: dict[str, Path]) -> Path:
    """MiniLM's weights rounded to bfloat16 and saved (in the farm's model root)."""
    return V.save_transformed(
        model_dirs["minilm"], model_dirs["root"] / "minilm-bf16-cast", V.cast("bfloat16")
    )


def _rev(api_url: str, token: str, *argv: str) -> dict[str, Any]:
    """``rev ARGV --json`` against the farm over HTTP; its JSON output."""
    proc = subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", *argv, "--json"],
        env={**os.environ, "REV_API_URL": api_url, "REV_API_KEY": token},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def _error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_json()
    body = resp.get_json()
    assert body["error"]["code"] == code, body
    return body["error"]


def _consensus_in(doc: dict[str, Any], dtype: str) -> None:
    """Five identical votes for the published verdict, each re-executed in ``dtype``."""
    consensus = doc["result"]["consensus"]
    assert consensus["agreed"] is True, consensus
    votes = consensus["votes"]
    assert sorted(v["validator"] for v in votes) == [0, 1, 2, 3, 4]
    assert {v["verdict"] for v in votes} == {doc["result"]["verdict"]}
    for v in votes:
        assert v["executed_on"]["dtype"] == dtype, v
        assert v["executed_on"]["device"] == "cpu", v
        assert v["executed_on"]["worker"], v


def test_a_bad_dtype_is_refused_with_422(client: Any, model_dirs: dict[str, Path]) -> None:
    minilm = {"path": str(model_dirs["minilm"])}
    for bad in ("float64", "auto", "FLOAT16", "fp16", 16, None):
        body = {"kind": "verify", "reference": minilm, "candidate": minilm, "dtype": bad}
        err = _error(client.post("/v1/jobs", json=body), 422, "invalid_request")
        assert any(d["loc"][-1] == "dtype" for d in err["details"]), err
        body = {"kind": "identify", "candidate": minilm, "dtype": bad}
        _error(client.post("/v1/jobs", json=body), 422, "invalid_request")
        body = {"id": "minilm-bad", "path": str(model_dirs["minilm"]), "dtype": bad}
        _error(client.post("/v1/models", json=body), 422, "invalid_request")
    assert client.get("/v1/models/minilm-bad").status_code == 404  # nothing was stored
    assert client.get("/v1/jobs").get_json()["jobs"] == []


@pytest.mark.parametrize(
    ("candidate", "tolerance", "expected"),
    [
        ("minilm-copy", "exact", "SAME"),
        ("minilm-noisy", "exact", "DIFFERENT"),
        ("bf16-cast", "precision", "SAME"),
    ],
)
def test_fp16_job_gives_the_verdict_of_rev_verify_dtype_float16(
    client: Any,
    worker: Any,
    keys: dict[str, str],
    api_url: str,
    model_dirs: dict[str, Path],
    bf16_cast: Path,
    farm_env: dict[str, str],
    candidate: str,
    tolerance: str,
    expected: str,
) -> None:
    """Both sides in fp16 on the CPU worker; validators re-execute in fp16 too."""
    cand = bf16_cast if candidate == "bf16-cast" else model_dirs[candidate]
    if candidate == "minilm-noisy":  # submitted as an operator would: `rev submit --dtype`
        accepted = _rev(
            api_url, keys["admin"], "submit", str(cand), "--reference", str(model_dirs["minilm"]),
            "--dtype", "float16", "--device", "cpu", "--max-challenges", "32",
            "--tolerance", tolerance,
        )  # fmt: skip
        job_id = accepted["id"]
    else:
        body = {
            "kind": "verify",
            "reference": {"path": str(model_dirs["minilm"])},
            "candidate": {"path": str(cand)},
            "tolerance": tolerance,
            "max_challenges": 32,
            "device": "cpu",
            "dtype": "float16",
        }
        job_id = submit(client, body)
    doc = wait_job(client, job_id, timeout=900)
    assert doc["status"] == "succeeded", (doc["error"], worker.log_tail())
    assert doc["request"]["dtype"] == "float16"
    result = doc["result"]
    assert result["verdict"] == expected, result
    assert result["reference"]["dtype"] == result["candidate"]["dtype"] == "float16"
    executed = result["executed_on"]
    assert executed["dtype"] == "float16" and executed["device"] == "cpu"
    assert executed["sides"] == {
        "candidate": {"dtype": "float16", "device": "cpu"},
        "reference": {"dtype": "float16", "device": "cpu", "source": "model"},
    }
    _consensus_in(doc, "float16")
    if tolerance == "precision":  # δ from the reference's own casts, measured in fp16
        assert result["calibration"] is not None
        assert result["calibration"]["differing_bits"]["float16"] == [0] * 16  # itself
    # The in-process engine in fp16, on the job's own challenges.
    nonce = client.get(f"/v1/jobs/{job_id}/transcript").get_json()["challenge_nonce"]
    local = rev_verify(
        model_dirs["minilm"],
        cand,
        farm_env["REV_SECRET_KEY_FILE"],
        tolerance=tolerance,
        max_challenges=32,
        nonce=nonce,
        dtype="float16",
    )
    assert local["verdict"] == result["verdict"] == expected
    assert local["challenges_used"] == result["challenges_used"]
    assert local["candidate"]["dtype"] == "float16"
    # ... and the same pair in float32 reads the same here, in its own float32 entry.
    if candidate == "minilm-copy":
        fp32 = wait_job(client, submit(client, _fp32(doc["request"])), timeout=900)
        assert fp32["status"] == "succeeded", fp32["error"]
        assert fp32["result"]["verdict"] == expected
        assert fp32["result"]["executed_on"]["dtype"] == "float32"
        _consensus_in(fp32, "float32")


def _fp32(request: dict[str, Any]) -> dict[str, Any]:
    """The stored request of a job, resubmitted without its dtype (the float32 default)."""
    return {k: v for k, v in request.items() if v is not None and k != "dtype"}


def test_bf16_registration_verify_and_identify(
    client: Any,
    worker: Any,
    keys: dict[str, str],
    api_url: str,
    model_dirs: dict[str, Path],
) -> None:
    """A bf16 registration: fingerprint in bf16, matching jobs only, identify lists the rest."""
    minilm = str(model_dirs["minilm"])
    pending = _rev(api_url, keys["admin"], "models", "register", "minilm-bf16", minilm,
                   "--dtype", "bfloat16")  # fmt: skip
    assert pending["dtype"] == "bfloat16"
    bf16 = register(client, "minilm-bf16", model_dirs["minilm"], timeout=900)
    fp32 = register(client, "minilm-fp32", model_dirs["minilm"], timeout=900)
    assert bf16["status"] == fp32["status"] == "ready", (bf16, fp32, worker.log_tail())
    assert bf16["dtype"] == bf16["descriptor"]["dtype"] == "bfloat16"
    assert fp32["dtype"] == fp32["descriptor"]["dtype"] == "float32"
    assert bf16["fingerprint"]["challenges"] == 32

    copy = {"path": str(model_dirs["minilm-copy"])}
    # A float32 job against the bf16 fingerprint is refused at submit, with the reason.
    err = _error(
        client.post("/v1/jobs", json={"kind": "verify", "reference": "minilm-bf16",
                                      "candidate": copy}),
        422, "dtype_mismatch",
    )  # fmt: skip
    assert "bfloat16" in err["message"] and "float32" in err["message"]
    verify = {"kind": "verify", "reference": "minilm-bf16", "candidate": copy, "dtype": "bfloat16"}
    doc = wait_job(client, submit(client, {**verify, "max_challenges": 12}), timeout=900)
    assert doc["status"] == "succeeded", (doc["error"], worker.log_tail())
    assert doc["result"]["verdict"] == "SAME"
    assert doc["result"]["executed_on"]["sides"] == {
        "candidate": {"dtype": "bfloat16", "device": "cpu"},
        "reference": {"dtype": "bfloat16", "device": None, "source": "fingerprint"},
    }
    _consensus_in(doc, "bfloat16")
    noisy = {**verify, "candidate": {"path": str(model_dirs["minilm-noisy"])}}
    doc = wait_job(client, submit(client, {**noisy, "max_challenges": 8}), timeout=900)
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["result"]["verdict"] == "DIFFERENT"
    _consensus_in(doc, "bfloat16")

    # Identify in bf16 ranks the bf16 fingerprint; the float32 one is listed unavailable with
    # the reason, not compared (a verdict either way would be about the dtype, not the model).
    ident = {"kind": "identify", "candidate": copy, "max_challenges": 12}
    doc = wait_job(client, submit(client, {**ident, "dtype": "bfloat16"}), timeout=900)
    assert doc["status"] == "succeeded", doc["error"]
    result = doc["result"]
    assert result["best"] == "minilm-bf16" and result["verdict"] == "SAME", result
    assert [r["model_id"] for r in result["ranking"]] == ["minilm-bf16"]
    assert result["executed_on"]["dtype"] == "bfloat16"
    assert [u["model_id"] for u in result["unavailable"]] == ["minilm-fp32"]
    assert "compute dtypes differ" in result["unavailable"][0]["reason"]
    assert "float32" in result["unavailable"][0]["reason"]
    _consensus_in(doc, "bfloat16")
    # ... and in float32 the other way round.
    doc = wait_job(client, submit(client, ident), timeout=900)
    assert doc["status"] == "succeeded", doc["error"]
    result = doc["result"]
    assert result["best"] == "minilm-fp32" and result["verdict"] == "SAME", result
    assert [r["model_id"] for r in result["ranking"]] == ["minilm-fp32"]
    assert [u["model_id"] for u in result["unavailable"]] == ["minilm-bf16"]
    assert "bfloat16" in result["unavailable"][0]["reason"]
    _consensus_in(doc, "float32")


def test_nothing_left_in_the_broker(worker: Any, farm_env: dict[str, str]) -> None:
    assert_drained(farm_env["REDIS_URL"])
