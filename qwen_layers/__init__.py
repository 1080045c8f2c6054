"""Faithful Qwen3 / Qwen2.5 decoder blocks whose ops are routed through one backend registry."""

from . import registry
from .checkpoint import CheckpointError, from_pretrained
from .config import PRESETS, QwenConfig, get_preset
from .model import (
    MLP,
    Attention,
    CausalLMOutput,
    DecoderLayer,
    Embedding,
    GenerateOutput,
    KVCache,
    LayerKV,
    Linear,
    QwenForCausalLM,
    QwenModel,
    RMSNorm,
    RotaryEmbedding,
    build_model,
    causal_lm_loss,
    init_weights,
    set_backends,
    shift_labels,
)
from .registry import REGISTRY, BackendUnavailable, UnknownBackend

__all__ = [
    "registry", "REGISTRY", "BackendUnavailable", "UnknownBackend",
    "CheckpointError", "from_pretrained",
    "PRESETS", "QwenConfig", "get_preset",
    "MLP", "Attention", "CausalLMOutput", "DecoderLayer", "Embedding", "GenerateOutput", "KVCache",
    "LayerKV", "Linear", "QwenForCausalLM",
    "QwenModel", "RMSNorm", "RotaryEmbedding", "build_model", "causal_lm_loss", "init_weights",
    "set_backends", "shift_labels",
]
