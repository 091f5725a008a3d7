"""The in-process verification loop: one implementation for the CLI and the farm's tasks.

A verification commits its challenge set first, then walks it in batches: both sides produce
signatures for the batch, each challenge's distance feeds the sequential test, and the loop
stops at the first decision (so at most one batch is computed past it; the records after the
decision point are dropped). The reference side is either a loaded model or a stored
fingerprint, which is how a farm job against a registered model runs only the candidate.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from rev_tasks.core.challenges import (
    Challenge,
    challenge_for,
    challenges_at,
    commitment,
    generate_challenges,
    job_challenges,
)
from rev_tasks.core.compat import incompatibility
from rev_tasks.core.decision import TOLERANCES, Decision, SequentialTest, decide
from rev_tasks.core.hamming import hamming
from rev_tasks.core.keys import key_id
from rev_tasks.core.merkle import merkle_root
from rev_tasks.core.transcript import Record, build_transcript
from rev_tasks.inference.loader import LoadedModel, default_sites
from rev_tasks.inference.signatures import DEFAULT_BITS, site_signatures

FINGERPRINT_FORMAT = "rev-fingerprint/1"
Progress = Callable[[int, int], None]
SiteSigs = dict[int, np.ndarray]


@dataclass(frozen=True)
class VerifyParams:
    """What a verification may spend and how sure it must be."""

    tolerance: str = "exact"
    alpha: float = 0.01
    max_challenges: int = 64
    batch_size: int = 8
    bits: int = DEFAULT_BITS

    def __post_init__(self) -> None:
        if self.tolerance not in TOLERANCES:
            raise ValueError(f"tolerance must be one of {', '.join(TOLERANCES)}")
        if not 0.0 < self.alpha <= 0.5:
            raise ValueError("alpha must be in (0, 0.5]")
        if not 1 <= self.max_challenges <= 4096:
            raise ValueError("max_challenges must be in 1..4096")
        if not 1 <= self.batch_size <= 256:
            raise ValueError("batch_size must be in 1..256")
        if self.bits < 64 or self.bits % 64:
            raise ValueError("bits must be a positive multiple of 64")


class Side(Protocol):
    """One party of a comparison: something that yields signatures for challenges."""

    descriptor: dict[str, Any]

    def signatures(
        self, challenges: Sequence[Challenge], sites: Sequence[int], key: bytes, bits: int
    ) -> list[SiteSigs]: ...


class ModelSide:
    """A loaded model: runs the challenges through it."""

    def __init__(self, model: LoadedModel) -> None:
        # Any object with LoadedModel's descriptor/pooled_states interface will do.
        self.model = model
        self.descriptor = dict(model.descriptor)

    def signatures(
        self, challenges: Sequence[Challenge], sites: Sequence[int], key: bytes, bits: int
    ) -> list[SiteSigs]:
        pooled = self.model.pooled_states([c.prompt for c in challenges], list(sites))
        return site_signatures(pooled, key, bits)


class FingerprintSide:
    """A stored fingerprint: signatures read back for the challenges it committed to."""

    def __init__(self, doc: dict[str, Any], key: bytes) -> None:
        problems = check_fingerprint(doc)
        if problems:
            raise ValueError(f"invalid fingerprint: {problems[0]}")
        if doc["key_id"] != key_id(key):
            raise ValueError("the fingerprint was made with a different secret key")
        self.doc = doc
        self.descriptor = dict(doc["descriptor"])
        self.bits = int(doc["bits"])
        self.sites = [int(s) for s in doc["sites"]]
        self.size = len(doc["signatures"])
        self._by_index = {int(e["index"]): e for e in doc["signatures"]}

    def signatures(
        self, challenges: Sequence[Challenge], sites: Sequence[int], key: bytes, bits: int
    ) -> list[SiteSigs]:
        if bits != self.bits or list(sites) != self.sites:
            raise ValueError("the fingerprint was made with other sites or signature sizes")
        out = []
        for c in challenges:
            entry = self._by_index.get(c.index)
            if entry is None:
                raise ValueError(f"the fingerprint has no challenge {c.index}")
            if entry["challenge_hash"] != c.digest().hex():
                raise ValueError(f"the fingerprint's challenge {c.index} does not match the key")
            out.append({int(s): _b64_sig(v) for s, v in entry["sigs"].items()})
        return out


def _b64(sig: np.ndarray) -> str:
    return base64.b64encode(sig.tobytes()).decode("ascii")


def _b64_sig(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8)


def as_side(obj: Any, key: bytes) -> Side:
    """A model (anything with ``pooled_states``, e.g. LoadedModel or a streamed model),
    a fingerprint document, or a ready-made side."""
    if isinstance(obj, dict):
        return FingerprintSide(obj, key)
    if hasattr(obj, "pooled_states"):
        return ModelSide(obj)
    return obj


def differing_bits(a: SiteSigs, b: SiteSigs, sites: Sequence[int]) -> int:
    return sum(hamming(a[s], b[s]) for s in sites)


@dataclass
class Outcome:
    """A finished verification: the published result and the auditable transcript."""

    result: dict[str, Any]
    transcript: dict[str, Any]
    decision: Decision
    distances: list[float] = field(default_factory=list)


def _summary(distances: Sequence[float]) -> dict[str, Any]:
    if not distances:
        return {"count": 0, "mean": None, "min": None, "max": None}
    arr = np.asarray(distances, dtype=np.float64)
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


class Verification:
    """Reference versus candidate under one key and one set of parameters."""

    def __init__(
        self,
        reference: LoadedModel | dict[str, Any] | Side,
        candidate: LoadedModel | Side,
        key: bytes,
        params: VerifyParams | None = None,
        *,
        nonce: bytes | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        """``nonce``: the job's own challenge sequence; ``indices``: its draw from the pool.

        Neither: the farm key's challenges 0..n-1 (the in-process ``rev verify``).
        """
        self.key = key
        self.params = params or VerifyParams()
        self.reference = as_side(reference, key)
        self.candidate = as_side(candidate, key)
        self.notes: list[str] = []
        self.nonce = nonce
        self.indices = list(indices) if indices is not None else None
        budget = self.params.max_challenges
        if self.indices is not None and len(self.indices) < budget:
            budget = len(self.indices)
        if isinstance(self.reference, FingerprintSide) and self.reference.size < budget:
            self.notes.append(
                f"challenge budget capped at the fingerprint's {self.reference.size} challenges"
            )
            budget = self.reference.size
        self.budget = budget
        if self.indices is not None:
            self.indices = self.indices[:budget]
        self.sites = (
            self.reference.sites
            if isinstance(self.reference, FingerprintSide)
            else default_sites(int(self.reference.descriptor["num_layers"]))
        )
        # The whole challenge set is fixed, and its root computed, before any model runs.
        self.challenges = job_challenges(key, budget, nonce=nonce, indices=self.indices)
        self.committed_root = commitment(self.challenges).hex()

    def run(self, progress: Progress | None = None) -> Outcome:
        p = self.params
        reason = incompatibility(self.reference.descriptor, self.candidate.descriptor)
        if reason is not None:
            decision = Decision(
                verdict="DIFFERENT", challenges_used=0, statistic=0.0, mismatches=0, reason=reason
            )
            return self._finish([], [], decision, incompatible=True)
        test = SequentialTest(p.tolerance, p.alpha, self.budget)
        total_bits = p.bits * len(self.sites)
        records: list[Record] = []
        distances: list[float] = []
        for start in range(0, self.budget, p.batch_size):
            batch = self.challenges[start : start + p.batch_size]
            ref = self.reference.signatures(batch, self.sites, self.key, p.bits)
            cand = self.candidate.signatures(batch, self.sites, self.key, p.bits)
            for challenge, rs, cs in zip(batch, ref, cand, strict=True):
                diff = differing_bits(rs, cs, self.sites)
                records.append(
                    Record(
                        index=challenge.index,
                        challenge_hash=challenge.digest(),
                        reference={s: rs[s] for s in self.sites},
                        candidate={s: cs[s] for s in self.sites},
                        differing_bits=diff,
                        total_bits=total_bits,
                    )
                )
                distances.append(diff / total_bits)
                test.update(diff / total_bits)
                if test.decision is not None:
                    break
            if progress is not None:
                progress(len(records), self.budget)
            if test.decision is not None:
                break
        decision = test.decision or decide(distances, p.tolerance, p.alpha, self.budget)
        return self._finish(records, distances, decision)

    def _finish(
        self,
        records: list[Record],
        distances: list[float],
        decision: Decision,
        incompatible: bool = False,
    ) -> Outcome:
        p = self.params
        spec = TOLERANCES[p.tolerance]
        used = self.challenges[: len(records)]
        transcript = build_transcript(
            records=records,
            challenges=used,
            key_id=key_id(self.key),
            params={
                "tolerance": p.tolerance,
                "alpha": p.alpha,
                "max_challenges": self.budget,
                "delta": spec.delta,
                "p0": spec.p0,
                "p1": spec.p1,
                "bits_per_site": p.bits,
            },
            sites=list(self.sites),
            reference_descriptor=self.reference.descriptor,
            candidate_descriptor=self.candidate.descriptor,
            decision=decision,
        )
        transcript["committed_root"] = self.committed_root
        # How to re-derive the committed set with the farm key (rev audit --key-file).
        if self.indices is not None:
            transcript["challenge_indices"] = list(self.indices)
        elif self.nonce is not None:
            transcript["challenge_nonce"] = self.nonce.hex()
        if incompatible:
            transcript["incompatible"] = True
        result = {
            "verdict": decision.verdict,
            "challenges_used": decision.challenges_used,
            "challenges_max": self.budget,
            "tolerance": p.tolerance,
            "alpha": p.alpha,
            "statistic": decision.statistic,
            "reason": decision.reason,
            "transcript_root": transcript["root"],
            "committed_root": self.committed_root,
            "key_id": key_id(self.key),
            "sites": list(self.sites),
            "bits_per_site": p.bits,
            "distances": _summary(distances),
            "reference": self.reference.descriptor,
            "candidate": self.candidate.descriptor,
            "notes": list(self.notes),
        }
        return Outcome(result=result, transcript=transcript, decision=decision, distances=distances)


def verify(
    reference: LoadedModel | dict[str, Any],
    candidate: LoadedModel,
    key: bytes,
    params: VerifyParams | None = None,
    progress: Progress | None = None,
) -> Outcome:
    """Convenience wrapper: build a :class:`Verification` and run it."""
    return Verification(reference, candidate, key, params).run(progress)


def fingerprint_model(
    model: LoadedModel,
    key: bytes,
    n: int = 64,
    bits: int = DEFAULT_BITS,
    batch_size: int = 8,
    progress: Progress | None = None,
    start: int = 0,
) -> dict[str, Any]:
    """The reference's signatures for the key's challenges ``start .. start+n-1``.

    ``start`` > 0 tops up a registered model's pool with fresh challenges
    (:func:`extend_fingerprint` merges the two documents).
    """
    if not 1 <= n <= 4096:
        raise ValueError("a fingerprint needs 1..4096 challenges")
    challenges = generate_challenges(key, n, start=start)
    sites = model.sites
    side = ModelSide(model)
    entries = []
    for start in range(0, n, batch_size):
        batch = challenges[start : start + batch_size]
        for c, sigs in zip(batch, side.signatures(batch, sites, key, bits), strict=True):
            entries.append(
                {
                    "index": c.index,
                    "challenge_hash": c.digest().hex(),
                    "sigs": {str(s): _b64(sigs[s]) for s in sites},
                }
            )
        if progress is not None:
            progress(len(entries), n)
    return {
        "format": FINGERPRINT_FORMAT,
        "key_id": key_id(key),
        "descriptor": model.descriptor,
        "sites": sites,
        "bits": bits,
        "challenge_commitment": commitment(challenges).hex(),
        "signatures": entries,
    }


def extend_fingerprint(doc: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with the signatures of ``more`` added (a pool top-up); indices already in it stay.

    Both must be one model's, under one key, sites and signature size.
    """
    for k in ("key_id", "sites", "bits"):
        if doc[k] != more[k]:
            raise ValueError(f"the top-up has another {k} than the fingerprint")
    have = {int(e["index"]) for e in doc["signatures"]}
    entries = list(doc["signatures"]) + [
        e for e in more["signatures"] if int(e["index"]) not in have
    ]
    out = dict(doc)
    out["signatures"] = entries
    out["challenge_commitment"] = merkle_root(
        [bytes.fromhex(e["challenge_hash"]) for e in entries]
    ).hex()
    return out


def check_fingerprint(doc: Any) -> list[str]:
    """Structural problems of a fingerprint document (empty when it is usable)."""
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    if doc.get("format") != FINGERPRINT_FORMAT:
        return [f"format is not {FINGERPRINT_FORMAT}"]
    missing = [k for k in ("key_id", "descriptor", "sites", "bits", "signatures") if k not in doc]
    if missing:
        return [f"missing fields: {', '.join(missing)}"]
    if not isinstance(doc["signatures"], list) or not doc["signatures"]:
        return ["no signatures"]
    expected = len(doc["sites"]) and int(doc["bits"]) // 8
    for entry in doc["signatures"]:
        try:
            sigs = entry["sigs"]
            if sorted(int(s) for s in sigs) != sorted(int(s) for s in doc["sites"]):
                return [f"challenge {entry['index']}: sites do not match"]
            for value in sigs.values():
                if len(base64.b64decode(value, validate=True)) != expected:
                    return [f"challenge {entry['index']}: signature has the wrong size"]
        except (KeyError, TypeError, ValueError) as exc:
            return [f"malformed signature entry: {exc}"]
    return []


def load_fingerprint(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    problems = check_fingerprint(doc)
    if problems:
        raise ValueError(f"{path}: {problems[0]}")
    return doc


def looks_like_fingerprint(path: str) -> bool:
    """A file (not a folder) whose JSON says it is a fingerprint."""
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(200)
    except (OSError, UnicodeDecodeError):
        return False
    return FINGERPRINT_FORMAT in head


def reexecute_sample(
    transcript: dict[str, Any],
    reference: LoadedModel | dict[str, Any],
    candidate: LoadedModel,
    key: bytes,
    indices: Sequence[int],
) -> list[str]:
    """Recompute the signatures of some records and compare them with the transcript.

    A faulty or lying inference worker shows up here: its recorded signatures stop matching a
    fresh computation. Float noise between processes may flip a handful of bits, so a record
    passes when each side differs from the recomputation by no more than the ``exact``
    tolerance's per-challenge threshold.
    """
    problems: list[str] = []
    records = transcript.get("records") or []
    sites = [int(s) for s in transcript.get("sites", [])]
    bits = int(transcript.get("parameters", {}).get("bits_per_site", DEFAULT_BITS))
    allowed = TOLERANCES["exact"].delta
    ref_side, cand_side = as_side(reference, key), as_side(candidate, key)
    nonce = (
        bytes.fromhex(transcript["challenge_nonce"]) if "challenge_nonce" in transcript else None
    )
    checked: list[tuple[int, dict[str, Any], Challenge]] = []
    for pos in indices:
        if not 0 <= pos < len(records):
            problems.append(f"record {pos} does not exist")
            continue
        rec = records[pos]
        challenge = challenge_for(key, int(rec["index"]), nonce)
        if challenge.digest().hex() != rec.get("challenge_hash"):
            problems.append(f"record {pos}: challenge hash does not match the key")
            continue
        checked.append((pos, rec, challenge))
    if not checked:
        return problems
    batch = [c for _, _, c in checked]  # one forward pass per side for the whole sample
    for label, side in (("reference", ref_side), ("candidate", cand_side)):
        fresh_sigs = side.signatures(batch, sites, key, bits)
        for (pos, rec, _), fresh in zip(checked, fresh_sigs, strict=True):
            recorded = {int(s): _b64_sig(v) for s, v in rec[label].items()}
            diff = differing_bits(fresh, recorded, sites)
            if diff / (bits * len(sites)) > allowed:
                problems.append(
                    f"record {pos}: {label} signatures differ from a re-execution by {diff} bits"
                )
    return problems


def identify(
    candidate: LoadedModel,
    fingerprints: dict[str, dict[str, Any]],
    key: bytes,
    params: VerifyParams | None = None,
    pools: dict[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """Rank registered fingerprints by mean distance to the candidate, best first.

    ``pools`` names, per model, the challenge indices to compare on (its unretired pool;
    the farm passes it); a model without one uses its first challenges. The candidate's
    signature for one challenge is computed once per (sites, bits) and reused for every
    compatible fingerprint. Each entry carries the sequential test's verdict on the same
    distances, so the top match says SAME only when the test supports it.
    """
    p = params or VerifyParams()
    cand = ModelSide(candidate)
    cache: dict[tuple[tuple[int, ...], int], dict[int, SiteSigs]] = {}
    ranked = []
    for model_id, doc in fingerprints.items():
        ref = FingerprintSide(doc, key)
        if incompatibility(ref.descriptor, cand.descriptor) is not None:
            continue
        pool = (pools or {}).get(model_id)
        wanted = list(pool) if pool is not None else sorted(ref._by_index)
        n = min(len(wanted), p.max_challenges)
        if n == 0:
            continue
        challenges = challenges_at(key, wanted[:n])
        known = cache.setdefault((tuple(ref.sites), ref.bits), {})
        missing = [c for c in challenges if c.index not in known]
        for start in range(0, len(missing), p.batch_size):
            batch = missing[start : start + p.batch_size]
            sigs = cand.signatures(batch, ref.sites, key, ref.bits)
            known.update({c.index: sig for c, sig in zip(batch, sigs, strict=True)})
        ref_sigs = ref.signatures(challenges, ref.sites, key, ref.bits)
        total = ref.bits * len(ref.sites)
        dists = [
            differing_bits(r, known[c.index], ref.sites) / total
            for r, c in zip(ref_sigs, challenges, strict=True)
        ]
        decision = decide(dists, p.tolerance, p.alpha, n)
        ranked.append(
            {
                "model_id": model_id,
                "mean_distance": float(np.mean(dists)),
                "verdict": decision.verdict,
                "challenges_used": decision.challenges_used,
            }
        )
    ranked.sort(key=lambda r: (r["mean_distance"], r["model_id"]))
    return ranked


def params_dict(params: VerifyParams) -> dict[str, Any]:
    return asdict(params)
