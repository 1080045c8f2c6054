"""The Triton linear kernels: accuracy, run-to-run bitwise equality, batch invariance, input checks.

Without CUDA the kernels run through the Triton interpreter (tests/conftest.py), which runs programs
one after another: there the atomic twin is deterministic too, so its tests check correctness only.
The negative controls for the determinism and batch-invariance checks are the planted backends
(bench.planted), which change their reduction order on every call / with the batch size.

bfloat16 is tested only on CUDA: ``tl.dot`` on bfloat16 is broken in the interpreter (triton issue
11584).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.compare import assert_bitwise_equal
from bench.planted import linear_batch_variant, linear_nondet_bwd
from kernels import matmul as mm
from qwen_layers.registry import REGISTRY

from . import kernel_checks as kc
from .kernel_checks import DEVICE, REPEATS, assert_each_raises, assert_repeats_bitwise, repeat_mismatches

pytestmark = kc.requires_triton

DTYPES = kc.DOT_DTYPES  # bfloat16 on CUDA only (tl.dot)
K, N = 72, 72  # neither a multiple of any block_k / block_n in CONFIGS (block_k 16 or 64, block_n 64 to 256)
# A tile small enough that these sizes span many output tiles, K steps and row tiles.
SMALL_TILES = mm.TileConfig(16, 16, 16, 2, num_warps=2, num_stages=2, input_precision="ieee",
                            split_k=3, sum_block_m=16, sum_block_n=16)


def make(m: int, dtype: torch.dtype, k: int = K, n: int = N, seed: int = 0, bias: bool = True):
    """Seeded inputs (drawn in float32 on the CPU, then cast and moved) and a fixed upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) if bias else None
    g = torch.randn(m, n, generator=gen)
    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(g)


def run(fn, x, w, b, g):
    """Forward and backward once: (y, dx, dw[, db]) as detached tensors."""
    return kc.forward_backward(fn, (x, w) + ((b,) if b is not None else ()), g)


NAMES = ("y", "dx", "dw", "db")


def assert_close_to_reference(got, eager, ref, what: str):
    """Error vs the float64 reference at most 2x eager's error in the same dtype, plus 2 ulp of the max.

    The factor 2: kernel and eager both accumulate in (at least) float32 and round once to the dtype,
    but in different orders, so either may land one rounding step away from the other. The floor:
    on these tiny sizes eager is sometimes exact by luck, and one rounding step of the output dtype at
    the largest magnitude is the least any implementation can promise.
    """
    kc.assert_close_to_reference(got, ref, eager, what, factor=2.0, floor_ulps=2.0)


@pytest.mark.parametrize("backend", ["triton", "triton-atomic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17, 127])
def test_accuracy_vs_float64(backend, dtype, m):
    fn = REGISTRY.resolve("linear", backend, DEVICE)
    x, w, b, g = make(m, dtype)
    got = run(fn, x, w, b, g)
    eager = run(F.linear, x, w, b, g)
    ref = run(F.linear, x.double(), w.double(), b.double(), g.double())
    for name, a, e, r in zip(NAMES, got, eager, ref):
        assert a.dtype == dtype and a.shape == r.shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        assert_close_to_reference(a, e, r, f"{backend} {dtype} m={m} {name}")


@pytest.mark.slow
def test_small_tiles_many_programs():
    """A 16x16x16 tile: many output tiles, several K steps with a tail, dW over 8 row tiles."""
    cfg = SMALL_TILES
    x, w, b, g = make(127, torch.float32)
    eager = run(F.linear, x, w, b, g)
    ref = run(F.linear, x.double(), w.double(), b.double(), g.double())
    for fn in (mm.linear, mm.linear_atomic):
        got = run(lambda *a: fn(*a, config=cfg), x, w, b, g)
        for name, a, e, r in zip(NAMES, got, eager, ref):
            assert_close_to_reference(a, e, r, f"{fn.__name__} small tiles {name}")


def test_leading_dims_no_bias_and_non_contiguous():
    """x (..., K) is flattened; bias is optional; a non-contiguous x gives the bits of its copy."""
    x, w, _, _ = make(24, torch.float32, bias=False)
    x3 = x.reshape(2, 12, K)
    y3 = mm.linear(x3, w)
    assert y3.shape == (2, 12, N)
    assert_bitwise_equal(y3.reshape(24, N), mm.linear(x, w), "3-D x vs its 2-D rows")
    xt = x.t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous()
    assert_bitwise_equal(mm.linear(xt, w), mm.linear(x, w), "non-contiguous x vs contiguous copy")
    wt = w.t().contiguous().t()
    assert_bitwise_equal(mm.linear(x, wt), mm.linear(x, w), "non-contiguous weight vs contiguous copy")


# -------------------------------------------------------------------------------------------------
# run-to-run: 20 repeats with a fixed upstream gradient, every output bitwise
# -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_run_to_run_bitwise(dtype):
    x, w, b, g = make(127, dtype)
    assert_repeats_bitwise(lambda: run(mm.linear, x, w, b, g), NAMES, "linear/triton")


def test_run_to_run_check_catches_planted_nondeterminism():
    """Negative control: the same check flags a linear whose dW sums row chunks in random order."""
    x, w, _, g = make(127, torch.float32, bias=False)
    found = repeat_mismatches(lambda: run(linear_nondet_bwd, x, w, None, g), NAMES)
    assert any(" dw:" in f for f in found), f"planted dW nondeterminism not caught in {REPEATS} repeats"


# -------------------------------------------------------------------------------------------------
# batch invariance: rows computed alone vs inside a larger batch
#
# Eager (cuBLAS / CPU BLAS) picks its kernel and split from the problem shape, so its rows may or may
# not change with the batch; that is measured by the harness, not asserted here.
# -------------------------------------------------------------------------------------------------


def batch_variance(fn, x, w, b, g, rows_list) -> list[str]:
    """Differences between rows computed within the whole batch and the same rows computed alone."""
    # dW and db sum over the rows: they depend on the batch by nature, so only y and dx are compared.
    return kc.batch_variance(lambda rows: run(fn, x[rows], w, b, g[rows]), rows_list, NAMES, ("y", "dx"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["pinned", "16x16x16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariance(dtype, config):
    """Rows alone and in a batch of 131 (128 + 3): the first, the first three, three rows starting a later
    output tile, all but two; on a GPU also rows 5-7, which sit at tile positions 5-7 in the batch and 0-2
    alone. The interpreter runs a tile's tl.dot as the host BLAS's matmul of the tile, whose last bits may
    depend on a row's position in it (OpenBLAS on this project's AMD EPYC machines: rows 5-7 of a 16 x 16
    x 16 product differ from the same rows computed at 0-2) - the emulation's property, not the kernel's:
    there the rows compared keep their tile positions."""
    cfg = {"pinned": None, "16x16x16": SMALL_TILES}[config]
    fn = lambda *a: mm.linear(*a, config=cfg)  # noqa: E731
    x, w, b, g = make(131, dtype)
    block_m = (cfg or mm.config_for(dtype, mm.device_capability(DEVICE))).block_m
    rows = [slice(0, 1), slice(0, 3), slice(block_m, block_m + 3), slice(0, 129)]
    if DEVICE.type == "cuda":
        rows.append(slice(5, 8))
    found = batch_variance(fn, x, w, b, g, rows)
    assert not found, "linear/triton is batch-variant:\n" + "\n".join(found)


def test_batch_invariance_check_catches_planted_batch_variance():
    """Negative control: the same check flags a linear whose K-chunking depends on the row count."""
    x, w, b, g = make(131, torch.float32)
    found = batch_variance(linear_batch_variant, x, w, b, g, [slice(0, 3)])
    assert any(f.startswith("y[") for f in found), "planted batch variance not caught"


# -------------------------------------------------------------------------------------------------
# registry entries and input checks
# -------------------------------------------------------------------------------------------------


def test_registry_entries():
    kc.assert_twin_entries("linear")


@pytest.mark.parametrize("case, error, message", [
    ("int x", TypeError, "supports float16, bfloat16 and float32"),
    ("weight dtype", TypeError, "weight dtype torch.float16 differs from x dtype torch.float32"),
    ("bias dtype", TypeError, "bias dtype torch.float16 differs"),
    ("weight 1-D", ValueError, "weight must be 2-D"),
    ("K mismatch", ValueError, "x's last dim must equal weight.shape[1] = 8"),
    ("bias shape", ValueError, "bias must have shape (4,)"),
    ("two devices", ValueError, "all tensors must be on one device"),
    ("no triton device", RuntimeError, "linear (triton) cannot run on meta"),
])
def test_bad_inputs(case, error, message):
    x, w, b = torch.randn(3, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE), torch.randn(4, device=DEVICE)
    args = {
        "int x": (x.to(torch.int32), w, b),
        "weight dtype": (x, w.half(), b),
        "bias dtype": (x, w, b.half()),
        "weight 1-D": (x, w[0], b),
        "K mismatch": (torch.randn(3, 5, device=DEVICE), w, b),
        "bias shape": (x, w, b[:3]),
        "two devices": (x, w.to("meta"), b),
        "no triton device": (x.to("meta"), w.to("meta"), b.to("meta")),
    }[case]
    assert_each_raises((mm.linear, mm.linear_atomic), args, error, message)
