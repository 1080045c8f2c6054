"""Fused Triton cross entropy for the ``loss`` op (deterministic), and its atomic twin.

``cross_entropy(logits (N, V), labels (N,), ignore_index=-100) -> float32 scalar``: the mean cross
entropy over the rows whose label is not ``ignore_index``, as transformers computes it (logits
upcast to float32, ``F.cross_entropy(..., reduction="mean")``).

Deterministic kernel (backend ``triton``)
    Forward: one program per row walks the vocabulary in ``block_v`` chunks with an online
    log-sum-exp (running max and rescaled running sum, in float32) and writes the row's loss
    ``lse - logit[label]`` (0 for an ignored row) and its ``lse`` to buffers. A second, single-program
    kernel then sums the row losses in a fixed order (rows walked in order in ``reduce_block`` tiles,
    then one fixed tree) and counts the non-ignored rows: mean = sum / count. Nothing depends on the
    SM count or on scheduling, so the loss is bitwise the same from run to run.

    Backward: ``d logits = (softmax(logits) - onehot(label)) * (g / n_valid)`` per row (g is the
    upstream gradient of the mean), zero for ignored rows, written in the logits' dtype. Each element
    is computed independently, so there is no reduction to order.

Atomic twin (backend ``triton-atomic``)
    Identical, except that each row program adds its loss to a single float32 total with
    ``tl.atomic_add``; the total's rounding then depends on the order the rows land in, which on a GPU
    changes from run to run. (Under the CPU interpreter programs run in order, so there it is
    deterministic.) The backward is the same kernel as above.

All rows ignored (or N = 0): the mean is 0 / 0 = NaN and the gradient is all zeros, exactly what
``torch.nn.functional.cross_entropy`` returns.

Input checks: logits 2-D float16/bfloat16/float32, labels 1-D int64/int32 of length N, one device
(:func:`check_inputs`: shapes, dtypes and devices only, so a call never reads a value back to the host
and never synchronises with the device; a timed call times the kernels alone). Label *values* are
checked on the device: a label outside ``[0, V)`` that is not ``ignore_index`` reads nothing out of
bounds, and its row's loss and gradient are NaN, so the mean is NaN rather than silently wrong. The
readable error for such labels comes from the separate validation path, :func:`check_labels` (or
:func:`validate`: every check), which reads the labels back once (one device synchronisation): call it
where inputs enter, outside anything timed. Non-contiguous logits are copied to contiguous memory first.

What the reduction order depends on: ``block_v`` (the online log-sum-exp within a row) and
``reduce_block`` (the sum over rows), both pinned per dtype in :data:`CONFIGS`.
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


@dataclass(frozen=True)
class CEConfig:
    """One pinned launch configuration (recorded with results: a different one is a different order)."""

    block_v: int  # vocabulary chunk of the online log-sum-exp (forward) and of the backward
    num_warps: int  # warps per row program
    reduce_block: int  # rows per step of the single-program mean
    reduce_num_warps: int

    def to_dict(self) -> dict:
        return asdict(self)


# Chosen for Hopper (H200): a 4096-wide chunk with 8 warps is 16 elements per thread, so a 151936-word
# Qwen vocabulary is 38 chunks per row; the work is bandwidth-bound, one read of the logits forward
# and one read + one write backward.
CONFIGS: dict[torch.dtype, CEConfig] = {
    torch.bfloat16: CEConfig(block_v=4096, num_warps=8, reduce_block=1024, reduce_num_warps=4),
    torch.float16: CEConfig(block_v=4096, num_warps=8, reduce_block=1024, reduce_num_warps=4),
    torch.float32: CEConfig(block_v=4096, num_warps=8, reduce_block=1024, reduce_num_warps=4),
}

LABEL_DTYPES = (torch.int64, torch.int32)

# -------------------------------------------------------------------------------------------------
# forward kernels
# -------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _ce_forward_kernel(
        logits_ptr,  # logits (N, V), rows of stride stride_row, unit stride along V
        labels_ptr,  # labels (N,), int64 or int32
        loss_ptr,  # per-row loss (N,) float32 (deterministic), or the float32 total (ATOMIC)
        lse_ptr,  # per-row log-sum-exp (N,) float32, kept for the backward
        count_ptr,  # ATOMIC only: int32 number of non-ignored rows, zeroed
        stride_row, V, ignore_index,
        BLOCK_V: tl.constexpr,
        ATOMIC: tl.constexpr,
    ):
        """One program per row: online log-sum-exp over BLOCK_V chunks, loss = lse - logit[label]."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        in_range = (label >= 0) & (label < V)  # a bad label (checked here, not on the host) gives a NaN loss
        cols = tl.arange(0, BLOCK_V)
        m = tl.full((), float("-inf"), tl.float32)  # running max
        s = tl.zeros((), tl.float32)  # running sum of exp(x - m)
        for v in range(0, tl.cdiv(V, BLOCK_V)):
            offs = v * BLOCK_V + cols
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # While every logit seen is -inf, shift by 0 instead (avoids -inf - -inf = NaN).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(row_ptr + tl.where(valid & in_range, label, 0)).to(tl.float32)
        loss = tl.where(valid, tl.where(in_range, lse - target, float("nan")), 0.0)
        tl.store(lse_ptr + row, lse)
        if ATOMIC:
            tl.atomic_add(loss_ptr, loss, sem="relaxed")
            tl.atomic_add(count_ptr, valid.to(tl.int32), sem="relaxed")
        else:
            tl.store(loss_ptr + row, loss)

    @triton.jit
    def _mean_kernel(
        loss_ptr,  # per-row loss (N,) float32, 0 for ignored rows
        labels_ptr,  # labels (N,), to count the non-ignored rows
        out_ptr,  # the mean (scalar float32)
        count_ptr,  # number of non-ignored rows (scalar int32), kept for the backward
        N, ignore_index,
        BLOCK: tl.constexpr,
    ):
        """Single program: rows walked in order in BLOCK tiles, then one fixed tree; mean = sum / count."""
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        cnt = tl.zeros((BLOCK,), tl.int32)
        for i in range(0, tl.cdiv(N, BLOCK)):
            rows = i * BLOCK + offs
            inside = rows < N
            acc += tl.load(loss_ptr + rows, mask=inside, other=0.0)
            lab = tl.load(labels_ptr + rows, mask=inside, other=ignore_index)
            cnt += (lab != ignore_index).to(tl.int32)
        n = tl.sum(cnt, axis=0)
        tl.store(count_ptr, n)
        tl.store(out_ptr, tl.sum(acc, axis=0) / n.to(tl.float32))

    # ---------------------------------------------------------------------------------------------
    # backward kernel
    # ---------------------------------------------------------------------------------------------

    @triton.jit
    def _ce_backward_kernel(
        logits_ptr,  # logits (N, V), rows of stride stride_row
        labels_ptr,  # labels (N,)
        lse_ptr,  # per-row log-sum-exp (N,) float32 from the forward
        grad_ptr,  # upstream gradient of the mean (scalar float32)
        count_ptr,  # number of non-ignored rows (scalar int32)
        dlogits_ptr,  # d logits (N, V) in the logits' dtype, rows of stride stride_drow
        stride_row, stride_drow, V, ignore_index,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: (softmax - onehot) * (g / n_valid), zero for an ignored row, NaN for a row
        whose label is outside [0, V) and not ignore_index."""
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        in_range = (label >= 0) & (label < V)
        lse = tl.load(lse_ptr + row)
        scale = tl.load(grad_ptr).to(tl.float32) / tl.load(count_ptr).to(tl.float32)
        cols = tl.arange(0, BLOCK_V)
        for v in range(0, tl.cdiv(V, BLOCK_V)):
            offs = v * BLOCK_V + cols
            inside = offs < V
            x = tl.load(logits_ptr + row * stride_row + offs, mask=inside, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            d = tl.where(offs == label, p - 1.0, p) * scale
            d = tl.where(valid, tl.where(in_range, d, float("nan")), 0.0)
            tl.store(dlogits_ptr + row * stride_drow + offs, d.to(dlogits_ptr.dtype.element_ty), mask=inside)


# -------------------------------------------------------------------------------------------------
# host wrappers: check inputs, launch
# -------------------------------------------------------------------------------------------------


def check_inputs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    """Raise one clear error for the first thing wrong with the inputs' shapes, dtypes or devices.

    Reads metadata only (no value leaves the device): every call of :func:`cross_entropy` runs it.
    Label values are checked by :func:`check_labels`.
    """
    op = "loss"
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: logits and labels must be tensors")
    if logits.dtype not in CONFIGS:
        raise TypeError(f"{op}: logits have dtype {logits.dtype}; the triton cross entropy supports float16, "
                        f"bfloat16 and float32 (cast the logits first)")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{op}: labels have dtype {labels.dtype}; pass integer class indices (int64 or int32)")
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D (N, V), got shape {tuple(logits.shape)}; flatten the "
                         f"leading dims with logits.reshape(-1, V)")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{op}: labels must have shape ({logits.shape[0]},) = (N,) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: logits have no classes (V = 0)")
    if not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    _common.check_device(logits, labels, op=op)


def check_labels(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> None:
    """ValueError naming the first label outside ``[0, V)`` that is not ``ignore_index``.

    The validation path, separate from the call: it reads the labels back to the host (one device
    synchronisation), so run it once where the labels enter, not inside a timed loop. Without it a bad
    label is still caught, on the device: its row's loss and gradient are NaN (see the module docstring).
    """
    op = "loss"
    V = logits.shape[1]
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):  # the one device sync of this path
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: label {int(labels[i])} at row {i} is outside [0, {V}) and is not "
                         f"ignore_index={ignore_index}; fix the labels or pass the right ignore_index")


def validate(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> None:
    """Every check of the inputs, label values included (:func:`check_inputs`, then :func:`check_labels`)."""
    check_inputs(logits, labels, ignore_index)
    check_labels(logits, labels, ignore_index)


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *, atomic: bool = False,
            config: CEConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward: (mean loss float32 scalar, per-row lse (N,), n_valid int32 scalar)."""
    cfg = config or CONFIGS[logits.dtype]
    N, V = logits.shape
    dev = logits.device
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    if atomic:
        total = torch.zeros((), dtype=torch.float32, device=dev)
        count = torch.zeros((), dtype=torch.int32, device=dev)
        if N > 0:
            _ce_forward_kernel[(N,)](logits, labels, total, lse, count, logits.stride(0), V, ignore_index,
                                     BLOCK_V=cfg.block_v, ATOMIC=True, num_warps=cfg.num_warps)
        return total / count.to(torch.float32), lse, count
    losses = torch.empty(N, dtype=torch.float32, device=dev)
    mean = torch.empty((), dtype=torch.float32, device=dev)
    count = torch.empty((), dtype=torch.int32, device=dev)
    if N > 0:
        _ce_forward_kernel[(N,)](logits, labels, losses, lse, count, logits.stride(0), V, ignore_index,
                                 BLOCK_V=cfg.block_v, ATOMIC=False, num_warps=cfg.num_warps)
    _mean_kernel[(1,)](losses, labels, mean, count, N, ignore_index,
                       BLOCK=cfg.reduce_block, num_warps=cfg.reduce_num_warps)
    return mean, lse, count


def backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, count: torch.Tensor,
             grad: torch.Tensor, ignore_index: int, *, config: CEConfig | None = None) -> torch.Tensor:
    """Launch the backward: d logits (N, V) in the logits' dtype."""
    cfg = config or CONFIGS[logits.dtype]
    N, V = logits.shape
    dlogits = torch.empty_like(logits)
    if N > 0:
        g = grad.to(torch.float32).reshape(()).contiguous()
        _ce_backward_kernel[(N,)](logits, labels, lse, g, count, dlogits, logits.stride(0), dlogits.stride(0),
                                  V, ignore_index, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)
    return dlogits


# -------------------------------------------------------------------------------------------------
# autograd
# -------------------------------------------------------------------------------------------------


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, atomic: bool, config: CEConfig | None):
        logits = logits.contiguous()
        labels = labels.contiguous()
        mean, lse, count = forward(logits, labels, ignore_index, atomic=atomic, config=config)
        ctx.save_for_backward(logits, labels, lse, count)
        ctx.ignore_index, ctx.config = ignore_index, config
        return mean

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse, count = ctx.saved_tensors
        dlogits = backward(logits, labels, lse, count, grad, ctx.ignore_index, config=ctx.config)
        return dlogits, None, None, None, None


# -------------------------------------------------------------------------------------------------
# public functions and registration
# -------------------------------------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                  config: CEConfig | None = None) -> torch.Tensor:
    """Deterministic mean cross entropy over non-ignored rows (see the module docstring).

    Reads nothing back to the host; a label outside ``[0, V)`` gives NaN (:func:`check_labels` names it).
    ``config`` overrides the pinned per-dtype configuration (tests use a small ``block_v`` to walk
    several vocabulary chunks; a different configuration is a different reduction order).
    """
    check_inputs(logits, labels, ignore_index)
    return _CrossEntropy.apply(logits, labels, ignore_index, False, config)


def cross_entropy_atomic(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                         config: CEConfig | None = None) -> torch.Tensor:
    """Cross entropy whose row losses are summed with tl.atomic_add: nondeterministic on a GPU."""
    check_inputs(logits, labels, ignore_index)
    return _CrossEntropy.apply(logits, labels, ignore_index, True, config)


def register(registry) -> None:
    """Add loss/triton (deterministic) and loss/triton-atomic to the registry."""
    _common.register_twins(
        registry, "loss", cross_entropy, cross_entropy_atomic,
        det_description="fused Triton cross entropy: online log-sum-exp over vocabulary chunks, row losses "
                        "summed in a fixed order by one program",
        atomic_description="fused Triton cross entropy whose row losses are summed with tl.atomic_add",
    )
