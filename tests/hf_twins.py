"""Build transformers twins of detbench models (tiny random configs, built inside the tests)."""

from __future__ import annotations

import pytest
import torch

from qwen_layers import QwenConfig, QwenForCausalLM

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[dev]')")


def hf_classes(cfg: QwenConfig):
    if cfg.family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3Config, Qwen3ForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2Config, Qwen2ForCausalLM


def hf_config(cfg: QwenConfig, attn: str = "eager"):
    config_cls, _ = hf_classes(cfg)
    d = cfg.to_hf_dict()
    d.pop("model_type")
    d.pop("architectures")
    hc = config_cls(**d)
    hc._attn_implementation = attn
    return hc


def twin_pair(cfg: QwenConfig, seed: int = 0, dtype=torch.float32):
    """A transformers causal LM with random weights, and a detbench model holding the same weights.

    In low precision the rotary ``inv_freq`` buffer of transformers is kept in float32, as
    ``from_pretrained(..., dtype=bf16)`` leaves it (``.to(bf16)`` alone would round it).
    """
    _, model_cls = hf_classes(cfg)
    torch.manual_seed(seed)
    hf = model_cls(hf_config(cfg))
    ours = QwenForCausalLM(cfg)
    ours.load_state_dict(hf.state_dict())
    if dtype != torch.float32:
        rot = hf.model.rotary_emb
        inv = rot.inv_freq.clone()
        hf = hf.to(dtype)
        rot.inv_freq = inv
        ours = ours.to(dtype)
    hf.train()
    ours.train()
    return hf, ours


def batch(cfg: QwenConfig, b: int = 3, s: int = 11, padded: bool = True, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if padded:  # right padding of different lengths, as an SFT collator makes
        mask[1, s - 4:] = 0
        mask[2, s - 1:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a masked prompt
    return ids, (mask if padded else None), labels
