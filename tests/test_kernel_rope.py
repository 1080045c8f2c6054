"""kernels/rope.py: accuracy against float64, run-to-run bits, batch invariance, strides, bad inputs.

Rotary is elementwise, so it has no reduction and no atomic twin; the repeat check's negative
control lives with the ops that reduce (tests/test_kernel_rmsnorm.py).
"""

from __future__ import annotations

import pytest
import torch

from bench.compare import assert_bitwise_equal, mismatch
from qwen_layers.backends import eager_rope
from qwen_layers.registry import REGISTRY

from . import kernel_checks as kc
from .kernel_checks import DEVICE, assert_batch_invariant, assert_repeats_bitwise

pytest.importorskip("triton", reason="package triton not installed (Linux only)")

from kernels.rope import rope  # noqa: E402

pytestmark = kc.requires_triton

HQ, HKV, D = 6, 2, 16  # 6 query heads: the head tile (8) is partly masked

# Allowed error = FACTOR x (eager's error in the same dtype) + FLOOR ulps at the reference's largest
# magnitude, against float64. Eager rounds x * cos, rotate_half(x) * sin and their sum (three
# roundings in the dtype); the kernel computes in float32 and rounds once, so it is usually closer.
# - float32: both are within a few ulps; eager's own error can be ~0 for some elements: floor 4 ulps.
# - float16: 2x eager + 1 ulp.
# - bfloat16: as float16; the Triton CPU interpreter truncates float32 -> bf16 instead of rounding
#   to nearest (triton/runtime/interpreter.py, _convert_float), up to twice the rounding error.
TOLERANCE = {torch.float32: (2.0, 4.0), torch.float16: (2.0, 1.0), torch.bfloat16: (2.0, 1.0)}


def assert_close_to_reference(out, ref64, eager, what):
    factor, floor_ulps = TOLERANCE[out.dtype]
    kc.assert_close_to_reference(out, ref64, eager, what, factor=factor, floor_ulps=floor_ulps)


def tables(b, s, dtype, seed=0, equal_halves=True):
    """cos/sin (b, s, D); transformers' tables repeat one half, the general case does not."""
    g = torch.Generator().manual_seed(seed)
    if equal_halves:
        pos = torch.arange(s, dtype=torch.float64)[None, :, None] + torch.randint(0, 50, (b, 1, 1), generator=g)
        freqs = pos * (10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    return (torch.randn(b, s, D, generator=g).to(DEVICE, dtype), torch.randn(b, s, D, generator=g).to(DEVICE, dtype))


def make_inputs(b, s, dtype, seed=0, cos_batch=None, equal_halves=True, transposed=True):
    """q as transformers makes it: (B, S, H, D) storage viewed as (B, H, S, D) when ``transposed``."""
    g = torch.Generator().manual_seed(seed)
    if transposed:
        q = torch.randn(b, s, HQ, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
    else:
        q = torch.randn(b, HQ, s, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(b, HKV, s, D, generator=g).to(DEVICE, dtype)
    dq = torch.randn(b, HQ, s, D, generator=g).to(DEVICE, dtype)
    dk = torch.randn(b, HKV, s, D, generator=g).to(DEVICE, dtype)
    cos, sin = tables(cos_batch or b, s, dtype, seed + 1, equal_halves)
    return q, k, cos, sin, dq, dk


def run(fn, q, k, cos, sin, dq, dk):
    """q_rot, k_rot, dq and dk of ``fn`` for the upstream gradients (dq, dk)."""
    return kc.forward_backward(fn, (q, k), (dq, dk), cos, sin)


NAMES = ("q_rot", "k_rot", "dq", "dk")


def check_against_reference(q, k, cos, sin, dq, dk, what):
    ref = run(eager_rope, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    eager = run(eager_rope, q, k, cos, sin, dq, dk)
    for name, out, r, e in zip(NAMES, run(rope, q, k, cos, sin, dq, dk), ref, eager):
        assert out.dtype == e.dtype and out.shape == e.shape, name
        assert_close_to_reference(out, r, e, f"{name} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b, s, cos_batch", [(1, 1, 1), (3, 17, 1), (2, 3, 2)],
                         ids=["1x1", "3x17-shared", "2x3-per-batch"])
def test_matches_float64_reference(dtype, b, s, cos_batch):
    check_against_reference(*make_inputs(b, s, dtype, cos_batch=cos_batch), f"{dtype} b={b} s={s}")


def test_general_tables_and_backward_transpose():
    """cos/sin whose halves differ: the backward must be the transpose of the forward map, not -sin."""
    q, k, cos, sin, dq, dk = make_inputs(2, 5, torch.float32, seed=1, equal_halves=False, transposed=False)
    check_against_reference(q, k, cos, sin, dq, dk, "general tables")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_repeats_are_bitwise_equal(dtype):
    """20 runs, fixed upstream gradients: both outputs and both gradients bitwise equal to the first."""
    inputs = make_inputs(2, 3, dtype, seed=2)
    assert_repeats_bitwise(lambda: run(rope, *inputs), NAMES, "rope/triton")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_is_invariant(dtype):
    """The first k sequences of a batch of 5 are bitwise those of the k sequences alone."""
    q, k, cos, sin, dq, dk = make_inputs(5, 9, dtype, seed=3, cos_batch=5)
    assert_batch_invariant(lambda rows: run(rope, *(t[rows] for t in (q, k, cos, sin, dq, dk))),
                           [slice(0, 1), slice(0, 3)], NAMES, "rope/triton")


def test_strided_views_are_read_in_place_with_the_same_bits():
    """Transposed q (transformers' layout) and a contiguous copy give the same bits."""
    q, k, cos, sin, dq, dk = make_inputs(2, 5, torch.float32, seed=4)
    assert not q.is_contiguous()
    for name, a, b in zip(NAMES, run(rope, q, k, cos, sin, dq, dk), run(rope, q.contiguous(), k, cos, sin, dq, dk)):
        assert_bitwise_equal(a, b, name)
    # a last dim that is not contiguous is copied first
    q_odd = q.contiguous().flip(-1).flip(-1)
    q_strided = torch.stack([q_odd, q_odd], dim=-1)[..., 0]
    assert q_strided.stride(-1) != 1
    assert_bitwise_equal(rope(q_strided, k, cos, sin)[0], rope(q.contiguous(), k, cos, sin)[0], "strided last dim")


def test_mixed_table_dtype_follows_eager_promotion():
    """bf16 q/k with float32 tables: float32 outputs like eager's promotion, bf16 gradients."""
    q, k, _, _, dq, dk = make_inputs(2, 5, torch.bfloat16, seed=5)
    cos, sin = tables(2, 5, torch.float32, seed=6)
    eager = run(eager_rope, q, k, cos, sin, dq.float(), dk.float())
    out = run(rope, q, k, cos, sin, dq.float(), dk.float())
    for name, a, e in zip(NAMES, out, eager):
        assert a.dtype == e.dtype, f"{name}: {a.dtype} vs eager {e.dtype}"
    # Float32 outputs from bf16 inputs: the only roundings are float32 ones.
    assert torch.allclose(out[0], eager[0], rtol=1e-6, atol=1e-6), mismatch(out[0], eager[0])


def test_tables_requiring_grad_are_refused():
    q, k, cos, sin, _, _ = make_inputs(1, 3, torch.float32)
    with pytest.raises(ValueError, match="gives cos/sin no gradient"):
        rope(q, k, cos.requires_grad_(True), sin)
    with torch.no_grad():
        rope(q, k, cos, sin)  # fine without grad


def _bad(q=(2, HQ, 5, D), k=(2, HKV, 5, D), cos=(1, 5, D), sin=None, dtype=torch.float32, kdtype=None,
         cdtype=None):
    return (torch.zeros(q, dtype=dtype), torch.zeros(k, dtype=kdtype or dtype),
            torch.zeros(cos, dtype=cdtype or dtype), torch.zeros(sin or cos, dtype=cdtype or dtype))


@pytest.mark.parametrize("args, error, message", [
    (lambda: _bad(dtype=torch.float64), TypeError, "q has dtype torch.float64"),
    (lambda: _bad(kdtype=torch.float16), TypeError, "k dtype torch.float16 differs"),
    (lambda: _bad(cdtype=torch.int64), TypeError, "cos and sin must share"),
    (lambda: _bad(q=(2, 5, D)), ValueError, "must be 4-D"),
    (lambda: _bad(k=(2, HKV, 4, D)), ValueError, r"k must be \(B=2, Hkv, S=5, D=16\)"),
    (lambda: _bad(q=(2, HQ, 5, 15), k=(2, HKV, 5, 15), cos=(1, 5, 15)), ValueError, "must be a positive even number"),
    (lambda: _bad(cos=(3, 5, D)), ValueError, r"cos and sin must both be \(2 or 1, S=5, D=16\)"),
    (lambda: _bad(sin=(1, 4, D)), ValueError, "cos and sin must both be"),
    (lambda: _bad(q=(1, 512, 1, 128), k=(1, 1, 1, 128), cos=(1, 1, 128)), ValueError, "exceeds the limit of 16384"),
], ids=["dtype", "k-dtype", "table-dtype", "q-dims", "k-shape", "odd-d", "table-batch", "sin-shape", "too-big"])
def test_bad_inputs_raise_clear_errors(args, error, message):
    q, k, cos, sin = (t.to(DEVICE) for t in args())
    with pytest.raises(error, match=message):
        rope(q, k, cos, sin)


def test_registry_entry():
    b = REGISTRY.get("rope", "triton")
    assert (b.deterministic, b.twin, b.origin) == (True, None, "built-in")
    assert b.is_available(DEVICE) and REGISTRY.resolve("rope", "triton", DEVICE) is rope
