"""The checks: run-to-run, batch invariance, accuracy and cross-backend agreement, on bits.

Every "same or not" question is answered by :mod:`bench.compare` on integer views of the floats,
so NaN payloads and the sign of zero count. The statistics here run on the tensors' own device
(a GPU result is not copied to the CPU unless it differs and is small enough for a full
:func:`bench.compare.mismatch` report).

RNG use: every repeat is reseeded (``torch.manual_seed``), which is what makes a dropout comparable from
one repeat to the next; it also hides a kernel that draws its summation order from the global
generator. :func:`rng_states` before and :func:`rng_advanced` after the call under test name the default
generators the call consumed, so such a result can be labelled "deterministic given the seed".

How much a run-to-run verdict can miss: if each later repeat independently differs from repeat 0
with probability ``p``, all ``N - 1`` comparisons agree with probability ``(1 - p) ** (N - 1)``.
:func:`missable_fraction` is the ``p`` at which that chance is still ``risk`` (5 %): differences
rarer than that can pass unseen at least 5 % of the time. At N = 20 it is about 15 %.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bench.compare import mismatch
from bench.pinpoint.bounds import RISK, miss_sentence, missable_rate
from bench.pinpoint.fingerprint import Coefficients, fingerprints

# Full mismatch reports (worst indices, copied to the CPU in float64) only for tensors up to this size.
MISMATCH_REPORT_MAX_NUMEL = 1 << 22


def missable_fraction(n: int, risk: float = RISK) -> float | None:
    """Largest per-run difference rate that N identical repeats fail to reveal with probability >= risk.

    ``None`` for N < 2 (nothing was compared). N repeats make N - 1 comparisons with repeat 0
    (:func:`bench.pinpoint.bounds.missable_rate`, the model replay and trace-compare share).
    """
    if n < 2:
        return None
    return missable_rate(n - 1, risk)


def bound_sentence(n: int, risk: float = RISK) -> str:
    if n < 2:
        return f"N={n}: a single run cannot show run-to-run differences"
    return f"N={n}: {miss_sentence(n - 1, 'runs', risk)}"


# ------------------------------------------------------------------------------------------------
# bitwise statistics
# ------------------------------------------------------------------------------------------------

def count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, inf count)."""
    if not t.is_floating_point():
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


# ------------------------------------------------------------------------------------------------
# generator use
# ------------------------------------------------------------------------------------------------


def rng_states(device: torch.device | str) -> dict[str, torch.Tensor]:
    """The states of the default generators a call on ``device`` can draw from: the CPU's, and on a CUDA
    device that device's (``torch.manual_seed`` reseeds both). Copies; cheap (a few kB)."""
    device = torch.device(device)
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        states[f"cuda:{index}"] = torch.cuda.get_rng_state(index)
    return states


def rng_advanced(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """The generators of ``before`` whose state differs in ``after``: the ones the call in between drew from
    (or reseeded)."""
    return [name for name, state in before.items() if name not in after or not torch.equal(state, after[name])]


# ------------------------------------------------------------------------------------------------
# run to run
# ------------------------------------------------------------------------------------------------


@dataclass
class TensorRepeats:
    """Run-to-run statistics of one named tensor over the repeats added so far."""

    name: str
    shape: list[int]
    dtype: str
    repeats: int = 0
    n_equal_to_first: int = 0
    fingerprints: set = field(default_factory=set, repr=False)
    max_n_diff: int = 0
    max_abs: float = 0.0
    max_ulp: int = 0
    nan: int = 0
    inf: int = 0
    first_mismatch: dict | None = None

    @property
    def n_distinct(self) -> int:
        return len(self.fingerprints)

    @property
    def deterministic(self) -> bool:
        return self.n_equal_to_first == self.repeats


class RepeatTracker:
    """Feed it the results of each repeat (``{name: tensor}``); it compares each with repeat 0.

    Only repeat 0 is kept in memory; later repeats are reduced to statistics and a fingerprint
    (``bench.pinpoint``'s, the project's one fingerprint; distinct results collide with probability
    <= 2^-33 each). A tensor missing from a later repeat, or with another shape or dtype, counts as
    different.
    """

    def __init__(self) -> None:
        self.first: dict[str, torch.Tensor] = {}
        self.stats: dict[str, TensorRepeats] = {}
        self.repeats = 0
        self._coefficients = Coefficients()  # fingerprint coefficients, drawn once per tracker

    def _fingerprint(self, t: torch.Tensor):
        return fingerprints([t], self._coefficients)[0]

    def add(self, results: dict[str, torch.Tensor]) -> None:
        if self.repeats == 0:
            for name, t in results.items():
                st = TensorRepeats(name, list(t.shape), str(t.dtype).replace("torch.", ""))
                st.nan, st.inf = count_nonfinite(t)
                st.repeats, st.n_equal_to_first = 1, 1
                st.fingerprints.add(self._fingerprint(t))
                self.first[name] = t.detach()
                self.stats[name] = st
            self.repeats = 1
            return
        for name, st in self.stats.items():
            st.repeats += 1
            t = results.get(name)
            ref = self.first[name]
            if t is None or t.shape != ref.shape or t.dtype != ref.dtype:
                st.fingerprints.add(("missing-or-reshaped", self.repeats))
                st.max_n_diff = max(st.max_n_diff, ref.numel())
                continue
            d = mismatch(t, ref, k=0)
            if d.equal:  # same bits as repeat 0, hence the same fingerprint
                st.n_equal_to_first += 1
                continue
            st.fingerprints.add(self._fingerprint(t))
            st.max_n_diff = max(st.max_n_diff, d.n_diff)
            st.max_abs = max(st.max_abs, d.max_abs)
            st.max_ulp = max(st.max_ulp, d.max_ulp)
            if st.first_mismatch is None and t.numel() <= MISMATCH_REPORT_MAX_NUMEL:
                m = mismatch(t, ref).to_dict()
                m["repeat"] = self.repeats
                st.first_mismatch = m
        self.repeats += 1

    @property
    def deterministic(self) -> bool:
        return all(st.deterministic for st in self.stats.values())

    def worst(self) -> TensorRepeats | None:
        """The differing tensor with the most differing elements (None when all agree)."""
        bad = [st for st in self.stats.values() if not st.deterministic]
        return max(bad, key=lambda st: (st.max_n_diff, st.max_ulp)) if bad else None


# ------------------------------------------------------------------------------------------------
# accuracy and distance
# ------------------------------------------------------------------------------------------------


@dataclass
class Accuracy:
    rel_l2: float   # ||x - ref|| / ||ref|| in float64 (NaN if x has NaN)
    max_ulp: float  # max |x - ref| in units of the dtype's ulp at max(|ref|, rms(ref)); finite elements
    max_abs: float


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero, inf when only b is)."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    num = float(torch.linalg.vector_norm(a64 - b64))
    den = float(torch.linalg.vector_norm(b64))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def ulp_of(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` floats at each (float64, non-negative) ``magnitude``; subnormal spacing below tiny."""
    fi = torch.finfo(dtype)
    _, exp = torch.frexp(magnitude.clamp_min(fi.tiny))  # magnitude = m * 2**exp, m in [0.5, 1)
    return torch.ldexp(torch.full_like(magnitude, fi.eps), exp - 1)


def accuracy(x: torch.Tensor, ref: torch.Tensor) -> Accuracy:
    """Error of ``x`` against the float64 ``ref`` (same shape).

    ``max_ulp`` counts the error in units in the last place of ``x``'s dtype, taken at the larger of
    the reference value and the reference's RMS: a plain per-element ULP distance explodes where the
    reference crosses zero (a 1e-9 error on a 1e-30 value is billions of ULPs) and says nothing there.
    """
    if x.shape != ref.shape:
        raise ValueError(f"shape {tuple(x.shape)} vs reference {tuple(ref.shape)}")
    ref = ref.to(device=x.device, dtype=torch.float64)
    if ref.numel() == 0:
        return Accuracy(0.0, 0.0, 0.0)
    diff = x.detach().to(torch.float64) - ref
    num = float(torch.linalg.vector_norm(diff))
    den = float(torch.linalg.vector_norm(ref))
    rel = (0.0 if num == 0.0 else float("inf")) if den == 0.0 else num / den
    err = diff.abs_()
    finite = torch.isfinite(err)
    if not bool(finite.all()):
        err = torch.where(finite, err, torch.zeros((), dtype=err.dtype, device=err.device))
    rms = den / ref.numel() ** 0.5
    ulps = err / ulp_of(ref.abs().clamp_min_(rms), x.dtype)
    return Accuracy(rel, float(ulps.max()), float(err.max()))
