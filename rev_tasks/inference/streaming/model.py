"""The budgeted model: one block's weights plus one batch's activations at a time.

:class:`StreamedModel` has :class:`~rev_tasks.inference.loader.LoadedModel`'s interface
(``descriptor`` / ``sites`` / ``pooled_states``). For each challenge batch it computes the
embeddings from the rows the batch uses, then reads one transformer block's weights, runs the
whole batch through it, pools the sites it owns, and frees the block before reading the next.
The per-architecture block code (``arch_*``) says what a block is; :mod:`.weights` reads it.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rev_tasks import boundedjson
from rev_tasks.inference.budget import MB, SUPPORTED, budget_from_env
from rev_tasks.inference.loader import (
    DTYPES,
    MAX_TOKENS,
    ModelLoadError,
    SiteModel,
    check_model_folder,
    describe,
    pool_masked,
    pool_masked_on_device,
)
from rev_tasks.inference.streaming.allocator import bound_malloc_fragmentation
from rev_tasks.inference.streaming.arch_common import BlockModel, StreamingUnsupported, TokenBatch
from rev_tasks.inference.streaming.tokenizer import StreamTokenizer
from rev_tasks.inference.streaming.weights import BoundWeights, SafetensorsWeights

BUDGET_BATCH = 8  # the engine's default batch size: what a budget is checked against at load

_COMPUTE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class MemoryBudgetError(ModelLoadError):
    """The memory budget cannot hold one block plus a batch's activations."""


def _blocks_for(config: dict[str, Any]) -> BlockModel:
    model_type = config.get("model_type")
    try:
        if model_type == "gpt2":
            from rev_tasks.inference.streaming.arch_gpt2 import GPT2Blocks

            return GPT2Blocks(config)
        if model_type == "llama":
            from rev_tasks.inference.streaming.arch_llama import LlamaBlocks

            return LlamaBlocks(config)
        if model_type == "bert":
            from rev_tasks.inference.streaming.arch_bert import BertBlocks

            return BertBlocks(config)
    except StreamingUnsupported as exc:
        raise ModelLoadError(f"cannot stream this {model_type} model: {exc}") from exc
    raise ModelLoadError(
        f"streamed execution supports {', '.join(SUPPORTED)}, not {model_type!r}; "
        "run without --memory-budget to load it in memory"
    )


def _auto_dtype(config: Mapping[str, Any], files: SafetensorsWeights) -> torch.dtype:
    """``dtype="auto"``: the config's dtype, else the first floating tensor's."""
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str) and named in _COMPUTE_DTYPES:
        return _COMPUTE_DTYPES[named]
    for spec in files.specs.values():
        if spec.dtype.is_floating_point:
            return spec.dtype
    return torch.float32


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"invalid device {device!r}") from exc


def _mb(n: int) -> int:
    return max(1, math.ceil(n / MB))


class TensorStream(Mapping[str, torch.Tensor]):
    """A block's weights, each read from the file when the block looks it up, never kept.

    The block code uses each weight once, inside the call that consumes it, so a tensor is
    freed as soon as that call returns: the peak holds the largest tensor of a block instead
    of the whole block (issue 17: a 1.1 GiB Llama of 11 blocks × 1536 wide, 101 MiB each,
    peaked at 0.40× its weights with whole blocks resident). Same tensors, same ops: the bits
    are unchanged.
    """

    def __init__(self, weights: BoundWeights, names: Sequence[str]) -> None:
        self._weights = weights
        self._names = tuple(names)
        self._known = frozenset(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._weights.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class StreamedModel(SiteModel):
    """A model executed block by block from its weight files; ``LoadedModel``'s interface."""

    path: str
    descriptor: dict[str, Any]
    blocks: BlockModel
    weights: BoundWeights
    tokenizer: StreamTokenizer
    memory_budget_mb: int | None
    device: str = "cpu"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _largest_block: int | None = field(default=None, repr=False)
    device_pooling = True  # pooled_states(..., on_device=True): signatures.model_signatures

    # -- memory model

    def largest_block_bytes(self) -> int:
        """Compute-dtype bytes of the largest block, plus one tensor's stored-dtype staging."""
        if self._largest_block is None:
            self._largest_block = self._measure_largest_block()
        return self._largest_block

    def _measure_largest_block(self) -> int:
        worst = 0
        for i in range(self.blocks.num_layers):
            names = self.blocks.block_tensors(i)
            total = sum(self.weights.compute_bytes(n) for n in names)
            staging = max(
                (
                    self.weights.spec(n).nbytes
                    for n in names
                    if self.weights.spec(n).dtype != self.weights.dtype
                ),
                default=0,
            )
            worst = max(worst, total + staging)
        return worst

    def working_set_bytes(self, batch: int, tokens: int) -> dict[str, int]:
        """What one batch holds at its peak: a block, its activations, the embedding rows."""
        itemsize = torch.empty((), dtype=self.weights.dtype).element_size()
        block = self.largest_block_bytes()
        activations = self.blocks.activation_bytes(batch, tokens, itemsize)
        embeddings = 3 * batch * tokens * self.hidden_size * itemsize
        return {
            "block": block,
            "activations": activations + embeddings,
            "total": block + activations + embeddings,
        }

    def check_budget(self, batch: int = BUDGET_BATCH, tokens: int = MAX_TOKENS) -> None:
        """Raise :class:`MemoryBudgetError` when the budget cannot hold a batch's working set."""
        if self.memory_budget_mb is None:
            return
        need = self.working_set_bytes(batch, tokens)
        if need["total"] > self.memory_budget_mb * MB:
            raise MemoryBudgetError(
                f"memory budget {self.memory_budget_mb} MB is too small: the largest block needs "
                f"{_mb(need['block'])} MB and a batch of {batch} × {tokens} tokens needs "
                f"{_mb(need['activations'])} MB of activations "
                f"(at least {_mb(need['total'])} MB; the Python/torch runtime comes on top)"
            )

    # -- execution

    @contextmanager
    def _no_grad(self) -> Iterator[None]:
        with self._lock, torch.inference_mode():
            yield

    def tokenize(self, prompts: Sequence[str]) -> TokenBatch:
        return self.tokenizer(prompts)

    def pooled_states(
        self, prompts: Sequence[str], sites: Sequence[int], on_device: bool = False
    ) -> dict[int, Any]:
        """Masked mean of each site's hidden states, float64 (batch, hidden), block by block
        (numpy on the host; float64 tensors on the device with ``on_device=True``).

        Blocks past the last requested site are never read. Each block's weights are dropped
        before the next is read: ``del`` removes their only references and torch frees a tensor
        the moment its refcount reaches zero (the blocks create no reference cycles). A
        ``gc.collect()`` per block would free nothing more and costs ~80 ms with torch loaded.
        """
        sites = list(sites)
        self.check_sites(sites)
        if not sites:
            return {}
        batch = self.tokenize(prompts)
        self.check_budget(int(batch.input_ids.shape[0]), int(batch.input_ids.shape[1]))
        mask = batch.attention_mask.to(torch.float64).unsqueeze(-1)
        wanted = set(sites)
        pool = pool_masked_on_device if on_device else pool_masked
        pooled: dict[int, Any] = {}
        device = self.weights.device
        with self._no_grad():
            try:
                state = self.blocks.embed(self.weights, batch, device)
                for index in range(max(sites)):
                    w = TensorStream(self.weights, self.blocks.block_tensors(index))
                    state = self.blocks.block(index, w, state)
                    del w
                    if index + 1 in wanted:
                        pooled[index + 1] = pool(state.hidden, mask)
                del state
            except StreamingUnsupported as exc:
                raise ModelLoadError(f"cannot stream {self.path}: {exc}") from exc
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return {s: pooled[s] for s in sites}


def load_streamed(
    path: str | os.PathLike[str],
    memory_budget_mb: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> StreamedModel:
    """Open a model folder for layer-streamed execution under a memory budget.

    The single entry point for the CLI and the farm. ``memory_budget_mb=None`` reads
    ``REV_MEMORY_BUDGET_MB``; with neither, blocks still stream but no budget is enforced.
    The budget bounds what the engine holds for the model (largest block + one batch's
    activations + the embedding rows the batch uses), not the Python/torch runtime.
    Nothing but headers and configs is read here. Raises :class:`ModelLoadError` (one line)
    for unusable folders, unsupported architectures and budgets that are too small.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    budget = budget_from_env(memory_budget_mb)
    folder = Path(path).expanduser()
    check_model_folder(folder, allow_pickle=True)
    try:
        config = boundedjson.load_file(folder / "config.json")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"invalid config.json in {folder}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"invalid config.json in {folder}: not an object")
    if config.get("is_encoder_decoder"):
        raise ModelLoadError("streamed execution does not support encoder-decoder models")
    blocks = _blocks_for(config)
    files = SafetensorsWeights(folder)
    compute = _auto_dtype(config, files) if dtype == "auto" else _COMPUTE_DTYPES[dtype]
    torch_device = _resolve_device(device)
    prefix = next(
        (p for p in blocks.prefixes if p + blocks.probe in files.specs),
        None,
    )
    if prefix is None:
        raise ModelLoadError(f"no {blocks.model_type} block weights found in {folder}")
    weights = BoundWeights(files, prefix, compute, torch_device)
    for i in range(blocks.num_layers):
        for name in blocks.block_tensors(i):
            weights.spec(name)  # every block tensor exists before any batch runs
    for name in blocks.embedding_tensors():
        weights.spec(name)
    namespace = SimpleNamespace(
        model_type=config.get("model_type"),
        architectures=config.get("architectures"),
        is_encoder_decoder=False,
        num_hidden_layers=blocks.num_layers,
        hidden_size=blocks.hidden_size,
    )
    descriptor = describe(namespace, str(compute).removeprefix("torch."))
    tokenizer = StreamTokenizer.load(folder, str(config.get("model_type")))
    model = StreamedModel(
        path=str(folder.resolve()),
        descriptor=descriptor,
        blocks=blocks,
        weights=weights,
        tokenizer=tokenizer,
        memory_budget_mb=budget,
        device=str(torch_device),
    )
    model.check_budget()
    if budget is not None:
        bound_malloc_fragmentation()
    return model
