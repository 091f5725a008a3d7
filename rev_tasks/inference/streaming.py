"""Layer-streamed execution: verify models larger than memory within a memory budget.

``load_streamed`` returns a :class:`StreamedModel` with the same ``descriptor`` / ``sites`` /
``pooled_states`` interface as :class:`~rev_tasks.inference.loader.LoadedModel`, so the engine,
the CLI (``rev verify --memory-budget 512MB``) and the farm's workers use it unchanged. For
each challenge batch it computes the embeddings from the rows the batch uses, then reads one
transformer block's weights from the safetensors file(s), runs the whole batch through it,
pools the sites it owns, and frees the block before reading the next. Resident model memory is
therefore one block plus one batch's activations, whatever the model's size.

Why it does not use transformers: importing transformers' model modules alone lifts a
process's resident floor from ~225 MB (torch) to ~400 MB, more than the whole working set of a
512 MB budget leaves room for. The blocks are re-implemented in plain torch
(``arch_gpt2``/``arch_llama``/``arch_bert``), replaying transformers 4.57's sdpa forward op for
op so that pooled states, and so signatures, are bit-identical to the in-memory path. Tokenising
uses the ``tokenizers`` library on ``tokenizer.json`` configured the way transformers' fast
tokenizer configures it; folders whose tokenizer needs anything else fall back to transformers'
``AutoTokenizer`` (correct, with the higher memory floor).

Why file reads instead of ``mmap``: pages touched through a mapping count in the process's
RSS until it is unmapped, so a long-lived ``safe_open`` would grow towards the whole file. Each
tensor is read with ``preadv`` straight into a fresh torch buffer using the offsets in the
safetensors header; the kernel's page cache (not RSS) keeps re-reads fast.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import struct
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from rev_tasks.inference.arch_common import (
    BlockModel,
    StreamingUnsupported,
    Tensor,
    TokenBatch,
)
from rev_tasks.inference.budget import MB, SUPPORTED, budget_from_env
from rev_tasks.inference.loader import (
    DTYPES,
    MAX_TOKENS,
    ModelLoadError,
    check_model_folder,
    default_sites,
    describe,
    pool_masked,
)

BUDGET_BATCH = 8  # the engine's default batch size: what a budget is checked against at load

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_COMPUTE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_MAX_HEADER = 100 * MB
_MMAP_THRESHOLD = 1 * MB  # see _bound_malloc_fragmentation
_READ_CHUNK = 1 << 30  # preadv moves at most ~2 GiB per call on Linux


class MemoryBudgetError(ModelLoadError):
    """The memory budget cannot hold one block plus a batch's activations."""


# --------------------------------------------------------------------------- budget
# Parsing budgets and REV_MEMORY_BUDGET_MB lives in rev_tasks.inference.budget (no torch).

_malloc_tuned = False


def _bound_malloc_fragmentation() -> bool:
    """Serve every allocation of 1 MB or more with its own mmap (glibc ``M_MMAP_THRESHOLD``).

    By default glibc raises its mmap threshold up to 32 MB after the first large free, so a
    block's activations (a few MB each) come from the heap, interleave with longer-lived
    tensors and fragment it: measured on a 24 × 1024 GPT-2, a batch's peak RSS rose by 30-50
    MB over what is live. A fixed 1 MB threshold returns each freed tensor to the kernel at
    once, at the price of page faults on every large allocation (~10-15% more CPU time per
    batch, measured). Set ``REV_STREAM_MALLOPT=0`` to keep glibc's default. Process-wide and
    applied once, only when a memory budget is in force.
    """
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("REV_STREAM_MALLOPT", "1") == "0":
        return _malloc_tuned
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        _malloc_tuned = bool(libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    return _malloc_tuned


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lies: file, stored dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Parse a safetensors header (8-byte length, JSON) without touching the tensor data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ModelLoadError(f"corrupt safetensors file (no header): {path}")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ModelLoadError(f"corrupt safetensors file (header length): {path}")
            header = json.loads(fh.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read the safetensors header of {path}: {exc}") from exc
    data_start = 8 + header_len
    specs: dict[str, TensorSpec] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"unsupported or corrupt tensor {name!r} in {path}") from exc
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize or data_start + end > size or begin < 0:
            raise ModelLoadError(f"corrupt safetensors file (tensor {name!r} out of range): {path}")
        specs[name] = TensorSpec(path, dtype, shape, data_start + begin, data_start + end)
    return specs


def _preadv_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done : done + _READ_CHUNK]], offset + done)
        if n <= 0:
            raise ModelLoadError(f"truncated safetensors file: {path}")
        done += n


def _byte_view(t: Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


class SafetensorsWeights:
    """The tensors of a model folder (single file or sharded index), read on demand."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        self.specs: dict[str, TensorSpec] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"invalid {index.name} in {folder}") from exc
            for shard in sorted(set(weight_map.values())):
                shard_path = (folder / shard).resolve()
                if shard_path.parent != folder.resolve() or not shard_path.is_file():
                    raise ModelLoadError(f"missing weight shard {shard} in {folder}")
                self.specs.update(read_safetensors_header(shard_path))
        elif (folder / "model.safetensors").is_file():
            self.specs = read_safetensors_header(folder / "model.safetensors")
        else:
            raise ModelLoadError(
                f"streamed execution needs safetensors weights; {folder} has only pickle weights"
            )

    def read(self, spec: TensorSpec, into: Tensor | None = None) -> Tensor:
        """The whole tensor in its stored dtype: a fresh CPU buffer (not a mapping), or the
        first ``spec.nbytes`` of the uint8 buffer ``into`` (the GPU path's pinned staging)."""
        buf = torch.empty(spec.nbytes, dtype=torch.uint8) if into is None else into[: spec.nbytes]
        if spec.nbytes:
            fd = os.open(spec.file, os.O_RDONLY)
            try:
                _preadv_into(fd, _byte_view(buf), spec.start, spec.file)
            finally:
                os.close(fd)
        return buf.view(spec.dtype).view(spec.shape)

    def read_rows(self, spec: TensorSpec, rows: Sequence[int]) -> Tensor:
        """Rows ``rows`` (sorted, unique) of a 2-D tensor, consecutive rows read in one go."""
        if len(spec.shape) != 2:
            raise ModelLoadError(f"expected a matrix, found shape {spec.shape} in {spec.file}")
        n_rows = spec.shape[0]
        row_bytes = spec.nbytes // n_rows if n_rows else 0
        if rows and (rows[0] < 0 or rows[-1] >= n_rows):
            raise ModelLoadError(f"token id out of range 0..{n_rows - 1} in {spec.file}")
        buf = torch.empty(len(rows) * row_bytes, dtype=torch.uint8)
        view = _byte_view(buf)
        fd = os.open(spec.file, os.O_RDONLY)
        try:
            i = 0
            while i < len(rows):
                j = i + 1
                while j < len(rows) and rows[j] == rows[j - 1] + 1:
                    j += 1
                _preadv_into(
                    fd,
                    view[i * row_bytes : j * row_bytes],
                    spec.start + rows[i] * row_bytes,
                    spec.file,
                )
                i = j
        finally:
            os.close(fd)
        return buf.view(spec.dtype).view(len(rows), spec.shape[1])


class BoundWeights:
    """Weights seen through a model's checkpoint prefix, converted to the compute dtype/device.

    ``from_pretrained(dtype=float32)`` upcasts stored fp16/bf16 weights with an exact cast; the
    same ``.to()`` here keeps streamed and in-memory weights bit-identical.
    """

    _ALIASES = ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta"))

    def __init__(
        self, files: SafetensorsWeights, prefix: str, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.files = files
        self.prefix = prefix
        self.dtype = dtype
        self.device = device
        self._pinned: Tensor | None = None

    def spec(self, name: str) -> TensorSpec:
        full = self.prefix + name
        found = self.files.specs.get(full)
        if found is None:
            for new, old in self._ALIASES:
                if full.endswith(new):
                    found = self.files.specs.get(full[: -len(new)] + old)
        if found is None:
            raise ModelLoadError(f"weight {full!r} is missing from the checkpoint")
        return found

    def has(self, name: str) -> bool:
        try:
            self.spec(name)
        except ModelLoadError:
            return False
        return True

    def _convert(self, t: Tensor) -> Tensor:
        if self.device.type != "cpu":
            t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def read(self, name: str) -> Tensor:
        spec = self.spec(name)
        if self.device.type == "cuda":
            return self._read_cuda(spec)
        return self._convert(self.files.read(spec))

    def _read_cuda(self, spec: TensorSpec) -> Tensor:
        """File → one reused pinned host buffer → device, then the dtype cast on the device.

        A fresh pageable buffer per tensor costs a page fault per 4 KB and a staged (slow)
        host-to-device copy; the pinned buffer (as large as the largest tensor, kept for the
        model's life) makes each block's upload one DMA copy. The copy is synchronous, so the
        buffer is free again when it returns.
        """
        if self._pinned is None or self._pinned.numel() < spec.nbytes:
            self._pinned = None
            self._pinned = torch.empty(spec.nbytes, dtype=torch.uint8, pin_memory=True)
        host = self.files.read(spec, into=self._pinned)
        dev = torch.empty(spec.nbytes, dtype=torch.uint8, device=self.device)
        dev.copy_(host.view(torch.uint8).view(-1))
        t = dev.view(spec.dtype).view(spec.shape)
        return t.to(self.dtype) if t.is_floating_point() else t

    def read_rows(self, name: str, rows: Sequence[int]) -> Tensor:
        return self._convert(self.files.read_rows(self.spec(name), rows))

    def compute_bytes(self, name: str) -> int:
        spec = self.spec(name)
        if not spec.dtype.is_floating_point:
            return spec.nbytes
        return spec.numel * torch.empty((), dtype=self.dtype).element_size()


# --------------------------------------------------------------------------- tokenizer


_SPECIAL_KEYS = ("unk_token", "bos_token", "eos_token", "pad_token", "cls_token", "sep_token")
_SPECIAL_KEYS_ALL = (*_SPECIAL_KEYS, "mask_token")
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "PreTrainedTokenizer": {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]},
    "BertTokenizer": {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
    },
    "GPT2Tokenizer": {
        "unk_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "model_input_names": ["input_ids", "attention_mask"],
    },
}
_MODEL_TYPE_TOKENIZER = {"bert": "BertTokenizer", "gpt2": "GPT2Tokenizer"}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_key(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(
        entry.get(k, d)
        for k, d in (
            ("content", None),
            ("single_word", False),
            ("lstrip", False),
            ("rstrip", False),
            ("normalized", True),
            ("special", False),
        )
    )


class _FastPathRefused(Exception):
    """This tokenizer needs transformers' own initialisation to tokenise identically."""


@dataclass
class StreamTokenizer:
    """Tokenises challenge batches exactly as ``LoadedModel.tokenize`` does.

    ``backend`` is ``"tokenizers"`` (``tokenizer.json`` through the Rust library; no transformers
    import) or ``"transformers"`` (fallback for tokenizers whose transformers class rewrites the
    backend in ways not reproduced here; ``reason`` says why).
    """

    backend: str
    reason: str = ""
    _tok: Any = field(default=None, repr=False)
    _return_types: bool = False

    @classmethod
    def load(cls, folder: Path, model_type: str) -> StreamTokenizer:
        try:
            return cls._fast(folder, model_type)
        except _FastPathRefused as why:
            return cls._transformers(folder, str(why))

    @classmethod
    def _fast(cls, folder: Path, model_type: str) -> StreamTokenizer:
        from tokenizers import Tokenizer, pre_tokenizers

        tj_path = folder / "tokenizer.json"
        if not tj_path.is_file():
            raise _FastPathRefused("no tokenizer.json")
        if (folder / "added_tokens.json").is_file():
            raise _FastPathRefused("legacy added_tokens.json")
        cfg_path = folder / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read the tokenizer in {folder}: {exc}") from exc
        klass = cfg.get("tokenizer_class") or _MODEL_TYPE_TOKENIZER.get(model_type)
        klass = (klass or "").removesuffix("Fast")
        if klass not in _CLASS_DEFAULTS:
            raise _FastPathRefused(f"tokenizer class {klass or 'unknown'}")
        if cfg.get("split_special_tokens") or cfg.get("from_slow") or cfg.get("add_bos_token"):
            raise _FastPathRefused("tokenizer options that rewrite the backend")
        # Which special tokens transformers ends up with (tokenizer_config wins; the legacy
        # special_tokens_map.json overrides it only when there is no added_tokens_decoder).
        values: dict[str, Any] = {
            k: v for k, v in _CLASS_DEFAULTS[klass].items() if k != "model_input_names"
        }
        values.update({k: cfg[k] for k in _SPECIAL_KEYS_ALL if k in cfg})
        stm_path = folder / "special_tokens_map.json"
        if "added_tokens_decoder" not in cfg and stm_path.is_file():
            stm = json.loads(stm_path.read_text(encoding="utf-8"))
            values.update({k: stm[k] for k in _SPECIAL_KEYS_ALL if k in stm})
            if stm.get("additional_special_tokens"):
                raise _FastPathRefused("additional special tokens")
        if cfg.get("additional_special_tokens"):
            raise _FastPathRefused("additional special tokens")
        added = {int(t["id"]): t for t in tj.get("added_tokens", [])}
        added_contents = {t.get("content") for t in added.values()}
        for idx, entry in (cfg.get("added_tokens_decoder") or {}).items():
            have = added.get(int(idx))
            if have is None or _added_key(have) != _added_key(entry):
                raise _FastPathRefused("added_tokens_decoder differs from tokenizer.json")
        specials = {k: _token_text(v) for k, v in values.items()}
        for key, text in specials.items():
            if text is not None and text not in added_contents:
                raise _FastPathRefused(f"{key} {text!r} is not an added token of tokenizer.json")
        padding = tj.get("padding") or {}
        pad_text = specials.get("pad_token") or padding.get("pad_token")
        pad_text = pad_text or specials.get("eos_token") or specials.get("unk_token")
        if pad_text is None:
            raise ModelLoadError(f"tokenizer in {folder} has no pad, eos or unk token")
        if pad_text not in added_contents:  # transformers would add it as a new token
            raise _FastPathRefused(f"pad token {pad_text!r} is not an added token")
        if klass == "BertTokenizer" and not _bert_normalizer_matches(tj, cfg):
            raise _FastPathRefused("BERT normalizer options differ from tokenizer_config")

        tok = Tokenizer.from_file(str(tj_path))
        pad_id = tok.token_to_id(pad_text)
        if pad_id is None:
            raise _FastPathRefused(f"pad token {pad_text!r} not in the vocabulary")
        tok.encode_special_tokens = False
        # PreTrainedTokenizerFast.__init__: align the pre-tokenizer's add_prefix_space
        add_prefix_space = cfg.get("add_prefix_space", False)
        try:
            state = json.loads(tok.pre_tokenizer.__getstate__())
            if state.get("add_prefix_space", add_prefix_space) != add_prefix_space:
                pre_class = getattr(pre_tokenizers, state.pop("type"))
                state["add_prefix_space"] = add_prefix_space
                tok.pre_tokenizer = pre_class(**state)
        except Exception:  # noqa: BLE001, S110 - transformers ignores failures here too
            pass
        truncation = tj.get("truncation") or {}
        direction = cfg.get("truncation_side") or truncation.get("direction") or "right"
        tok.enable_truncation(
            max_length=MAX_TOKENS, stride=0, strategy="longest_first", direction=direction.lower()
        )
        pad_type_id = int(cfg.get("pad_token_type_id", padding.get("pad_type_id", 0)) or 0)
        tok.enable_padding(
            direction="right", pad_id=pad_id, pad_type_id=pad_type_id, pad_token=pad_text
        )
        names = cfg.get("model_input_names") or _CLASS_DEFAULTS[klass]["model_input_names"]
        return cls(
            backend="tokenizers",
            _tok=tok,
            _return_types="token_type_ids" in names,
        )

    @classmethod
    def _transformers(cls, folder: Path, reason: str) -> StreamTokenizer:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:  # noqa: BLE001 - the user's folder
            raise ModelLoadError(f"cannot load the tokenizer in {folder}: {exc}") from exc
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise ModelLoadError(f"tokenizer in {folder} has no pad, eos or unk token")
        tok.padding_side = "right"
        return cls(backend="transformers", reason=reason, _tok=tok)

    def __call__(self, prompts: Sequence[str]) -> TokenBatch:
        if self.backend == "transformers":
            enc = self._tok(
                list(prompts),
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            return TokenBatch(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        encodings = self._tok.encode_batch(list(prompts), add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        types = (
            torch.tensor([e.type_ids for e in encodings], dtype=torch.long)
            if self._return_types
            else None
        )
        return TokenBatch(ids, mask, types)


def _bert_normalizer_matches(tj: Mapping[str, Any], cfg: Mapping[str, Any]) -> bool:
    """BertTokenizerFast rebuilds the normalizer when tokenizer_config disagrees with it."""
    state = tj.get("normalizer") or {}
    if state.get("type") != "BertNormalizer":
        return True
    want = {
        "lowercase": cfg.get("do_lower_case", True),
        "strip_accents": cfg.get("strip_accents"),
        "handle_chinese_chars": cfg.get("tokenize_chinese_chars", True),
    }
    return all(state.get(k, v) == v for k, v in want.items())


# --------------------------------------------------------------------------- model


def _blocks_for(config: dict[str, Any]) -> BlockModel:
    model_type = config.get("model_type")
    try:
        if model_type == "gpt2":
            from rev_tasks.inference.arch_gpt2 import GPT2Blocks

            return GPT2Blocks(config)
        if model_type == "llama":
            from rev_tasks.inference.arch_llama import LlamaBlocks

            return LlamaBlocks(config)
        if model_type == "bert":
            from rev_tasks.inference.arch_bert import BertBlocks

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


@dataclass
class StreamedModel:
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

    @property
    def sites(self) -> list[int]:
        return default_sites(self.descriptor["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.descriptor["hidden_size"])

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

    def pooled_states(self, prompts: Sequence[str], sites: Sequence[int]) -> dict[int, np.ndarray]:
        """Masked mean of each site's hidden states, float64 (batch, hidden), block by block.

        Blocks past the last requested site are never read. Each block's weights are dropped
        before the next is read: ``del`` removes their only references and torch frees a tensor
        the moment its refcount reaches zero (the blocks create no reference cycles). A
        ``gc.collect()`` per block would free nothing more and costs ~80 ms with torch loaded.
        """
        sites = list(sites)
        bad = [s for s in sites if not 1 <= s <= self.descriptor["num_layers"]]
        if bad:
            raise ValueError(f"sites {bad} outside 1..{self.descriptor['num_layers']}")
        if not sites:
            return {}
        batch = self.tokenize(prompts)
        self.check_budget(int(batch.input_ids.shape[0]), int(batch.input_ids.shape[1]))
        mask = batch.attention_mask.to(torch.float64).unsqueeze(-1)
        wanted = set(sites)
        pooled: dict[int, np.ndarray] = {}
        device = self.weights.device
        with self._no_grad():
            try:
                state = self.blocks.embed(self.weights, batch, device)
                for index in range(max(sites)):
                    w = {n: self.weights.read(n) for n in self.blocks.block_tensors(index)}
                    state = self.blocks.block(index, w, state)
                    del w
                    if index + 1 in wanted:
                        pooled[index + 1] = pool_masked(state.hidden, mask)
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
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
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
        _bound_malloc_fragmentation()
    return model
