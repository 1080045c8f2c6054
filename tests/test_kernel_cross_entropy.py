"""The Triton cross-entropy kernels: accuracy, ignore_index, run-to-run bitwise equality, input checks.

Without CUDA the kernels run through the Triton interpreter (tests/conftest.py), which runs programs
one after another: there the atomic twin is deterministic too, so its tests check correctness only.
The negative control for the run-to-run check is the planted loss (bench.planted), whose token sum
is taken in a freshly shuffled order on every call. No ``tl.dot`` here, so bfloat16 runs on the CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from bench.compare import assert_bitwise_equal
from bench.planted import loss_nondet
from kernels import cross_entropy as ce
from qwen_layers.registry import REGISTRY

from . import kernel_checks as kc
from .kernel_checks import DEVICE, REPEATS, assert_each_raises, assert_repeats_bitwise, repeat_mismatches

pytestmark = kc.requires_triton

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]
NAMES = ("loss", "d logits")
# A 64-wide vocabulary chunk, so that V = 257 walks five chunks, the last one a single column.
SMALL_CHUNKS = ce.CEConfig(block_v=64, num_warps=2, reduce_block=16, reduce_num_warps=1)


def make(n: int, v: int, dtype: torch.dtype, seed: int = 0, ignored_every: int = 4, std: float = 3.0):
    """Seeded logits (drawn in float32 on the CPU) and labels with every k-th row ignored."""
    gen = torch.Generator().manual_seed(seed)
    logits = (std * torch.randn(n, v, generator=gen)).to(device=DEVICE, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    if ignored_every:
        labels[::ignored_every] = -100
    return logits, labels.to(DEVICE)


def run(fn, logits, labels, g: float = 1.7, **kw):
    """Loss and d logits for a fixed upstream gradient ``g`` (not 1, so the scaling is exercised)."""
    leaf = logits.detach().clone().requires_grad_(True)
    loss = fn(leaf, labels, **kw)
    (d,) = torch.autograd.grad(loss, leaf, torch.tensor(g, dtype=loss.dtype, device=loss.device))
    return loss.detach(), d


def eager(logits, labels, ignore_index=-100):
    """What transformers does: upcast to float32, mean cross entropy."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


def reference(logits, labels, ignore_index=-100):
    """The float64 reference: the same logits, upcast to float64."""
    return F.cross_entropy(logits.double(), labels, ignore_index=ignore_index)


def assert_close_to_reference(got, eager_out, ref, what: str):
    """Error vs float64 at most 2x eager's error in the same dtype, plus 2 ulp of the largest value.

    The factor 2: the kernel and eager both work in float32 (loss) and round the gradient once to the
    logits' dtype, in different summation orders, so either may land a rounding step from the other.
    The floor: at these sizes eager is sometimes exact by luck; one rounding step at the largest
    magnitude is the least any implementation can promise.
    """
    kc.assert_close_to_reference(got, ref, eager_out, what, factor=2.0, floor_ulps=2.0)


@pytest.mark.parametrize("backend", ["triton", "triton-atomic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, v, config", [(13, 100, None), (23, 300, None), (9, 257, SMALL_CHUNKS)],
                         ids=["V100", "V300", "V257-chunks64"])
def test_accuracy_vs_float64(backend, dtype, n, v, config):
    fn = REGISTRY.resolve("loss", backend, DEVICE)
    logits, labels = make(n, v, dtype)
    kw = {"config": config} if config is not None else {}
    loss, d = run(fn, logits, labels, **kw)
    e_loss, e_d = run(eager, logits, labels)
    r_loss, r_d = run(reference, logits, labels)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert d.dtype == dtype and d.shape == logits.shape
    assert_close_to_reference(loss, e_loss, r_loss, f"{backend} {dtype} V={v} loss")
    assert_close_to_reference(d, e_d, r_d, f"{backend} {dtype} V={v} d logits")
    ignored = labels == -100
    assert bool(ignored.any()) and not bool(d[ignored].any()), "ignored rows must get a zero gradient"


def test_other_ignore_index_and_int32_labels():
    logits, labels = make(11, 120, torch.float32, ignored_every=0)
    labels[1::3] = 7  # class 7 is the one ignored here
    for lab in (labels, labels.to(torch.int32)):
        loss, d = run(lambda x, y: ce.cross_entropy(x, y, ignore_index=7), logits, lab)
        r_loss, r_d = run(lambda x, y: reference(x, y.long(), ignore_index=7), logits, lab)
        e_loss, e_d = run(lambda x, y: eager(x, y.long(), ignore_index=7), logits, lab)
        assert_close_to_reference(loss, e_loss, r_loss, f"ignore_index=7 {lab.dtype} loss")
        assert_close_to_reference(d, e_d, r_d, f"ignore_index=7 {lab.dtype} d logits")


def test_minus_inf_chunk():
    """A whole vocabulary chunk of -inf (a masked vocabulary) keeps the online log-sum-exp finite."""
    logits, labels = make(6, 200, torch.float32, ignored_every=0)
    logits[:, :64] = float("-inf")
    labels = labels.clamp_min(64)
    loss, d = run(lambda x, y: ce.cross_entropy(x, y, config=SMALL_CHUNKS), logits, labels)
    r_loss, r_d = run(reference, logits, labels)
    e_loss, e_d = run(eager, logits, labels)
    assert torch.isfinite(loss) and bool(torch.isfinite(d).all())
    assert_close_to_reference(loss, e_loss, r_loss, "-inf chunk loss")
    assert_close_to_reference(d, e_d, r_d, "-inf chunk d logits")


@pytest.mark.parametrize("backend", ["triton", "triton-atomic"])
@pytest.mark.parametrize("n", [5, 0])
def test_all_rows_ignored_matches_torch(backend, n):
    """Mean over no rows: 0 / 0 = NaN and a zero gradient, as torch.nn.functional.cross_entropy gives."""
    logits, labels = make(n, 50, torch.float32, ignored_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy reports the 0 / 0
        loss, d = run(REGISTRY.resolve("loss", backend, DEVICE), logits, labels)
    t_loss, t_d = run(eager, logits, labels)
    assert torch.isnan(t_loss) and torch.isnan(loss)
    assert_bitwise_equal(d, t_d, "d logits with every row ignored")


# -------------------------------------------------------------------------------------------------
# run-to-run: 20 repeats with a fixed upstream gradient, loss and gradient bitwise
# -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_run_to_run_bitwise(dtype):
    logits, labels = make(17, 150, dtype)
    assert_repeats_bitwise(lambda: run(ce.cross_entropy, logits, labels), NAMES, "loss/triton")


def test_run_to_run_check_catches_planted_nondeterminism():
    """Negative control: the same check flags a loss whose token sum is taken in random order.

    64 rows of widely spread losses: measured over 3000 calls, no single result bits came up in more
    than 34% of them, so 20 repeats all agreeing by chance has odds below 1e-9.
    """
    logits, labels = make(64, 150, torch.float32, std=30.0)
    found = repeat_mismatches(lambda: run(loss_nondet, logits, labels), NAMES)
    assert any(" loss:" in f for f in found), f"planted loss nondeterminism not caught in {REPEATS} repeats"


# -------------------------------------------------------------------------------------------------
# registry entries and input checks
# -------------------------------------------------------------------------------------------------


def test_registry_entries():
    kc.assert_twin_entries("loss")


def test_non_contiguous_logits():
    logits, labels = make(8, 96, torch.float32)
    strided = logits.t().contiguous().t()
    assert not strided.is_contiguous()
    for a, b in zip(run(ce.cross_entropy, strided, labels), run(ce.cross_entropy, logits, labels)):
        assert_bitwise_equal(a, b, "non-contiguous logits vs contiguous copy")


@pytest.mark.parametrize("case, error, message", [
    ("int logits", TypeError, "supports float16, bfloat16 and float32"),
    ("float labels", TypeError, "pass integer class indices (int64 or int32)"),
    ("3-D logits", ValueError, "logits must be 2-D (N, V)"),
    ("labels length", ValueError, "labels must have shape (4,) = (N,)"),
    ("no classes", ValueError, "logits have no classes"),
    ("ignore_index type", TypeError, "ignore_index must be an int"),
    ("two devices", ValueError, "all tensors must be on one device"),
    ("no triton device", RuntimeError, "loss (triton) cannot run on meta"),
])
def test_bad_inputs(case, error, message):
    x = torch.randn(4, 10, device=DEVICE)
    y = torch.tensor([1, 2, 3, 4], device=DEVICE)
    args = {
        "int logits": (x.to(torch.int32), y),
        "float labels": (x, y.float()),
        "3-D logits": (x[None], y),
        "labels length": (x, y[:3]),
        "no classes": (x[:, :0], y),
        "ignore_index type": (x, y, -100.0),
        "two devices": (x, y.to("meta")),
        "no triton device": (x.to("meta"), y.to("meta")),
    }[case]
    assert_each_raises((ce.cross_entropy, ce.cross_entropy_atomic), args, error, message)


# -------------------------------------------------------------------------------------------------
# no host read in the call; label values checked on the device, named by the validation path
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [ce.cross_entropy, ce.cross_entropy_atomic], ids=["triton", "triton-atomic"])
def test_call_reads_nothing_back_to_the_host(fn, monkeypatch):
    """Forward and backward with valid labels (some ignored) copy no value to the host: nothing in a timed
    call waits for the device."""
    logits, labels = make(8, 96, torch.float32)
    leaf = logits.detach().clone().requires_grad_(True)

    def refuse(*args, **kwargs):
        raise AssertionError("host read in the hot path")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    with kc.NoHostRead():
        loss = fn(leaf, labels)
        loss.backward()
    monkeypatch.undo()
    ref_loss, ref_d = run(fn, logits, labels, g=1.0)
    assert_bitwise_equal(loss.detach(), ref_loss, "loss under the no-host-read check")
    assert_bitwise_equal(leaf.grad, ref_d, "d logits under the no-host-read check")


@pytest.mark.parametrize("fn", [ce.cross_entropy, ce.cross_entropy_atomic], ids=["triton", "triton-atomic"])
def test_bad_label_is_nan_on_the_device_and_named_by_the_validation_path(fn):
    """A label outside [0, V) that is not ignore_index reads nothing out of bounds: the loss is NaN and so is
    that row's gradient (other rows stay finite); check_labels / validate raise the readable error."""
    x = torch.randn(4, 10, device=DEVICE)
    bad = torch.tensor([1, -100, 10, 4], device=DEVICE)
    with kc.NoHostRead():
        loss, d = run(fn, x, bad)
    assert torch.isnan(loss)
    assert torch.isnan(d[2]).all() and torch.isfinite(d[[0, 1, 3]]).all() and (d[1] == 0).all()
    for check in (ce.check_labels, ce.validate):
        with pytest.raises(ValueError) as info:
            check(x, bad)
        assert "label 10 at row 2 is outside [0, 10) and is not ignore_index=-100" in str(info.value)
        check(x, torch.tensor([1, -100, 9, 0], device=DEVICE))  # valid labels pass
    negative = torch.tensor([1, -1, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match=r"label -1 at row 1 is outside \[0, 10\)"):
        ce.check_labels(x, negative)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ce.validate(x[None], bad)
