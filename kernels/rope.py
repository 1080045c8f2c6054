"""Triton rotary embedding for the ``rope`` op: q and k rotated in one fused kernel, forward and backward.

``rope(q, k, cos, sin) -> (q_rot, k_rot)`` with q (B, Hq, S, D), k (B, Hkv, S, D) and the tables
cos, sin (B or 1, S, D), in transformers' rotate-half convention::

    x_rot = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

i.e. with halves ``x1, x2`` and ``c1, c2, s1, s2`` of the tables::

    x_rot1 = x1 * c1 - x2 * s1        x_rot2 = x2 * c2 + x1 * s2

The backward is the transposed map (a rotation by -sin when the two halves of the tables are equal,
as transformers builds them)::

    dx1 = dy1 * c1 + dy2 * s2         dx2 = dy2 * c2 - dy1 * s1

One program per (batch, position) rotates every q head and every k head of that position, reading
its row of cos/sin once. Arithmetic is float32 and rounded once per output element; the outputs have
the dtype eager's type promotion gives (q's dtype when the tables have q's dtype, as transformers
casts them). No reduction anywhere, so the results are deterministic and batch-invariant by
construction and there is no atomic twin. cos and sin get no gradient (transformers computes them
from a buffer); passing tables that require grad while grad is enabled is an error.

Any strides are read in place (the transposed (B, S, H, D) -> (B, H, S, D) views attention modules
make need no copy) as long as the last dim is contiguous; tensors whose last dim is not are copied
to contiguous memory first. A batch-1 table is broadcast over the batch with stride 0.
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
class RopeConfig:
    """The pinned launch configuration (elementwise: it changes speed only, never a result bit).

    Tiles are (next_power_of_2(heads), next_power_of_2(D / 2)) per tensor, one program per position.
    """

    max_tile: int = 16384  # largest heads x D/2 tile a program holds (e.g. 128 heads x 128)

    def num_warps(self, tile: int) -> int:
        # H200: Qwen3-8B's q tile is 32 heads x 64 = 2048 elements -> 4 warps, 16 elements a thread.
        if tile <= 2048:
            return 4
        if tile <= 8192:
            return 8
        return 16

    def to_dict(self) -> dict:
        return asdict(self)


CONFIG = RopeConfig()

# -------------------------------------------------------------------------------------------------
# the kernel: one rotation for the forward and, transposed, for the backward
# -------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rotate_heads(
        src_ptr,  # input (B, H, S, D) at any strides, unit stride on D
        dst_ptr,  # output (B, H, S, D) at any strides, unit stride on D
        b, s, H, HALF,
        stride_sb, stride_sh, stride_ss, stride_db, stride_dh, stride_ds,
        c1, c2, p1, p2,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out1 = x1 * c1 + x2 * p1, out2 = x2 * c2 + x1 * p2 for every head at one (b, s)."""
        heads = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < H) & (d[None, :] < HALF)
        src = src_ptr + b * stride_sb + s * stride_ss + heads[:, None].to(tl.int64) * stride_sh + d[None, :]
        dst = dst_ptr + b * stride_db + s * stride_ds + heads[:, None].to(tl.int64) * stride_dh + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * c1[None, :] + x2 * p1[None, :]
        out2 = x2 * c2[None, :] + x1 * p2[None, :]
        tl.store(dst, out1.to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, out2.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_tables(
        cos_ptr,  # cos (B or 1, S, D), unit stride on D
        sin_ptr,  # sin (B or 1, S, D), unit stride on D
        b, s,
        stride_cb, stride_cs, stride_snb, stride_sns,
        HALF,
        BLOCK_D: tl.constexpr,
    ):
        """The two halves of row (b, s) of cos and of sin, as float32."""
        d = tl.arange(0, BLOCK_D)
        mask = d < HALF
        cp = cos_ptr + b * stride_cb + s * stride_cs + d
        sp = sin_ptr + b * stride_snb + s * stride_sns + d
        c1 = tl.load(cp, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cp + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sp, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sp + HALF, mask=mask, other=0.0).to(tl.float32)
        return c1, c2, s1, s2

    @triton.jit
    def _rope_kernel(
        q_ptr,  # q (B, Hq, S, D); backward: upstream gradient of rotated q
        k_ptr,  # k (B, Hkv, S, D); backward: upstream gradient of rotated k
        cos_ptr,  # cos (B or 1, S, D); batch stride 0 when shared
        sin_ptr,  # sin (B or 1, S, D); batch stride 0 when shared
        qo_ptr,  # rotated q (B, Hq, S, D); backward: gradient of q
        ko_ptr,  # rotated k (B, Hkv, S, D); backward: gradient of k
        S, HQ, HKV, HALF,
        sqb, sqh, sqs, skb, skh, sks,
        scb, scs, ssb, sss,
        sqob, sqoh, sqos, skob, skoh, skos,
        BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_D: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        """One program per (b, s), all q and k heads.

        Forward: x_rot = x * cos + rotate_half(x) * sin, i.e. out1 = x1 * c1 - x2 * s1, out2 = x2 * c2 + x1 * s2.
        BACKWARD, the transposed rotation: dx1 = dy1 * c1 + dy2 * s2, dx2 = dy2 * c2 - dy1 * s1.
        """
        pid = tl.program_id(0).to(tl.int64)
        b = pid // S
        s = pid % S
        c1, c2, s1, s2 = _load_tables(cos_ptr, sin_ptr, b, s, scb, scs, ssb, sss, HALF, BLOCK_D)
        if BACKWARD:
            p1 = s2
            p2 = -s1
        else:
            p1 = -s1
            p2 = s2
        _rotate_heads(q_ptr, qo_ptr, b, s, HQ, HALF, sqb, sqh, sqs, sqob, sqoh, sqos, c1, c2, p1, p2,
                      BLOCK_HQ, BLOCK_D)
        _rotate_heads(k_ptr, ko_ptr, b, s, HKV, HALF, skb, skh, sks, skob, skoh, skos, c1, c2, p1, p2,
                      BLOCK_HKV, BLOCK_D)


# -------------------------------------------------------------------------------------------------
# host wrappers: check inputs, launch
# -------------------------------------------------------------------------------------------------


def check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 config: RopeConfig = CONFIG) -> None:
    """Raise one clear error for the first thing wrong with the inputs of ``rope``."""
    op = "rope"
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        raise TypeError(f"{op}: q, k, cos and sin must be tensors")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{op}: q has dtype {q.dtype}; the triton rope supports float32, float16 and bfloat16")
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: k dtype {k.dtype} differs from q dtype {q.dtype}; cast one to match")
    if cos.dtype not in _DTYPES or sin.dtype != cos.dtype:
        raise TypeError(f"{op}: cos and sin must share one of float32, float16, bfloat16, got {cos.dtype} and "
                        f"{sin.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q and k must be 4-D (B, H, S, D), got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    B, _, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"{op}: k must be (B={B}, Hkv, S={S}, D={D}) like q, got {tuple(k.shape)}")
    if D == 0 or D % 2:
        raise ValueError(f"{op}: head dim D must be a positive even number for rotate-half, got {D}")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (S, D):
        raise ValueError(f"{op}: cos and sin must both be ({B} or 1, S={S}, D={D}), got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if triton is not None:
        heads = max(q.shape[1], k.shape[1])
        tile = triton.next_power_of_2(heads) * triton.next_power_of_2(D // 2)
        if tile > config.max_tile:
            raise ValueError(f"{op}: a tile of {tile} elements per program ({heads} heads x D/2 = {D // 2}, padded to "
                             f"powers of two) exceeds the limit of {config.max_tile}; use the eager backend")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(f"{op}: the triton rope gives cos/sin no gradient; pass cos.detach(), sin.detach() or "
                         f"use the eager backend to differentiate through the tables")
    _common.check_device(q, k, cos, sin, op=op)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _table_strides(t: torch.Tensor, batch: int) -> tuple[int, int]:
    """(batch stride, position stride) of a (B or 1, S, D) table; 0 for a shared batch."""
    return (t.stride(0) if t.shape[0] == batch and batch > 1 else 0), t.stride(1)


def _launch(q, k, cos, sin, q_out, k_out, config: RopeConfig, backward: bool) -> None:
    B, HQ, S, D = q.shape
    HKV = k.shape[1]
    if B * S == 0:
        return
    bhq, bhkv, bd = triton.next_power_of_2(HQ), triton.next_power_of_2(HKV), triton.next_power_of_2(D // 2)
    _rope_kernel[(B * S,)](
        q, k, cos, sin, q_out, k_out,
        S, HQ, HKV, D // 2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        *_table_strides(cos, B), *_table_strides(sin, B),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        BLOCK_HQ=bhq, BLOCK_HKV=bhkv, BLOCK_D=bd, BACKWARD=backward, num_warps=config.num_warps(max(bhq, bhkv) * bd),
    )


def rope_forward(q, k, cos, sin, config: RopeConfig = CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward; outputs are contiguous (B, H, S, D) in the promoted dtype of x and the tables."""
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
    _launch(q, k, cos, sin, q_out, k_out, config, backward=False)
    return q_out, k_out


def rope_backward(dq, dk, cos, sin, q_dtype, k_dtype, config: RopeConfig = CONFIG):
    """Launch the backward; gradients are contiguous in q's and k's dtypes."""
    dq_in = torch.empty(dq.shape, dtype=q_dtype, device=dq.device)
    dk_in = torch.empty(dk.shape, dtype=k_dtype, device=dk.device)
    _launch(dq, dk, cos, sin, dq_in, dk_in, config, backward=True)
    return dq_in, dk_in


# -------------------------------------------------------------------------------------------------
# autograd
# -------------------------------------------------------------------------------------------------


class _Rope(torch.autograd.Function):
    """Rotary embedding of q and k with both passes in the Triton kernels above."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, config: RopeConfig):
        cos, sin = _unit_last(cos), _unit_last(sin)
        ctx.save_for_backward(cos, sin)
        ctx.config, ctx.dtypes = config, (q.dtype, k.dtype)
        return rope_forward(_unit_last(q), _unit_last(k), cos, sin, config)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # An unused output's gradient arrives as zeros (autograd materialises it by default).
        dq_in, dk_in = rope_backward(_unit_last(dq), _unit_last(dk), cos, sin, *ctx.dtypes, ctx.config)
        return dq_in, dk_in, None, None, None


# -------------------------------------------------------------------------------------------------
# public function and registration
# -------------------------------------------------------------------------------------------------


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         config: RopeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q and k (transformers' convention), fused, deterministic."""
    config = config or CONFIG
    check_inputs(q, k, cos, sin, config)
    return _Rope.apply(q, k, cos, sin, config)


def register(registry) -> None:
    """Add rope/triton. No atomic twin: an elementwise op has no reduction whose order could vary."""
    registry.register(
        "rope", "triton", rope, available=_common.triton_available, deterministic=True, origin="built-in",
        description="Triton rotate-half rotary, q and k fused, one program per (batch, position) "
                    "(elementwise: no reduction, no twin)",
    )
