"""Timings one can trust: ratios interleaved round by round, and every time or ratio that cannot be read as
a measurement marked ``~`` (inconsistent phases, a wide interval, a loaded machine).

The harness runs for real on tiny shapes; only the clock that times one call and the probe that reads the
load are replaced (``bench.timing.call_timer`` and ``bench.timing.Probe``), so the times are known.
"""

import os
from pathlib import Path

import pytest
import torch

from bench import harness, subjects, timing
from bench import kernel_speed as ks
from bench.cli import build_parser
from bench.cli.run import plan_from_args
from bench.report import Index, cost_rows, fmt_ratio, header_lines, render_markdown
from bench.results import load_run
from qwen_layers.registry import REGISTRY

COMMITTED = Path(__file__).resolve().parents[1] / "results" / "run-20261129-132551-cpu-715190.json"
PHASE_OF = {"forward": "fwd", "backward": "bwd", "both": "fwd+bwd"}  # bench.timing.phase_arms' functions
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class FakeClock:
    """Stands in for the per-call clock: ``seconds(phase, mode, i)`` is the i-th sample of that arm; the
    mode is read from torch's flags, as the arm's context set them. ``calls`` records the order of calls."""

    clock = "fake"

    def __init__(self, seconds):
        self.seconds = seconds
        self.calls = []

    def __call__(self, fn, state):
        phase = PHASE_OF.get(getattr(fn, "__name__", ""), getattr(fn, "__name__", "?"))
        mode = "torch-det" if torch.are_deterministic_algorithms_enabled() else "default"
        i = sum(1 for c in self.calls if c == (phase, mode))
        self.calls.append((phase, mode))
        return self.seconds(phase, mode, i)


def fake_probe(load1=0.1, cpu_per_wall=1.0, threads=2):
    """A probe whose loop lasts 10 s of wall time and ``10 * cpu_per_wall`` s of CPU time."""
    wall, cpu = iter([0.0, 10.0]), iter([0.0, 10.0 * cpu_per_wall])
    return timing.Probe(load1=lambda: load1, cpu_seconds=lambda: next(cpu), wall_seconds=lambda: next(wall),
                        threads=lambda: threads)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(subjects.SIZES, "quick", {**subjects.SIZES["quick"], "rmsnorm": (16,)})


def run_rmsnorm(monkeypatch, clock, probe=None, modes="default", repeats=5, warmup=1):
    """A real ``detbench run`` of rmsnorm/eager/fp32 on 16 rows, timed by ``clock``."""
    probe = probe or fake_probe()
    monkeypatch.setattr(timing, "call_timer", lambda device: clock)
    monkeypatch.setattr(timing, "Probe", lambda: probe)
    args = build_parser().parse_args(["run", "--quick", "--device", "cpu", "--no-progress", "--subjects", "rmsnorm",
                                      "--backends", "eager", "--dtypes", "fp32", "--modes", modes, "--repeats", "2",
                                      "--time-repeats", str(repeats), "--warmup", str(warmup)])
    plan = plan_from_args(args)
    return harness.execute(plan, harness.new_result(plan, []))


def steady(ms):
    """Samples of ``ms[phase]`` milliseconds, every third 1% slower: a quiet machine (median exactly ``ms``)."""
    return lambda phase, mode, i: ms[phase] * 1e-3 * (1 + 0.01 * (i % 3 == 2))


QUIET = {"fwd": 0.0692, "bwd": 0.2, "fwd+bwd": 0.268}


def test_interleave_times_arms_round_by_round():
    order = []

    def timer(fn, state):
        order.append(fn())
        return 1e-3

    loop = timing.interleave([timing.Arm("A", lambda: "A"), timing.Arm("B", lambda: "B")], "cpu", repeats=3, warmup=1,
                             timer=timer, probe=fake_probe())
    assert order == ["A", "B", "A", "B", "A", "B", "A", "B"]
    assert loop.timings["A"].samples_s == [1e-3] * 3 and loop.timings["B"].repeats == 3


def test_an_arm_that_raises_leaves_the_loop_and_the_others_go_on():
    calls = []

    def bad():
        calls.append("bad")
        raise RuntimeError("boom")

    loop = timing.interleave([timing.Arm("ok", lambda: calls.append("ok")), timing.Arm("bad", bad)], "cpu",
                             repeats=3, warmup=0, timer=lambda fn, state: fn() or 1e-3, probe=fake_probe())
    assert calls == ["ok", "bad", "ok", "ok"]
    assert set(loop.timings) == {"ok"} and str(loop.failed["bad"]) == "boom"


def test_loop_records_load_and_cpu_share():
    loop = timing.interleave([timing.Arm("A", lambda: None)], "cpu", repeats=2, warmup=0,
                             timer=lambda fn, state: 1e-3, probe=fake_probe(load1=3.5, cpu_per_wall=0.5, threads=2))
    t = loop.timings["A"]
    assert (t.load1, t.cpu_share, t.threads) == (3.5, 0.25, 2)


def test_the_harness_times_every_cell_of_a_subject_and_dtype_in_one_loop_a_b_a_b(monkeypatch, tiny):
    clock = FakeClock(steady(QUIET))
    res = run_rmsnorm(monkeypatch, clock, modes="default,torch-det", repeats=3, warmup=1)
    one_round = [(ph, m) for m in ("default", "torch-det") for ph in timing.PHASES]
    assert clock.calls == one_round * 4  # 1 warm-up round + 3 timed
    assert {t.loop for t in res.timings} == {"rmsnorm/fp32"}
    assert all(t.load1 == 0.1 and t.cpu_share == 0.5 and t.threads == 2 for t in res.timings)


def test_a_ratio_is_paired_by_round_so_drift_cancels(monkeypatch, tiny):
    """Each round twice as slow as the one before (a machine getting busy): every arm's own spread is wide,
    the ratio of the two modes round by round is exactly 1.1, and is not marked."""
    def drifting(phase, mode, i):
        return QUIET[phase] * 1e-3 * 2 ** i * (1.1 if mode == "torch-det" else 1.0)

    res = run_rmsnorm(monkeypatch, FakeClock(drifting), modes="default,torch-det")
    ix = Index(res)
    (row,) = cost_rows(ix)
    r = row["torch-det"]
    assert r.paired and r.mid == pytest.approx(1.1) and r.lo == pytest.approx(1.1) and r.hi == pytest.approx(1.1)
    assert r.noise == () and "~" not in fmt_ratio(r)
    key = ("rmsnorm", "eager", "fp32", "default")
    assert ix.view(ix.cells[key]).both.endswith("~")  # the time itself is not to be trusted
    assert "wide interval" in ix.time_noise(key)["fwd+bwd"][0]


def test_an_inconsistent_cell_is_marked(monkeypatch, tiny):
    """bwd slower than fwd+bwd (the issue's 0.0692 / 15.9 / 0.268 ms) on a quiet machine: all three times ~."""
    res = run_rmsnorm(monkeypatch, FakeClock(steady({**QUIET, "bwd": 15.9})))
    ix = Index(res)
    key = ("rmsnorm", "eager", "fp32", "default")
    v = ix.view(ix.cells[key])
    assert v.fwd.endswith("~") and v.bwd.endswith("~") and v.both.endswith("~")
    assert ix.inconsistency(key) == "inconsistent (bwd 15.9 ms > fwd+bwd 0.268 ms)"
    assert "bwd 15.9 ms > fwd+bwd 0.268 ms" in render_markdown(res)


def test_a_consistent_quiet_cell_is_not_marked(monkeypatch, tiny):
    res = run_rmsnorm(monkeypatch, FakeClock(steady(QUIET)))
    ix = Index(res)
    v = ix.view(ix.cells[("rmsnorm", "eager", "fp32", "default")])
    assert not v.times_noisy and "~" not in v.fwd + v.bwd + v.both, v.time_noise
    assert "not loaded" in header_lines(res)[-1]


def test_a_wide_interval_is_marked(monkeypatch, tiny):
    """Samples alternating 1x and 2x: quartile range over a quarter of the median."""
    res = run_rmsnorm(monkeypatch, FakeClock(lambda ph, m, i: QUIET[ph] * 1e-3 * (1 + i % 2)))
    ix = Index(res)
    key = ("rmsnorm", "eager", "fp32", "default")
    assert all(ix.view(ix.cells[key]).__getattribute__(f).endswith("~") for f in ("fwd", "bwd", "both"))
    assert all(r and r[0].startswith("wide interval") for r in ix.time_noise(key).values())


@pytest.mark.parametrize("load1, cpu_per_wall, why", [(2 * timing.LOAD_LIMIT * CPUS, 1.0, "load"),
                                                      (0.1, 0.3, "CPU share 0.15")])
def test_a_loaded_machine_is_marked_and_said_in_the_header(monkeypatch, tiny, load1, cpu_per_wall, why):
    res = run_rmsnorm(monkeypatch, FakeClock(steady(QUIET)), probe=fake_probe(load1, cpu_per_wall),
                      modes="default,torch-det")
    ix = Index(res)
    v = ix.view(ix.cells[("rmsnorm", "eager", "fp32", "default")])
    assert v.both.endswith("~") and why in v.time_noise["fwd+bwd"][0]
    (row,) = cost_rows(ix)
    assert any(n.startswith("loaded") for n in row["torch-det"].noise) and fmt_ratio(row["torch-det"]).endswith("~")
    assert "loaded during 1 of 1 loops" in header_lines(res)[-1]


def test_the_issue_s_ratio_with_a_wide_interval_is_marked():
    """0.02x [0.01-0.03] lies far from 1x and was printed unmarked; its interval is wider than the ratio."""
    r = timing.paired_ratio([3, 1, 2, 1, 3], [100] * 5)
    assert (r.mid, r.lo, r.hi) == (0.02, 0.01, 0.03)
    assert timing.spread(r.mid, r.lo, r.hi, r.rounds).startswith("wide interval")


def test_a_result_without_load_fields_still_loads_and_renders():
    res = load_run(COMMITTED)
    assert res.schema == "detbench.run/1" and res.timings and res.timings[0].load1 is None
    assert any("load not recorded" in line for line in header_lines(res))
    ix = Index(res)
    row = cost_rows(ix)[0]
    assert not row["torch-det"].paired and any(n.startswith("separate loops") for n in row["torch-det"].noise)
    text = render_markdown(res)
    assert "load not recorded" in text and "separate loops" in text


def test_kernel_bench_times_a_section_round_by_round_and_pairs_its_ratios(monkeypatch):
    """Two matmul backends timed A, B, A, B; every round twice as slow as the one before: each backend's own
    spread is wide, the det kernel over its twin is 1.1 in every round, an interval of width 0, unmarked."""
    order = []

    def backend(name):
        def fn(x, w, bias=None):
            order.append(name)
            return x
        return fn

    def clock(fn, state):
        fn()
        name = order[-1]
        return 1e-3 * 2 ** (order.count(name) - 1) * (1.1 if name == "mine" else 1.0)

    probe = fake_probe()
    monkeypatch.setattr(timing, "call_timer", lambda device: clock)
    monkeypatch.setattr(timing, "Probe", lambda: probe)
    with REGISTRY.scoped():
        REGISTRY.register("linear", "mine", backend("mine"), deterministic=True, twin="mine-atomic")
        REGISTRY.register("linear", "mine-atomic", backend("mine-atomic"), deterministic=False, twin="mine")
        out = ks.bench_matmul(torch.device("cpu"), ks.shapes_for(True), timing.Timer(repeats=4, warmup=1),
                              backends=("mine", "mine-atomic"))
        lu = ks.lineup("matmul")
    assert order == ["mine", "mine-atomic"] * 5
    mine = {t.backend: t for t in out}["mine"]
    assert timing.spread(mine.median_ms, mine.q1_ms, mine.q3_ms, mine.samples).startswith("wide interval")
    (twin,) = [r for r in ks.compute_ratios(out, judge=False, lineups={"matmul": lu}, cpus=2)
               if r.numerator == "matmul/mine/forward" and "atomic twin" in r.name]
    assert twin.value == pytest.approx(1 / 1.1) and twin.low == pytest.approx(twin.high) and twin.noise == []
