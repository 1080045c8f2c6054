"""Triton SwiGLU for the ``swiglu`` op: ``silu(gate) * up``, forward and backward fused.

``swiglu(gate, up) -> silu(gate) * up`` for two tensors of one shape (no broadcasting) and one dtype
(float32, float16 or bfloat16). Arithmetic is float32 inside; ``silu(gate)`` is rounded to the input
dtype before the product, as eager ``F.silu(gate) * up`` rounds it, so the kernel and eager round at
the same points. The backward computes both gradients in one pass from the saved inputs:

    d gate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
    d up   = dy * silu(gate)

Every output element is a function of the same-index input elements alone (no reduction anywhere),
so the results are deterministic and batch-invariant by construction and there is no atomic twin:
there is nothing for atomics to add up. Only backend ``triton`` is registered.

The tensors are flattened; inputs (and the upstream gradient) that are not contiguous are copied to
contiguous memory first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import _common

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency; the registry says why
    triton = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SwiGLUConfig:
    """The pinned launch configuration (elementwise: it changes speed only, never a result bit)."""

    block: int = 2048  # elements per program
    num_warps: int = 8  # H200: 2048 elements / 256 threads = 8 per thread, 16-byte bf16 vector loads

    def to_dict(self) -> dict:
        return asdict(self)


CONFIG = SwiGLUConfig()

# -------------------------------------------------------------------------------------------------
# forward kernel
# -------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(
        gate_ptr,  # gate (n,), contiguous
        up_ptr,  # up (n,), contiguous
        y_ptr,  # output (n,), same dtype
        n,
        BLOCK: tl.constexpr,
    ):
        """One block of elements per program: y = round(silu(gate)) * up, float32 inside."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(gate_ptr.dtype.element_ty).to(tl.float32)  # eager rounds silu(gate)
        tl.store(y_ptr + offs, (act * u).to(y_ptr.dtype.element_ty), mask=mask)

    # ---------------------------------------------------------------------------------------------
    # backward kernel
    # ---------------------------------------------------------------------------------------------

    @triton.jit
    def _swiglu_bwd_kernel(
        dy_ptr,  # upstream gradient (n,), contiguous
        gate_ptr,  # saved gate (n,)
        up_ptr,  # saved up (n,)
        dgate_ptr,  # d gate (n,), gate's dtype
        dup_ptr,  # d up (n,), up's dtype
        n,
        BLOCK: tl.constexpr,
    ):
        """Both input gradients of one block of elements, recomputing sigmoid(gate)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        act = (g * sig).to(gate_ptr.dtype.element_ty).to(tl.float32)  # the value the forward multiplied
        dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dup_ptr + offs, (dy * act).to(dup_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------------
# host wrappers: check inputs, launch
# -------------------------------------------------------------------------------------------------


def check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    """Raise one clear error for the first thing wrong with the inputs of ``swiglu``."""
    op = "swiglu"
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError(f"{op}: gate and up must be tensors")
    if gate.dtype not in _DTYPES:
        raise TypeError(f"{op}: gate has dtype {gate.dtype}; the triton swiglu supports float32, float16 and "
                        f"bfloat16 (cast first)")
    if up.dtype != gate.dtype:
        raise TypeError(f"{op}: up dtype {up.dtype} differs from gate dtype {gate.dtype}; cast one to match")
    if up.shape != gate.shape:
        raise ValueError(f"{op}: gate and up must have the same shape (no broadcasting), got "
                         f"{tuple(gate.shape)} and {tuple(up.shape)}")
    _common.check_device(gate, up, op=op)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, config: SwiGLUConfig = CONFIG) -> torch.Tensor:
    """Launch the forward on contiguous ``gate`` and ``up``; returns a contiguous output."""
    y = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, config.block),)](gate, up, y, n, BLOCK=config.block,
                                                           num_warps=config.num_warps)
    return y


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    config: SwiGLUConfig = CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward on contiguous tensors; returns (d gate, d up)."""
    dgate = torch.empty_like(gate, memory_format=torch.contiguous_format)
    dup = torch.empty_like(up, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, config.block),)](dy, gate, up, dgate, dup, n, BLOCK=config.block,
                                                           num_warps=config.num_warps)
    return dgate, dup


# -------------------------------------------------------------------------------------------------
# autograd
# -------------------------------------------------------------------------------------------------


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up with both passes in the Triton kernels above."""

    @staticmethod
    def forward(ctx, gate, up, config: SwiGLUConfig):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.config = config
        return swiglu_forward(gate, up, config)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = swiglu_backward(dy.contiguous(), gate, up, ctx.config)
        return dgate, dup, None


# -------------------------------------------------------------------------------------------------
# public function and registration
# -------------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, config: SwiGLUConfig | None = None) -> torch.Tensor:
    """``silu(gate) * up``, fused forward and backward (elementwise: deterministic, batch-invariant)."""
    check_inputs(gate, up)
    return _SwiGLU.apply(gate, up, config or CONFIG)


def register(registry) -> None:
    """Add swiglu/triton. No atomic twin: an elementwise op has no reduction whose order could vary."""
    registry.register(
        "swiglu", "triton", swiglu, available=_common.triton_available, deterministic=True, origin="built-in",
        description=f"Triton fused silu(gate) * up, forward and backward, {CONFIG.block} elements per program "
                    f"(elementwise: no reduction, no twin)",
    )
