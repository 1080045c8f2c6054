"""Where an op runs - module path, phase, autograd node - and how pinpoint sees the calls it replays whole.

Where an op ran is reported as a *module path* (``model.layers.1.mlp.down_proj``) and a *phase*:

* forward: global module forward pre/post hooks keep a stack of module paths; the first module
  called with an empty stack names its submodules (``roots=`` names them explicitly);
* backward: every autograd node gets a sequence number when it is made. The module hooks record,
  for each module call, the range of sequence numbers handed out during its forward (read with a
  one-element probe node); during backward the node being executed
  (``torch._C._current_autograd_node()``) falls in the innermost such range. Gradient accumulation
  into a parameter is labelled with the parameter's name;
* optimizer: inside ``Optimizer.step`` (global step hooks) or a :func:`phase` block named
  ``"optimizer"`` (``bench.sft.sft_step`` puts gradient clipping there); the path is the name of
  the parameter whose tensors (weight, grad, optimizer state) the op touches.

How the units replayed or traced whole are seen (:meth:`_Locator.installed`), with nothing patched
in the registry:

* registry calls: :func:`qwen_layers.registry.observe` - a context variable the registry's
  ``resolve`` consults - hands every implementation resolved in this context to
  :meth:`_Locator.wrap`, which returns it wrapped. Only the calling context (thread, task) is observed;
* custom ``autograd.Function`` nodes: ``torch.autograd.Function.apply`` is wrapped once per process
  while at least one pinpoint run is open anywhere (reference-counted under a lock; the original is
  put back when the last run ends). The wrapper acts only when a pinpoint run is active in the
  calling context (the context variable ``_ACTIVE``); other threads and contexts call straight
  through to the original. Calls made in threads the run starts itself (which do not inherit the
  context) are not seen - the same holds for registry calls.

The module and optimizer hooks are torch's global hooks, registered for the block and removed in
``finally``, like the dispatch mode. The module hooks also tell the mode that owns the locator when a
module's forward starts and ends (``on_module_pre``, ``on_module``; replay's module units, trace's
module outputs).
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import threading
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from bench.pinpoint.ops import _tensors
from qwen_layers import registry

# ------------------------------------------------------------------------------------------------
# phases
# ------------------------------------------------------------------------------------------------

_PHASE: contextvars.ContextVar[str | None] = contextvars.ContextVar("detbench_pinpoint_phase", default=None)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Label the ops run inside the block with phase ``name`` (e.g. ``"optimizer"``) for the pinpointer.

    Costs nothing and changes nothing when no pinpoint run is active.
    """
    token = _PHASE.set(name)
    try:
        yield
    finally:
        _PHASE.reset(token)

# ------------------------------------------------------------------------------------------------
# where an op runs: module path, phase, autograd node
# ------------------------------------------------------------------------------------------------

_ACCUMULATE_GRAD = "torch::autograd::AccumulateGrad"


class _Raised:
    def __repr__(self) -> str:
        return "RAISED"


# The output handed to ``on_module`` when the module's forward raised (there is none).
RAISED = _Raised()


class _Busy:
    """Our own work (fingerprints, copies, comparisons) done from hooks and wrappers: while it runs,
    Python dispatch is off (``torch._C._DisableTorchDispatch``), so it is neither traced nor replayed,
    and a thread-local flag tells the wrappers and hooks to stay out of the way."""

    def __init__(self) -> None:
        self.local = threading.local()

    def __bool__(self) -> bool:
        return bool(getattr(self.local, "on", False))

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        prev = getattr(self.local, "on", False)
        self.local.on = True
        try:
            with torch._C._DisableTorchDispatch():
                yield
        finally:
            self.local.on = prev


class _Locator:
    """Installs module/optimizer hooks, observes registry calls and custom-Function applications; answers
    "where am I?" for an op."""

    def __init__(self, roots: Mapping[str, nn.Module] | None = None) -> None:
        self.local = threading.local()
        self.busy = _Busy()
        self.names: dict[int, str] = {}
        self.params: dict[int, tuple[str, torch.Tensor]] = {}
        self.intervals: list[tuple[int, int, str]] = []   # (first, end) sequence numbers of a module call
        self._sorted: list[tuple[int, int, str]] | None = None
        self._starts: list[int] = []
        self._seq_paths: dict[int, str] = {}
        self._probe = torch.zeros((), requires_grad=True)
        self.ptr_names: dict[int, str] = {}
        self.optimizers: list = []
        self.opt_depth = 0
        self.last_phase: str | None = None
        self.keep: list = []  # modules named here stay alive, so their ids stay theirs
        # Set by the mode that owns this locator.
        self.on_registry: Callable | None = None
        self.on_module_pre: Callable | None = None    # (module, args) before a forward
        self.on_module: Callable | None = None        # (path, module, (args, kwargs), output) after it
        self.on_pynode: Callable | None = None
        self.on_step: Callable | None = None          # (optimizer, "pre" | "post") around Optimizer.step
        for prefix, m in (roots or {}).items():
            self._index(m, prefix)

    # -- naming -----------------------------------------------------------------------------
    def stack(self) -> list:
        s = getattr(self.local, "stack", None)
        if s is None:
            s = self.local.stack = []
        return s

    def _index(self, root: nn.Module, prefix: str) -> None:
        for n, m in root.named_modules():
            self.names.setdefault(id(m), ".".join(p for p in (prefix, n) if p))
        for n, p in root.named_parameters():
            self.params.setdefault(id(p), (".".join(x for x in (prefix, n) if x), p))
        self.keep.append(root)

    def name_of(self, module: nn.Module) -> str:
        path = self.names.get(id(module))
        if path is None:
            st = self.stack()
            prefix = f"{st[-1][0]}.<{type(module).__name__}>".lstrip(".") if st else ""
            self._index(module, prefix)
            path = self.names[id(module)]
        return path

    # -- autograd nodes -> module paths ------------------------------------------------------
    def _next_seq(self) -> int | None:
        """The sequence number the next autograd node of this thread will get (a probe node takes one)."""
        with self.busy(), torch.enable_grad():
            try:
                fn = self._probe.view(()).grad_fn
            except RuntimeError:  # inference mode: no autograd nodes are made
                return None
        return None if fn is None else fn._sequence_nr() + 1

    def path_of_node(self, node) -> str:
        """The innermost module whose forward created ``node`` (by sequence-number interval), or ""."""
        seq = node._sequence_nr()
        hit = self._seq_paths.get(seq)
        if hit is not None:
            return hit
        if self._sorted is None:
            self._sorted = sorted(self.intervals)
            self._starts = [iv[0] for iv in self._sorted]
        i = bisect.bisect_right(self._starts, seq) - 1
        path = ""
        while i >= 0:  # intervals nest: the rightmost one that contains seq is the innermost
            first, end, p = self._sorted[i]
            if seq < end:
                path = p
                break
            i -= 1
        self._seq_paths[seq] = path
        return path

    # -- hooks ------------------------------------------------------------------------------
    def _pre_hook(self, module, args):
        self.stack().append((self.name_of(module), self._next_seq()))
        if self.on_module_pre is not None:
            self.on_module_pre(module, args)

    def _post_hook(self, module, args, *rest):
        # torch calls it (module, args, kwargs, output) after a forward, and - always_call - as
        # (module, args, output) when the forward raised: the output is then RAISED.
        kwargs, output = rest if len(rest) == 2 else ({}, RAISED)
        st = self.stack()
        if not st:
            return
        path, first = st.pop()
        end = self._next_seq()
        if first is not None and end is not None and end > first:
            self.intervals.append((first, end, path))
            self._sorted = None
            self._seq_paths.clear()
        if self.on_module is not None:
            self.on_module(path, module, (args, kwargs), output)

    def _function_applied(self, output) -> None:
        if self.on_pynode is None:
            return
        pynode = torch.autograd.function.BackwardCFunction
        seen = set()
        for t in _tensors(output):
            node = t.grad_fn
            if isinstance(node, pynode) and id(node) not in seen:
                seen.add(id(node))
                self.on_pynode(node)

    def _opt_pre(self, optimizer, args, kwargs):
        if self.on_step is not None:
            self.on_step(optimizer, "pre")
        self.opt_depth += 1
        if all(o is not optimizer for o in self.optimizers):
            self.optimizers.append(optimizer)
        self._index_pointers()

    def _opt_post(self, optimizer, args, kwargs):
        self.opt_depth = max(0, self.opt_depth - 1)
        if self.on_step is not None:
            self.on_step(optimizer, "post")

    def _index_pointers(self) -> None:
        ptrs: dict[int, str] = {}
        for name, p in self.params.values():
            ptrs[p.data_ptr()] = name
            if p.grad is not None:
                ptrs[p.grad.data_ptr()] = name
        for opt in self.optimizers:
            for p, state in opt.state.items():
                name = self.params.get(id(p), ("", None))[0]
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.numel() > 1:
                        ptrs[v.data_ptr()] = name
        self.ptr_names = ptrs

    def where(self, tensors=()) -> tuple[str, str, str | None]:
        """(module path, phase, autograd node name or None) of the op running now."""
        node = torch._C._current_autograd_node()
        if node is not None:
            name = node.name()
            if name == _ACCUMULATE_GRAD:
                var = getattr(node, "variable", None)
                return self.params.get(id(var), ("<parameter>", None))[0], "backward", name
            return self.path_of_node(node), "backward", name
        ph = "optimizer" if self.opt_depth else (_PHASE.get() or "forward")
        if ph == "optimizer":
            if self.last_phase != "optimizer":
                self._index_pointers()
            self.last_phase = ph
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    name = self.ptr_names.get(t.data_ptr())
                    if name is not None:
                        return name, ph, None
            return "", ph, None
        self.last_phase = ph
        st = self.stack()
        return (st[-1][0] if st else ""), ph, None

    # -- registry observer -------------------------------------------------------------------
    def in_unit(self) -> bool:
        return bool(getattr(self.local, "unit", None))

    def wrap(self, fn: Callable, op: str, backend: str) -> Callable:
        """The registry observer (:func:`qwen_layers.registry.observe`): ``fn``, the implementation just
        resolved, wrapped so that its calls reach ``on_registry`` (outside units, hooks and backward)."""
        locator = self

        def call(*args, **kwargs):
            cb = locator.on_registry
            if cb is None or locator.busy or torch._C._current_autograd_node() is not None:
                return fn(*args, **kwargs)
            unit = getattr(locator.local, "unit", None)
            if unit and not getattr(unit, "nests", False):  # inside a registry call or backward: part of it
                return fn(*args, **kwargs)
            return cb(fn, f"{op}/{backend}", args, kwargs)

        call.__wrapped__ = fn
        return call

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Hooks in place, registry calls observed and this locator active in the calling context for the
        block; all removed in ``finally``."""
        handles = []
        token = _ACTIVE.set(self)
        try:
            handles.append(register_module_forward_pre_hook(self._pre_hook))
            handles.append(register_module_forward_hook(self._post_hook, with_kwargs=True, always_call=True))
            handles.append(register_optimizer_step_pre_hook(self._opt_pre))
            handles.append(register_optimizer_step_post_hook(self._opt_post))
            with registry.observe(self.wrap), _FUNCTION_APPLY.held():
                yield
        finally:
            for h in handles:
                h.remove()
            _ACTIVE.reset(token)


# The locator of the pinpoint run active in this context (thread, task), or None.
_ACTIVE: contextvars.ContextVar[_Locator | None] = contextvars.ContextVar("detbench_pinpoint_locator", default=None)


class _FunctionApplyHook:
    """``torch.autograd.Function.apply`` wrapped while at least one pinpoint run is open in the process.

    One wrapper for the whole process, installed by the first :meth:`held` and removed by the last
    (a count under a lock, so concurrent runs in several threads share it). The wrapper calls the
    original and then reports the new custom-Function nodes to the locator active in the *calling*
    context (``_ACTIVE``); with none active - another thread, another context - it does nothing else.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._original = None
        self._installed = None

    @staticmethod
    def _wrapper(original) -> classmethod:
        def apply(cls, *args, **kwargs):
            out = original.__get__(None, cls)(*args, **kwargs)
            locator = _ACTIVE.get()
            if locator is not None and not locator.busy:
                locator._function_applied(out)
            return out

        return classmethod(apply)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        function_cls = torch.autograd.Function
        with self._lock:
            if self._installed is None:
                self._original = function_cls.__dict__["apply"]
                self._installed = self._wrapper(self._original)
                function_cls.apply = self._installed
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                # The last user puts the original back - unless someone wrapped ours meanwhile: then
                # ours stays in their chain (calling straight through while no run is active) and is
                # reused by the next run rather than wrapped a second time.
                if self._users == 0 and function_cls.__dict__.get("apply") is self._installed:
                    function_cls.apply = self._original
                    self._original = self._installed = None


_FUNCTION_APPLY = _FunctionApplyHook()


@contextlib.contextmanager
def running(mode: TorchDispatchMode, locator: _Locator) -> Iterator[None]:
    """``mode`` (a replay or trace dispatch mode owning ``locator``) and ``locator``'s hooks active for the block."""
    with locator.installed():
        mode.active = True
        try:
            with mode:
                yield
        finally:
            mode.active = False
            locator.on_registry = locator.on_module = locator.on_module_pre = locator.on_pynode = None
            locator.on_step = None
