"""Fault injection for the farm's own tests: inert unless ``REV_ENABLE_FAULT_INJECTION=1``.

The tasks call one hook at each point where a test needs to break something; with the
flag off every hook returns at once and changes nothing, whatever the other variables say.

=================================  ============================================================
``REV_TEST_KILL_INFERENCE_PATH``   :func:`before_inference`: the pool child SIGKILLs itself
                                   for a candidate whose path contains the value (a model
                                   that OOM-kills its worker)
``REV_TEST_FORGE_INFERENCE_PATH``  :func:`computed_candidate`: a lying inference worker runs
                                   the reference in such a candidate's place
``REV_TEST_FORGE_ENDPOINT``        :func:`endpoint_client`: a lying endpoint worker shifts every
                                   log-probability of the replies it records (``"1"``: all
                                   endpoint jobs of this worker)
``REV_TEST_SLOW_BATCH_SECONDS``    :func:`after_batch`: a slow model, seconds per batch
``REV_TEST_SLOW_VALIDATION_SECONDS`` :func:`before_validation`: a slow validator, seconds per
                                   check (a worker killed while it holds one)
``REV_TEST_FAULTY_VALIDATORS``     ``"2"`` validator 2 lies (votes the opposite verdict),
                                   ``"1:random"`` votes at random, ``"3:crash"`` raises in its
                                   check (:func:`before_validation`, :func:`validator_verdict`)
``REV_TEST_NOISY_RECORDS``         :func:`recorded_sides`: ``"marker:N,..."``: for a candidate
                                   whose path contains a marker, N signature bits of every
                                   record flipped on each side, at the same positions on both
                                   (a float variant of the inference process; a fingerprint
                                   side reads back exactly and is left alone)
``REV_TEST_COPY_REFERENCE_PATH``   :func:`recorded_sides`: the records of such a candidate
                                   carry the reference's signatures as the candidate's (altered
                                   records that claim distance 0, even against a fingerprint)
``REV_TEST_DEVICE_NOISE``          :func:`device_noise`: ``"marker:eps"``: every linear layer
                                   of both models of such a candidate's job gives its output
                                   times (1 + eps·g), g a fixed normal draw per layer (another
                                   device's matmul rounding; CUDA against CPU fp32 ~ 1e-6)
=================================  ============================================================
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

ENABLE = "REV_ENABLE_FAULT_INJECTION"
#: Byzantine behaviours a validator can be given.
MODES = ("lie", "random", "crash")
VERDICTS = ("SAME", "DIFFERENT", "UNDECIDED", "INVALID")
_OPPOSITE = {"SAME": "DIFFERENT", "DIFFERENT": "SAME", "UNDECIDED": "DIFFERENT", "INVALID": "SAME"}


def _validator_modes(raw: str) -> tuple[tuple[int, str], ...]:
    """``"0,3:random,4:crash"`` → ((0, "lie"), (3, "random"), (4, "crash")); bare index = lie."""
    out: list[tuple[int, str]] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        index, _, mode = item.partition(":")
        mode = mode.strip() or "lie"
        if mode not in MODES:
            raise ValueError(f"REV_TEST_FAULTY_VALIDATORS: mode must be one of {MODES}")
        out.append((int(index), mode))
    return tuple(out)


def _seconds(env: Mapping[str, str], name: str) -> float:
    raw = env.get(name, "").strip()
    try:
        return max(0.0, float(raw)) if raw else 0.0
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, not {raw!r}") from exc


def _marked(env: Mapping[str, str], name: str, kind: type) -> tuple[tuple[str, Any], ...]:
    """``"a:4,b:5"`` → (("a", 4), ("b", 5)) with values of ``kind`` (≥ 0)."""
    out: list[tuple[str, Any]] = []
    for item in (part.strip() for part in env.get(name, "").split(",")):
        if not item:
            continue
        marker, _, raw = item.rpartition(":")
        try:
            value = kind(raw)
        except ValueError as exc:
            raise ValueError(f"{name}: {item!r} is not MARKER:{kind.__name__}") from exc
        if not marker.strip() or value < 0:
            raise ValueError(f"{name}: {item!r} is not MARKER:{kind.__name__} (>= 0)")
        out.append((marker.strip(), value))
    return tuple(out)


def _lookup(pairs: tuple[tuple[str, Any], ...], path: str) -> Any:
    return next((value for marker, value in pairs if marker in path), None)


@dataclass(frozen=True)
class Faults:
    """The faults this process injects (all empty unless the enable flag is set)."""

    enabled: bool = False
    validator_modes: tuple[tuple[int, str], ...] = ()
    slow_batch_seconds: float = 0.0
    slow_validation_seconds: float = 0.0
    kill_path: str = ""
    forge_path: str = ""
    noisy_records: tuple[tuple[str, int], ...] = ()
    copy_reference_path: str = ""
    device_noise: tuple[tuple[str, float], ...] = ()
    forge_endpoint: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Faults:
        env = os.environ if env is None else env
        if env.get(ENABLE, "").strip().lower() not in {"1", "true", "yes", "on"}:
            return cls()
        return cls(
            enabled=True,
            validator_modes=_validator_modes(env.get("REV_TEST_FAULTY_VALIDATORS", "")),
            slow_batch_seconds=_seconds(env, "REV_TEST_SLOW_BATCH_SECONDS"),
            slow_validation_seconds=_seconds(env, "REV_TEST_SLOW_VALIDATION_SECONDS"),
            kill_path=env.get("REV_TEST_KILL_INFERENCE_PATH", "").strip(),
            forge_path=env.get("REV_TEST_FORGE_INFERENCE_PATH", "").strip(),
            noisy_records=_marked(env, "REV_TEST_NOISY_RECORDS", int),
            copy_reference_path=env.get("REV_TEST_COPY_REFERENCE_PATH", "").strip(),
            device_noise=_marked(env, "REV_TEST_DEVICE_NOISE", float),
            forge_endpoint=env.get("REV_TEST_FORGE_ENDPOINT", "").strip() == "1",
        )

    @property
    def faulty_validators(self) -> frozenset[int]:
        return frozenset(i for i, _mode in self.validator_modes)

    def validator_mode(self, validator: int) -> str | None:
        """The injected Byzantine behaviour of one validator, or None."""
        return dict(self.validator_modes).get(validator)


@lru_cache(maxsize=1)
def active() -> Faults:
    """This process's faults, read from the environment once (like the settings)."""
    return Faults.from_env()


def reset() -> None:
    """Forget the cached faults (tests change the environment between cases)."""
    active.cache_clear()


# With the flag set, malformed fault variables stop the process that imports the hooks (a
# worker, at start), as a malformed setting does, instead of surfacing in its first task.
if os.environ.get(ENABLE, "").strip():
    active()


def opposite(verdict: str) -> str:
    """The lie a faulty validator tells."""
    return _OPPOSITE[verdict]


# ----------------------------------------------------------------------------- hooks
def before_inference(candidate_path: str) -> None:
    """SIGKILL this pool child for a marked candidate, before any work (a worker-killing model)."""
    marker = active().kill_path
    if marker and marker in candidate_path:
        log.warning("fault injection: killing this worker child (%s)", candidate_path)
        os.kill(os.getpid(), signal.SIGKILL)


def computed_candidate(candidate_path: str, reference: Any, candidate: Any) -> Any:
    """The model the inference runs as the candidate: the reference itself for a marked one.

    The forged transcript is then internally consistent (root, proofs, distances, decision)
    and claims SAME: only the validators' re-execution of the real candidate exposes it.
    A fingerprint reference (a dict) cannot stand in for a model and is never forged.
    """
    marker = active().forge_path
    if marker and marker in candidate_path and not isinstance(reference, dict):
        log.warning("fault injection: forging the transcript of %s", candidate_path)
        return reference
    return candidate


#: How far a forging endpoint worker moves each recorded log-probability (nats): above the
#: widest endpoint tolerance (0.4), so the validators' re-queries must notice.
FORGE_SHIFT = 0.5


def forged_reply(raw: bytes) -> bytes:
    """A completion reply with every top log-probability moved by :data:`FORGE_SHIFT`."""
    import json

    try:
        body = json.loads(raw)
        for choice in body.get("choices") or []:
            lp = choice.get("logprobs") or {}
            for top in lp.get("top_logprobs") or []:
                for piece in list(top or {}):
                    top[piece] = float(top[piece]) - FORGE_SHIFT
    except (ValueError, AttributeError, TypeError):
        return raw
    return json.dumps(body).encode()


def endpoint_client(client: Any) -> Any:
    """The client an endpoint job records its replies through: its own, or a forging one.

    The forgery is consistent: the statistic, the Merkle tree and the decision are computed
    from the forged bytes, so the transcript audits clean; only a validator that asks the
    endpoint again sees that it never answered that.
    """
    if not active().forge_endpoint:
        return client
    import json

    from rev_tasks.endpoints.client import Reply

    honest = client.completion

    def forged(*args: Any, **kwargs: Any) -> Any:
        log.warning("fault injection: forging an endpoint reply")
        raw = forged_reply(honest(*args, **kwargs).raw)
        return Reply(raw, json.loads(raw))

    client.completion = forged
    return client


def after_batch() -> None:
    """A slow model: sleep after each inference batch (its progress is already stored)."""
    seconds = active().slow_batch_seconds
    if seconds:
        time.sleep(seconds)


def before_validation(validator: int) -> None:
    """A slow validator, or one that crashes inside its check."""
    seconds = active().slow_validation_seconds
    if seconds:
        time.sleep(seconds)
    if active().validator_mode(validator) == "crash":
        raise RuntimeError(f"fault injection: validator {validator} crashed")


def validator_verdict(validator: int, job_id: str, verdict: str) -> str:
    """The verdict a validator votes: its own, or the lie or coin flip it was given."""
    mode = active().validator_mode(validator)
    if mode == "lie":
        log.warning("fault injection: validator %d lies about job %s", validator, job_id)
        return opposite(verdict)
    if mode == "random":
        chosen = random.SystemRandom().choice(VERDICTS)
        log.warning("fault injection: validator %d votes %s at random", validator, chosen)
        return chosen
    return verdict


# ----------------------------------------------------------------------------- recorded sides
def flip_positions(
    index: int, sites: Sequence[int], bits: int, count: int
) -> list[tuple[int, int]]:
    """``count`` distinct (site, bit) positions for challenge ``index``, spread over the sites.

    Derived from the challenge alone, so both sides of a record get the same ones (the
    recorded distance is unchanged, each side is ``count`` bits off its true signatures).
    """
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    j = 0
    while len(out) < min(count, bits * len(sites)):
        h = hashlib.sha256(f"noisy-record:{index}:{j}".encode()).digest()
        pos = (int(sites[j % len(sites)]), int.from_bytes(h[:8], "big") % bits)
        j += 1
        if pos not in seen:
            seen.add(pos)
            out.append(pos)
    return out


def flip_bits(sigs: dict[int, Any], positions: Sequence[tuple[int, int]]) -> dict[int, Any]:
    """A copy of one record's packed signatures (uint8, one array per site) with bits flipped."""
    out = {site: sig.copy() for site, sig in sigs.items()}
    for site, bit in positions:
        out[site][bit // 8] ^= 1 << (7 - bit % 8)
    return out


class _NoisySide:
    """A side whose signatures come out with ``count`` bits flipped per challenge."""

    def __init__(self, inner: Any, count: int) -> None:
        self.inner, self.count = inner, count
        self.descriptor = inner.descriptor

    def signatures(
        self, challenges: Sequence[Any], sites: Sequence[int], key: bytes, bits: int
    ) -> list[dict[int, Any]]:
        got = self.inner.signatures(challenges, sites, key, bits)
        return [
            flip_bits(sigs, flip_positions(c.index, sites, bits, self.count))
            for c, sigs in zip(challenges, got, strict=True)
        ]


class _CopiedSide:
    """The candidate's descriptor with the reference's signatures: altered records."""

    def __init__(self, reference: Any, candidate: Any) -> None:
        self.reference = reference
        self.descriptor = candidate.descriptor

    def signatures(
        self, challenges: Sequence[Any], sites: Sequence[int], key: bytes, bits: int
    ) -> list[dict[int, Any]]:
        return self.reference.signatures(challenges, sites, key, bits)


def recorded_sides(
    candidate_path: str, reference: Any, candidate: Any, key: bytes
) -> tuple[Any, Any]:
    """The (reference, candidate) sides whose signatures the transcript records.

    Unchanged unless this candidate is marked: then every record is altered after the
    models ran (``REV_TEST_NOISY_RECORDS``: N bits flipped on each model side;
    ``REV_TEST_COPY_REFERENCE_PATH``: the reference's signatures as the candidate's). The
    transcript stays internally consistent; only the validators' re-execution can tell.
    A marked ``precision`` job uses the fixed δ: a wrapped reference cannot be cast.
    """
    f = active()
    copy = bool(f.copy_reference_path) and f.copy_reference_path in candidate_path
    noisy = _lookup(f.noisy_records, candidate_path)
    if not copy and not noisy:
        return reference, candidate
    from rev_tasks.engine import FingerprintSide, as_side

    ref_side, cand_side = as_side(reference, key), as_side(candidate, key)
    if copy:
        log.warning("fault injection: copying the reference's signatures into %s", candidate_path)
        cand_side = _CopiedSide(ref_side, cand_side)
    if noisy:
        log.warning(
            "fault injection: %d bits flipped per record side for %s", noisy, candidate_path
        )
        cand_side = _NoisySide(cand_side, noisy)
        if not isinstance(ref_side, FingerprintSide):
            ref_side = _NoisySide(ref_side, noisy)
    return ref_side, cand_side


@contextlib.contextmanager
def device_noise(candidate_path: str, models: Sequence[Any]) -> Iterator[float]:
    """While the job's models run: every linear layer's output times (1 + eps·g), or nothing.

    g is one fixed standard normal draw per layer and output shape, the same for every model,
    so identical weights still give identical outputs (as on one device), while a validator
    on another device (here: unhooked) computes slightly different activations. Yields eps
    (0.0 unmarked). Only in-memory models (a ``torch.nn.Module`` under ``.model``) are hooked.
    """
    eps = _lookup(active().device_noise, candidate_path)
    if not eps:
        yield 0.0
        return
    import torch

    log.warning("fault injection: device noise %g on the models of %s", eps, candidate_path)
    handles = []
    for model in models:
        module = getattr(model, "model", None)
        if not isinstance(module, torch.nn.Module):
            continue
        layers = [m for m in module.modules() if type(m).__name__ in ("Linear", "Conv1D")]
        for i, layer in enumerate(layers):

            def hook(_m: Any, _inputs: Any, out: Any, i: int = i) -> Any:
                g = torch.Generator().manual_seed(i)
                noise = torch.randn(out.shape, generator=g, dtype=out.dtype)
                return out * (1 + eps * noise.to(out.device))

            handles.append(layer.register_forward_hook(hook))
    try:
        yield float(eps)
    finally:
        for h in handles:
            h.remove()
