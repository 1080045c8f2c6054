"""kernels/rmsnorm.py: accuracy against float64, run-to-run bits, batch invariance, dW order, bad inputs.

On a CPU-only machine the kernels run in the Triton interpreter (tests/conftest.py sets it), which
runs programs one after another: there the atomic twin is deterministic too, so it is checked for
correctness only. The negative control for the repeat check is the planted random-order dW backend.
"""

from __future__ import annotations

import pytest
import torch

from bench.compare import assert_bitwise_equal
from bench.planted import rmsnorm_nondet_dw
from qwen_layers.backends import eager_rmsnorm
from qwen_layers.registry import REGISTRY

from . import kernel_checks as kc
from .kernel_checks import DEVICE, REPEATS, assert_batch_invariant, assert_repeats_bitwise, repeat_mismatches

pytest.importorskip("triton", reason="package triton not installed (Linux only)")

from kernels.rmsnorm import CONFIG, RMSNormConfig, rmsnorm, rmsnorm_atomic  # noqa: E402

pytestmark = kc.requires_triton

N = 40  # not a power of two: the column mask is exercised
EPS = 1e-6
NAMES = ("y", "dx", "dW")
# Small chunks so that a few dozen rows exercise several backward programs and several reduction levels.
SMALL = RMSNormConfig(rows_per_program=4, reduce_chunk=3, reduce_block_n=16)

# Allowed error = FACTOR x (eager's error in the same dtype) + FLOOR ulps at the reference's largest
# magnitude, both against the float64 reference. Reasons:
# - float32: the kernel sums x^2 (and the dx/dW terms) in another order than PyTorch and uses Triton's
#   rsqrt, each a few ulps off; eager's own error can be exactly 0 (dx), so a floor of 8 ulps is needed.
# - float16: the kernel keeps float32 where eager rounds to fp16 (dy * w, dy * h), so it is usually
#   closer than eager; 2x eager + 1 ulp covers the one rounding both do at the end.
# - bfloat16: as float16, but the Triton 3.x CPU interpreter truncates float32 -> bf16 instead of
#   rounding to nearest (triton/runtime/interpreter.py, _convert_float), which can double the final
#   rounding error; 2x eager + 1 ulp still bounds it (on a GPU the cast rounds to nearest).
TOLERANCE = {torch.float32: (2.0, 8.0), torch.float16: (2.0, 1.0), torch.bfloat16: (2.0, 1.0)}


def assert_close_to_reference(out, ref64, eager, what, rounding_dtype=None):
    """``rounding_dtype``: the dtype whose rounding dominates the error (default: the output's)."""
    rounding_dtype = rounding_dtype or out.dtype
    factor, floor_ulps = TOLERANCE[rounding_dtype]
    kc.assert_close_to_reference(out, ref64, eager, what, factor=factor, floor_ulps=floor_ulps,
                                 rounding_dtype=rounding_dtype)


def make_inputs(rows, dtype, wdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, N, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(DEVICE, wdtype or dtype)
    out_dtype = torch.promote_types(dtype, wdtype or dtype)
    dy = torch.randn(rows, N, generator=g).to(DEVICE, out_dtype)
    return x, w, dy


def run(fn, x, w, dy, **kw):
    """Output, dx and dW of ``fn`` for upstream gradient ``dy``."""
    return kc.forward_backward(fn, (x, w), dy, EPS, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 17, 127])
def test_matches_float64_reference(dtype, rows):
    x, w, dy = make_inputs(rows, dtype)
    ref = run(eager_rmsnorm, x.double(), w.double(), dy.double())
    eager = run(eager_rmsnorm, x, w, dy)
    for name, out, r, e in zip(NAMES, run(rmsnorm, x, w, dy), ref, eager):
        assert out.dtype == e.dtype, name
        assert_close_to_reference(out, r, e, f"{name} {dtype} rows={rows}")


def test_mixed_dtypes_follow_eager_promotion():
    """bf16 activations with a float32 weight: float32 output, bf16 dx, float32 dW, as eager gives."""
    x, w, dy = make_inputs(17, torch.bfloat16, torch.float32)
    eager = run(eager_rmsnorm, x, w, dy)
    ref = run(eager_rmsnorm, x.double(), w.double(), dy.double())
    for name, out, r, e in zip(NAMES, run(rmsnorm, x, w, dy), ref, eager):
        assert out.dtype == e.dtype, f"{name}: {out.dtype} vs eager {e.dtype}"
        # The float32 y and dW inherit the bf16 rounding of h = cast(x * rstd): judged as bf16 results.
        assert_close_to_reference(out, r, e, name, rounding_dtype=torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_repeats_are_bitwise_equal(dtype):
    """20 runs, fixed upstream gradient: y, dx and dW bitwise equal to the first run."""
    x, w, dy = make_inputs(29, dtype, seed=3)  # 8 backward programs, two reduction levels with SMALL
    assert_repeats_bitwise(lambda: run(rmsnorm, x, w, dy, config=SMALL), NAMES, "rmsnorm/triton")


def test_repeat_check_catches_planted_nondeterministic_dw():
    """Negative control: the same check flags a backend whose dW sums row chunks in random order."""
    x, w, dy = make_inputs(127, torch.float32, seed=3)
    found = repeat_mismatches(lambda: run(rmsnorm_nondet_dw, x, w, dy), NAMES)
    assert any(" dW:" in f for f in found), f"planted dW nondeterminism not caught in {REPEATS} repeats"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_are_batch_invariant(dtype):
    """y[:k] and dx[:k] of a 127-row batch are bitwise those of the first k rows alone."""
    x, w, dy = make_inputs(127, dtype, seed=4)
    # dW sums over the rows: it depends on the batch by nature, so only y and dx are compared.
    assert_batch_invariant(lambda rows: run(rmsnorm, x[rows], w, dy[rows]), [slice(0, k) for k in (1, 3, 17)],
                           NAMES, "rmsnorm/triton", compared=("y", "dx"))


@pytest.mark.parametrize("config", [CONFIG, SMALL], ids=["default", "small-chunks"])
def test_dw_unchanged_by_zero_gradient_rows(config):
    """Appending rows with zero upstream gradient grows the launch grid but leaves dW bitwise equal.

    With the default config 17 rows are one backward program and 17 + 150 rows are six (and a
    reduction level appears); with the small config the reduction tree gains levels. Each row's
    contribution is still added in the same place of the same fixed order, plus exact zeros.
    """
    x, w, dy = make_inputs(17, torch.float32, seed=5)
    x_pad, _, _ = make_inputs(150, torch.float32, seed=6)
    x_big = torch.cat([x, x_pad])
    dy_big = torch.cat([dy, torch.zeros(150, N, device=DEVICE)])
    _, dx, dw = run(rmsnorm, x, w, dy, config=config)
    _, dx_big, dw_big = run(rmsnorm, x_big, w, dy_big, config=config)
    assert_bitwise_equal(dw, dw_big, "dW, 17 rows vs the same rows + 150 zero-gradient rows")
    assert_bitwise_equal(dx, dx_big[:17], "dx of the first 17 rows")


def test_dw_fixed_order_matches_float64_with_many_partials():
    """Several reduction levels (300 rows, 4-row chunks, 3-partial chunks): dW still close to float64."""
    x, w, dy = make_inputs(300, torch.float32, seed=7)
    ref = run(eager_rmsnorm, x.double(), w.double(), dy.double())[2]
    eager = run(eager_rmsnorm, x, w, dy)[2]
    assert_close_to_reference(run(rmsnorm, x, w, dy, config=SMALL)[2], ref, eager, "dW, small chunks")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_atomic_twin_is_correct(dtype):
    """Correctness only: the interpreter runs programs in order, so the twin's nondeterminism needs a GPU."""
    x, w, dy = make_inputs(67, dtype, seed=8)
    ref = run(eager_rmsnorm, x.double(), w.double(), dy.double())
    eager = run(eager_rmsnorm, x, w, dy)
    for name, out, r, e in zip(NAMES, run(rmsnorm_atomic, x, w, dy, config=SMALL), ref, eager):
        assert_close_to_reference(out, r, e, f"atomic twin {name}")


def test_non_contiguous_input_gives_the_same_bits():
    """A transposed view is copied to contiguous rows first: same bits as the contiguous input."""
    x, w, dy = make_inputs(6, torch.float32, seed=9)
    xt = x.t().contiguous().t()  # same values, column-major storage
    assert not xt.is_contiguous()
    for name, a, b in zip(NAMES, run(rmsnorm, x, w, dy), run(rmsnorm, xt, w, dy)):
        assert_bitwise_equal(a, b, name)
    x3 = torch.randn(2, 5, N, device=DEVICE)
    assert_bitwise_equal(rmsnorm(x3[:, ::2], w, EPS), rmsnorm(x3[:, ::2].contiguous(), w, EPS), "strided rows")


def test_leading_dims_and_empty_input():
    x = torch.randn(2, 3, N, device=DEVICE)
    w = torch.ones(N, device=DEVICE)
    assert_bitwise_equal(rmsnorm(x, w, EPS).reshape(6, N), rmsnorm(x.reshape(6, N), w, EPS), "3-D vs 2-D")
    assert rmsnorm(torch.empty(0, N, device=DEVICE), w, EPS).shape == (0, N)


@pytest.mark.parametrize("args, error, message", [
    (lambda: (torch.zeros(2, 4, dtype=torch.float64), torch.ones(4), EPS), TypeError, "x has dtype torch.float64"),
    (lambda: (torch.zeros(2, 4), torch.ones(4, dtype=torch.int32), EPS), TypeError, "weight has dtype torch.int32"),
    (lambda: (torch.zeros(2, 4), torch.ones(5), EPS), ValueError, r"weight must have shape \(4,\)"),
    (lambda: (torch.zeros(2, 0), torch.ones(0), EPS), ValueError, "non-empty last dim"),
    (lambda: (torch.zeros(2, 4), torch.ones(4), -1.0), ValueError, "eps must be a non-negative float"),
    (lambda: (torch.zeros(1, 70000), torch.ones(70000), EPS), ValueError, "exceed the single-block limit"),
    (lambda: ([[0.0]], torch.ones(1), EPS), TypeError, "must be tensors"),
], ids=["x-dtype", "w-dtype", "w-shape", "empty-row", "eps", "too-wide", "not-tensor"])
def test_bad_inputs_raise_clear_errors(args, error, message):
    x, w, eps = args()
    x = x.to(DEVICE) if isinstance(x, torch.Tensor) else x
    with pytest.raises(error, match=message):
        rmsnorm(x, w.to(DEVICE), eps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to hold tensors on two devices")
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        rmsnorm(torch.zeros(2, 4, device="cuda"), torch.ones(4), EPS)


def test_registry_entries():
    det, _ = kc.assert_twin_entries("rmsnorm")
    assert det.is_available(DEVICE) and REGISTRY.resolve("rmsnorm", "triton", DEVICE) is rmsnorm
