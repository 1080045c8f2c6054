"""Test-session set-up, and the fixtures more than one test module uses.

Without a CUDA device the Triton kernels run through the Triton interpreter, which must be switched
on before any ``@triton.jit`` function is defined, i.e. before ``kernels`` is first imported. This is
the test session's choice (set here, once, for the whole run); the library itself never sets it.

Helpers that are plain functions or classes live in modules that are not test modules
(tests/kernel_checks.py, tests/hf_twins.py, tests/planted_checks.py); no test module imports another.
"""

import builtins
import os

import pytest
import torch

from bench import subjects

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Shrunk ``--quick`` shapes for the harness tests (tests/test_harness.py, tests/test_harness_cli.py), so
# a whole matrix runs in seconds on one core.
SMALL_SHAPES = {
    "rmsnorm": (160,), "rope": (4, 16), "attention": (4, 16), "attention-block": (4, 16), "mlp": (160,),
    "decoder-layer": (4, 16), "lm-head-loss": (160,), "embedding": (4, 16), "linear": (160,),
}


@pytest.fixture
def small_shapes(monkeypatch):
    """``--quick`` runs use SMALL_SHAPES and a short K for the linear subject, for this test only."""

    monkeypatch.setitem(subjects.SIZES, "quick", dict(SMALL_SHAPES))
    monkeypatch.setattr(subjects, "QUICK_LINEAR_K", 256)


@pytest.fixture
def half_imported_inductor(monkeypatch):
    """What Ctrl-C inside ``torch.use_deterministic_algorithms`` while a mode is entered leaves behind, once
    ``state["armed"]`` is set: that call raises KeyboardInterrupt once, and from then on every import of
    ``torch._inductor`` fails as a half-imported package does (AttributeError: module 'torch._dynamo' has no
    attribute 'utils').

    Where the interrupt lands depends on the torch version, the way a real Ctrl-C's would. A torch whose
    ``use_deterministic_algorithms`` imports ``torch._inductor.config`` (2.11 does) is interrupted in that
    import, before the flag changes. One that imports nothing there (2.6) is interrupted as the call returns,
    after the flag changed. Either way ``apply_mode`` sees a KeyboardInterrupt out of the call it makes while
    entering, and its rollback must restore everything without importing anything or calling
    ``use_deterministic_algorithms`` again (which also fails once armed and interrupted, on every torch)."""
    real_import = builtins.__import__
    real_use_deterministic_algorithms = torch.use_deterministic_algorithms
    state = {"armed": False, "interrupted": 0, "failed": 0}

    def interrupt():
        state["interrupted"] += 1
        raise KeyboardInterrupt

    def half_imported():
        state["failed"] += 1
        raise AttributeError("module 'torch._dynamo' has no attribute 'utils'")

    def fake_import(name, *args, **kwargs):
        if state["armed"] and name.startswith("torch._inductor"):
            if not state["interrupted"]:
                interrupt()
            half_imported()
        return real_import(name, *args, **kwargs)

    def use_deterministic_algorithms(mode, *, warn_only=False):
        if state["armed"] and state["interrupted"]:  # fails after the interrupt on every torch, as it does on 2.11
            half_imported()
        real_use_deterministic_algorithms(mode, warn_only=warn_only)
        if state["armed"] and not state["interrupted"]:  # this torch imported nothing the trap could catch
            interrupt()

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", use_deterministic_algorithms)
    yield state
    state["armed"] = False  # before the teardown of fixtures set up earlier (which may reset torch's flags)
