"""Llama blocks in plain torch, op for op as transformers 4.57 ``LlamaModel`` runs them (sdpa).

Details that matter for bit-identity: RMSNorm computes in float32 and casts back before the
weight multiply; rotary cos/sin come from ``inv_freq @ positions`` in float32 once per forward;
with no padded token sdpa gets ``is_causal=True`` and ``enable_gqa=True`` (no key repetition),
with padding it gets the boolean mask and repeated keys; keys/values pass the cache's ``cat``.
"""

from __future__ import annotations

import math
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
    linear,
)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``LlamaRMSNorm.forward``."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(input_dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    batch, kv_heads, tokens, head_dim = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(batch, kv_heads, n_rep, tokens, head_dim)
    return x.reshape(batch, kv_heads * n_rep, tokens, head_dim)


def inv_freq(config: dict[str, Any], head_dim: int) -> Tensor:
    """``ROPE_INIT_FUNCTIONS[rope_type]`` for the default, linear and llama3 rope types."""
    base = float(cfg_get(config, "rope_theta", default=10000.0))
    dim = int(head_dim * float(cfg_get(config, "partial_rotary_factor", default=1.0)))
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    scaling = config.get("rope_scaling")
    if not scaling:
        return freq
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return freq
    if rope_type == "linear":
        return freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, freq / factor, freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed, inv_freq_llama)
    raise StreamingUnsupported(f"rope type {rope_type!r} is not reproduced by the streamed engine")


@dataclass
class _State:
    hidden: Tensor
    mask: Tensor | None
    cos: Tensor
    sin: Tensor


class LlamaBlocks:
    """Llama (``model_type == "llama"``): token embeddings, then RMSNorm pre-norm blocks."""

    model_type = "llama"
    prefixes = ("", "model.")
    probe = "layers.0.input_layernorm.weight"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.hidden_size = int(cfg_get(config, "hidden_size", default=4096))
        self.num_layers = int(cfg_get(config, "num_hidden_layers", default=32))
        self.num_heads = int(cfg_get(config, "num_attention_heads", default=32))
        self.num_kv_heads = int(cfg_get(config, "num_key_value_heads", default=self.num_heads))
        self.head_dim = int(cfg_get(config, "head_dim", default=self.hidden_size // self.num_heads))
        self.inner = int(cfg_get(config, "intermediate_size", default=11008))
        self.eps = float(cfg_get(config, "rms_norm_eps", default=1e-6))
        self.act = activation(cfg_get(config, "hidden_act", default="silu"), inplace=True)
        self.attention_bias = bool(cfg_get(config, "attention_bias", default=False))
        self.mlp_bias = bool(cfg_get(config, "mlp_bias", default=False))
        self.use_cache = bool(cfg_get(config, "use_cache", default=True))
        self.scaling = self.head_dim**-0.5
        self.n_rep = self.num_heads // self.num_kv_heads
        self.inv_freq = inv_freq(config, self.head_dim)

    def block_tensors(self, index: int) -> list[str]:
        p = f"layers.{index}."
        names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{p}self_attn.{proj}.weight")
            if self.attention_bias:
                names.append(f"{p}self_attn.{proj}.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append(f"{p}mlp.{proj}.weight")
            if self.mlp_bias:
                names.append(f"{p}mlp.{proj}.bias")
        return names

    def embedding_tensors(self) -> list[str]:
        return ["embed_tokens.weight"]

    def embed(self, weights: WeightSource, batch: TokenBatch, device: torch.device) -> _State:
        hidden = gather_embedding(weights, "embed_tokens.weight", batch.input_ids)
        tokens = hidden.shape[1]
        position_ids = torch.arange(0, tokens, device=hidden.device).unsqueeze(0)
        mask = causal_sdpa_mask(batch.attention_mask, hidden.device)
        cos, sin = self._rotary(hidden, position_ids)
        return _State(hidden=hidden, mask=mask, cos=cos, sin=sin)

    def _rotary(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``LlamaRotaryEmbedding.forward`` (attention_scaling is 1.0 for supported types)."""
        freq = self.inv_freq.to(x.device)
        inv_freq_expanded = freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * 1.0
            sin = emb.sin() * 1.0
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def block(self, index: int, w: Mapping[str, Tensor], state: _State) -> _State:
        p = f"layers.{index}."
        hidden = state.hidden
        residual = hidden
        hidden = rms_norm(hidden, w[p + "input_layernorm.weight"], self.eps)
        hidden = self._attention(hidden, w, p + "self_attn.", state)
        hidden = residual + hidden
        residual = hidden
        hidden = rms_norm(hidden, w[p + "post_attention_layernorm.weight"], self.eps)
        m = p + "mlp."
        gate = self.act(linear(hidden, w[m + "gate_proj.weight"], w.get(m + "gate_proj.bias")))
        up = linear(hidden, w[m + "up_proj.weight"], w.get(m + "up_proj.bias"))
        gate.mul_(up)  # act(gate) * up, in place: the same products, one temporary fewer
        del up
        hidden = linear(gate, w[m + "down_proj.weight"], w.get(m + "down_proj.bias"))
        hidden = residual + hidden
        return _State(hidden=hidden, mask=state.mask, cos=state.cos, sin=state.sin)

    def _attention(self, hidden: Tensor, w: Mapping[str, Tensor], p: str, state: _State) -> Tensor:
        input_shape = hidden.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = linear(hidden, w[p + "q_proj.weight"], w.get(p + "q_proj.bias"))
        query = q.view(hidden_shape).transpose(1, 2)
        k = linear(hidden, w[p + "k_proj.weight"], w.get(p + "k_proj.bias"))
        key = k.view(hidden_shape).transpose(1, 2)
        v = linear(hidden, w[p + "v_proj.weight"], w.get(p + "v_proj.bias"))
        value = v.view(hidden_shape).transpose(1, 2)
        cos = state.cos.unsqueeze(1)
        sin = state.sin.unsqueeze(1)
        query = (query * cos) + (rotate_half(query) * sin)
        key = (key * cos) + (rotate_half(key) * sin)
        if self.use_cache:
            key, value = cache_concat(key), cache_concat(value)
        mask = state.mask
        extra: dict[str, Any] = {}
        if mask is None:
            extra["enable_gqa"] = True  # transformers' use_gqa_in_sdpa: no mask, torch >= 2.5
        else:
            key = repeat_kv(key, self.n_rep)
            value = repeat_kv(value, self.n_rep)
            mask = mask[:, :, :, : key.shape[-2]]
        is_causal = query.shape[2] > 1 and mask is None
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0,
            scale=self.scaling,
            is_causal=is_causal,
            **extra,
        )
        out = out.transpose(1, 2).contiguous()
        out = out.reshape(*input_shape, -1).contiguous()
        return linear(out, w[p + "o_proj.weight"], w.get(p + "o_proj.bias"))

    def activation_bytes(self, batch: int, tokens: int, itemsize: int) -> int:
        bt = batch * tokens
        heads = self.num_heads * self.head_dim
        per_token = 4 * self.hidden_size + 6 * heads + 4 * self.inner
        scores = 2 * batch * self.num_heads * tokens * tokens
        return itemsize * (bt * per_token + scores) + batch * tokens * tokens
