"""The in-process verification loop: one implementation for the CLI and the farm's tasks.

A verification commits its challenge set first, then walks it in batches: both sides produce
signatures for the batch, each challenge's distance feeds the sequential test, and the loop
stops at the first decision (so at most one batch is computed past it; the records after the
decision point are dropped). The reference side is either a loaded model or a stored
fingerprint, which is how a farm job against a registered model runs only the candidate.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from rev_tasks.core.calibration import (
    CALIBRATION_CHALLENGES,
    CALIBRATION_DTYPES,
    CALIBRATION_LABEL,
    Calibration,
    check_calibration,
)
from rev_tasks.core.challenges import (
    Challenge,
    challenge_for,
    commitment,
    generate_challenges,
    job_challenges,
)
from rev_tasks.core.compat import dtype_mismatch, incompatibility
from rev_tasks.core.decision import (
    TOLERANCES,
    Decision,
    SequentialTest,
    ToleranceSpec,
    decide,
)
from rev_tasks.core.hamming import hamming
from rev_tasks.core.identification import UNAVAILABLE, build_identification, unavailable_entry
from rev_tasks.core.keys import derive, key_id
from rev_tasks.core.merkle import merkle_root
from rev_tasks.core.transcript import Record, build_transcript
from rev_tasks.inference.loader import LoadedModel, default_sites
from rev_tasks.inference.signatures import DEFAULT_BITS, model_signatures

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


#: Compute dtypes whose results depend on the batch a prompt is computed in.
BATCH_VARIANT_DTYPES = ("float16", "bfloat16")


def batch_invariant_signatures(
    model: Any, prompts: Sequence[str], sites: Sequence[int], key: bytes, bits: int
) -> list[SiteSigs]:
    """The model's signatures of ``prompts``, batch-invariant in every dtype.

    In float32 a prompt's signatures do not depend on the batch it is computed with (0 bits
    over batches 1, 2, 8 on MiniLM, docs/statistics.md §12), so the batch runs as one forward
    pass. In float16/bfloat16 they do: the padding length and the kernels' blocking move a
    prompt's signatures by up to 7 (fp16) and 24 (bf16) bits of 16,384
    (``bench.determinism --dtype``). There each prompt runs on its own, which makes a
    fingerprint, a job's candidate, ``rev verify`` and a validator's re-execution of two
    records compute every prompt identically (docs/statistics.md §9), at the cost of
    batching. Either way on the device ``model_signatures`` picks.
    """
    if str(model.descriptor.get("dtype")) not in BATCH_VARIANT_DTYPES or len(prompts) <= 1:
        return model_signatures(model, list(prompts), list(sites), key, bits)
    return [sig for p in prompts for sig in model_signatures(model, [p], list(sites), key, bits)]


class ModelSide:
    """A loaded model: runs the challenges through it."""

    def __init__(self, model: LoadedModel) -> None:
        # Any object with LoadedModel's descriptor/pooled_states interface will do.
        self.model = model
        self.descriptor = dict(model.descriptor)

    def signatures(
        self, challenges: Sequence[Challenge], sites: Sequence[int], key: bytes, bits: int
    ) -> list[SiteSigs]:
        prompts = [c.prompt for c in challenges]
        return batch_invariant_signatures(self.model, prompts, sites, key, bits)


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


class DtypeMismatch(ValueError):
    """A stored fingerprint and a candidate computed in different dtypes: no comparison."""


def check_dtypes(reference: Side, candidate: Side) -> None:
    """Refuse a fingerprint reference whose compute dtype is not the candidate's.

    Two loaded models always run in the dtype the job (or ``--dtype``) names; a fingerprint
    was computed once, in the dtype it was registered with (its descriptor says which).
    Raises :class:`DtypeMismatch` with the reason (:func:`rev_tasks.core.compat.dtype_mismatch`).
    """
    if isinstance(reference, FingerprintSide):
        reason = dtype_mismatch(reference.descriptor, candidate.descriptor)
        if reason is not None:
            raise DtypeMismatch(reason)


def differing_bits(a: SiteSigs, b: SiteSigs, sites: Sequence[int]) -> int:
    return sum(hamming(a[s], b[s]) for s in sites)


def calibration_challenges(key: bytes, n: int = CALIBRATION_CHALLENGES) -> list[Challenge]:
    """The calibration prompts: challenges of a sub-key ``derive(key, "calibration", 0)``.

    A different PRF input from every job challenge (``derive(key, "challenge", i)``), so the
    candidate is never run on them. Signatures still use the job key's projections.
    """
    return generate_challenges(derive(key, CALIBRATION_LABEL, 0), n)


def rounded_copy(
    model: LoadedModel, dtype: str, source: dict[str, Any] | None = None
) -> LoadedModel:
    """A copy of an in-memory model whose stored tensors are ``dtype`` casts of the weights.

    The model a ``save_pretrained`` in fp16/bf16 gives once it is loaded the way ``model``
    was: every floating tensor of the state dict rounded once to ``dtype``, then held in
    ``model``'s own compute dtype, non-persistent buffers (rotary frequencies) as on a load.
    ``source``: the float32 state dict to round (default: the model's own tensors, which are
    the float32 weights for a float32 model). A model computed in fp16/bf16 no longer holds
    its float32 weights; :func:`calibrate_reference` passes them, read again from its folder,
    so that the copy is the cast *checkpoint* re-loaded in the job's dtype (for a bf16 job,
    fp32 → fp16 → bf16), not a cast of the already rounded weights.
    """
    import torch

    target = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    module = copy.deepcopy(model.model)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.dtype.is_floating_point:
                src = tensor if source is None else source[name]
                tensor.copy_(src.to(target).to(tensor.dtype))
    root = module.get_encoder() if model.descriptor["family"] == "encoder-decoder" else module
    from rev_tasks.inference.loader import _find_blocks

    return LoadedModel(
        path=model.path,
        model=module,
        tokenizer=model.tokenizer,
        blocks=_find_blocks(root, int(model.descriptor["num_layers"])),
        descriptor=dict(model.descriptor),
        device=model.device,
    )


def _float32_weights(model: LoadedModel) -> dict[str, Any] | None:
    """The float32 state dict of a model computed in fp16/bf16, read again from its folder
    (on the CPU, transient); None for a float32 model, whose own tensors are those."""
    if model.descriptor.get("dtype", "float32") == "float32":
        return None
    from rev_tasks.inference.loader import load_model

    return load_model(model.path, dtype="float32", device="cpu").model.state_dict()


def can_calibrate(model: Any) -> bool:
    """Only an in-memory transformers model can be rounded in place of a re-load."""
    return isinstance(model, LoadedModel)


def calibrate_reference(
    model: LoadedModel,
    key: bytes,
    sites: Sequence[int],
    bits: int = DEFAULT_BITS,
    n: int = CALIBRATION_CHALLENGES,
) -> Calibration:
    """The reference's own fp16 and bf16 cast distances on the calibration challenges.

    Measured in the model's compute dtype: a reference loaded in fp16/bf16 (a job's
    ``dtype``) is compared with its casts loaded in that same dtype, which is how a cast
    candidate runs in that job (docs/statistics.md §9). Costs (1 + len(CALIBRATION_DTYPES))
    forward passes of ``n`` prompts and one transient copy of the weights at a time (plus
    the float32 weights, read again, for a reference computed in fp16/bf16).
    """
    prompts = [c.prompt for c in calibration_challenges(key, n)]
    base = batch_invariant_signatures(model, prompts, sites, key, bits)
    source = _float32_weights(model)
    counts: dict[str, list[int]] = {}
    for dtype in CALIBRATION_DTYPES:
        rounded = rounded_copy(model, dtype, source)
        sigs = batch_invariant_signatures(rounded, prompts, sites, key, bits)
        counts[dtype] = [differing_bits(a, b, sites) for a, b in zip(base, sigs, strict=True)]
        del rounded
    return Calibration(challenges=n, total_bits=bits * len(sites), differing_bits=counts)


def effective_spec(tolerance: str, calibration: Calibration | None) -> ToleranceSpec:
    """The tolerance's constants, with ``precision``'s δ from the calibration when there is one
    (without one, the fixed δ of TOLERANCES: old fingerprints and streamed references)."""
    spec = TOLERANCES[tolerance]
    if tolerance == "precision" and calibration is not None:
        return dataclasses.replace(spec, delta=calibration.delta)
    return spec


def fingerprint_calibration(doc: dict[str, Any]) -> Calibration | None:
    """The calibration stored with a fingerprint, or None for one made before calibration."""
    block = doc.get("calibration")
    return None if block is None else Calibration.from_dict(block)


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
        check_dtypes(self.reference, self.candidate)
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
        self.calibration: Calibration | None = None
        self.spec = TOLERANCES[self.params.tolerance]

    def calibrate(self) -> Calibration | None:
        """``precision`` only: the reference's own cast distances (measured on a loaded model,
        read from a fingerprint), which fix δ. None where neither is available."""
        if self.params.tolerance != "precision":
            return None
        total = self.params.bits * len(self.sites)
        if isinstance(self.reference, FingerprintSide):
            cal = fingerprint_calibration(self.reference.doc)
            if cal is None or cal.total_bits != total:
                self.notes.append(
                    "the fingerprint has no self-calibration: precision uses the fixed "
                    f"delta={TOLERANCES['precision'].delta:g}"
                )
                return None
            return cal
        model = getattr(self.reference, "model", None)
        if isinstance(self.reference, ModelSide) and can_calibrate(model):
            return calibrate_reference(model, self.key, self.sites, self.params.bits)
        self.notes.append(
            "the reference cannot be cast in memory (streamed): precision uses the fixed "
            f"delta={TOLERANCES['precision'].delta:g}"
        )
        return None

    def run(self, progress: Progress | None = None) -> Outcome:
        p = self.params
        reason = incompatibility(self.reference.descriptor, self.candidate.descriptor)
        if reason is not None:
            decision = Decision(
                verdict="DIFFERENT", challenges_used=0, statistic=0.0, mismatches=0, reason=reason
            )
            return self._finish([], [], decision, incompatible=True)
        self.calibration = self.calibrate()
        self.spec = effective_spec(p.tolerance, self.calibration)
        test = SequentialTest(self.spec, p.alpha, self.budget)
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
        decision = test.decision or decide(distances, self.spec, p.alpha, self.budget)
        return self._finish(records, distances, decision)

    def _finish(
        self,
        records: list[Record],
        distances: list[float],
        decision: Decision,
        incompatible: bool = False,
    ) -> Outcome:
        p = self.params
        spec = self.spec
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
        if self.calibration is not None:
            transcript["calibration"] = self.calibration.to_dict()
        if incompatible:
            transcript["incompatible"] = True
        result = {
            "verdict": decision.verdict,
            "challenges_used": decision.challenges_used,
            "challenges_max": self.budget,
            "tolerance": p.tolerance,
            "delta": spec.delta,
            "alpha": p.alpha,
            "statistic": decision.statistic,
            "reason": decision.reason,
            "transcript_root": transcript["root"],
            "committed_root": self.committed_root,
            "key_id": key_id(self.key),
            "sites": list(self.sites),
            "bits_per_site": p.bits,
            "distances": _summary(distances),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
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
    # Stored with the signatures (the farm keeps the whole document), so a later
    # ``precision`` job against the fingerprint gets the reference's own delta.
    calibration = calibrate_reference(model, key, sites, bits) if can_calibrate(model) else None
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
        **({} if calibration is None else {"calibration": calibration.to_dict()}),
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
    if "calibration" in doc:
        cal_problems = check_calibration(doc["calibration"], check_constants=False)
        if cal_problems:
            return [f"calibration: {cal_problems[0]}"]
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


#: Per side and record, the most signature bits (over all sites) a validator's re-execution
#: may differ from the recorded signatures by: float noise from thread counts, batch
#: composition and kernels (bench.determinism), with margin; docs/statistics.md §11.
REEXECUTION_ALLOWANCE = 0.0002
#: ... but never fewer bits than this.
REEXECUTION_ALLOWANCE_MIN_BITS = 4


def reexecution_allowance(total_bits: int) -> int:
    """Bits per side a re-execution may differ by (see :data:`REEXECUTION_ALLOWANCE`)."""
    return max(REEXECUTION_ALLOWANCE_MIN_BITS, int(np.ceil(REEXECUTION_ALLOWANCE * total_bits)))


def reexecute_sample(
    transcript: dict[str, Any],
    reference: LoadedModel | dict[str, Any],
    candidate: LoadedModel,
    key: bytes,
    indices: Sequence[int],
    allowance_bits: int | None = None,
) -> list[str]:
    """Recompute both sides of some records, and the calibration, and check what the verdict
    rests on.

    Per sampled record: each recorded side may differ from this process's recomputation by at
    most ``allowance_bits`` (float noise of other threads, batches or devices: measured, see
    :func:`reexecution_allowance`; none for a stored fingerprint, which reads back exactly),
    and the recorded mismatch event (distance > delta) must be the one the recomputed
    signatures give, unless the recomputed distance lies within both sides' allowances of
    delta. A ``precision`` transcript's calibration
    counts (which fix delta) are re-measured the same way on a loaded reference, or must equal
    the fingerprint's. Records copied or altered by more than the noise fail; a genuine job
    never fails on float noise within the allowance.
    """
    problems: list[str] = []
    records = transcript.get("records") or []
    sites = [int(s) for s in transcript.get("sites", [])]
    params = transcript.get("parameters", {})
    bits = int(params.get("bits_per_site", DEFAULT_BITS))
    total = bits * len(sites)
    delta = float(params.get("delta", 0.0))
    allow = reexecution_allowance(total) if allowance_bits is None else int(allowance_bits)
    ref_side, cand_side = as_side(reference, key), as_side(candidate, key)
    nonce = (
        bytes.fromhex(transcript["challenge_nonce"]) if "challenge_nonce" in transcript else None
    )
    problems += _recheck_calibration(transcript, ref_side, key, sites, bits, allow)
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
    fresh = {
        "reference": ref_side.signatures(batch, sites, key, bits),
        "candidate": cand_side.signatures(batch, sites, key, bits),
    }
    # A stored fingerprint reads back exactly: no noise to allow for on that side.
    allowed = {
        "reference": 0 if isinstance(ref_side, FingerprintSide) else allow,
        "candidate": allow,
    }
    for i, (pos, rec, _) in enumerate(checked):
        recorded = {
            label: {int(s): _b64_sig(v) for s, v in rec[label].items()}
            for label in ("reference", "candidate")
        }
        side_problems = len(problems)
        for label in ("reference", "candidate"):
            diff = differing_bits(fresh[label][i], recorded[label], sites)
            if diff > allowed[label]:
                problems.append(
                    f"record {pos}: {label} signatures differ from a re-execution by {diff} "
                    f"bits (allowance {allowed[label]})"
                )
        rec_bits = differing_bits(recorded["reference"], recorded["candidate"], sites)
        new_bits = differing_bits(fresh["reference"][i], fresh["candidate"][i], sites)
        rec_event, new_event = rec_bits / total > delta, new_bits / total > delta
        band = allowed["reference"] + allowed["candidate"]
        # With both sides within their allowances the two distances differ by at most
        # ``band`` bits (triangle inequality), so this cannot fire on its own; it states the
        # property the verdict needs and guards the per-side check.
        if (
            len(problems) == side_problems
            and rec_event != new_event
            and abs(new_bits - delta * total) > band
        ):
            problems.append(
                f"record {pos}: recorded {rec_bits} differing bits "
                f"({'mismatch' if rec_event else 'match'} at delta={delta:g}) but a re-execution "
                f"gives {new_bits} ({'mismatch' if new_event else 'match'})"
            )
    return problems


def _recheck_calibration(
    transcript: dict[str, Any],
    ref_side: Side,
    key: bytes,
    sites: Sequence[int],
    bits: int,
    allow: int,
) -> list[str]:
    """The calibration counts a precision delta rests on, re-measured (or read back)."""
    block = transcript.get("calibration")
    if block is None:
        return []
    try:
        recorded = Calibration.from_dict(block)
    except ValueError as exc:
        return [str(exc)]
    if isinstance(ref_side, FingerprintSide):
        stored = fingerprint_calibration(ref_side.doc)
        if stored is None or stored.to_dict() != recorded.to_dict():
            return ["calibration: differs from the one stored with the reference's fingerprint"]
        return []
    model = getattr(ref_side, "model", None)
    if not can_calibrate(model):
        return []
    fresh = calibrate_reference(model, key, sites, bits, n=recorded.challenges)
    problems = []
    for dtype, counts in recorded.differing_bits.items():
        for j, (a, b) in enumerate(zip(counts, fresh.differing_bits[dtype], strict=True)):
            if abs(a - b) > 2 * allow:
                problems.append(
                    f"calibration: {dtype} challenge {j} recorded {a} differing bits, "
                    f"a re-execution gives {b} (allowance {2 * allow})"
                )
    return problems


class _SharedCandidate:
    """The candidate side of every comparison of one identify job.

    A challenge's signatures depend on the challenge, the sites and the signature size only,
    so each is computed once and reused for every fingerprint that asks for it (pools of
    registered models overlap: all start at the key's challenge 0).
    """

    def __init__(self, model: Any) -> None:
        self.side = as_side(model, b"")
        self.descriptor = dict(self.side.descriptor)
        self._known: dict[tuple[tuple[int, ...], int, bytes], SiteSigs] = {}

    def signatures(
        self, challenges: Sequence[Challenge], sites: Sequence[int], key: bytes, bits: int
    ) -> list[SiteSigs]:
        tag = (tuple(sites), bits)
        missing = [c for c in challenges if (*tag, c.digest()) not in self._known]
        if missing:
            fresh = self.side.signatures(missing, sites, key, bits)
            self._known.update(
                {(*tag, c.digest()): sig for c, sig in zip(missing, fresh, strict=True)}
            )
        return [self._known[(*tag, c.digest())] for c in challenges]


@dataclass
class Identification:
    """A finished identify run: the committed evidence and what the job reports."""

    document: dict[str, Any]  # rev-identification/1 (rev_tasks.core.identification)
    notes: list[str]
    challenges_used: int
    challenges_max: int

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Every model, in rank order (compared, incompatible, unavailable)."""
        return list(self.document["entries"])

    @property
    def ranking(self) -> list[dict[str, Any]]:
        """The compared and incompatible models, nearest first."""
        return [e for e in self.entries if e["status"] != UNAVAILABLE]

    @property
    def unavailable(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["status"] == UNAVAILABLE]


def identify_registry(
    candidate: Any,
    fingerprints: dict[str, dict[str, Any]],
    key: bytes,
    params: VerifyParams | None = None,
    pools: dict[str, Sequence[int]] | None = None,
    unavailable: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> Identification:
    """Compare the candidate with every fingerprint, as a verify job would, and list them all.

    Each compatible model gets a :class:`Verification` against its fingerprint on the
    challenges ``pools`` names for it (its unretired pool in the farm; else its whole pool),
    with the same early stop, calibration and transcript as a verify job; an incompatible
    one gets the incompatible transcript (DIFFERENT, with the reason). A fingerprint that
    cannot be used (another key, malformed, no challenge left) and the models of
    ``unavailable`` (id → reason) are listed unavailable. ``progress`` gets the challenges
    done over all comparisons and their total budget.
    """
    p = params or VerifyParams()
    shared = _SharedCandidate(candidate)
    out_of_reach = dict(unavailable or {})
    runs: dict[str, Verification] = {}
    notes: list[str] = []
    for model_id, doc in fingerprints.items():
        if model_id in out_of_reach:
            continue
        other_dtype = dtype_mismatch(doc.get("descriptor") or {}, shared.descriptor)
        if other_dtype is not None:  # not judged: see core.compat.dtype_mismatch
            out_of_reach[model_id] = other_dtype
            continue
        pool = (pools or {}).get(model_id)
        try:
            wanted = list(pool) if pool is not None else sorted(FingerprintSide(doc, key)._by_index)
            if not wanted:
                out_of_reach[model_id] = "no unused challenge left in its fingerprint's pool"
                continue
            runs[model_id] = Verification(doc, shared, key, p, indices=wanted)
        except ValueError as exc:
            out_of_reach[model_id] = f"fingerprint not usable: {exc}"
    total = sum(
        v.budget
        for v in runs.values()
        if incompatibility(v.reference.descriptor, shared.descriptor) is None
    )
    done = [0]

    def report(n: int, _budget: int) -> None:
        if progress is not None:
            progress(done[0] + n, total)

    transcripts: dict[str, dict[str, Any]] = {}
    for model_id, verification in runs.items():
        outcome = verification.run(progress=report)
        done[0] += len(outcome.transcript["records"])
        transcripts[model_id] = outcome.transcript
        notes += [f"{model_id}: {n}" for n in verification.notes]
    document = build_identification(
        key_id(key),
        shared.descriptor,
        {"tolerance": p.tolerance, "alpha": p.alpha, "max_challenges": p.max_challenges},
        transcripts,
        [unavailable_entry(m, r) for m, r in sorted(out_of_reach.items())],
    )
    return Identification(
        document=document, notes=notes, challenges_used=done[0], challenges_max=total
    )


def identify(
    candidate: LoadedModel,
    fingerprints: dict[str, dict[str, Any]],
    key: bytes,
    params: VerifyParams | None = None,
    pools: dict[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """The ranking of :func:`identify_registry`: compared models nearest first, then the
    incompatible ones (DIFFERENT, with their reason)."""
    return identify_registry(candidate, fingerprints, key, params, pools).ranking


def params_dict(params: VerifyParams) -> dict[str, Any]:
    return asdict(params)
