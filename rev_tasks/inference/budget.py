"""Memory budgets for layer-streamed execution, without importing torch.

The coordinator validates a job's ``memory_budget_mb`` and the model's architecture at
submit time, and the settings read the worker default ``REV_MEMORY_BUDGET_MB``; neither
should pay for a torch import to do so. The streaming engine itself
(:mod:`rev_tasks.inference.streaming`) imports these names from here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from rev_tasks import boundedjson

ENV_BUDGET = "REV_MEMORY_BUDGET_MB"
MB = 1 << 20
MIN_BUDGET_MB = 16  # below this no supported model's block fits; a typo, not a budget
MAX_BUDGET_MB = 1 << 20  # 1 TiB: larger is a unit mistake (bytes for megabytes)
SUPPORTED = ("gpt2", "llama", "bert")  # model_type values the streamed engine executes


def parse_memory_mb(text: str | int) -> int:
    """``512``, ``512MB``, ``2GB``, ``1.5G`` → megabytes (MiB), as ``rev --memory-budget``."""
    if isinstance(text, int):
        mb = text
    else:
        t = str(text).strip().upper().removesuffix("B").removesuffix("I")
        scale = 1.0
        if t.endswith("G"):
            scale, t = 1024.0, t[:-1]
        elif t.endswith("M"):
            t = t[:-1]
        try:
            mb = int(float(t) * scale)
        except ValueError as exc:
            raise ValueError(f"not a memory size: {text!r} (e.g. 512MB)") from exc
    if mb < 1:
        raise ValueError(f"memory budget must be positive, not {text!r}")
    return mb


def memory_budget_arg(text: str) -> int:
    """argparse ``type=`` for ``--memory-budget`` (``rev verify`` and ``rev submit``)."""
    try:
        mb = parse_memory_mb(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not MIN_BUDGET_MB <= mb <= MAX_BUDGET_MB:
        raise argparse.ArgumentTypeError(
            f"memory budget must be between {MIN_BUDGET_MB}MB and {MAX_BUDGET_MB // 1024}GB"
        )
    return mb


def budget_from_env(
    memory_budget_mb: int | None = None, environ: Mapping[str, str] | None = None
) -> int | None:
    """The budget to use: the explicit one, else ``REV_MEMORY_BUDGET_MB``, else ``None``.

    The farm's job field ``memory_budget_mb`` wins over the worker's default so that one job can
    ask for less (or more) than the worker is configured with; an empty or ``0`` variable means
    "no budget" (load in memory).
    """
    if memory_budget_mb is not None:
        return parse_memory_mb(int(memory_budget_mb))
    raw = (environ if environ is not None else os.environ).get(ENV_BUDGET, "").strip()
    if raw.lower() in ("", "0", "none", "off"):
        return None
    try:
        return parse_memory_mb(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_BUDGET}={raw!r}: {exc}") from exc


def streaming_refusal(folder: str | os.PathLike[str]) -> str | None:
    """Why the streamed engine cannot run this folder's model, or ``None`` when it can.

    Reads only ``config.json``: the coordinator's early answer to a job that asks for a
    memory budget on, say, a T5 model. The worker's own load repeats the full checks.
    """
    try:
        config = boundedjson.load_file(Path(folder) / "config.json")
    except (OSError, ValueError):  # too large or too deep included (JSONLimitError)
        return None  # the folder checks report an unreadable config in their own words
    if not isinstance(config, dict):
        return None
    model_type = config.get("model_type")
    if config.get("is_encoder_decoder"):
        return "streamed execution does not support encoder-decoder models"
    if model_type not in SUPPORTED:
        return f"streamed execution supports {', '.join(SUPPORTED)}, not {model_type!r}"
    return None
