"""Per-query evidence: what one endpoint response says against the reference.

Each function here is split in two: ``*_view`` takes the reference model's full distribution
and keeps only the few numbers the response needs (they go into the transcript, committed in
its Merkle leaf); ``*_statistic`` / ``text_log_e`` compute the evidence from the raw response
and that view alone, so ``rev audit`` re-derives every number without the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rev_tasks.endpoints.client import EndpointError, NoLogprobs

__all__ = [
    "NoLogprobs",
    "TEMPERATURES",
    "PLUGIN_PRIOR",
    "first_top_logprobs",
    "logprob_statistic",
    "logprob_view",
    "sampled_piece",
    "text_log_e",
    "text_view",
    "OTHER",
    "TopKRow",
]

#: Alternatives of the text-mode e-process: the reference tempered by these (weight 1/4 each)
#: and a per-prompt plug-in of the endpoint's own samples (weight 1/2), prior strength
#: PLUGIN_PRIOR samples of the reference.
TEMPERATURES = (0.7, 1.4)
PLUGIN_PRIOR = 2.0
_AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class TopKRow:
    """One prompt's reference distribution as an endpoint fingerprint keeps it.

    ``ids``/``logprobs``: the reference's top-K token ids, most likely first; every token
    outside them has a log-probability in [``floor``, ``logprobs[-1]``]. ``empty``: log p of
    the ids that print as "" (exact). ``log_norm``: log sum exp(beta * row) for each of
    :data:`TEMPERATURES`; ``other``: log p and log q_beta of the text-mode class OTHER when the
    single-piece classes are only those in the top-K (exact, computed from the full row).
    """

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    floor: float
    empty: float
    log_norm: tuple[float, ...]
    other: tuple[float, ...]

    @property
    def ceiling(self) -> float:
        """The K-th largest log-probability: an upper bound for every token not stored."""
        return self.logprobs[-1]

    def lookup(self, token: int) -> float | None:
        """The stored log-probability of ``token``; None when it is outside the top-K."""
        try:
            return self.logprobs[self.ids.index(token)]
        except ValueError:
            return None


def topk_row(
    row: np.ndarray, top_k: int, empty: float, other_ids: Sequence[int] | np.ndarray
) -> TopKRow:
    """Keep of a full reference row (log-probabilities over the vocabulary) what the evidence
    needs: see :class:`TopKRow`. ``other_ids``: the ids of the full text-mode class OTHER."""
    k = min(top_k, row.shape[0])
    order = np.argsort(-row, kind="stable")[:k]
    full_other = np.zeros(row.shape[0], dtype=bool)
    full_other[np.asarray(other_ids, dtype=np.int64)] = True
    in_top = np.zeros(row.shape[0], dtype=bool)
    in_top[order] = True
    # OTHER for a fingerprint: the full OTHER plus every single-piece token outside the top-K.
    other_mask = full_other | ~in_top
    log_norm = tuple(float(np.logaddexp.reduce(b * row)) for b in TEMPERATURES)
    other = [float(np.logaddexp.reduce(row[other_mask]))] if other_mask.any() else [-math.inf]
    for b, z in zip(TEMPERATURES, log_norm, strict=True):
        other.append(
            float(np.logaddexp.reduce(b * row[other_mask]) - z) if other_mask.any() else -math.inf
        )
    return TopKRow(
        ids=tuple(int(i) for i in order),
        logprobs=tuple(float(row[i]) for i in order),
        floor=float(row.min()),
        empty=float(empty),
        log_norm=log_norm,
        other=tuple(other),
    )


def first_top_logprobs(body: Mapping[str, Any]) -> dict[str, float] | None:
    """The top-k dict of the first generated position; None when the reply has none."""
    try:
        choice = body["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    if not isinstance(lp, dict):
        return None
    top = lp.get("top_logprobs")
    if not isinstance(top, list) or not top or not isinstance(top[0], dict) or not top[0]:
        return None
    out: dict[str, float] = {}
    for piece, value in top[0].items():
        if isinstance(value, int | float) and math.isfinite(value):
            out[str(piece)] = float(value)
    return out or None


def sampled_piece(body: Mapping[str, Any]) -> str:
    """The text of the first choice (one sampled token in text mode)."""
    try:
        text = body["choices"][0].get("text")
    except (KeyError, IndexError, TypeError, AttributeError):
        text = None
    if not isinstance(text, str):
        raise EndpointError("endpoint reply is not OpenAI-compatible (choices[0].text missing)")
    return text


def _check_eos_only(body: Mapping[str, Any]) -> None:
    """A reply without logprobs is evidence only when the model stopped at once."""
    if sampled_piece(body) != "":
        raise NoLogprobs()


def logprob_view(reference: Any, row: np.ndarray, body: Mapping[str, Any]) -> dict[str, Any]:
    """The reference's log-probabilities of the pieces this reply lists (and of the empty piece,
    for replies that stopped at once). ``None`` for a piece the reference has no token for."""
    top = first_top_logprobs(body)
    if top is None:
        _check_eos_only(body)
        pieces: list[str] = []
    else:
        pieces = list(top)
    view: dict[str, Any] = {}
    for piece in pieces:
        ids = reference.ids_of_piece.get(piece)
        if not ids:
            view[piece] = None
        elif len(ids) > 1:
            view[piece] = _AMBIGUOUS
        elif isinstance(row, TopKRow):
            lp = row.lookup(ids[0])
            # Outside the stored top-K only an interval is known: the statistic takes the
            # largest gap it allows (never smaller than the full reference's).
            view[piece] = (
                {"at_least": row.floor, "at_most": row.ceiling} if lp is None else float(lp)
            )
        else:
            view[piece] = float(row[ids[0]])
    if isinstance(row, TopKRow):
        return {"pieces": view, "max": row.logprobs[0], "empty": row.empty}
    return {
        "pieces": view,
        "max": float(row.max()),
        "empty": reference.piece_logprob(row, ""),
    }


def logprob_statistic(body: Mapping[str, Any], view: Mapping[str, Any]) -> float:
    """s = max |log p_endpoint - log p_reference| over the reply's top pieces (nats).

    A piece the reference has no token for gives +inf (another vocabulary); ambiguous pieces
    are skipped. A piece whose reference log-probability is known only to lie in
    [at_least, at_most] (outside a fingerprint's top-K) contributes the largest gap in that
    interval, so s is an upper bound on the full reference's statistic. A reply that stopped at once (no logprobs, empty text) gives how far the
    reference is from stopping too: max log p - log p(stop), 0 when it would also stop.
    """
    top = first_top_logprobs(body)
    if top is None:
        _check_eos_only(body)
        return max(0.0, float(view["max"]) - float(view["empty"]))
    worst = 0.0
    pieces = view["pieces"]
    for piece, lp in top.items():
        ref = pieces.get(piece, None)
        if ref is None:
            return math.inf
        if ref == _AMBIGUOUS:
            continue
        if isinstance(ref, Mapping):
            worst = max(worst, bounded_gap(lp, float(ref["at_least"]), float(ref["at_most"])))
            continue
        worst = max(worst, abs(lp - float(ref)))
    return worst


def bounded_gap(lp: float, at_least: float, at_most: float) -> float:
    """max |lp - x| over x in [at_least, at_most]: the worst gap a bounded value allows."""
    if not at_least <= at_most:
        raise ValueError(f"bounds out of order: {at_least} > {at_most}")
    return max(lp - at_least, at_most - lp)


OTHER = "\u0000other"


def _class_ids(reference: Any, piece: str) -> tuple[str, list[int]]:
    """The observation class of a sampled piece and the reference ids that fall in it."""
    if piece in reference.single_piece:
        return piece, [reference.single_piece[piece]]
    return OTHER, reference.other_ids


def _class_logprob(row: np.ndarray, ids: list[int], beta: float) -> float:
    scaled = beta * row
    return float(np.logaddexp.reduce(scaled[ids]) - np.logaddexp.reduce(scaled))


def text_view(reference: Any, row: np.ndarray, body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampled piece, its observation class (the piece itself, or OTHER), log p(class)
    and log q_beta(class) of the tempered alternatives."""
    piece = sampled_piece(body)
    if isinstance(row, TopKRow):
        return _topk_text_view(reference, row, piece)
    cls, ids = _class_ids(reference, piece)
    logp = _class_logprob(row, ids, 1.0)
    return {
        "piece": piece,
        "class": cls,
        "logp": logp if math.isfinite(logp) else None,
        "tempered": [
            lq if math.isfinite(lq) else None
            for lq in (_class_logprob(row, ids, b) for b in TEMPERATURES)
        ],
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _topk_text_view(reference: Any, row: TopKRow, piece: str) -> dict[str, Any]:
    """text_view for a fingerprint row: a piece is its own class only inside the top-K."""
    token = reference.single_piece.get(piece)
    lp = None if token is None else row.lookup(token)
    if lp is None:
        return {
            "piece": piece,
            "class": OTHER,
            "logp": _finite(row.other[0]),
            "tempered": [_finite(x) for x in row.other[1:]],
        }
    return {
        "piece": piece,
        "class": piece,
        "logp": _finite(lp),
        "tempered": [_finite(b * lp - z) for b, z in zip(TEMPERATURES, row.log_norm, strict=True)],
    }


def text_log_e(view: Mapping[str, Any], count: int, seen: int) -> float:
    """log E for one sampled piece: the mixture alternative over the reference's probability.

    ``count``: how often this prompt's earlier samples were this piece; ``seen``: how many
    earlier samples this prompt had (the plug-in uses only the past, so E is an e-value).
    """
    if view["logp"] is None:
        return math.inf
    logp = float(view["logp"])
    p = math.exp(logp)
    plugin = (count + PLUGIN_PRIOR * p) / (seen + PLUGIN_PRIOR)
    e = 0.5 * plugin / p
    for lq in view["tempered"]:
        e += 0.25 * math.exp(float(lq) - logp) if lq is not None else 0.0
    return math.log(e)
