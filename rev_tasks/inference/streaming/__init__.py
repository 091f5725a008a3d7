"""Layer-streamed execution: verify models larger than memory within a memory budget.

``load_streamed`` returns a :class:`StreamedModel` with the same ``descriptor`` / ``sites`` /
``pooled_states`` interface as :class:`~rev_tasks.inference.loader.LoadedModel`, so the engine,
the CLI (``rev verify --memory-budget 512MB``) and the farm's workers use it unchanged.
Resident model memory is one block plus one batch's activations, whatever the model's size.

Why it does not use transformers: importing transformers' model modules alone lifts a
process's resident floor from ~225 MB (torch) to ~400 MB, more than the whole working set of a
512 MB budget leaves room for. The blocks are re-implemented in plain torch
(``arch_gpt2``/``arch_llama``/``arch_bert``), replaying transformers 4.57's sdpa forward op for
op so that pooled states, and so signatures, are bit-identical to the in-memory path.

The package keeps each concern in one module:

- :mod:`.weights`: where each tensor lies in the safetensors files, read with ``preadv``;
- :mod:`.tokenizer`: challenge batches tokenised as the loader tokenises them;
- :mod:`.allocator`: glibc tuning that keeps a budgeted run's heap from fragmenting;
- :mod:`.model`: the budgeted model and ``load_streamed``;
- ``arch_common`` / ``arch_gpt2`` / ``arch_llama`` / ``arch_bert``: each architecture's blocks.
"""

from rev_tasks.inference.streaming.model import (
    BUDGET_BATCH,
    MemoryBudgetError,
    StreamedModel,
    load_streamed,
)
from rev_tasks.inference.streaming.tokenizer import StreamTokenizer
from rev_tasks.inference.streaming.weights import (
    BoundWeights,
    SafetensorsWeights,
    TensorSpec,
    read_safetensors_header,
)

__all__ = [
    "BUDGET_BATCH",
    "BoundWeights",
    "MemoryBudgetError",
    "SafetensorsWeights",
    "StreamTokenizer",
    "StreamedModel",
    "TensorSpec",
    "load_streamed",
    "read_safetensors_header",
]
