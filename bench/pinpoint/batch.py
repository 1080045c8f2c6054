"""Batch-variance pinpoint: the first op whose result for one prompt changed because of the batch around it.

Two runs of the same function differ only in the batch around one prompt: the *reference* is the prompt
alone (one row, no padding), the other run holds it as row ``row`` of a batch of ``B`` rows, left-padded by
``pad`` positions (its batch is ``pad`` longer than the prompt). Both run under a dispatch mode that records
every aten op that computes and every registry call (the aten ops it ran nested in it), in execution order;
views and pure data movement are left out (whether a reshape copies or views depends on the batch size, and
they cannot change a value). The two sequences are paired by their longest common subsequence of (op,
module, step): ops that ran in one run only - transformers' padding checks, a mask built only for a padded
batch - stay unpaired and are counted. In each paired op's inputs and outputs only the elements that belong
to the prompt are compared (fingerprinted, :mod:`bench.pinpoint.fingerprint`). Inside a paired registry call
the ops are paired one by one; where they part (a backend choosing its computation from the shape) the call
is compared whole.

Which elements belong to the prompt is decided per tensor and per dimension, from its shape in both runs
(:func:`prompt_index`): a dimension of the same size in both is kept whole; one ``B`` times larger in the
batch is the batch dimension, or the batch folded with heads or positions (``(B*S, hidden)`` before a
matmul, ``(B*heads, S, S)`` in attention): the prompt's slice is ``row``'s block; with padding, one ``pad``
larger is a position dimension (the prompt's positions are the last ones) and one ``B * (size + pad)`` is
batch and positions folded together. A dimension that fits none of these, or more than one, leaves the
tensor unmapped: an op with an unmapped input can be a consequence but never the root cause, and the
report counts them. The batch must be the outer factor of a folded dimension (as ``reshape`` of a
``(B, S, ...)`` tensor makes it); where a layout folds it inside, the elements selected are not the
prompt's, that op's inputs differ from the reference's, and it can only show as a first difference without
a root cause - never be named as one.

The *root cause* is the first op whose prompt inputs were bitwise equal and whose prompt outputs differ:
its reduction order for the prompt's rows depended on the other rows (a matmul blocked by the number of
rows, a split-K chosen from the shape, a vectorised loop whose tail moved). Where it ran: module path and
step (the model's forward calls in order: the prefill and each decoding step, :func:`step_label`). The
root's prompt outputs are then compared element by element (both runs once more, keeping only that op's
outputs: the runs must be deterministic run to run - the rerun's fingerprints are checked against the
first runs'). Prompt outputs holding NaN or infinities make the comparison *not comparable* from there on.
"""

from __future__ import annotations

import difflib
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.compare import mismatch
from bench.errors import InputError
from bench.pinpoint.fingerprint import COLLISION_BOUND, Coefficients, Fingerprints
from bench.pinpoint.locate import _Locator, running
from bench.pinpoint.ops import DATA_MOVEMENT, _args_tensors, _tensors, op_info


class BatchPinpointError(InputError):
    """Inputs the batch-variance pinpoint cannot align (exit 2); the message says how to fix them."""


@dataclass(frozen=True)
class Layout:
    """Where the prompt sits in the batch run."""

    batch_size: int
    row: int
    pad: int            # left padding of the prompt's row: the batch's length minus the prompt's


def prompt_index(ref_shape, shape, layout: Layout) -> tuple[slice, ...] | None:
    """The index selecting the prompt's elements from a batch-run tensor of ``shape`` whose reference-run
    counterpart has ``ref_shape``; None when some dimension cannot be mapped (see the module docstring)."""
    if len(ref_shape) != len(shape):
        return None
    b, r, pad = layout.batch_size, layout.row, layout.pad
    index = []
    for a, n in zip(ref_shape, shape):
        if a == n:
            index.append(slice(None))
            continue
        fits = []
        if n == b * a:                                   # batch, or batch folded with heads / positions
            fits.append(slice(r * a, r * a + a))
        if pad and n == a + pad:                         # positions, the prompt's at the end
            fits.append(slice(pad, n))
        if pad and n == b * (a + pad):                   # batch and positions folded
            w = a + pad
            fits.append(slice(r * w + pad, r * w + w))
        if len(fits) != 1:
            return None
        index.append(fits[0])
    return tuple(index)


def step_label(step: int, use_cache: bool) -> str:
    """``prefill``, ``decode step t`` (with a KV cache) or ``step t`` (every step recomputes all positions);
    step -1 is before the model's first forward call."""
    if step < 0:
        return "before the model"
    if not use_cache:
        return f"step {step}"
    return "prefill" if step == 0 else f"decode step {step}"


@dataclass
class _Op:
    """An aten op or a registry call (``kind``) and the prompt's part of its tensor inputs and outputs."""

    kind: str             # aten | registry
    op: str               # aten.mm.default | linear/eager
    module: str
    step: int
    inside: str | None    # the registry call an aten op ran in ("linear/eager")
    in_shapes: list[list[int]]
    out_shapes: list[list[int]] = field(default_factory=list)
    ins: list = field(default_factory=list)     # descriptors of the prompt's part of each input (None: unmapped)
    outs: list = field(default_factory=list)
    nonfinite: bool = False                      # a prompt output held NaN or an infinity
    inner: list["_Op"] = field(default_factory=list)   # a registry call's aten ops
    inner_stopped: bool = False                  # the batch run's call ran other ops than the reference's
    index: int = 0                               # its place among the run's top-level ops and registry calls
    inner_index: int | None = None               # its place inside registry call ``index``
    ref_op: "_Op | None" = field(default=None, repr=False)   # the reference's op it is compared with


class _RowMode(TorchDispatchMode):
    """Records every aten op that computes (views and data movement are left out: whether a reshape copies
    differs with the batch size) and every registry call, the aten ops it ran nested in it: the prompt's
    part of their tensor inputs and outputs - the whole tensor in the reference run, :func:`prompt_index`
    of it in the batch run, given the shapes of the reference op ``mapping`` pairs it with.

    ``describe=False`` records only what ran (for :func:`_align`). Inside a registry call the batch run follows
    the reference call's ops one by one; where they part, only that call's inner recording stops (a backend
    choosing its computation from the shape) and the call is compared whole."""

    def __init__(self, locator: _Locator, root: nn.Module, coefficients: Coefficients, ref: list[_Op] | None,
                 mapping: dict[int, int] | None, layout: Layout | None, keep: tuple | None,
                 describe: bool = True) -> None:
        super().__init__()
        self.loc, self.root, self.ref, self.mapping, self.layout, self.keep = locator, root, ref, mapping, layout, keep
        self.describe = describe
        self.fp = Fingerprints(False, coefficients)
        self.infos: dict = {}
        self.ops: list[_Op] = []       # the recorded top-level ops (paired with the reference's, in the batch run)
        self.count = 0                 # top-level ops and registry calls seen
        self.step = -1
        self.kept: list[torch.Tensor] | None = None
        self.active = False
        self.params = {p.data_ptr() for p in root.parameters()} | {b.data_ptr() for b in root.buffers()}
        self.param_descs: dict = {}
        self.call: _Op | None = None              # the registry call running
        self.call_ref: _Op | None = None          # its counterpart in the reference
        locator.on_module_pre = self._module_pre
        locator.on_registry = self._registry_call

    def _module_pre(self, module, args) -> None:
        if module is self.root:
            self.step += 1

    def _select(self, t: torch.Tensor, ref_shape) -> torch.Tensor | None:
        if self.layout is None:
            return t
        index = prompt_index(ref_shape, t.shape, self.layout)
        return None if index is None else t[index]

    def _describe(self, t: torch.Tensor | None):
        if t is None:
            return None
        t = t.detach()
        # Parameters and buffers (and their views: a transposed weight) are read by every step: described once
        # per version. Keyed by address and layout while the model holds them, so the memory is not reused.
        key = None
        if t.data_ptr() in self.params:
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t._version)
            hit = self.param_descs.get(key)
            if hit is not None:
                return hit
        desc = self.fp.value(t.contiguous())
        if key is not None:
            self.param_descs[key] = desc
        return desc

    def _start(self, kind: str, name: str, ins: list) -> _Op | None:
        """The record of the op starting now, or None when it is not recorded; its reference counterpart is in
        ``ref_op``."""
        call = self.call
        if call is not None:               # inside a registry call: its own sequence, index by index
            if call.inner_stopped:
                return None
            ref = None
            if self.call_ref is not None:
                i = len(call.inner)
                ref = self.call_ref.inner[i] if i < len(self.call_ref.inner) else None
                if ref is None or ref.op != name or len(ref.in_shapes) != len(ins):
                    call.inner_stopped = True
                    return None
            op = _Op(kind, name, call.module, self.step, call.op, [], index=call.index, inner_index=len(call.inner))
        else:
            k, self.count = self.count, self.count + 1
            ref = None
            if self.ref is not None:
                j = self.mapping.get(k)
                ref = None if j is None else self.ref[j]
                if ref is None or ref.kind != kind or ref.op != name or len(ref.in_shapes) != len(ins):
                    return None
            op = _Op(kind, name, self.loc.where()[0], self.step, None, [], index=k)
        op.ref_op = ref
        with self.loc.busy():  # our own reads: not recorded
            op.in_shapes = [list(t.shape) for t in ins]
            if self.describe:
                op.ins = [self._describe(self._select(t, ref.in_shapes[j] if ref else None)) for j, t in enumerate(ins)]
        return op

    def _finish(self, op: _Op, outs: list) -> None:
        ref = op.ref_op
        with self.loc.busy():
            if ref is not None and len(ref.out_shapes) != len(outs):
                if op.inner_index is not None:
                    self.call.inner_stopped = True
                return
            op.out_shapes = [list(t.shape) for t in outs]
            if self.describe:
                sel = [self._select(t, ref.out_shapes[j] if ref else None) for j, t in enumerate(outs)]
                op.outs = [self._describe(x) for x in sel]
                op.nonfinite = any(x is not None and x.is_floating_point() and x.numel()
                                   and not bool(torch.isfinite(x).all()) for x in sel)
                if (op.index, op.inner_index) == self.keep:
                    self.kept = [None if x is None else x.detach().to("cpu", copy=True) for x in sel]
        if op.inner_index is not None:
            self.call.inner.append(op)
        else:
            self.ops.append(op)

    def _registry_call(self, fn, name, args, kwargs):
        if self.call is not None or self.loc.busy:  # nested in a call (part of it), or our own
            return fn(*args, **kwargs)
        op = self._start("registry", name, _args_tensors(args, kwargs))
        # An unpaired call still holds its ops (as one unit, unrecorded): the top-level count stays the same.
        self.call = op if op is not None else _Op("registry", name, "", self.step, None, [], inner_stopped=True)
        self.call_ref = None if op is None else op.ref_op
        try:
            out = fn(*args, **kwargs)
        finally:
            self.call = self.call_ref = None
        if op is not None:
            self._finish(op, _tensors(out))
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active or self.loc.busy:
            return func(*args, **kwargs)
        info = op_info(func, self.infos)
        if info.kind in ("view", "uninitialised", "skip") or info.name.split(".")[1] in DATA_MOVEMENT:
            # Computes nothing a batch could change; whether a reshape copies or views differs with the batch
            # size, so these are not aligned either.
            return func(*args, **kwargs)
        op = self._start("aten", info.name, _args_tensors(args, kwargs))
        out = func(*args, **kwargs)
        if op is not None:
            self._finish(op, _tensors(out))
        return out

    def resolve(self) -> None:
        """Descriptors to comparable digests (one device synchronisation)."""
        digest = self.fp.resolver()
        for o in self.ops:
            for x in [o, *o.inner]:
                x.ins = [None if d is None else digest(d) for d in x.ins]
                x.outs = [None if d is None else digest(d) for d in x.outs]
        self.fp.close()


def _record(fn: Callable, args: tuple, root: nn.Module, coefficients: Coefficients, ref: list[_Op] | None = None,
            mapping: dict[int, int] | None = None, layout: Layout | None = None, keep: tuple | None = None,
            describe: bool = True) -> _RowMode:
    locator = _Locator()
    mode = _RowMode(locator, root, coefficients, ref, mapping, layout, keep, describe)
    with torch.no_grad(), running(mode, locator):
        fn(*args)
    mode.resolve()
    return mode


def _key(op: _Op) -> tuple:
    return (op.kind, op.op, op.module, op.step)


def _align(ref: list[_Op], ran: list[_Op]) -> dict[int, int]:
    """Batch-run op index -> reference op index, pairing the longest common subsequence of what ran
    (kind, op, module, step): code that runs only for a batch (a padding check) is left unpaired."""
    matcher = difflib.SequenceMatcher(None, [_key(o) for o in ref], [_key(o) for o in ran], autojunk=False)
    mapping = {}
    for block in matcher.get_matching_blocks():
        for n in range(block.size):
            mapping[ran[block.b + n].index] = ref[block.a + n].index
    return mapping


@dataclass
class BatchVarianceReport:
    """The reference run (the prompt alone) against the batch run, on the prompt's elements."""

    layout: dict
    ops_reference: int
    ops_batch: int
    aligned: int                      # ops (and registry calls) paired and compared
    unpaired_reference: int           # ops that ran only alone / only in the batch (code that depends on the
    unpaired_batch: int               # batch, like a padding check): not compared
    first_unpaired: dict | None       # the first of them in the reference run
    root_cause: dict | None           # the first op with equal prompt inputs and different prompt outputs
    root_cause_diff: dict | None      # bench.compare.Mismatch of its differing output (prompt elements)
    first_difference: dict | None     # the first op whose prompt outputs differ
    differing_after_root: int         # ops after the root cause whose prompt outputs differ
    ops_after_root: int
    unmapped: int                     # ops with a tensor whose prompt part could not be selected
    first_unmapped: dict | None
    first_non_finite: dict | None     # the first op whose prompt outputs held NaN or an infinity
    collision_bound: str = COLLISION_BOUND
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def comparable(self) -> bool:
        nf = self.first_non_finite
        return nf is None or (self.root_cause is not None and self.root_cause["index"] < nf["index"])


    @property
    def identical(self) -> bool:
        return self.first_difference is None and self.comparable

    def summary(self) -> str:
        lay = self.layout
        where = (f"row {lay['row']} of a batch of {lay['batch_size']}"
                 + (f", left-padded by {lay['pad']}" if lay["pad"] else ""))
        if self.root_cause is not None:
            rc = self.root_cause
            text = (f"the prompt's result changed with the batch ({where}): root cause {_op_text(rc)} at "
                    f"{rc['module'] or '<root>'}, {rc['step']} (op {rc['label']} of {self.aligned})")
            return text if self.comparable else text + "; later prompt outputs went non-finite"
        if not self.comparable:
            nf = self.first_non_finite
            return (f"not comparable: the prompt's outputs hold NaN or infinities from {nf['op']} at "
                    f"{nf['module'] or '<root>'}, {nf['step']} on (equal bits of NaN prove nothing)")
        if self.first_difference is not None:
            fd = self.first_difference
            return (f"the prompt's result changed with the batch ({where}), first at {fd['op']} at "
                    f"{fd['module'] or '<root>'}, {fd['step']}; no op with equal prompt inputs changed its prompt "
                    f"outputs (the inputs of the first differing op were unmapped or differed already)")
        return (f"the prompt's elements are bitwise equal alone and as {where}: {self.aligned} ops compared, "
                f"every input and output")

    def lines(self) -> list[str]:
        out = []
        for label, ev in (("root cause", self.root_cause), ("first diff", self.first_difference)):
            if ev is None or (label == "first diff" and self.root_cause is not None
                              and ev["index"] == self.root_cause["index"]):
                continue
            out.append(f"  {label}: op {ev['label']} {_op_text(ev)} at {ev['module'] or '<root>'}, {ev['step']}: inputs "
                       + ", ".join(_shape_pair(a, b) for a, b in zip(ev["in_shapes_reference"], ev["in_shapes"]))
                       + " -> " + ", ".join(_shape_pair(a, b)
                                           for a, b in zip(ev["out_shapes_reference"], ev["out_shapes"])))
        m = self.root_cause_diff
        if m is not None:
            out.append(f"  root cause output {m['output_index']}, the prompt's elements: {m['n_diff']}/{m['n_total']} "
                       f"differ, max abs {m['max_abs']:.3e}, max ulp {m['max_ulp']}")
        if self.root_cause is not None:
            out.append(f"  spread: after the root cause {self.differing_after_root} of {self.ops_after_root} ops have "
                       f"different prompt outputs")
        if self.unpaired_reference or self.unpaired_batch:
            u = self.first_unpaired
            first = f" (first alone: op {u['label']} {u['op']} at {u['module'] or '<root>'}, {u['step']})" if u else ""
            out.append(f"  not compared: {self.unpaired_reference} op(s) ran only alone, {self.unpaired_batch} only in "
                       f"the batch{first}")
        if self.unmapped:
            u = self.first_unmapped
            out.append(f"  {self.unmapped} op(s) had a tensor whose prompt part could not be told from its shape "
                       f"(first: op {u['label']} {u['op']} at {u['module'] or '<root>'}); they were not candidates")
        out += ["  " + n for n in self.notes]
        out.append(f"  fingerprints: {self.collision_bound}")
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary(), "identical": self.identical,
                "comparable": self.comparable}


def _op_text(ev: dict) -> str:
    return ev["op"] + (f" in {ev['inside']}" if ev.get("inside") else "")


def _shape_pair(a, b) -> str:
    return f"{a}" if a == b else f"{a}->{b}"


def _event(o_ref: _Op, o: _Op, use_cache: bool) -> dict:
    """A paired op as the report shows it: ``label`` "12" (the reference run's 12th op or registry call) or
    "12.3" (the 3rd op inside that registry call); shapes alone and in the batch."""
    return {"index": o_ref.index, "inner": o_ref.inner_index,
            "label": str(o_ref.index) if o_ref.inner_index is None else f"{o_ref.index}.{o_ref.inner_index}",
            "kind": o.kind, "op": o.op, "inside": o.inside, "module": o.module, "step": step_label(o.step, use_cache),
            "step_index": o.step, "in_shapes_reference": o_ref.in_shapes, "in_shapes": o.in_shapes,
            "out_shapes_reference": o_ref.out_shapes, "out_shapes": o.out_shapes}


def check_layout(ref_ids: torch.Tensor, ref_mask: torch.Tensor | None, ids: torch.Tensor,
                 mask: torch.Tensor | None, row: int) -> Layout:
    """The prompt's layout in the batch, checked: the reference is one unpadded row, the batch's row ``row``
    holds the same tokens at its end, left padding before them."""
    if ref_ids.dim() != 2 or ref_ids.shape[0] != 1:
        raise BatchPinpointError(f"the reference must be the prompt alone, one row: got input ids of shape "
                                 f"{tuple(ref_ids.shape)}")
    if ref_mask is not None and not bool((ref_mask == 1).all()):
        raise BatchPinpointError("the reference (the prompt alone) must not be padded: its attention mask must be "
                                 "all ones")
    if ids.dim() != 2 or ids.shape[0] < 2:
        raise BatchPinpointError(f"the batch must have at least 2 rows (input ids of shape {tuple(ids.shape)})")
    if not 0 <= row < ids.shape[0]:
        raise BatchPinpointError(f"row {row} is not a row of the batch of {ids.shape[0]}")
    n, width = ref_ids.shape[1], ids.shape[1]
    pad = width - n
    if pad < 0 or not torch.equal(ids[row, pad:].cpu(), ref_ids[0].cpu()):
        raise BatchPinpointError(f"row {row} of the batch does not end with the prompt's {n} tokens: choose the row "
                                 f"that holds the prompt")
    if mask is not None and not (bool((mask[row, pad:] == 1).all()) and bool((mask[row, :pad] == 0).all())):
        raise BatchPinpointError(f"row {row}'s attention mask must be 0 on its {pad} padding positions and 1 on "
                                 f"the prompt's")
    if pad and mask is None:
        raise BatchPinpointError("a batch longer than the prompt needs its attention mask (left padding)")
    return Layout(int(ids.shape[0]), row, pad)


def pinpoint_batch(fn: Callable, reference: tuple, batch: tuple, row: int, *, model: nn.Module,
                   use_cache: bool = True) -> BatchVarianceReport:
    """Run ``fn(input_ids, attention_mask)`` on ``reference`` (the prompt alone, (1, S)) and on ``batch``
    ((B, S + pad), the prompt in row ``row``) and name the first op whose prompt elements changed with the
    batch (see the module docstring). ``model`` is the module whose forward calls count the steps.

    Runs: the reference, recorded; the batch, what ran only, to pair its ops with the reference's
    (:func:`_align`); the batch again, recorded on the paired ops; and both once more for the root cause's
    elements."""
    t0 = time.perf_counter()
    layout = check_layout(reference[0], reference[1], batch[0], batch[1], row)
    coefficients = Coefficients()
    ref = _record(fn, reference, model, coefficients).ops
    mapping = _align(ref, _record(fn, batch, model, coefficients, layout=layout, describe=False).ops)
    ops = _record(fn, batch, model, coefficients, ref, mapping, layout).ops
    paired = [(b.ref_op, b) for b in ops]
    paired_ref = set(mapping.values())
    unpaired_ref = [a for a in ref if a.index not in paired_ref]
    unpaired = [k for k in range(max((b.index for b in ops), default=-1) + 1) if k not in mapping]

    def ev(a: _Op, b: _Op, j: int | None = None) -> dict:
        return _event(a, b, use_cache) if j is None else _event(a.inner[j], b.inner[j], use_cache)

    root = first_diff = first_unmapped = first_nf = None
    unmapped = 0
    differing: list[int] = []
    notes: list[str] = []
    for n, (a, b) in enumerate(paired):
        if first_nf is None and (a.nonfinite or b.nonfinite):
            first_nf = ev(a, b)
        if any(d is None for d in b.ins + b.outs) or (not b.inner_stopped and any(
                d is None for x in b.inner for d in x.ins + x.outs)):
            unmapped += 1
            first_unmapped = first_unmapped or ev(a, b)
        if not _outs_differ(a, b):
            continue
        differing.append(n)
        first_diff = first_diff or ev(a, b)
        if root is not None or not _ins_equal(a, b):
            continue
        root, root_at = ev(a, b), (n, None)
        if a.kind != "registry":
            continue
        if b.inner_stopped or len(a.inner) != len(b.inner):
            notes.append(f"{a.op} ran other ops in the batch than alone (alone: {_ops_text(a.inner)}; in the batch "
                         f"they parted at its op {len(b.inner) + 1 if b.inner_stopped else len(a.inner) + 1}): the "
                         f"backend chose its computation from the batch's shape; the call is the finest unit compared")
            continue
        inner = next((j for j, (x, y) in enumerate(zip(a.inner, b.inner)) if _outs_differ(x, y) and _ins_equal(x, y)),
                     None)
        if inner is not None:
            root, root_at = ev(a, b, inner), (n, inner)
        else:
            notes.append(f"{a.op}'s own ops agreed on the prompt's elements where they could be compared, yet its "
                         f"output differs: the call is the finest unit found")
    report = BatchVarianceReport(
        layout=asdict(layout), ops_reference=len(ref), ops_batch=len(ops) + len(unpaired), aligned=len(paired),
        unpaired_reference=len(unpaired_ref), unpaired_batch=len(unpaired),
        first_unpaired=None if not unpaired_ref else _event(unpaired_ref[0], unpaired_ref[0], use_cache),
        root_cause=root, root_cause_diff=None, first_difference=first_diff,
        differing_after_root=0 if root is None else sum(1 for n in differing if n > root_at[0]),
        ops_after_root=0 if root is None else len(paired) - root_at[0] - 1, unmapped=unmapped,
        first_unmapped=first_unmapped, first_non_finite=first_nf, notes=notes)
    if root is not None:
        a, b = paired[root_at[0]]
        report.root_cause_diff, note = _root_diff(fn, reference, batch, model, layout, ref, mapping,
                                                  (a.index, root_at[1]), (b.index, root_at[1]), paired[root_at[0]])
        if note:
            report.notes.append(note)
    report.seconds = time.perf_counter() - t0
    return report


def _outs_differ(a: _Op, b: _Op) -> bool:
    return any(d is not None and d != e for d, e in zip(b.outs, a.outs))


def _ins_equal(a: _Op, b: _Op) -> bool:
    return all(d is not None and d == e for d, e in zip(b.ins, a.ins))


def _ops_text(ops: list[_Op]) -> str:
    names = Counter(o.op.split(".")[1] if o.kind == "aten" else o.op for o in ops)
    return " + ".join(f"{n} {name}" for name, n in names.items()) or "no op"


def _root_diff(fn, reference, batch, model, layout, ref, mapping, at_ref, at, pair) -> tuple[dict | None, str | None]:
    """Both runs again, keeping the root cause's prompt outputs: how they differ, element by element."""
    coefficients = Coefficients()
    again_ref = _record(fn, reference, model, coefficients, keep=at_ref)
    again = _record(fn, batch, model, coefficients, again_ref.ops, mapping, layout, keep=at)
    if again_ref.kept is None or again.kept is None:
        return None, "the root cause's outputs could not be kept: the repeated runs ran different ops"
    first = [_pick(pair[0], at_ref[1]), _pick(pair[1], at[1])]
    repeated = [_pick(next((o for o in run.ops if o.index == w[0]), None), w[1])
                for run, w in ((again_ref, at_ref), (again, at))]
    if first != repeated:
        return None, ("the root cause's outputs changed when both runs were repeated: the runs are not "
                      "deterministic run to run; run detbench pinpoint (replay, trace-compare) on them first")
    for k, (a, b) in enumerate(zip(again_ref.kept, again.kept)):
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            continue
        m = mismatch(a, b)
        if not m.equal:
            return {"output_index": k, **asdict(m)}, None
    return None, None


def _pick(op: _Op | None, inner: int | None):
    """The output digests of ``op`` (of its inner op ``inner``), or None where it was not recorded."""
    if op is None:
        return None
    if inner is None:
        return op.outs
    return op.inner[inner].outs if inner < len(op.inner) else None


__all__ = ["pinpoint_batch", "BatchVarianceReport", "Layout", "prompt_index", "step_label", "check_layout",
           "BatchPinpointError"]
