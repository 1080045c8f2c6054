"""Test-session set-up.

Without a CUDA device the Triton kernels run through the Triton interpreter, which must be switched
on before any ``@triton.jit`` function is defined, i.e. before ``kernels`` is first imported. This is
the test session's choice (set here, once, for the whole run); the library itself never sets it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
