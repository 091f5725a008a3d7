"""Verification transcripts: every signature committed in a Merkle tree, auditable offline.

A transcript lets someone who does not trust the farm re-check a verdict without the key or
the models: the per-record inclusion proofs tie each signature pair to the published root,
the differing-bit counts are recomputed from the signatures, and the decision is replayed
with :func:`rev_tasks.core.decision.decide`. Document layout (``format`` = rev-transcript/1)::

    {"format", "key_id", "challenge_commitment", "parameters": {tolerance, alpha,
     max_challenges, delta, p0, p1, bits_per_site}, "sites", "reference", "candidate",
     "records": [{index, challenge, challenge_hash, reference, candidate, differing_bits,
                  total_bits, proof}], "root", "decision", optional "calibration"}

A ``precision`` transcript made after self-calibration carries ``calibration``
(:mod:`rev_tasks.core.calibration`): the reference's own cast distances, from which the audit
re-derives ``delta``; one without it (made before) is held to the fixed delta of TOLERANCES.

Leaf data of record i is :meth:`Record.leaf_bytes` (canonical JSON without the proof).

A farm job's transcript also says how its challenge set was derived, so that anyone with
the farm key can re-derive it and the ``committed_root`` made before inference
(:func:`audit_challenges`): ``challenge_nonce`` (hex, a job with two model folders; record
indices are then 0, 1, 2 …) or ``challenge_indices`` (the job's draw from a registered
model's pool, in order; the records are its first entries). A transcript with neither uses
the key's challenges 0..n-1 (``rev verify``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rev_tasks.core.calibration import check_calibration
from rev_tasks.core.challenges import NONCE_BYTES, Challenge, commitment, job_challenges
from rev_tasks.core.compat import incompatibility
from rev_tasks.core.decision import (
    MAX_CHALLENGES_LIMIT,
    TOLERANCES,
    Decision,
    ToleranceSpec,
    decide,
)
from rev_tasks.core.hamming import hamming
from rev_tasks.core.merkle import all_inclusion_proofs, merkle_root, verify_inclusion

__all__ = [
    "FORMAT",
    "Record",
    "audit",
    "audit_challenges",
    "build_transcript",
    "canonical_json",
]

FORMAT = "rev-transcript/1"
_HEX = frozenset("0123456789abcdef")

_TOP_KEYS = (
    "format",
    "key_id",
    "challenge_commitment",
    "parameters",
    "sites",
    "reference",
    "candidate",
    "records",
    "root",
    "decision",
)
_PARAM_KEYS = ("tolerance", "alpha", "max_challenges", "delta", "p0", "p1", "bits_per_site")
_RECORD_KEYS = (
    "index",
    "challenge",
    "challenge_hash",
    "reference",
    "candidate",
    "differing_bits",
    "total_bits",
    "proof",
)
_CHALLENGE_FIELDS = {"index": int, "template_id": str, "domain": str, "prompt": str}


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the byte form everything in the project hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _sig_bytes(sig: np.ndarray | bytes) -> bytes:
    if isinstance(sig, bytes | bytearray):
        return bytes(sig)
    if isinstance(sig, np.ndarray) and sig.dtype == np.uint8 and sig.ndim == 1:
        return sig.tobytes()
    raise ValueError("signatures must be bytes or 1-D uint8 numpy arrays")


@dataclass(frozen=True)
class Record:
    """One challenge's committed evidence: both sides' signatures per site and their distance.

    ``reference``/``candidate`` map the site (as a decimal string) to packed signature bytes.
    """

    index: int
    challenge_hash: bytes
    reference: dict[str, bytes]
    candidate: dict[str, bytes]
    differing_bits: int
    total_bits: int

    def __post_init__(self) -> None:
        # Normalise what callers naturally pass (int site keys, uint8 arrays) so that the
        # leaf bytes are canonical: JSON would sort int keys numerically (0, 2, 10) but the
        # auditor sees string keys, sorted as strings ("0", "10", "2").
        object.__setattr__(self, "challenge_hash", bytes(self.challenge_hash))
        object.__setattr__(
            self, "reference", {str(k): _sig_bytes(v) for k, v in self.reference.items()}
        )
        object.__setattr__(
            self, "candidate", {str(k): _sig_bytes(v) for k, v in self.candidate.items()}
        )
        for name in ("index", "differing_bits", "total_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
                raise ValueError(f"Record.{name} must be a non-negative int, got {v!r}")
            object.__setattr__(self, name, int(v))

    @classmethod
    def from_signatures(
        cls,
        index: int,
        challenge_hash: bytes,
        reference: Mapping[int | str, np.ndarray | bytes],
        candidate: Mapping[int | str, np.ndarray | bytes],
    ) -> Record:
        """Build a record from per-site signatures, counting the differing bits here."""
        ref = {str(k): _sig_bytes(v) for k, v in reference.items()}
        cand = {str(k): _sig_bytes(v) for k, v in candidate.items()}
        if set(ref) != set(cand):
            raise ValueError(f"sites differ: reference {sorted(ref)} vs candidate {sorted(cand)}")
        differing = total = 0
        for site in ref:
            r, c = ref[site], cand[site]
            if len(r) != len(c):
                raise ValueError(f"site {site}: signature lengths differ ({len(r)} vs {len(c)})")
            differing += hamming(np.frombuffer(r, np.uint8), np.frombuffer(c, np.uint8))
            total += 8 * len(r)
        return cls(index, bytes(challenge_hash), ref, cand, differing, total)

    @property
    def distance(self) -> float:
        """Normalised Hamming distance over all sites, in [0, 1]."""
        return self.differing_bits / self.total_bits if self.total_bits else 0.0

    def leaf_bytes(self) -> bytes:
        """Canonical JSON of the record without its proof: the Merkle leaf data."""
        return canonical_json(self._body())

    def _body(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "challenge_hash": self.challenge_hash.hex(),
            "reference": {k: _b64(v) for k, v in self.reference.items()},
            "candidate": {k: _b64(v) for k, v in self.candidate.items()},
            "differing_bits": self.differing_bits,
            "total_bits": self.total_bits,
        }


def build_transcript(
    records: Sequence[Record],
    challenges: Sequence[Challenge],
    key_id: str,
    params: Mapping[str, Any],
    sites: Sequence[int],
    reference_descriptor: Mapping[str, Any],
    candidate_descriptor: Mapping[str, Any],
    decision: Decision | Mapping[str, Any],
) -> dict[str, Any]:
    """Assemble the JSON-ready transcript document (format rev-transcript/1).

    ``challenges`` may be the whole committed set; the ones whose index appears in
    ``records`` are embedded and committed (``challenge_commitment``) in record order.
    ``params`` needs tolerance, alpha, max_challenges and bits_per_site; delta, p0 and p1
    default to the named tolerance's constants. Raises ValueError on inconsistent input
    (that is a caller bug, not something to publish).
    """
    dec = decision.to_dict() if isinstance(decision, Decision) else dict(decision)
    if dec.get("challenges_used") != len(records):
        raise ValueError(
            f"{len(records)} records but the decision used {dec.get('challenges_used')} "
            "challenges: drop records past the decision point"
        )
    if not (isinstance(key_id, str) and len(key_id) == 32 and set(key_id) <= _HEX):
        raise ValueError(f"key_id must be 32 lowercase hex digits (keys.key_id), got {key_id!r}")
    tol = params["tolerance"]
    tol = getattr(tol, "value", tol)
    if tol not in TOLERANCES:
        raise ValueError(f"unknown tolerance {tol!r}")
    spec = TOLERANCES[tol]
    parameters = {
        "tolerance": tol,
        "alpha": float(params["alpha"]),
        "max_challenges": int(params["max_challenges"]),
        "delta": float(params.get("delta", spec.delta)),
        "p0": float(params.get("p0", spec.p0)),
        "p1": float(params.get("p1", spec.p1)),
        "bits_per_site": int(params["bits_per_site"]),
    }
    by_index = {c.index: c for c in challenges}
    used: list[Challenge] = []
    for r in records:
        c = by_index.get(r.index)
        if c is None:
            raise ValueError(f"record {r.index}: no challenge with that index was given")
        if c.digest() != r.challenge_hash:
            raise ValueError(f"record {r.index}: challenge_hash does not match the challenge")
        used.append(c)
    root, proofs = all_inclusion_proofs([r.leaf_bytes() for r in records])
    out_records = []
    for r, c, proof in zip(records, used, proofs, strict=True):
        body = r._body()
        out_records.append(
            {
                "index": body["index"],
                "challenge": {
                    "index": c.index,
                    "template_id": c.template_id,
                    "domain": c.domain,
                    "prompt": c.prompt,
                },
                "challenge_hash": body["challenge_hash"],
                "reference": body["reference"],
                "candidate": body["candidate"],
                "differing_bits": body["differing_bits"],
                "total_bits": body["total_bits"],
                "proof": [p.hex() for p in proof],
            }
        )
    return {
        "format": FORMAT,
        "key_id": key_id,
        "challenge_commitment": merkle_root([c.digest() for c in used]).hex(),
        "parameters": parameters,
        "sites": [int(s) for s in sites],
        "reference": dict(reference_descriptor),
        "candidate": dict(candidate_descriptor),
        "records": out_records,
        "root": root.hex(),
        "decision": dec,
    }


# ----------------------------------------------------------------------------- audit


def _hex32(value: Any, what: str, problems: list[str]) -> bytes | None:
    if not isinstance(value, str):
        problems.append(f"{what}: expected a hex string, got {type(value).__name__}")
        return None
    try:
        b = bytes.fromhex(value)
    except ValueError:
        problems.append(f"{what}: not valid hex")
        return None
    if len(b) != 32:
        problems.append(f"{what}: expected 32 bytes (64 hex digits), got {len(b)}")
        return None
    return b


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _audit_calibration(
    spec: ToleranceSpec, calibration: Any, problems: list[str], check_constants: bool
) -> bool:
    """A transcript's calibration block fixes precision's delta: re-derive and compare.

    Returns True when the block is present (so delta is not compared with the fixed one).
    """
    if calibration is None:
        return False
    if spec.name != "precision":
        problems.append(f"calibration: only 'precision' is calibrated, not '{spec.name}'")
        return True
    cal_problems = check_calibration(calibration, check_constants=check_constants)
    problems += [f"calibration: {p}" for p in cal_problems]
    if not cal_problems and spec.delta != float(calibration["delta"]):
        problems.append(
            f"parameters: delta {spec.delta} is not the calibrated {calibration['delta']}"
        )
    return True


def _audit_parameters(
    params: Any, problems: list[str], check_constants: bool, calibration: Any = None
) -> tuple[ToleranceSpec, float, int, int] | None:
    if not isinstance(params, dict):
        problems.append("parameters: expected an object")
        return None
    missing = [k for k in _PARAM_KEYS if k not in params]
    if missing:
        problems.append(f"parameters: missing {', '.join(missing)}")
        return None
    tol = params["tolerance"]
    if not isinstance(tol, str) or tol not in TOLERANCES:
        problems.append(f"parameters: unknown tolerance {tol!r}")
        return None
    ok = True
    for k in ("alpha", "delta", "p0", "p1"):
        if not _is_num(params[k]):
            problems.append(f"parameters: {k} must be a finite number, got {params[k]!r}")
            ok = False
    for k in ("max_challenges", "bits_per_site"):
        if not _is_int(params[k]):
            problems.append(f"parameters: {k} must be an integer, got {params[k]!r}")
            ok = False
    if not ok:
        return None
    alpha, budget, bits = float(params["alpha"]), params["max_challenges"], params["bits_per_site"]
    if not 0.0 < alpha <= 0.5:
        problems.append(f"parameters: alpha must be in (0, 0.5], got {alpha}")
        ok = False
    if not 1 <= budget <= MAX_CHALLENGES_LIMIT:
        problems.append(f"parameters: max_challenges must be in [1, {MAX_CHALLENGES_LIMIT}]")
        ok = False
    if bits <= 0 or bits % 8:
        problems.append(f"parameters: bits_per_site must be a positive multiple of 8, got {bits}")
        ok = False
    try:
        spec = ToleranceSpec(
            tol, float(params["delta"]), float(params["p0"]), float(params["p1"]), "from transcript"
        )
    except ValueError as e:
        problems.append(f"parameters: {e}")
        return None
    calibrated = _audit_calibration(spec, calibration, problems, check_constants)
    if check_constants:
        cur = TOLERANCES[tol]
        expected_delta = spec.delta if calibrated else cur.delta
        if (spec.delta, spec.p0, spec.p1) != (expected_delta, cur.p0, cur.p1):
            problems.append(
                f"parameters: delta/p0/p1 = {spec.delta}/{spec.p0}/{spec.p1} differ from the "
                f"current '{tol}' tolerance {cur.delta}/{cur.p0}/{cur.p1} "
                "(audit with check_constants=False for a transcript made before recalibration)"
            )
    if not ok:
        return None
    return spec, alpha, budget, bits


def _audit_sigs(
    value: Any,
    side: str,
    where: str,
    sites: list[str] | None,
    nbytes: int | None,
    problems: list[str],
) -> dict[str, bytes] | None:
    if not isinstance(value, dict):
        problems.append(f"{where}: {side} signatures must be an object of site -> base64")
        return None
    out: dict[str, bytes] = {}
    for site, s in value.items():
        if not isinstance(s, str):
            problems.append(f"{where}: {side} site {site}: signature is not a base64 string")
            return None
        try:
            out[site] = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"{where}: {side} site {site}: bad base64")
            return None
    if sites is not None and sorted(out) != sorted(sites):
        problems.append(f"{where}: {side} sites {sorted(out)} differ from the transcript's {sites}")
        return None
    if nbytes is not None:
        for site, b in out.items():
            if len(b) != nbytes:
                problems.append(
                    f"{where}: {side} site {site}: signature has {8 * len(b)} bits, "
                    f"expected bits_per_site={8 * nbytes}"
                )
                return None
    return out


def _audit_record(
    pos: int, rec: Any, sites: list[str] | None, nbytes: int | None, problems: list[str]
) -> tuple[Record, bytes, float] | None:
    """Check one record on its own.

    Returns (record as written, its challenge hash, distance recomputed from the signatures)
    when it parsed, so proofs use the written bytes and the replay uses the true distance.
    """
    where = f"record {pos}"
    if not isinstance(rec, dict):
        problems.append(f"{where}: expected an object")
        return None
    missing = [k for k in _RECORD_KEYS if k not in rec]
    if missing:
        problems.append(f"{where}: missing {', '.join(missing)}")
        return None
    index = rec["index"]
    if not _is_int(index) or index < 0:
        problems.append(f"{where}: index must be a non-negative integer, got {index!r}")
        return None
    where = f"record {pos} (index {index})"
    ch_hash = _hex32(rec["challenge_hash"], f"{where}: challenge_hash", problems)
    ch = rec["challenge"]
    if not (
        isinstance(ch, dict)
        and set(ch) == set(_CHALLENGE_FIELDS)
        and all(
            isinstance(ch[k], t) and not isinstance(ch[k], bool)
            for k, t in _CHALLENGE_FIELDS.items()
        )
    ):
        problems.append(f"{where}: challenge must have exactly {sorted(_CHALLENGE_FIELDS)}")
    else:
        challenge = Challenge(**ch)
        if challenge.index != index:
            problems.append(f"{where}: challenge.index {challenge.index} != record index")
        if ch_hash is not None and challenge.digest() != ch_hash:
            problems.append(
                f"{where}: challenge_hash is not sha256 of the challenge's canonical bytes"
            )
    ref = _audit_sigs(rec["reference"], "reference", where, sites, nbytes, problems)
    cand = _audit_sigs(rec["candidate"], "candidate", where, sites, nbytes, problems)
    db, tb = rec["differing_bits"], rec["total_bits"]
    if not _is_int(db) or not _is_int(tb):
        problems.append(f"{where}: differing_bits and total_bits must be integers")
        return None
    if ref is None or cand is None or ch_hash is None:
        return None
    if sorted(ref) != sorted(cand):
        problems.append(f"{where}: reference and candidate cover different sites")
        return None
    recount = 0
    total = 0
    for site in ref:
        a, b = ref[site], cand[site]
        if len(a) != len(b):
            problems.append(f"{where}: site {site}: reference and candidate lengths differ")
            return None
        recount += hamming(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
        total += 8 * len(a)
    if db != recount:
        problems.append(f"{where}: differing_bits {db} != {recount} recomputed from the signatures")
    if tb != total:
        problems.append(f"{where}: total_bits {tb} != {total} bits in the signatures")
    if tb <= 0:
        problems.append(f"{where}: total_bits must be positive")
        return None
    # Returned even when a check above failed (already reported), so that its proof and
    # the root are still checked.
    return Record(index, ch_hash, ref, cand, db, tb), ch_hash, recount / total


def _audit_derivation(
    doc: dict[str, Any], budget: int | None, problems: list[str]
) -> list[int] | None:
    """The pool draw of the transcript (None without one); problems for malformed fields."""
    if "challenge_nonce" in doc and "challenge_indices" in doc:
        problems.append("challenges: a transcript has a nonce or a pool draw, not both")
    nonce = doc.get("challenge_nonce")
    if "challenge_nonce" in doc and not (
        isinstance(nonce, str) and len(nonce) == 2 * NONCE_BYTES and set(nonce) <= _HEX
    ):
        problems.append(f"challenge_nonce: expected {2 * NONCE_BYTES} lowercase hex digits")
    if "challenge_indices" not in doc:
        return None
    drawn = doc["challenge_indices"]
    if (
        not isinstance(drawn, list)
        or not all(_is_int(i) and i >= 0 for i in drawn)
        or len(set(drawn)) != len(drawn)
    ):
        problems.append("challenge_indices: expected a list of distinct non-negative integers")
        return []
    if budget is not None and len(drawn) != budget:
        problems.append(
            f"challenge_indices: {len(drawn)} drawn but parameters.max_challenges is {budget}"
        )
    return drawn


def audit_challenges(transcript: Any, key: bytes) -> list[str]:
    """With the farm key: re-derive the job's committed challenge set and check it.

    The committed root (fixed before inference) must be the commitment of the set the
    transcript's nonce or pool draw names, and every record's challenge must be that set's
    challenge at its position. Malformed input gives problem lines, never an exception.
    """
    problems: list[str] = []
    try:
        doc = transcript
        budget = int(doc["parameters"]["max_challenges"])
        nonce = doc.get("challenge_nonce")
        drawn = doc.get("challenge_indices")
        derived = job_challenges(
            key,
            budget,
            nonce=bytes.fromhex(nonce) if nonce is not None else None,
            indices=drawn,
        )
        if doc.get("committed_root") != commitment(derived).hex():
            problems.append(
                "committed_root: not the commitment of the challenge set the key derives"
            )
        for pos, rec in enumerate(doc.get("records") or []):
            if pos >= len(derived) or Challenge(**rec["challenge"]) != derived[pos]:
                problems.append(f"record {pos}: its challenge is not the one the key derives")
    except Exception as e:  # noqa: BLE001 - report, never raise
        problems.append(f"challenges: malformed transcript ({type(e).__name__}: {e})")
    return problems


def audit(transcript: Any, *, check_constants: bool = True) -> list[str]:
    """Re-check a transcript offline; return one line per problem (empty list = valid).

    Checks the format, every challenge hash, every differing-bit count (recomputed from the
    signatures), every inclusion proof, the root, the challenge commitment and the decision
    (replayed with ``decide``). Malformed input gives problem lines, never an exception.
    With ``check_constants`` (default) the transcript's delta/p0/p1 must also equal the
    current tolerance constants.
    """
    problems: list[str] = []
    try:
        _audit(transcript, problems, check_constants)
    except Exception as e:  # noqa: BLE001 - the contract is "never raise"; report instead
        problems.append(f"audit: malformed transcript ({type(e).__name__}: {e})")
    return problems


def _audit_incompatible(
    doc: dict[str, Any], dec: dict[str, Any], size: int, problems: list[str]
) -> None:
    """A verdict reached without challenges: only valid when the descriptors really differ."""
    ref, cand = doc["reference"], doc["candidate"]
    if not isinstance(ref, dict) or not isinstance(cand, dict) or not incompatibility(ref, cand):
        problems.append("incompatible: the descriptors can be compared site for site")
    if size or dec["challenges_used"] != 0:
        problems.append("incompatible: an incompatible pair must have no records")
    if dec["verdict"] != "DIFFERENT":
        problems.append(f"decision: verdict {dec['verdict']!r} for an incompatible pair")


def _audit(doc: Any, problems: list[str], check_constants: bool) -> None:
    if not isinstance(doc, dict):
        problems.append("transcript: expected a JSON object")
        return
    if doc.get("format") != FORMAT:
        problems.append(f"format: expected {FORMAT!r}, got {doc.get('format')!r}")
        return
    missing = [k for k in _TOP_KEYS if k not in doc]
    if missing:
        problems.append(f"transcript: missing {', '.join(missing)}")
        return

    params = _audit_parameters(doc["parameters"], problems, check_constants, doc.get("calibration"))
    nbytes = params[3] // 8 if params else None

    sites_raw = doc["sites"]
    sites: list[str] | None = None
    if (
        not isinstance(sites_raw, list)
        or not sites_raw
        or not all(_is_int(s) for s in sites_raw)
        or len(set(sites_raw)) != len(sites_raw)
    ):
        problems.append("sites: expected a non-empty list of distinct integers")
    else:
        sites = sorted(str(s) for s in sites_raw)
    for side in ("reference", "candidate"):
        if not isinstance(doc[side], dict):
            problems.append(f"{side}: descriptor must be an object")
    kid = doc["key_id"]
    if not (isinstance(kid, str) and len(kid) == 32 and set(kid) <= _HEX):
        problems.append("key_id: expected 32 lowercase hex digits")

    root = _hex32(doc["root"], "root", problems)
    commit = _hex32(doc["challenge_commitment"], "challenge_commitment", problems)
    records = doc["records"]
    if not isinstance(records, list):
        problems.append("records: expected a list")
        return
    size = len(records)

    drawn = _audit_derivation(doc, params[2] if params else None, problems)
    parsed: list[tuple[Record, bytes, float] | None] = []
    prev_index: int | None = None
    for pos, rec in enumerate(records):
        item = _audit_record(pos, rec, sites, nbytes, problems)
        parsed.append(item)
        if item is None:
            prev_index = None
            continue
        record = item[0]
        if drawn is not None:
            if pos >= len(drawn) or record.index != drawn[pos]:
                problems.append(
                    f"record {pos} (index {record.index}): not the job's challenge at position "
                    f"{pos} of challenge_indices"
                )
        elif pos == 0 and "challenge_nonce" in doc and record.index != 0:
            problems.append(f"record 0 (index {record.index}): a nonce job's records start at 0")
        elif prev_index is not None and record.index != prev_index + 1:
            problems.append(
                f"record {pos} (index {record.index}): records are not in consecutive "
                f"index order (previous index {prev_index})"
            )
        prev_index = record.index
        proof_hex = rec["proof"]
        proof: list[bytes] | None = None
        if isinstance(proof_hex, list) and all(isinstance(p, str) for p in proof_hex):
            try:
                proof = [bytes.fromhex(p) for p in proof_hex]
            except ValueError:
                proof = None
        if proof is None:
            problems.append(f"record {pos} (index {record.index}): proof must be a list of hex")
        elif root is not None and not verify_inclusion(record.leaf_bytes(), pos, size, proof, root):
            problems.append(
                f"record {pos} (index {record.index}): inclusion proof does not verify "
                "against the root"
            )

    complete = all(p is not None for p in parsed)
    if not complete:
        problems.append(
            "records: some records are malformed; root, commitment and decision were not recomputed"
        )
        return
    good = [p for p in parsed if p is not None]
    if root is not None and merkle_root([r.leaf_bytes() for r, _, _ in good]) != root:
        problems.append("root: recomputed Merkle root over the records differs from the root")
    if commit is not None and merkle_root([h for _, h, _ in good]) != commit:
        problems.append(
            "challenge_commitment: Merkle root of the records' challenge hashes differs"
        )

    dec = doc["decision"]
    if not isinstance(dec, dict) or "verdict" not in dec or "challenges_used" not in dec:
        problems.append("decision: expected an object with verdict and challenges_used")
        return
    if doc.get("incompatible") is True:
        _audit_incompatible(doc, dec, size, problems)
        return
    if dec["challenges_used"] != size:
        problems.append(
            f"records: {size} records but decision.challenges_used = {dec['challenges_used']!r}"
        )
    if params is None:
        problems.append("decision: not replayed because the parameters are invalid")
        return
    spec, alpha, budget, _ = params
    replay = decide([d for _, _, d in good], spec, alpha, budget)
    if replay.verdict != dec["verdict"]:
        problems.append(
            f"decision: verdict {dec['verdict']!r} but replaying the records gives "
            f"{replay.verdict!r} after {replay.challenges_used} challenges"
        )
    if replay.challenges_used != dec["challenges_used"]:
        problems.append(
            f"decision: challenges_used {dec['challenges_used']!r} but the replay stops after "
            f"{replay.challenges_used}"
        )
    if "mismatches" in dec and replay.mismatches != dec["mismatches"]:
        problems.append(
            f"decision: mismatches {dec['mismatches']!r} but the replay counts {replay.mismatches}"
        )
    if replay.verdict == "UNDECIDED" and replay.challenges_used < budget:
        problems.append(
            f"decision: the records end after {replay.challenges_used} challenges, before any "
            f"threshold and before the budget of {budget}"
        )
