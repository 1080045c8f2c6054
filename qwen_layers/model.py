"""Qwen3 and Qwen2.5 decoder blocks, each op routed through the backend registry.

Reads top to bottom: the routing helper, RMSNorm, rotary embedding, attention, MLP, decoder layer,
model, causal LM. Every module works on its own with its own inputs; parameter names equal
transformers' so state dicts move between the two unchanged.

Construction makes uninitialised parameters (so ``torch.device("meta")`` works); :func:`build_model`
draws seeded random weights in float32 on the CPU and then casts and moves them, so the same seed
gives the same weights on every device and in every dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .backends import padded_causal_mask
from .config import QwenConfig


class Routed(nn.Module):
    """A module whose ops are looked up in the registry by the per-op choice in ``self.backends``."""

    def __init__(self, backends: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.backends = registry.check_choice(dict(backends or {}))

    def op(self, name: str, device: torch.device):
        return registry.resolve(name, self.backends[name], device)


def set_backends(module: nn.Module, backends: Mapping[str, str]) -> None:
    """Change the backend choice of ``module`` and all its submodules (ops not named keep theirs)."""
    registry.check_choice(dict(backends))
    for m in module.modules():
        if isinstance(m, Routed):
            m.backends = {**m.backends, **backends}


class Linear(Routed):
    """``nn.Linear`` with its matmul routed through the ``linear`` op."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, backends=None) -> None:
        super().__init__(backends)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op("linear", x.device)(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Routed):
    def __init__(self, num_embeddings: int, dim: int, backends=None) -> None:
        super().__init__(backends)
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.op("embedding", ids.device)(ids, self.weight)


class RMSNorm(Routed):
    def __init__(self, dim: int, eps: float = 1e-6, backends=None) -> None:
        super().__init__(backends)
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op("rmsnorm", x.device)(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; computed in float32 and cast to the activations' dtype.

    The inverse frequencies are recomputed from the config on each call (no buffer), so casting the
    model to bf16 never rounds them; this matches transformers' ``from_pretrained`` path, which keeps
    ``inv_freq`` in float32.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        return 1.0 / (self.theta ** exponent)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class Attention(Routed):
    """Grouped-query self-attention: projections, q/k-norm (Qwen3), rotary, attention core, o_proj.

    Input (B, S, hidden) plus the rotary tables (B or 1, S, head_dim) and an optional boolean mask
    (B, 1, S, S), True where attention is allowed. Without a mask the core runs causal.
    """

    def __init__(self, config: QwenConfig, backends=None) -> None:
        super().__init__(backends)
        c = config
        self.head_dim = c.head_dim
        self.scale = c.head_dim ** -0.5
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, c.qkv_bias, backends)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.qkv_bias, backends)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.qkv_bias, backends)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, False, backends)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, backends)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, backends)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, attn_mask=None):
        b, s, _ = x.shape
        heads = (b, s, -1, self.head_dim)
        q = self.q_proj(x).view(heads)
        k = self.k_proj(x).view(heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        q, k = self.op("rope", x.device)(q, k, cos, sin)
        o = self.op("attention", x.device)(q, k, v, scale=self.scale, causal=True, attn_mask=attn_mask)
        o = o.transpose(1, 2).contiguous().reshape(b, s, -1).contiguous()
        return self.o_proj(o)


class MLP(Routed):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config: QwenConfig, backends=None) -> None:
        super().__init__(backends)
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(h, i, False, backends)
        self.up_proj = Linear(h, i, False, backends)
        self.down_proj = Linear(i, h, False, backends)

    def forward(self, x):
        act = self.op("swiglu", x.device)(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: QwenConfig, backends=None) -> None:
        super().__init__()
        self.self_attn = Attention(config, backends)
        self.mlp = MLP(config, backends)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backends)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backends)

    def forward(self, x, cos, sin, attn_mask=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class QwenModel(nn.Module):
    """Embedding, decoder layers, final norm. Returns the normalised hidden states (B, S, hidden)."""

    def __init__(self, config: QwenConfig, backends=None) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, backends)
        self.layers = nn.ModuleList(DecoderLayer(config, backends) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backends)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        h = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rotary_emb(h, position_ids)
        mask = None if attention_mask is None else padded_causal_mask(attention_mask, input_ids.shape[1])
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.norm(h)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """transformers' label shift: position t is scored against token t+1; the last gets ignore_index."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(logits, labels, loss_fn, ignore_index: int = -100):
    """Shift the labels, flatten, and apply a ``loss`` backend (mean over non-ignored tokens)."""
    targets = shift_labels(labels, ignore_index).reshape(-1)
    return loss_fn(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=ignore_index)


class QwenForCausalLM(Routed):
    """QwenModel plus the LM head (tied to the embedding when the config says so) and the loss."""

    def __init__(self, config: QwenConfig, backends=None) -> None:
        super().__init__(backends)
        self.config = config
        self.model = QwenModel(config, backends)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, backends)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None) -> CausalLMOutput:
        logits = self.lm_head(self.model(input_ids, attention_mask, position_ids))
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.op("loss", logits.device))
        return CausalLMOutput(logits=logits, loss=loss)


# ------------------------------------------------------------------------------------------------
# seeded construction
# ------------------------------------------------------------------------------------------------

INIT_STD = 0.02  # transformers' initializer_range for Qwen


@torch.no_grad()
def init_weights(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter from one seeded CPU generator in float32, in ``named_parameters`` order.

    Weights ~ N(0, 0.02) (Qwen's initializer_range); biases ~ N(0, 0.02); norm gains 1 + N(0, 0.1),
    so that every parameter's gradient path is exercised rather than sitting at a symmetric point.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            value = INIT_STD * torch.randn(p.shape, generator=gen)
        p.copy_(value.to(p.dtype))
    return module


def build_model(
    config: QwenConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backends: Mapping[str, str] | None = None,
) -> QwenForCausalLM:
    """A causal LM with seeded random weights (drawn in float32 on CPU, then cast and moved)."""
    model = init_weights(QwenForCausalLM(config, backends), seed)
    return model.to(device=device, dtype=dtype)
