"""Replay's units: calls replayed as a whole (registry calls, custom-Function backwards, module forwards).

A *unit* is recorded op by op in its first run, run again on copies of its inputs, and the two op
lists and outputs compared (:mod:`bench.pinpoint.replay`). This module holds what a unit remembers
and, for module units, what decides whether a module can be replayed and how its state is kept.

Module units (``replay(units=...)``):

==========  ===================================================================================
``ops``     none: only registry calls and custom-Function backwards are units
``leaves``  (default) every *leaf* module (no child modules) that is not one of detbench's routed
            modules (those run their work through registry units already): a ``nn.Linear``, an
            RMSNorm, a user's own leaf with a Python ``forward``
``modules`` every module. A module's replay runs only its *own* code: the modules and registry
            backends it calls return the outputs they returned in the first run (copies), so
            every op still runs twice, not once per level of nesting
==========  ===================================================================================

A module's forward is replayed under ``no_grad`` on copies of its positional arguments taken before
it ran (keyword arguments - torch's global pre-hooks do not see them - are copied after it ran), from
the generator state it started with; its own buffers are swapped for copies of their values before
the first run while the replay runs, so a forward that updates them (BatchNorm's running
statistics) starts from the same state and cannot change the real ones; the buffers' values after
the replay are compared with those after the first run, and arguments it wrote in place are
compared too.

A module is *not replayable* - reported with the reason, and its ops replayed one by one instead -
when its forward

* has forward pre-hooks of its own (the replay calls ``forward`` and would skip them);
* takes an argument that is neither a tensor nor a plain value (a KV cache, any Python object: the
  replay could change its state, or read it in another state than the first run did), or a list or
  dict by keyword (copied only after the forward, which may have changed it);
* writes one of its parameters, or a keyword argument, in place, or rebinds a parameter;
* rebinds one of its attributes (``self.calls += 1``: Python state the replay cannot put back).

Found before the forward (pre-hooks, positional arguments), its ops are replayed one by one as it
runs. Found after it (the rest), the ops it ran are replayed one by one after the fact: functional
ops whose inputs and outputs nothing has overwritten since (checked with tensor version counters),
in-place ops from the copies taken before them; the others are counted as not compared. Later calls
of that module are not units. Not seen: a forward that mutates a Python object in place (a list it
appends to), or writes a tensor that is neither its argument, parameter nor buffer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import types
from collections import deque
from typing import Iterator

import torch
from torch import nn

from bench.pinpoint.ops import _leaves, _Rng
from qwen_layers.model import Routed

UNITS = ("ops", "leaves", "modules")

# Argument and output leaves a replay can copy and compare (containers are walked by _leaves).
_PLAIN = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
          torch.memory_format, slice, type(Ellipsis), enum.Enum, types.FunctionType, types.BuiltinFunctionType)


class ControlFlowChanged(Exception):
    """Raised inside a module's replay when it calls a module or backend the first run did not."""


class Unit:
    """A registry call or custom-Function backward being recorded (first run, then its replay)."""

    nests = False   # registry calls made inside it are part of it (not units of their own)

    def __init__(self, level: str, name: str, path: str, ph: str, node: str | None) -> None:
        self.level, self.name, self.path, self.phase, self.node = level, name, path, ph, node
        self.first: list = []
        self.second: list = []
        self.target = self.first
        self.inputs: list[str] = []

    @property
    def replaying(self) -> bool:
        return self.target is self.second


def copy_tree(x):
    """Detached copies of the tensors in ``x``, keeping its containers' types (named tuples, model output
    classes, dataclasses), so a module's replay gets arguments - and the modules it calls return
    outputs - of the types it expects. Other objects are the same objects."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    t = type(x)
    if t is tuple or t is list:
        return t(copy_tree(v) for v in x)
    if t is dict:
        return {k: copy_tree(v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
        return t(*(copy_tree(v) for v in x))
    if isinstance(x, (tuple, list)):
        return t(copy_tree(v) for v in x)
    if isinstance(x, dict):  # OrderedDict, transformers' ModelOutput (whose __setitem__ sets the attribute too)
        y = copy.copy(x)
        for k, v in x.items():
            y[k] = copy_tree(v)
        return y
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        y = copy.copy(x)
        for f in dataclasses.fields(x):
            object.__setattr__(y, f.name, copy_tree(getattr(x, f.name)))
        return y
    return x


def storage_of(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage; None where there is none to tell tensors apart by (meta, empty)."""
    try:
        return t.untyped_storage().data_ptr() or None
    except Exception:  # no storage (some subclasses)
        return None


def opaque(x) -> object | None:
    """The first leaf of ``x`` that is neither a tensor nor a plain value, or None."""
    for v in _leaves(x):
        if not isinstance(v, (torch.Tensor, *_PLAIN)):
            return v
    return None


def plain_leaves(x) -> list:
    """``x``'s leaves with every Python object that is not a plain value replaced by ``<TypeName>``:
    a module's replay makes new ones (a fresh cache) that cannot be compared bit for bit."""
    return [v if isinstance(v, (torch.Tensor, *_PLAIN)) else f"<{type(v).__name__}>" for v in _leaves(x)]


def _mutable(x) -> bool:
    """Whether ``x`` is or holds a list or dict (a container a forward can change in place)."""
    if isinstance(x, (list, dict)):
        return True
    return isinstance(x, tuple) and any(_mutable(v) for v in x)


def is_leaf(module: nn.Module) -> bool:
    return not any(m is not None for m in module._modules.values())


def pre_reason(module: nn.Module, args, units: str) -> str | None:
    """Before a forward: None when ``module`` is a unit; "" when it is not one by the ``units`` setting;
    otherwise why it cannot be replayed."""
    if units == "ops":
        return ""
    if units == "leaves" and (not is_leaf(module) or isinstance(module, Routed)):
        return ""
    if module._forward_pre_hooks:
        return "it has forward pre-hooks of its own, which a replay of its forward would not run"
    obj = opaque(args)
    if obj is not None:
        return (f"it takes a {type(obj).__name__} argument, a Python object whose state the replay could change "
                f"or read in another state")
    return None


class ModuleUnit(Unit):
    """A module's forward being recorded: its own ops, the outputs of the modules and registry backends it
    calls (handed back in its replay instead of running them again), and the state it started from."""

    nests = True

    def __init__(self, module: nn.Module, path: str, ph: str, args) -> None:
        super().__init__("module", type(module).__name__, path, ph, None)
        self.module = module
        self.rng = _Rng()
        self.args = copy_tree(args)                      # copies taken before the first run
        self.attrs = dict(module.__dict__)               # shallow: which objects its attributes are
        self.params = dict(module._parameters)
        self.buffers = {n: b.detach().clone() for n, b in module._buffers.items() if b is not None}
        self.written: set[int] = set()                   # storages its first run's in-place ops wrote
        self.raw: list = []                              # per recorded op: what an after-the-fact replay needs
        self.calls: list[tuple] = []                     # (key, label, output copy) of the calls it made
        self._queues: dict | None = None

    # -- after the first run ------------------------------------------------------------------
    def post_reason(self, kwargs: dict) -> str | None:
        """Why the forward that just ran cannot be replayed (None when it can)."""
        m = self.module
        for k, v in kwargs.items():
            obj = opaque(v)
            if obj is not None:
                return (f"its keyword argument {k} is a {type(obj).__name__}, a Python object whose state the "
                        f"replay could change or read in another state")
            if _mutable(v):  # keyword arguments are copied only after the forward, which may have changed it
                return (f"its keyword argument {k} is a {type(v).__name__}, which its forward may have changed "
                        f"before the replay could copy it")
        written = self.written - {None}
        params = [n for n, p in m._parameters.items() if p is not None and storage_of(p) in written]
        if params:
            return f"it writes its parameter(s) {', '.join(params)} in place"
        rebound = sorted(n for n in set(self.params) | set(m._parameters)
                         if self.params.get(n) is not m._parameters.get(n))
        if rebound:
            return f"it replaces its parameter(s) {', '.join(rebound)}"
        for k, v in kwargs.items():
            if any(storage_of(t) in written for t in _leaves(v) if isinstance(t, torch.Tensor)):
                return f"it writes its keyword argument {k} in place"
        changed = sorted(k for k in set(self.attrs) | set(m.__dict__)
                         if k not in ("_parameters", "_buffers", "_modules")
                         and (k not in self.attrs or k not in m.__dict__ or self.attrs[k] is not m.__dict__[k]))
        if changed:
            return (f"it sets attribute(s) {', '.join(changed)} in forward (Python state a replay cannot put "
                    f"back)")
        return None

    def written_args(self, args) -> list[int]:
        """Positions of the positional arguments whose storage the first run wrote."""
        written = self.written - {None}
        return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and storage_of(a) in written]

    # -- the replay ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def replay_state(self, out: dict) -> Iterator[None]:
        """For the block: the module's buffers are fresh copies of their values before the first run, and
        the modules it called answer with their recorded outputs. ``out["buffers"]`` gets the buffers as
        the replay left them; everything is put back in ``finally``."""
        m = self.module
        real = dict(m._buffers)
        self._queues = {}
        for key, label, value in self.calls:
            self._queues.setdefault(key, deque()).append(value)
        stubbed: list[tuple[nn.Module, object]] = []
        try:
            for n, b in self.buffers.items():
                m._buffers[n] = b.clone()
            for key, label, value in self.calls:
                if key[0] == "module" and all(c is not key[1] for c, _ in stubbed):
                    child = key[1]
                    stubbed.append((child, child.__dict__.get("_compiled_call_impl")))
                    # nn.Module.__call__ calls _compiled_call_impl when it is set: the child's forward and
                    # its hooks do not run; the recorded output comes back.
                    child._compiled_call_impl = self._stub(key, label)
            yield
        finally:
            out["buffers"] = {n: m._buffers.get(n) for n in self.buffers}
            for child, previous in reversed(stubbed):
                child._compiled_call_impl = previous
            m._buffers.clear()
            m._buffers.update(real)

    def _stub(self, key: tuple, label: str):
        def recorded(*args, **kwargs):
            return self.take(key, label)

        return recorded

    def take(self, key: tuple, label: str):
        """The next recorded output of the call ``key`` (in the replay)."""
        q = (self._queues or {}).get(key)
        if not q:
            raise ControlFlowChanged(f"its replay called {label} more often than its first run")
        return q.popleft()

    def leftover(self) -> str:
        """"" when the replay made every call the first run made; else which it did not make."""
        left = [label for key, label, _ in self.calls if self._queues and self._queues.get(key)]
        return f"its replay did not call {left[0]}" if left else ""
