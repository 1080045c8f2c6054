"""Subjects: each Qwen op fed on its own, with realistic shapes from a config preset.

A :class:`Subject` names one piece of a Qwen block (``rmsnorm``, ``attention``, ``decoder-layer``...)
and the op its *backend axis* routes (its ``primary_op``): ``detbench run --backends sdpa`` runs the
attention subjects with ``attention=sdpa``. Every other op of the subject (``Subject.calls``) runs on
the backend the route gives it (``eager`` unless ``--route linear=triton`` says otherwise).

=================  ===========  ==========================================================  ========
subject            primary op   what is fed                                                 rows are
=================  ===========  ==========================================================  ========
rmsnorm            rmsnorm      hidden states (T, hidden) through one RMSNorm               tokens
rope               rope         q (B,Hq,S,D), k (B,Hkv,S,D) and their cos/sin tables        sequences
attention          attention    the core q,k,v -> o, causal, grouped-query                  sequences
attention-block    attention    projections, q/k-norm (Qwen3), rope, core, o_proj           sequences
mlp                linear       gate/up/down projections and SwiGLU (T, hidden)             tokens
decoder-layer      attention    norm, attention block, norm, MLP, residuals                 sequences
lm-head-loss       loss         final norm, the (tied) vocab x hidden head, cross entropy   tokens
embedding          embedding    token ids -> rows; backward is an index-add into the table  sequences
linear             linear       one projection x @ W.T (the MLP's down_proj shape)          tokens
=================  ===========  ==========================================================  ========

The backend axis of ``mlp`` is ``linear`` because its three projections are where its reductions
are (SwiGLU is elementwise); route SwiGLU with ``--route swiglu=NAME``.

Inputs and parameters are drawn once from seeded CPU generators in float32 and kept as masters;
:meth:`Case.instantiate` casts and moves copies, so every backend, dtype and repeat sees the same
values. Each repeat starts from fresh copies (:meth:`Instance.fresh`), so no gradient accumulates.

The upstream gradient is fixed too: drawn in float32 from a generator seeded by the seed and the
output's name, for the full batch, and sliced for sub-batches. The one exception is the scalar loss
of ``lm-head-loss``: its upstream gradient is the number of tokens it averages over, which makes
each token's gradient the gradient of its own loss term, independent of how many tokens share the
batch (that is what lets batch invariance be checked on it).
"""

from __future__ import annotations

import copy
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from bench.dtypes import DTYPES as ALL_DTYPES
from bench.dtypes import short_name
from bench.errors import InputError
from qwen_layers import registry
from qwen_layers.config import QwenConfig
from qwen_layers.model import (
    MLP,
    Attention,
    DecoderLayer,
    Embedding,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    Routed,
    init_weights,
    set_backends,
)

# ------------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------------

# The dtypes of ``detbench run``'s cells (names from bench.dtypes, the one table).
DTYPES: dict[str, torch.dtype] = {name: ALL_DTYPES[name] for name in ("fp32", "bf16", "fp16")}


def dtype_name(name: str) -> str:
    """Canonical dtype name (``fp32``/``bf16``/``fp16``) for a name or alias; InputError otherwise."""
    return short_name(name, choices=tuple(DTYPES))


# ------------------------------------------------------------------------------------------------
# small modules for the ops that are not a qwen_layers module on their own
# ------------------------------------------------------------------------------------------------


class RopeCall(Routed):
    """The ``rope`` op as a module (no parameters)."""

    def forward(self, q, k, cos, sin):
        return self.op("rope", q.device)(q, k, cos, sin)


class AttentionCore(Routed):
    """The ``attention`` op as a module: causal, grouped-query, no mask."""

    def __init__(self, scale: float, backends=None) -> None:
        super().__init__(backends)
        self.scale = scale

    def forward(self, q, k, v):
        return self.op("attention", q.device)(q, k, v, scale=self.scale, causal=True, attn_mask=None)


class LMHeadLoss(Routed):
    """Final RMSNorm, the LM head and the cross entropy, on flattened tokens.

    The head's weight is the (vocab, hidden) matrix that Qwen ties to the token embedding; fed on
    its own, the gradient reaching it is the head's part only.
    """

    def __init__(self, config: QwenConfig, backends=None) -> None:
        super().__init__(backends)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backends)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, backends)

    def forward(self, hidden, labels):
        logits = self.lm_head(self.norm(hidden))
        return self.op("loss", hidden.device)(logits, labels, ignore_index=-100)


# ------------------------------------------------------------------------------------------------
# subjects and cases
# ------------------------------------------------------------------------------------------------

PROFILES = ("quick", "cpu", "cuda")


@dataclass(frozen=True)
class Work:
    """Counted work of one forward and one backward (not measured)."""

    flops_fwd: int
    flops_bwd: int
    bytes_fwd: int
    bytes_bwd: int


@dataclass(frozen=True)
class Subject:
    name: str
    primary_op: str
    rowwise: bool  # batch rows are tokens (True) or whole sequences (False)
    bound: str     # "flops" or "bytes": which rate is meaningful
    description: str
    build: Callable[["QwenConfig", str, int], "Case"] = field(repr=False)
    # The other ops it calls, for a config (attention-block calls rmsnorm only for Qwen3's q/k-norm).
    others: Callable[["QwenConfig"], tuple[str, ...]] = field(default=lambda c: (), repr=False)

    def calls(self, config: QwenConfig) -> tuple[str, ...]:
        """Every op this subject calls for ``config``, its primary op first: ``--route`` can set the others."""
        return (self.primary_op, *(op for op in self.others(config) if op != self.primary_op))


@dataclass
class Case:
    """A subject built for one preset and shape profile: the float32 CPU masters and how to call them."""

    subject: Subject
    config: QwenConfig
    profile: str
    module: nn.Module                      # float32, CPU, seeded parameters
    inputs: dict[str, torch.Tensor]        # float32 / int64, CPU
    grad_inputs: tuple[str, ...]           # inputs whose gradient is checked
    batched_inputs: tuple[str, ...]        # inputs cut along dim 0 for sub-batches
    row_outputs: tuple[str, ...]           # outputs compared row by row for batch invariance
    call: Callable[[nn.Module, dict], dict[str, torch.Tensor]] = field(repr=False)
    work: Callable[[int, int], Work] = field(repr=False)  # (rows, element size) -> Work
    scalar_upstream: Callable[[dict], dict[str, float]] | None = field(default=None, repr=False)
    notes: str = ""
    seed: int = 0

    @property
    def rows(self) -> int:
        return int(self.inputs[self.batched_inputs[0]].shape[0])

    def batch_sizes(self) -> list[int]:
        """Awkward sub-batch sizes (1 row, 3 rows, 127 rows for token rows) below the full batch."""
        sizes = (1, 3, 127) if self.subject.rowwise else (1, 3)
        return [k for k in sizes if k < self.rows]

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.inputs.items()}

    def instantiate(self, dtype: torch.dtype, device: torch.device, route: dict[str, str]) -> "Instance":
        """Cast and move copies of the masters; route every op as ``route`` says."""
        module = copy.deepcopy(self.module).to(device=device, dtype=dtype)
        set_backends(module, route)
        inputs = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in self.inputs.items()}
        return Instance(self, module, inputs, dtype, torch.device(device))


@dataclass
class Instance:
    """A case cast to one dtype on one device, with one route. Every repeat takes fresh copies."""

    case: Case
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    dtype: torch.dtype
    device: torch.device
    _upstream: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def fresh(self, rows: int | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """New parameter leaves and input copies (the first ``rows`` rows of batched inputs)."""
        module = copy.deepcopy(self.module)
        inputs = {}
        for k, v in self.inputs.items():
            if rows is not None and k in self.case.batched_inputs:
                v = v[:rows]
            v = v.detach().clone()
            if k in self.case.grad_inputs:
                v.requires_grad_(True)
            inputs[k] = v
        return module, inputs

    def upstream(self, outputs: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                 rows: int | None) -> list[torch.Tensor]:
        """The fixed upstream gradient of each output (drawn for the full batch, cut to ``rows``)."""
        scalars = self.case.scalar_upstream(inputs) if self.case.scalar_upstream else {}
        grads = []
        for name, out in outputs.items():
            if name in scalars:
                grads.append(torch.tensor(scalars[name], dtype=out.dtype, device=out.device))
                continue
            if name not in self._upstream:
                if rows is not None:
                    raise RuntimeError("the full batch must run before a sub-batch (it fixes the upstream gradient)")
                gen = torch.Generator().manual_seed(self.case.seed + 2 + zlib.crc32(name.encode()))
                self._upstream[name] = torch.randn(out.shape, generator=gen).to(out.dtype).to(out.device)
            g = self._upstream[name]
            grads.append(g[:rows] if rows is not None else g)
        return grads

    def run(self, rows: int | None = None, backward: bool = True) -> dict[str, torch.Tensor]:
        """Forward (and backward with the fixed upstream gradient) on fresh copies.

        Returns every output (``out``...) and every gradient: ``grad.<input>`` for the inputs,
        ``grad.<parameter name>`` for the parameters; all detached.
        """
        module, inputs = self.fresh(rows)
        outputs = self.case.call(module, inputs)
        results = {name: t.detach() for name, t in outputs.items()}
        if backward:
            grads = self.upstream(outputs, inputs, rows)
            torch.autograd.backward(list(outputs.values()), grad_tensors=grads)
            for k in self.case.grad_inputs:
                if inputs[k].grad is not None:
                    results[f"grad.{k}"] = inputs[k].grad
            for n, p in module.named_parameters():
                if p.grad is not None:
                    results[f"grad.{n}"] = p.grad
        return results


# The seeds a case draws from: ``seed`` (parameters), ``seed + 1`` (inputs) and ``seed + 2 + crc32(name)``
# (each upstream gradient). torch's generators take [-2**63, 2**64), so ``seed`` must leave room for those.
SEED_MIN = -2 ** 63
SEED_MAX = 2 ** 64 - 1 - (2 + 0xFFFFFFFF)


def check_seed(seed: int, option: str = "--seed") -> int:
    """``seed`` if every seed derived from it fits torch's generators; InputError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX:
        raise InputError(f"{option} {seed}: must be between {SEED_MIN} and {SEED_MAX} (torch's generators take "
                         f"64-bit seeds, and the inputs and upstream gradients use seeds derived from it)")
    return seed


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _zipf_ids(n: int, vocab: int, gen: torch.Generator, shape) -> torch.Tensor:
    """Token ids with a Zipf-like frequency (repeats are common, as in text): rank r has weight 1/(r+1)."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, n, replacement=True, generator=gen)
    return ids.reshape(shape)


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    return init_weights(module, seed)


def _rope_tables(config: QwenConfig, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (batch, seq, head_dim) in float32 for positions 0..seq-1 (as the model computes them)."""
    rot = RotaryEmbedding(config.head_dim, config.rope_theta)
    pos = torch.arange(seq)[None].expand(batch, seq)
    return rot(torch.empty(0), pos)


# Sizes per profile: (rows,) for token-row subjects, (batch, seq) for sequence subjects.
SIZES: dict[str, dict[str, tuple[int, ...]]] = {
    "quick": {
        "rmsnorm": (256,), "rope": (4, 64), "attention": (4, 64), "attention-block": (4, 32),
        "mlp": (256,), "decoder-layer": (4, 32), "lm-head-loss": (256,), "embedding": (4, 64),
        "linear": (512,),
    },
    "cpu": {
        "rmsnorm": (2048,), "rope": (4, 256), "attention": (4, 256), "attention-block": (4, 128),
        "mlp": (512,), "decoder-layer": (4, 128), "lm-head-loss": (256,), "embedding": (4, 256),
        "linear": (2048,),
    },
    "cuda": {
        "rmsnorm": (16384,), "rope": (4, 2048), "attention": (4, 2048), "attention-block": (4, 2048),
        "mlp": (8192,), "decoder-layer": (4, 2048), "lm-head-loss": (4096,), "embedding": (4, 2048),
        "linear": (8192,),
    },
}

# In the quick profile the linear subject keeps a long reduction: K=4096 inputs, 512 rows. On CPUs
# and GPUs a 1-row product takes a different kernel (and summation order) from a 512-row one only
# when K is long enough to be split, which is the batch dependence this subject exists to show.
# (2048 rows until 2026-12: on CPUs without native bfloat16/float16 matmuls, such as AVX2-only AMD
# EPYC, its 6 reduced-precision cells took 5 of the quick run's 9 minutes.)
QUICK_LINEAR_K = 4096


def _attn_core_flops(b: int, hq: int, s: int, d: int) -> int:
    # Causal: half of the 2 (QK^T) + 2 (PV) multiply-adds per (query, key, dim) are needed.
    return 2 * b * hq * s * s * d


def _build_rmsnorm(c: QwenConfig, profile: str, seed: int) -> Case:
    (t,) = SIZES[profile]["rmsnorm"]
    module = _seeded(nn.ModuleDict({"norm": RMSNorm(c.hidden_size, c.rms_norm_eps)}), seed)
    x = torch.randn(t, c.hidden_size, generator=_gen(seed + 1))
    h = c.hidden_size

    def work(rows, e):
        return Work(0, 0, (2 * rows * h + h) * e, (3 * rows * h + 2 * h) * e)

    return Case(SUBJECTS["rmsnorm"], c, profile, module, {"x": x}, ("x",), ("x",), ("out",),
                lambda m, i: {"out": m["norm"](i["x"])}, work, seed=seed)


def _build_rope(c: QwenConfig, profile: str, seed: int) -> Case:
    b, s = SIZES[profile]["rope"]
    g = _gen(seed + 1)
    q = torch.randn(b, c.num_attention_heads, s, c.head_dim, generator=g)
    k = torch.randn(b, c.num_key_value_heads, s, c.head_dim, generator=g)
    cos, sin = _rope_tables(c, b, s)
    module = RopeCall()

    def call(m, i):
        qr, kr = m(i["q"], i["k"], i["cos"], i["sin"])
        return {"out.q": qr, "out.k": kr}

    def work(rows, e):
        nq = rows * c.num_attention_heads * s * c.head_dim
        nk = rows * c.num_key_value_heads * s * c.head_dim
        ncs = 2 * rows * s * c.head_dim
        return Work(0, 0, (2 * (nq + nk) + ncs) * e, (2 * (nq + nk) + ncs) * e)

    return Case(SUBJECTS["rope"], c, profile, module, {"q": q, "k": k, "cos": cos, "sin": sin},
                ("q", "k"), ("q", "k", "cos", "sin"), ("out.q", "out.k"), call, work, seed=seed)


def _build_attention(c: QwenConfig, profile: str, seed: int) -> Case:
    b, s = SIZES[profile]["attention"]
    g = _gen(seed + 1)
    q = torch.randn(b, c.num_attention_heads, s, c.head_dim, generator=g)
    k = torch.randn(b, c.num_key_value_heads, s, c.head_dim, generator=g)
    v = torch.randn(b, c.num_key_value_heads, s, c.head_dim, generator=g)
    module = AttentionCore(c.head_dim ** -0.5)

    def work(rows, e):
        f = _attn_core_flops(rows, c.num_attention_heads, s, c.head_dim)
        io = rows * s * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        return Work(f, int(2.5 * f), io * e, 2 * io * e)

    return Case(SUBJECTS["attention"], c, profile, module, {"q": q, "k": k, "v": v}, ("q", "k", "v"),
                ("q", "k", "v"), ("out",), lambda m, i: {"out": m(i["q"], i["k"], i["v"])}, work, seed=seed,
                notes="FLOPs counted for the causal half (the flash-attention convention); backward = 2.5x forward")


def _proj_flops(c: QwenConfig, tokens: int) -> int:
    h, d = c.hidden_size, c.head_dim
    return 2 * tokens * h * (c.num_attention_heads * d + 2 * c.num_key_value_heads * d) \
        + 2 * tokens * c.num_attention_heads * d * h


def _build_attention_block(c: QwenConfig, profile: str, seed: int) -> Case:
    b, s = SIZES[profile]["attention-block"]
    module = _seeded(Attention(c), seed)
    x = torch.randn(b, s, c.hidden_size, generator=_gen(seed + 1))
    cos, sin = _rope_tables(c, 1, s)

    def work(rows, e):
        proj = _proj_flops(c, rows * s)
        core = _attn_core_flops(rows, c.num_attention_heads, s, c.head_dim)
        params = sum(p.numel() for p in module.parameters())
        return Work(proj + core, 2 * proj + int(2.5 * core), (2 * rows * s * c.hidden_size + params) * e,
                    (3 * rows * s * c.hidden_size + 2 * params) * e)

    return Case(SUBJECTS["attention-block"], c, profile, module, {"x": x, "cos": cos, "sin": sin}, ("x",),
                ("x",), ("out",), lambda m, i: {"out": m(i["x"], i["cos"], i["sin"])}, work, seed=seed)


def _build_mlp(c: QwenConfig, profile: str, seed: int) -> Case:
    (t,) = SIZES[profile]["mlp"]
    module = _seeded(MLP(c), seed)
    x = torch.randn(t, c.hidden_size, generator=_gen(seed + 1))
    h, i_ = c.hidden_size, c.intermediate_size

    def work(rows, e):
        f = 3 * 2 * rows * h * i_
        return Work(f, 2 * f, (2 * rows * h + 3 * h * i_ + 3 * rows * i_) * e,
                    (3 * rows * h + 6 * h * i_ + 6 * rows * i_) * e)

    return Case(SUBJECTS["mlp"], c, profile, module, {"x": x}, ("x",), ("x",), ("out",),
                lambda m, i: {"out": m(i["x"])}, work, seed=seed)


def _build_decoder_layer(c: QwenConfig, profile: str, seed: int) -> Case:
    b, s = SIZES[profile]["decoder-layer"]
    module = _seeded(DecoderLayer(c), seed)
    x = torch.randn(b, s, c.hidden_size, generator=_gen(seed + 1))
    cos, sin = _rope_tables(c, 1, s)

    def work(rows, e):
        t = rows * s
        proj = _proj_flops(c, t) + 3 * 2 * t * c.hidden_size * c.intermediate_size
        core = _attn_core_flops(rows, c.num_attention_heads, s, c.head_dim)
        params = sum(p.numel() for p in module.parameters())
        return Work(proj + core, 2 * proj + int(2.5 * core), (2 * t * c.hidden_size + params) * e,
                    (3 * t * c.hidden_size + 2 * params) * e)

    return Case(SUBJECTS["decoder-layer"], c, profile, module, {"x": x, "cos": cos, "sin": sin}, ("x",),
                ("x",), ("out",), lambda m, i: {"out": m(i["x"], i["cos"], i["sin"])}, work, seed=seed)


def _build_lm_head_loss(c: QwenConfig, profile: str, seed: int) -> Case:
    (t,) = SIZES[profile]["lm-head-loss"]
    module = _seeded(LMHeadLoss(c), seed)
    g = _gen(seed + 1)
    hidden = torch.randn(t, c.hidden_size, generator=g)
    labels = _zipf_ids(t, c.vocab_size, g, (t,))
    h, v = c.hidden_size, c.vocab_size

    def work(rows, e):
        f = 2 * rows * h * v
        return Work(f, 2 * f, (rows * h + h * v + rows * v) * e, (2 * rows * h + 2 * h * v + 2 * rows * v) * e)

    return Case(SUBJECTS["lm-head-loss"], c, profile, module, {"hidden": hidden, "labels": labels}, ("hidden",),
                ("hidden", "labels"), (), lambda m, i: {"loss": m(i["hidden"], i["labels"])}, work,
                scalar_upstream=lambda i: {"loss": float((i["labels"] != -100).sum())}, seed=seed,
                notes="upstream gradient of the mean loss = number of tokens, so each token's gradient is "
                      "that of its own loss term; batch invariance compares grad.hidden rows")


def _build_embedding(c: QwenConfig, profile: str, seed: int) -> Case:
    b, s = SIZES[profile]["embedding"]
    module = _seeded(Embedding(c.vocab_size, c.hidden_size), seed)
    ids = _zipf_ids(b * s, c.vocab_size, _gen(seed + 1), (b, s))
    h, v = c.hidden_size, c.vocab_size

    def work(rows, e):
        t = rows * s
        return Work(0, 0, 2 * t * h * e + 8 * t, (t * h + v * h) * e + 8 * t)

    return Case(SUBJECTS["embedding"], c, profile, module, {"ids": ids}, (), ("ids",), ("out",),
                lambda m, i: {"out": m(i["ids"])}, work, seed=seed,
                notes="ids drawn Zipf-like, so many rows of the table receive several gradient rows")


def _build_linear(c: QwenConfig, profile: str, seed: int) -> Case:
    (t,) = SIZES[profile]["linear"]
    k = QUICK_LINEAR_K if profile == "quick" else c.intermediate_size
    n = c.hidden_size
    module = _seeded(Linear(k, n), seed)
    x = torch.randn(t, k, generator=_gen(seed + 1))

    def work(rows, e):
        f = 2 * rows * k * n
        return Work(f, 2 * f, (rows * k + k * n + rows * n) * e, (2 * rows * k + 2 * k * n + rows * n) * e)

    notes = (f"K={k} (fixed in the quick profile so the reduction is long enough to be split), N={n}"
             if profile == "quick" else f"the MLP's down_proj: K=intermediate_size={k}, N=hidden_size={n}")
    return Case(SUBJECTS["linear"], c, profile, module, {"x": x}, ("x",), ("x",), ("out",),
                lambda m, i: {"out": m(i["x"])}, work, seed=seed, notes=notes)


def _block_ops(c: QwenConfig) -> tuple[str, ...]:
    return ("linear", *(("rmsnorm",) if c.qk_norm else ()), "rope")


SUBJECTS: dict[str, Subject] = {s.name: s for s in (
    Subject("rmsnorm", "rmsnorm", True, "bytes", "RMSNorm over the hidden size", _build_rmsnorm),
    Subject("rope", "rope", False, "bytes", "rotary embedding of q and k", _build_rope),
    Subject("attention", "attention", False, "flops", "attention core q,k,v -> o, causal, GQA", _build_attention),
    Subject("attention-block", "attention", False, "flops",
            "q/k/v projections, q/k-norm, rope, attention core, o_proj", _build_attention_block, _block_ops),
    Subject("mlp", "linear", True, "flops", "SwiGLU MLP: gate/up/down projections", _build_mlp,
            lambda c: ("swiglu",)),
    Subject("decoder-layer", "attention", False, "flops",
            "pre-norm decoder layer: attention block and MLP with residuals", _build_decoder_layer,
            lambda c: ("rmsnorm", "linear", "rope", "swiglu")),
    Subject("lm-head-loss", "loss", True, "flops", "final norm, tied LM head, cross entropy over the vocabulary",
            _build_lm_head_loss, lambda c: ("rmsnorm", "linear")),
    Subject("embedding", "embedding", False, "bytes", "token embedding; backward is an index-add",
            _build_embedding),
    Subject("linear", "linear", True, "flops", "one projection x @ W.T", _build_linear),
)}


def build_case(subject: str, config: QwenConfig, profile: str, seed: int = 0) -> Case:
    """Draw the float32 CPU masters of ``subject`` for ``config`` at the sizes of ``profile``."""
    if profile not in PROFILES:
        raise ValueError(f"unknown shape profile {profile!r}; choose from: {', '.join(PROFILES)}")
    return SUBJECTS[subject].build(config, profile, seed)


# ------------------------------------------------------------------------------------------------
# the float64 reference
# ------------------------------------------------------------------------------------------------

REFERENCE_BACKEND = "float64-reference"


def _ref_attention(q, k, v, *, scale, causal=True, attn_mask=None):
    """Attention in the inputs' dtype throughout (eager upcasts its softmax only to float32)."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is None and causal:
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _ref_rmsnorm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _ref_loss(logits, labels, ignore_index=-100):
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="mean")


# The eager rmsnorm/attention/loss compute in float32 by design (as transformers does); a float64
# reference needs versions that do not. Every other op's eager entry is exact in float64.
_REFERENCE_OPS = {"attention": _ref_attention, "rmsnorm": _ref_rmsnorm, "loss": _ref_loss}


@contextmanager
def reference_route() -> Iterator[dict[str, str]]:
    """Register the float64 reference entries and yield the all-reference route.

    The entries live in the registry only inside the ``with`` block (``registry.scoped``).
    """
    with registry.scoped():
        for op, fn in _REFERENCE_OPS.items():
            registry.register(op, REFERENCE_BACKEND, fn, deterministic=True, origin="detbench-reference",
                              description="float64 reference used by detbench run", replace=True)
        yield {op: (REFERENCE_BACKEND if op in _REFERENCE_OPS else "eager") for op in registry.OPS}


# ------------------------------------------------------------------------------------------------
# dtype support probes
# ------------------------------------------------------------------------------------------------


def _probe_inputs(op: str, dtype: torch.dtype, device: torch.device):
    g = _gen(1234)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(dtype).to(device).requires_grad_(grad)

    if op == "attention":
        return (r(1, 4, 16, 16), r(1, 2, 16, 16), r(1, 2, 16, 16)), {"scale": 0.25, "causal": True}
    if op == "rmsnorm":
        return (r(4, 32), r(32), 1e-6), {}
    if op == "rope":
        cos, sin = _rope_tables(QwenConfig("qwen3", 16, 32, 64, 1, 4, 2, 16), 1, 16)
        return (r(1, 4, 16, 16), r(1, 2, 16, 16), cos.to(dtype).to(device), sin.to(dtype).to(device)), {}
    if op == "swiglu":
        return (r(4, 32), r(4, 32)), {}
    if op == "linear":
        return (r(16, 32), r(16, 32)), {}
    if op == "embedding":
        return (torch.tensor([1, 3, 3, 0], device=device), r(16, 32)), {}
    if op == "loss":
        return (r(16, 32), torch.randint(0, 32, (16,), generator=g).to(device)), {}
    raise ValueError(f"no probe for op {op!r}")


def probe(op: str, backend: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Run ``op``/``backend`` forward and backward on tiny inputs; None if it works, else the reason."""
    try:
        fn = registry.resolve(op, backend, device)
        args, kwargs = _probe_inputs(op, dtype, device)
        out = fn(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o.float().sum() for o in outs])
    except Exception as e:  # the backend's own words are the reason
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return None
