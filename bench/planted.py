"""Planted faults: backends that are deliberately nondeterministic or batch-variant.

They are negative controls. A check that passes eager must flag these, or it proves nothing. Each
plants exactly one changing reduction order, by summing partial results in a freshly shuffled order
on every call (the shuffle comes from the OS, so seeding torch does not tame it):

==========================  =====================================================================
op / name                   where the fault is
==========================  =====================================================================
linear/planted-nondet       forward: x @ W.T summed over K-chunks in random order
linear/planted-nondet-bwd   backward: dW summed over row chunks in random order
linear/planted-batch-variant forward: K-chunk size chosen from the number of rows (deterministic
                            run to run, but a row's result depends on the batch it is in)
rmsnorm/planted-nondet-dw   backward: the weight gradient summed over row chunks in random order
attention/planted-nondet-bwd backward: dV summed over query chunks in random order
loss/planted-nondet         forward: the token sum of the mean summed in random chunk order
==========================  =====================================================================

They are not in the registry until :func:`register_planted` is called (tests and ``--plant``).
:func:`negative_control_subjects` says which subjects a run of them needs.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Sequence

import torch

from bench.subjects import SUBJECTS
from qwen_layers.backends import eager_rmsnorm, repeat_kv
from qwen_layers.registry import REGISTRY, Registry

_CHUNKS = 4
_sysrand = random.SystemRandom()


def shuffled_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """Sum ``parts`` left to right in a random order (float addition is not associative)."""
    order = list(range(len(parts)))
    _sysrand.shuffle(order)
    total = parts[order[0]]
    for i in order[1:]:
        total = total + parts[i]
    return total


def _chunks(n: int, k: int = _CHUNKS) -> list[slice]:
    step = max(1, -(-n // k))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def linear_nondet(x, weight, bias=None):
    """Linear whose forward sums K-chunks in random order."""
    parts = [x[..., s] @ weight[:, s].T for s in _chunks(x.shape[-1])]
    y = shuffled_sum(parts)
    return y if bias is None else y + bias


class _LinearNondetBwd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.T

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        dw = shuffled_sum([g2[s].T @ x2[s] for s in _chunks(x2.shape[0])])
        return g @ weight, dw


def linear_nondet_bwd(x, weight, bias=None):
    """Linear whose weight gradient sums row chunks in random order."""
    y = _LinearNondetBwd.apply(x, weight)
    return y if bias is None else y + bias


def linear_batch_variant(x, weight, bias=None):
    """Linear whose K-chunking depends on the number of rows (batch-variant)."""
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    chunks = 1 if rows < 4 else _CHUNKS  # like a split-K heuristic keyed on the problem shape
    y = None
    for s in _chunks(x.shape[-1], chunks):
        part = x[..., s] @ weight[:, s].T
        y = part if y is None else y + part
    return y if bias is None else y + bias


class _RMSNormNondetDW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return eager_rmsnorm(x, weight, eps)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            (dx,) = torch.autograd.grad(eager_rmsnorm(xd, weight.detach(), ctx.eps), xd, g)
        # dW = sum over rows of g * normalised(x); that row sum is the planted reduction.
        normed = eager_rmsnorm(x, torch.ones_like(weight), ctx.eps)
        prod = (g * normed).reshape(-1, g.shape[-1])
        dw = shuffled_sum([prod[s].sum(0) for s in _chunks(prod.shape[0])])
        return dx, dw, None


def rmsnorm_nondet_dw(x, weight, eps):
    """RMSNorm whose weight gradient sums rows in random chunk order."""
    return _RMSNormNondetDW.apply(x, weight, eps)


class _PVNondetDV(torch.autograd.Function):
    """probs @ v whose dV (a sum over queries) is reduced over query chunks in random order."""

    @staticmethod
    def forward(ctx, probs, v):
        ctx.save_for_backward(probs, v)
        return probs @ v

    @staticmethod
    def backward(ctx, g):
        probs, v = ctx.saved_tensors
        dprobs = g @ v.transpose(-1, -2)
        dv = shuffled_sum([probs[..., s, :].transpose(-1, -2) @ g[..., s, :] for s in _chunks(g.shape[-2])])
        return dprobs, dv


def attention_nondet_bwd(q, k, v, *, scale, causal=True, attn_mask=None):
    """Attention whose dV sums query chunks in random order."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is None and causal:
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return _PVNondetDV.apply(probs, v)


def loss_nondet(logits, labels, ignore_index=-100):
    """Cross entropy whose token sum is taken in random chunk order."""
    per_token = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    total = shuffled_sum([per_token[s].sum() for s in _chunks(per_token.shape[0], 64)])
    return total / (labels != ignore_index).sum()


PLANTED = {
    ("linear", "planted-nondet"): linear_nondet,
    ("linear", "planted-nondet-bwd"): linear_nondet_bwd,
    ("linear", "planted-batch-variant"): linear_batch_variant,
    ("rmsnorm", "planted-nondet-dw"): rmsnorm_nondet_dw,
    ("attention", "planted-nondet-bwd"): attention_nondet_bwd,
    ("loss", "planted-nondet"): loss_nondet,
}


def register_planted(registry: Registry = REGISTRY) -> list[tuple[str, str]]:
    """Add every planted backend to ``registry`` (default: the global one); idempotent."""
    for (op, name), fn in PLANTED.items():
        registry.register(op, name, fn, deterministic=False, origin="planted", replace=True,
                          description="negative control: " + (fn.__doc__ or name).strip().splitlines()[0])
    return list(PLANTED)


@contextlib.contextmanager
def planted_registered(enabled: bool = True) -> Iterator[list[tuple[str, str]]]:
    """The planted backends in the global registry for the duration of the block (``enabled=False``:
    nothing changes); the registry is restored in ``finally``. Yields the (op, name) pairs added."""
    if not enabled:
        yield []
        return
    with REGISTRY.scoped():
        yield register_planted()


def negative_control_subjects(backends: Sequence[str] | None, *, quick: bool) -> list[str] | None:
    """The subjects a negative-control run needs: for each op that has a planted backend among
    ``backends`` (any planted backend when ``backends`` is None), the first subject in SUBJECTS order
    whose primary op it is (the op on its own or in its smallest setting: one subject per op shows
    whether the checks catch the fault, and the quick ``linear`` subject alone, with its long K, takes
    minutes on a CPU). A run is a negative control when ``backends`` names only planted backends and
    eager (at least one planted), or names none and the run is ``quick``; None otherwise (every subject
    is wanted)."""
    planted_names = {name for _, name in PLANTED}
    if backends is None:
        if not quick:
            return None
        wanted = planted_names
    else:
        wanted = set(backends) & planted_names
        if not wanted or set(backends) - planted_names - {"eager"}:
            return None
    ops = {op for op, name in PLANTED if name in wanted}
    first = {}
    for s in SUBJECTS.values():
        first.setdefault(s.primary_op, s.name)
    return [name for name in first.values() if SUBJECTS[name].primary_op in ops]
