"""Bitwise comparison: NaN payloads, signed zeros, ULP distance, mismatch reports."""

from __future__ import annotations

import pytest
import torch

from bench.compare import assert_bitwise_equal, bitwise_equal, mismatch, ordered, ulp_distance

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
def test_negative_zero_differs(dtype):
    a, b = torch.tensor([0.0], dtype=dtype), torch.tensor([-0.0], dtype=dtype)
    assert torch.equal(a, b)  # value equality cannot see it ...
    assert not bitwise_equal(a, b)  # ... bits can
    assert ulp_distance(a, b).item() == 1


@pytest.mark.parametrize("dtype", FLOATS)
def test_nan_payloads(dtype):
    nan = torch.tensor([float("nan")], dtype=dtype)
    assert bitwise_equal(nan, nan.clone())  # same NaN bits are the same result
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[nan.element_size()]
    other = (nan.view(ints) + 1).view(dtype)  # another quiet NaN payload
    assert torch.isnan(other).all()
    assert not bitwise_equal(nan, other)
    m = mismatch(nan, other)
    assert m.n_diff == 1 and m.nan_a == 1 and m.nan_b == 1


def test_ulp_is_monotonic_across_zero():
    x = torch.tensor([-2.0, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 2.0])
    o = ordered(x)
    assert torch.all(o[1:] > o[:-1])
    assert ulp_distance(torch.tensor([1.0]), torch.nextafter(torch.tensor([1.0]), torch.tensor([2.0]))).item() == 1


def test_mismatch_report():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = a.clone()
    b[2, 1] += 0.5
    b[0, 3] = float("inf")
    m = mismatch(a, b)
    assert not m.equal and m.n_diff == 2 and m.inf_b == 1
    assert m.worst[0]["index"] == [0, 3]  # the non-finite disagreement ranks first
    assert m.max_abs == 0.5
    text = str(m)
    assert "2/12 elements differ" in text and "inf" in text
    with pytest.raises(AssertionError, match="2/12 elements differ"):
        assert_bitwise_equal(a, b, "demo")
    assert mismatch(a, a.clone()).equal


def test_shape_and_dtype_mismatch():
    assert not bitwise_equal(torch.zeros(2), torch.zeros(3))
    assert not bitwise_equal(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(AssertionError, match="shape/dtype differ"):
        assert_bitwise_equal(torch.zeros(2), torch.zeros(3))


def test_integer_tensors():
    a = torch.tensor([1, 2, 3])
    assert bitwise_equal(a, a.clone())
    m = mismatch(a, torch.tensor([1, 5, 3]))
    assert m.n_diff == 1 and m.max_abs == 3
