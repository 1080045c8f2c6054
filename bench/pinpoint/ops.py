"""What kind of op is this, and did two results agree? The layer every other pinpoint module builds on.

* op classification: :func:`op_info` reads an aten op's schema and tags once and says how replay and
  trace treat it (functional, mutating, view, uninitialised, skipped; random; order-free);
* tree helpers over an op's arguments and results (``_leaves``, ``_tensors``, ``_clone`` ...);
* generator state (:class:`_Rng`), saved and restored around a replay;
* bitwise comparison of results (:func:`same_bits`, :func:`first_difference`);
* non-finite values: where NaN and infinities first appeared in a run (:class:`NonFinite`), because
  bitwise comparison proves nothing about them: every NaN and every infinity compares equal to
  itself however it was computed, so a run that went NaN "agrees" whatever happened on the way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from bench.compare import bitwise_equal

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
# Ops that write arguments their schema does not mark as written (``Tensor?`` without ``(a!)``): in training
# mode batch norm updates running_mean and running_var in place. Positional indices of those arguments.
UNMARKED_WRITES = {"native_batch_norm": (3, 4), "cudnn_batch_norm": (3, 4), "miopen_batch_norm": (3, 4),
                   "_batch_norm_impl_index": (3, 4), "batch_norm_update_stats": (1, 2)}
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


@functools.lru_cache(maxsize=4096)  # keyed by op overloads: holds no tensors
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
    written += [k for k in UNMARKED_WRITES.get(base, ()) if k not in written]
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


def written_and_outputs(info: OpInfo, args, kwargs, out) -> list:
    """The leaves a mutating op made: the arguments it wrote, then the outputs that are not one of them
    (batch norm's output next to the running statistics it updated; an in-place op returns what it wrote)."""
    written = _leaves(_written_values(info, args, kwargs))
    if out is None:
        return written
    ids = {id(t) for t in written}
    return written + [t for t in _leaves(out, info.ignored_returns) if id(t) not in ids]


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
    """The tensors among an op's arguments, in order (one level of lists for ``cat``'s, any depth else)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple, dict)):
            out += _tensors(a)
    if kwargs:
        out += _tensors(list(kwargs.values()))
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


@functools.lru_cache(maxsize=None)
def _memcmp():
    """libc's memcmp through ctypes (None where it cannot be found). Looked up on first use, not at
    import: ``find_library`` may run ``ldconfig``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        fn = libc.memcmp
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return fn


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
# non-finite values
# ------------------------------------------------------------------------------------------------

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
CHECKED_DTYPES = FLOAT_DTYPES | {torch.complex64, torch.complex128}   # checked for NaN and infinities


def _float_tensors(xs) -> list[torch.Tensor]:
    """The floating-point tensors with data among ``xs`` (complex ones as their real and imaginary parts)."""
    out = []
    for t in xs:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
            continue
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.dtype in FLOAT_DTYPES and t.layout == torch.strided:
            out.append(t)
    return out


def extremes(t: torch.Tensor) -> torch.Tensor:
    """(min, max) of ``t`` as a float64 pair on its device, in one pass: NaN when ``t`` holds a NaN,
    +-inf when it holds an infinity. Left on the device (read it with :func:`flags`, when convenient)."""
    return torch.stack(torch.aminmax(t.detach())).to(torch.float64)


_NUMPY_FLOATS = frozenset({torch.float32, torch.float64})


def memory_order(t: torch.Tensor) -> tuple[torch.Tensor, tuple | None] | None:
    """(``t`` detached, or a permutation of its dimensions that is contiguous; the permutation or None):
    the elements in the order they lie in memory, without a copy, when ``t`` covers its memory densely
    without overlap (contiguous, or permuted like a transposed weight or gradient); None otherwise."""
    if t.requires_grad:
        t = t.detach()
    if t.is_contiguous():
        return t, None
    strides = t.stride()
    perm = tuple(sorted(range(t.dim()), key=lambda d: -strides[d]))
    p = t.permute(perm)
    return (p, perm) if p.is_contiguous() else None


def cpu_flags(t: torch.Tensor) -> tuple[bool, bool] | None:
    """(holds NaN, holds an infinity) of a CPU tensor, right away; None for a tensor on another device
    (use :func:`extremes` there, and read it later). The fast path is one BLAS dot product of the
    values with themselves, read in memory order (no copy for a transposed or permuted tensor): NaN
    or inf when they hold one, finite otherwise unless a square overflows; only a non-finite result is
    looked at element by element."""
    if not t.is_cpu:
        return None
    if t.dtype in _NUMPY_FLOATS and not t.requires_grad and t.is_contiguous():  # an op's output: most checks
        return array_flags(t.numpy().reshape(-1))
    dense = memory_order(t) if t.dtype in _NUMPY_FLOATS else None
    if dense is None:  # bfloat16 (no numpy type), float16 (no BLAS), tensors with gaps or overlaps
        return flags(extremes(t).tolist())
    return array_flags(dense[0].numpy().reshape(-1))


def array_flags(arr) -> tuple[bool, bool]:
    """(holds NaN, holds an infinity) of a flat float32/float64 numpy array (see :func:`cpu_flags`)."""
    square = np.vdot(arr, arr)  # BLAS, like ndarray.dot, but an overflowing square does not warn (checked below)
    if math.isfinite(square):
        return False, False
    nan = bool(np.isnan(arr).any())
    return nan, not nan and bool(np.isinf(arr).any())


def flags(pair) -> tuple[bool, bool]:
    """(holds NaN, holds an infinity) from :func:`extremes`' pair (read as floats). With a NaN present
    the infinity flag is unknown and reported False."""
    lo, hi = pair
    if math.isnan(lo) or math.isnan(hi):
        return True, False
    return False, math.isinf(lo) or math.isinf(hi)


def scalar_flags(values) -> tuple[bool, bool]:
    """(a NaN, an infinity) among the plain numbers in ``values`` (an op's scalar arguments)."""
    nan = inf = False
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            nan, inf = nan or math.isnan(v), inf or math.isinf(v)
    return nan, inf


def value_kind(value) -> str | None:
    """"NaN" / "inf" when a tensor in ``value`` (what a traced function returned) holds one, else None."""
    with torch.no_grad():
        found = [cpu_flags(t) or flags(extremes(t).tolist()) for t in _float_tensors(_tensors(value))]
    return "NaN" if any(n for n, _ in found) else "inf" if any(i for _, i in found) else None


def storage_names(params) -> dict[int, str]:
    """Storage address -> parameter name, for naming a tensor (or a view of one) by where its data lives;
    ``params`` yields (name, tensor) (the locator's ``params.values()``)."""
    out: dict[int, str] = {}
    for name, p in params:
        try:
            out.setdefault(p.untyped_storage().data_ptr(), name)
        except Exception:  # no storage (meta ...)
            pass
    return out


def tensor_label(t: torch.Tensor, names: dict[int, str]) -> str:
    """``parameter NAME (dtype[shape])`` when ``t``'s data lives in a named parameter, else ``dtype[shape]``."""
    meta = f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
    try:
        name = names.get(t.untyped_storage().data_ptr())
    except Exception:
        name = None
    return f"parameter {name} ({meta})" if name else meta


@dataclass
class NonFinite:
    """Where NaN and infinities first appeared in one run, in execution order.

    ``nan`` and ``inf`` describe the first op (or traced event) whose output held a NaN, resp. an
    infinity: ``index`` (the op's or event's number), ``kind``, ``op``, ``module``, ``phase``, and
    ``source``: ``produced`` (no input held one: the op made it) or ``input`` (an input already held
    one although no earlier op's output did: it came from outside the run's ops - a parameter, a
    buffer, fn's arguments, or a scalar argument such as a mask's ``-inf``; ``input`` names it).
    ``value`` is "NaN"/"inf" when fn's returned value holds one. (Replay adds ``replayed_before`` and
    ``units_before``: the ops and units it had replayed when the NaN appeared. A coarse trace, which sees
    no op, says ``unknown``.)

    The run is *comparable* when no op output held a NaN and fn's value is finite. Infinities alone
    do not make it incomparable: masks hold -inf by design and the softmax after them turns them
    into exact zeros; an overflow that matters ends in a NaN or in the result.
    """

    nan: dict | None = None
    inf: dict | None = None
    value: str | None = None

    @property
    def comparable(self) -> bool:
        return self.nan is None and self.value is None

    def sentence(self, unit: str = "op") -> str:
        """Where the values went non-finite, in words (``unit``: what ``index`` counts, op or event)."""
        def at(ev: dict) -> str:
            return (f"{ev['op']}" + (f" ({ev['kind']})" if ev.get("kind", "aten") != "aten" else "")
                    + f" at {ev['module'] or '<root>'} ({ev['phase']}), {unit} {ev['index']}")

        def origin(ev: dict, what: str) -> str:
            if ev["source"] == "input":
                return f"from an input holding {what} that no {unit} of the run made: {ev['input']}"
            if ev["source"] == "unknown":
                return "made by an op a coarse trace does not see"
            return "from finite inputs"

        parts = []
        if self.nan is not None:
            n = self.nan
            if n["source"] == "unknown":
                parts.append(f"NaN first in the output of {at(n)}, {origin(n, 'NaN')}")
            elif n["source"] == "input":
                parts.append(f"NaN first in the output of {at(n)}, {origin(n, 'NaN')}")
            elif self.inf is not None and self.inf["index"] <= n["index"]:
                parts.append(f"NaN first produced by {at(n)}, from inputs without NaN; infinities had appeared "
                             f"before it, first in the output of {at(self.inf)}, {origin(self.inf, 'an infinity')}")
            else:
                parts.append(f"NaN first produced by {at(n)}, from finite inputs")
        elif self.value is not None:
            parts.append(f"the result holds {self.value}")
            if self.inf is not None:
                parts.append(f"infinities first appeared in the output of {at(self.inf)}, "
                             f"{origin(self.inf, 'an infinity')}")
        return "; ".join(parts)


def read_back(values: list[torch.Tensor]) -> list:
    """Python values of same-shaped device tensors, in order, with one transfer (one synchronisation)
    per device instead of one per tensor."""
    out: list = [None] * len(values)
    by_device: dict = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([values[i] for i in idx]).tolist()):
            out[i] = v
    return out
