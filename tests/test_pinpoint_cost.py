"""What makes ``bench.pinpoint`` cheaper keeps its guarantees: the one-pass CPU fingerprint's collision
argument, NaN checks without copies, replays without copies, and coarse trace-compare (hooks only, op
by op only when the runs differ). The costs themselves: ``bench/benchmarks/bench_pinpoint_overhead.py``
(smoke-tested here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import cli, pinpoint
from bench.pinpoint.fingerprint import FP_SMALL, Coefficients, Fingerprints
from bench.pinpoint.ops import cpu_flags
from bench.planted import planted_registered

from .planted_checks import PLACES
from .test_pinpoint import Net, PlantedSFT, _assert_overflow_found, _overflow_job, compare_planted

# ------------------------------------------------------------------------------------------------
# the CPU fingerprint: two readings, one coefficient vector, each case caught by one reading
# ------------------------------------------------------------------------------------------------

WORDS = 64  # int64 words of the test tensor (512 bytes: above FP_SMALL, fingerprinted)


def _sums(t: torch.Tensor) -> tuple:
    """(reading from byte 0, reading from byte 4, the last 12 bytes) of ``t``'s fingerprint."""
    d = Fingerprints(False).value(t)
    assert d[0] == "h"
    return d[3], d[4], d[5]


def _cancelling(upper: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 tensors that differ in two 32-bit halves chosen, from the known coefficients, so that
    the differences cancel exactly modulo 2^64 in one reading: both in the upper halves of aligned words
    3 and 9 (they cancel in the reading from byte 0), or both in the lower halves of aligned words 4 and
    10 (the upper halves of words 3 and 9 of the reading from byte 4)."""
    c = Coefficients().numpy(WORDS).astype(np.uint64)
    ci, cj = int(c[3]), int(c[9])
    a, b = cj % 2 ** 32, (-ci) % 2 ** 32   # 2^32 * (ci * a + cj * b) = 2^32 * 2^32 * k = 0 modulo 2^64
    base = torch.randn(2 * WORDS, generator=torch.Generator().manual_seed(1))
    other = base.clone()
    halves = other.view(torch.int32).view(-1)  # little-endian: half 2w is the lower half of word w
    i, j = (2 * 3 + 1, 2 * 9 + 1) if upper else (2 * 4, 2 * 10)
    halves[i] = np.int32(np.uint32((int(np.uint32(halves[i].item() & 0xFFFFFFFF)) + a) % 2 ** 32))
    halves[j] = np.int32(np.uint32((int(np.uint32(halves[j].item() & 0xFFFFFFFF)) + b) % 2 ** 32))
    return base, other


def test_a_difference_cancelling_in_the_aligned_reading_is_caught_by_the_offset_one():
    base, other = _cancelling(upper=True)
    s0, s1 = _sums(base), _sums(other)
    assert s0[0] == s1[0]  # built to cancel there: one reading alone would miss it for sure
    assert s0[1] != s1[1] and s0[2] == s1[2]
    assert Fingerprints(False).value(base) != Fingerprints(False).value(other)


def test_a_difference_cancelling_in_the_offset_reading_is_caught_by_the_aligned_one():
    base, other = _cancelling(upper=False)
    s0, s1 = _sums(base), _sums(other)
    assert s0[1] == s1[1]  # cancels in the reading from byte 4, which holds these halves as upper halves
    assert s0[0] != s1[0]


@pytest.mark.parametrize("nbytes", [FP_SMALL + 4, 8 * (1 << 17) + 12, 8 * (3 << 17) + 4])
def test_every_byte_of_one_and_several_pieces_is_read(nbytes):
    """Tensors of one piece and of several (1 MiB each, summed piece by piece): a flipped low bit of a
    byte at the edges of pieces and at the end changes the fingerprint."""
    t = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ref = Fingerprints(False).value(t)
    for pos in sorted({0, 5, 8 * (1 << 17) - 1, 8 * (1 << 17), 8 * (1 << 17) + 4, nbytes - 13, nbytes - 1}):
        if pos < nbytes:
            u = t.clone()
            u[pos] ^= 1
            assert Fingerprints(False).value(u) != ref, pos
    assert Fingerprints(False).value(t.clone()) == ref


def test_large_tensors_fingerprint_alike_on_one_thread_and_several():
    t = torch.randn(3 << 20, generator=torch.Generator().manual_seed(3))  # 12 MiB: shared out over threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = Fingerprints(False).value_flags(t)
        torch.set_num_threads(2)
        fp = Fingerprints(False)
        two = fp.value_flags(t)
        assert fp._pool is not None
        fp.close()
    finally:
        torch.set_num_threads(before)
    assert one == two and one[1] == (False, False)


def test_transposed_tensors_are_read_in_memory_order_and_checked_without_a_copy():
    """A transposed gradient is fingerprinted and checked for NaN where it lies (the permutation is
    part of its descriptor: the same values laid out another way count as different)."""
    w = torch.randn(96, 40)
    g = w.t()
    d = Fingerprints(False).value(g)
    assert d[-1] == ("memory order", (1, 0)) and d != Fingerprints(False).value(g.contiguous())
    u = w.clone()
    u.view(torch.int32)[50, 7] ^= 1
    assert Fingerprints(False).value(u.t()) != d
    assert cpu_flags(g) == (False, False)
    w[3, 5] = float("nan")
    assert cpu_flags(g) == (True, False)
    desc, flags = Fingerprints(False).value_flags(g)
    assert flags == (True, False)


# ------------------------------------------------------------------------------------------------
# trace: non-finite values read from outside are checked when they matter
# ------------------------------------------------------------------------------------------------


def test_an_in_place_op_over_an_outside_nan_is_said_to_have_got_it():
    """An outside tensor holding NaN, overwritten in place by the first op that reads it: checked before
    the op writes it, so the NaN is reported as coming in, not as made by the op."""
    x = torch.ones(40)
    x[7] = float("nan")
    tr = pinpoint.trace(lambda: x.mul_(2).sum())
    nan = tr.non_finite.nan
    assert (nan["op"], nan["source"]) == ("aten.mul_.Tensor", "input") and "float32[40]" in nan["input"]


# ------------------------------------------------------------------------------------------------
# replay: units replayed without copying what their first run did not write
# ------------------------------------------------------------------------------------------------


class WritesGradOnce(torch.autograd.Function):
    """Identity; its backward scales the incoming gradient in place on every call but the first."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        WritesGradOnce.calls += 1
        return g.mul_(1.0) if WritesGradOnce.calls > 1 else g.clone()


class WritesGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.mul_(2.0)


def test_a_replay_that_writes_inputs_its_first_run_left_alone_is_reported():
    WritesGradOnce.calls = 0
    x = torch.randn(5, requires_grad=True)
    report = pinpoint.replay(lambda: (WritesGradOnce.apply(x) * 3).sum().backward())
    assert any("wrote its inputs in place" in e for e in report.errors), str(report)
    assert not report.clean


def test_a_backward_that_writes_its_gradient_in_place_is_not_replayed_from_what_it_wrote():
    """Its incoming gradient's values before its first run are gone: replaying from what it wrote would
    report a difference that is not there. It is named as not replayed instead (not clean)."""
    x = torch.randn(5, requires_grad=True)
    report = pinpoint.replay(lambda: (WritesGrad.apply(x) * 3).sum().backward())
    assert not report.findings and report.units_replayed == 0, str(report)
    assert any("WritesGradBackward" in e and "first run wrote its own inputs" in e for e in report.errors)
    assert torch.equal(x.grad, torch.full((5,), 6.0))


# ------------------------------------------------------------------------------------------------
# coarse trace-compare
# ------------------------------------------------------------------------------------------------


def test_coarse_compare_of_identical_runs_traces_no_op(tmp_path):
    job = PlantedSFT(tmp_path, None, (2, 16, 4, 2))
    fine = pinpoint.compare_runs(job.run, runs=2, setup=job.setup)
    report = pinpoint.compare_runs(job.run, runs=2, setup=job.setup, coarse=True)
    assert report.identical and report.levels == "modules" and report.coarse is None, str(report)
    assert "aten" not in report.calls_per_run and report.skipped == {}
    assert report.calls_per_run["module"]["Linear"] == 2 * 15 and report.calls_per_run["registry"]["loss/eager"] == 2
    assert report.calls_per_run["gradient"]["gradient"] == report.calls_per_run["parameter"]["parameter"]
    assert report.events[0] < fine.events[0] / 4
    text = str(report)
    assert "coarse events" in text and "ops not traced" in text and "rarest event class" in text and "2^-33" in text
    d = json.loads(report.to_json())
    assert d["levels"] == "modules" and d["identical"] is True


@pytest.fixture
def planted_registry():
    with planted_registered():
        yield


@pytest.mark.slow
def test_coarse_compare_of_differing_runs_names_the_planted_op(tmp_path, planted_registry):
    plant, (level, op, module, phase), data = PLACES["linear-fwd"]
    report = compare_planted(PlantedSFT(tmp_path, plant, data), coarse=True)
    assert report.levels == "ops" and not report.identical
    assert (report.root_cause["op"], report.root_cause["module"]) == (op, module)
    first = report.coarse["first_difference"]
    assert report.coarse["reason"] == "the runs differ" and first["module"] == module, report.coarse
    assert "coarse pass" in str(report) and "traced again op by op" in str(report)


def test_coarse_compare_goes_op_by_op_to_name_an_aten_op():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8)
    report = pinpoint.compare_runs(lambda: (net.block(x) * 2).exp().sum(), runs=2, roots={"net": net},
                                   coarse=True)
    assert report.root_cause["op"] == "detbench_test.noisy_sum.default" and report.coarse is not None
    assert report.coarse["first_difference"]["module"] == "net.block"


def test_coarse_compare_over_non_finite_values_goes_op_by_op():
    net, x = _overflow_job()
    report = pinpoint.compare_runs(lambda: net(x), runs=2, roots={"net": net}, coarse=True)
    assert not report.comparable and report.coarse["reason"] == "values became non-finite"
    for nf in report.non_finite:
        _assert_overflow_found(nf, "event")
    coarse = pinpoint.trace(lambda: net(x), roots={"net": net}, coarse=True)
    assert coarse.non_finite.nan["module"] == "net.1" and coarse.non_finite.nan["source"] == "unknown"
    assert "a coarse trace does not see" in coarse.non_finite.sentence("event")


def test_coarse_has_no_exact_mode(capsys):
    with pytest.raises(ValueError, match="no exact mode"):
        pinpoint.compare_runs(lambda: torch.ones(2).sum(), runs=2, coarse=True, exact=True)
    with pytest.raises(ValueError, match="no exact mode"):
        pinpoint.trace(lambda: torch.ones(2).sum(), coarse=True, exact=True)
    for extra, msg in ((["--exact"], "drop --coarse or --exact"), (["--method", "replay"], "--method compare")):
        assert cli.main(["pinpoint", "--subject", "rmsnorm", "--device", "cpu", "--coarse", *extra]) == 2
        assert msg in capsys.readouterr().err


def test_cli_coarse_compare(capsys):
    assert cli.main(["pinpoint", "--subject", "rmsnorm", "--device", "cpu", "--method", "compare", "--coarse",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compare"]["levels"] == "modules" and out["compare"]["identical"] is True
    assert out["compare"]["calls_per_run"]["registry"] == {"rmsnorm/eager": 1}


# ------------------------------------------------------------------------------------------------
# the benchmark runs
# ------------------------------------------------------------------------------------------------


def test_overhead_benchmark_prints_every_method_for_the_tiny_step(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "benchmarks"))
    try:
        import bench_pinpoint_overhead as bench_mod
    finally:
        sys.path.pop(0)
    assert bench_mod.main(["--steps", "tiny", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tiny = out["steps"]["tiny"]
    assert set(tiny["ratio"]) == {"plain", "noop", "replay", "trace", "coarse"} and tiny["aten_ops"] > 500
    assert out["threads"] == 1 and "load_before" in out
    assert bench_mod.main(["--steps", "tiny", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "| no-op mode | replay | trace | coarse trace |" in text and "overhead per aten op" in text
