"""Bitwise comparison of tensors: the one place that decides whether two results are the same.

Floats are compared as same-width integers, so NaN payloads and the sign of zero count, and NaN
equals NaN only when the bits are identical. ``ulp_distance`` maps bit patterns onto a monotonic
integer line, so the distance between neighbouring floats is 1 whatever their magnitude.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as a signed integer tensor of the same width (bool -> uint8)."""
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.is_floating_point() or t.is_complex():
        if t.is_complex():
            t = torch.view_as_real(t)
        return t.contiguous().view(_INT_OF[t.element_size()])
    return t


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when shapes, dtypes and every bit agree."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(bits(a), bits(b)))


def ordered(t: torch.Tensor) -> torch.Tensor:
    """Float bits mapped to int64 so that numeric order is integer order (-0.0 and +0.0 are 1 apart)."""
    i = bits(t).to(torch.int64)
    width = t.element_size() * 8
    sign = 1 << (width - 1)
    neg = i < 0
    # Negative floats: larger magnitude has larger unsigned bits; flip them below zero.
    return torch.where(neg, -(i + sign) - 1, i)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place (int64); NaN positions are meaningless."""
    if a.dtype != b.dtype:
        raise ValueError(f"ulp_distance needs one dtype, got {a.dtype} and {b.dtype}")
    return (ordered(a) - ordered(b)).abs()


@dataclass
class Mismatch:
    """How two tensors differ. All fields are plain Python values (JSON-ready)."""

    equal: bool
    shape: list[int]
    dtype: str
    n_diff: int
    n_total: int
    max_abs: float
    max_rel: float
    max_ulp: int
    nan_a: int
    nan_b: int
    inf_a: int
    inf_b: int
    worst: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.equal:
            return f"bitwise equal ({self.n_total} elements, {self.dtype})"
        head = (
            f"{self.n_diff}/{self.n_total} elements differ ({self.dtype}, shape {self.shape}): "
            f"max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e}, max ulp {self.max_ulp}"
        )
        if self.nan_a or self.nan_b or self.inf_a or self.inf_b:
            head += f"; NaN {self.nan_a}/{self.nan_b}, inf {self.inf_a}/{self.inf_b} (a/b)"
        worst = "; ".join(f"{w['index']}: {w['a']!r} vs {w['b']!r}" for w in self.worst)
        return f"{head}; worst: {worst}" if worst else head


def mismatch(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> Mismatch:
    """Compare ``a`` with ``b`` bit for bit and describe the difference (worst ``k`` indices).

    The one diff record of ``bench/`` (run-to-run, batch invariance, pinpoint). Computed on the
    tensors' device; only the ``k`` worst elements are read back. ``max_abs``, ``max_rel`` and
    ``max_ulp`` are over elements that are finite in both; NaN/inf counts are per side.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"dtypes differ: {a.dtype} vs {b.dtype}")
    a, b = a.detach(), b.detach()
    n = a.numel()
    shape, dtype = list(a.shape), str(a.dtype).replace("torch.", "")
    ba, bb = bits(a), bits(b)
    if torch.equal(ba, bb):  # same bits: one pass, and NaN/inf counts are the same on both sides
        nan = int(torch.isnan(a).sum()) if a.is_floating_point() else 0
        inf = int(torch.isinf(a).sum()) if a.is_floating_point() else 0
        return Mismatch(True, shape, dtype, 0, n, 0.0, 0.0, 0, nan, nan, inf, inf, [])
    diff_mask = ba != bb
    if a.is_complex():
        diff_mask = diff_mask.any(-1)
    n_diff = int(diff_mask.sum())
    if not a.is_floating_point():
        ad = (a.to(torch.float64) - b.to(torch.float64)).abs()
        return Mismatch(n_diff == 0, shape, dtype, n_diff, n, float(ad.max()) if n else 0.0, 0.0,
                        int(ad.max()) if n else 0, 0, 0, 0, 0, _worst(a, b, ad, diff_mask, k))
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    both_finite = torch.isfinite(a64) & torch.isfinite(b64)
    ad = torch.where(both_finite, (a64 - b64).abs(), torch.zeros_like(a64))
    rel = torch.where(both_finite, ad / b64.abs().clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(ad))
    ulps = torch.where(both_finite, ulp_distance(a, b), torch.zeros((), dtype=torch.int64, device=a.device))
    # A NaN/inf disagreement is the worst kind: rank it first.
    score = torch.where(diff_mask & ~both_finite, torch.full_like(ad, float("inf")), ad)
    return Mismatch(
        equal=n_diff == 0,
        shape=shape,
        dtype=dtype,
        n_diff=n_diff,
        n_total=n,
        max_abs=float(ad.max()) if n else 0.0,
        max_rel=float(rel.max()) if n else 0.0,
        max_ulp=int(ulps.max()) if n else 0,
        nan_a=int(torch.isnan(a64).sum()),
        nan_b=int(torch.isnan(b64).sum()),
        inf_a=int(torch.isinf(a64).sum()),
        inf_b=int(torch.isinf(b64).sum()),
        worst=_worst(a, b, score, diff_mask, k),
    )


def _worst(a, b, score, diff_mask, k) -> list[dict]:
    if k <= 0 or not bool(diff_mask.any()):
        return []
    flat = torch.where(diff_mask, score, torch.full_like(score, -1.0)).reshape(-1)
    idx = torch.topk(flat, min(k, int(diff_mask.sum()))).indices
    out = []
    for i in idx.tolist():
        coord = list(torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else []
        out.append({"index": [int(c) for c in coord], "a": a.reshape(-1)[i].item(), "b": b.reshape(-1)[i].item()})
    return out


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str = "tensors") -> None:
    """Raise AssertionError with a full mismatch report unless ``a`` and ``b`` are bitwise equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise AssertionError(f"{what}: shape/dtype differ: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
    m = mismatch(a, b)
    if not m.equal:
        raise AssertionError(f"{what}: {m}")
