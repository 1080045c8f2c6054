"""kernels/swiglu.py: accuracy against float64, run-to-run bits, batch invariance, bad inputs.

SwiGLU is elementwise, so it has no reduction and no atomic twin; the repeat check's negative
control lives with the ops that reduce (tests/test_kernel_rmsnorm.py).
"""

from __future__ import annotations

import pytest
import torch

from bench.compare import assert_bitwise_equal, mismatch
from qwen_layers.backends import eager_swiglu
from qwen_layers.registry import REGISTRY

from . import kernel_checks as kc
from .kernel_checks import DEVICE, assert_batch_invariant, assert_repeats_bitwise

pytest.importorskip("triton", reason="package triton not installed (Linux only)")

from kernels.swiglu import SwiGLUConfig, swiglu  # noqa: E402

pytestmark = kc.requires_triton

WIDTH = 37  # odd: the last block is partly masked
NAMES = ("y", "dgate", "dup")
SMALL = SwiGLUConfig(block=64, num_warps=4)  # several programs even for a few rows

# Allowed error = FACTOR x (eager's error in the same dtype) + FLOOR ulps at the reference's largest
# magnitude, against float64. Kernel and eager round silu(gate) and the product at the same points;
# they differ in how sigmoid/exp are evaluated (a few float32 ulps, invisible after a 16-bit rounding)
# and, for the gradients, in keeping float32 where eager rounds (dy * up). Reasons per dtype:
# - float32: the float32 sigmoid differs by a few ulps; eager's own error can be ~0: floor 8 ulps.
# - float16: 2x eager + 1 ulp covers the final rounding.
# - bfloat16: as float16; the Triton CPU interpreter truncates float32 -> bf16 instead of rounding
#   to nearest (triton/runtime/interpreter.py, _convert_float), up to twice the rounding error.
TOLERANCE = {torch.float32: (2.0, 8.0), torch.float16: (2.0, 1.0), torch.bfloat16: (2.0, 1.0)}


def assert_close_to_reference(out, ref64, eager, what):
    factor, floor_ulps = TOLERANCE[out.dtype]
    kc.assert_close_to_reference(out, ref64, eager, what, factor=factor, floor_ulps=floor_ulps)


def make_inputs(rows, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up, dy = (3 * torch.randn(rows, WIDTH, generator=g) for _ in range(3))  # wide: both sigmoid tails
    return gate.to(DEVICE, dtype), up.to(DEVICE, dtype), dy.to(DEVICE, dtype)


def run(fn, gate, up, dy, **kw):
    """Output, d gate and d up of ``fn`` for upstream gradient ``dy``."""
    return kc.forward_backward(fn, (gate, up), dy, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 17, 127])
def test_matches_float64_reference(dtype, rows):
    gate, up, dy = make_inputs(rows, dtype)
    ref = run(eager_swiglu, gate.double(), up.double(), dy.double())
    eager = run(eager_swiglu, gate, up, dy)
    for name, out, r, e in zip(NAMES, run(swiglu, gate, up, dy), ref, eager):
        assert out.dtype == e.dtype, name
        assert_close_to_reference(out, r, e, f"{name} {dtype} rows={rows}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_repeats_are_bitwise_equal(dtype):
    """20 runs, fixed upstream gradient: y, d gate and d up bitwise equal to the first run."""
    gate, up, dy = make_inputs(17, dtype, seed=1)
    assert_repeats_bitwise(lambda: run(swiglu, gate, up, dy, config=SMALL), NAMES, "swiglu/triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_are_batch_invariant(dtype):
    """Outputs and gradients of the first k of 127 rows are bitwise those of the k rows alone."""
    gate, up, dy = make_inputs(127, dtype, seed=2)
    assert_batch_invariant(lambda rows: run(swiglu, gate[rows], up[rows], dy[rows], config=SMALL),
                           [slice(0, k) for k in (1, 3, 17)], NAMES, "swiglu/triton")


def test_non_contiguous_inputs_give_the_same_bits():
    gate, up, dy = make_inputs(6, torch.float32, seed=3)
    gate_t, up_t = gate.t().contiguous().t(), up.t().contiguous().t()  # column-major copies
    assert not gate_t.is_contiguous()
    for name, a, b in zip(NAMES, run(swiglu, gate, up, dy), run(swiglu, gate_t, up_t, dy.t().t())):
        assert_bitwise_equal(a, b, name)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_empty_and_special_values():
    """Empty input; zeros, large and infinite gates give eager's values (NaN where eager's is NaN)."""
    assert swiglu(torch.empty(0, 4, device=DEVICE), torch.empty(0, 4, device=DEVICE)).shape == (0, 4)
    x = torch.tensor([0.0, -0.0, 100.0, -100.0, float("inf"), float("-inf")], device=DEVICE)
    y = swiglu(x, torch.ones_like(x))
    e = eager_swiglu(x, torch.ones_like(x))
    assert torch.equal(torch.isnan(y), torch.isnan(e)), mismatch(y, e)
    finite = torch.isfinite(e)
    assert torch.allclose(y[finite], e[finite], rtol=1e-6, atol=0), mismatch(y, e)


@pytest.mark.parametrize("args, error, message", [
    (lambda: (torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)), TypeError,
     "gate has dtype torch.float64"),
    (lambda: (torch.zeros(4), torch.zeros(4, dtype=torch.float16)), TypeError, "up dtype torch.float16 differs"),
    (lambda: (torch.zeros(2, 4), torch.zeros(1, 4)), ValueError, "same shape"),
    (lambda: (torch.zeros(4).tolist(), torch.zeros(4)), TypeError, "must be tensors"),
], ids=["dtype", "dtype-mismatch", "broadcast", "not-tensor"])
def test_bad_inputs_raise_clear_errors(args, error, message):
    gate, up = (t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in args())
    with pytest.raises(error, match=message):
        swiglu(gate, up)


def test_registry_entry():
    b = REGISTRY.get("swiglu", "triton")
    assert (b.deterministic, b.twin, b.origin) == (True, None, "built-in")
    assert b.is_available(DEVICE) and REGISTRY.resolve("swiglu", "triton", DEVICE) is swiglu
