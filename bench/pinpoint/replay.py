"""``replay``: every op run twice on the spot and compared bit for bit (one run, no cascade).

Under a ``TorchDispatchMode`` every aten op runs a second time right after the first, on the same
inputs, and the two results are compared bit for bit. An op whose result changed although its inputs
could not have is nondeterministic by itself (a GPU kernel that adds with atomics, a split-K reduction
ordered by arrival). Coarser *units* are replayed as a whole, because nondeterminism can live in how
Python composes deterministic ops (bench/planted.py sums deterministic partial products in a random
order; every single ``mm`` and ``add`` is deterministic, so replaying aten ops one by one cannot see it):

* every call of a registry backend (observed with ``qwen_layers.registry.observe`` while a pinpoint
  context is open, so every op the model routes through the registry, and detbench's transformers
  attention, is covered) - replayed on detached copies of its arguments under ``no_grad``;
* every backward of a custom ``torch.autograd.Function`` (a Python-level backward) - replayed by
  calling the node's backward again on copies of its incoming gradients, inside the node's post-hook
  while its saved tensors are still alive;
* module forwards (``units=``: by default every leaf module other than detbench's routed ones, e.g. a
  user's own ``nn.Linear`` subclass or transformers' RMSNorm; ``"modules"``: every module, each replay
  running only the module's own code) - replayed on copies of the arguments under ``no_grad``, from the
  generator state and buffer values they started with; a module that cannot be replayed (it takes a
  KV cache, writes its parameters, rebinds attributes) is listed with the reason and its ops are
  replayed one by one. Details: :mod:`bench.pinpoint.units`.

Inside such a unit the aten ops are recorded (not replayed one by one), the replay's ops are recorded
too, and the two lists are compared op by op. So an op inside a unit whose inputs were equal but whose
output differed is still reported at aten level (with ``inside`` naming the unit), and a unit whose
output changed while each of its ops agreed with itself is reported at the unit's level, with the
first op whose *inputs* differed (the place the order changed). Every op thus runs exactly twice.

How each kind of op is handled:

=============================  ==================================================================
functional ops                 replayed on their own inputs (their schema has no mutable argument,
                               so the inputs after the first run are exactly what a copy would be)
order-free ops                 pointwise ops (``torch.Tag.pointwise``) and pure data movement
                               (copy, cat, fill, gather ...; ``DATA_MOVEMENT``): each output
                               element is a fixed function of fixed input elements, so no order can
                               change it. Not replayed on their own (``all_ops=True`` does); inside
                               a unit they are compared when the unit's output differs
in-place and ``out=`` ops      every tensor argument is copied before the first run; the replay
                               runs on the copies; the written arguments and results are compared
views and aliases              not replayed: a view computes nothing (its data is its base's)
random ops (``dropout``,       the generator state (CPU, initialised CUDA devices, an explicit
``bernoulli_``, ops with a     ``generator=``) is saved before the first run, restored before the
``dropout_p``/``generator``)   replay and set back to the state after the first run
uninitialised outputs          ``empty``, ``empty_like``, ``empty_strided``, ``new_empty*``,
                               ``empty_permuted``: skipped (their contents are not a result)
metadata and side effects      skipped, never run twice: in-place view ops (``transpose_``,
                               ``as_strided_`` ...: running twice would apply them twice),
                               ``resize_``/``resize_as_``/``set_``, ``record_stream``, assertions
                               and prints, ``profiler::*``, collectives (``c10d*``)
RNG bookkeeping outputs        outputs named ``philox_seed``, ``philox_offset``, ``rng_state``,
                               ``seed``, ``offset``, ``debug_attn_mask``, ``unused`` (e.g. of SDPA's
                               flash/efficient kernels) are not compared: they may be uninitialised

Non-finite values. Two NaN results agree bit for bit however they were computed, so an op whose
output is all NaN agrees with itself whatever it does. The outputs of every op (replayed or not,
first runs inside units too, and the units' own outputs) are checked for NaN and infinities until
the first NaN (:class:`bench.pinpoint.ops.NonFinite`): the report then says the run is not
comparable from that op on, names it and says whether it made the NaN from finite inputs or got it
from an input no op of the run made (a parameter, fn's arguments). Ops before it were compared as
usual. (An in-place op whose own written tensor already held NaN before it, coming from outside the
run, is reported as having made it.)

What a clean report rests on: every compared call of an op was compared once, so a fault that changes
a fraction p of an op's calls goes unseen over its k calls with probability (1-p)^k. The report counts k
per op class (``calls_compared``: aten ops replayed, ops compared inside units, the units themselves)
and states the bound for the class with the fewest (``bound``, :mod:`bench.pinpoint.bounds`).

Speed: a Python call per aten op (a do-nothing dispatch mode alone doubles a tiny CPU step), every
order-dependent op runs twice, and every floating-point output is read once more (one BLAS dot product
with itself) until the first NaN. A registry call or custom backward whose first run left its inputs
unwritten is replayed on them in place (detached, not copied; one that wrote them is not replayed, and
an error says so); a module unit copies its positional arguments and buffers before it runs.
"""

from __future__ import annotations

import json
import math
import time
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.compare import Mismatch, mismatch
from bench.pinpoint.bounds import bound_lines, by_level, class_bound
from bench.pinpoint.locate import _PHASE, RAISED, _Locator, running
from bench.pinpoint.ops import (
    _NUMPY_FLOATS,
    SKIP_NAMESPACES,
    SKIP_REASONS,
    NonFinite,
    OpInfo,
    _args_tensors,
    _clone,
    _float_tensors,
    _leaves,
    _meta,
    _Rng,
    _tensors,
    _written_values,
    cpu_flags,
    extremes,
    first_difference,
    flags,
    op_info,
    scalar_flags,
    storage_names,
    tensor_label,
    value_kind,
    written_and_outputs,
)
from bench.pinpoint.units import (
    UNITS,
    ControlFlowChanged,
    ModuleUnit,
    Unit,
    copy_tree,
    plain_leaves,
    pre_reason,
    storage_of,
)
from bench.results import to_json


@dataclass
class Finding:
    """One op (or unit) that disagreed with its own replay."""

    level: str                  # "aten" | "registry" | "autograd.Function" | "module"
    op: str                     # aten.mm.default | linear/planted-nondet | _PVNondetDVBackward | Linear (module class)
    module: str                 # module path ("" = the root module / outside every module) or parameter name
    phase: str                  # forward | backward | optimizer | <user phase>
    count: int                  # calls of this op at this place that disagreed
    inputs: list[str]           # dtype[shape] of the tensor inputs (first call)
    outputs: list[str]
    output_index: int           # which output leaf differed (first call)
    n_diff: int                 # elements that differ in that output (first call)
    n_total: int
    max_abs: float
    max_ulp: int
    inside: str | None = None   # the registry op / custom Function this aten op ran in
    node: str | None = None     # the autograd node executing (backward)
    note: str = ""

    @property
    def where(self) -> str:
        return f"{self.module or '<root>'} ({self.phase})"

    def detail(self) -> str:
        """The inputs' shapes, and where it ran inside (registry op / autograd node), and any note."""
        ins = ", ".join(self.inputs[:4]) + (" ..." if len(self.inputs) > 4 else "")
        extra = "; ".join(x for x in (f"inside {self.inside}" if self.inside else "",
                                      f"node {self.node}" if self.node and self.node != self.op else "", self.note)
                          if x)
        return f"inputs {ins}" + (f"; {extra}" if extra else "")


def _diff_stats(a, b) -> Mismatch:
    """How leaf ``a`` differs from leaf ``b``, as the project's diff record: :func:`bench.compare.mismatch`
    for two tensors of one shape and dtype; for leaves it cannot compare element by element (a tensor
    against a number, None or another shape/dtype; two numbers) a record in which every element of
    ``a`` differs, with the numbers' distance as ``max_abs`` (infinite where there is none)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype:
        return mismatch(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        n = a.numel() if isinstance(a, torch.Tensor) else 1
        return _incomparable(a, n, math.inf, math.inf)
    try:
        dist = abs(float(a) - float(b))
        rel = dist / abs(float(b)) if float(b) else math.inf
    except (TypeError, ValueError):
        dist = rel = math.inf
    return _incomparable(a, 1, dist, rel)


def _incomparable(a, n: int, max_abs: float, max_rel: float) -> Mismatch:
    if isinstance(a, torch.Tensor):
        shape, dtype = list(a.shape), str(a.dtype).replace("torch.", "")
    else:
        shape, dtype = [], type(a).__name__
    return Mismatch(equal=False, shape=shape, dtype=dtype, n_diff=n, n_total=n, max_abs=max_abs, max_rel=max_rel,
                    max_ulp=0, nan_a=0, nan_b=0, inf_a=0, inf_b=0, worst=[])


def _finding(level: str, op: str, module: str, phase: str, inputs: list[str], outputs: list[str], diff: tuple,
             **kw) -> Finding:
    """One call's finding; ``diff`` is :func:`first_difference`'s (index, leaf of run 1, leaf of run 2)."""
    m = _diff_stats(diff[1], diff[2])
    return Finding(level, op, module, phase, 1, inputs, outputs, diff[0], m.n_diff, m.n_total, m.max_abs, m.max_ulp,
                   **kw)


def _versions(ins: list, out) -> list[int]:
    """Version counters of an op's tensor inputs and outputs (they change when written in place)."""
    return [t._version for t in ins] + [t._version for t in _tensors(out)]


def _version_list(tensors) -> list:
    """Version counters of ``tensors`` (None for a tensor without one: an inference tensor)."""
    out = []
    for t in tensors:
        try:
            out.append(t._version)
        except RuntimeError:
            out.append(None)
    return out


def _detached(x):
    """``x`` with every tensor in nested tuples/lists/dicts detached (the same memory, no copy)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detached(v) for v in x)
    if isinstance(x, list):
        return [_detached(v) for v in x]
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    return x


def _call_no_grad(fn: Callable, args, kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


class ReplayMode(TorchDispatchMode):
    """The dispatch mode behind :func:`replay` (use that function; this class is its engine)."""

    def __init__(self, locator: _Locator, all_ops: bool = False, units: str = "leaves") -> None:
        super().__init__()
        if units not in UNITS:
            raise ValueError(f"units must be one of {', '.join(UNITS)}; got {units!r}")
        self.loc = locator
        self.all_ops = all_ops
        self.unit_setting = units
        self.busy = locator.busy
        self.infos: dict = {}
        self.findings: dict[tuple, Finding] = {}
        self.replayed = 0
        self.units = 0
        self.module_units = 0
        self.compared: Counter = Counter()       # (level, op) -> calls compared with their replay
        self.not_replayable: dict[tuple, dict] = {}  # (path, reason) -> what and how often
        self._unreplayable: dict[int, str] = {}  # id(module) -> reason, found after a forward
        self.skipped: Counter = Counter()
        self.errors: list[str] = []
        self.active = False
        self.ops_seen = 0               # ops dispatched so far: the index of a non-finite finding
        self.non_finite = NonFinite()
        self._names: dict[int, str] | None = None
        locator.on_registry = self._registry_call
        locator.on_pynode = self._hook_pynode
        if units != "ops":
            locator.on_module_pre = self._module_pre
            locator.on_module = self._module_post

    # -- dispatch ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.busy:
            return func(*args, **kwargs)
        info = op_info(func, self.infos)
        self.ops_seen += 1
        unit = getattr(self.loc.local, "unit", None)
        if unit is not None:
            return self._record(unit, func, info, args, kwargs)
        if info.kind in ("skip", "view", "uninitialised"):
            self.skipped[info.reason] += 1
            return func(*args, **kwargs)
        if info.order_free and not self.all_ops:
            self.skipped["order_free"] += 1
            out = func(*args, **kwargs)
            self._watch(info, args, kwargs, out)
            return out
        return self._replay_op(func, info, args, kwargs)

    def _replay_op(self, func, info: OpInfo, args, kwargs):
        # Inside __torch_dispatch__ this mode is off: the ops run here are not dispatched to it again.
        rng = _Rng(kwargs.get("generator")) if info.random else None
        if info.kind == "mutating":
            pre_args, pre_kwargs = _clone(args), _clone(kwargs)
        out = func(*args, **kwargs)
        after = _Rng(kwargs.get("generator")) if rng is not None else None
        try:
            if rng is not None:
                rng.restore()
            if info.kind == "mutating":
                out2 = func(*pre_args, **pre_kwargs)
                a = (_written_values(info, args, kwargs), out)
                b = (_written_values(info, pre_args, pre_kwargs), out2)
                ignored = frozenset()
            else:
                out2 = func(*args, **kwargs)
                a, b, ignored = out, out2, info.ignored_returns
        except Exception as e:  # an op that cannot run twice: say so, keep the first result
            self.errors.append(f"{info.name}: replay raised {type(e).__name__}: {e}")
            self._watch(info, args, kwargs, out)
            return out
        finally:
            if after is not None:
                after.restore()
        self._watch(info, args, kwargs, out)
        self.replayed += 1
        self.compared[("aten", info.name)] += 1
        d = first_difference(a, b, ignored)
        if d is not None:
            ins = _args_tensors(args, kwargs)
            path, ph, node = self.loc.where(ins)
            self._add(_finding("aten", info.name, path, ph, [_meta(t) for t in ins], [_meta(t) for t in _leaves(out)],
                               d, node=node))
        return out

    # -- non-finite values ---------------------------------------------------------------------
    def _watch(self, info: OpInfo, args, kwargs, out, where: tuple | None = None) -> None:
        """Check an op's outputs (its written arguments, for in-place and ``out=`` ops) for NaN and
        infinities, until the first NaN; on the first of each, check its other inputs to say whether it
        made it or got it. ``where``: (module path, phase) when known (inside a unit)."""
        nf = self.non_finite
        if nf.nan is not None:
            return
        if type(out) is torch.Tensor and info.kind != "mutating" and out.dtype in _NUMPY_FLOATS:
            k = cpu_flags(out)  # one float output (most ops): no lists
            if k == (False, False) or (k is not None and not k[0] and nf.inf is not None):
                return
        if info.kind == "mutating":
            outs = _float_tensors(written_and_outputs(info, args, kwargs, out))
            written = {id(t) for t in _tensors(_written_values(info, args, kwargs))}
        else:
            outs, written = _float_tensors(_leaves(out, info.ignored_returns)), set()
        if not outs:
            return
        nan, inf = self._flags(outs)
        if not (nan or (inf and nf.inf is None)):
            return
        ins = [t for t in _args_tensors(args, kwargs) if id(t) not in written]
        scalars = [v for v in _leaves(list(args) + list(kwargs.values())) if not isinstance(v, torch.Tensor)]
        if where is None:
            path, ph, _ = self.loc.where(ins)
        else:
            path, ph = where
        self._found("aten", info.name, path, ph, ins, scalars, nan, inf)

    def _watch_unit(self, unit: Unit, inputs, outputs) -> None:
        """The same check on a unit's own outputs (a registry call's, a custom backward's), which may
        come from kernels no aten op runs (Triton); outputs (or views of outputs) of the aten ops it ran
        were checked as theirs."""
        if self.non_finite.nan is not None:
            return
        outs = _float_tensors(_tensors(outputs))
        if outs and unit.first:
            made = {storage_of(t) for rec in unit.first for t in _tensors(rec[3])}
            outs = [t for t in outs if storage_of(t) not in made]
        if not outs:
            return
        nan, inf = self._flags(outs)
        if nan or (inf and self.non_finite.inf is None):
            self._found(unit.level, unit.name, unit.path, unit.phase, _tensors(inputs), [], nan, inf)

    @staticmethod
    def _each(tensors) -> list[tuple[bool, bool]]:
        """(NaN, infinity) of each tensor, read now (replay synchronises on every op anyway)."""
        found = [cpu_flags(t) for t in tensors]
        later = [i for i, f in enumerate(found) if f is None]
        if later:
            for i, pair in zip(later, torch.stack([extremes(tensors[i]) for i in later]).tolist()):
                found[i] = flags(pair)
        return found

    def _flags(self, tensors) -> tuple[bool, bool]:
        found = self._each(tensors)
        return any(n for n, _ in found), any(i for _, i in found)

    def _found(self, kind: str, op: str, path: str, ph: str, ins, scalars, nan: bool, inf: bool) -> None:
        nf = self.non_finite
        ins = _float_tensors(ins)
        in_flags = self._each(ins)
        s_nan, s_inf = scalar_flags(scalars)
        for what, hit, key, s_hit in (("nan", nan, 0, s_nan), ("inf", inf, 1, s_inf)):
            if not hit or getattr(nf, what) is not None:
                continue
            culprit = next((t for t, f in zip(ins, in_flags) if f[key]), None)
            if culprit is not None:
                if self._names is None:
                    self._names = storage_names(self.loc.params.values())
                source, label = "input", tensor_label(culprit, self._names)
            elif s_hit:
                source, label = "input", f"a scalar argument {'nan' if what == 'nan' else 'inf'}"
            else:
                source, label = "produced", None
            setattr(nf, what, {"index": self.ops_seen - 1, "kind": kind, "op": op, "module": path, "phase": ph,
                               "source": source, "input": label, "replayed_before": self.replayed,
                               "units_before": self.units})

    def _add(self, f: Finding) -> None:
        key = (f.level, f.op, f.module, f.phase, f.inside)
        old = self.findings.get(key)
        if old is None:
            self.findings[key] = f
        else:
            old.count += 1

    # -- units ------------------------------------------------------------------------------
    def _record(self, unit: Unit, func, info: OpInfo, args, kwargs):
        if info.kind in ("skip", "view", "uninitialised"):
            return func(*args, **kwargs)
        # A module unit's first run also keeps what replaying its ops one by one needs, should the module
        # turn out not replayable (bench.pinpoint.units), and which storages its in-place ops write.
        keep = unit.nests and unit.target is unit.first
        if info.kind == "mutating":
            pre = (_clone(args), _clone(kwargs))
            out = func(*args, **kwargs)
            written = _written_values(info, args, kwargs)
            outs = _clone((written, out))
            unit.target.append((func, info, _args_tensors(*pre), outs))
            if keep:
                unit.raw.append(pre)
                unit.written.update(storage_of(t) for t in _tensors(written))
        else:
            out = func(*args, **kwargs)
            ins = _args_tensors(args, kwargs)
            unit.target.append((func, info, ins, out))
            if keep:
                unit.raw.append((args, kwargs, _versions(ins, out)))
        if unit.target is unit.first:
            self._watch(info, args, kwargs, out, (unit.path, unit.phase))
        return out

    def _finish_unit(self, unit: Unit, out1, out2, note: str = "") -> None:
        """Compare a unit's two runs: its outputs, and its ops pairwise.

        Ops that can depend on an order are always compared (an aten op inside the unit that disagreed
        with itself is reported even when the unit's outputs agree); order-free ops only when the
        unit's outputs differ, to find the first op that got different inputs.
        """
        if unit.level == "module":
            self.module_units += 1
        else:
            self.units += 1
        self.compared[(unit.level, unit.name)] += 1
        d_unit = first_difference(out1, out2)
        full = d_unit is not None or self.all_ops
        composition = note or None
        first_diff_seen = False
        for (f1, info, in1, o1), (f2, _, in2, o2) in zip(unit.first, unit.second):
            if f1 is not f2:
                composition = composition or f"the replay ran other ops from {info.name} on (control flow changed)"
                break
            if info.order_free and not full:
                continue
            self.compared[("aten", info.name)] += 1
            ignored = frozenset() if info.kind == "mutating" else info.ignored_returns
            d = first_difference(o1, o2, ignored)
            if d is None:
                continue
            if first_difference(in1, in2) is None:
                self._add(_finding("aten", info.name, unit.path, unit.phase, [_meta(t) for t in in1],
                                   [_meta(t) for t in _leaves(o1)], d, inside=unit.name, node=unit.node))
            elif not first_diff_seen and composition is None:
                composition = (f"every op agreed with itself; the first to differ, {info.name}, got different "
                               f"inputs built from identical values (the order in which Python combined them "
                               f"changed)")
            first_diff_seen = True
        if len(unit.first) != len(unit.second) and composition is None:
            composition = f"the replay ran {len(unit.second)} ops, the first run {len(unit.first)}"
        if d_unit is not None:
            self._add(_finding(unit.level, unit.name, unit.path, unit.phase, unit.inputs,
                               [_meta(t) for t in _leaves(out1)], d_unit, node=unit.node, note=composition or ""))

    def _registry_call(self, fn, name: str, args, kwargs):
        # Called outside units, and inside module units (which nest): in a module's first run the call is a
        # unit of its own and its output is recorded for the module's replay, which gets it back.
        parent = getattr(self.loc.local, "unit", None)
        if parent is not None and parent.replaying:
            return parent.take(("registry", name), name)
        path, ph, node = self.loc.where()
        unit = Unit("registry", name, path, ph, node)
        ins = _args_tensors(args, kwargs)
        unit.inputs = [_meta(t) for t in ins]
        versions = _version_list(ins)
        rng = _Rng()
        self.loc.local.unit = unit
        try:
            out = fn(*args, **kwargs)
        finally:
            self.loc.local.unit = parent
        with self.busy():
            self._watch_unit(unit, (args, kwargs), out)
        ok, out2 = self._rerun(unit, rng, (args, kwargs), lambda c: _call_no_grad(fn, *c),
                               f"{name} at {path}: replay raised", (ins, versions))
        if ok:
            with self.busy():
                self._finish_unit(unit, out, out2)
        if parent is not None:
            with self.busy():
                parent.calls.append((("registry", name), name, copy_tree(out)))
        return out

    def _rerun(self, unit: Unit, rng: _Rng, inputs, call: Callable, failure: str, versions=None):
        """A unit's second run: ``call`` on detached ``inputs``, from the generator state ``rng`` saved
        before the first run; the state after the first run is put back afterwards. ``versions``: (the
        input tensors, their version counters before the first run): when the first run left them
        unwritten, the replay reads them where they are (detached, not copied); when it wrote them, their
        values before it are gone and the unit is not replayed (an error says so); without version
        counters (inference tensors) it runs on copies. Returns (True, output), or (False, None) with the
        error recorded after ``failure``."""
        now = _version_list(versions[0]) if versions is not None else None
        aliased = versions is not None and None not in versions[1] and now == versions[1]
        if versions is not None and not aliased and None not in versions[1]:
            self.errors.append(f"{failure.rsplit(':', 1)[0]}: not replayed: its first run wrote its own inputs in "
                               f"place, so the values it started from are gone")
            return False, None
        with self.busy():
            after = _Rng()
            copies = _detached(inputs) if aliased else _clone(inputs)
            rng.restore()
        unit.target = unit.second
        outer = getattr(self.loc.local, "unit", None)
        self.loc.local.unit = unit
        try:
            return True, call(copies)
        except Exception as e:
            self.errors.append(f"{failure} {type(e).__name__}: {e}")
            return False, None
        finally:
            self.loc.local.unit = outer
            with self.busy():
                after.restore()
            if aliased and _version_list(versions[0]) != versions[1]:
                self.errors.append(f"{failure.rsplit(':', 1)[0]}: its replay wrote its inputs in place although its "
                                   f"first run had not (they were not copied): the run went on from other values")

    # -- module units (bench.pinpoint.units) ----------------------------------------------------
    def _frames(self) -> list:
        """This thread's open module calls: None (nothing to undo) or (unit before it, its ModuleUnit or
        None when its ops are replayed one by one)."""
        f = getattr(self.loc.local, "frames", None)
        if f is None:
            f = self.loc.local.frames = []
        return f

    def _module_pre(self, module: nn.Module, args) -> None:
        frames = self._frames()
        cur = getattr(self.loc.local, "unit", None)
        if (not self.active or self.busy or self.loc.opt_depth or torch._C._current_autograd_node() is not None
                or (cur is not None and (not cur.nests or cur.replaying))):
            frames.append(None)  # in backward, inside a registry call or custom backward, or in a replay
            return
        path = self.loc.stack()[-1][0]
        reason = pre_reason(module, args, self.unit_setting)
        if reason is None:
            reason = self._unreplayable.get(id(module))  # found after an earlier call
        unit = None
        if reason is None:
            with self.busy():
                unit = ModuleUnit(module, path, _PHASE.get() or "forward", args)
                unit.inputs = [_meta(t) for t in _tensors(args)]
        elif reason:
            self._note_unreplayable(module, path, reason)
        if unit is None and cur is None:
            frames.append(None)
            return
        frames.append((cur, unit))
        self.loc.local.unit = unit  # None inside a module unit: this call's ops are replayed one by one

    def _module_post(self, path: str, module: nn.Module, args_kwargs, output) -> None:
        frames = self._frames()
        if not frames:
            return
        frame = frames.pop()
        if frame is None:
            return
        parent, unit = frame
        self.loc.local.unit = parent
        if output is RAISED:
            return
        if unit is not None:
            self._finish_module(unit, *args_kwargs, output)
        if parent is not None:
            with self.busy():
                parent.calls.append((("module", module), f"module {path or '<root>'} ({type(module).__name__})",
                                     copy_tree(output)))

    def _note_unreplayable(self, module: nn.Module, path: str, reason: str, not_compared: int = 0) -> None:
        """A call of a module that could not be replayed whole; ``not_compared``: its ops that could not be
        replayed one by one after it ran either."""
        entry = self.not_replayable.setdefault((path, reason), {
            "module": path, "type": type(module).__name__, "reason": reason, "calls": 0, "ops_not_compared": 0})
        entry["calls"] += 1
        entry["ops_not_compared"] += not_compared

    def _finish_module(self, unit: ModuleUnit, args, kwargs, output) -> None:
        """After a module unit's first run: replay its forward and compare, or, when it turns out not
        replayable, replay the ops it ran one by one."""
        module = unit.module
        with self.busy():
            reason = unit.post_reason(kwargs)
            if reason:
                self._unreplayable[id(module)] = reason
                self._note_unreplayable(module, unit.path, reason, not_compared=self._replay_recorded(unit))
                return
            written = unit.written_args(args)
            kw = copy_tree(kwargs)
            after = _Rng()
            unit.rng.restore()
        state: dict = {}
        unit.target = unit.second
        outer = getattr(self.loc.local, "unit", None)
        self.loc.local.unit = unit
        failure = None
        try:
            with unit.replay_state(state), torch.no_grad():
                out2 = module.forward(*unit.args, **kw)
        except ControlFlowChanged as e:
            failure = f"module {unit.path or '<root>'} ({unit.name}): {e} (control flow changed)"
        except Exception as e:
            failure = f"module {unit.path or '<root>'} ({unit.name}): replay raised {type(e).__name__}: {e}"
        finally:
            self.loc.local.unit = outer
            with self.busy():
                after.restore()
        with self.busy():
            if failure is not None:
                self.errors.append(failure)
                return
            first = (plain_leaves(output), [args[i] for i in written], [module._buffers.get(n) for n in unit.buffers])
            second = (plain_leaves(out2), [unit.args[i] for i in written], list(state["buffers"].values()))
            self._finish_unit(unit, first, second, unit.leftover())

    def _replay_recorded(self, unit: ModuleUnit) -> int:
        """The ops a module unit recorded, replayed one by one after it ran (it could not be replayed whole):
        in-place ops from the copies taken before them, functional ops on their own inputs when nothing has
        overwritten those or their outputs since. Returns how many could not be compared."""
        missed = 0
        with torch.no_grad():
            for (func, info, ins, out), raw in zip(unit.first, unit.raw):
                if info.order_free and not self.all_ops:
                    self.skipped["order_free"] += 1
                    continue
                if info.random:  # the generator state it ran from is gone
                    missed += 1
                    continue
                try:
                    if info.kind == "mutating":
                        pre_args, pre_kwargs = _clone(raw[0]), _clone(raw[1])
                        out2 = func(*pre_args, **pre_kwargs)
                        a, b = out, (_written_values(info, pre_args, pre_kwargs), out2)
                        ignored = frozenset()
                    else:
                        args, kwargs, versions = raw
                        if _versions(ins, out) != versions:
                            missed += 1
                            continue
                        a, b, ignored = out, func(*args, **kwargs), info.ignored_returns
                except Exception as e:
                    self.errors.append(f"{info.name}: replay raised {type(e).__name__}: {e}")
                    continue
                self.replayed += 1
                self.compared[("aten", info.name)] += 1
                d = first_difference(a, b, ignored)
                if d is not None:
                    self._add(_finding("aten", info.name, unit.path, unit.phase, [_meta(t) for t in ins],
                                       [_meta(t) for t in _leaves(out)], d,
                                       note=f"replayed after {unit.name} ran (it could not be replayed whole)"))
        return missed

    def _hook_pynode(self, node) -> None:
        ref = weakref.ref(node)
        mode = self

        def pre(grad_outputs):
            n = ref()
            if n is None or mode.loc.in_unit() or not mode.active:
                return None
            path = mode.loc.path_of_node(n)
            unit = Unit("autograd.Function", n.name(), path, "backward", n.name())
            grads = _tensors(grad_outputs)
            unit.inputs = [_meta(g) for g in grads]
            unit.versions = (grads, _version_list(grads))
            unit.rng = _Rng()
            mode.loc.local.unit = unit
            return None

        def post(grad_inputs, grad_outputs):
            unit = getattr(mode.loc.local, "unit", None)
            n = ref()
            if unit is None or n is None or unit.level != "autograd.Function":
                return None
            mode.loc.local.unit = None
            with mode.busy():
                mode._watch_unit(unit, grad_outputs, grad_inputs)
            ok, out2 = mode._rerun(unit, unit.rng, list(grad_outputs), lambda c: n.apply(*c),
                                   f"{unit.name} at {unit.path}: backward replay raised", unit.versions)
            if not ok:
                return None
            with mode.busy():
                out2 = out2 if isinstance(out2, tuple) else (out2,)
                first = list(grad_inputs)
                second = []
                for g1, g2 in zip(first, out2):  # what the engine's validate_outputs does to the result
                    if isinstance(g1, torch.Tensor) and isinstance(g2, torch.Tensor):
                        if g2.shape != g1.shape:
                            g2 = g2.sum_to_size(g1.shape)
                        if g2.dtype != g1.dtype:
                            g2 = g2.to(g1.dtype)
                    elif g1 is None:
                        g2 = None
                    second.append(g2)
                mode._finish_unit(unit, first, second)
            return None

        node.register_prehook(pre)
        node.register_hook(post)


@dataclass
class ReplayReport:
    """What :func:`replay` found. ``str()`` is plain text; :meth:`to_dict` / :meth:`to_json` serialise."""

    findings: list[Finding]
    ops_replayed: int
    units_replayed: int          # registry calls and custom-Function backwards replayed as a whole
    skipped: dict[str, int]      # reason -> ops not replayed
    errors: list[str]
    seconds: float
    non_finite: NonFinite = field(default_factory=NonFinite)  # where NaN / infinities first appeared
    value: Any = field(default=None, repr=False, compare=False)  # what fn returned (not serialised)
    units: str = "leaves"        # which modules were units (bench.pinpoint.units)
    module_units_replayed: int = 0   # module forwards replayed as a whole
    not_replayable: list[dict] = field(default_factory=list)  # modules that could not be: why, how often
    calls_compared: dict[str, dict[str, int]] = field(default_factory=dict)  # level -> op -> calls compared

    def _calls(self) -> dict[tuple[str, str], int]:
        return {(level, op): k for level, ops in self.calls_compared.items() for op, k in ops.items()}

    @property
    def bound(self) -> dict:
        """What a clean verdict rests on (:func:`bench.pinpoint.bounds.class_bound`): every call was compared
        once with its replay; the op class with the fewest compared calls bounds what could be missed."""
        return class_bound(self._calls(), 1)

    def bound_lines(self) -> list[str]:
        return bound_lines(self._calls(), 1, "a call against its replay")

    def not_replayable_lines(self) -> list[str]:
        lines = []
        for e in self.not_replayable:
            gap = (f"; {e['ops_not_compared']} of its ops could not be compared either" if e["ops_not_compared"]
                   else "; its ops were replayed one by one instead")
            lines.append(f"not replayable whole: module {e['module'] or '<root>'} ({e['type']}), {e['calls']} "
                         f"call(s): {e['reason']}{gap}")
        return lines

    @property
    def comparable(self) -> bool:
        """False once an op's output held a NaN (or fn's result a NaN/inf): equal bits prove nothing then."""
        return self.non_finite.comparable

    @property
    def clean(self) -> bool:
        """No finding, no error, and comparable: every op agreed with itself, over finite values."""
        return not self.findings and not self.errors and self.comparable

    def to_dict(self) -> dict:
        d = asdict(replace(self, value=None))  # fn's value is not serialised (nor deep-copied)
        del d["value"]
        d["method"] = "replay"
        d["bound"] = self.bound
        d["clean"] = self.clean
        d["comparable"] = self.comparable
        d["skip_reasons"] = {k: SKIP_REASONS.get(k, SKIP_NAMESPACES.get(k, k)) for k in self.skipped}
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(to_json(self.to_dict()), **kw)

    def summary(self) -> str:
        if self.clean:
            modules = f" and {self.module_units_replayed} module calls" if self.units != "ops" else ""
            return (f"replay: every op agreed with itself ({self.ops_replayed} aten ops, {self.units_replayed} "
                    f"registry/custom-Function units{modules} replayed once each)")
        if not self.comparable and not self.findings:
            nan = self.non_finite.nan
            before = (f"the {nan['replayed_before']} aten ops and {nan['units_before']} units replayed before it "
                      f"agreed with themselves; after it " if nan is not None else "")
            return (f"replay: not comparable - outputs became non-finite: {self.non_finite.sentence('op')}; "
                    f"{before}equal NaN bits hide any difference")
        if not self.findings and self.comparable:
            return (f"replay: no op disagreed with its replay, but {len(self.errors)} replay(s) could not be run "
                    f"or took another path (below)")
        names = "; ".join(f"{f.op} at {f.where}" for f in self.findings)
        text = f"replay: {len(self.findings)} op(s) disagreed with their own replay: {names}"
        if not self.comparable:
            text += f"; outputs also became non-finite: {self.non_finite.sentence('op')}"
        return text

    def __str__(self) -> str:
        """Plain text: the summary, one line per finding and its details (the CLI draws a table)."""
        lines = [self.summary()]
        for i, f in enumerate(self.findings, 1):
            lines.append(f"  #{i} {f.level} {f.op} at {f.where}: {f.count} call(s); {f.n_diff}/{f.n_total} elements "
                         f"of output {f.output_index} differ, max |d| {f.max_abs:.3e}, max ulp {f.max_ulp}")
            lines.append(f"     {f.detail()}")
        lines += self.errors
        lines += self.not_replayable_lines()
        if self.skipped:
            lines.append(self.skipped_line())
        if self.clean:
            lines += self.bound_lines()
        return "\n".join(lines) + "\n"

    def skipped_line(self) -> str:
        return "not replayed: " + ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()))


def replay(fn: Callable, *args, roots: Mapping[str, nn.Module] | None = None, all_ops: bool = False,
           units: str = "leaves", **kwargs) -> ReplayReport:
    """Run ``fn(*args, **kwargs)`` once, replaying every op (and every registry call and custom-Function
    backward) on the spot and comparing bit for bit. Returns a :class:`ReplayReport`.

    ``fn`` runs normally otherwise: its result (``report.value``), its side effects and the generator
    state afterwards are those of a plain run. Once an output holds a NaN, the report is not
    comparable (``report.comparable``; ``report.non_finite`` says where and how it appeared). ``roots`` names modules explicitly
    (``{"model": m}``); by default the first module called names its submodules from ``""``.
    Order-free ops (pointwise, data movement) are not replayed unless ``all_ops=True``. ``units`` says which
    module forwards are replayed as a whole too: ``"leaves"`` (default) leaf modules other than detbench's
    routed ones, ``"modules"`` every module (each replay runs only the module's own code), ``"ops"`` none
    (:mod:`bench.pinpoint.units`; a module that cannot be replayed is listed in ``report.not_replayable``).
    """
    loc = _Locator(roots)
    mode = ReplayMode(loc, all_ops, units)
    t0 = time.perf_counter()
    with running(mode, loc):
        value = fn(*args, **kwargs)
    mode.non_finite.value = value_kind(value)
    return ReplayReport(list(mode.findings.values()), mode.replayed, mode.units, dict(mode.skipped), mode.errors,
                        time.perf_counter() - t0, mode.non_finite, value, units=units,
                        module_units_replayed=mode.module_units, not_replayable=list(mode.not_replayable.values()),
                        calls_compared=by_level(mode.compared))
