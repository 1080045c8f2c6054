"""Where detbench's Triton kernels can run, and why not: kernels._common."""

from __future__ import annotations

import pytest
import torch

from kernels import _common


@pytest.mark.parametrize("triton, numpy, broken", [
    ("3.2.0", "2.4.0", True), ("3.6.0", "2.5.2", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False), ("3.8.0", "2.4.6", False), ("3.6.0+git1234", "2.4.0rc1", True),
])
def test_interpreter_conflict_with_numpy_2_4(triton, numpy, broken):
    reason = _common.interpreter_conflict(triton, numpy)
    assert (reason is not None) == broken
    if broken:
        assert "pip install 'numpy<2.4'" in reason and triton in reason


def test_the_cpu_interpreter_refuses_a_conflicting_numpy_with_the_fix(monkeypatch):
    if not _common.INTERPRET:
        pytest.skip("the kernels were defined for CUDA in this process (TRITON_INTERPRET unset)")
    versions = {"triton": "3.6.0", "numpy": "2.4.1"}
    monkeypatch.setattr(_common, "_version", versions.__getitem__)
    assert "breaks on numpy 2.4.1" in _common.triton_available(torch.device("cpu"))
    versions["numpy"] = "2.3.5"
    assert _common.triton_available(torch.device("cpu")) is None
