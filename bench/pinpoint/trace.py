"""``trace``: one run recorded op by op, every input and output as a content descriptor.

Every aten op's inputs and outputs are described in execution order (:mod:`bench.pinpoint.fingerprint`:
fingerprints, exact bytes, symbolic descriptors of order-free ops; ``exact=True``: CPU copies),
together with every registry call, every custom-Function backward and every module's forward output
(described like the ops' outputs; by value in exact mode). :func:`bench.pinpoint.compare.compare_runs`
aligns two or more traces.

``trace(..., coarse=True)`` records no op (:class:`CoarseTracer`, hooks only): the outputs of modules,
registry calls and custom backwards, and every parameter's gradient and value around each optimizer
step and at the end - about the cost of a plain run. ``compare_runs(..., coarse=True)`` compares such
runs first and traces op by op only when they differ.

Non-finite values (:class:`bench.pinpoint.ops.NonFinite`): every floating-point output (of aten ops,
and of registry calls and custom-Function backwards where no traced op made it) is checked for NaN and
infinities - on the CPU at once (an order-dependent output while its bytes are read for the
fingerprint), on a GPU as a (min, max) pair left on the device and read with one synchronisation at
the end. A tensor read from outside the traced ops (a parameter, fn's arguments: an input no traced op
described) is checked on a GPU when read; on the CPU when an output of the op reading it first holds a
NaN (or an infinity), or before an in-place op overwrites it. Walked in order, the checks say which
event first output a NaN or an infinity and whether it made it from finite inputs or got it from
outside.

Speed: a Python call per aten op (a do-nothing dispatch mode alone doubles a tiny CPU step), plus one
more read of every order-dependent output to fingerprint it (and check it), and one of every other
floating-point output for the non-finite check. A tensor is fingerprinted once per version: an input
whose contents a traced op described (as its output, or as the tensor it wrote in place) reuses that
descriptor. On the CPU fingerprinting is the bulk of the cost at large batches: at Qwen2.5-0.5B's layer
shapes (2 x 512 tokens, one thread) a traced step reads about 1.7 GB to fingerprint and 2.3 GB to check
for NaN, 0.4x the plain step's time (``bench/benchmarks/bench_pinpoint_overhead.py``).
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.pinpoint.fingerprint import MAX_SYMBOLIC_DEPTH, Coefficients, Fingerprints, _scalar_key
from bench.pinpoint.locate import _PHASE, _Locator, running
from bench.pinpoint.ops import (
    CHECKED_DTYPES,
    NonFinite,
    _arg,
    _args_tensors,
    _float_tensors,
    _leaves,
    _tensors,
    _written_values,
    cpu_flags,
    extremes,
    flags,
    op_info,
    read_back,
    storage_names,
    value_kind,
    written_and_outputs,
)


@dataclass
class Event:
    """One traced op, registry call, custom-Function backward or module output, in execution order."""

    index: int
    kind: str                   # aten | registry | autograd.Function | module
    op: str
    module: str
    phase: str
    inside: str | None          # registry op or autograd node this aten op ran in
    inputs: list[str]           # dtype[shape]
    outputs: list[str]
    in_key: tuple = field(default=(), repr=False)    # digests of the inputs' contents
    out_key: tuple = field(default=(), repr=False)

    def key(self) -> tuple:
        return (self.kind, self.op, self.module, self.phase, tuple(self.inputs), tuple(self.outputs))

    def ref(self) -> dict:
        return {"index": self.index, "kind": self.kind, "op": self.op, "module": self.module, "phase": self.phase,
                "inside": self.inside, "inputs": self.inputs, "outputs": self.outputs}


def _shape_meta(t) -> tuple:
    return (t.dtype, t.shape) if isinstance(t, torch.Tensor) else (type(t).__name__, None)


_META_STR: dict = {}


def _meta_str(m: tuple) -> str:
    s = _META_STR.get(m)
    if s is None:
        dtype, shape = m
        s = str(dtype) if shape is None else f"{str(dtype).replace('torch.', '')}{list(shape)}"
        if len(_META_STR) < 65536:
            _META_STR[m] = s
    return s


class TraceMode(TorchDispatchMode):
    """The dispatch mode behind :func:`trace` / :func:`compare_runs`."""

    def __init__(self, locator: _Locator, exact: bool = False, coefficients: Coefficients | None = None) -> None:
        super().__init__()
        self.loc = locator
        self.busy = locator.busy
        self.infos: dict = {}
        self.fp = Fingerprints(exact, coefficients)
        # Registry calls, custom-Function backwards and module outputs: by value in exact mode (so that the
        # root cause's difference can be shown), else like aten ops' (symbolic where an order-free op made it).
        self._describe = self.fp.describe_value if exact else self.fp.describe
        self.events: list[tuple] = []   # raw tuples; :func:`trace` turns them into Events
        self.skipped: Counter = Counter()
        self.active = False
        # Non-finite values, in execution order: (event index, "in" | "out" | "scalar", what, flags): flags
        # is (NaN, infinity), or the index in nf_pairs of a device tensor's extremes, read at the end. CPU
        # outputs are checked at once and recorded when they hold one; the inputs of the first event whose
        # output held a NaN (an infinity) are checked then, to say whether it made it or got it.
        self.nf_records: list[tuple] = []
        self.nf_pairs: list[torch.Tensor] = []   # extremes() pairs, still on their devices
        self.cpu_seen = [False, False]           # a CPU output held NaN / an infinity
        self._fresh: list[torch.Tensor] = []     # CPU tensors the running op reads from outside the traced ops
        self._state: dict[int, list] = {}        # id(module) -> its parameters and buffers
        self.fp.on_read = self._read
        locator.on_registry = self._registry_call
        locator.on_module = self._module_output
        locator.on_pynode = self._hook_pynode

    # -- non-finite values: recorded here, walked in _non_finite() ---------------------------------
    def _read(self, t: torch.Tensor) -> None:
        """A tensor read from outside the traced ops (its first description): a device tensor's extremes are
        recorded now (read at the end); a CPU tensor is checked only if an output of the op reading it
        holds NaN or an infinity (or before the op writes it in place)."""
        if t.is_cpu:
            self._fresh.append(t)
            return
        for f in _float_tensors((t,)):
            self._record_in(f, self._flags(f))

    def _record_in(self, f: torch.Tensor, k) -> None:
        try:
            ptr = f.untyped_storage().data_ptr()
        except Exception:
            ptr = None
        self.nf_records.append((len(self.events), "in", (f"{str(f.dtype).replace('torch.', '')}{list(f.shape)}", ptr),
                                k))

    def _check_inputs(self, tensors, skip: frozenset = frozenset()) -> None:
        """Record the CPU inputs (but those in ``skip``, by id) that hold NaN or an infinity."""
        for f in _float_tensors([t for t in tensors if id(t) not in skip]):
            k = cpu_flags(f)
            if k is not None and (k[0] or k[1]):
                self._record_in(f, k)

    def _outputs(self, index: int, tensors, inputs=(), written: frozenset = frozenset(), known=None) -> None:
        """Check the outputs of event ``index`` for NaN and infinities (``inputs``: its inputs, checked when an
        output holds the first of either; ``written``: ids of the inputs it overwrote, not checked then;
        ``known``: per output, its flags if found already, or None)."""
        seen = self.cpu_seen
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or t.dtype not in CHECKED_DTYPES:
                continue
            if not t.is_cpu:
                for f in _float_tensors((t,)):
                    self.nf_records.append((index, "out", None, self._flags(f)))
                continue
            if seen[0]:
                continue  # after the first NaN nothing is compared: no need to look further
            for f in _float_tensors((t,)):
                k = known[i] if known is not None and known[i] is not None else cpu_flags(f)
                if not (k[0] or k[1]):
                    continue
                if (k[0] and not seen[0]) or (k[1] and not seen[1]):
                    self._check_inputs(inputs, written)
                    seen[0], seen[1] = seen[0] or k[0], seen[1] or k[1]
                self.nf_records.append((index, "out", None, k))

    def _flags(self, t: torch.Tensor):
        now = cpu_flags(t)
        if now is not None:
            return now
        self.nf_pairs.append(extremes(t))  # on its device: no synchronisation per op
        return len(self.nf_pairs) - 1

    def _scalars(self, args, kwargs) -> None:
        for v in args:
            if type(v) is float and not math.isfinite(v):
                break
        else:
            if not kwargs or all(type(v) is not float or math.isfinite(v) for v in kwargs.values()):
                return
        values = [v for v in args if type(v) is float] + [v for v in kwargs.values() if type(v) is float]
        bad = [v for v in values if not math.isfinite(v)]
        self.nf_records.append((len(self.events), "scalar", f"a scalar argument {bad[0]}",
                                (any(math.isnan(v) for v in bad), any(math.isinf(v) for v in bad))))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if self.busy:
            return func(*args, **kwargs)
        info = self.infos.get(func)
        if info is None:
            info = op_info(func, self.infos)
        kind = info.kind
        fp = self.fp
        # Inside __torch_dispatch__ this mode is off: the ops run here are not dispatched to it again.
        if kind == "skip":
            self.skipped[info.reason] += 1
            return func(*args, **kwargs)
        if kind == "uninitialised":
            out = func(*args, **kwargs)
            fp.uninitialised(out)
            return out
        if kind == "view":
            out = func(*args, **kwargs)
            fp.view(out, args[0] if args else None)
            return out
        ins_t = _args_tensors(args, kwargs)
        if info.out_args:
            skip_ids = {id(_arg(args, kwargs, k)) for k in info.out_args}
            ins_t = [t for t in ins_t if id(t) not in skip_ids]
        in_desc = [fp.describe(t) for t in ins_t]
        written = frozenset()
        if kind == "mutating":
            written = frozenset(id(t) for t in _tensors(_written_values(info, args, kwargs)))
            if self._fresh:  # what an in-place op overwrites is checked before it does
                self._check_inputs([t for t in self._fresh if id(t) in written])
        self._fresh.clear()
        self._scalars(args, kwargs)
        out = func(*args, **kwargs)
        if kind == "mutating":
            leaves = written_and_outputs(info, args, kwargs, out)
        else:
            leaves = _leaves(out, info.ignored_returns)
        sym = None
        if info.order_free and not fp.exact:
            depth = 0
            for d in in_desc:
                if d[0] == "f" and d[1] > depth:
                    depth = d[1]
            if depth < MAX_SYMBOLIC_DEPTH:
                sym = (depth + 1, info.name, tuple(in_desc), _scalar_args(args, kwargs))
        out_desc = []
        known = None   # outputs' (NaN, infinity), found while fingerprinting them
        is_written = kind == "mutating"
        for i, t in enumerate(leaves):
            if not isinstance(t, torch.Tensor):
                out_desc.append(("s", _scalar_key(t)))
            elif sym is not None:
                out_desc.append(fp.put(t, ("f", sym[0], sym[1], sym[2], sym[3] + (("out", i),)), is_written))
            else:
                d, k = fp.value_flags(t)
                out_desc.append(fp.put(t, d, is_written))
                if k is not None:
                    if known is None:
                        known = [None] * len(leaves)
                    known[i] = k
        where = self.loc.where(ins_t)
        inside = getattr(self.loc.local, "unit", None) or where[2]
        index = len(self.events)
        self._outputs(index, leaves, ins_t, written, known)
        self.events.append(("aten", info.name, where[0], where[1], inside, [_shape_meta(t) for t in ins_t],
                            [_shape_meta(t) for t in leaves], in_desc, out_desc))
        return out

    def _registry_call(self, fn, name: str, args, kwargs):
        with self.busy():
            path, ph, _ = self.loc.where()
            ins_t = _args_tensors(args, kwargs)
            in_desc = [self._describe(t) for t in ins_t]
            self._fresh.clear()  # checked with the ops that read them
        self.loc.local.unit = name
        try:
            out = fn(*args, **kwargs)
        finally:
            self.loc.local.unit = None
        with self.busy():
            leaves = _tensors(out)
            # Outputs an aten op of the call made were checked as its outputs; others (a kernel no aten op ran) now.
            self._outputs(len(self.events), [t for t in leaves if self.fp.cached(t) is None], ins_t)
            self.events.append(("registry", name, path, ph, None, [_shape_meta(t) for t in ins_t],
                                [_shape_meta(t) for t in leaves], in_desc,
                                [self._describe(t, read=False) for t in leaves]))
        return out

    def _module_state(self, module: nn.Module) -> list:
        state = self._state.get(id(module))
        if state is None:
            state = self._state[id(module)] = list(module.parameters()) + list(module.buffers())
        return state

    def _module_output(self, path, module, args, output) -> None:
        if self.busy:
            return
        with self.busy():
            ins_t, outs_t = _tensors(args), _tensors(output)
            if not outs_t:
                return
            ph = "optimizer" if self.loc.opt_depth else (_PHASE.get() or "forward")
            # A module's inputs are its arguments and its own parameters and buffers.
            state = self._module_state(module)
            # Not reads from outside for the non-finite check: the ops of the forward read them first.
            self.events.append(("module", type(module).__name__, path, ph, None, [_shape_meta(t) for t in ins_t],
                                [_shape_meta(t) for t in outs_t],
                                [self._describe(t, read=False) for t in ins_t + state],
                                [self._describe(t, read=False) for t in outs_t]))

    def _hook_pynode(self, node) -> None:
        mode = self
        pending: list = []
        name = node.name()
        ref = weakref.ref(node)

        def pre(grad_outputs):
            if not mode.active or mode.busy:
                return None
            with mode.busy():
                gs = _tensors(grad_outputs)
                pending.append((gs, [_shape_meta(g) for g in gs], [mode._describe(g) for g in gs]))
                mode._fresh.clear()
            return None

        def post(grad_inputs, grad_outputs):
            if not mode.active or mode.busy or not pending:
                return None
            gs, ins, in_desc = pending.pop()
            n = ref()
            with mode.busy():
                leaves = _tensors(grad_inputs)
                path = mode.loc.path_of_node(n) if n is not None else ""
                mode._outputs(len(mode.events), [t for t in leaves if mode.fp.cached(t) is None], gs)
                mode.events.append(("autograd.Function", name, path, "backward", None, ins,
                                    [_shape_meta(t) for t in leaves], in_desc,
                                    [mode._describe(t, read=False) for t in leaves]))
            return None

        node.register_prehook(pre)
        node.register_hook(post)


class CoarseTracer:
    """The hooks behind ``trace(..., coarse=True)``: no dispatch mode, so no per-op cost.

    Recorded, in execution order: every module's forward output, every registry call's output, every
    custom-Function backward's output (the gradients it made), and every named parameter's gradient
    before and value after each optimizer step ("gradient" / "parameter" events, phases backward and
    optimizer) and at the end of fn (phase "end"). Each tensor is fingerprinted once per version, and
    its floating-point values are checked for NaN and infinities while its bytes are read.
    """

    def __init__(self, locator: _Locator, coefficients: Coefficients | None = None) -> None:
        self.loc = locator
        self.busy = locator.busy
        self.fp = Fingerprints(False, coefficients)
        self.events: list[tuple] = []   # the same raw tuples as TraceMode's (no inputs)
        self.first_bad: list = [None, None]      # (event index) of the first NaN / infinity
        self.nf_pairs: list[tuple[int, torch.Tensor]] = []   # (event index, extremes) of device tensors
        self.active = False
        locator.on_registry = self._registry_call
        locator.on_module = self._module_output
        locator.on_pynode = self._hook_pynode
        locator.on_step = self._step

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self.loc.installed():
            self.active = True
            try:
                yield
            finally:
                self.active = False
                loc = self.loc
                loc.on_registry = loc.on_module = loc.on_pynode = loc.on_step = None

    def _describe(self, t: torch.Tensor, index: int) -> tuple:
        fp = self.fp
        d = fp.cached(t)
        if d is not None:
            return d
        d, k = fp.value_flags(t)
        fp.put(t, d)
        if t.dtype in CHECKED_DTYPES and t.numel():
            if k is None:
                for f in _float_tensors((t,)):
                    k = cpu_flags(f)
                    if k is None:
                        self.nf_pairs.append((index, extremes(f)))
            if k is not None:
                for i in (0, 1):
                    if k[i] and self.first_bad[i] is None:
                        self.first_bad[i] = index
        return d

    def _record(self, kind: str, op: str, path: str, ph: str, tensors) -> None:
        index = len(self.events)
        outs = [t for t in _tensors(tensors)]
        self.events.append((kind, op, path, ph, None, [], [_shape_meta(t) for t in outs], [],
                            [self._describe(t, index) for t in outs]))

    def _registry_call(self, fn, name: str, args, kwargs):
        out = fn(*args, **kwargs)
        with self.busy():
            path, ph, _ = self.loc.where()
            self._record("registry", name, path, ph, out)
        return out

    def _module_output(self, path, module, args, output) -> None:
        if self.busy or torch._C._current_autograd_node() is not None:
            return
        with self.busy():
            ph = "optimizer" if self.loc.opt_depth else (_PHASE.get() or "forward")
            self._record("module", type(module).__name__, path, ph, output)

    def _hook_pynode(self, node) -> None:
        tracer = self
        name = node.name()
        ref = weakref.ref(node)

        def post(grad_inputs, grad_outputs):
            if not tracer.active or tracer.busy:
                return None
            n = ref()
            with tracer.busy():
                tracer._record("autograd.Function", name, tracer.loc.path_of_node(n) if n is not None else "",
                               "backward", grad_inputs)
            return None

        node.register_hook(post)

    def _step(self, optimizer, when: str) -> None:
        with self.busy():
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self._state(params, "gradient" if when == "pre" else "parameter",
                        "backward" if when == "pre" else "optimizer")

    def _state(self, params, kind: str, ph: str) -> None:
        names = self.loc.params
        for p in params:
            t = p.grad if kind == "gradient" else p
            if t is not None:
                self._record(kind, kind, names.get(id(p), ("<parameter>", None))[0], ph, t)

    def finish(self) -> None:
        """The end of fn: every named parameter's gradient and value."""
        with self.busy():
            params = [p for _, p in self.loc.params.values()]
            self._state(params, "gradient", "end")
            self._state(params, "parameter", "end")

    def non_finite(self, events: list[Event]) -> NonFinite:
        """Which event first held NaN, resp. an infinity (who made it is not seen: source "unknown")."""
        first = list(self.first_bad)
        for (index, pair), (nan, inf) in zip(self.nf_pairs, (flags(v) for v in read_back([p for _, p in
                                                                                          self.nf_pairs]))):
            for i, hit in ((0, nan), (1, inf)):
                if hit and (first[i] is None or index < first[i]):
                    first[i] = index
        nf = NonFinite()
        for key, index in (("nan", first[0]), ("inf", first[1])):
            if index is not None:
                ev = events[index]
                setattr(nf, key, {"index": index, "kind": ev.kind, "op": ev.op, "module": ev.module,
                                  "phase": ev.phase, "source": "unknown", "input": None})
        return nf


def _scalar_args(args, kwargs) -> tuple:
    """The non-tensor arguments of an op, as comparable keys (part of an order-free output's descriptor)."""
    out = []
    for v in args:
        if isinstance(v, (list, tuple, dict)):
            return tuple(_scalar_key(x) for x in _leaves(args) if not isinstance(x, torch.Tensor)) + _kw_keys(kwargs)
        if not isinstance(v, torch.Tensor):
            out.append(_scalar_key(v))
    return tuple(out) + _kw_keys(kwargs) if kwargs else tuple(out)


def _kw_keys(kwargs) -> tuple:
    return tuple((k, _scalar_key(v)) for k, v in sorted(kwargs.items()) if not isinstance(v, torch.Tensor))


@dataclass
class Trace:
    """One traced run: its events, their inputs' and outputs' content digests, in execution order."""

    events: list[Event]
    skipped: dict[str, int]
    exact: bool
    seconds: float
    raw_out: list | None = field(default=None, repr=False)   # exact mode: output tensors per event
    value: Any = field(default=None, repr=False)             # what fn returned
    non_finite: NonFinite = field(default_factory=NonFinite)  # where NaN / infinities first appeared
    coarse: bool = False                                      # module outputs, gradients, parameters only


def _materialise(desc, copies):
    """Exact mode: the tensor a descriptor refers to (views are re-made from their base), else None."""
    if desc[0] == "x":
        return copies[desc[3]]
    if desc[0] == "v":
        base = _materialise(desc[1], copies)
        if base is None:
            return None
        try:
            return torch.as_strided(base, desc[2], desc[3], base.storage_offset() + desc[4])
        except RuntimeError:
            return None
    return None


def trace(fn: Callable, *args, exact: bool = False, roots: Mapping[str, nn.Module] | None = None,
          coarse: bool = False, **kwargs) -> Trace:
    """Run ``fn(*args, **kwargs)`` once, recording the contents of every op's inputs and outputs (as
    fingerprints; ``exact``: copies), every registry call, custom-Function backward and module output.
    ``coarse=True``: no op, only module, registry-call and custom-backward outputs, gradients and
    parameters (:class:`CoarseTracer`; about the cost of a plain run)."""
    if coarse:
        if exact:
            raise ValueError("trace(coarse=True) fingerprints; it has no exact mode")
        return _coarse_trace(fn, args, kwargs, roots, None)
    return _trace(fn, args, kwargs, exact, roots, None)


def _coarse_trace(fn: Callable, args: tuple, kwargs: dict, roots: Mapping[str, nn.Module] | None,
                  coefficients: Coefficients | None) -> Trace:
    """``trace(..., coarse=True)``, fingerprinting with ``coefficients``."""
    tracer = CoarseTracer(_Locator(roots), coefficients)
    t0 = time.perf_counter()
    try:
        with tracer.running():
            value = fn(*args, **kwargs)
        tracer.finish()
    finally:
        tracer.fp.close()
    digest = tracer.fp.resolver()
    events = [Event(i, kind, op, path, ph, inside, [], [_meta_str(m) for m in outs], (),
                    tuple(digest(d) for d in out_desc))
              for i, (kind, op, path, ph, inside, _, outs, _, out_desc) in enumerate(tracer.events)]
    nf = tracer.non_finite(events)
    nf.value = value_kind(value)
    return Trace(events, {}, False, time.perf_counter() - t0, None, value, nf, coarse=True)


def _trace(fn: Callable, args: tuple, kwargs: dict, exact: bool, roots: Mapping[str, nn.Module] | None,
           coefficients: Coefficients | None) -> Trace:
    """:func:`trace`, fingerprinting with ``coefficients`` (shared by the runs of ``compare_runs``)."""
    loc = _Locator(roots)
    mode = TraceMode(loc, exact, coefficients)
    t0 = time.perf_counter()
    try:
        with running(mode, loc):
            value = fn(*args, **kwargs)
    finally:
        mode.fp.close()
    digest = mode.fp.resolver()
    events = []
    raw = [] if exact else None
    for i, (kind, op, path, ph, inside, ins, outs, in_desc, out_desc) in enumerate(mode.events):
        events.append(Event(i, kind, op, path, ph, inside, [_meta_str(m) for m in ins], [_meta_str(m) for m in outs],
                            tuple(digest(d) for d in in_desc), tuple(digest(d) for d in out_desc)))
        if raw is not None:
            raw.append([_materialise(d, mode.fp.copies) for d in out_desc])
    nf = _non_finite(mode, events, loc)
    nf.value = value_kind(value)
    return Trace(events, dict(mode.skipped), exact, time.perf_counter() - t0, raw, value, nf)


def _non_finite(mode: TraceMode, events: list[Event], loc: _Locator) -> NonFinite:
    """Walk the recorded checks in execution order (device pairs read once per device): the first event
    whose output held a NaN, resp. an infinity, and whether an input from outside held one before."""
    values = read_back(mode.nf_pairs)
    nf = NonFinite()
    outside: dict[str, str | None] = {"nan": None, "inf": None}
    names = None
    for index, role, what, k in mode.nf_records:
        nan, inf = k if isinstance(k, tuple) else flags(values[k])
        if role != "out":
            for key, hit in (("nan", nan), ("inf", inf)):
                if hit and outside[key] is None:
                    if role == "in":
                        meta, ptr = what
                        if names is None:
                            names = storage_names(loc.params.values())
                        label = f"parameter {names[ptr]} ({meta})" if ptr in names else meta
                    else:
                        label = what
                    outside[key] = f"{label}, first read by event {index}"
            continue
        for key, hit in (("nan", nan), ("inf", inf)):
            if hit and getattr(nf, key) is None:
                ev = events[index]
                setattr(nf, key, {"index": index, "kind": ev.kind, "op": ev.op, "module": ev.module,
                                  "phase": ev.phase, "source": "input" if outside[key] else "produced",
                                  "input": outside[key]})
        if nf.nan is not None:
            break
    return nf
