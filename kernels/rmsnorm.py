"""Triton RMSNorm for the ``rmsnorm`` op (deterministic), and its atomic twin.

``rmsnorm(x, weight, eps) -> y`` normalises over the last dim exactly as transformers' Qwen2/Qwen3
``RMSNorm`` does: the variance is taken in float32, ``h = x * rsqrt(mean(x^2) + eps)`` is cast back
to x's dtype, and *then* multiplied by the weight; the output has the dtype PyTorch's type promotion
gives ``weight * h`` (the weight's dtype when the weight is float32 and x is bf16, for instance).
Inside the kernels all arithmetic is float32. x may be float32, float16 or bfloat16, any number of
leading dims; the weight is 1-D of size x.shape[-1], float32, float16 or bfloat16.

Forward and dx (both backends)
    One program per row (forward) and per fixed chunk of rows (backward); a whole row is one block
    of ``next_power_of_2(N)`` columns, so a row's result depends on that row alone: batch-invariant
    and deterministic.

dW, deterministic (backend ``triton``)
    dW = sum over rows of ``dy * cast(h)``. Backward program ``p`` walks its fixed chunk of
    ``CONFIG.rows_per_program`` rows in order, accumulating in float32, and writes one row of a
    partial buffer. The partials are then summed by :func:`_dw_reduce_kernel` in fixed chunks of
    ``CONFIG.reduce_chunk`` partials, each walked in order, repeated until one row is left. The order
    in which any row's contribution is added depends only on those two numbers and its index: not on
    the GPU's SM count, not on timing. Appending rows whose upstream gradient is zero appends exact
    zeros to the sums and leaves dW bitwise unchanged (tested).

dW, atomic twin (backend ``triton-atomic``)
    The same chunk partials, each added into a float32 buffer with ``tl.atomic_add`` in whatever
    order the programs finish. Under the CPU interpreter programs run one after another, so the twin
    is deterministic there; its nondeterminism only shows on a GPU.

Inputs whose last dim is not contiguous (or whose leading dims cannot be flattened to one strided
row dim) are copied to contiguous memory first; the same for the upstream gradient.
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
class RMSNormConfig:
    """The pinned launch configuration (record it with results: a different one is another dW order).

    Forward and backward use one block of ``next_power_of_2(N)`` columns per row, with
    :meth:`num_warps` (forward) and :meth:`bwd_num_warps` (backward) warps; those change scheduling
    and the shape of the in-row tree sums (the variance; dx's mean(dh * h)), which is fixed for a
    given N.
    """

    rows_per_program: int = 32  # backward: rows one program walks in order into one dW partial
    reduce_chunk: int = 64  # dW partials summed in order by one reduction program, per level
    reduce_block_n: int = 256  # dW reduction: columns per program
    max_block_n: int = 65536  # widest row the single-block kernels take

    def num_warps(self, block_n: int) -> int:
        """Warps of the forward kernel for rows of ``block_n`` columns."""
        # Hopper (H200): 4 warps keep rows up to 2K columns busy; wider rows need more threads per
        # row to keep the per-thread register count down (Qwen3-8B's hidden size 4096 -> 8 warps).
        if block_n <= 2048:
            return 4
        if block_n <= 8192:
            return 8
        return 16

    def bwd_num_warps(self, block_n: int) -> int:
        """Warps of the backward kernel: the forward's, except 16 instead of 4 at 2048 columns."""
        # The backward keeps x, dy, the weight and the dW partial of a row in registers. At 2048
        # columns (Qwen3-1.7B's hidden size) with 4 warps, 16 of each per thread, Triton 3.6's ptxas
        # spilled 8 B on sm_80 (16-bit x, both twins); 8 warps still spilled 4 B there with Triton 3.8
        # (float16, at 48 registers); with 16 warps (40 registers) nothing spills on sm_80 or sm_90a
        # with Triton 3.6 or 3.8, whatever the dtype. This changes dx's bits at 2048 columns, not its
        # determinism or batch invariance: the in-row tree sum of mean(dh * h) is laid out over 16
        # warps instead of 4 (a fixed order either way); dW's per-column sums are untouched.
        return 16 if block_n == 2048 else self.num_warps(block_n)

    def to_dict(self) -> dict:
        return asdict(self)


CONFIG = RMSNormConfig()

# -------------------------------------------------------------------------------------------------
# forward kernel
# -------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rmsnorm_fwd_kernel(
        x_ptr,  # x rows (R, N), row stride stride_x, unit column stride
        w_ptr,  # weight (N,)
        y_ptr,  # output rows (R, N), contiguous, in the promoted dtype of weight and x
        rstd_ptr,  # (R,) float32: 1 / sqrt(mean(x^2) + eps) of each row, kept for the backward
        stride_x, stride_y,
        N, eps,
        BLOCK_N: tl.constexpr,
    ):
        """One program per row: float32 variance, rsqrt, cast to x's dtype, times the weight."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        h = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # transformers casts back before the weight
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, (w * h).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    # ---------------------------------------------------------------------------------------------
    # backward kernels
    # ---------------------------------------------------------------------------------------------

    @triton.jit
    def _rmsnorm_bwd_kernel(
        dy_ptr,  # upstream gradient rows (R, N), row stride stride_dy, unit column stride
        x_ptr,  # forward input rows (R, N), row stride stride_x
        w_ptr,  # weight (N,)
        rstd_ptr,  # (R,) float32 saved by the forward
        dx_ptr,  # dx rows (R, N), contiguous, in x's dtype
        dw_ptr,  # float32 dW: partials (programs, N) one row per program, or (N,) zeroed when ATOMIC
        stride_dy, stride_x, stride_dx,
        R, N,
        ROWS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr,
    ):
        """Program p: dx of rows [p*ROWS_PER_PROGRAM, ...) in order, and their dW partial sum."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        row_start = pid.to(tl.int64) * ROWS_PER_PROGRAM
        for i in range(0, tl.minimum(ROWS_PER_PROGRAM, R - row_start)):
            row = row_start + i
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            h = x * rstd
            dw += dy * h.to(x_ptr.dtype.element_ty).to(tl.float32)  # the forward multiplied the cast h
            dh = dy * w
            # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (dh - h * mean(dh * h))
            dx = rstd * (dh - h * (tl.sum(dh * h, axis=0) / N))
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if ATOMIC:
            tl.atomic_add(dw_ptr + cols, dw, mask=mask, sem="relaxed")
        else:
            tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw, mask=mask)

    @triton.jit
    def _dw_reduce_kernel(
        part_ptr,  # float32 partials (P, N), contiguous
        out_ptr,  # float32 sums (cdiv(P, CHUNK), N), contiguous: one row per chunk of partials
        P, N,
        CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program (c, j): partials [c*CHUNK, (c+1)*CHUNK) of column block j, added in index order."""
        c = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        start = c.to(tl.int64) * CHUNK
        for i in range(0, tl.minimum(CHUNK, P - start)):
            acc += tl.load(part_ptr + (start + i) * N + cols, mask=mask, other=0.0)
        tl.store(out_ptr + c.to(tl.int64) * N + cols, acc, mask=mask)


# -------------------------------------------------------------------------------------------------
# host wrappers: check inputs, launch
# -------------------------------------------------------------------------------------------------


def check_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float, config: RMSNormConfig = CONFIG) -> None:
    """Raise one clear error for the first thing wrong with the inputs of ``rmsnorm``."""
    op = "rmsnorm"
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: x and weight must be tensors")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; the triton rmsnorm supports float32, float16 and "
                        f"bfloat16 (cast x first)")
    if weight.dtype not in _DTYPES:
        raise TypeError(f"{op}: weight has dtype {weight.dtype}; the triton rmsnorm supports float32, float16 "
                        f"and bfloat16 (cast the weight first)")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x needs a non-empty last dim to normalise over, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape ({x.shape[-1]},) = (x.shape[-1],), got "
                         f"{tuple(weight.shape)}")
    if triton is not None and triton.next_power_of_2(x.shape[-1]) > config.max_block_n:
        raise ValueError(f"{op}: rows of {x.shape[-1]} elements exceed the single-block limit of "
                         f"{config.max_block_n}; use the eager backend for such rows")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")
    _common.check_device(x, weight, op=op)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, N) with unit column stride: a view when possible, else a contiguous copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def rmsnorm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float,
                    config: RMSNormConfig = CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on rows ``x2`` (R, N): returns ``y`` (R, N) and the float32 ``rstd`` (R,)."""
    R, N = x2.shape
    y = torch.empty(R, N, dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x2.device)
    if R == 0:
        return y, rstd
    block_n = triton.next_power_of_2(N)
    _rmsnorm_fwd_kernel[(R,)](
        x2, weight, y, rstd, x2.stride(0), y.stride(0), N, float(eps),
        BLOCK_N=block_n, num_warps=config.num_warps(block_n),
    )
    return y, rstd


def _reduce_partials(part: torch.Tensor, config: RMSNormConfig) -> torch.Tensor:
    """Sum the rows of the float32 partial buffer (P, N) in fixed chunks, level by level, to (N,)."""
    N = part.shape[1]
    while part.shape[0] > 1:
        P = part.shape[0]
        out = torch.empty(triton.cdiv(P, config.reduce_chunk), N, dtype=torch.float32, device=part.device)
        _dw_reduce_kernel[(out.shape[0], triton.cdiv(N, config.reduce_block_n))](
            part, out, P, N, CHUNK=config.reduce_chunk, BLOCK_N=config.reduce_block_n,
        )
        part = out
    return part[0]


def rmsnorm_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *,
                     atomic: bool, config: RMSNormConfig = CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward on rows (R, N): returns ``dx`` (R, N) in x's dtype and ``dW`` in the weight's."""
    R, N = x2.shape
    dx = torch.empty(R, N, dtype=x2.dtype, device=x2.device)
    if R == 0:
        return dx, torch.zeros_like(weight)
    block_n = triton.next_power_of_2(N)
    programs = triton.cdiv(R, config.rows_per_program)
    if atomic:
        dw = torch.zeros(N, dtype=torch.float32, device=x2.device)
    else:
        dw = torch.empty(programs, N, dtype=torch.float32, device=x2.device)
    _rmsnorm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, dx, dw,
        dy2.stride(0), x2.stride(0), dx.stride(0), R, N,
        ROWS_PER_PROGRAM=config.rows_per_program, BLOCK_N=block_n, ATOMIC=atomic,
        num_warps=config.bwd_num_warps(block_n),
    )
    if not atomic:
        dw = _reduce_partials(dw, config)
    return dx, dw.to(weight.dtype)


# -------------------------------------------------------------------------------------------------
# autograd
# -------------------------------------------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    """RMSNorm whose forward and backward run the Triton kernels above."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, atomic: bool, config: RMSNormConfig):
        x2 = _rows(x)
        weight = weight.contiguous()
        y, rstd = rmsnorm_forward(x2, weight, eps, config)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.atomic, ctx.config, ctx.x_shape = atomic, config, x.shape
        return y.view(*x.shape[:-1], x.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(_rows(dy), x2, weight, rstd, atomic=ctx.atomic, config=ctx.config)
        return (dx.view(ctx.x_shape) if ctx.needs_input_grad[0] else None,
                dw if ctx.needs_input_grad[1] else None, None, None, None)


# -------------------------------------------------------------------------------------------------
# public functions and registration
# -------------------------------------------------------------------------------------------------


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, config: RMSNormConfig | None = None) -> torch.Tensor:
    """transformers' Qwen RMSNorm with a fixed-order (deterministic) weight gradient.

    ``config`` overrides :data:`CONFIG` (tests and experiments only: another chunking is another dW order).
    """
    config = config or CONFIG
    check_inputs(x, weight, eps, config)
    return _RMSNorm.apply(x, weight, eps, False, config)


def rmsnorm_atomic(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                   config: RMSNormConfig | None = None) -> torch.Tensor:
    """Same forward and dx; dW partials added with ``tl.atomic_add`` (nondeterministic on a GPU)."""
    config = config or CONFIG
    check_inputs(x, weight, eps, config)
    return _RMSNorm.apply(x, weight, eps, True, config)


def register(registry) -> None:
    """Add rmsnorm/triton (deterministic) and rmsnorm/triton-atomic (its atomic twin) to the registry."""
    _common.register_twins(
        registry, "rmsnorm", rmsnorm, rmsnorm_atomic,
        det_description=f"Triton RMSNorm, one row per program; dW from fixed {CONFIG.rows_per_program}-row "
                        f"chunks summed in fixed {CONFIG.reduce_chunk}-partial chunks (deterministic, "
                        f"SM-count independent)",
        atomic_description=f"Triton RMSNorm whose dW chunk partials ({CONFIG.rows_per_program} rows) meet "
                           f"via tl.atomic_add",
    )
