"""Certificates: a genuine one verifies; every flipped byte, a foreign key or transcript fails."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from rev_tasks import certificates as C
from rev_tasks.core.challenges import commitment, generate_challenges
from rev_tasks.core.keys import DEMO_KEY
from tests.unit.test_transcript import make_transcript


def _transcript(flip_rate: float, seed: int) -> dict[str, Any]:
    doc = make_transcript(flip_rate, seed=seed)
    doc["committed_root"] = commitment(generate_challenges(DEMO_KEY, 64)).hex()
    return doc


def _job(job_id: str, transcript: dict[str, Any]) -> dict[str, Any]:
    verdict = transcript["decision"]["verdict"]
    root = transcript["root"]
    return {
        "id": job_id,
        "kind": "verify",
        "status": "succeeded",
        "finished_at": "2026-12-01T10:00:09Z",
        "result": {
            "verdict": verdict,
            "tolerance": "exact",
            "alpha": 0.01,
            "challenges_used": transcript["decision"]["challenges_used"],
            "challenges_max": 64,
            "consensus": {
                "validators": 5,
                "quorum": 4,
                "agreeing": 5,
                "votes": [
                    {
                        "validator": i,
                        "verdict": verdict,
                        "digest": C.vote_digest(job_id, root, verdict),
                    }
                    for i in range(5)
                ],
            },
        },
    }


SAME_ID = "11111111-2222-3333-4444-555555555555"
DIFF_ID = "66666666-7777-8888-9999-000000000000"


@pytest.fixture(scope="module")
def key() -> Any:
    return C.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def same() -> dict[str, Any]:
    return _transcript(0.0, seed=1)


@pytest.fixture(scope="module")
def different() -> dict[str, Any]:
    return _transcript(0.4, seed=2)


@pytest.fixture(scope="module")
def cert(key: Any, same: dict[str, Any]) -> bytes:
    statement = C.build_statement(
        _job(SAME_ID, same),
        same,
        subject=C.model_subject("gpt2-a-copy", "ab" * 32),
        reference={"model_id": "gpt2-a"},
    )
    return C.envelope_bytes(C.sign(statement, key))


def test_pae_is_dsse_v1() -> None:
    # The DSSE specification's own example.
    assert C.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_a_genuine_certificate_verifies_with_and_without_its_transcript(
    key: Any, cert: bytes, same: dict[str, Any]
) -> None:
    pub = C.load_public_key(C.public_pem(key))
    ok = C.verify(cert, pub)
    assert ok.keyid == C.keyid(key) and not ok.checked_transcript
    p = ok.predicate
    assert p["verdict"] == "SAME" and p["transcript"]["root"] == same["root"]
    assert p["challenge_commitment"] == same["committed_root"]
    assert p["challenges"]["used"] == same["decision"]["challenges_used"]
    assert len(p["consensus"]["votes"]) == 5
    assert ok.statement["_type"] == "https://in-toto.io/Statement/v1"
    assert ok.statement["subject"][0]["digest"] == {C.SUBJECT_DIGEST: "ab" * 32}
    assert C.verify(cert, pub, same).checked_transcript


def test_signing_is_deterministic(key: Any, same: dict[str, Any], cert: bytes) -> None:
    statement = json.loads(base64.b64decode(json.loads(cert)["payload"]))
    assert C.envelope_bytes(C.sign(statement, key)) == cert


def test_every_flipped_byte_fails(key: Any, cert: bytes) -> None:
    pub = C.load_public_key(C.public_pem(key))
    for pos in range(len(cert)):
        for mask in (0x01, 0x20):
            bad = bytearray(cert)
            bad[pos] ^= mask
            with pytest.raises(C.CertificateError):
                C.verify(bytes(bad), pub)


def test_reformatted_certificate_fails_with_a_clear_message(key: Any, cert: bytes) -> None:
    pretty = (json.dumps(json.loads(cert), indent=2) + "\n").encode()
    with pytest.raises(C.CertificateError, match="canonical form"):
        C.verify(pretty, C.load_public_key(C.public_pem(key)))


def test_another_key_is_named(cert: bytes) -> None:
    other = C.Ed25519PrivateKey.generate()
    with pytest.raises(C.CertificateError, match="not by the given key"):
        C.verify(cert, other.public_key())


def test_a_forged_signature_under_the_right_keyid_fails(key: Any, cert: bytes) -> None:
    env = json.loads(cert)
    other = C.Ed25519PrivateKey.generate()
    forged = other.sign(C.pae(C.PAYLOAD_TYPE, base64.b64decode(env["payload"])))
    env["signatures"][0]["sig"] = base64.b64encode(forged).decode()
    with pytest.raises(C.CertificateError, match="signature does not verify"):
        C.verify(C.envelope_bytes(env), key.public_key())


def test_another_jobs_transcript_fails(key: Any, cert: bytes, different: dict[str, Any]) -> None:
    with pytest.raises(C.CertificateError, match="another job's transcript"):
        C.verify(cert, key.public_key(), different)


def test_a_doctored_transcript_fails(key: Any, cert: bytes, same: dict[str, Any]) -> None:
    doc = copy.deepcopy(same)
    doc["decision"]["verdict"] = "DIFFERENT"
    with pytest.raises(C.CertificateError, match="does not audit"):
        C.verify(cert, key.public_key(), doc)


def test_votes_must_attest_the_transcript(key: Any, same: dict[str, Any]) -> None:
    job = _job(SAME_ID, same)
    job["result"]["consensus"]["votes"][2]["digest"] = C.vote_digest(DIFF_ID, same["root"], "SAME")
    statement = C.build_statement(job, same, C.model_subject("x", "00" * 32), {})
    cert = C.envelope_bytes(C.sign(statement, key))
    C.verify(cert, key.public_key())  # the signature itself is fine
    with pytest.raises(C.CertificateError, match="validator 2's vote digest"):
        C.verify(cert, key.public_key(), same)


def test_vote_digest_is_the_consensus_one_and_its_format_is_fixed() -> None:
    """Stored votes and issued certificates carry these digests: the bytes must not drift."""
    from rev_tasks.tasks.consensus import vote_digest

    assert vote_digest is C.vote_digest  # one function: the validators' and the verifier's
    text = f'{{"job_id":"{SAME_ID}","transcript_root":"{"ab" * 32}","verdict":"SAME"}}'
    assert C.vote_digest(SAME_ID, "ab" * 32, "SAME") == hashlib.sha256(text.encode()).hexdigest()


def test_no_certificate_without_a_published_verdict(same: dict[str, Any]) -> None:
    job = _job(SAME_ID, same)
    job["status"] = "failed"
    with pytest.raises(C.CertificateError, match="no published verdict"):
        C.build_statement(job, same, C.model_subject("x", "00" * 32), {})


def test_weights_digest_is_sha256sum_of_sha256sum(tmp_path: Path) -> None:
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"second shard")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"first shard")
    (tmp_path / "config.json").write_text("{}")  # not a weight file
    shell = (
        "sha256sum $(ls | LC_ALL=C sort | grep -E '\\.(safetensors|bin|pt|pth|gguf)$') "
        "| sha256sum | cut -d' ' -f1"
    )
    expected = subprocess.run(
        shell, shell=True, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert C.weights_digest(tmp_path) == expected
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"first shard!")
    assert C.weights_digest(tmp_path) != expected


def test_endpoint_subject_names_url_and_model() -> None:
    a = C.endpoint_subject("http://127.0.0.1:9000/v1", "smollm2")
    b = C.endpoint_subject("http://127.0.0.1:9000/v1", "smollm2-q4")
    assert a["name"] == "http://127.0.0.1:9000/v1#smollm2"
    assert a["digest"] != b["digest"]


def test_signing_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "certificate.key"
    key = C.ensure_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = C.create_signing_key(path)  # O_EXCL: the existing key wins
    assert C.keyid(again) == C.keyid(key) == C.keyid(C.load_signing_key(path))
    path.write_text("not a key")
    with pytest.raises(C.CertificateError, match="not a PEM private key"):
        C.load_signing_key(path)


def test_weights_digest_is_remembered_only_while_the_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    first = C.weights_digest(tmp_path)
    # Just written: its timestamps could still be shared by a same-size rewrite, not cached.
    assert not any(k[0] == str(weights) for k in C._DIGESTS)

    monkeypatch.setattr(C, "_SETTLED_SECONDS", -1e9)  # treat every file as settled
    assert C.weights_digest(tmp_path) == first
    (stamp,) = [k for k in C._DIGESTS if k[0] == str(weights)]
    # The entry is what answers while the file is unchanged ...
    monkeypatch.setitem(C._DIGESTS, stamp, "0" * 64)
    assert C.file_sha256(weights) == "0" * 64
    # ... and no longer once it is rewritten in place, same size, its mtime put back.
    before = weights.stat()
    time.sleep(0.05)  # past the kernel's timestamp tick: the rule above is switched off here
    weights.write_bytes(b"b" * 4096)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert C.file_sha256(weights) == hashlib.sha256(b"b" * 4096).hexdigest()
    assert C.weights_digest(tmp_path) != first
