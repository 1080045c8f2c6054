"""Qwen3 and Qwen2.5 decoder blocks, each op routed through the backend registry.

Reads top to bottom: the routing helper, RMSNorm, rotary embedding, the KV cache, attention, MLP,
decoder layer, model, causal LM and its greedy ``generate``. Every module works on its own with its
own inputs; parameter names equal transformers' so state dicts move between the two unchanged.

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


class LayerKV:
    """One layer's keys and values of the tokens seen so far, (B, Hkv, T, D) each (after rotary).

    New tokens are appended with ``torch.cat`` along T, as transformers' ``DynamicCache`` does: a copy,
    so the cached values are exactly those the prefill computed.
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' keys and values; return every token's."""
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values = k, v
        return k, v


class KVCache:
    """Every layer's :class:`LayerKV`: what incremental decoding keeps between steps."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Tokens (padding included) whose keys and values are cached."""
        return self.layers[0].length if self.layers else 0


def decoding_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Bool (B, 1, q_len, K) from a (B, K) key mask (1 = real token): the last ``q_len`` of the K positions
    are the queries; each attends to kept keys at or before its own position (causality aligned bottom
    right, which for ``q_len == K`` is the ordinary causal mask)."""
    k_len = attention_mask.shape[-1]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=attention_mask.device).tril(k_len - q_len)
    return causal[None, None] & attention_mask.to(torch.bool)[:, None, None, :]


class Attention(Routed):
    """Grouped-query self-attention: projections, q/k-norm (Qwen3), rotary, attention core, o_proj.

    Input (B, S, hidden) plus the rotary tables (B or 1, S, head_dim) and an optional boolean mask
    (B, 1, S, T), True where attention is allowed. Without a mask the core runs causal. With a
    :class:`LayerKV` (``kv``) the new keys and values are appended to it and the queries attend to
    every cached token too (T = cached + S; the mask is then required once anything is cached).
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

    def forward(self, x, cos, sin, attn_mask=None, kv: LayerKV | None = None):
        b, s, _ = x.shape
        heads = (b, s, -1, self.head_dim)
        q = self.q_proj(x).view(heads)
        k = self.k_proj(x).view(heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        q, k = self.op("rope", x.device)(q, k, cos, sin)
        if kv is not None:
            if kv.length and attn_mask is None:
                raise ValueError("attention over cached keys needs an explicit mask (decoding_mask): without one "
                                 "the core's causal mask would align the new queries with the first keys")
            k, v = kv.append(k, v)
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

    def forward(self, x, cos, sin, attn_mask=None, kv: LayerKV | None = None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class QwenModel(nn.Module):
    """Embedding, decoder layers, final norm. Returns the normalised hidden states (B, S, hidden).

    With a :class:`KVCache` the S tokens continue the cached ones: positions default to
    cached..cached+S-1 and ``attention_mask``, when given, covers the cached tokens too (B, cached + S).
    """

    def __init__(self, config: QwenConfig, backends=None) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, backends)
        self.layers = nn.ModuleList(DecoderLayer(config, backends) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backends)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        h = self.embed_tokens(input_ids)
        b, s = input_ids.shape
        past = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=input_ids.device)[None]
        cos, sin = self.rotary_emb(h, position_ids)
        if past == 0:
            mask = None if attention_mask is None else padded_causal_mask(attention_mask, s)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(b, past + s, dtype=torch.long, device=input_ids.device)
            if attention_mask.shape != (b, past + s):
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must cover the {past} cached and {s} "
                                 f"new tokens of each of the {b} rows: shape ({b}, {past + s})")
            mask = decoding_mask(attention_mask, s)
        layers = [None] * len(self.layers) if cache is None else cache.layers
        for layer, kv in zip(self.layers, layers):
            h = layer(h, cos, sin, mask, kv)
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

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, cache: KVCache | None = None,
                logits_to_keep: int = 0) -> CausalLMOutput:
        """``logits_to_keep=n`` runs the LM head on the last n positions only (0: all), as transformers'
        ``generate`` asks for the last one: the head then multiplies B rows, not B x S."""
        h = self.model(input_ids, attention_mask, position_ids, cache)
        logits = self.lm_head(h[:, -logits_to_keep:, :] if logits_to_keep else h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.op("loss", logits.device))
        return CausalLMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, use_cache: bool = True) -> "GenerateOutput":
        """Greedy decoding, computed as transformers' ``generate(do_sample=False)`` computes it.

        ``input_ids`` (B, S) are prompts, left-padded where ``attention_mask`` (B, S; 1 = real token) is 0.
        Positions count real tokens only (padding does not shift a prompt's rotary angles). Each step runs
        the LM head on the last position only, copies those logits to float32, and takes the first argmax;
        no stop token, every row gets ``max_new_tokens``. ``use_cache`` (the default): one prefill of the
        prompts fills a :class:`KVCache`, then each step feeds only the newest token; otherwise every step
        recomputes the whole sequence.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        b, s = input_ids.shape
        mask = (torch.ones(b, s, dtype=torch.long, device=input_ids.device) if attention_mask is None
                else attention_mask.to(torch.long))
        check_left_padded(mask)
        sequences, steps = input_ids, []
        cache = KVCache(len(self.model.layers)) if use_cache else None
        step_ids = input_ids
        for _ in range(max_new_tokens):
            positions = real_positions(mask)
            if cache is not None:
                positions = positions[:, -step_ids.shape[1]:]
            out = self(step_ids, mask, position_ids=positions, cache=cache, logits_to_keep=1)
            logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
            steps.append(logits)
            token = logits.argmax(dim=-1)
            sequences = torch.cat([sequences, token[:, None]], dim=-1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=-1)
            step_ids = token[:, None] if cache is not None else sequences
        return GenerateOutput(sequences=sequences, logits=torch.stack(steps))


@dataclass
class GenerateOutput:
    """What :meth:`QwenForCausalLM.generate` returns."""

    sequences: torch.Tensor   # (B, S + n): the prompts as given (padding included), then the n new tokens
    logits: torch.Tensor      # (n, B, vocab) float32: the logits each new token was chosen from


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """ValueError unless every row of the (B, S) mask is 0s then 1s with at least one 1 (left padding)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, length), got shape {tuple(attention_mask.shape)}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (real token) only")
    if not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
        raise ValueError("generate needs left padding (each row's padding before its tokens, as transformers' "
                         "generate expects); pad prompts on the left")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("every row needs at least one real token")


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of every token counted over real tokens only (transformers' cumsum - 1); padding gets 0."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


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
