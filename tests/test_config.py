"""Presets: the real shapes add up to the published parameter counts."""

from __future__ import annotations

import pytest
import torch

from qwen_layers import PRESETS, QwenConfig, QwenForCausalLM, get_preset

REAL = [name for name, c in PRESETS.items() if c.published_params]


@pytest.mark.parametrize("name", REAL)
def test_parameter_count_matches_published(name):
    """Built on the meta device (no memory); the model cards round to 0.01-0.1 B, so allow 5%."""
    cfg = get_preset(name)
    with torch.device("meta"):
        model = QwenForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert abs(n - cfg.published_params) <= 0.05 * cfg.published_params, (name, n)


def test_qwen3_0_6b_exact_count():
    """Qwen3-0.6B: 596,049,920 parameters with the tied embedding counted once."""
    with torch.device("meta"):
        model = QwenForCausalLM(get_preset("qwen3-0.6b"))
    assert sum(p.numel() for p in model.parameters()) == 596_049_920


def test_family_differences():
    q3, q2 = get_preset("qwen3-tiny"), get_preset("qwen2.5-tiny")
    assert q3.qk_norm and not q3.qkv_bias
    assert q2.qkv_bias and not q2.qk_norm
    m3, m2 = QwenForCausalLM(q3), QwenForCausalLM(q2)
    names3 = {n for n, _ in m3.named_parameters()}
    names2 = {n for n, _ in m2.named_parameters()}
    assert "model.layers.0.self_attn.q_norm.weight" in names3
    assert "model.layers.0.self_attn.q_proj.bias" in names2
    assert "model.layers.0.self_attn.o_proj.bias" not in names2


def test_unknown_preset_lists_valid_names():
    with pytest.raises(KeyError, match="qwen3-0.6b"):
        get_preset("qwen4")


@pytest.mark.parametrize("bad, msg", [
    (dict(family="llama"), "family"),
    (dict(num_key_value_heads=3), "multiple of"),
    (dict(head_dim=15), "even"),
])
def test_invalid_config(bad, msg):
    with pytest.raises(ValueError, match=msg):
        get_preset("qwen3-tiny").replace(**bad)


def test_hf_dict_round_trip():
    for cfg in PRESETS.values():
        back = QwenConfig.from_hf_dict(cfg.to_hf_dict())
        assert back.replace(source=cfg.source, published_params=cfg.published_params) == cfg


def test_hf_dict_transformers5_rope_parameters():
    d = get_preset("qwen3-tiny").to_hf_dict()
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    assert QwenConfig.from_hf_dict(d).rope_theta == 12345.0
    d["rope_parameters"]["rope_type"] = "yarn"
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        QwenConfig.from_hf_dict(d)


# A config.json with a bad field: the error names the field and the file, whatever the value's type.
BAD_FIELDS = [
    ("vocab_size", None, "must be a positive integer"),
    ("hidden_size", "abc", "must be a positive integer"),
    ("hidden_size", 64.5, "must be a positive integer"),
    ("num_hidden_layers", True, "must be a positive integer"),
    ("num_attention_heads", 0, "must be a positive integer"),
    ("num_key_value_heads", -2, "must be a positive integer"),
    ("intermediate_size", [128], "must be a positive integer"),
    ("head_dim", "16", "must be a positive integer"),
    ("rms_norm_eps", "tiny", "must be a positive number"),
    ("rope_theta", "big", "must be a positive number"),
    ("max_position_embeddings", {}, "must be a positive integer"),
    ("tie_word_embeddings", "false", "must be true or false"),
    ("rope_scaling", [1, 2], "must be an object"),
    ("model_type", ["qwen3"], "model_type"),
]


@pytest.mark.parametrize("field, value, msg", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_hf_dict_bad_field_names_field_and_file(field, value, msg):
    d = get_preset("qwen3-tiny").to_hf_dict()
    d[field] = value
    with pytest.raises(ValueError) as e:
        QwenConfig.from_hf_dict(d, where="ckpt/config.json")
    text = str(e.value)
    assert text.startswith("ckpt/config.json: ") and field in text and msg in text, text


@pytest.mark.parametrize("value", [[1, 2, 3], "qwen3", 7, None])
def test_hf_dict_that_is_not_an_object(value):
    with pytest.raises(ValueError, match=r"^ckpt/config.json: expected a JSON object .*, got "):
        QwenConfig.from_hf_dict(value, where="ckpt/config.json")


def test_hf_dict_integral_float_and_null_optionals_are_read():
    d = get_preset("qwen3-tiny").to_hf_dict()
    d.update(hidden_size=64.0, num_key_value_heads=None, head_dim=None, rope_scaling=None)
    c = QwenConfig.from_hf_dict(d)
    assert c.hidden_size == 64 and isinstance(c.hidden_size, int)
    assert c.num_key_value_heads == c.num_attention_heads and c.head_dim == 64 // c.num_attention_heads


def test_hf_dict_invalid_combination_names_the_file():
    d = get_preset("qwen3-tiny").to_hf_dict()
    d["num_key_value_heads"] = 3
    with pytest.raises(ValueError, match=r"^ckpt/config.json: num_attention_heads \(4\) must be a multiple"):
        QwenConfig.from_hf_dict(d, where="ckpt/config.json")
