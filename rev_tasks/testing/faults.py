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
=================================  ============================================================
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Mapping
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


@dataclass(frozen=True)
class Faults:
    """The faults this process injects (all empty unless the enable flag is set)."""

    enabled: bool = False
    validator_modes: tuple[tuple[int, str], ...] = ()
    slow_batch_seconds: float = 0.0
    slow_validation_seconds: float = 0.0
    kill_path: str = ""
    forge_path: str = ""
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
