"""What a clean verdict rests on: how rare a difference can be and still go unseen.

One model for every check that compares evaluations of the same work (``detbench run``'s repeats,
replay's second run of each op, trace-compare's runs): a fault that makes a comparison differ in a
fraction ``p`` of comparisons, independently, is missed by ``k`` comparisons with probability
``(1 - p) ** k``. :func:`missable_rate` is the ``p`` at which that chance is still ``risk`` (5 %):
faults rarer than that can pass unseen at least 5 % of the time.

How many comparisons ``k`` a check made:

* ``detbench run`` with N repeats: N - 1 (each later repeat against repeat 0);
* replay: one per call of an op (each call is run twice), per op class;
* trace-compare with R runs: (R - 1) per call of an op in a run (each run against run 0).

A verdict is only as strong as its rarest compared op: the op class with the fewest comparisons
(the loss, called once per step, is often it). :func:`miss_sentence` says it in words.
"""

from __future__ import annotations

RISK = 0.05


def missable_rate(comparisons: int, risk: float = RISK) -> float | None:
    """Largest per-comparison difference rate that ``comparisons`` agreeing comparisons fail to reveal
    with probability >= ``risk``: ``1 - risk ** (1 / k)``. ``None`` for no comparison."""
    if comparisons < 1:
        return None
    return 1.0 - risk ** (1.0 / comparisons)


def percent(p: float) -> str:
    """``p`` as a percentage: whole percents from 1 % up (as ``detbench run`` has always printed them),
    two significant digits below (so a small bound never reads as 0 %)."""
    if p >= 0.01:
        return f"{p:.0%}"
    return f"{p * 100:.2g}%"


def miss_sentence(comparisons: int, of: str = "runs", risk: float = RISK) -> str:
    """"a difference occurring in fewer than 15% of runs could be missed with 5% probability" for
    ``comparisons`` agreeing comparisons (``of``: what the fraction counts - runs, calls)."""
    p = missable_rate(comparisons, risk)
    if p is None:
        return "nothing was compared, so no difference could be seen"
    return f"a difference occurring in fewer than {percent(p)} of {of} could be missed with {percent(risk)} probability"


def by_level(calls) -> dict[str, dict[str, int]]:
    """``{(level, op): k}`` as ``{level: {op: k}}``, ops sorted by name (JSON-friendly)."""
    out: dict[str, dict[str, int]] = {}
    for (level, op), k in sorted(calls.items()):
        out.setdefault(level, {})[op] = k
    return out


def class_bound(calls, per_call: int = 1, risk: float = RISK) -> dict:
    """The bound for the rarest op class. ``calls``: ``{(level, op): k}``, the calls of each op class that were
    compared (replay) or that ran in one run (trace-compare); ``per_call``: comparisons each call got (replay 1,
    trace-compare with R runs R - 1). ``rarest`` is None (and ``missable_rate`` too) when nothing was compared."""
    seen = [(k, level, op) for (level, op), k in calls.items() if k > 0]
    if not seen or per_call < 1:
        return {"risk": risk, "comparisons_per_call": per_call, "rarest": None, "missable_rate": None}
    k, level, op = min(seen)
    return {"risk": risk, "comparisons_per_call": per_call,
            "rarest": {"level": level, "op": op, "calls": k, "comparisons": k * per_call},
            "missable_rate": missable_rate(k * per_call, risk)}


def bound_lines(calls, per_call: int, what: str, risk: float = RISK) -> list[str]:
    """Lines for a clean report: the rarest op class's bound, the model behind it, and how many calls of
    every op class were compared (fewest first). ``what`` says what one comparison is (e.g. "a call
    against its replay")."""
    b = class_bound(calls, per_call, risk)
    r = b["rarest"]
    if r is None:
        return ["bound: no op was compared, so the verdict rests on nothing"]
    k = f"{r['calls']} call(s)" + (f" x {per_call} = {r['comparisons']} comparisons" if per_call > 1 else "")
    ranked = sorted(((k, _label(level, op)) for (level, op), k in calls.items() if k > 0))
    return [f"bound: the rarest op class, {_label(r['level'], r['op'])}, k = {k}: "
            f"{miss_sentence(r['comparisons'], 'its calls', risk)}",
            f"  (a fault that changes a fraction p of an op's calls goes unseen over k comparisons with probability "
            f"(1-p)^k; one comparison: {what})",
            "calls compared per op class: " + ", ".join(f"{label} {n}" for n, label in ranked)]


def _label(level: str, op: str) -> str:
    return op if level in ("aten", "registry") else f"{op} ({level})"
