"""Pieces shared by the streamed block implementations (GPT-2, Llama, BERT).

The streamed engine re-implements each architecture's forward pass in plain torch so that a
memory-bounded run never imports transformers (whose modules alone lift a process's resident
floor from ~225 MB to ~400 MB). Bit-identity with the in-memory path is the contract, so every
function here copies the exact torch call sequence transformers 4.57 runs on the same inputs:
same ops, same order, same dtypes, same tensor layouts. Changing an expression that is
"mathematically equal" (``0.5 * x * y`` versus ``x * 0.5 * y``) breaks that contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class StreamingUnsupported(Exception):
    """The model folder uses a feature the streamed engine does not reproduce exactly."""


@dataclass
class TokenBatch:
    """Tokenised challenge batch, exactly as the in-memory loader's tokenizer returns it."""

    input_ids: Tensor  # (batch, tokens) int64, right-padded
    attention_mask: Tensor  # (batch, tokens) int64
    token_type_ids: Tensor | None  # present when the tokenizer's model_input_names lists it


class WeightSource(Protocol):
    """What a block implementation needs from the weight files."""

    def read(self, name: str) -> Tensor:
        """One tensor, in the compute dtype, on the compute device."""
        ...

    def read_rows(self, name: str, rows: Sequence[int]) -> Tensor:
        """Rows ``rows`` (sorted, unique) of a 2-D tensor, compute dtype and device."""
        ...

    def has(self, name: str) -> bool: ...


class BlockModel(Protocol):
    """One architecture's forward pass, split into embeddings and independent blocks."""

    model_type: str
    num_layers: int
    hidden_size: int
    prefixes: tuple[str, ...]  # checkpoint prefixes to try ("transformer.", "model.", ...)
    probe: str  # a tensor every checkpoint of the architecture has, to find the prefix

    def block_tensors(self, index: int) -> list[str]:
        """Logical names of block ``index``'s weights (checkpoint prefix excluded)."""
        ...

    def embedding_tensors(self) -> list[str]:
        """Logical names of the tensors :meth:`embed` reads rows of."""
        ...

    def embed(self, weights: WeightSource, batch: TokenBatch, device: torch.device) -> Any:
        """The hidden states entering block 0 and whatever context the blocks share."""
        ...

    def block(self, index: int, w: Mapping[str, Tensor], state: Any) -> Any:
        """Run block ``index`` on ``state`` (returns the new state)."""
        ...

    def activation_bytes(self, batch: int, tokens: int, itemsize: int) -> int:
        """An upper estimate of the activations one block holds at its peak."""
        ...


def cfg_get(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    """First present, non-None value among config aliases (e.g. ``n_embd``/``hidden_size``)."""
    for name in names:
        value = config.get(name)
        if value is not None:
            return value
    return default


def gather_embedding(weights: WeightSource, name: str, ids: Tensor) -> Tensor:
    """``embedding(ids)`` reading only the rows ``ids`` uses.

    An embedding lookup copies rows, so looking up ids remapped into the gathered rows gives
    the same bits as looking them up in the full matrix; the full vocabulary never has to be
    resident (it is the largest tensor of many small-vocabulary-free models).
    """
    unique, inverse = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
    rows = weights.read_rows(name, [int(i) for i in unique.tolist()])
    return F.embedding(inverse.to(rows.device), rows)


def layer_norm(x: Tensor, w: Tensor, b: Tensor | None, eps: float) -> Tensor:
    """``nn.LayerNorm.forward``."""
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``nn.Linear.forward``."""
    return F.linear(x, w, b)


def _gelu_new(x: Tensor) -> Tensor:
    # transformers.activations.NewGELUActivation, expression order kept
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


def _gelu_new_inplace(x: Tensor) -> Tensor:
    """``_gelu_new`` overwriting ``x`` and one temporary instead of ~5 full-size temporaries.

    Each step is the same IEEE operation on the same operands as the out-of-place expression
    (scalar multiplications and additions commute exactly), so the bits are unchanged; the MLP
    activation is the largest tensor of a block's forward, so this is the activation peak.
    """
    inner = torch.pow(x, 3.0)
    inner.mul_(0.044715)
    inner.add_(x)
    inner.mul_(math.sqrt(2.0 / math.pi))
    inner.tanh_()
    inner.add_(1.0)
    x.mul_(0.5)
    x.mul_(inner)
    return x


def _silu_inplace(x: Tensor) -> Tensor:
    return F.silu(x, inplace=True)


def _gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_python(x: Tensor) -> Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_python": _gelu_python,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


INPLACE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": _gelu_new_inplace,
    "relu": lambda x: F.relu(x, inplace=True),
    "silu": _silu_inplace,
    "swish": _silu_inplace,
}


def activation(name: Any, inplace: bool = False) -> Callable[[Tensor], Tensor]:
    """transformers' ``ACT2FN[name]`` for the activations the supported models use.

    ``inplace=True`` may return a variant that overwrites its argument (same bits); callers
    pass it only where the argument is a temporary nothing else reads.
    """
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise StreamingUnsupported(f"activation {name!r} is not reproduced by the streamed engine")
    if inplace and name in INPLACE_ACTIVATIONS:
        return INPLACE_ACTIVATIONS[name]
    return ACTIVATIONS[name]


def causal_sdpa_mask(attention_mask: Tensor, device: torch.device) -> Tensor | None:
    """``masking_utils.create_causal_mask`` for sdpa with no cache offset.

    ``None`` when no token is padded (transformers then asks sdpa for ``is_causal=True``);
    otherwise a boolean (batch, 1, q, kv) mask ``kv <= q and not padded(kv)``.
    """
    padding = attention_mask.to(device=device, dtype=torch.bool)
    if bool(padding.all()):
        return None
    tokens = padding.shape[1]
    q_idx = torch.arange(tokens, device=device)
    kv_idx = torch.arange(tokens, device=device)
    causal = kv_idx[None, :] <= q_idx[:, None]  # (q, kv)
    mask = causal[None, None, :, :] & padding[:, None, None, :]
    return mask.contiguous()


def cache_concat(x: Tensor) -> Tensor:
    """What ``DynamicLayer.update`` returns on the first forward: ``cat([empty, x], -2)``.

    The concatenation makes key/value states contiguous; sdpa kernels may round differently
    on another memory layout, so the copy is kept whenever the in-memory model uses a cache.
    """
    empty = torch.tensor([], dtype=x.dtype, device=x.device)
    return torch.cat([empty, x], dim=-2)
