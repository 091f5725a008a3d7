"""GPT-2 blocks in plain torch, op for op as transformers 4.57 ``GPT2Model`` runs them (sdpa).

Why each detail is here: Conv1D is ``addmm`` on a 2-D view (not ``F.linear``); key and value
states go through the cache's ``cat`` when ``use_cache`` is on; sdpa gets the boolean causal
mask only when some token is padded and ``is_causal=True`` otherwise; with sdpa transformers
ignores ``scale_attn_by_inverse_layer_idx`` and ``scale_attn_weights`` (default scale), so we do
too; and token type ids, when the tokenizer returns them, are embedded with ``wte``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rev_tasks.inference.streaming.arch_common import (
    StreamingUnsupported,
    Tensor,
    TokenBatch,
    WeightSource,
    activation,
    cache_concat,
    causal_sdpa_mask,
    cfg_get,
    gather_embedding,
    layer_norm,
)

_BLOCK = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)


def conv1d(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``transformers.pytorch_utils.Conv1D.forward``."""
    size_out = x.size()[:-1] + (w.shape[1],)
    x = torch.addmm(b, x.view(-1, x.size(-1)), w)
    return x.view(size_out)


@dataclass
class _State:
    hidden: Tensor
    mask: Tensor | None


class GPT2Blocks:
    """GPT-2 (``model_type == "gpt2"``): embeddings, then ``n_layer`` pre-LN blocks."""

    model_type = "gpt2"
    prefixes = ("", "transformer.")
    probe = "h.0.ln_1.weight"

    def __init__(self, config: dict[str, Any]) -> None:
        if config.get("add_cross_attention"):
            raise StreamingUnsupported("GPT-2 with cross-attention is not streamed")
        self.hidden_size = int(cfg_get(config, "n_embd", "hidden_size", default=768))
        self.num_layers = int(cfg_get(config, "n_layer", "num_hidden_layers", default=12))
        self.num_heads = int(cfg_get(config, "n_head", "num_attention_heads", default=12))
        self.inner = int(cfg_get(config, "n_inner", default=4 * self.hidden_size))
        self.max_positions = int(
            cfg_get(config, "n_positions", "max_position_embeddings", default=1024)
        )
        self.eps = float(cfg_get(config, "layer_norm_epsilon", default=1e-5))
        self.act = activation(
            cfg_get(config, "activation_function", default="gelu_new"), inplace=True
        )
        self.use_cache = bool(cfg_get(config, "use_cache", default=True))
        if config.get("reorder_and_upcast_attn") and config.get("_attn_implementation") == "eager":
            raise StreamingUnsupported("GPT-2 reorder_and_upcast_attn (eager) is not streamed")
        if self.hidden_size % self.num_heads:
            raise StreamingUnsupported("GPT-2 n_embd is not a multiple of n_head")
        self.head_dim = self.hidden_size // self.num_heads

    def block_tensors(self, index: int) -> list[str]:
        return [f"h.{index}.{name}" for name in _BLOCK]

    def embedding_tensors(self) -> list[str]:
        return ["wte.weight", "wpe.weight"]

    def embed(self, weights: WeightSource, batch: TokenBatch, device: torch.device) -> _State:
        ids = batch.input_ids
        tokens = ids.shape[1]
        if tokens > self.max_positions:
            raise StreamingUnsupported(f"{tokens} tokens exceed n_positions={self.max_positions}")
        inputs_embeds = gather_embedding(weights, "wte.weight", ids)
        position_ids = torch.arange(0, tokens).unsqueeze(0)
        position_embeds = gather_embedding(weights, "wpe.weight", position_ids)
        hidden = inputs_embeds + position_embeds.to(inputs_embeds.device)
        mask = causal_sdpa_mask(batch.attention_mask, hidden.device)
        if batch.token_type_ids is not None:
            hidden = hidden + gather_embedding(weights, "wte.weight", batch.token_type_ids)
        return _State(hidden=hidden, mask=mask)

    def block(self, index: int, w: Mapping[str, Tensor], state: _State) -> _State:
        p = f"h.{index}."
        hidden = state.hidden
        residual = hidden
        hidden = layer_norm(hidden, w[p + "ln_1.weight"], w[p + "ln_1.bias"], self.eps)
        attn_output = self._attention(hidden, w, p, state.mask)
        hidden = attn_output + residual
        residual = hidden
        hidden = layer_norm(hidden, w[p + "ln_2.weight"], w[p + "ln_2.bias"], self.eps)
        ff = conv1d(hidden, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
        ff = self.act(ff)
        ff = conv1d(ff, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        hidden = residual + ff
        return _State(hidden=hidden, mask=state.mask)

    def _attention(
        self, hidden: Tensor, w: Mapping[str, Tensor], p: str, mask: Tensor | None
    ) -> Tensor:
        qkv = conv1d(hidden, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
        query, key, value = qkv.split(self.hidden_size, dim=2)
        shape_kv = (*key.shape[:-1], -1, self.head_dim)
        key = key.view(shape_kv).transpose(1, 2)
        value = value.view(shape_kv).transpose(1, 2)
        shape_q = (*query.shape[:-1], -1, self.head_dim)
        query = query.view(shape_q).transpose(1, 2)
        if self.use_cache:
            key, value = cache_concat(key), cache_concat(value)
        is_causal = mask is None and query.shape[-2] > 1
        if mask is not None:
            mask = mask[:, :, :, : key.shape[-2]]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, scale=None, is_causal=is_causal
        )
        out = out.transpose(1, 2).contiguous()
        out = out.reshape(*out.shape[:-2], -1).contiguous()
        return conv1d(out, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"])

    def activation_bytes(self, batch: int, tokens: int, itemsize: int) -> int:
        bt = batch * tokens
        # hidden + residual + qkv + q/k/v copies + cache copies + the MLP's 5 temporaries
        per_token = (
            4 * self.hidden_size + 3 * self.hidden_size + 4 * self.hidden_size + 5 * self.inner
        )
        scores = 2 * batch * self.num_heads * tokens * tokens
        return itemsize * (bt * per_token + scores) + batch * tokens * tokens
