"""Batch-invariant Triton matmul for the ``linear`` op, and its split-K atomic twin.

``linear(x, weight, bias=None) -> x @ weight.T + bias`` with ``x`` of shape (..., K), ``weight``
(N, K), ``bias`` (N,), all of one dtype (float16, bfloat16 or float32); the leading dims of ``x``
are flattened into M rows.

Deterministic kernel (backend ``triton``)
    One fixed tile configuration per dtype and GPU generation (:func:`config_for`: :data:`CONFIGS`
    from compute capability 9 on, :data:`CONFIGS_SM80` below; no autotuning), no split-K: each output
    tile is owned by one program, which walks K from 0 upwards in ``block_k`` steps into a float32
    accumulator and rounds once at the end (after adding the bias). Nothing in that order depends on
    M, so row i of ``x @ weight.T`` is bitwise the same whatever other rows share the batch (batch
    invariance), and bitwise the same from run to run.

    The backward uses the same kernel for both products: ``dX = dY @ W`` (batch-invariant like the
    forward: it reduces over N) and ``dW = dY.T @ X``, whose reduction runs over the M rows
    (tokens), walked in order in ``block_k``-row tiles. dW therefore depends on the batch's row
    count by nature (more rows, more terms in the sum), but is deterministic run to run. The bias
    gradient is a column sum of dY taken in a fixed order (:func:`_column_sum_kernel`).

Atomic twin (backend ``triton-atomic``)
    The same tiles, but every product is split along its reduction dim into ``split_k`` parts
    (K for the forward, N for dX, the rows for dW and the bias gradient) whose partial results are
    added into a float32 buffer with ``tl.atomic_add``; the order in which the parts land is
    whatever order the GPU runs them in. Under the CPU interpreter programs run one after another,
    so there the twin is deterministic; its nondeterminism only shows on a GPU.

Inputs that are not contiguous are copied to contiguous memory first (the leading dims of ``x`` are
flattened with ``reshape``); the kernels themselves take strides, so transposed views of contiguous
tensors (``weight.T``, ``dY.T``) are read in place.

What the reduction order depends on: the :class:`TileConfig` the dtype and the device's compute
capability select (block sizes, and for the twin ``split_k``); not the SM count, not M.
``num_warps``/``num_stages`` change scheduling, not the order of additions within an accumulator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import _common
from ._common import assume_capability, device_capability  # noqa: F401  (re-exported: kernels.aot enters it per module)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency; the registry says why
    triton = None


@dataclass(frozen=True)
class TileConfig:
    """One pinned launch configuration (recorded with results: a different one is a different order)."""

    block_m: int  # rows of the output tile
    block_n: int  # columns of the output tile
    block_k: int  # reduction step, walked in order
    group_m: int  # output tiles grouped along M for L2 reuse (launch order only, not the sum order)
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loop
    input_precision: str  # tl.dot input precision; only matters for float32 inputs
    split_k: int  # atomic twin only: parts the reduction dim is split into
    sum_block_m: int  # bias gradient: rows per step of the column sum
    sum_block_n: int  # bias gradient: columns per program

    def to_dict(self) -> dict:
        return asdict(self)


# Chosen for Hopper (H200, 228 KiB shared memory per SM); used on every GPU of compute capability 9
# and above. 16-bit: a 128x256x64 tile with 8 warps and 3 stages uses 3 * (128*64 + 64*256) * 2 B =
# 144 KiB of shared memory and runs on the wgmma tensor cores. float32: "ieee" so the result is a true
# float32 product like eager PyTorch's default (torch.backends.cuda.matmul.allow_tf32 is False),
# computed with FMAs, so a smaller tile.
#
# float32: block_k 16 and 4 stages (was block_k 32, 3 stages). With block_k 32 Triton 3.8's ptxas
# spilled on sm_80 at 255 registers, in the deterministic kernel (328 B and 64 B) and the split-K twin
# (428 B): an FMA dot keeps its whole block_k slice of A and B in registers. With block_k 16 nothing
# spills on sm_80 or sm_90a with Triton 3.6 or 3.8 (128-168 registers). On the GPU the reduction
# order should be the same: the dot takes the accumulator (acc = tl.dot(a, b, acc)), so each output
# element stays one FMA chain over K in index order whatever block_k cuts it into (reasoned, not
# compared bit for bit on a GPU; under the CPU interpreter, whose dots are numpy products added to the
# accumulator, block_k does change the bits). The split-K twin's part boundaries (whole block_k
# steps) can move.
CONFIGS: dict[torch.dtype, TileConfig] = {
    torch.bfloat16: TileConfig(128, 256, 64, 8, num_warps=8, num_stages=3, input_precision="tf32",
                               split_k=4, sum_block_m=64, sum_block_n=128),
    torch.float16: TileConfig(128, 256, 64, 8, num_warps=8, num_stages=3, input_precision="tf32",
                              split_k=4, sum_block_m=64, sum_block_n=128),
    torch.float32: TileConfig(64, 64, 16, 8, num_warps=4, num_stages=4, input_precision="ieee",
                              split_k=4, sum_block_m=32, sum_block_n=128),
}

# Compute capability 8.x and below (A100; A10, L4 and RTX 30xx/40xx too, whose 99 KiB of shared memory
# the 64 KiB tile fits). 16-bit: 128x128 instead of Hopper's 128x256, the same block_k, warps and
# stages. With 128x256, Triton 3.8's ptxas spilled about 1.2 KB per thread in the split-K twin on sm_80
# (254 registers: before sm_90 there is no vector float atomic, so the epilogue adds the thread's 128
# accumulators one by one, each at its own 64-bit address), and the deterministic kernel used 243 of
# 255 registers (255 with Triton 3.6). With 128x128 both twins use at most 222 registers with either
# Triton, no spills, and keep one tile. The reduction order is Hopper's tile's: block_n only splits
# the output columns among programs.
CONFIGS_SM80: dict[torch.dtype, TileConfig] = {
    torch.bfloat16: TileConfig(128, 128, 64, 8, num_warps=8, num_stages=3, input_precision="tf32",
                               split_k=4, sum_block_m=64, sum_block_n=128),
    torch.float16: TileConfig(128, 128, 64, 8, num_warps=8, num_stages=3, input_precision="tf32",
                              split_k=4, sum_block_m=64, sum_block_n=128),
    torch.float32: CONFIGS[torch.float32],
}

# assume_capability / device_capability (kernels._common): the compute capability a launch's tile is chosen
# for, re-exported here for callers that enter it per module (kernels.aot).


def config_for(dtype: torch.dtype, capability: tuple[int, int] = (9, 0)) -> TileConfig:
    """The pinned tile of ``dtype`` on a GPU of compute capability ``capability`` (KeyError: no tile)."""
    return (CONFIGS_SM80 if capability[0] < 9 else CONFIGS)[dtype]

# -------------------------------------------------------------------------------------------------
# forward kernels (C = A @ B [+ bias]; the backward products reuse them with other strides)
# -------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Row and column indices of output tile ``pid`` (grouped launch order for L2 reuse)."""
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group_size = GROUP_M * num_pid_n
        first_m = (pid // group_size) * GROUP_M
        rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % rows_in_group
        pid_n = (pid % group_size) // rows_in_group
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_m, offs_n

    @triton.jit
    def _matmul_kernel(
        a_ptr,  # A (M, K), any strides
        b_ptr,  # B (K, N), any strides
        c_ptr,  # C (M, N) output, in the output dtype
        bias_ptr,  # bias (N,), read only when HAS_BIAS
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """One program per output tile; K walked from 0 upwards into a float32 accumulator."""
        offs_m, offs_n = _tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # Rows/columns past the edge wrap around (% M) instead of being masked: they are computed
        # and never stored, and no other row's sum changes.
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _matmul_splitk_atomic_kernel(
        a_ptr,  # A (M, K), any strides
        b_ptr,  # B (K, N), any strides
        c_ptr,  # C (M, N) float32, zeroed: the parts are atomically added into it
        bias_ptr,  # bias (N,), added by the first part only, when HAS_BIAS
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        K_PER_SPLIT,  # reduction length of one part, a multiple of BLOCK_K
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Program (tile, part) multiplies one K range; the parts meet in C through tl.atomic_add."""
        offs_m, offs_n = _tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        part = tl.program_id(1)
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)
        k_start = part * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + (k_start + offs_k).to(tl.int64)[None, :] * stride_ak
        b_ptrs = b_ptr + (k_start + offs_k).to(tl.int64)[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(k_end - k_start, BLOCK_K)):
            k_left = k_end - k_start - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if HAS_BIAS:
            if part == 0:
                acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.atomic_add(c_ptrs, acc, mask=mask, sem="relaxed")

    # ---------------------------------------------------------------------------------------------
    # backward kernels (dX and dW reuse the matmul kernels above; these are the bias gradient)
    # ---------------------------------------------------------------------------------------------

    @triton.jit
    def _column_sum_kernel(
        g_ptr,  # dY (M, N), any strides
        out_ptr,  # column sums (N,), in the output dtype
        M, N,
        stride_gm, stride_gn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Sum of each column over all rows: rows walked in order, then one fixed tree over BLOCK_M."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for m in range(0, tl.cdiv(M, BLOCK_M)):
            rows = m * BLOCK_M + offs_m
            ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn
            acc += tl.load(ptrs, mask=(rows[:, None] < M) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=offs_n < N)

    @triton.jit
    def _column_sum_atomic_kernel(
        g_ptr,  # dY (M, N), any strides
        out_ptr,  # column sums (N,) float32, zeroed: each row range's partial sum is atomically added
        M, N,
        stride_gm, stride_gn,
        M_PER_SPLIT,  # rows per part, a multiple of BLOCK_M
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program (column block, part) sums one row range and adds it into the output atomically."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_start = tl.program_id(1) * M_PER_SPLIT
        m_end = tl.minimum(m_start + M_PER_SPLIT, M)
        offs_m = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for m in range(0, tl.cdiv(m_end - m_start, BLOCK_M)):
            rows = m_start + m * BLOCK_M + offs_m
            ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn
            acc += tl.load(ptrs, mask=(rows[:, None] < m_end) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
        tl.atomic_add(out_ptr + offs_n, tl.sum(acc, axis=0), mask=offs_n < N, sem="relaxed")


# -------------------------------------------------------------------------------------------------
# host wrappers: check inputs, launch
# -------------------------------------------------------------------------------------------------


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise one clear error for the first thing wrong with the inputs of ``linear``."""
    op = "linear"
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: x and weight must be tensors")
    if x.dtype not in CONFIGS:
        raise TypeError(f"{op}: x has dtype {x.dtype}; the triton matmul supports float16, bfloat16 and "
                        f"float32 (cast x first)")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from x dtype {x.dtype}; cast one to match")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"{op}: bias dtype {bias.dtype} differs from x dtype {x.dtype}; cast one to match")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x's last dim must equal weight.shape[1] = {weight.shape[1]}, got x of shape "
                         f"{tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},) = (out_features,), got "
                         f"{tuple(bias.shape)}")
    _common.check_device(*[t for t in (x, weight, bias) if t is not None], op=op)


def _grid_tiles(M: int, N: int, cfg: TileConfig) -> int:
    return triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
           out_dtype: torch.dtype | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` for 2-D ``a`` (M, K) and ``b`` (K, N) of any strides, deterministic kernel.

    ``config`` defaults to the device's tile (:func:`config_for`); tests pass small tiles to exercise many tiles.
    """
    cfg = config or config_for(a.dtype, device_capability(a.device))
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, dtype=out_dtype or a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    _matmul_kernel[(_grid_tiles(M, N, cfg),)](
        a, b, c, bias if bias is not None else c,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        INPUT_PRECISION=cfg.input_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return c


def matmul_atomic(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
                  out_dtype: torch.dtype | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` split ``config.split_k`` ways along K, parts added with atomics (twin)."""
    cfg = config or config_for(a.dtype, device_capability(a.device))
    M, K = a.shape
    N = b.shape[1]
    out_dtype = out_dtype or a.dtype
    c = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    if M == 0 or N == 0:
        return c.to(out_dtype)
    k_steps = max(1, triton.cdiv(K, cfg.block_k))
    splits = min(cfg.split_k, k_steps)
    k_per_split = triton.cdiv(k_steps, splits) * cfg.block_k
    _matmul_splitk_atomic_kernel[(_grid_tiles(M, N, cfg), splits)](
        a, b, c, bias if bias is not None else c,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        k_per_split,
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        INPUT_PRECISION=cfg.input_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return c.to(out_dtype)


def column_sum(g: torch.Tensor, out_dtype: torch.dtype, config: TileConfig | None = None) -> torch.Tensor:
    """Sum of the rows of 2-D ``g`` in a fixed order (the bias gradient), deterministic kernel."""
    cfg = config or config_for(g.dtype, device_capability(g.device))
    M, N = g.shape
    out = torch.empty(N, dtype=out_dtype, device=g.device)
    if N == 0:
        return out
    _column_sum_kernel[(triton.cdiv(N, cfg.sum_block_n),)](
        g, out, M, N, g.stride(0), g.stride(1), BLOCK_M=cfg.sum_block_m, BLOCK_N=cfg.sum_block_n,
    )
    return out


def column_sum_atomic(g: torch.Tensor, out_dtype: torch.dtype, config: TileConfig | None = None) -> torch.Tensor:
    """Sum of the rows of ``g``, row ranges added with atomics (twin)."""
    cfg = config or config_for(g.dtype, device_capability(g.device))
    M, N = g.shape
    out = torch.zeros(N, dtype=torch.float32, device=g.device)
    if N == 0:
        return out.to(out_dtype)
    m_steps = max(1, triton.cdiv(M, cfg.sum_block_m))
    splits = min(cfg.split_k, m_steps)
    m_per_split = triton.cdiv(m_steps, splits) * cfg.sum_block_m
    _column_sum_atomic_kernel[(triton.cdiv(N, cfg.sum_block_n), splits)](
        g, out, M, N, g.stride(0), g.stride(1), m_per_split, BLOCK_M=cfg.sum_block_m, BLOCK_N=cfg.sum_block_n,
    )
    return out.to(out_dtype)


# -------------------------------------------------------------------------------------------------
# autograd
# -------------------------------------------------------------------------------------------------


class _Linear(torch.autograd.Function):
    """x @ weight.T + bias with every product (and the bias gradient) done by the chosen kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, atomic: bool, config: TileConfig | None):
        mm = matmul_atomic if atomic else matmul
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        y = mm(x2, weight.t(), bias, config=config)
        ctx.save_for_backward(x2, weight)
        ctx.atomic, ctx.config, ctx.x_shape, ctx.has_bias = atomic, config, x.shape, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        mm = matmul_atomic if ctx.atomic else matmul
        colsum = column_sum_atomic if ctx.atomic else column_sum
        g = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = mm(g, weight, config=ctx.config).reshape(ctx.x_shape)  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            dw = mm(g.t(), x2, out_dtype=weight.dtype, config=ctx.config)  # (N, M) @ (M, K), rows in order
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = colsum(g, weight.dtype, config=ctx.config)
        return dx, dw, db, None, None


# -------------------------------------------------------------------------------------------------
# public functions and registration
# -------------------------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: TileConfig | None = None) -> torch.Tensor:
    """Batch-invariant, deterministic ``x @ weight.T + bias`` (see the module docstring).

    ``config`` overrides the pinned per-dtype tile configuration (for tests and experiments only:
    a different configuration is a different reduction order).
    """
    check_inputs(x, weight, bias)
    return _Linear.apply(x, weight, bias, False, config)


def linear_atomic(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  config: TileConfig | None = None) -> torch.Tensor:
    """Split-K ``x @ weight.T + bias`` whose parts are added with atomics: nondeterministic on a GPU."""
    check_inputs(x, weight, bias)
    return _Linear.apply(x, weight, bias, True, config)


def register(registry) -> None:
    """Add linear/triton (deterministic, batch-invariant) and linear/triton-atomic to the registry."""
    _common.register_twins(
        registry, "linear", linear, linear_atomic,
        det_description="Triton matmul, one pinned tile per dtype, no split-K: batch-invariant forward and dX; "
                        "dW reduces the rows in order (deterministic)",
        atomic_description="Triton split-K matmul (forward, dX, dW, bias grad) adding its parts with tl.atomic_add",
    )
