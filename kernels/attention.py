"""Triton flash-style attention: a deterministic backward, and its atomic twin.

Calling convention (``qwen_layers.registry.OPS["attention"]``)::

    fn(q, k, v, *, scale, causal=True, attn_mask=None) -> o
    q (B, Hq, S, D), k/v (B, Hkv, S, D) with Hq a multiple of Hkv, o (B, Hq, S, D)

Forward: one program per (query block, batch x query head) walks the key blocks left to right with
an online softmax (base-2 exponentials, float32 accumulators) and stores the output and the per-row
log-sum-exp. Backward, deterministic (``triton``), three kernels and no atomics:

* ``delta = rowsum(dO * O)`` per query row;
* dK/dV: one program per (key block, batch x kv head) walks the query heads of its group in order and,
  inside each, the query blocks top to bottom, so a kv head's gradient is summed over its group in a
  fixed order inside one program;
* dQ: one program per (query block, batch x query head) walks the key blocks left to right.

The atomic twin (``triton-atomic``) runs the same dK/dV kernel with ``ATOMIC_DQ`` set: each
(key block, query block) pair adds its share of dQ into a float32 buffer with ``tl.atomic_add``, as
FlashAttention-2's default backward does, so on a GPU dQ depends on the order programs finish in.
Everything else, forward included, is the same code.

Block sizes, warps and stages are fixed per (head dim, dtype) and GPU generation (no autotuning):
:data:`CONFIGS` from compute capability 9 on (chosen for sm_90), :data:`CONFIGS_SM80` below;
:func:`config_for` returns the one a call uses, so results can record it. No program
reads another sequence's data and nothing depends on the batch size, so a sequence's result is
bitwise the same whatever batch it is in.

Masks. ``attn_mask=None`` means causal (``causal=True``) or full attention. A boolean
``attn_mask`` (B or 1, 1, S, S), True = attend, is accepted when it is a key-padding mask, alone or
combined with causality: ``attn_mask[b, 0, i, j] == keep[b, j] and (j <= i if causal)`` for some
per-sequence key vector ``keep`` (right padding, left padding, any key padding). As in the other
backends the mask is authoritative (it "already includes causality"), so the ``causal`` flag is
ignored when a mask is given. Any other mask raises ``ValueError`` naming the ``eager`` / ``sdpa``
backends. Checking the structure reads the mask back to the host (a device synchronisation), so it is
done once per mask tensor, on its first use (:func:`_mask_args`): the result is kept for that tensor
(at most :data:`_MASK_CACHE_SIZE` masks, dropped when the mask is freed) and reused while the tensor's
version counter is unchanged, so a model whose layers share one mask, or a timed loop reusing it,
reads nothing back after the first call. A mask written in place is checked again; an inference-mode
mask (no version counter) and a new tensor with the same contents are checked on every call.

Fully masked query rows (no key to attend, e.g. the leading rows under left padding) output exactly
0, get dQ = 0, and add nothing to dK/dV; no NaN is produced. (Eager instead returns the mean of V
there, from its finite additive mask; SDPA may return NaN.)

Inputs are float32, float16 or bfloat16 (one dtype for q, k, v); head dims 16, 64, 128. Matmul
operands are in the input dtype with float32 accumulation (float32 inputs use IEEE-precision dots,
not TF32); softmax statistics and all accumulators are float32. Non-contiguous inputs (and upstream
gradients) are copied to contiguous memory first. Runs on CUDA, or on the CPU through the Triton
interpreter when ``TRITON_INTERPRET=1`` was set before start-up (slow; programs run one after
another there, so atomics are deterministic on CPU).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass

import torch

from kernels._common import assume_capability, check_device, device_capability, register_twins  # noqa: F401

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: the entries register, unavailable (see triton_available)
    triton = tl = None


def _jit(fn):
    """``triton.jit`` when Triton is importable; without it the kernels are never launched."""
    return triton.jit(fn) if triton is not None else fn


LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x * scale) == exp2(x * scale * LOG2E)

# ================================================================================================
# forward kernel
# ================================================================================================


@_jit
def _valid(
    KEEP,  # key-padding vector of this sequence's batch row, (B, S) int8, 1 = key may be attended
    b, offs_q, offs_k, S,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    """Which (query, key) pairs may attend; ``offs_q`` / ``offs_k`` come pre-broadcast (2-D)."""
    valid = (offs_q < S) & (offs_k < S)
    if CAUSAL:
        valid = valid & (offs_k <= offs_q)
    if HAS_KEEP:
        keep = tl.load(KEEP + b.to(tl.int64) * S + offs_k, mask=offs_k < S, other=0)
        valid = valid & (keep != 0)
    return valid


@_jit
def _key_range(
    KV_LO,  # first attendable key of each sequence, (B,) int32
    KV_HI,  # one past the last attendable key of each sequence, (B,) int32
    b, q_end, S,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    """Key range [lo, hi) a query block ending at ``q_end`` walks; ``lo`` stays block-aligned."""
    lo = 0
    hi = S
    if HAS_KEEP:
        lo = (tl.load(KV_LO + b) // BLOCK_N) * BLOCK_N
        hi = tl.load(KV_HI + b)
    if CAUSAL:
        hi = tl.minimum(hi, q_end)
    return lo, hi


@_jit
def _query_head(pid_bh, S, H_Q, GROUP, HEAD_DIM: tl.constexpr):
    """For program axis ``pid_bh = b * Hq + h``: (b, offset of its q rows, offset of its kv head's rows)."""
    b = pid_bh // H_Q
    h_kv = (pid_bh % H_Q) // GROUP
    q_base = pid_bh.to(tl.int64) * S * HEAD_DIM
    kv_base = (b * (H_Q // GROUP) + h_kv).to(tl.int64) * S * HEAD_DIM
    return b, q_base, kv_base


@_jit
def _load_kv(
    K,  # keys, (B, Hkv, S, D) contiguous
    V,  # values, (B, Hkv, S, D) contiguous
    kv_base, offs_n, offs_d, S,
    HEAD_DIM: tl.constexpr,
):
    """The key and value rows ``offs_n`` of one kv head (zeros past S), and their element offsets."""
    kv_off = kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_off, mask=offs_n[:, None] < S, other=0.0)
    v = tl.load(V + kv_off, mask=offs_n[:, None] < S, other=0.0)
    return kv_off, k, v


@_jit
def _attn_fwd_kernel(
    Q,  # queries, (B, Hq, S, D) contiguous
    K,  # keys, (B, Hkv, S, D) contiguous
    V,  # values, (B, Hkv, S, D) contiguous
    O,  # output, (B, Hq, S, D) contiguous, input dtype
    LSE,  # log2-sum-exp2 of each row's scaled scores, (B, Hq, S) float32; +inf marks a row with no key
    KEEP,  # key-padding vector, (B, S) int8 (read only when HAS_KEEP)
    KV_LO,  # first attendable key per sequence, (B,) int32 (read only when HAS_KEEP)
    KV_HI,  # one past the last attendable key per sequence, (B,) int32 (read only when HAS_KEEP)
    qk_scale,  # scale * log2(e)
    S, H_Q, GROUP,  # sequence length, query heads, query heads per kv head
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)  # b * Hq + h
    b, q_base, kv_base = _query_head(pid_bh, S, H_Q, GROUP, HEAD_DIM)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < S, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, hi = _key_range(KV_LO, KV_HI, b, (pid_m + 1) * BLOCK_M, S, BLOCK_N, CAUSAL, HAS_KEEP)
    for start_n in range(lo, hi, BLOCK_N):  # fixed order: left to right
        offs_n = start_n + tl.arange(0, BLOCK_N)
        _, k, v = _load_kv(K, V, kv_base, offs_n, offs_d, S, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = _valid(KEEP, b, offs_m[:, None], offs_n[None, :], S, CAUSAL, HAS_KEEP)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp2 finite
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # no attendable key: output 0, LSE +inf (backward then gives p = 0)
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(O + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=offs_m[:, None] < S)
    tl.store(LSE + pid_bh.to(tl.int64) * S + offs_m, lse, mask=offs_m < S)


# ================================================================================================
# backward kernels
# ================================================================================================


@_jit
def _attn_bwd_delta_kernel(
    O,  # forward output, (B, Hq, S, D) contiguous
    DO,  # upstream gradient of the output, (B, Hq, S, D) contiguous
    DELTA,  # out: rowsum(dO * O), (B, Hq, S) float32
    S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    off = pid_bh.to(tl.int64) * S * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + off, mask=offs_m[:, None] < S, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=offs_m[:, None] < S, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * S + offs_m, tl.sum(o * do, 1), mask=offs_m < S)


@_jit
def _attn_bwd_dkdv_kernel(
    Q,  # queries, (B, Hq, S, D) contiguous
    K,  # keys, (B, Hkv, S, D) contiguous
    V,  # values, (B, Hkv, S, D) contiguous
    DO,  # upstream gradient of the output, (B, Hq, S, D) contiguous
    LSE,  # forward log2-sum-exp2 per row, (B, Hq, S) float32
    DELTA,  # rowsum(dO * O), (B, Hq, S) float32
    DK,  # out: key gradient, (B, Hkv, S, D) contiguous, input dtype
    DV,  # out: value gradient, (B, Hkv, S, D) contiguous, input dtype
    DQ_ACC,  # out when ATOMIC_DQ: unscaled query gradient, (B, Hq, S, D) float32, zero on entry
    KEEP,  # key-padding vector, (B, S) int8 (read only when HAS_KEEP)
    KV_LO,  # first attendable key per sequence, (B,) int32 (read only when HAS_KEEP)
    KV_HI,  # one past the last attendable key per sequence, (B,) int32 (read only when HAS_KEEP)
    scale, qk_scale,  # softmax scale, and scale * log2(e)
    S, H_Q, GROUP,  # sequence length, query heads, query heads per kv head
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)  # b * Hkv + h_kv
    h_kv_count = H_Q // GROUP
    b = pid_bhk // h_kv_count
    h_kv = pid_bhk % h_kv_count
    kv_base = pid_bhk.to(tl.int64) * S * HEAD_DIM

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_off, k, v = _load_kv(K, V, kv_base, offs_n, offs_d, S, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # Query blocks that can see this key block: under causality only rows >= start_n.
    lo_m = 0
    if CAUSAL:
        lo_m = (start_n // BLOCK_M) * BLOCK_M
    hi_m = S
    if HAS_KEEP:  # a key block with no attendable key gets zero gradients without reading any query
        dead = (start_n >= tl.load(KV_HI + b)) | (start_n + BLOCK_N <= tl.load(KV_LO + b))
        hi_m = tl.where(dead, lo_m, hi_m)

    for g in range(0, GROUP):  # fixed order over the query heads sharing this kv head
        bh = b * H_Q + h_kv * GROUP + g
        q_base = bh.to(tl.int64) * S * HEAD_DIM
        row_base = bh.to(tl.int64) * S
        for start_m in range(lo_m, hi_m, BLOCK_M):  # fixed order: top to bottom
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_off = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
            q = tl.load(Q + q_off, mask=offs_m[:, None] < S, other=0.0)
            do = tl.load(DO + q_off, mask=offs_m[:, None] < S, other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < S, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < S, other=0.0)
            # Transposed tiles (keys x queries), so dK and dV come out without transposing P.
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            valid = _valid(KEEP, b, offs_m[None, :], offs_n[:, None], S, CAUSAL, HAS_KEEP)
            p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
            if ATOMIC_DQ:  # FlashAttention-2's default: key blocks race to add their share of dQ
                dq_part = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION)
                tl.atomic_add(DQ_ACC + q_off, dq_part, mask=offs_m[:, None] < S)

    dk = dk * scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < S)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < S)


@_jit
def _attn_bwd_dq_kernel(
    Q,  # queries, (B, Hq, S, D) contiguous
    K,  # keys, (B, Hkv, S, D) contiguous
    V,  # values, (B, Hkv, S, D) contiguous
    DO,  # upstream gradient of the output, (B, Hq, S, D) contiguous
    LSE,  # forward log2-sum-exp2 per row, (B, Hq, S) float32
    DELTA,  # rowsum(dO * O), (B, Hq, S) float32
    DQ,  # out: query gradient, (B, Hq, S, D) contiguous, input dtype
    KEEP,  # key-padding vector, (B, S) int8 (read only when HAS_KEEP)
    KV_LO,  # first attendable key per sequence, (B,) int32 (read only when HAS_KEEP)
    KV_HI,  # one past the last attendable key per sequence, (B,) int32 (read only when HAS_KEEP)
    scale, qk_scale,  # softmax scale, and scale * log2(e)
    S, H_Q, GROUP,  # sequence length, query heads, query heads per kv head
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)  # b * Hq + h
    b, q_base, kv_base = _query_head(pid_bh, S, H_Q, GROUP, HEAD_DIM)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_off = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_off, mask=offs_m[:, None] < S, other=0.0)
    do = tl.load(DO + q_off, mask=offs_m[:, None] < S, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * S + offs_m, mask=offs_m < S, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * S + offs_m, mask=offs_m < S, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, hi = _key_range(KV_LO, KV_HI, b, (pid_m + 1) * BLOCK_M, S, BLOCK_N, CAUSAL, HAS_KEEP)
    for start_n in range(lo, hi, BLOCK_N):  # fixed order: left to right, no atomics
        offs_n = start_n + tl.arange(0, BLOCK_N)
        _, k, v = _load_kv(K, V, kv_base, offs_n, offs_d, S, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = _valid(KEEP, b, offs_m[:, None], offs_n[None, :], S, CAUSAL, HAS_KEEP)
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * scale
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < S)


# ================================================================================================
# configs and host wrappers
# ================================================================================================


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters of one (head dim, dtype): block sizes, warps and pipeline stages per kernel.

    ``fwd_*``: forward (queries x keys per tile); ``dkdv_*``: the dK/dV kernel (also the atomic twin's
    dQ); ``dq_*``: the deterministic dQ kernel and the ``delta`` pre-pass. ``dot_precision`` is
    ``tl.dot``'s ``input_precision`` ("ieee" = no TF32 for float32 inputs; 16-bit inputs ignore it).
    The block sizes fix every reduction order; warps and stages only change speed.
    """

    fwd_block_m: int
    fwd_block_n: int
    fwd_warps: int
    fwd_stages: int
    dkdv_block_m: int
    dkdv_block_n: int
    dkdv_warps: int
    dkdv_stages: int
    dq_block_m: int
    dq_block_n: int
    dq_warps: int
    dq_stages: int
    dot_precision: str = "ieee"

    def __post_init__(self) -> None:
        for name in ("fwd_block_m", "fwd_block_n", "dkdv_block_m", "dkdv_block_n", "dq_block_m", "dq_block_n"):
            n = getattr(self, name)
            if n < 16 or n & (n - 1):
                raise ValueError(f"AttentionConfig.{name} must be a power of two >= 16 (tl.dot tiles), got {n}")
        for name in ("fwd_warps", "dkdv_warps", "dq_warps"):
            n = getattr(self, name)
            if n < 1 or n & (n - 1):
                raise ValueError(f"AttentionConfig.{name} must be a power of two, got {n}")
        if self.dot_precision not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(
                f"AttentionConfig.dot_precision must be 'ieee', 'tf32' or 'tf32x3', got {self.dot_precision!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _cfg(fwd, dkdv, dq) -> AttentionConfig:
    return AttentionConfig(*fwd, *dkdv, *dq)


# (head_dim, dtype) -> config, for Hopper (sm_90, H200) and every GPU of compute capability 9 and above.
# Tuples are (block_m, block_n, num_warps, num_stages). Chosen, not timed: no GPU was at hand. 16-bit
# inputs run on wgmma; their forward keeps the 128-row query tile of the Triton tutorial. float32
# inputs use IEEE (FMA) dots, whose operands live in registers, hence the small tiles. Under the CPU
# interpreter warps and stages are ignored; the block sizes still apply.
#
# No register spills: `python -m kernels.aot` compiles every variant the wrappers launch at Qwen shapes
# (causal, padded or not, deterministic or atomic) for sm_80 and sm_90a and fails on any spill, with
# Triton 3.6 and 3.8 (results/aot-triton*.md). ptxas trades a few bytes of spills for occupancy near its
# register targets, differently per Triton version and architecture, so the float32 backward needed
# these changes (in brackets the spill stores per thread before):
#   dQ, head dims 64 and 128: 4 warps and 3 stages (were 4 warps 2 stages at 64, spilling 4 B on sm_80
#     with Triton 3.6; 8 warps 2 stages at 128, spilling up to 20 B on sm_90a and 12 B on sm_80).
#     The delta pre-pass runs with dq_warps: its row sum keeps its order (warps only split the rows).
#   dK/dV, head dim 64: 8 warps (were 4: up to 16 B on sm_90a and 20 B on sm_80 with Triton 3.8);
#     sm_80 also needs block_n 16 (CONFIGS_SM80).
#   dK/dV, head dim 128: 16x16 tiles, 4 warps, 1 stage on sm_90 (were 32x16, 8 warps, 2 stages: up to
#     12 B on sm_90a and 24 B on sm_80); 32x16, 8 warps, 1 stage on sm_80 (CONFIGS_SM80).
# No single config for the dK/dV kernel was free of spills on both architectures with both Triton
# versions (block sizes 16 to 64, 2 to 16 warps and 1 to 3 stages were tried, not every combination),
# hence CONFIGS_SM80. On the GPU none of these changes should change the reduction order: warps and
# stages only schedule, and each accumulating dot takes its accumulator (dv = tl.dot(p, do, dv) in
# Triton's IR), so a float32 dK, dV or dQ element is one FMA chain over the queries or keys in order,
# whatever the block sizes cut it into; a block that only adds masked-out zeros may be visited or not.
# (Reasoned from the IR, not compared bit for bit on a GPU: none was at hand. Under the CPU interpreter,
# whose dots are numpy products added to the accumulator, the block sizes do change the bits.) The
# atomic twin's dQ partials are grouped by the dK/dV kernel's block_n, so its run-dependent sums are
# grouped differently.
_CFG16 = {
    16: _cfg((64, 64, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2)),
    64: _cfg((128, 64, 8, 3), (32, 64, 8, 3), (64, 64, 8, 3)),
    128: _cfg((128, 64, 8, 3), (16, 64, 8, 3), (64, 16, 8, 3)),
}
_CFG32 = {
    16: _cfg((64, 64, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2)),
    64: _cfg((32, 32, 4, 2), (16, 32, 8, 2), (32, 32, 4, 3)),
    128: _cfg((32, 16, 8, 2), (16, 16, 4, 1), (32, 32, 4, 3)),
}
# Compute capability 8.x and below (A100): Hopper's configs but for the float32 dK/dV kernel.
_CFG32_SM80 = {
    **_CFG32,
    64: _cfg((32, 32, 4, 2), (16, 16, 8, 2), (32, 32, 4, 3)),
    128: _cfg((32, 16, 8, 2), (32, 16, 8, 1), (32, 32, 4, 3)),
}
# Shared memory per program, sm_90a (an sm_90 block may use up to 227 KiB; less leaves room for a
# second block per SM). Counted by hand from the block sizes, Q (and dO) once plus num_stages copies
# of the tiles the loop loads, the 16-bit head-dim-128 forward needs Q 128x128x2 B = 32 KiB plus 3
# stages x (K + V, 2 x 64x128x2 B = 32 KiB) = 128 KiB, its dK/dV kernel K + V 2 x 64x128x2 B = 32 KiB
# plus 3 stages x (Q + dO, 2 x 16x128x2 B = 8 KiB) = 56 KiB, and its dQ kernel Q + dO 2 x 64x128x2 B =
# 32 KiB plus 3 stages x (K + V, 2 x 16x128x2 B = 8 KiB) = 56 KiB. That is what Triton 3.6 and 3.8
# allocate for the launches the wrappers make (16-byte aligned pointers, lengths that are multiples
# of 16, warp size 32: the loop's loads are pipelined): 128, 56.25 and 56 KiB, and 80.25 KiB for the
# atomic twin's dK/dV kernel (it also adds dQ). Compiled without the divisibility attributes, as an
# earlier version of the test below did, the loads are not pipelined and about half is allocated.
# float32 (FMA dots) allocates less than such a count. SHARED_KIB_SM90 below has every figure, the same
# with Triton 3.6 and 3.8; the largest is 128 KiB, the 16-bit head-dim-128 forward.
# tests/test_kernel_attention.py checks them by compiling, for sm_90a, the launches kernels.aot
# records from the real wrappers.
#
# (head dim, bytes per element) -> KiB of shared memory of (forward, dK/dV, dQ) on sm_90a, the largest
# over the padded/unpadded and deterministic/atomic variants of the causal launches (float16 and
# bfloat16 alike), at Qwen's head dims. A record of the configs above, not a limit anything enforces.
SHARED_KIB_SM90: dict[tuple[int, int], tuple[float, float, float]] = {
    (64, 2): (64.0, 56.5, 64.0),
    (128, 2): (128.0, 80.25, 56.0),
    (64, 4): (28.125, 26.125, 52.0),
    (128, 4): (34.125, 33.0, 100.0),
}
CONFIGS: dict[tuple[int, torch.dtype], AttentionConfig] = {
    **{(d, torch.float16): c for d, c in _CFG16.items()},
    **{(d, torch.bfloat16): c for d, c in _CFG16.items()},
    **{(d, torch.float32): c for d, c in _CFG32.items()},
}
CONFIGS_SM80: dict[tuple[int, torch.dtype], AttentionConfig] = {
    **CONFIGS,
    **{(d, torch.float32): c for d, c in _CFG32_SM80.items()},
}
HEAD_DIMS = tuple(sorted({d for d, _ in CONFIGS}))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# assume_capability / device_capability (kernels._common): the compute capability a launch's config is chosen
# for, re-exported here for callers that enter it per module (kernels.aot).


def config_for(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] = (9, 0)) -> AttentionConfig:
    """The fixed launch config for this head dim and dtype on a GPU of compute capability ``capability``
    (:data:`CONFIGS` from 9.0 on, :data:`CONFIGS_SM80` below; ValueError if unsupported)."""
    try:
        return (CONFIGS_SM80 if capability[0] < 9 else CONFIGS)[(head_dim, dtype)]
    except KeyError:
        if dtype not in DTYPES:
            raise ValueError(
                f"attention (triton): dtype {dtype} is not supported (float32, float16, bfloat16); "
                f"cast the inputs or use the eager or sdpa backend"
            ) from None
        raise ValueError(
            f"attention (triton): head_dim {head_dim} is not supported (supported: "
            f"{', '.join(map(str, HEAD_DIMS))}); use the eager or sdpa backend"
        ) from None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"attention (triton): {name} must be a 4-D tensor (B, H, S, D), got {shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention (triton): q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in DTYPES:
        config_for(q.shape[-1], q.dtype)  # raises the dtype message
    if k.shape != v.shape:
        raise ValueError(f"attention (triton): k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, hq, s, d), (bk, hkv, sk, dk) = q.shape, k.shape
    if (b, s, d) != (bk, sk, dk):
        raise ValueError(
            f"attention (triton): q (B, Hq, S, D) = {tuple(q.shape)} and k/v (B, Hkv, S, D) = {tuple(k.shape)} "
            f"must agree in B, S and D"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"attention (triton): query heads ({hq}) must be a multiple of kv heads ({hkv}) for grouped-query attention"
        )
    config_for(d, q.dtype)  # raises the head-dim message
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"attention (triton): scale must be a finite Python number, got {scale!r}")
    check_device(q, k, v, op="attention")
    if b * hq > 65535:
        raise ValueError(f"attention (triton): B * Hq = {b * hq} exceeds the 65535 grid limit; split the batch")


def key_padding_from_mask(attn_mask: torch.Tensor, batch: int, seq: int) -> tuple[bool, torch.Tensor]:
    """Read ``attn_mask`` as (causal, keep): ``mask[b,0,i,j] == keep[b,j] and (j <= i if causal)``.

    ``keep`` is (batch, seq) bool. Raises ValueError if the mask has any other structure.
    """
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
        got = attn_mask.dtype if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
        raise ValueError(f"attention (triton): attn_mask must be a bool tensor (True = attend), got {got}")
    if attn_mask.dim() != 4 or attn_mask.shape[0] not in (1, batch) or tuple(attn_mask.shape[1:]) != (1, seq, seq):
        raise ValueError(
            f"attention (triton): attn_mask must have shape (B or 1, 1, S, S) = ({batch}, 1, {seq}, {seq}), "
            f"got {tuple(attn_mask.shape)}"
        )
    if seq == 0:
        return True, attn_mask.new_ones(batch, 0)
    m = attn_mask[:, 0]
    keep = m[:, -1, :]  # the last query row sees every key under both structures
    if torch.equal(m, torch.ones(seq, seq, dtype=torch.bool, device=m.device).tril() & keep[:, None, :]):
        causal = True
    elif torch.equal(m, keep[:, None, :].expand_as(m)):
        causal = False
    else:
        raise ValueError(
            "attention (triton): attn_mask must be a key-padding mask, optionally combined with causality "
            "(mask[b,0,i,j] == keep[b,j] and j <= i); for arbitrary masks use the 'eager' or 'sdpa' backend"
        )
    return causal, keep.expand(batch, seq)


def _key_padding_args(keep: torch.Tensor | None):
    """(keep int8, kv_lo int32, kv_hi int32) for the kernels; all None without a key-padding mask."""
    if keep is None or bool(keep.all()):  # nothing padded: the unmasked kernels give the same bits
        return None, None, None
    s = keep.shape[1]
    idx = torch.arange(s, device=keep.device, dtype=torch.int32)
    kv_lo = torch.where(keep, idx, s).amin(1).to(torch.int32).contiguous()
    kv_hi = torch.where(keep, idx + 1, 0).amax(1).to(torch.int32).contiguous()
    return keep.to(torch.int8).contiguous(), kv_lo, kv_hi


# id(mask) -> (weak reference to it, its version counter, batch, seq, (causal, keep, kv_lo, kv_hi))
_MASK_CACHE: dict[int, tuple] = {}
_MASK_CACHE_SIZE = 16


def _mask_version(mask: torch.Tensor) -> int | None:
    try:
        return mask._version
    except RuntimeError:  # an inference-mode tensor has no version counter: never cached
        return None


def _forget_mask(key: int, ref) -> None:
    entry = _MASK_CACHE.get(key)
    if entry is not None and entry[0] is ref:
        del _MASK_CACHE[key]


def _mask_args(attn_mask: torch.Tensor, batch: int, seq: int) -> tuple:
    """(causal, keep int8, kv_lo, kv_hi) of a boolean mask: validated on its first use, then remembered.

    The validation (:func:`key_padding_from_mask`, :func:`_key_padding_args`) reads the mask back to the
    host; a later call with the same tensor, unchanged (same version counter), batch and sequence length
    reuses the result without touching the mask's values, so no device synchronisation happens there.
    """
    key, version = id(attn_mask), _mask_version(attn_mask)
    hit = _MASK_CACHE.get(key)
    if hit is not None and version is not None:
        ref, seen_version, seen_batch, seen_seq, args = hit
        if ref() is attn_mask and (seen_version, seen_batch, seen_seq) == (version, batch, seq):
            return args
    causal, keep = key_padding_from_mask(attn_mask, batch, seq)
    args = (causal, *_key_padding_args(keep))
    if version is not None:
        while len(_MASK_CACHE) >= _MASK_CACHE_SIZE:
            del _MASK_CACHE[next(iter(_MASK_CACHE))]
        ref = weakref.ref(attn_mask, lambda r, k=key: _forget_mask(k, r))
        _MASK_CACHE[key] = (ref, version, batch, seq, args)
    return args


def _keep_args(keep, kv_lo, kv_hi, dummy: torch.Tensor) -> tuple:
    """The kernels' KEEP, KV_LO, KV_HI arguments; without a mask ``dummy`` (never read) stands in for each."""
    return (keep, kv_lo, kv_hi) if keep is not None else (dummy, dummy, dummy)


def _attn_forward(q, k, v, scale, causal, keep, kv_lo, kv_hi, cfg: AttentionConfig):
    b, hq, s, d = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((b, hq, s), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(s, cfg.fwd_block_m), b * hq)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, *_keep_args(keep, kv_lo, kv_hi, lse),
        scale * LOG2E, s, hq, hq // k.shape[1],
        HEAD_DIM=d, BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n,
        CAUSAL=causal, HAS_KEEP=keep is not None, DOT_PRECISION=cfg.dot_precision,
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return o, lse


def _attn_backward(do, q, k, v, o, lse, scale, causal, keep, kv_lo, kv_hi, atomic: bool, cfg: AttentionConfig):
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    delta = torch.empty_like(lse)
    dummy = delta  # stands in for tensors a kernel never reads
    keep_args = _keep_args(keep, kv_lo, kv_hi, dummy)
    common = dict(HEAD_DIM=d, CAUSAL=causal, HAS_KEEP=keep is not None, DOT_PRECISION=cfg.dot_precision)

    _attn_bwd_delta_kernel[(triton.cdiv(s, cfg.dq_block_m), b * hq)](
        o, do, delta, s, HEAD_DIM=d, BLOCK_M=cfg.dq_block_m, num_warps=cfg.dq_warps, num_stages=1,
    )
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else dummy
    _attn_bwd_dkdv_kernel[(triton.cdiv(s, cfg.dkdv_block_n), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, dq_acc, *keep_args,
        scale, scale * LOG2E, s, hq, hq // hkv,
        BLOCK_M=cfg.dkdv_block_m, BLOCK_N=cfg.dkdv_block_n, ATOMIC_DQ=atomic, **common,
        num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages,
    )
    if atomic:
        dq = (dq_acc * scale).to(q.dtype)
    else:
        dq = torch.empty_like(q)
        _attn_bwd_dq_kernel[(triton.cdiv(s, cfg.dq_block_m), b * hq)](
            q, k, v, do, lse, delta, dq, *keep_args,
            scale, scale * LOG2E, s, hq, hq // hkv,
            BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, **common,
            num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
        )
    return dq, dk, dv


# ================================================================================================
# autograd
# ================================================================================================


class FlashAttentionFunction(torch.autograd.Function):
    """Forward and backward kernels tied together; inputs must already be checked and contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, keep, kv_lo, kv_hi, atomic, cfg):
        if q.numel() == 0:
            o, lse = torch.empty_like(q), torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        else:
            o, lse = _attn_forward(q, k, v, scale, causal, keep, kv_lo, kv_hi, cfg)
        ctx.save_for_backward(q, k, v, o, lse, keep, kv_lo, kv_hi)
        ctx.scale, ctx.causal, ctx.atomic, ctx.cfg = scale, causal, atomic, cfg
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, keep, kv_lo, kv_hi = ctx.saved_tensors
        if q.numel() == 0:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        else:
            dq, dk, dv = _attn_backward(
                do.contiguous(), q, k, v, o, lse, ctx.scale, ctx.causal, keep, kv_lo, kv_hi, ctx.atomic, ctx.cfg
            )
        return dq, dk, dv, None, None, None, None, None, None, None


# ================================================================================================
# public functions
# ================================================================================================


def flash_attention(q, k, v, *, scale, causal=True, attn_mask=None, atomic=False, config=None):
    """Attention through the Triton kernels; ``atomic`` picks the twin, ``config`` overrides the launch config.

    ``config=None`` uses :func:`config_for` for the device (the fixed, recorded choice). Passing another
    :class:`AttentionConfig` changes the block sizes and hence the reduction order (tests use small
    blocks to exercise many tiles on short sequences).
    """
    _check_inputs(q, k, v, scale)
    b, _, s, d = q.shape
    cfg = config_for(d, q.dtype, device_capability(q.device)) if config is None else config
    if not isinstance(cfg, AttentionConfig):
        raise ValueError(f"attention (triton): config must be an AttentionConfig, got {type(cfg).__name__}")
    keep = kv_lo = kv_hi = None
    if attn_mask is not None:
        check_device(q, attn_mask, op="attention")
        causal, keep, kv_lo, kv_hi = _mask_args(attn_mask, b, s)  # reads the mask back on its first use only
    return FlashAttentionFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), float(scale), bool(causal), keep, kv_lo, kv_hi,
        bool(atomic), cfg,
    )


def attention(q, k, v, *, scale, causal=True, attn_mask=None):
    """Flash-style attention with a deterministic backward (dQ and the GQA dK/dV sums without atomics)."""
    return flash_attention(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask, atomic=False)


def attention_atomic(q, k, v, *, scale, causal=True, attn_mask=None):
    """The same kernels, but dQ accumulated with ``tl.atomic_add`` across key blocks (FlashAttention-2 style)."""
    return flash_attention(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask, atomic=True)


def register(registry) -> None:
    """Add attention/triton (deterministic) and attention/triton-atomic (its atomic-dQ twin)."""
    register_twins(
        registry, "attention", attention, attention_atomic,
        det_description="detbench Triton flash attention; backward without atomics (dQ per query block, "
                        "GQA dK/dV summed in one program), fixed block sizes (kernels.attention.CONFIGS)",
        atomic_description="detbench Triton flash attention with dQ accumulated by tl.atomic_add across key "
                           "blocks (FlashAttention-2's default backward)",
    )
