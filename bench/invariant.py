"""Batch-invariant mode: while it is on, a row's result does not depend on the other rows of its batch.

    import bench
    with bench.batch_invariant() as mode:                  # or bench.invariant.batch_invariant(rows=16)
        out = model.generate(ids, mask, max_new_tokens=32)  # row i's tokens whatever the other rows are
    mode.to_dict()                                          # what was overridden, how (stored with results)

Why rows differ without it (measured on this project's CPU, MKL sgemm): ``x @ W.T`` picks its blocking
by the number of rows M, so row 0 computed with M = 1 or 2 and with M = 16 differs in the last bits;
attention over a left-padded batch reduces a row's keys at other offsets and lengths; a vectorised
loop's scalar tail (``silu``) computes the last elements of a call another way than the rest.

What the mode does, op by op (each implementation's reduction order is a function of the row's own
data and of fixed constants, never of the batch around it):

============================  =====================================================================
``aten.mm``, ``aten.addmm``   CPU: the rows of the left operand in blocks of exactly ``rows`` rows
                              (the last block padded with zeros), each block one call of the
                              underlying kernel with the same shape and strides: whatever M is, every
                              call the BLAS sees is (rows, K) x (K, N), and a row's place inside a
                              block does not change its bits (``tests/test_batch_invariant.py``
                              checks both). CUDA: detbench's Triton matmul (``linear``/``triton``:
                              one pinned tile, no split-K, K walked in order).
``aten.bmm``                  attention's products, whose reduction length is the padded key length:
                              an explicit loop over the reduction index k, ``acc = acc + a[k] * b[k]``
                              (separate multiply and add, each rounded once), float32 accumulator
                              for 16-bit inputs. Leading and trailing zero terms (masked keys) leave
                              the sum unchanged, so padding on either side does not matter.
``aten._softmax``,            max (exact), ``exp(x - max)`` (one vector routine for every element),
``aten._log_softmax``         and the sum as a loop over the reduced index (as ``bmm``).
``aten.mean.dim``,            the reduced dims moved last, rows in fixed blocks of ``rows`` (as
``aten.sum.dim_IntList``      ``mm``): every call reduces (rows, inner) with the original kernel.
``aten.silu``                 ``x * (1 / (1 + exp(-x)))``: the CPU kernel's scalar tail rounds some
                              elements differently from its vector body.
registry ``attention``        every backend resolves to ``eager`` (transformers' math: ``bmm`` and
                              ``_softmax``, made invariant above); fused kernels (SDPA, flash) reduce
                              keys in blocks aligned to the padded layout.
============================  =====================================================================

The aten overrides are registered in a ``torch.library.Library("aten", "IMPL")`` created on entry and
destroyed in ``finally`` (the original kernels come back). They replace the CPU and CUDA kernels of
those ops for every thread of the process while the block runs; the attention route is a
:func:`qwen_layers.registry.observe` block, so it applies only in the context that entered the mode
(an ``observe`` block opened inside the mode wraps the eager attention; one opened outside loses sight
of attention calls while the mode is on). The implementations call the ops' ``out=`` variants, whose
kernels the mode leaves alone. Backward formulas (autograd) call the same overridden ops, so training
steps run through them too; the gradient of a weight reduces over the batch's rows by nature and is
not batch-invariant.

Everything here is slower than the kernels it replaces: ``detbench generate --batch-invariant both``
measures by how much.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from qwen_layers import registry

# Rows per block of the blocked ops. Any fixed number is batch-invariant by construction; 16 covers a
# decode step of up to 16 sequences in one call (decoding pads fewer rows up to it).
BLOCK_ROWS = 16

# The backend the mode routes the registry's attention to, and the CUDA matmul (both by registry name).
ATTENTION_BACKEND = "eager"
CUDA_MATMUL = ("linear", "triton")

DEVICE_KEYS = ("CPU", "CUDA")


@dataclass(frozen=True)
class Mode:
    """What an active :func:`batch_invariant` block overrides (JSON-ready through :meth:`to_dict`)."""

    rows: int
    aten_ops: tuple[str, ...]
    dispatch_keys: tuple[str, ...]
    attention_backend: str
    cuda_matmul: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aten_ops"], d["dispatch_keys"] = list(self.aten_ops), list(self.dispatch_keys)
        return d


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator of a sum over ``dtype`` values: float32 for 16-bit floats, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ------------------------------------------------------------------------------------------------
# fixed-shape row blocks
# ------------------------------------------------------------------------------------------------


def _blocks(x: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block) for the rows of 2-D ``x`` in blocks of exactly ``rows`` rows, each contiguous;
    the last block is padded with zero rows. Every block has the same shape and strides."""
    m = x.shape[0]
    for start in range(0, m, rows):
        block = x[start:start + rows]
        if block.shape[0] < rows:
            block = torch.cat([block, block.new_zeros(rows - block.shape[0], *block.shape[1:])])
        yield start, block.contiguous()


def _blocked_rows(x: torch.Tensor, rows: int, n_out: int, out_dtype: torch.dtype,
                  call: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """Run ``call(block, out_block)`` on fixed-shape row blocks of 2-D ``x``; ``out_block`` is a fresh
    contiguous (rows, n_out) tensor the call fills. Returns the (M, n_out) result."""
    m = x.shape[0]
    out = torch.empty(m, n_out, dtype=out_dtype, device=x.device)
    for start, block in _blocks(x, rows):
        part = torch.empty(rows, n_out, dtype=out_dtype, device=x.device)
        call(block, part)
        out[start:start + rows] = part[:min(rows, m - start)]
    return out


# ------------------------------------------------------------------------------------------------
# the implementations (each called by the dispatcher in place of the op's CPU or CUDA kernel)
# ------------------------------------------------------------------------------------------------


# The dtypes the Triton matmul has a pinned tile for.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b + bias`` for 2-D ``a`` (M, K), ``b`` (K, N), 1-D ``bias`` (N,), by the registry's
    :data:`CUDA_MATMUL` (``linear(x, weight, bias)`` computes ``x @ weight.T + bias``: weight is ``b.T``)."""
    op, name = CUDA_MATMUL
    return registry.resolve(op, name, a.device)(a, b.t(), bias)


def _cuda_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`triton_mm` for CUDA tensors of one dtype the kernel takes; None where it does not apply."""
    if not a.is_cuda or a.dtype not in TRITON_DTYPES or b.dtype != a.dtype:
        return None
    if bias is not None and (bias.dtype != a.dtype or bias.dim() != 1):
        return None
    return triton_mm(a, b, bias)


def _mm(rows: int):
    def mm(self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
        out = _cuda_matmul(self, mat2, None)
        if out is not None:
            return out
        return _blocked_rows(self, rows, mat2.shape[1], self.dtype,
                             lambda block, part: torch.mm(block, mat2, out=part))
    return mm


def _addmm(rows: int):
    def addmm(self: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
        if beta == 1 and alpha == 1:
            out = _cuda_matmul(mat1, mat2, self)
            if out is not None:
                return out
        bias = self.expand(mat1.shape[0], mat2.shape[1])
        m = mat1.shape[0]
        out = torch.empty(m, mat2.shape[1], dtype=mat1.dtype, device=mat1.device)
        bias_blocks = _blocks(bias, rows)
        for (start, block), (_, bias_block) in zip(_blocks(mat1, rows), bias_blocks):
            part = torch.empty(rows, mat2.shape[1], dtype=mat1.dtype, device=mat1.device)
            torch.addmm(bias_block, block, mat2, beta=beta, alpha=alpha, out=part)
            out[start:start + rows] = part[:min(rows, m - start)]
        return out
    return addmm


def _sequential_sum(terms: Callable[[int], torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    """``terms(0) + terms(1) + ... + terms(n - 1)``, added one at a time in index order into a zero
    accumulator of ``like``'s shape and dtype."""
    acc = torch.zeros_like(like)
    for k in range(n):
        acc = acc + terms(k)
    return acc


def bmm(self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """(b, M, K) @ (b, K, N) as a sum over k in order of the outer products a[:, :, k] x b[:, k, :]."""
    acc_dtype = _acc_dtype(self.dtype)
    a, b = self.to(acc_dtype), mat2.to(acc_dtype)
    like = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
    out = _sequential_sum(lambda k: a[:, :, k, None] * b[:, None, k, :], a.shape[2], like)
    return out.to(self.dtype)


def _softmax_parts(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shifted x, exp of it, sum of the exps) with ``dim`` last, in the accumulator dtype."""
    x = x.to(_acc_dtype(x.dtype)).movedim(dim, -1).contiguous()
    shifted = x - x.amax(dim=-1, keepdim=True)
    e = shifted.exp()
    total = _sequential_sum(lambda k: e[..., k:k + 1], e.shape[-1], e[..., :1])
    return shifted, e, total


def softmax(self: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    out_dtype = torch.float32 if half_to_float else self.dtype
    _, e, total = _softmax_parts(self, dim)
    return (e / total).movedim(-1, dim).to(out_dtype).contiguous()


def log_softmax(self: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    out_dtype = torch.float32 if half_to_float else self.dtype
    shifted, _, total = _softmax_parts(self, dim)
    return (shifted - total.log()).movedim(-1, dim).to(out_dtype).contiguous()


def _reduced_dims(x: torch.Tensor, dim) -> list[int]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(x.dim()))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({d % x.dim() for d in dims}) if x.dim() else []


def _reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """What ``sum`` returns without ``dtype=``: int64 for bool and integers (``mean`` refuses those)."""
    return dtype if dtype.is_floating_point or dtype.is_complex else torch.int64


def _row_reduction(fn: Callable, rows: int):
    """``mean.dim`` / ``sum.dim_IntList``: reduced dims moved last, (outer, inner) rows in fixed blocks."""
    def reduce(self: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
        dims = _reduced_dims(self, dim)
        kept = [d for d in range(self.dim()) if d not in dims]
        x = self.permute(*kept, *dims)
        outer = [self.shape[d] for d in kept]
        flat = x.reshape(math.prod(outer), math.prod(self.shape[d] for d in dims))
        out_dtype = dtype if dtype is not None else _reduction_dtype(self.dtype)
        res = _blocked_rows(flat, rows, 1, out_dtype,
                            lambda block, part: fn(block, dim=[1], keepdim=True, dtype=dtype, out=part))
        res = res.reshape(outer)
        if keepdim:
            for d in dims:
                res = res.unsqueeze(d)
        return res
    return reduce


def silu(self: torch.Tensor) -> torch.Tensor:
    """``x * (1 / (1 + exp(-x)))`` in the accumulator dtype: every element through one vector routine."""
    x = self.to(_acc_dtype(self.dtype))
    return (x * (1 / (1 + torch.exp(-x)))).to(self.dtype)


# ------------------------------------------------------------------------------------------------
# the mode
# ------------------------------------------------------------------------------------------------


def _overrides(rows: int) -> dict[str, Callable]:
    return {
        "mm": _mm(rows),
        "addmm": _addmm(rows),
        "bmm": bmm,
        "_softmax": softmax,
        "_log_softmax": log_softmax,
        "mean.dim": _row_reduction(torch.mean, rows),
        "sum.dim_IntList": _row_reduction(torch.sum, rows),
        "silu": silu,
    }


def _route_attention(fn: Callable, op: str, name: str) -> Callable:
    """The registry observer of the mode: attention resolves to the eager math."""
    if op != "attention" or name == ATTENTION_BACKEND:
        return fn
    return registry.get(op, ATTENTION_BACKEND).fn


def describe_mode(rows: int = BLOCK_ROWS) -> Mode:
    """The :class:`Mode` a :func:`batch_invariant` block with this ``rows`` sets up (nothing is registered)."""
    return Mode(rows=rows, aten_ops=tuple(f"aten.{op}" for op in _overrides(rows)), dispatch_keys=DEVICE_KEYS,
                attention_backend=ATTENTION_BACKEND, cuda_matmul="/".join(CUDA_MATMUL))


@contextlib.contextmanager
def batch_invariant(rows: int = BLOCK_ROWS) -> Iterator[Mode]:
    """Within the block, the ops listed in the module docstring run batch-invariant implementations.

    ``rows``: the row block of the blocked ops (any fixed positive number; :data:`BLOCK_ROWS` by default).
    Yields the :class:`Mode` describing what was overridden. Blocks nest (the innermost overrides win
    while it lasts; each block's registrations are undone when it ends, in ``finally``).
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive integer (the row block of the blocked ops), got {rows!r}")
    impls = _overrides(rows)
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            # torch warns that an existing kernel is being overridden: that is the point, and it is undone.
            warnings.simplefilter("ignore")
            for op, fn in impls.items():
                for key in DEVICE_KEYS:
                    lib.impl(op, fn, key)
        with registry.observe(_route_attention):
            yield describe_mode(rows)
    finally:
        lib._destroy()
