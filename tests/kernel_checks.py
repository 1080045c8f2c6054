"""The checks every Triton kernel test shares: where the kernels run, accuracy against float64,
run-to-run bitwise repeats, batch invariance, twin registry entries and bad-input errors.

Each test module keeps its own tolerances (with their reasons) and its own ``run`` helper (how its op
is called); what is here is only the logic that was the same in all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.compare import mismatch
from kernels import _common
from qwen_layers.registry import REGISTRY

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REPEATS = 20

_REASON = _common.triton_available(DEVICE)
# Every Triton registry entry is registered with ``available=triton_available``: one mark serves all.
requires_triton = pytest.mark.skipif(_REASON is not None, reason=f"triton kernels cannot run here: {_REASON}")

# Kernels that use tl.dot: bfloat16 only where the kernels are compiled, not in the interpreter.
BF16_DOT = pytest.param(
    torch.bfloat16, id="bfloat16",
    marks=pytest.mark.skipif(DEVICE.type != "cuda",
                             reason="tl.dot on bfloat16 is broken in the Triton interpreter (triton issue 11584)"),
)
DOT_DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16"), BF16_DOT]

Outputs = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


def forward_backward(fn: Callable, leaves: Sequence[torch.Tensor], upstream, *args, **kw) -> tuple:
    """``fn(*leaves, *args, **kw)`` and its gradients for ``upstream``: (*outputs, *grads), detached.

    The leaves are fresh copies that require grad; ``fn`` may return one tensor or a tuple, and
    ``upstream`` is then one tensor or a matching tuple.
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves, *args, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, leaves, upstream)
    return (*(o.detach() for o in outs), *grads)


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, what: str, *,
                              factor: float, floor_ulps: float, rounding_dtype: torch.dtype | None = None) -> None:
    """Error vs the float64 reference at most ``factor`` x eager's error + ``floor_ulps`` ulps.

    The ulps are of ``rounding_dtype`` (default: the output's dtype) at the reference's largest
    magnitude. Each caller states why its factor and floor are what they are.
    """
    ref64 = ref64.double()
    err = (out.double() - ref64).abs().max().item()
    eager_err = (eager.double() - ref64).abs().max().item()
    floor = floor_ulps * torch.finfo(rounding_dtype or out.dtype).eps * ref64.abs().max().item()
    assert err <= factor * eager_err + floor, (
        f"{what}: max abs error {err:.3e} vs float64 exceeds {factor} x eager's {eager_err:.3e} + floor "
        f"{floor:.3e}; kernel vs eager: {mismatch(out, eager.to(out.dtype))}"
    )


def _named(outputs: Outputs, names: Sequence[str] | None) -> Iterable[tuple[str, torch.Tensor]]:
    return outputs.items() if isinstance(outputs, Mapping) else zip(names, outputs)


def repeat_mismatches(run_once: Callable[[], Outputs], names: Sequence[str] | None = None,
                      repeats: int = REPEATS) -> list[str]:
    """Call ``run_once`` ``repeats`` times; describe every output that ever differs from the first run's bits.

    ``run_once`` returns a tuple of tensors named by ``names``, or a {name: tensor} mapping. Lines read
    ``"repeat {i} {name}: {mismatch}"``.
    """
    first = dict(_named(run_once(), names))
    found = []
    for i in range(1, repeats):
        for name, a in _named(run_once(), names):
            m = mismatch(a, first[name])
            if not m.equal:
                found.append(f"repeat {i} {name}: {m}")
    return found


def assert_repeats_bitwise(run_once: Callable[[], Outputs], names: Sequence[str] | None, what: str,
                           repeats: int = REPEATS) -> None:
    """Every output of ``repeats`` calls bitwise equal to the first call's."""
    found = repeat_mismatches(run_once, names, repeats)
    assert not found, f"{what} differs across {repeats} repeats:\n" + "\n".join(found)


def batch_variance(run_rows: Callable[[slice], Sequence[torch.Tensor]], slices: Iterable[slice],
                   names: Sequence[str], compared: Sequence[str] | None = None) -> list[str]:
    """Differences between rows computed within the whole batch and the same rows computed alone.

    ``run_rows(rows)`` runs the op on the batch rows ``rows`` (a slice of dim 0) and returns its
    outputs, named by ``names``; ``compared`` (default: all) are the outputs that are per-row.
    Lines read ``"{name}[{start}:{stop}]: {mismatch}"``.
    """
    whole = run_rows(slice(None))
    found = []
    for rows in slices:
        alone = run_rows(rows)
        for name in compared or names:
            i = names.index(name)
            m = mismatch(alone[i], whole[i][rows])
            if not m.equal:
                found.append(f"{name}[{rows.start}:{rows.stop}]: {m}")
    return found


def assert_batch_invariant(run_rows: Callable[[slice], Sequence[torch.Tensor]], slices: Iterable[slice],
                           names: Sequence[str], what: str, compared: Sequence[str] | None = None) -> None:
    found = batch_variance(run_rows, slices, names, compared)
    assert not found, f"{what} is batch-variant:\n" + "\n".join(found)


def assert_twin_entries(op: str, name: str = "triton", twin: str = "triton-atomic"):
    """The deterministic entry and its atomic twin point at each other; returns both entries."""
    det, atomic = REGISTRY.get(op, name), REGISTRY.get(op, twin)
    assert (det.deterministic, det.twin, det.origin) == (True, twin, "built-in")
    assert (atomic.deterministic, atomic.twin, atomic.origin) == (False, name, "built-in")
    return det, atomic


def assert_each_raises(fns: Iterable[Callable], args: Sequence, error: type[Exception], message: str) -> None:
    """Every one of ``fns(*args)`` raises ``error`` whose text contains ``message`` (literally)."""
    for fn in fns:
        with pytest.raises(error) as info:
            fn(*args)
        assert message in str(info.value), f"{getattr(fn, '__name__', fn)}: {info.value}"


class NoHostRead(TorchDispatchMode):
    """Raises on every op that copies a tensor value back to the host (a device synchronisation on CUDA)."""

    HOST_READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.HOST_READS:
            raise AssertionError(f"host read in the hot path: {func}")
        return func(*args, **(kwargs or {}))
