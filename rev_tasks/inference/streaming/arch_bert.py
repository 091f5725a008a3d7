"""BERT encoder layers in plain torch, op for op as transformers 4.57 ``BertModel`` runs them.

Details that matter for bit-identity: the embeddings sum is ``(words + token types) +=
positions`` then LayerNorm; sdpa gets no mask when nothing is padded and otherwise the additive
float mask ``_prepare_4d_attention_mask_for_sdpa`` builds (``finfo.min`` at padded keys); the
residual adds happen inside LayerNorm's argument (``LayerNorm(dense(x) + input)``).
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
    cfg_get,
    gather_embedding,
    layer_norm,
    linear,
)

_LAYER = (
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
)


def expanded_padding_mask(mask: Tensor, dtype: torch.dtype, tgt_len: int) -> Tensor | None:
    """``_prepare_4d_attention_mask_for_sdpa`` (``AttentionMaskConverter._expand_mask``)."""
    if bool(torch.all(mask == 1)):
        return None
    bsz, src_len = mask.size()
    expanded = mask[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)
    inverted = torch.tensor(1.0, dtype=dtype) - expanded
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


@dataclass
class _State:
    hidden: Tensor
    mask: Tensor | None


class BertBlocks:
    """BERT-family encoders (``model_type == "bert"``, absolute positions, not a decoder)."""

    model_type = "bert"
    prefixes = ("", "bert.")
    probe = "embeddings.word_embeddings.weight"

    def __init__(self, config: dict[str, Any]) -> None:
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise StreamingUnsupported("BERT used as a decoder is not streamed")
        position_type = cfg_get(config, "position_embedding_type", default="absolute")
        if position_type != "absolute":
            raise StreamingUnsupported(f"BERT position_embedding_type {position_type!r}")
        self.hidden_size = int(cfg_get(config, "hidden_size", default=768))
        self.num_layers = int(cfg_get(config, "num_hidden_layers", default=12))
        self.num_heads = int(cfg_get(config, "num_attention_heads", default=12))
        self.inner = int(cfg_get(config, "intermediate_size", default=3072))
        self.max_positions = int(cfg_get(config, "max_position_embeddings", default=512))
        self.eps = float(cfg_get(config, "layer_norm_eps", default=1e-12))
        self.act = activation(cfg_get(config, "hidden_act", default="gelu"))
        if self.hidden_size % self.num_heads:
            raise StreamingUnsupported("BERT hidden_size is not a multiple of num_attention_heads")
        self.head_dim = self.hidden_size // self.num_heads

    def block_tensors(self, index: int) -> list[str]:
        return [f"encoder.layer.{index}.{name}" for name in _LAYER]

    def embedding_tensors(self) -> list[str]:
        return [
            "embeddings.word_embeddings.weight",
            "embeddings.token_type_embeddings.weight",
            "embeddings.position_embeddings.weight",
        ]

    def embed(self, weights: WeightSource, batch: TokenBatch, device: torch.device) -> _State:
        ids = batch.input_ids
        tokens = ids.shape[1]
        if tokens > self.max_positions:
            raise StreamingUnsupported(f"{tokens} tokens exceed max_position_embeddings")
        token_type_ids = batch.token_type_ids
        if token_type_ids is None:
            token_type_ids = torch.zeros(ids.shape, dtype=torch.long)
        inputs_embeds = gather_embedding(weights, "embeddings.word_embeddings.weight", ids)
        type_embeds = gather_embedding(
            weights, "embeddings.token_type_embeddings.weight", token_type_ids
        )
        embeddings = inputs_embeds + type_embeds
        position_ids = torch.arange(tokens).expand((1, -1))
        embeddings += gather_embedding(
            weights, "embeddings.position_embeddings.weight", position_ids
        )
        embeddings = layer_norm(
            embeddings,
            weights.read("embeddings.LayerNorm.weight"),
            weights.read("embeddings.LayerNorm.bias"),
            self.eps,
        )
        mask = expanded_padding_mask(
            batch.attention_mask.to(embeddings.device), embeddings.dtype, tokens
        )
        return _State(hidden=embeddings, mask=mask)

    def block(self, index: int, w: Mapping[str, Tensor], state: _State) -> _State:
        p = f"encoder.layer.{index}."
        hidden = state.hidden
        bsz, tgt_len, _ = hidden.size()
        s = p + "attention.self."
        query = (
            linear(hidden, w[s + "query.weight"], w[s + "query.bias"])
            .view(bsz, -1, self.num_heads, self.head_dim)
            .transpose(1, 2)
        )
        key = (
            linear(hidden, w[s + "key.weight"], w[s + "key.bias"])
            .view(bsz, -1, self.num_heads, self.head_dim)
            .transpose(1, 2)
        )
        value = (
            linear(hidden, w[s + "value.weight"], w[s + "value.bias"])
            .view(bsz, -1, self.num_heads, self.head_dim)
            .transpose(1, 2)
        )
        attn = F.scaled_dot_product_attention(
            query, key, value, attn_mask=state.mask, dropout_p=0.0, is_causal=False
        )
        attn = attn.transpose(1, 2)
        attn = attn.reshape(bsz, tgt_len, self.hidden_size)
        o = p + "attention.output."
        attn = linear(attn, w[o + "dense.weight"], w[o + "dense.bias"])
        attention_output = layer_norm(
            attn + hidden, w[o + "LayerNorm.weight"], w[o + "LayerNorm.bias"], self.eps
        )
        inter = linear(
            attention_output,
            w[p + "intermediate.dense.weight"],
            w[p + "intermediate.dense.bias"],
        )
        inter = self.act(inter)
        out = linear(inter, w[p + "output.dense.weight"], w[p + "output.dense.bias"])
        out = layer_norm(
            out + attention_output,
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
            self.eps,
        )
        return _State(hidden=out, mask=state.mask)

    def activation_bytes(self, batch: int, tokens: int, itemsize: int) -> int:
        bt = batch * tokens
        per_token = 8 * self.hidden_size + 3 * self.inner
        scores = 3 * batch * self.num_heads * tokens * tokens
        return itemsize * (bt * per_token + scores)
