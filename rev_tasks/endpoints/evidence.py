"""Per-query evidence: what one endpoint response says against the reference.

Each function here is split in two: ``*_view`` takes the reference model's full distribution
and keeps only the few numbers the response needs (they go into the transcript, committed in
its Merkle leaf); ``*_statistic`` / ``text_log_e`` compute the evidence from the raw response
and that view alone, so ``rev audit`` re-derives every number without the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
]

#: Alternatives of the text-mode e-process: the reference tempered by these (weight 1/4 each)
#: and a per-prompt plug-in of the endpoint's own samples (weight 1/2), prior strength
#: PLUGIN_PRIOR samples of the reference.
TEMPERATURES = (0.7, 1.4)
PLUGIN_PRIOR = 2.0
_AMBIGUOUS = "ambiguous"


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
        else:
            view[piece] = float(row[ids[0]])
    return {
        "pieces": view,
        "max": float(row.max()),
        "empty": reference.piece_logprob(row, ""),
    }


def logprob_statistic(body: Mapping[str, Any], view: Mapping[str, Any]) -> float:
    """s = max |log p_endpoint - log p_reference| over the reply's top pieces (nats).

    A piece the reference has no token for gives +inf (another vocabulary); ambiguous pieces
    are skipped. A reply that stopped at once (no logprobs, empty text) gives how far the
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
        worst = max(worst, abs(lp - float(ref)))
    return worst


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
