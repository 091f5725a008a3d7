"""Keeping a prefork worker's children small (measured in bench/bench_memory.py).

The main process imports torch and transformers before the pool forks, so the children
share those pages copy-on-write. Python's cyclic garbage collector writes into every
tracked object it visits, so the first collections in a child copy most of the parent's
module pages (~90 MB of a MiniLM child's 180 MB of private memory, measured).
:func:`freeze_preloaded` moves everything alive in the parent into the collector's
permanent generation (``gc.freeze()``, as the gc module's documentation advises before
``fork()``): the children never traverse it, and the pages stay shared.

``REV_WORKER_MEMORY_TUNING=0`` turns it off (the benchmark's "as it was").
"""

from __future__ import annotations

import gc
import os


def enabled() -> bool:
    return os.environ.get("REV_WORKER_MEMORY_TUNING", "1").strip() != "0"


def freeze_preloaded() -> bool:
    """Collect, then freeze what is alive, so that forked children do not copy it."""
    if not enabled():
        return False
    gc.collect()
    gc.freeze()
    return True
