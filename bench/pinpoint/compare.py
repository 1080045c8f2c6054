"""``compare_runs``: two or more traced runs aligned event by event; the root cause of their difference.

The runs (:func:`bench.pinpoint.trace.trace`) are aligned event by event and the report names the
*root cause* (the first event whose inputs were identical and whose outputs differ), the first module
whose output differs, and how far the difference spread (how many later ops differ). An event whose
outputs differ while its inputs differ too is a consequence, not a cause; when the very first
difference is such an event (its inputs came from identical values, wired differently), the report
says so: that is the signature of Python code combining identical partial results in another order.
``exact=True`` compares full copies instead of fingerprints and also reports how many elements differ
at the root cause. Runs whose outputs held a NaN (or whose result is NaN/inf) are *not comparable*
(equal NaN bits prove nothing): the report is then never "identical" and names where each run went
non-finite (:class:`bench.pinpoint.ops.NonFinite`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from bench.compare import mismatch
from bench.pinpoint.bounds import bound_lines, by_level, class_bound
from bench.pinpoint.fingerprint import COLLISION_BOUND, Coefficients
from bench.pinpoint.ops import NonFinite, op_info
from bench.pinpoint.trace import Trace, _coarse_trace, _trace
from bench.results import to_json


@dataclass
class PairComparison:
    """Run ``run_b`` against run ``run_a`` (0-based)."""

    run_a: int
    run_b: int
    events_a: int
    events_b: int
    aligned: int                            # events compared before the end or a control-flow change
    control_flow: dict | None               # first event where the runs ran different things
    identical: bool
    root_cause: dict | None                 # first event with identical inputs and different outputs
    root_cause_diff: dict | None            # exact mode: bench.compare.Mismatch of the differing output
    first_difference: dict | None           # first event whose outputs differ
    first_difference_note: str
    first_module: dict | None               # first module whose forward output differs
    first_module_note: str
    differing_events: int
    differing_ops_after_root: int           # aten ops after the root cause whose outputs differ
    ops_after_root: int

    def findings(self) -> list[tuple[str, dict]]:
        """(label, event) of the root cause, the first difference, the first module and the first
        control-flow change, those that exist."""
        rows = [("root cause", self.root_cause), ("first diff", self.first_difference),
                ("first module", self.first_module)]
        if self.control_flow is not None:
            rows.append(("control flow", self.control_flow.get("a")))
        return [(label, ev) for label, ev in rows if ev is not None]

    def notes(self) -> list[str]:
        """Indented lines: the findings' shapes, the spread, the notes and the root cause's difference."""
        lines = [f"  {label}: " + ", ".join(ev["inputs"][:4]) + (" ..." if len(ev["inputs"]) > 4 else "")
                 + " -> " + ", ".join(ev["outputs"][:3]) for label, ev in self.findings()]
        lines.append(f"  spread: {self.differing_events} of {self.aligned} aligned events differ; after the root "
                     f"cause {self.differing_ops_after_root} of {self.ops_after_root} aten ops differ")
        lines += ["  " + n for n in (self.first_difference_note, self.first_module_note) if n]
        if self.root_cause_diff is not None:
            m = self.root_cause_diff
            lines.append(f"  root cause output {m['output_index']}: {m['n_diff']}/{m['n_total']} elements differ, "
                         f"max abs {m['max_abs']:.3e}, max ulp {m['max_ulp']}")
        return lines


@dataclass
class _Alignment:
    """Two traces walked event by event: where they stop running the same things, and which events differ."""

    aligned: int                    # events compared before the end or a control-flow change
    control_flow: dict | None       # first event where the runs ran different things
    differing: list[int]            # aligned events whose outputs differ, in order
    root: int | None                # the first of them whose inputs are identical
    first_module: int | None        # the first of them that is a module's forward output

    @property
    def first(self) -> int | None:
        return self.differing[0] if self.differing else None


def _align(a: Trace, b: Trace) -> _Alignment:
    n = min(len(a.events), len(b.events))
    control = None
    aligned = n
    differing: list[int] = []
    root = first_mod = None
    for i in range(n):
        ea, eb = a.events[i], b.events[i]
        if ea.key() != eb.key():
            control = {"index": i, "a": ea.ref(), "b": eb.ref()}
            aligned = i
            break
        if ea.out_key == eb.out_key:
            continue
        differing.append(i)
        if root is None and ea.in_key == eb.in_key:
            root = i
        if first_mod is None and ea.kind == "module":
            first_mod = i
    if control is None and len(a.events) != len(b.events):
        control = {"index": n, "a": a.events[n].ref() if n < len(a.events) else None,
                   "b": b.events[n].ref() if n < len(b.events) else None}
    return _Alignment(aligned, control, differing, root, first_mod)


def _first_difference_note(a: Trace, al: _Alignment) -> str:
    """Why the first differing event is not the root cause ("" when it is, or when nothing differs)."""
    if al.first is None or al.first == al.root:
        return ""
    ev = a.events[al.first]
    return (f"{ev.op} at {ev.module or '<root>'} ({ev.phase}) is the first to differ, but its inputs differ "
            f"too although every earlier value agreed: identical partial results were combined in another "
            f"order" + (f" inside {ev.inside}" if ev.inside else ""))


def _first_module_note(a: Trace, al: _Alignment) -> str:
    """Where the difference starts, when that is not (before) a module's forward output ("" otherwise)."""
    if al.first is None:
        return ""
    start = al.root if al.root is not None else al.first
    ev = a.events[start]
    if al.first_module is None:
        return (f"no module's forward output differs; the difference starts in the {ev.phase} phase at "
                f"{ev.module or '<root>'}")
    if al.first_module < start or ev.phase == "forward":
        return ""
    later = a.events[al.first_module]
    return (f"the difference starts in the {ev.phase} phase at {ev.module or '<root>'} (its gradient "
            f"differs first); the first module whose forward output then differs is "
            f"{later.module or '<root>'}, event {later.index}")


def _root_cause_diff(a: Trace, b: Trace, root: int | None) -> dict | None:
    """Exact mode: the root cause's first differing output as a bench.compare.Mismatch (plus its index);
    None without a root cause, in fingerprint mode, or when the outputs cannot be compared element-wise."""
    if root is None or not a.exact:
        return None
    for j, (da, db) in enumerate(zip(a.events[root].out_key, b.events[root].out_key)):
        if da != db:
            ta, tb = _exact_tensor(a, root, j), _exact_tensor(b, root, j)
            if ta is not None and tb is not None and ta.shape == tb.shape and ta.dtype == tb.dtype:
                return {"output_index": j, **mismatch(ta, tb).to_dict()}
            return None
    return None


def _spread(a: Trace, al: _Alignment) -> tuple[int, int]:
    """(aten ops after the root cause whose outputs differ, aten ops after the root cause); (0, 0) without one."""
    if al.root is None:
        return 0, 0
    ops_after = sum(1 for i in range(al.root + 1, al.aligned) if a.events[i].kind == "aten")
    differing_after = sum(1 for i in al.differing if i > al.root and a.events[i].kind == "aten")
    return differing_after, ops_after


def _compare_pair(a: Trace, b: Trace, ia: int, ib: int) -> PairComparison:
    al = _align(a, b)
    differing_after, ops_after = _spread(a, al)

    def ref(i: int | None) -> dict | None:
        return a.events[i].ref() if i is not None else None

    return PairComparison(
        run_a=ia, run_b=ib, events_a=len(a.events), events_b=len(b.events), aligned=al.aligned,
        control_flow=al.control_flow, identical=not al.differing and al.control_flow is None,
        root_cause=ref(al.root), root_cause_diff=_root_cause_diff(a, b, al.root),
        first_difference=ref(al.first), first_difference_note=_first_difference_note(a, al),
        first_module=ref(al.first_module), first_module_note=_first_module_note(a, al),
        differing_events=len(al.differing), differing_ops_after_root=differing_after, ops_after_root=ops_after,
    )


def _exact_tensor(tr: Trace, index: int, j: int):
    return tr.raw_out[index][j] if tr.raw_out is not None else None


@dataclass
class CompareReport:
    """What :func:`compare_runs` found: every run compared with run 0."""

    runs: int
    exact: bool
    pairs: list[PairComparison]
    events: list[int]
    skipped: dict[str, int]
    seconds: float
    collision_bound: str
    non_finite: list[NonFinite] = field(default_factory=list)   # per run: where NaN / infinities first appeared
    value: Any = field(default=None, repr=False, compare=False)
    calls_per_run: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> op -> events in run 0
    #                                         (order-free aten ops left out: no order can change them)
    levels: str = "ops"          # what the runs' events are: "ops" (op by op) or "modules" (coarse=True,
    #                              identical: module outputs, registry calls, custom backwards, gradients, parameters)
    coarse: dict | None = None   # coarse=True and the coarse pass differed: its first difference, why op level ran

    def _calls(self) -> dict[tuple[str, str], int]:
        return {(kind, op): k for kind, ops in self.calls_per_run.items() for op, k in ops.items()}

    @property
    def bound(self) -> dict:
        """What "identical" rests on (:func:`bench.pinpoint.bounds.class_bound`): each call of an op in a later
        run was compared with the same call in run 0 (``runs - 1`` comparisons per call); the op class with
        the fewest calls bounds what could be missed. Order-free aten ops (pointwise, data movement) are not
        counted: no order can change them. ``collision_bound`` adds the fingerprints' own."""
        return {**class_bound(self._calls(), self.runs - 1), "collision": self.collision_bound}

    def bound_lines(self) -> list[str]:
        lines = bound_lines(self._calls(), self.runs - 1, f"a call against the same call of run 0, in each of "
                                                          f"{self.runs - 1} later run(s)")
        lines[-1] = lines[-1].replace("calls compared per op class", "calls per run per op class")
        if self.levels == "modules":
            lines = [line.replace("op class", "event class") for line in lines]
        return lines + ([] if self.exact else [f"collisions: {self.collision_bound}"])

    def coarse_line(self) -> str | None:
        """What the coarse pass found when it sent compare_runs to the op level (None otherwise)."""
        c = self.coarse
        if c is None:
            return None
        ev = c.get("first_difference")
        where = (f"{ev['op']} ({ev['kind']}) at {ev['module'] or '<root>'} ({ev['phase']}), event {ev['index']}"
                 if ev else "")
        return (f"coarse pass ({c['seconds']:.2f} s): {c['reason']}" + (f", first at {where}" if where else "")
                + "; the runs were traced again op by op (below)")

    @property
    def comparable(self) -> bool:
        """False when a run's outputs held a NaN (or its result a NaN/inf): equal bits prove nothing then."""
        return all(nf.comparable for nf in self.non_finite)

    @property
    def bitwise_equal(self) -> bool:
        """Every run's events agree with run 0's, bit for bit (NaN or not)."""
        return all(p.identical for p in self.pairs)

    @property
    def identical(self) -> bool:
        """The runs agree bit for bit over finite values: bitwise equal and comparable."""
        return self.bitwise_equal and self.comparable

    @property
    def first_non_finite(self) -> tuple[int, NonFinite] | None:
        """(run, its NonFinite) of the first run that is not comparable, or None."""
        return next(((i, nf) for i, nf in enumerate(self.non_finite) if not nf.comparable), None)

    @property
    def root_cause(self) -> dict | None:
        """The root cause of the first pair of runs that differ (None when all runs agree)."""
        for p in self.pairs:
            if not p.identical:
                return p.root_cause
        return None

    @property
    def first_differing(self) -> PairComparison | None:
        return next((p for p in self.pairs if not p.identical), None)

    def to_dict(self) -> dict:
        d = asdict(replace(self, value=None))  # fn's value is not serialised (nor deep-copied)
        del d["value"]
        d["method"] = "compare"
        d["bound"] = self.bound
        d["identical"] = self.identical
        d["comparable"] = self.comparable
        d["root_cause"] = self.root_cause
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(to_json(self.to_dict()), **kw)

    def summary(self) -> str:
        if self.identical and self.levels == "modules":
            return (f"trace-compare: {self.runs} runs identical in every one of {self.events[0]} coarse events "
                    f"(module outputs, registry calls, custom backwards, gradients, parameters; fingerprints); "
                    f"ops not traced")
        if self.identical:
            return (f"trace-compare: {self.runs} runs identical in every one of {self.events[0]} traced events "
                    f"({'exact' if self.exact else 'fingerprints'})")
        bad = self.first_non_finite
        non_finite = f"run {bad[0]}'s outputs became non-finite: {bad[1].sentence('event')}" if bad else ""
        if self.bitwise_equal:
            nan = bad[1].nan
            since = f"from event {nan['index']} on " if nan is not None else ""
            return (f"trace-compare: not comparable - {non_finite}; the {self.runs} runs agree bit for bit in all "
                    f"{self.events[0]} traced events, but {since}equal NaN bits hide any difference")
        p = self.first_differing
        if p.root_cause is not None:
            r = p.root_cause
            text = (f"trace-compare: root cause {r['op']} ({r['kind']}) at {r['module'] or '<root>'} ({r['phase']}), "
                    f"event {r['index']}; {p.differing_ops_after_root} of the {p.ops_after_root} later ops differ")
        elif p.control_flow is not None:
            text = f"trace-compare: the runs ran different ops from event {p.control_flow['index']} on"
        else:
            text = "trace-compare: outputs differ but no event with identical inputs and different outputs was found"
        return text + (f"; {non_finite}" if non_finite else "")

    def __str__(self) -> str:
        """Plain text: the summary, then each differing pair's findings and notes (the CLI draws tables)."""
        lines = [self.summary()]
        if self.identical:
            lines += self.bound_lines()
        if self.coarse_line():
            lines.append(self.coarse_line())
        for p in self.pairs:
            if p.identical:
                continue
            lines.append(f"runs {p.run_a} vs {p.run_b} ({'exact' if self.exact else 'fingerprints'}):")
            for label, ev in p.findings():
                lines.append(f"  {label}: event {ev['index']} {ev['op']} ({ev['kind']}) at {ev['module'] or '<root>'} "
                             f"({ev['phase']})")
            lines += p.notes()
        return "\n".join(lines) + "\n"


def compare_runs(fn: Callable, *args, runs: int = 2, exact: bool = False, setup: Callable[[], tuple] | None = None,
                 seed: int | None = 0, roots: Mapping[str, nn.Module] | None = None, coarse: bool = False,
                 **kwargs) -> CompareReport:
    """Run ``fn`` ``runs`` times under the tracer and compare every run with the first.

    ``fn`` must start from the same state each time: pass ``setup``, a function called (untraced)
    before each run whose return value (a tuple of arguments for ``fn``; anything else raises
    ``TypeError``) replaces ``args`` - e.g. one that builds a fresh model and optimizer. With ``seed``
    set, the global generators are seeded with it before each run (inside ``fork_rng``, so the
    caller's state is restored). ``exact=True`` compares full copies
    instead of fingerprints (memory: one CPU copy of every tensor the runs produce).

    ``coarse=True`` traces the runs coarsely first (``trace(..., coarse=True)``: module outputs,
    registry calls, custom backwards, gradients and parameters through hooks, no dispatch mode, about
    the cost of plain runs). When those agree bit for bit over finite values, that is the verdict
    (``levels == "modules"``: ops were not traced, so a difference no module output, gradient or
    parameter keeps is not seen); otherwise the runs are traced again op by op to name the root cause
    (``report.coarse`` says what the coarse pass saw).
    """
    if runs < 2:
        raise ValueError(f"compare_runs needs at least 2 runs, got {runs}")
    if coarse and exact:
        raise ValueError("compare_runs(coarse=True) fingerprints; it has no exact mode")
    coefficients = Coefficients()  # drawn once for all runs
    t0 = time.perf_counter()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []

    def traced(one: Callable[[tuple], Trace]) -> list[Trace]:
        out = []
        for _ in range(runs):
            run_args = _setup_args(setup) if setup is not None else args
            with torch.random.fork_rng(devices=devices):
                if seed is not None:
                    torch.manual_seed(seed)
                out.append(one(run_args))
        return out

    coarse_seen = None
    if coarse:
        traces = traced(lambda a: _coarse_trace(fn, a, kwargs, roots, coefficients))
        pairs = [_compare_pair(traces[0], traces[j], 0, j) for j in range(1, runs)]
        if all(p.identical for p in pairs) and all(t.non_finite.comparable for t in traces):
            calls = Counter((ev.kind, ev.op) for ev in traces[0].events)
            return CompareReport(runs, False, pairs, [len(t.events) for t in traces], {}, time.perf_counter() - t0,
                                 COLLISION_BOUND, [t.non_finite for t in traces], traces[0].value, by_level(calls),
                                 levels="modules")
        differing = next((p for p in pairs if not p.identical), None)
        coarse_seen = {"seconds": time.perf_counter() - t0,
                       "reason": "the runs differ" if differing is not None else "values became non-finite",
                       "first_difference": (differing.first_difference or (differing.control_flow or {}).get("a"))
                       if differing is not None else None}
    traces = traced(lambda a: _trace(fn, a, kwargs, exact, roots, coefficients))
    pairs = [_compare_pair(traces[0], traces[j], 0, j) for j in range(1, runs)]
    skipped: Counter = Counter()
    for tr in traces:
        skipped.update(tr.skipped)
    infos: dict = {}
    calls = Counter((ev.kind, ev.op) for ev in traces[0].events
                    if ev.kind != "aten" or not _order_free(ev.op, infos))
    return CompareReport(runs, exact, pairs, [len(t.events) for t in traces], dict(skipped),
                         time.perf_counter() - t0, "exact comparison" if exact else COLLISION_BOUND,
                         [t.non_finite for t in traces], traces[0].value, by_level(calls), coarse=coarse_seen)


def _order_free(name: str, cache: dict) -> bool:
    """Whether the aten event ``name`` (``aten.add.Tensor``) is an order-free op: no order can change its
    result (its outputs are even described symbolically), so it does not count towards the bound."""
    ns, _, rest = name.partition(".")
    packet, _, overload = rest.partition(".")
    try:
        func = getattr(getattr(getattr(torch.ops, ns), packet), overload or "default")
    except (AttributeError, RuntimeError):
        return False
    return op_info(func, cache).order_free


def _setup_args(setup: Callable[[], tuple]) -> tuple:
    """What ``setup()`` returned, checked: the tuple (or list) of arguments for ``fn``."""
    got = setup()
    if not isinstance(got, (tuple, list)):
        raise TypeError(f"compare_runs(setup=...): setup must return a tuple of the arguments for fn (e.g. "
                        f"`return model, optimizer`, or `return ()` when fn takes none); got {type(got).__name__}")
    return tuple(got)
