"""The Triton attention kernels: accuracy, masks, run-to-run bitwise equality, batch invariance, checks.

Without CUDA the kernels run through the Triton interpreter (tests/conftest.py), which runs programs
one after another: there the atomic twin is deterministic too, so its tests check correctness only.
The negative control for the repeat check is the planted attention backend (bench.planted), which
sums dV over query chunks in a fresh random order on every call.

bfloat16 is tested only on CUDA: ``tl.dot`` on bfloat16 is broken in the interpreter (triton issue
11584). Shapes are tiny (the interpreter runs each program in Python); the small-tile config makes
S=33 span several query and key blocks, with tails, so the tiling logic is exercised anyway.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bench.compare import assert_bitwise_equal, bitwise_equal
from bench.planted import attention_nondet_bwd
from kernels import attention as ka
from kernels._common import INTERPRET
from qwen_layers.backends import causal_mask, eager_attention, repeat_kv
from qwen_layers.registry import REGISTRY, BackendUnavailable

from . import kernel_checks as kc
from .kernel_checks import DEVICE, REPEATS, assert_batch_invariant, assert_repeats_bitwise, repeat_mismatches

pytestmark = kc.requires_triton

DTYPES = kc.DOT_DTYPES  # bfloat16 on CUDA only (tl.dot)
NAMES = ("o", "dq", "dk", "dv")
# 16 x 16 tiles everywhere: S=33 spans 3 query and 3 key blocks (the last one a 1-row tail).
SMALL = ka.AttentionConfig(16, 16, 2, 1, 16, 16, 2, 1, 16, 16, 2, 1)

# Accuracy bound, flash-attention's habit: |kernel - ref64| <= MULT * |eager - ref64| + FLOOR[dtype].
# MULT: the kernel does eager's math in another order (blocked online softmax, P recomputed in the
# backward from the stored log-sum-exp), so its rounding error may be of eager's size but not larger
# than twice it.
MULT = 2.0
# FLOOR: where eager happens to be (nearly) exact, e.g. S=1 where softmax is exactly 1 and eager's
# dQ is exactly 0, the kernel still pays a few roundings: in float32, dP - delta cancels two sums of
# size |v||dO|sqrt(D) ~ 10 taken in different orders (a few 1e-7); in 16 bits, each result is cast
# to the input dtype once, half an ulp at the values' size (|x| < 4): 1e-3 float16, 8e-3 bfloat16.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make(b, hq, hkv, s, d, dtype, seed=0):
    """Seeded q, k, v and a fixed upstream gradient (drawn in float32 on the CPU, then cast and moved)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d), (b, hq, s, d)]
    return [torch.randn(sh, generator=gen).to(device=DEVICE, dtype=dtype) for sh in shapes]


def run(fn, q, k, v, do, **kw):
    """Forward and backward once: (o, dq, dk, dv), detached."""
    return kc.forward_backward(fn, (q, k, v), do, scale=q.shape[-1] ** -0.5, **kw)


def reference(q, k, v, *, scale, causal=True, attn_mask=None):
    """Attention in float64; a row with no key to attend outputs 0 (the kernel's documented choice)."""
    q, k, v = q.double(), k.double(), v.double()
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is None and causal:
        attn_mask = causal_mask(q.shape[2], k.shape[2], q.device)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf row: NaN -> 0
    return probs @ v


def max_err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def triton_fn(atomic=False, config=None):
    """The public function, or flash_attention with another launch config."""
    if config is None:
        return ka.attention_atomic if atomic else ka.attention
    return functools.partial(ka.flash_attention, atomic=atomic, config=config)


def check_accuracy(fn, q, k, v, do, dead=None, **kw):
    """Each of o, dq, dk, dv within MULT * eager's error + FLOOR of the float64 reference; no NaN.

    ``dead`` (B, 1, S, 1) marks query rows with no key: eager outputs mean(V) there instead of the
    reference's 0, so eager's output error is measured on the other rows only (the kernel's on all).
    """
    got = run(fn, q, k, v, do, **kw)
    base = run(eager_attention, q, k, v, do, **kw)
    ref = run(reference, q.double(), k.double(), v.double(), do.double(), **kw)
    if dead is not None:
        base = (torch.where(dead, ref[0].to(q.dtype), base[0]), *base[1:])
    for name, g, e, r in zip(NAMES, got, base, ref):
        assert not g.isnan().any(), f"{name}: NaN in the kernel's result"
        err, err_eager = max_err(g, r), max_err(e, r)
        bound = MULT * err_eager + FLOOR[q.dtype]
        assert err <= bound, f"{name}: kernel error {err:.3e} > {bound:.3e} (eager {q.dtype} error {err_eager:.3e})"
    return got


def padding_mask(lengths, s, *, causal=True, left=False):
    """Bool (B, 1, S, S) mask: key padding (right, or left), combined with causality if asked."""
    idx = torch.arange(s)
    lens = torch.tensor(lengths)[:, None]
    keep = idx[None, :] >= s - lens if left else idx[None, :] < lens
    mask = keep[:, None, None, :].expand(len(lengths), 1, s, s)
    if causal:
        mask = mask & causal_mask(s, s, torch.device("cpu"))
    return mask.to(DEVICE)


# ------------------------------------------------------------------------------------------------
# accuracy against a float64 reference
# ------------------------------------------------------------------------------------------------

# (B, Hq, Hkv, S, D): S=1 and tails (17, 33, 127) against the default blocks (32/64 rows), GQA
# groups of 2 and 4, MHA, batch 1 and 3, the tiny presets' D=16 and one D=64.
SHAPES = [
    pytest.param((1, 4, 2, 1, 16), id="s1-gqa"),
    pytest.param((3, 4, 2, 17, 16), id="b3-s17-gqa"),
    pytest.param((1, 4, 4, 33, 16), id="s33-mha"),
    pytest.param((1, 4, 1, 127, 16), id="s127-group4"),
    pytest.param((1, 2, 1, 17, 64), id="s17-d64"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_reference(dtype, shape, causal):
    check_accuracy(ka.attention, *make(*shape, dtype), causal=causal)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_tiles_match_reference(dtype, causal):
    """Many blocks per row and column with a 1-row tail: the online softmax rescaling and the
    dK/dV / dQ loops over several blocks."""
    check_accuracy(triton_fn(config=SMALL), *make(2, 4, 2, 33, 16, dtype, seed=1), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_d128(dtype):
    """The larger presets' head dim, once, on its own (default) config."""
    check_accuracy(ka.attention, *make(1, 2, 1, 17, 128, dtype, seed=2), causal=True)


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, SMALL], ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("kind", ["causal-right", "causal-left", "full-right"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_mask_matches_reference(dtype, kind, config):
    """Key padding, alone or with causality; lengths 33, 20, 0 (an empty sequence), rows with no key
    left at zero upstream gradient as a masked loss leaves them (eager outputs mean(V) there)."""
    s = 33
    mask = padding_mask([33, 20, 0], s, causal=kind.startswith("causal"), left=kind.endswith("left"))
    q, k, v, do = make(3, 4, 2, s, 16, dtype, seed=3)
    dead = ~mask.any(-1, keepdim=True)  # (B, 1, S, 1): query rows with no key
    do = do.masked_fill(dead, 0.0)
    check_accuracy(triton_fn(config=config), q, k, v, do, dead=dead, attn_mask=mask)


@pytest.mark.slow
def test_fully_masked_rows_output_zero_and_add_nothing():
    """Rows with no key: o = 0 and dQ = 0 exactly, no NaN, and their upstream gradient does not reach
    dK/dV (bitwise the same as with that gradient zeroed)."""
    s = 33
    mask = padding_mask([33, 10, 0], s, left=True)  # left padding: the first 23 / all rows of b=1 / b=2
    dead = ~mask.any(-1, keepdim=True)
    q, k, v, do = make(3, 4, 2, s, 16, torch.float32, seed=4)
    small = triton_fn(config=SMALL)
    o, dq, dk, dv = run(small, q, k, v, do, attn_mask=mask)
    for name, t in zip(NAMES, (o, dq, dk, dv)):
        assert torch.isfinite(t).all(), f"{name}: non-finite values"
    rows = dead.expand_as(o)
    assert bool((o[rows] == 0).all()) and bool((dq[rows] == 0).all())
    assert bool((dk[2] == 0).all()) and bool((dv[2] == 0).all())  # the empty sequence
    _, _, dk0, dv0 = run(small, q, k, v, do.masked_fill(dead, 0.0), attn_mask=mask)
    assert_bitwise_equal(dk, dk0, "dk")
    assert_bitwise_equal(dv, dv0, "dv")


def test_mask_without_padding_equals_no_mask():
    """A plain causal (1, 1, S, S) mask and an all-True one give the bits of causal=True / False."""
    q, k, v, do = make(2, 4, 2, 17, 16, torch.float16, seed=5)
    tril = causal_mask(17, 17, DEVICE)
    full = torch.ones(1, 1, 17, 17, dtype=torch.bool, device=DEVICE)
    for mask, causal in ((tril, True), (full, False)):
        a = run(ka.attention, q, k, v, do, attn_mask=mask, causal=not causal)  # the flag is ignored
        b = run(ka.attention, q, k, v, do, causal=causal)
        for name, x, y in zip(NAMES, a, b):
            assert_bitwise_equal(x, y, f"{name} (causal={causal})")


def test_right_padding_does_not_change_a_sequence():
    """A 9-token sequence right-padded to 33 (zero upstream gradient on padding) gives the bits it
    gives alone: padding blocks are skipped or masked, never change a reduction order."""
    q, k, v, do = make(1, 4, 2, 33, 16, torch.float16, seed=6)
    mask = padding_mask([9], 33)
    do = do.masked_fill(torch.arange(33, device=DEVICE)[None, None, :, None] >= 9, 0.0)
    for config in (None, SMALL):
        fn = triton_fn(config=config)
        padded = run(fn, q, k, v, do, attn_mask=mask)
        alone = run(fn, *(t[:, :, :9] for t in (q, k, v, do)))
        for name, x, y in zip(NAMES, padded, alone):
            assert_bitwise_equal(x[:, :, :9], y, f"{name} (config={config})")


# ------------------------------------------------------------------------------------------------
# determinism and batch invariance
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
def test_repeat_bitwise_equal(masked):
    """20 runs, fixed upstream gradient: output and all grads bitwise equal to the first run."""
    inputs = make(2, 4, 2, 17, 16, torch.float16, seed=7)
    kw = {"attn_mask": padding_mask([17, 5], 17)} if masked else {}
    assert_repeats_bitwise(lambda: run(ka.attention, *inputs, **kw), NAMES, "attention/triton")


def test_repeat_check_catches_planted_nondeterminism():
    """Negative control: the same check flags the planted backend whose dV order changes per call."""
    inputs = make(2, 4, 2, 17, 16, torch.float32, seed=7)
    found = repeat_mismatches(lambda: run(attention_nondet_bwd, *inputs), NAMES)
    assert any(" dv:" in f for f in found), (
        f"the repeat check missed the planted nondeterministic dV over {REPEATS} runs")


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
def test_batch_invariant(masked):
    """f(x)[:k] == f(x[:k]) bitwise for the output and every grad, k = 1, 2 of a batch of 3."""
    q, k, v, do = make(3, 4, 2, 17, 16, torch.float16, seed=8)
    mask = padding_mask([17, 6, 11], 17) if masked else None
    def run_rows(rows):
        return run(ka.attention, q[rows], k[rows], v[rows], do[rows], attn_mask=None if mask is None else mask[rows])

    assert_batch_invariant(run_rows, [slice(0, 1), slice(0, 2)], NAMES, "attention/triton")


# ------------------------------------------------------------------------------------------------
# the atomic twin
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, SMALL], ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_atomic_twin_matches_reference(dtype, config):
    """Correctness only. On the CPU the interpreter runs programs one after another, so its atomics
    are deterministic there; its nondeterminism can only show on a GPU."""
    q, k, v, do = make(2, 4, 2, 33, 16, dtype, seed=9)
    mask = padding_mask([33, 20], 33)
    atomic = check_accuracy(triton_fn(atomic=True, config=config), q, k, v, do, attn_mask=mask)
    det = run(triton_fn(config=config), q, k, v, do, attn_mask=mask)
    assert_bitwise_equal(atomic[0], det[0], "o (same forward kernel)")


# ------------------------------------------------------------------------------------------------
# input checks, configs, registry
# ------------------------------------------------------------------------------------------------


def _qkv(b=1, hq=4, hkv=2, s=5, d=16, dtype=torch.float32, device=DEVICE):
    return (torch.zeros(b, hq, s, d, dtype=dtype, device=device),
            torch.zeros(b, hkv, s, d, dtype=dtype, device=device),
            torch.zeros(b, hkv, s, d, dtype=dtype, device=device))


def _with(i, t):
    qkv = list(_qkv())
    qkv[i] = t
    return qkv


BAD = [
    pytest.param(lambda: _qkv(d=32), {}, ValueError, r"head_dim 32 is not supported \(supported: 16, 64, 128\)",
                 id="head-dim"),
    pytest.param(lambda: _qkv(dtype=torch.float64), {}, ValueError, r"dtype torch.float64 is not supported",
                 id="dtype"),
    pytest.param(lambda: _with(2, torch.zeros(1, 2, 5, 16, dtype=torch.float16, device=DEVICE)), {}, ValueError,
                 "must share one dtype", id="mixed-dtype"),
    pytest.param(lambda: _with(2, torch.zeros(1, 2, 6, 16, device=DEVICE)), {}, ValueError,
                 "k and v must have one shape", id="k-v-shape"),
    pytest.param(lambda: _qkv(s=5)[:1] + _qkv(s=6)[1:], {}, ValueError, "must agree in B, S and D", id="seq-len"),
    pytest.param(lambda: _qkv(hq=3, hkv=2), {}, ValueError, r"query heads \(3\) must be a multiple of kv heads \(2\)",
                 id="gqa-group"),
    pytest.param(lambda: _with(0, torch.zeros(4, 5, 16, device=DEVICE)), {}, ValueError, "q must be a 4-D tensor",
                 id="rank"),
    pytest.param(lambda: _qkv(device="meta"), {}, RuntimeError, "cannot run on meta", id="device"),
    pytest.param(_qkv, {"attn_mask": torch.ones(1, 1, 5, 5, device=DEVICE)}, ValueError,
                 "attn_mask must be a bool tensor", id="mask-dtype"),
    pytest.param(_qkv, {"attn_mask": torch.ones(1, 5, 5, dtype=torch.bool, device=DEVICE)}, ValueError,
                 r"attn_mask must have shape \(B or 1, 1, S, S\) = \(1, 1, 5, 5\)", id="mask-shape"),
    pytest.param(_qkv, {"attn_mask": torch.ones(5, 5, dtype=torch.bool, device=DEVICE).triu()[None, None]},
                 ValueError, "key-padding mask.*use the 'eager' or 'sdpa' backend", id="mask-structure"),
    pytest.param(_qkv, {"attn_mask": torch.ones(1, 1, 5, 5, dtype=torch.bool, device="meta")}, ValueError,
                 "all tensors must be on one device", id="mask-device"),
    pytest.param(_qkv, {"scale": None}, ValueError, "scale must be a finite Python number", id="scale"),
]


@pytest.mark.parametrize("make_qkv, kw, exc, match", BAD)
def test_bad_inputs_raise(make_qkv, kw, exc, match):
    kw = {"scale": 0.25, **kw}
    with pytest.raises(exc, match=match):
        ka.attention(*make_qkv(), **kw)


def test_non_contiguous_inputs_are_copied():
    """Transposed views (as the model's v is) give the bits of contiguous copies."""
    q, k, v, do = make(1, 4, 2, 17, 16, torch.float32, seed=10)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    for name, a, b in zip(NAMES, run(ka.attention, qt, kt, vt, do.transpose(2, 3).contiguous().transpose(2, 3)),
                          run(ka.attention, q, k, v, do)):
        assert_bitwise_equal(a, b, name)


@pytest.mark.parametrize("shape", [(0, 4, 2, 5, 16), (1, 4, 2, 0, 16)], ids=["batch0", "seq0"])
def test_empty_inputs(shape):
    """Nothing to attend: empty output and empty gradients, no launch."""
    q, k, v, do = make(*shape, torch.float32)
    mask = torch.ones(shape[0], 1, shape[3], shape[3], dtype=torch.bool, device=DEVICE)
    for name, t, ref in zip(NAMES, run(ka.attention, q, k, v, do, attn_mask=mask), (q, q, k, v)):
        assert t.shape == ref.shape, name


def test_configs_are_fixed_and_recorded():
    for d in ka.HEAD_DIMS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            cfg = ka.config_for(d, dtype)
            assert cfg is ka.CONFIGS[(d, dtype)]
            assert set(cfg.to_dict()) >= {"fwd_block_m", "fwd_block_n", "fwd_warps", "fwd_stages", "dot_precision"}
    assert ka.config_for(64, torch.float32).dot_precision == "ieee"  # no TF32 for float32 inputs
    with pytest.raises(ValueError, match="must be a power of two >= 16"):
        ka.AttentionConfig(8, 16, 4, 2, 16, 16, 4, 2, 16, 16, 4, 2)


def test_registry_entries():
    det, atomic = kc.assert_twin_entries("attention")
    assert (det.fn, atomic.fn) == (ka.attention, ka.attention_atomic)
    assert det.why_not(DEVICE) is None and atomic.why_not(DEVICE) is None


def test_resolve_on_cpu():
    """Under the interpreter the CPU resolves and runs; with CUDA (no interpreter) it refuses with the reason."""

    if not INTERPRET:
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
            REGISTRY.resolve("attention", "triton", "cpu")
        return
    fn = REGISTRY.resolve("attention", "triton", "cpu")
    q, k, v, do = make(1, 4, 2, 5, 16, torch.float32, seed=11)
    assert_bitwise_equal(fn(q, k, v, scale=0.25), ka.attention(q, k, v, scale=0.25), "o")
    assert bitwise_equal(fn(q, k, v, scale=0.25, causal=False), ka.attention(q, k, v, scale=0.25, causal=False))


# ------------------------------------------------------------------------------------------------
# the mask is read back to the host once per mask tensor, not on every call
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["causal-left", "full-right", "no-padding"])
def test_masked_call_reads_the_mask_back_once(kind):
    """The first call with a mask checks its structure (host reads); later calls with the same, unchanged
    tensor (the model's layers share one; a timed loop reuses it) read nothing back, forward or backward,
    deterministic or atomic twin, and give the first call's bits."""
    q, k, v, do = make(2, 4, 2, 17, 16, torch.float32, seed=12)
    mask = {"causal-left": lambda: padding_mask([17, 9], 17, left=True),
            "full-right": lambda: padding_mask([17, 5], 17, causal=False),
            "no-padding": lambda: padding_mask([17, 17], 17)}[kind]()
    first = run(ka.attention, q, k, v, do, attn_mask=mask)
    first_atomic = run(ka.attention_atomic, q, k, v, do, attn_mask=mask)
    with kc.NoHostRead():
        again = run(ka.attention, q, k, v, do, attn_mask=mask)
        again_atomic = run(ka.attention_atomic, q, k, v, do, attn_mask=mask)
    for name, a, b, c, d in zip(NAMES, first, again, first_atomic, again_atomic):
        assert_bitwise_equal(a, b, f"{name}, mask remembered")
        assert_bitwise_equal(c, d, f"{name} (atomic twin), mask remembered")
    with pytest.raises(AssertionError, match="host read"), kc.NoHostRead():  # a new tensor is checked again
        ka.attention(q, k, v, scale=0.25, attn_mask=mask.clone())


def test_mask_written_in_place_is_checked_again():
    """The remembered result is tied to the tensor's version counter: a mask changed in place after its first
    use is validated again, and a structure the kernel cannot take still raises its error."""
    q, k, v = _qkv()
    mask = padding_mask([5], 5)
    ka.attention(q, k, v, scale=0.25, attn_mask=mask)
    mask[0, 0, 0, 4] = True  # a query attending a later key: no longer causal key padding
    with pytest.raises(ValueError, match="key-padding mask.*use the 'eager' or 'sdpa' backend"):
        ka.attention(q, k, v, scale=0.25, attn_mask=mask)
    with pytest.raises(ValueError, match="key-padding mask"):  # the bad mask is not remembered as good
        ka.attention(q, k, v, scale=0.25, attn_mask=mask)


def test_mask_memory_is_bounded_and_freed_with_the_mask():
    q, k, v = _qkv()
    masks = [padding_mask([n], 5) for n in range(1, 6)] * 5  # 5 distinct tensors
    masks = [m.clone() for m in masks]  # 25 distinct tensors
    for m in masks:
        ka.attention(q, k, v, scale=0.25, attn_mask=m)
    assert len(ka._MASK_CACHE) <= ka._MASK_CACHE_SIZE
    del masks, m
    gc.collect()
    assert not ka._MASK_CACHE, "entries of freed masks are dropped"


# ------------------------------------------------------------------------------------------------
# shared memory as documented (compiled for sm_90a; no GPU needed)
# ------------------------------------------------------------------------------------------------

# Run in a child process without TRITON_INTERPRET: kernels.aot records the launches the real wrappers make
# with sm_90a's configs (the causal model call on meta tensors and the padded one on CPU tensors, both
# twins, the head counts of a Qwen preset of each head dim, 64 tokens: every integer argument falls in
# the class it has at Qwen's lengths), specialises them as the runtime does on sm_90a (divisibility
# attributes, warp size 32) and compiles each distinct specialisation (Triton's cache is used if warm).
_SHARED_SCRIPT = textwrap.dedent("""
    import json, torch
    from kernels import aot
    from kernels import attention as ka

    target = aot.TARGETS["sm_90a"]
    shape = aot.Shape(2, 64)
    with aot.record_launches(target) as launches:
        for d, preset in ((64, "qwen2.5-0.5b"), (128, "qwen3-0.6b")):
            cfg = aot.PRESETS[preset]
            for dtype in (torch.float16, torch.float32):
                for fn, twin in ((ka.attention, "deterministic"), (ka.attention_atomic, "atomic")):
                    aot.record_padded_attention(cfg, dtype, twin, shape)
                    q = torch.empty(2, cfg.num_attention_heads, 64, d, dtype=dtype, device="meta", requires_grad=True)
                    k = torch.empty(2, cfg.num_key_value_heads, 64, d, dtype=dtype, device="meta", requires_grad=True)
                    v = torch.empty_like(k, requires_grad=True)
                    o = fn(q, k, v, scale=d ** -0.5)
                    o.backward(torch.empty_like(o))
    column = {"_attn_fwd_kernel": 0, "_attn_bwd_dkdv_kernel": 1, "_attn_bwd_dq_kernel": 2}
    launches = [x for x in launches if x.kernel.rpartition(".")[2] in column]
    plan = aot.plan({target.name: launches}, [target])
    results = aot.compile_all(plan, 2, None, False, lambda message: None)
    got = {}
    for spec, _ in plan.jobs:
        result = results[(spec.target, spec.spec_id)]
        assert result.ok, result.error
        row = got.setdefault(f"{spec.constexprs['HEAD_DIM']},{4 if spec.signature['Q'] == '*fp32' else 2}", [0, 0, 0])
        col = column[spec.kernel.rpartition(".")[2]]
        row[col] = max(row[col], result.shared / 1024)
    print(json.dumps(got))
""")


@pytest.mark.slow
def test_shared_memory_is_as_documented():
    """The shared memory kernels.attention records (SHARED_KIB_SM90, and the largest named in the comment
    above it) is what Triton allocates for the real wrappers' launches on sm_90a: the largest over the
    padded/unpadded and deterministic/atomic variants, at head dims 64 and 128, 16-bit and float32.
    About 25-40 s on 2 CPU cores with a cold Triton cache."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot compile for sm_90a")
    if not triton.__version__.startswith(("3.6.", "3.8.")):
        pytest.skip(f"SHARED_KIB_SM90 records Triton 3.6's and 3.8's allocation; this is Triton {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _SHARED_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {tuple(int(x) for x in key.split(",")): tuple(v) for key, v in json.loads(proc.stdout).items()}
    assert got == ka.SHARED_KIB_SM90
    assert max(max(v) for v in got.values()) == 128.0 == got[(128, 2)][0]  # the largest: the 16-bit d128 forward
