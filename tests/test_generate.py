"""Greedy generation with a KV cache (qwen_layers) against transformers, and against recomputation."""

from __future__ import annotations

import pytest
import torch

from bench.compare import assert_bitwise_equal
from qwen_layers import KVCache, build_model, get_preset

from .hf_twins import twin_pair

PRESETS = ["qwen3-tiny", "qwen2.5-tiny"]


def left_padded(cfg, seed: int = 3):
    """Three prompts of 9, 5 and 8 tokens, left-padded to 9 (padding ids 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "recompute"])
def test_generate_is_transformers_greedy_generate(preset, use_cache):
    """Same weights, left-padded batch: the tokens and every step's float32 logits equal transformers'
    ``generate(do_sample=False)`` bit for bit, with the KV cache and without."""
    cfg = get_preset(preset)
    hf, ours = twin_pair(cfg)
    hf.eval()
    ids, mask = left_padded(cfg)
    mine = ours.generate(ids, mask, max_new_tokens=5, use_cache=use_cache)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(mine.sequences, theirs.sequences)
    assert_bitwise_equal(mine.logits, torch.stack(theirs.logits), "per-step logits")


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_through_the_cache_is_the_plain_forward(preset):
    """Filling the cache changes nothing in the prefill: its last-position logits are the plain forward's,
    bit for bit, and the cache holds every layer's keys for all 9 positions."""
    cfg = get_preset(preset)
    model = build_model(cfg).eval()
    ids, mask = left_padded(cfg)
    cache = KVCache(cfg.num_hidden_layers)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cached = model(ids, mask, position_ids=positions, cache=cache, logits_to_keep=1).logits
        plain = model(ids, mask, position_ids=positions).logits[:, -1:]
    assert_bitwise_equal(cached, plain, "prefill logits")
    assert [layer.keys.shape[2] for layer in cache.layers] == [9] * cfg.num_hidden_layers


def test_decoding_without_the_mode_need_not_equal_recomputation():
    """Where cached decoding and recomputation agree without the batch-invariant mode, and where they need
    not. Step 0 (the prefill) is the same computation both ways: equal. From step 1 on, the cached step
    projects only the newest token (matmuls of B rows) while recomputation projects all B x (S + t)
    tokens; a BLAS that blocks by the row count (this project's MKL does) gives other last bits, so
    later steps are not compared here. Under the mode they are equal at every step
    (tests/test_batch_invariant.py)."""
    cfg = get_preset("qwen3-tiny")
    model = build_model(cfg).eval()
    ids, mask = left_padded(cfg)
    cached = model.generate(ids, mask, max_new_tokens=3, use_cache=True)
    recomputed = model.generate(ids, mask, max_new_tokens=3, use_cache=False)
    assert_bitwise_equal(cached.logits[0], recomputed.logits[0], "step 0 logits")


def test_generate_refuses_right_padding_and_no_tokens():
    cfg = get_preset("qwen3-tiny")
    model = build_model(cfg).eval()
    ids = torch.ones(2, 4, dtype=torch.long)
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, right, max_new_tokens=1)
    with pytest.raises(ValueError, match="at least 1"):
        model.generate(ids, max_new_tokens=0)


def test_cached_forward_checks_the_mask_covers_the_cache():
    cfg = get_preset("qwen3-tiny")
    model = build_model(cfg).eval()
    cache = KVCache(cfg.num_hidden_layers)
    ids = torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(ValueError, match=r"must cover the 4 cached and 1 new"):
            model(ids[:, :1], torch.ones(1, 1, dtype=torch.long), cache=cache)
