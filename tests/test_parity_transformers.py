"""detbench's eager path against transformers' eager Qwen3 / Qwen2 (Qwen2.5), bit for bit."""

from __future__ import annotations

import pytest
import torch

from bench.compare import assert_bitwise_equal, mismatch
from qwen_layers import MLP, Attention, DecoderLayer, RMSNorm, RotaryEmbedding, get_preset
from qwen_layers.backends import padded_causal_mask

from .hf_twins import batch, hf_config, twin_pair

PRESETS = ["qwen3-tiny", "qwen2.5-tiny"]


def run_both(hf, ours, ids, mask, labels):
    o_hf = hf(input_ids=ids, attention_mask=mask, labels=labels)
    o_us = ours(ids, mask, labels)
    o_hf.loss.backward()
    o_us.loss.backward()
    return o_hf, o_us


def check_grads(hf, ours):
    theirs = dict(hf.named_parameters())
    mine = dict(ours.named_parameters())
    assert set(mine) == set(theirs)
    for name, p in mine.items():
        assert p.grad is not None, f"no gradient reached {name}"
        assert_bitwise_equal(p.grad, theirs[name].grad, f"grad of {name}")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_causal_lm_bitwise(preset, padded, dtype):
    """Logits, loss and every parameter gradient equal transformers' bit for bit.

    bf16 is bitwise too, provided transformers keeps ``inv_freq`` in float32 as its
    ``from_pretrained`` does (see test_bf16_cast_inv_freq_is_within_rounding for the other path).
    """
    cfg = get_preset(preset)
    hf, ours = twin_pair(cfg, dtype=dtype)
    ids, mask, labels = batch(cfg, padded=padded)
    o_hf, o_us = run_both(hf, ours, ids, mask, labels)
    assert_bitwise_equal(o_us.logits, o_hf.logits, "logits")
    assert_bitwise_equal(o_us.loss, o_hf.loss, "loss")
    check_grads(hf, ours)


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_cast_inv_freq_is_within_rounding(preset):
    """``hf.to(bf16)`` rounds transformers' inv_freq buffer; detbench keeps float32 frequencies.

    The logits then differ, but only by bf16 rounding: the worst difference stays within a few bf16
    ulps of the logit scale (bf16 has 8 mantissa bits: eps = 2**-7 relative).
    """
    cfg = get_preset(preset)
    hf, ours = twin_pair(cfg, dtype=torch.float32)
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    ids, mask, labels = batch(cfg)
    o_hf = hf(input_ids=ids, attention_mask=mask, labels=labels)
    o_us = ours(ids, mask, labels)
    scale = o_hf.logits.float().abs().max()
    err = (o_us.logits.float() - o_hf.logits.float()).abs().max()
    assert err <= 8 * 2 ** -7 * scale, mismatch(o_us.logits, o_hf.logits)
    assert abs(o_us.loss.item() - o_hf.loss.item()) <= 8 * 2 ** -7 * o_hf.loss.item()


def test_padding_changes_nothing_for_real_tokens():
    """A padded row's real-token logits equal the same row run alone without padding (eager, fp32)."""
    cfg = get_preset("qwen3-tiny")
    _, ours = twin_pair(cfg)
    ids, mask, _ = batch(cfg)
    full = ours(ids, mask).logits
    n = int(mask[1].sum())
    alone = ours(ids[1:2, :n]).logits
    torch.testing.assert_close(full[1:2, :n], alone, rtol=1e-5, atol=1e-6)


# ---- single blocks against their transformers twins ----------------------------------------------


def _hf_module(preset: str, name: str):
    cfg = get_preset(preset)
    hc = hf_config(cfg)
    prefix = "Qwen3" if cfg.family == "qwen3" else "Qwen2"
    mod = __import__(f"transformers.models.{cfg.family}.modeling_{cfg.family}", fromlist=["x"])
    return cfg, hc, getattr(mod, prefix + name)


def _grads(module, inputs):
    return [p.grad for _, p in sorted(module.named_parameters())] + [t.grad for t in inputs]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def _same_forward_backward(theirs, ours, shape, what, call_theirs=None, call_ours=None):
    """Feed both modules the same input and upstream gradient; output and every gradient bitwise equal."""
    x1, x2 = _rand(*shape), _rand(*shape)
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    y1 = (call_theirs or theirs)(x1)
    y2 = (call_ours or ours)(x2)
    assert_bitwise_equal(y2, y1, f"{what} output")
    y1.backward(g)
    y2.backward(g)
    for a, b in zip(_grads(ours, [x2]), _grads(theirs, [x1])):
        assert_bitwise_equal(a, b, f"{what} grad")


@pytest.mark.parametrize("preset", PRESETS)
def test_rmsnorm_block(preset):
    cfg, hc, cls = _hf_module(preset, "RMSNorm")
    theirs = cls(cfg.hidden_size, eps=cfg.rms_norm_eps)
    with torch.no_grad():
        theirs.weight.copy_(1 + 0.1 * torch.randn(cfg.hidden_size))
    ours = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    ours.load_state_dict(theirs.state_dict())
    _same_forward_backward(theirs, ours, (2, 5, cfg.hidden_size), "rmsnorm")


@pytest.mark.parametrize("preset", PRESETS)
def test_mlp_block(preset):
    cfg, hc, cls = _hf_module(preset, "MLP")
    torch.manual_seed(0)
    theirs = cls(hc)
    ours = MLP(cfg)
    ours.load_state_dict(theirs.state_dict())
    _same_forward_backward(theirs, ours, (2, 5, cfg.hidden_size), "mlp")


def _rotary(preset, cfg, hc, s, b=2):
    _, _, rot_cls = _hf_module(preset, "RotaryEmbedding")
    pos = torch.arange(s)[None].expand(b, s)
    x = torch.zeros(1, dtype=torch.float32)
    cos_hf, sin_hf = rot_cls(hc)(x, pos)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(x, pos)
    assert_bitwise_equal(cos, cos_hf, "rotary cos")
    assert_bitwise_equal(sin, sin_hf, "rotary sin")
    return cos, sin


def _hf_mask(mask_bool):
    return torch.where(mask_bool, 0.0, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_attention_block(preset, padded):
    cfg, hc, cls = _hf_module(preset, "Attention")
    torch.manual_seed(0)
    theirs = cls(hc, layer_idx=0)
    if cfg.qk_norm:
        with torch.no_grad():
            theirs.q_norm.weight.copy_(1 + 0.1 * torch.randn(cfg.head_dim))
            theirs.k_norm.weight.copy_(1 + 0.1 * torch.randn(cfg.head_dim))
    ours = Attention(cfg)
    ours.load_state_dict(theirs.state_dict())
    b, s = 2, 7
    cos, sin = _rotary(preset, cfg, hc, s, b)
    keep = torch.ones(b, s, dtype=torch.long)
    if padded:
        keep[1, 4:] = 0
    mask = padded_causal_mask(keep, s)
    _same_forward_backward(
        theirs, ours, (b, s, cfg.hidden_size), "attention",
        call_theirs=lambda x: theirs(x, position_embeddings=(cos, sin), attention_mask=_hf_mask(mask))[0],
        call_ours=lambda x: ours(x, cos, sin, mask if padded else None),
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_decoder_layer_block(preset):
    cfg, hc, cls = _hf_module(preset, "DecoderLayer")
    torch.manual_seed(0)
    theirs = cls(hc, layer_idx=0)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape))
    ours = DecoderLayer(cfg)
    ours.load_state_dict(theirs.state_dict())
    b, s = 2, 6
    cos, sin = _rotary(preset, cfg, hc, s, b)
    mask = padded_causal_mask(torch.ones(b, s, dtype=torch.long), s)

    def call_theirs(x):
        y = theirs(x, attention_mask=_hf_mask(mask), position_embeddings=(cos, sin))
        return y[0] if isinstance(y, tuple) else y

    _same_forward_backward(theirs, ours, (b, s, cfg.hidden_size), "decoder layer",
                           call_theirs=call_theirs, call_ours=lambda x: ours(x, cos, sin))
