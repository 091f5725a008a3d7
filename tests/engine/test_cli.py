"""The ``rev`` CLI as a user runs it: separate processes, JSON output, exit codes, audit."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REV = [sys.executable, "-m", "rev_tasks.cli"]


def rev(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*REV, *args], capture_output=True, text=True, env=full_env, timeout=300, check=False
    )


def test_verify_json_has_the_contract_fields(minilm, minilm_variants, key_file, tmp_path):
    transcript = tmp_path / "t.json"
    proc = rev(
        "verify", str(minilm), str(minilm_variants["copy"]), "--json",
        "--key-file", str(key_file), "--transcript", str(transcript),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # exactly one JSON object on stdout
    result = json.loads(lines[0])
    for field in ("verdict", "challenges_used", "tolerance", "alpha", "transcript_root", "sites"):
        assert field in result
    assert result["verdict"] == "SAME"
    assert {"mean", "min", "max", "count"} <= set(result["distances"])
    audit = rev("audit", str(transcript))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "valid transcript" in audit.stdout


def _tamper_and_audit(transcript: Path, tmp_path: Path, mutate) -> subprocess.CompletedProcess:
    doc = json.loads(transcript.read_text())
    mutate(doc)
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(doc))
    return rev("audit", str(bad))


def _flip_bit(doc: dict) -> None:
    rec = doc["records"][0]
    site = sorted(rec["candidate"])[0]
    raw = bytearray(base64.b64decode(rec["candidate"][site]))
    raw[0] ^= 0x01
    rec["candidate"][site] = base64.b64encode(bytes(raw)).decode()


def _change_distance(doc: dict) -> None:
    doc["records"][-1]["differing_bits"] += 1


def _change_verdict(doc: dict) -> None:
    doc["decision"]["verdict"] = "SAME" if doc["decision"]["verdict"] != "SAME" else "DIFFERENT"


@pytest.mark.parametrize("mutate", [_flip_bit, _change_distance, _change_verdict])
def test_audit_rejects_tampering(minilm, minilm_variants, key_file, tmp_path, mutate):
    transcript = tmp_path / "t.json"
    proc = rev(
        "verify", str(minilm), str(minilm_variants["noise_1pct"]), "--json",
        "--key-file", str(key_file), "--transcript", str(transcript),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert rev("audit", str(transcript)).returncode == 0
    bad = _tamper_and_audit(transcript, tmp_path, mutate)
    assert bad.returncode != 0
    assert "INVALID" in bad.stdout


def test_determinism_across_processes_hash_seeds_and_threads(minilm, key_file, tmp_path):
    """Byte-identical challenges and signatures from two differently configured processes."""
    outs = []
    for seed, threads in (("1", "1"), ("12345", "2")):
        out = tmp_path / f"fp-{seed}.json"
        proc = rev(
            "fingerprint", str(minilm), "-o", str(out), "--challenges", "16",
            "--key-file", str(key_file),
            env={"PYTHONHASHSEED": seed, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    # ... and `exact` says SAME between a fingerprint from one process and a run in another.
    proc = rev(
        "verify", str(outs[0]), str(minilm), "--json", "--key-file", str(key_file),
        env={"OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["verdict"] == "SAME"
    assert result["distances"]["max"] == 0.0


def test_fingerprint_with_another_key_is_refused(minilm, key_file, tmp_path):
    fp = tmp_path / "fp.json"
    assert rev("fingerprint", str(minilm), "-o", str(fp), "--challenges", "4").returncode == 0
    proc = rev("verify", str(fp), str(minilm), "--key-file", str(key_file))
    assert proc.returncode == 2
    assert "different secret key" in proc.stderr


def test_bad_model_folders_give_one_line_errors(minilm, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = rev("verify", str(empty), str(empty))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    assert "no config.json" in proc.stderr

    from rev_tasks.testing import variants as V

    broken = V.copy_model(minilm, tmp_path / "broken-config")
    (broken / "config.json").write_text("{not json")
    proc = rev("verify", str(minilm), str(broken))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "invalid config.json" in proc.stderr


def test_missing_tokenizer_and_corrupt_weights(minilm, tmp_path):
    from rev_tasks.testing import variants as V

    no_tok = V.copy_model(minilm, tmp_path / "no-tokenizer")
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (no_tok / f).unlink()
    proc = rev("verify", str(minilm), str(no_tok))
    assert proc.returncode == 2
    assert "no tokenizer" in proc.stderr and "Traceback" not in proc.stderr

    corrupt = V.copy_model(minilm, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1 << 20])  # truncated download
    proc = rev("verify", str(minilm), str(corrupt))
    assert proc.returncode == 2
    assert "cannot load the weights" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_arguments_exit_2(minilm):
    assert rev("verify", str(minilm), str(minilm), "--alpha", "0.9").returncode == 2
    assert rev("verify", str(minilm), str(minilm), "--max-challenges", "0").returncode == 2
    assert rev("audit", "/nonexistent/transcript.json").returncode == 2
