"""Signed verdict certificates: an in-toto Statement in a DSSE envelope, signed with Ed25519.

Pure functions (no Flask, Celery or database): build the statement from a job document and
its transcript, sign it, and verify an envelope offline, with or without the transcript.
The format, the subject's digest and key rotation are described in docs/certificates.md.

A certificate file is the envelope's canonical JSON (sorted keys, no spaces) and one
newline. :func:`verify` insists on exactly that form, so that changing any byte of the file
(a space, an escape, base64's unused padding bits) fails instead of verifying by accident.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rev_tasks.core.transcript import canonical_json

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "urn:rev-farm:predicate:verification:v1"
SUBJECT_DIGEST = "rev-weights-sha256"
ENDPOINT_DIGEST = "rev-endpoint-sha256"
# Files whose bytes are the model's weights (the folder checks allow no others to load).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class CertificateError(ValueError):
    """A certificate that does not verify, or cannot be made; ``str()`` is one line."""


# ----------------------------------------------------------------------------- keys
def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keyid(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The public name of a signing key: sha256 hex of its 32 raw public-key bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(public_key_bytes(public)).hexdigest()


def public_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(pem: bytes | str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM; anything else is a one-line :class:`CertificateError`."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise CertificateError("not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise CertificateError(f"the public key is {type(key).__name__}, not Ed25519")
    return key


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The farm's Ed25519 private key from a PEM (PKCS#8, unencrypted) file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise CertificateError(f"signing key file not found: {path}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"signing key file {path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CertificateError(f"signing key file {path} holds {type(key).__name__}, not Ed25519")
    return key


def create_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Write a new key to ``path`` (mode 0600, never over an existing file) and return it.

    ``O_EXCL`` makes two processes racing on one host agree: the loser reads the winner's key.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_signing_key(target)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def ensure_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The key at ``path``, created first when the file does not exist (the local stack)."""
    return load_signing_key(path) if Path(path).exists() else create_signing_key(path)


# ----------------------------------------------------------------------------- subject
def weights_digest(folder: str | Path) -> str:
    """sha256 over the model folder's weight files, reproducible with coreutils.

    The digested text is what ``sha256sum`` prints for the top-level weight files sorted by
    name in byte order (``<hex>  <name>\\n`` per file), so
    ``cd MODEL && sha256sum $(ls | LC_ALL=C sort | grep -E '\\.(safetensors|bin|pt|pth|gguf)$') | sha256sum``
    gives the same hex.
    """
    root = Path(folder)
    names = sorted(
        (p.name for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)),
        key=lambda n: n.encode("utf-8"),
    )
    if not names:
        raise CertificateError(f"no weight files in {root}")
    manifest = hashlib.sha256()
    for name in names:
        manifest.update(f"{file_sha256(root / name)}  {name}\n".encode())
    return manifest.hexdigest()


# A worker digests the same weights for every job (0.4 s for MiniLM, seconds for an LLM).
# Entries are keyed by what any write changes (inode, size, mtime and ctime in ns) and kept
# only for files whose times were at least _SETTLED_SECONDS old when hashing began: the
# kernel's timestamps are coarse (a few ms), so a file rewritten at the same size within one
# tick would otherwise keep its old digest (git's "racy clean" rule, for the same reason).
_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}
_DIGESTS_MAX = 256
_SETTLED_SECONDS = 2.0


def file_sha256(path: Path) -> str:
    """sha256 of one file, remembered for as long as the file provably has not changed."""
    started = time.time()
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        stamp = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = _DIGESTS.get(stamp)
        if known is not None:
            return known
        h = hashlib.sha256()
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 < started - _SETTLED_SECONDS:
        if len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[stamp] = digest
    return digest


def model_subject(name: str, digest: str) -> dict[str, Any]:
    return {"name": name, "digest": {SUBJECT_DIGEST: digest}}


def endpoint_subject(url: str, model: str) -> dict[str, Any]:
    """A black-box candidate: named by its URL and model, digested over both (no weights)."""
    digest = hashlib.sha256(canonical_json({"model": model, "url": url})).hexdigest()
    return {"name": f"{url}#{model}", "digest": {ENDPOINT_DIGEST: digest}}


# ----------------------------------------------------------------------------- statement
def build_statement(
    job: Mapping[str, Any],
    transcript: Mapping[str, Any] | None,
    subject: dict[str, Any],
    reference: dict[str, Any],
) -> dict[str, Any]:
    """The in-toto Statement for a published job (a job document as the API returns it).

    ``reference`` names what the candidate was compared with (a registered model id, a
    folder's weights digest, a fingerprint commitment); ``subject`` is the candidate.
    """
    result = job.get("result") or {}
    verdict = result.get("verdict")
    if job.get("status") != "succeeded" or verdict is None:
        raise CertificateError(f"job {job.get('id')} has no published verdict")
    consensus = result.get("consensus") or {}
    votes = [
        {"validator": v["validator"], "verdict": v["verdict"], "digest": v["digest"]}
        for v in consensus.get("votes") or []
    ]
    predicate: dict[str, Any] = {
        "job": {"id": job["id"], "kind": job["kind"]},
        "reference": reference,
        "verdict": verdict,
        "tolerance": result.get("tolerance"),
        "alpha": result.get("alpha"),
        "challenges": {"used": result.get("challenges_used"), "max": result.get("challenges_max")},
        "published_at": job.get("finished_at"),
        "consensus": {
            "validators": consensus.get("validators"),
            "quorum": consensus.get("quorum"),
            "agreeing": consensus.get("agreeing"),
            "votes": votes,
        },
    }
    if job["kind"] == "verify":
        if transcript is None:
            raise CertificateError(f"job {job['id']} has no transcript")
        params = transcript.get("parameters") or {}
        predicate["transcript"] = {
            "format": transcript.get("format"),
            "root": transcript.get("root"),
            "records": len(transcript.get("records") or []),
            "key_id": transcript.get("key_id"),
        }
        predicate["challenge_commitment"] = transcript.get("committed_root")
        predicate["challenges"]["root"] = transcript.get("challenge_commitment")
        predicate["decision"] = {
            k: params.get(k) for k in ("delta", "p0", "p1", "max_challenges", "bits_per_site")
        }
    else:
        keys = ("model_id", "status", "mean_distance", "verdict", "challenges_used", "reason")
        predicate["ranking"] = [{k: r.get(k) for k in keys} for r in result.get("ranking") or []]
        # Never silently absent: the models that were not compared are named, with why.
        predicate["unavailable"] = [
            {k: r.get(k) for k in ("model_id", "reason")} for r in result.get("unavailable") or []
        ]
        predicate["evidence_root"] = result.get("transcript_root")
    return {
        "_type": STATEMENT_TYPE,
        "subject": [subject],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed, so the type cannot be swapped."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign(statement: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The DSSE envelope of ``statement`` (Ed25519 is deterministic: same input, same bytes)."""
    payload = canonical_json(statement)
    sig = key.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": keyid(key), "sig": base64.b64encode(sig).decode("ascii")}],
    }


def envelope_bytes(envelope: Mapping[str, Any]) -> bytes:
    """The certificate file: canonical JSON and a newline (the only form :func:`verify` takes)."""
    return canonical_json(envelope) + b"\n"


def vote_digest(job_id: str, transcript_root: str, verdict: str) -> str:
    """What a validator attests to, as the consensus stores it (sha256 of canonical JSON)."""
    doc = {"job_id": job_id, "transcript_root": transcript_root, "verdict": verdict}
    return hashlib.sha256(canonical_json(doc)).hexdigest()


# ----------------------------------------------------------------------------- verify
@dataclass(frozen=True)
class Verified:
    """What a valid certificate says: the statement, and which key signed it."""

    statement: dict[str, Any]
    keyid: str
    checked_transcript: bool

    @property
    def predicate(self) -> dict[str, Any]:
        return self.statement["predicate"]  # type: ignore[no-any-return]


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise CertificateError(f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CertificateError(f"{what} is not valid base64") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise CertificateError(f"{what} is not canonical base64 (edited?)")
    return raw


def verify(
    raw: bytes,
    public_key: Ed25519PublicKey,
    transcript: Mapping[str, Any] | None = None,
) -> Verified:
    """Check a certificate file's signature and, with ``transcript``, that it is this job's.

    Raises :class:`CertificateError` with the first reason it fails.
    """
    try:
        envelope = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CertificateError(f"the certificate is not JSON ({exc})") from exc
    if not isinstance(envelope, dict) or set(envelope) != {"payloadType", "payload", "signatures"}:
        raise CertificateError("not a DSSE envelope (payloadType, payload, signatures)")
    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise CertificateError(f"payloadType is {envelope['payloadType']!r}, not {PAYLOAD_TYPE}")
    payload = _b64(envelope["payload"], "payload")
    sigs = envelope["signatures"]
    if not isinstance(sigs, list) or not sigs or not all(isinstance(s, dict) for s in sigs):
        raise CertificateError("the envelope has no signatures")
    for s in sigs:
        _b64(s.get("sig"), "signature")
    if envelope_bytes(envelope) != raw:
        raise CertificateError(
            "the certificate file is not in its canonical form (it was edited or reformatted)"
        )
    want = keyid(public_key)
    mine = [s for s in sigs if s.get("keyid") == want]
    if not mine:
        named = ", ".join(str(s.get("keyid"))[:16] for s in sigs)
        raise CertificateError(
            f"the certificate was signed by key {named}…, not by the given key {want[:16]}… "
            "(fetch that key: GET /v1/certificates/key?keyid=…)"
        )
    try:
        public_key.verify(_b64(mine[0]["sig"], "signature"), pae(PAYLOAD_TYPE, payload))
    except InvalidSignature as exc:
        raise CertificateError(
            "the signature does not verify: the certificate was altered or signed by another key"
        ) from exc
    try:
        statement = json.loads(payload)
    except json.JSONDecodeError as exc:  # signed garbage: only a broken signer makes this
        raise CertificateError("the signed payload is not JSON") from exc
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        raise CertificateError("the payload is not a REV Farm verification statement")
    if transcript is not None:
        check_transcript(statement["predicate"], transcript)
    return Verified(statement=statement, keyid=want, checked_transcript=transcript is not None)


def check_transcript(predicate: Mapping[str, Any], transcript: Mapping[str, Any]) -> None:
    """The transcript is the one the certificate names, valid, and decides the same verdict."""
    from rev_tasks.core.transcript import audit

    named = predicate.get("transcript") or {}
    if not named:
        raise CertificateError("this certificate names no transcript (an identify job)")
    root = transcript.get("root") if isinstance(transcript, Mapping) else None
    if root != named.get("root"):
        raise CertificateError(
            f"the transcript's root {str(root)[:16]}… is not the certificate's "
            f"{str(named.get('root'))[:16]}… (another job's transcript?)"
        )
    problems = audit(dict(transcript), check_constants=False)
    if problems:
        raise CertificateError(f"the transcript does not audit: {problems[0]}")
    decision = transcript.get("decision") or {}
    if decision.get("verdict") != predicate.get("verdict"):
        raise CertificateError(
            f"the transcript decides {decision.get('verdict')}, the certificate says "
            f"{predicate.get('verdict')}"
        )
    used = (predicate.get("challenges") or {}).get("used")
    if decision.get("challenges_used") != used:
        raise CertificateError(
            f"the transcript used {decision.get('challenges_used')} challenges, the "
            f"certificate says {used}"
        )
    if transcript.get("committed_root") != predicate.get("challenge_commitment"):
        raise CertificateError(
            "the transcript's challenge commitment differs from the certificate's"
        )
    params = transcript.get("parameters") or {}
    if params.get("tolerance") != predicate.get("tolerance") or params.get(
        "alpha"
    ) != predicate.get("alpha"):
        raise CertificateError("the transcript's tolerance or alpha differs from the certificate's")
    job_id = (predicate.get("job") or {}).get("id")
    for vote in (predicate.get("consensus") or {}).get("votes") or []:
        if vote.get("digest") != vote_digest(str(job_id), str(root), str(vote.get("verdict"))):
            raise CertificateError(
                f"validator {vote.get('validator')}'s vote digest does not attest this transcript"
            )
