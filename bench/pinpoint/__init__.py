"""``detbench pinpoint``: which op made two runs differ.

Two complementary methods, both on any callable (a block, one SFT step, a user's function):

**Replay** (:func:`replay`, one run, no cascade). Under a ``TorchDispatchMode`` every aten op runs a
second time right after the first, on the same inputs, and the two results are compared bit for bit.
An op whose result changed although its inputs could not have is nondeterministic by itself (a GPU
kernel that adds with atomics, a split-K reduction ordered by arrival). Two coarser *units* are
replayed as a whole, because nondeterminism can live in how Python composes deterministic ops
(bench/planted.py sums deterministic partial products in a random order; every single ``mm`` and
``add`` is deterministic, so replaying aten ops one by one cannot see it):

* every call of a registry backend (``qwen_layers.registry.resolve`` is wrapped while a pinpoint
  context is open, so every op the model routes through the registry, and detbench's transformers
  attention, is covered) - replayed on detached copies of its arguments under ``no_grad``;
* every backward of a custom ``torch.autograd.Function`` (a Python-level backward) - replayed by
  calling the node's backward again on copies of its incoming gradients, inside the node's post-hook
  while its saved tensors are still alive.

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
=============================  ==================================================================

**Trace and compare** (:func:`compare_runs`, two or more full runs). Every op's inputs and outputs
are fingerprinted in execution order, together with every registry call, every custom-Function
backward and every module's forward output. The runs are aligned event by event and the report names
the *root cause* (the first event whose inputs were identical and whose outputs differ), the first
module whose output differs, and how far the difference spread (how many later ops differ). An event
whose outputs differ while its inputs differ too is a consequence, not a cause; when the very first
difference is such an event (its inputs came from identical values, wired differently), the report
says so: that is the signature of Python code combining identical partial results in another order.

Fingerprints are integer arithmetic over the bit patterns, on the tensor's device (details in
:class:`_Fingerprints`). CPU: the bytes are read as int64 words twice, from byte 0 and from byte 4, and
each reading is dotted with seeded random int64 coefficients (sums wrap modulo 2^64); CUDA: the bytes
as 32/16/8-bit words widened to int64, times the coefficients, summed. Integer addition modulo 2^64 is
associative, so no reduction order changes a fingerprint: it is deterministic. Dtype and shape are
compared exactly; on the CPU, tensors of at most 256 bytes are compared by their bytes. *Collision probability*:
for two tensors that differ, with coefficients uniform over Z/2^64 and independent of the data, the
fingerprints agree with probability 2^(v-64), v the lowest differing bit position of the word that
holds it; every bit lies below bit 32 of a word in one of the two CPU readings (or in the 12 tail
bytes kept exactly), so this is at most 2^-33 per compared tensor (on CUDA: 2^-33 for 4- and 8-byte
dtypes, 2^-49 for bf16/fp16, 2^-57 for 1-byte), and 2^-64 for differences in the last mantissa bit.
The outputs of order-free ops are not read at all: they are described *symbolically* by (op, the
descriptors of its inputs, its scalar arguments), which is exact - equal descriptors mean equal
contents. Every registry call, custom-Function backward and module output is fingerprinted by value.
``exact=True`` keeps a CPU copy of every tensor instead and compares all bits; it also reports how
many elements differ at the root cause.

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

Custom ``autograd.Function`` nodes are found by wrapping ``torch.autograd.Function.apply`` while a
pinpoint context is open. Nothing here changes global state outside the ``with`` blocks of
:func:`replay`, :func:`trace` and :func:`compare_runs`: the hooks, the registry and ``Function.apply``
wrappers and the dispatch mode are removed in ``finally``. Tensor subclasses with their own
``__torch_dispatch__`` (DTensor, FakeTensor) are not supported.

Speed (``bench/benchmarks/bench_pinpoint_overhead.py``): both methods pay a Python call per aten op
(a do-nothing dispatch mode alone doubles a tiny CPU step), replay runs every order-dependent op
twice, and trace reads every order-dependent output once more to fingerprint it. A tensor is
fingerprinted once per version: an input whose contents a traced op described (as its output, or as
the tensor it wrote in place) reuses that descriptor. On the CPU the two readings cost about one
int64 multiply-add per 4 bytes (numpy on aligned words, ``torch.dot`` on large unaligned ones) and
are the bulk of trace's cost at large batches; on CUDA a fingerprint is one multiply (widening by
type promotion) and one integer sum per chunk, resolved with one synchronisation at the end.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import math
import struct
import sys
import threading
import time
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.compare import bits, bitwise_equal, mismatch

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
# what kind of op is this?
# ------------------------------------------------------------------------------------------------

SKIP_NAMESPACES = {
    "profiler": "profiler range markers (a side effect, no result)",
    "c10d": "collective communication (running it twice would communicate twice)",
    "_c10d_functional": "collective communication (running it twice would communicate twice)",
    "_c10d_functional_autograd": "collective communication (running it twice would communicate twice)",
    "_dtensor": "distributed tensor bookkeeping",
}
UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
                           "_empty_affine_quantized", "_empty_per_channel_affine_quantized"})
METADATA_OR_SIDE_EFFECT = frozenset({
    "resize_", "resize_as_", "_resize_output_", "set_", "record_stream", "_assert_async", "_assert_scalar",
    "_functional_assert_async", "_functional_assert_scalar", "_print", "sym_constrain_range",
    "sym_constrain_range_for_size", "_functional_sym_constrain_range", "_functional_sym_constrain_range_for_size",
    "_assert_tensor_metadata", "_make_dep_token",
})
# Ops that only move, copy or fill data (no arithmetic that could be ordered): like pointwise ops,
# each output element is a fixed function of fixed input elements.
DATA_MOVEMENT = frozenset({
    "clone", "copy_", "_to_copy", "cat", "stack", "constant_pad_nd", "slice_backward", "select_backward",
    "fill_", "zero_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
    "new_full", "scalar_tensor", "arange", "_unsafe_view", "lift_fresh_copy", "contiguous", "repeat", "flip",
    "roll", "tril", "triu", "masked_fill", "masked_fill_", "where", "expand_copy", "permute_copy", "view_copy",
    "transpose_copy", "t_copy", "unsqueeze_copy", "squeeze_copy", "alias_copy", "_copy_from",
    "_copy_from_and_resize", "detach_copy", "index_select", "embedding", "gather",
})
IGNORED_RETURN_NAMES = frozenset({"philox_seed", "philox_offset", "rng_state", "seed", "offset", "debug_attn_mask",
                                  "unused"})

SKIP_REASONS = {
    "order_free": "pointwise or data-movement op: each output element is a fixed function of fixed input "
                  "elements, so no order can change it (replay(..., all_ops=True) replays them too)",
    "view": "views and aliases compute nothing (their data is their base's)",
    "uninitialised": "allocates uninitialised memory: its contents are not a result",
    "inplace_view": "changes shape/strides in place: running it twice would apply it twice",
    "side_effect": "metadata change, assertion, print or stream bookkeeping: not run twice",
}


@dataclass(frozen=True)
class OpInfo:
    name: str                       # "aten.mm.default"
    kind: str                       # functional | mutating | view | uninitialised | skip
    reason: str | None              # why it is skipped (SKIP_REASONS key or namespace text)
    random: bool                    # draws from a generator
    written: tuple                  # positional indices / kwarg names of arguments it writes
    out_args: tuple                 # those of them that are out= arguments (prior content unused)
    ignored_returns: frozenset      # return indices never compared
    order_free: bool = False        # pointwise or pure data movement: cannot depend on an order


def op_info(func, cache: dict) -> OpInfo:
    """How replay and trace treat ``func`` (cached in ``cache``)."""
    info = cache.get(func)
    if info is None:
        info = cache[func] = _op_info(func)
    return info


@functools.lru_cache(maxsize=4096)
def _op_info(func) -> OpInfo:
    name = str(func)
    schema = getattr(func, "_schema", None)
    namespace = getattr(func, "namespace", name.split(".")[0])
    base = getattr(getattr(func, "overloadpacket", None), "__name__", name.split(".")[1] if "." in name else name)
    tags = set(getattr(func, "tags", ()))
    written, out_args, ignored = [], [], set()
    view = False
    random = torch.Tag.nondeterministic_seeded in tags
    if schema is not None:
        for i, a in enumerate(schema.arguments):
            key = a.name if a.kwarg_only else i
            if a.alias_info is not None and a.alias_info.is_write:
                written.append(key)
                if getattr(a, "is_out", False):
                    out_args.append(key)
            if a.name in ("generator", "dropout_p"):
                random = True
        for i, r in enumerate(schema.returns):
            if r.alias_info is not None and not r.alias_info.is_write:
                view = True
            if r.name in IGNORED_RETURN_NAMES:
                ignored.add(i)
    kind, reason = "functional", None
    if namespace in SKIP_NAMESPACES:
        kind, reason = "skip", namespace
    elif base in METADATA_OR_SIDE_EFFECT:
        kind, reason = "skip", "side_effect"
    elif torch.Tag.inplace_view in tags:
        kind, reason = "skip", "inplace_view"
    elif base in UNINITIALISED:
        kind, reason = "uninitialised", "uninitialised"
    elif view and not written:
        kind, reason = "view", "view"
    elif written:
        kind = "mutating"
    order_free = (not random and kind in ("functional", "mutating")
                  and (torch.Tag.pointwise in tags or base in DATA_MOVEMENT))
    return OpInfo(name, kind, reason, random, tuple(written), tuple(out_args), frozenset(ignored), order_free)


def _arg(args, kwargs, key):
    if isinstance(key, int):
        return args[key] if key < len(args) else None
    return kwargs.get(key)


def _written_values(info: OpInfo, args, kwargs) -> list:
    return [_arg(args, kwargs, k) for k in info.written]


def _leaves(x, ignored: frozenset = frozenset()) -> list:
    """Leaves (tensors, numbers, None ...) of nested tuples/lists/dicts/dataclasses, in order.

    ``ignored`` drops top-level positions of a tuple/list (an op's returns that are never compared).
    Hand-written rather than ``torch.utils._pytree``: it runs for every op, and speed matters here.
    """
    if isinstance(x, torch.Tensor):
        return [x]
    out: list = []
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            if i in ignored:
                continue
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif isinstance(v, (list, tuple, dict)) or (dataclasses.is_dataclass(v) and not isinstance(v, type)):
                out.extend(_leaves(v))
            else:
                out.append(v)
        return out
    if isinstance(x, dict):
        for v in x.values():
            out.extend(_leaves(v))
        return out
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            out.extend(_leaves(getattr(x, f.name)))
        return out
    return [x]


def _tensors(x) -> list[torch.Tensor]:
    """Every tensor in nested tuples/lists/dicts/dataclasses (model outputs are often dataclasses)."""
    if isinstance(x, torch.Tensor):
        return [x]
    return [v for v in _leaves(x) if isinstance(v, torch.Tensor)]


def _args_tensors(args, kwargs) -> list[torch.Tensor]:
    out = [a for a in args if isinstance(a, torch.Tensor)]
    if len(out) != len(args) or kwargs:
        out = _tensors(args) + (_tensors(list(kwargs.values())) if kwargs else [])
    return out


def _clone(x):
    """Detached copies of every tensor in nested tuples/lists/dicts; other values as they are."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        return tuple(_clone(v) for v in x)
    if isinstance(x, list):
        return [_clone(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _meta(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return type(x).__name__


# ------------------------------------------------------------------------------------------------
# generator state
# ------------------------------------------------------------------------------------------------


class _Rng:
    """Generator states to restore: the CPU default, every initialised CUDA device, an explicit one."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.gen = generator
        self.gen_state = generator.get_state() if generator is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.gen is not None:
            self.gen.set_state(self.gen_state)


# ------------------------------------------------------------------------------------------------
# comparing results
# ------------------------------------------------------------------------------------------------


def _value_key(x):
    if isinstance(x, float):
        return ("f", struct.pack("<d", x))
    return ("v", x)


_MEMCMP: list = []


def _memcmp():
    """libc's memcmp through ctypes (None where it cannot be found)."""
    if not _MEMCMP:
        fn = None
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
            fn = libc.memcmp
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        except (OSError, AttributeError):
            fn = None
        _MEMCMP.append(fn)
    return _MEMCMP[0]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``bench.compare.bitwise_equal`` with a fast path: contiguous CPU tensors are compared with
    ``memcmp`` over their bytes (the same bits, without a dispatcher call per comparison)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        return True  # no data to compare
    if (a.device.type == "cpu" and b.device.type == "cpu" and a.layout == torch.strided and b.layout == torch.strided
            and a.is_contiguous() and b.is_contiguous()):
        fn = _memcmp()
        n = a.numel() * a.element_size()
        if fn is not None:
            return n == 0 or fn(a.data_ptr(), b.data_ptr(), n) == 0
    return bitwise_equal(a, b)


def first_difference(a, b, ignored: frozenset = frozenset()):
    """(index, leaf_a, leaf_b) of the first leaf of ``a`` and ``b`` that is not bitwise equal, or None."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return None if same_bits(a, b) else (0, a, b)
    la, lb = _leaves(a, ignored), _leaves(b, ignored)
    if len(la) != len(lb):
        return (min(len(la), len(lb)), None, None)
    for i, (x, y) in enumerate(zip(la, lb)):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and same_bits(x, y)):
                return (i, x, y)
        elif _value_key(x) != _value_key(y):
            return (i, x, y)
    return None


# ------------------------------------------------------------------------------------------------
# where an op runs: module path, phase, autograd node
# ------------------------------------------------------------------------------------------------

_ACCUMULATE_GRAD = "torch::autograd::AccumulateGrad"


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
    """Installs module/optimizer hooks and the registry and custom-Function wrappers; answers "where am
    I?" for an op."""

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
        self.on_module: Callable | None = None
        self.on_pynode: Callable | None = None
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
        import bisect

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

    def _post_hook(self, module, args, kwargs, output):
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
        self.opt_depth += 1
        if all(o is not optimizer for o in self.optimizers):
            self.optimizers.append(optimizer)
        self._index_pointers()

    def _opt_post(self, optimizer, args, kwargs):
        self.opt_depth = max(0, self.opt_depth - 1)

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

    # -- registry wrapper --------------------------------------------------------------------
    def in_unit(self) -> bool:
        return bool(getattr(self.local, "unit", None))

    def wrap(self, fn: Callable, op: str, backend: str) -> Callable:
        locator = self

        def call(*args, **kwargs):
            cb = locator.on_registry
            if cb is None or locator.in_unit() or locator.busy or torch._C._current_autograd_node() is not None:
                return fn(*args, **kwargs)
            return cb(fn, f"{op}/{backend}", args, kwargs)

        call.__wrapped__ = fn
        return call

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Hooks and wrappers in place for the block; all removed in ``finally``."""
        import qwen_layers.registry as reg
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        handles = []
        registry = reg.REGISTRY
        had_instance_resolve = "resolve" in registry.__dict__
        saved_instance = registry.__dict__.get("resolve")
        saved_module = reg.resolve
        inner = saved_instance if had_instance_resolve else saved_module
        function_cls = torch.autograd.Function
        saved_apply = function_cls.__dict__["apply"]
        locator = self

        def resolve(op, name, device=None):
            return locator.wrap(inner(op, name, device), op, name)

        def apply(cls, *args, **kwargs):
            out = saved_apply.__get__(None, cls)(*args, **kwargs)
            if not locator.busy:
                locator._function_applied(out)
            return out

        try:
            handles.append(register_module_forward_pre_hook(self._pre_hook))
            handles.append(register_module_forward_hook(self._post_hook, with_kwargs=True, always_call=True))
            handles.append(register_optimizer_step_pre_hook(self._opt_pre))
            handles.append(register_optimizer_step_post_hook(self._opt_post))
            reg.resolve = resolve
            registry.resolve = resolve
            function_cls.apply = classmethod(apply)
            yield
        finally:
            for h in handles:
                h.remove()
            function_cls.apply = saved_apply
            reg.resolve = saved_module
            if had_instance_resolve:
                registry.resolve = saved_instance
            else:
                registry.__dict__.pop("resolve", None)


# ------------------------------------------------------------------------------------------------
# replay
# ------------------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One op (or unit) that disagreed with its own replay."""

    level: str                  # "aten" | "registry" | "autograd.Function"
    op: str                     # aten.mm.default | linear/planted-nondet | _PVNondetDVBackward
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


def _diff_stats(a, b) -> tuple[int, int, float, int]:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype:
        m = mismatch(a, b)
        return m.n_diff, m.n_total, m.max_abs, m.max_ulp
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        n = a.numel() if isinstance(a, torch.Tensor) else 1
        return n, n, math.inf, 0
    try:
        return 1, 1, abs(float(a) - float(b)), 0
    except (TypeError, ValueError):
        return 1, 1, math.inf, 0


class _Unit:
    """A registry call or custom-Function backward being recorded (first run, then its replay)."""

    def __init__(self, level: str, name: str, path: str, ph: str, node: str | None) -> None:
        self.level, self.name, self.path, self.phase, self.node = level, name, path, ph, node
        self.first: list = []
        self.second: list = []
        self.target = self.first
        self.inputs: list[str] = []


class ReplayMode(TorchDispatchMode):
    """The dispatch mode behind :func:`replay` (use that function; this class is its engine)."""

    def __init__(self, locator: _Locator, all_ops: bool = False) -> None:
        super().__init__()
        self.loc = locator
        self.all_ops = all_ops
        self.busy = locator.busy
        self.infos: dict = {}
        self.findings: dict[tuple, Finding] = {}
        self.replayed = 0
        self.units = 0
        self.skipped: Counter = Counter()
        self.errors: list[str] = []
        self.active = False
        locator.on_registry = self._registry_call
        locator.on_pynode = self._hook_pynode

    # -- dispatch ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.busy:
            return func(*args, **kwargs)
        info = op_info(func, self.infos)
        unit = getattr(self.loc.local, "unit", None)
        if unit is not None:
            return self._record(unit, func, info, args, kwargs)
        if info.kind in ("skip", "view", "uninitialised"):
            self.skipped[info.reason] += 1
            return func(*args, **kwargs)
        if info.order_free and not self.all_ops:
            self.skipped["order_free"] += 1
            return func(*args, **kwargs)
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
            return out
        finally:
            if after is not None:
                after.restore()
        self.replayed += 1
        d = first_difference(a, b, ignored)
        if d is not None:
            ins = _args_tensors(args, kwargs)
            path, ph, node = self.loc.where(ins)
            self._add(Finding("aten", info.name, path, ph, 1, [_meta(t) for t in ins],
                              [_meta(t) for t in _leaves(out)], d[0], *_diff_stats(d[1], d[2]), node=node))
        return out

    def _add(self, f: Finding) -> None:
        key = (f.level, f.op, f.module, f.phase, f.inside)
        old = self.findings.get(key)
        if old is None:
            self.findings[key] = f
        else:
            old.count += 1

    # -- units ------------------------------------------------------------------------------
    def _record(self, unit: _Unit, func, info: OpInfo, args, kwargs):
        if info.kind in ("skip", "view", "uninitialised"):
            return func(*args, **kwargs)
        if info.kind == "mutating":
            snap = _args_tensors(_clone(args), _clone(kwargs))
            out = func(*args, **kwargs)
            outs = _clone((_written_values(info, args, kwargs), out))
            unit.target.append((func, info, snap, outs))
            return out
        out = func(*args, **kwargs)
        unit.target.append((func, info, _args_tensors(args, kwargs), out))
        return out

    def _finish_unit(self, unit: _Unit, out1, out2) -> None:
        """Compare a unit's two runs: its outputs, and its ops pairwise.

        Ops that can depend on an order are always compared (an aten op inside the unit that disagreed
        with itself is reported even when the unit's outputs agree); order-free ops only when the
        unit's outputs differ, to find the first op that got different inputs.
        """
        self.units += 1
        d_unit = first_difference(out1, out2)
        full = d_unit is not None or self.all_ops
        composition = None
        first_diff_seen = False
        for (f1, info, in1, o1), (f2, _, in2, o2) in zip(unit.first, unit.second):
            if f1 is not f2:
                composition = composition or f"the replay ran other ops from {info.name} on (control flow changed)"
                break
            if info.order_free and not full:
                continue
            ignored = frozenset() if info.kind == "mutating" else info.ignored_returns
            d = first_difference(o1, o2, ignored)
            if d is None:
                continue
            if first_difference(in1, in2) is None:
                self._add(Finding("aten", info.name, unit.path, unit.phase, 1, [_meta(t) for t in in1],
                                  [_meta(t) for t in _leaves(o1)], d[0], *_diff_stats(d[1], d[2]),
                                  inside=unit.name, node=unit.node))
            elif not first_diff_seen and composition is None:
                composition = (f"every op agreed with itself; the first to differ, {info.name}, got different "
                               f"inputs built from identical values (the order in which Python combined them "
                               f"changed)")
            first_diff_seen = True
        if len(unit.first) != len(unit.second) and composition is None:
            composition = f"the replay ran {len(unit.second)} ops, the first run {len(unit.first)}"
        if d_unit is not None:
            self._add(Finding(unit.level, unit.name, unit.path, unit.phase, 1, unit.inputs,
                              [_meta(t) for t in _leaves(out1)], d_unit[0], *_diff_stats(d_unit[1], d_unit[2]),
                              node=unit.node, note=composition or ""))

    def _registry_call(self, fn, name: str, args, kwargs):
        path, ph, node = self.loc.where()
        unit = _Unit("registry", name, path, ph, node)
        unit.inputs = [_meta(t) for t in _args_tensors(args, kwargs)]
        rng = _Rng()
        self.loc.local.unit = unit
        try:
            out = fn(*args, **kwargs)
        finally:
            self.loc.local.unit = None
        with self.busy():
            after = _Rng()
            copies = (_clone(args), _clone(kwargs))
            rng.restore()
        unit.target = unit.second
        self.loc.local.unit = unit
        try:
            with torch.no_grad():
                out2 = fn(*copies[0], **copies[1])
        except Exception as e:
            self.errors.append(f"{name} at {path}: replay raised {type(e).__name__}: {e}")
            return out
        finally:
            self.loc.local.unit = None
            with self.busy():
                after.restore()
        with self.busy():
            self._finish_unit(unit, out, out2)
        return out

    def _hook_pynode(self, node) -> None:
        ref = weakref.ref(node)
        mode = self

        def pre(grad_outputs):
            n = ref()
            if n is None or mode.loc.in_unit() or not mode.active:
                return None
            path = mode.loc.path_of_node(n)
            unit = _Unit("autograd.Function", n.name(), path, "backward", n.name())
            unit.inputs = [_meta(g) for g in _tensors(grad_outputs)]
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
                after = _Rng()
                copies = [_clone(g) for g in grad_outputs]
                unit.rng.restore()
            unit.target = unit.second
            mode.loc.local.unit = unit
            try:
                out2 = n.apply(*copies)
            except Exception as e:
                mode.errors.append(f"{unit.name} at {unit.path}: backward replay raised {type(e).__name__}: {e}")
                return None
            finally:
                mode.loc.local.unit = None
                with mode.busy():
                    after.restore()
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
    """What :func:`replay` found. Prints as a rich table; :meth:`to_dict` / :meth:`to_json` serialise."""

    findings: list[Finding]
    ops_replayed: int
    units_replayed: int          # registry calls and custom-Function backwards replayed as a whole
    skipped: dict[str, int]      # reason -> ops not replayed
    errors: list[str]
    seconds: float
    value: Any = field(default=None, repr=False, compare=False)  # what fn returned (not serialised)

    @property
    def clean(self) -> bool:
        return not self.findings and not self.errors

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "value"}
        d["method"] = "replay"
        d["clean"] = self.clean
        d["skip_reasons"] = {k: SKIP_REASONS.get(k, SKIP_NAMESPACES.get(k, k)) for k in self.skipped}
        return d

    def to_json(self, **kw) -> str:
        from bench.results import to_json

        return json.dumps(to_json(self.to_dict()), **kw)

    def summary(self) -> str:
        if self.clean:
            return (f"replay: every op agreed with itself ({self.ops_replayed} aten ops and {self.units_replayed} "
                    f"registry/custom-Function units replayed once each)")
        names = "; ".join(f"{f.op} at {f.where}" for f in self.findings)
        return f"replay: {len(self.findings)} op(s) disagreed with their own replay: {names}"

    def __rich__(self):
        from rich.console import Group
        from rich.markup import escape
        from rich.table import Table

        if not self.findings:
            parts = [f"[green]{escape(self.summary())}[/]"]
        else:
            t = Table(title="replay: ops that disagreed with their own replay", title_justify="left")
            for col in ("#", "level", "op", "module", "phase", "calls", "differs", "max |d|", "max ulp"):
                t.add_column(col, overflow="fold")
            notes = []
            for i, f in enumerate(self.findings, 1):
                t.add_row(str(i), f.level, f"[bold]{escape(f.op)}[/]", escape(f.module or "<root>"), f.phase,
                          str(f.count), f"{f.n_diff}/{f.n_total} of output {f.output_index}", f"{f.max_abs:.3e}",
                          str(f.max_ulp))
                ins = ", ".join(f.inputs[:4]) + (" ..." if len(f.inputs) > 4 else "")
                extra = "; ".join(x for x in (f"inside {f.inside}" if f.inside else "",
                                              f"node {f.node}" if f.node and f.node != f.op else "", f.note) if x)
                notes.append(f"  #{i}: inputs {ins}" + (f"; {extra}" if extra else ""))
            parts = [t, *[escape(n) for n in notes]]
        if self.errors:
            parts += [f"[yellow]{escape(e)}[/]" for e in self.errors]
        if self.skipped:
            parts.append("not replayed: " + ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items())))
        return Group(*parts)

    def __str__(self) -> str:
        return _render(self)


def _render(obj) -> str:
    from rich.console import Console

    console = Console(width=160, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(obj)
    return cap.get()


@contextlib.contextmanager
def _mode(mode: TorchDispatchMode, locator: _Locator) -> Iterator[None]:
    with locator.installed():
        mode.active = True
        try:
            with mode:
                yield
        finally:
            mode.active = False
            locator.on_registry = locator.on_module = locator.on_pynode = None


def replay(fn: Callable, *args, roots: Mapping[str, nn.Module] | None = None, all_ops: bool = False,
           **kwargs) -> ReplayReport:
    """Run ``fn(*args, **kwargs)`` once, replaying every op (and every registry call and custom-Function
    backward) on the spot and comparing bit for bit. Returns a :class:`ReplayReport`.

    ``fn`` runs normally otherwise: its result (``report.value``), its side effects and the generator
    state afterwards are those of a plain run. ``roots`` names modules explicitly
    (``{"model": m}``); by default the first module called names its submodules from ``""``.
    Order-free ops (pointwise, data movement) are not replayed unless ``all_ops=True``.
    """
    loc = _Locator(roots)
    mode = ReplayMode(loc, all_ops)
    t0 = time.perf_counter()
    with _mode(mode, loc):
        value = fn(*args, **kwargs)
    return ReplayReport(list(mode.findings.values()), mode.replayed, mode.units, dict(mode.skipped), mode.errors,
                        time.perf_counter() - t0, value)


# ------------------------------------------------------------------------------------------------
# trace and compare
# ------------------------------------------------------------------------------------------------

FP_SEED = 0x5EED_DE7B
FP_CHUNK = 1 << 22          # 64-bit words per fingerprint chunk (32 MiB of int64 coefficients per device)
_FP_BLOCK = 1 << 16         # coefficients are drawn in blocks, each from its own seed: stable prefixes
FP_SMALL = 256              # tensors of at most this many bytes are kept as their bytes (exact)
_NUMPY_WORDS = 1 << 14      # unaligned CPU words: numpy up to this many (128 KiB), torch.dot above
_CPU = torch.device("cpu")
MAX_SYMBOLIC_DEPTH = 48     # longer chains of order-free ops are cut by fingerprinting the value

VALUE_KINDS = frozenset({"b", "h", "d", "x"})


class _Fingerprints:
    """Descriptors of tensor contents for one traced run.

    ==========  ===================================================================================
    ``b``       the bytes themselves (tensors of at most ``FP_SMALL`` bytes): exact
    ``h``       CPU: two int64 dot products of the bytes read as 64-bit words, one at byte offset 0
                and one at byte offset 4, with seeded random coefficients, plus the last 12 bytes.
                Every bit of the tensor sits below bit 32 of a word in one of the two (or in the
                tail), so for differing tensors the chance that both sums still agree is <= 2^-33.
    ``d``       CUDA: the bytes as int32/int16/int8 words widened to int64, times seeded random
                coefficients, summed on the device (<= 2^-33, 2^-49, 2^-57)
    ``x``       exact mode: a CPU copy of the tensor
    ``v``       a view: the base's descriptor plus shape, strides and offset
    ``u``       uninitialised memory (``empty``): shape and dtype only
    ``f``       the output of an order-free op: (op, its inputs' descriptors, its scalar arguments)
    ``s``       a non-tensor value
    ==========  ===================================================================================

    Sums wrap modulo 2^64; integer addition is associative, so the reduction order of ``dot``/``sum``
    cannot change them.
    """

    def __init__(self, exact: bool) -> None:
        self.exact = exact
        self.device_values: list[torch.Tensor] = []   # 'd' fingerprints still on their device
        self.copies: list[torch.Tensor] = []          # 'x' copies
        self.cache: dict[int, tuple] = {}   # id(tensor) -> (weakref, version, descriptor)
        self.by_place: dict[tuple, tuple] = {}  # (address, dtype, shape, strides) -> the same entry
        self.pending: list = []             # (tensor, entry, place) written by the last mutating op
        self._sweep_at = 4096
        self.coeff: dict[tuple, torch.Tensor] = {}
        self.np_coeff: list = [None, None]              # CPU coefficients of lanes 0 and 1, as numpy

    # -- value fingerprints -----------------------------------------------------------------
    def _coefficients(self, device: torch.device, lane: int, n: int) -> torch.Tensor:
        key = (device, lane)
        c = self.coeff.get(key)
        if c is None or c.numel() < n:
            c = _coefficient_vector(device, lane, -(-n // _FP_BLOCK))
            self.coeff[key] = c
        return c[:n]

    def _np_coefficients(self, lane: int, n: int):
        """The CPU coefficients of ``lane`` as a numpy array of at least ``n`` words (a view of the torch
        vector, kept so that the hot path slices numpy only)."""
        c = self.np_coeff[lane]
        if c is None or c.size < n:
            c = self.np_coeff[lane] = self._coefficients(_CPU, lane, n).numpy()
        return c

    def _cpu_dots(self, arr, offset: int, lane: int) -> tuple[int, ...]:
        """Dot products of the bytes of ``arr`` from ``offset`` on, read as int64 words, with lane ``lane``'s
        coefficients, one per chunk of FP_CHUNK words. numpy on aligned words and on small unaligned
        ones (least overhead per call); torch.dot on large unaligned ones (numpy copies those)."""
        import numpy as np

        count = (arr.nbytes - offset) >> 3
        words = arr[offset:offset + 8 * count].view(np.int64)
        if count <= FP_CHUNK:
            c = self._np_coefficients(lane, count)
            if offset == 0 or count <= _NUMPY_WORDS:
                return (int(np.dot(words, c[:count])),)
            return (int(torch.dot(torch.from_numpy(words), torch.from_numpy(c[:count]))),)
        out = []
        for start in range(0, count, FP_CHUNK):
            w = words[start:start + FP_CHUNK]
            c = self._np_coefficients(lane, w.size)[:w.size]
            out.append(int(np.dot(w, c)) if offset == 0 else int(torch.dot(torch.from_numpy(w), torch.from_numpy(c))))
        return tuple(out)

    def value(self, t: torch.Tensor) -> tuple:
        """A value descriptor of ``t`` (exact bytes, fingerprint or exact copy)."""
        t = t.detach()
        head = (str(t.dtype), tuple(t.shape))
        if self.exact:
            self.copies.append(t.to("cpu", copy=True))
            return ("x",) + head + (len(self.copies) - 1,)
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.device.type == "cpu":
            n = t.numel() * t.element_size()
            if n <= FP_SMALL:
                return ("b",) + head + (t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if n else b"",)
            arr = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            return ("h",) + head + (self._cpu_dots(arr, 0, 0), self._cpu_dots(arr, 4, 1), arr[-12:].tobytes())
        flat = t.contiguous().reshape(-1)
        size = flat.element_size()
        if flat.dtype == torch.bool or size == 1:
            words = flat.view(torch.int8)
        elif size == 2:
            words = flat.view(torch.int16)
        else:
            words = flat.view(torch.int32)
        idx = []
        values = self.device_values
        for start in range(0, max(words.numel(), 1), FP_CHUNK):
            w = words[start:start + FP_CHUNK]
            # One multiply (the narrow words are widened to int64 inside it, by type promotion) and one
            # integer sum per chunk; the scalars stay on the device until :meth:`resolver`.
            values.append(torch.mul(w, self._coefficients(w.device, 0, w.numel())).sum())
            idx.append(len(values) - 1)
        return ("d",) + head + (tuple(idx),)

    # -- the cache: tensor -> descriptor of its current contents ----------------------------
    def put(self, t: torch.Tensor, desc: tuple, written: bool = False) -> tuple:
        """Cache ``desc`` as the descriptor of ``t``'s current contents. ``written``: ``t`` was just
        written by the op being traced (see :meth:`settle`)."""
        try:
            version = t._version
        except Exception:  # inference tensors have no version counter: never cached
            return desc
        cache = self.cache
        entry = (weakref.ref(t), version, desc)
        cache[id(t)] = entry
        try:
            place = (t.data_ptr(), t.dtype, t.shape, t.stride())
            self.by_place[place] = entry
        except Exception:  # no storage (sparse, meta ...)
            place = None
        if written:
            self.pending.append((t, entry, place))
        if len(cache) > self._sweep_at:  # drop entries of tensors that are gone
            for key in [k for k, e in cache.items() if e[0]() is None]:
                del cache[key]
            for key in [k for k, e in self.by_place.items() if e[0]() is None]:
                del self.by_place[key]
            self._sweep_at = max(4096, 2 * len(cache))
        return desc

    def settle(self) -> None:
        """Re-key the entries of the tensors the last mutating op wrote to their bumped version.

        An in-place or ``out=`` op reaches the dispatch mode *before* autograd's ADInplaceOrView kernel
        bumps the written tensors' version counters (it bumps each once, after the op returns), so the
        entry :meth:`put` made is one version behind. This runs before the next lookup, when the op has
        returned: an entry whose tensor is exactly one version ahead is moved to that version (the
        bump); one that moved further was written again, untraced, and stays stale (described anew).
        """
        pending, self.pending = self.pending, []
        cache, by_place = self.cache, self.by_place
        for t, entry, place in pending:
            version = t._version
            if version != entry[1] + 1:
                continue
            bumped = (entry[0], version, entry[2])
            if cache.get(id(t)) is entry:
                cache[id(t)] = bumped
            if place is not None and by_place.get(place) is entry:
                by_place[place] = bumped

    def cached(self, t: torch.Tensor) -> tuple | None:
        """The cached descriptor of ``t``, if its contents are unchanged since it was made.

        A tensor is found by identity, or - for a different tensor object over the same memory, like
        a saved tensor unpacked in backward - by (address, dtype, shape, strides) while the tensor it
        was recorded for is still alive (so the memory cannot have been reused) and the shared version
        counter says neither was written since.
        """
        if self.pending:
            self.settle()
        entry = self.cache.get(id(t))
        try:
            if entry is not None and entry[0]() is t:
                return entry[2] if entry[1] == t._version else None
            entry = self.by_place.get((t.data_ptr(), t.dtype, t.shape, t.stride()))
            if entry is not None:
                alive = entry[0]()
                if alive is not None and entry[1] == alive._version == t._version:
                    return entry[2]
        except Exception:  # inference tensors (no version), tensors without storage
            return None
        return None

    def describe(self, t) -> tuple:
        """The descriptor of ``t``'s current contents (cached while ``t`` is unchanged)."""
        if not isinstance(t, torch.Tensor):
            return ("s", _scalar_key(t))
        d = self.cached(t)
        return d if d is not None else self.put(t, self.value(t))

    def describe_value(self, t: torch.Tensor) -> tuple:
        """Like :meth:`describe`, but a symbolic or view descriptor is replaced by the value's."""
        d = self.cached(t)
        if d is not None and d[0] in VALUE_KINDS:
            return d
        return self.put(t, self.value(t))

    def view(self, out, base) -> None:
        if not isinstance(base, torch.Tensor):
            return
        bdesc = self.describe(base)
        for o in _tensors(out):
            try:
                offset = o.storage_offset() - base.storage_offset()
                self.put(o, ("v", bdesc, tuple(o.shape), tuple(o.stride()), offset))
            except Exception:  # sparse / nested: described by value when used
                pass

    def uninitialised(self, out) -> None:
        for o in _tensors(out):
            self.put(o, ("u", str(o.dtype), tuple(o.shape)))

    # -- resolving descriptors to comparable digests -----------------------------------------
    def resolver(self) -> Callable[[tuple], Any]:
        """A function mapping a descriptor to a comparable key: value descriptors stand for themselves,
        symbolic, view, device and exact descriptors become 16-byte blake2b digests (equal contents <->
        equal keys, up to the fingerprint's collision bound and blake2b's 2^-128)."""
        import hashlib

        dev = [None] * len(self.device_values)
        by_device: dict = {}
        for i, v in enumerate(self.device_values):
            by_device.setdefault(v.device, []).append(i)
        for idx in by_device.values():
            for i, v in zip(idx, torch.stack([self.device_values[i] for i in idx]).tolist()):
                dev[i] = v
        memo: dict[int, tuple] = {}
        copies = self.copies

        def digest(desc):
            kind = desc[0]
            if kind in ("b", "h", "s", "u"):
                return desc  # already plain, comparable values
            hit = memo.get(id(desc))
            if hit is not None and hit[0] is desc:
                return hit[1]
            h = hashlib.blake2b(digest_size=16)
            if kind == "f":
                h.update(repr((kind, desc[2], desc[4], [digest(child) for child in desc[3]])).encode())
            elif kind == "v":
                h.update(repr((kind, desc[2:], digest(desc[1]))).encode())
            elif kind == "d":
                h.update(repr(desc[:3] + (tuple(dev[i] for i in desc[3]),)).encode())
            elif kind == "x":
                h.update(repr(desc[:3]).encode())
                c = copies[desc[3]]
                if c.numel():
                    h.update(bits(c).contiguous().numpy().tobytes())
            else:
                h.update(repr(desc).encode())
            out = h.digest()
            memo[id(desc)] = (desc, out)
            return out

        return digest


@functools.lru_cache(maxsize=16)
def _coefficient_vector(device: torch.device, lane: int, blocks: int) -> torch.Tensor:
    """``blocks * 2^16`` int64 coefficients of one lane; block b is drawn from seed FP_SEED + lane * 2^40 + b,
    so a longer vector starts with the shorter one (the same tensor gets the same fingerprint)."""
    parts = [torch.randint(-2 ** 63, 2 ** 63 - 1, (_FP_BLOCK,), dtype=torch.int64,
                           generator=torch.Generator().manual_seed(FP_SEED + (lane << 40) + b)) for b in range(blocks)]
    return torch.cat(parts).to(device)


def fingerprints(tensors) -> list:
    """Comparable fingerprints of ``tensors`` (``None`` stays ``None``), with the collision bound of
    :class:`_Fingerprints`; one device synchronisation for all of them."""
    fp = _Fingerprints(exact=False)
    with torch.no_grad():
        descs = [None if t is None else fp.value(t) for t in tensors]
    digest = fp.resolver()
    return [None if d is None else digest(d) for d in descs]


def _scalar_key(x):
    if isinstance(x, float):
        return ("f", struct.pack("<d", x))
    if isinstance(x, (bool, int, str)) or x is None:
        return (type(x).__name__, x)
    if isinstance(x, (list, tuple)):
        return tuple(_scalar_key(v) for v in x)
    return (type(x).__name__, repr(x))


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

    def __init__(self, locator: _Locator, exact: bool = False) -> None:
        super().__init__()
        self.loc = locator
        self.busy = locator.busy
        self.infos: dict = {}
        self.fp = _Fingerprints(exact)
        self.events: list[tuple] = []   # raw tuples; :func:`trace` turns them into Events
        self.skipped: Counter = Counter()
        self.active = False
        locator.on_registry = self._registry_call
        locator.on_module = self._module_output
        locator.on_pynode = self._hook_pynode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if self.busy:
            return func(*args, **kwargs)
        info = self.infos.get(func) or op_info(func, self.infos)
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
        out = func(*args, **kwargs)
        if kind == "mutating":
            leaves = _leaves(_written_values(info, args, kwargs))
        else:
            leaves = _leaves(out, info.ignored_returns)
        sym = None
        if info.order_free and not fp.exact:
            depth = 1 + max((d[1] for d in in_desc if d[0] == "f"), default=0)
            if depth <= MAX_SYMBOLIC_DEPTH:
                flat = args if not any(isinstance(a, (list, tuple, dict)) for a in args) else _leaves(args)
                scalars = tuple(_scalar_key(v) for v in flat if not isinstance(v, torch.Tensor))
                if kwargs:
                    scalars += tuple((k, _scalar_key(v)) for k, v in sorted(kwargs.items())
                                     if not isinstance(v, torch.Tensor))
                sym = (depth, info.name, tuple(in_desc), scalars)
        out_desc = []
        written = kind == "mutating"
        for i, t in enumerate(leaves):
            if not isinstance(t, torch.Tensor):
                out_desc.append(("s", _scalar_key(t)))
            elif sym is not None:
                out_desc.append(fp.put(t, ("f", sym[0], sym[1], sym[2], sym[3] + (("out", i),)), written))
            else:
                out_desc.append(fp.put(t, fp.value(t), written))
        where = self.loc.where(ins_t)
        inside = getattr(self.loc.local, "unit", None) or where[2]
        self.events.append(("aten", info.name, where[0], where[1], inside, [_shape_meta(t) for t in ins_t],
                            [_shape_meta(t) for t in leaves], in_desc, out_desc))
        return out

    def _registry_call(self, fn, name: str, args, kwargs):
        with self.busy():
            path, ph, _ = self.loc.where()
            ins_t = _args_tensors(args, kwargs)
            in_desc = [self.fp.describe_value(t) for t in ins_t]
        self.loc.local.unit = name
        try:
            out = fn(*args, **kwargs)
        finally:
            self.loc.local.unit = None
        with self.busy():
            leaves = _tensors(out)
            self.events.append(("registry", name, path, ph, None, [_shape_meta(t) for t in ins_t],
                                [_shape_meta(t) for t in leaves], in_desc,
                                [self.fp.describe_value(t) for t in leaves]))
        return out

    def _module_output(self, path, module, args, output) -> None:
        if self.busy:
            return
        with self.busy():
            ins_t, outs_t = _tensors(args), _tensors(output)
            if not outs_t:
                return
            ph = "optimizer" if self.loc.opt_depth else (_PHASE.get() or "forward")
            # A module's inputs are its arguments and its own parameters and buffers.
            state = list(module.parameters()) + list(module.buffers())
            self.events.append(("module", type(module).__name__, path, ph, None, [_shape_meta(t) for t in ins_t],
                                [_shape_meta(t) for t in outs_t],
                                [self.fp.describe_value(t) for t in ins_t + state],
                                [self.fp.describe_value(t) for t in outs_t]))

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
                pending.append(([_shape_meta(g) for g in gs], [mode.fp.describe_value(g) for g in gs]))
            return None

        def post(grad_inputs, grad_outputs):
            if not mode.active or mode.busy or not pending:
                return None
            ins, in_desc = pending.pop()
            n = ref()
            with mode.busy():
                leaves = _tensors(grad_inputs)
                path = mode.loc.path_of_node(n) if n is not None else ""
                mode.events.append(("autograd.Function", name, path, "backward", None, ins,
                                    [_shape_meta(t) for t in leaves], in_desc,
                                    [mode.fp.describe_value(t) for t in leaves]))
            return None

        node.register_prehook(pre)
        node.register_hook(post)


@dataclass
class Trace:
    """One traced run: its events, their inputs' and outputs' content digests, in execution order."""

    events: list[Event]
    skipped: dict[str, int]
    exact: bool
    seconds: float
    raw_out: list | None = field(default=None, repr=False)   # exact mode: output tensors per event
    value: Any = field(default=None, repr=False)             # what fn returned


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
          **kwargs) -> Trace:
    """Run ``fn(*args, **kwargs)`` once, recording the contents of every op's inputs and outputs (as
    fingerprints; ``exact``: copies), every registry call, custom-Function backward and module output."""
    loc = _Locator(roots)
    mode = TraceMode(loc, exact)
    t0 = time.perf_counter()
    with _mode(mode, loc):
        value = fn(*args, **kwargs)
    digest = mode.fp.resolver()
    events = []
    raw = [] if exact else None
    for i, (kind, op, path, ph, inside, ins, outs, in_desc, out_desc) in enumerate(mode.events):
        events.append(Event(i, kind, op, path, ph, inside, [_meta_str(m) for m in ins], [_meta_str(m) for m in outs],
                            tuple(digest(d) for d in in_desc), tuple(digest(d) for d in out_desc)))
        if raw is not None:
            raw.append([_materialise(d, mode.fp.copies) for d in out_desc])
    return Trace(events, dict(mode.skipped), exact, time.perf_counter() - t0, raw, value)


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


def _compare_pair(a: Trace, b: Trace, ia: int, ib: int) -> PairComparison:
    n = min(len(a.events), len(b.events))
    control = None
    aligned = n
    root = first = first_mod = None
    differing = 0
    diff_idx: list[int] = []
    for i in range(n):
        ea, eb = a.events[i], b.events[i]
        if ea.key() != eb.key():
            control = {"index": i, "a": ea.ref(), "b": eb.ref()}
            aligned = i
            break
        if ea.out_key == eb.out_key:
            continue
        differing += 1
        diff_idx.append(i)
        if first is None:
            first = i
        if root is None and ea.in_key == eb.in_key:
            root = i
        if first_mod is None and ea.kind == "module":
            first_mod = i
    if control is None and len(a.events) != len(b.events):
        control = {"index": n, "a": a.events[n].ref() if n < len(a.events) else None,
                   "b": b.events[n].ref() if n < len(b.events) else None}
    first_note = ""
    if first is not None and first != root:
        ev = a.events[first]
        first_note = (f"{ev.op} at {ev.module or '<root>'} ({ev.phase}) is the first to differ, but its inputs differ "
                      f"too although every earlier value agreed: identical partial results were combined in another "
                      f"order" + (f" inside {ev.inside}" if ev.inside else ""))
    mod_note = ""
    if first is not None:
        ev = a.events[root if root is not None else first]
        if first_mod is None:
            mod_note = (f"no module's forward output differs; the difference starts in the {ev.phase} phase at "
                        f"{ev.module or '<root>'}")
        elif first_mod < (root if root is not None else first):
            pass
        elif ev.phase != "forward":
            later = a.events[first_mod]
            mod_note = (f"the difference starts in the {ev.phase} phase at {ev.module or '<root>'} (its gradient "
                        f"differs first); the first module whose forward output then differs is "
                        f"{later.module or '<root>'}, event {later.index}")
    root_diff = None
    if root is not None and a.exact:
        ea, eb = a.events[root], b.events[root]
        for j, (da, db) in enumerate(zip(ea.out_key, eb.out_key)):
            if da != db:
                ta = _exact_tensor(a, root, j)
                tb = _exact_tensor(b, root, j)
                if ta is not None and tb is not None and ta.shape == tb.shape and ta.dtype == tb.dtype:
                    root_diff = {"output_index": j, **mismatch(ta, tb).to_dict()}
                break
    after = [i for i in range(root + 1 if root is not None else aligned, aligned) if a.events[i].kind == "aten"]
    diff_after = sum(1 for i in diff_idx if root is not None and i > root and a.events[i].kind == "aten")
    return PairComparison(
        run_a=ia, run_b=ib, events_a=len(a.events), events_b=len(b.events), aligned=aligned, control_flow=control,
        identical=differing == 0 and control is None,
        root_cause=a.events[root].ref() if root is not None else None, root_cause_diff=root_diff,
        first_difference=a.events[first].ref() if first is not None else None, first_difference_note=first_note,
        first_module=a.events[first_mod].ref() if first_mod is not None else None, first_module_note=mod_note,
        differing_events=differing, differing_ops_after_root=diff_after if root is not None else 0,
        ops_after_root=len(after) if root is not None else 0,
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
    value: Any = field(default=None, repr=False, compare=False)

    @property
    def identical(self) -> bool:
        return all(p.identical for p in self.pairs)

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
        d = {k: v for k, v in asdict(self).items() if k != "value"}
        d["method"] = "compare"
        d["identical"] = self.identical
        d["root_cause"] = self.root_cause
        return d

    def to_json(self, **kw) -> str:
        from bench.results import to_json

        return json.dumps(to_json(self.to_dict()), **kw)

    def summary(self) -> str:
        if self.identical:
            return (f"trace-compare: {self.runs} runs identical in every one of {self.events[0]} traced events "
                    f"({'exact' if self.exact else 'fingerprints'})")
        p = self.first_differing
        if p.root_cause is not None:
            r = p.root_cause
            return (f"trace-compare: root cause {r['op']} ({r['kind']}) at {r['module'] or '<root>'} ({r['phase']}), "
                    f"event {r['index']}; {p.differing_ops_after_root} of the {p.ops_after_root} later ops differ")
        if p.control_flow is not None:
            return f"trace-compare: the runs ran different ops from event {p.control_flow['index']} on"
        return "trace-compare: outputs differ but no event with identical inputs and different outputs was found"

    def __rich__(self):
        from rich.console import Group
        from rich.markup import escape
        from rich.table import Table

        style = "green" if self.identical else "red"
        parts = [f"[{style}]{escape(self.summary())}[/]"]
        if self.identical:
            return Group(*parts)
        for p in self.pairs:
            if p.identical:
                continue
            t = Table(title=f"runs {p.run_a} vs {p.run_b} ({'exact' if self.exact else 'fingerprints'})",
                      title_justify="left")
            for col in ("finding", "event", "op", "module", "phase"):
                t.add_column(col, overflow="fold")
            rows = [("root cause", p.root_cause), ("first diff", p.first_difference), ("first module", p.first_module)]
            if p.control_flow is not None:
                rows.append(("control flow", p.control_flow.get("a")))
            shapes = []
            for label, ev in rows:
                if ev is None:
                    continue
                op = f"{escape(ev['op'])} [dim]({ev['kind']})[/]"
                t.add_row(label, str(ev["index"]), f"[bold]{op}[/]" if label == "root cause" else op,
                          escape(ev["module"] or "<root>"), ev["phase"])
                shapes.append(f"  {label}: " + ", ".join(ev["inputs"][:4]) + (" ..." if len(ev["inputs"]) > 4 else "")
                              + " -> " + ", ".join(ev["outputs"][:3]))
            parts.append(t)
            parts += [escape(x) for x in shapes]
            parts.append(escape(f"  spread: {p.differing_events} of {p.aligned} aligned events differ; after the root "
                                f"cause {p.differing_ops_after_root} of {p.ops_after_root} aten ops differ"))
            parts += [escape("  " + n) for n in (p.first_difference_note, p.first_module_note) if n]
            if p.root_cause_diff is not None:
                m = p.root_cause_diff
                parts.append(escape(f"  root cause output {m['output_index']}: {m['n_diff']}/{m['n_total']} elements "
                                    f"differ, max abs {m['max_abs']:.3e}, max ulp {m['max_ulp']}"))
        return Group(*parts)

    def __str__(self) -> str:
        return _render(self)


COLLISION_BOUND = ("fingerprints of differing tensors collide with probability <= 2^(v-64), v the lowest differing "
                   "bit of a word: <= 2^-33 (float32), 2^-49 (bf16/fp16), 2^-57 (1-byte), 2^-64 for last-bit "
                   "differences; per compared tensor")


def compare_runs(fn: Callable, *args, runs: int = 2, exact: bool = False, setup: Callable[[], tuple] | None = None,
                 seed: int | None = 0, roots: Mapping[str, nn.Module] | None = None, **kwargs) -> CompareReport:
    """Run ``fn`` ``runs`` times under the tracer and compare every run with the first.

    ``fn`` must start from the same state each time: pass ``setup``, a function called (untraced)
    before each run whose return value (a tuple) replaces ``args`` - e.g. one that builds a fresh
    model and optimizer. With ``seed`` set, the global generators are seeded with it before each run
    (inside ``fork_rng``, so the caller's state is restored). ``exact=True`` compares full copies
    instead of fingerprints (memory: one CPU copy of every tensor the runs produce).
    """
    if runs < 2:
        raise ValueError(f"compare_runs needs at least 2 runs, got {runs}")
    traces: list[Trace] = []
    t0 = time.perf_counter()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    for _ in range(runs):
        run_args = tuple(setup()) if setup is not None else args
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            traces.append(trace(fn, *run_args, exact=exact, roots=roots, **kwargs))
    pairs = [_compare_pair(traces[0], traces[j], 0, j) for j in range(1, runs)]
    skipped: Counter = Counter()
    for tr in traces:
        skipped.update(tr.skipped)
    return CompareReport(runs, exact, pairs, [len(t.events) for t in traces], dict(skipped),
                         time.perf_counter() - t0, "exact comparison" if exact else COLLISION_BOUND,
                         traces[0].value)


# ------------------------------------------------------------------------------------------------
# CLI: detbench pinpoint
# ------------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    from bench.sft import add_common_model_args

    p = sub.add_parser(
        "pinpoint", help="name the op that makes runs differ (replay and trace-compare)",
        description="Pinpoint run-to-run nondeterminism: replay every op on the spot and compare (one run), and "
                    "trace two or more runs and compare them op by op (root cause, first module, spread). "
                    "The subject is one or more SFT steps (default) or a harness subject of detbench run.")
    add_common_model_args(p)
    p.add_argument("--subject", default="sft",
                   help="sft (SFT steps of --model, default) or a harness subject: rmsnorm, attention, "
                        "decoder-layer, ... (see detbench run --help)")
    p.add_argument("--method", choices=("both", "replay", "compare"), default="both",
                   help="replay, compare (trace and compare runs) or both (default)")
    p.add_argument("--runs", type=int, default=2, help="runs to trace and compare (default 2)")
    p.add_argument("--steps", "-k", type=int, default=1, help="SFT steps per run (default 1)")
    p.add_argument("--exact", action="store_true", help="compare full copies instead of fingerprints (memory!)")
    p.add_argument("--all-ops", action="store_true", help="replay order-free (pointwise, copy) ops too")
    p.add_argument("--attention", default="eager", help="attention backend (sft subject; default eager)")
    p.add_argument("--backend", default="eager", help="backend of a harness subject's primary op (default eager)")
    p.add_argument("--mode", default="default", help="determinism mode: default, torch-det, hf-full")
    p.add_argument("--dtype", default="float32", help="dtype (default float32)")
    p.add_argument("--lr", default="1e-5", help="learning rate of the SFT steps (default 1e-5)")
    p.add_argument("--profile", help="shape profile of a harness subject: quick, cpu, cuda (default: quick on "
                                     "the CPU, cuda on a GPU)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument("--out", help="also write the reports as a JSON file into this directory")
    p.set_defaults(func=cmd_pinpoint)


def _one(value: str, what: str) -> str:
    from bench.cli import UsageError

    if "," in str(value):
        raise UsageError(f"{what} takes one value in detbench pinpoint, got {value!r}; run one configuration at a time")
    return value


def _sft_subject(args, device):
    """(setup, fn, roots, description) for --subject sft."""
    from bench.cli import UsageError
    from bench.data import batch_for_step
    from bench.sft import SFTError, build, make_optimizer, plan_from_args, sft_step

    plan = plan_from_args(args, attention=_one(args.attention, "--attention"), modes=_one(args.mode, "--mode"),
                          dtypes=_one(args.dtype, "--dtype"), lrs=_one(args.lr, "--lr"), steps=args.steps, repeats=1,
                          out=None)
    batches = [b.to(device) for b in plan.batches]
    lr, clip = plan.lrs[0], plan.settings.clip

    def setup():
        try:
            model = build(plan.spec, attention=plan.attention[0], dtype=plan.dtypes[0], device=device,
                          seed=plan.settings.seed, plants=plan.plants)
        except SFTError as e:
            raise UsageError(str(e)) from None
        return model, make_optimizer(model, lr=lr)

    def fn(model, optimizer):
        return [sft_step(model, optimizer, batch_for_step(batches, k), clip)[0] for k in range(plan.steps)]

    desc = (f"{plan.steps} SFT step(s) of {plan.spec.text} ({plan.attention[0]}, {plan.settings.dtypes[0]}, "
            f"lr {lr:g}" + (f", planted {', '.join(plan.settings.plants)}" if plan.plants else "") + ")")
    return setup, fn, None, desc, plan.modes[0]


def _harness_subject(args, device):
    """(setup, fn, roots, description) for a subject of bench.subjects."""
    from bench.cli import UsageError
    from bench.sft import SFTError, apply_plants, parse_dtype, parse_model, parse_plant
    from bench.subjects import PROFILES, SUBJECTS, build_case
    from bench.modes import MODES
    from qwen_layers.registry import REGISTRY, BackendError

    if args.subject not in SUBJECTS:
        raise UsageError(f"--subject {args.subject!r}: unknown; choose sft or one of: {', '.join(SUBJECTS)}")
    profile = args.profile or ("cuda" if device.type == "cuda" else "quick")
    if profile not in PROFILES:
        raise UsageError(f"--profile {profile!r}: choose from {', '.join(PROFILES)}")
    mode = _one(args.mode, "--mode")
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: unknown mode; choose from: {', '.join(MODES)}")
    try:
        spec = parse_model(args.model)
        dtype = parse_dtype(_one(args.dtype, "--dtype"))
        plants = [parse_plant(p) for p in args.plant]
    except SFTError as e:
        raise UsageError(str(e)) from None
    if spec.transformers:
        raise UsageError("harness subjects are built from detbench's model; drop the 'hf:' prefix of --model")
    subject = SUBJECTS[args.subject]
    backend = _one(args.backend, "--backend")
    try:
        REGISTRY.resolve(subject.primary_op, backend, device)
    except BackendError as e:
        raise UsageError(f"--backend {backend!r}: {e}") from None
    case = build_case(args.subject, spec.config, profile, seed=args.seed)
    inst = case.instantiate(dtype, device, {subject.primary_op: backend})
    try:
        apply_plants(inst.module, plants, device)
    except SFTError as e:
        raise UsageError(str(e)) from None
    inst.run()  # draws and caches the fixed upstream gradient, so every traced run does the same work
    desc = (f"subject {args.subject} ({profile} shapes, {subject.primary_op}={backend}, {dtype_str(dtype)})"
            + (f", planted {', '.join(str(p) for p in plants)}" if plants else ""))
    return (lambda: ()), (lambda: inst.run()), None, desc, mode


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cmd_pinpoint(args) -> int:
    from rich.console import Console

    from bench.cli import UsageError, parse_device
    from bench.modes import apply_mode

    device = parse_device(args.device)
    if args.runs < 2:
        raise UsageError(f"--runs must be at least 2 (trace-compare compares runs), got {args.runs}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    out_dir = None
    if args.out:
        from bench.results import OutDirError, check_out_dir

        try:
            out_dir = check_out_dir(args.out)
        except OutDirError as e:
            raise UsageError(str(e)) from None
    from bench.sft import planted_registered

    with planted_registered(bool(args.plant)):
        return _pinpoint(args, device, out_dir)


def _pinpoint(args, device, out_dir) -> int:
    from rich.console import Console

    from bench.modes import apply_mode

    if args.subject == "sft":
        setup, fn, roots, desc, mode = _sft_subject(args, device)
    else:
        setup, fn, roots, desc, mode = _harness_subject(args, device)
    console = Console()
    reports: dict[str, Any] = {}
    with apply_mode(mode):
        if args.method in ("both", "replay"):
            if not args.json:
                console.print(f"[bold]replay[/]: {desc}, mode {mode}")
            reports["replay"] = replay(fn, *setup(), roots=roots, all_ops=args.all_ops)
            if not args.json:
                console.print(reports["replay"])
        if args.method in ("both", "compare"):
            if not args.json:
                console.print(f"[bold]trace-compare[/]: {desc}, mode {mode}, {args.runs} runs")
            reports["compare"] = compare_runs(fn, runs=args.runs, exact=args.exact, setup=setup, seed=args.seed,
                                              roots=roots)
            if not args.json:
                console.print(reports["compare"])
    payload = {"schema": "detbench.pinpoint/1", "subject": desc, "mode": mode, "device": str(device),
               "command": list(sys.argv), **{k: r.to_dict() for k, r in reports.items()}}
    if out_dir is not None:
        from bench.results import capture_environment, device_label, new_run_id, result_path, write_json_atomic

        env = capture_environment(device, seeds={"model": args.seed, "data": args.data_seed})
        payload["environment"] = env
        path = write_json_atomic(result_path(out_dir, "pinpoint", device_label(env), new_run_id()), payload)
        if not args.json:
            console.print(f"report: {path}")
    if args.json:
        from bench.results import to_json

        print(json.dumps(to_json(payload), indent=1))
    return 0
