"""The harness's checks can fail: planted faults are caught by the same code that passes eager.

Shapes are shrunk (the ``small_shapes`` fixture, tests/conftest.py) so the whole file runs in well under a
minute on one core.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from bench import checks, harness, subjects
from bench.cli import build_parser
from bench.cli.run import plan_from_args
from bench.compare import bits, mismatch
from bench.errors import InputError
from bench.modes import apply_mode, determinism_state, is_refusal
from bench.pinpoint import fingerprints
from bench.planted import PLANTED, register_planted
from bench.report import Index, cost_rows
from qwen_layers import backends, registry
from qwen_layers.backends import eager_attention
from qwen_layers.config import PRESETS
from qwen_layers.registry import BackendUnavailable


@pytest.fixture
def scoped_backends():
    """Register backends for one test; the registry is restored afterwards (``registry.scoped``)."""
    with registry.scoped():
        yield registry.register


@pytest.fixture
def planted():
    before = {(op, n) for op, n in PLANTED if n in registry.names(op)}
    names = register_planted()
    yield
    for op, n in names:
        if (op, n) not in before:
            registry.unregister(op, n)


def run_matrix(*argv):
    args = build_parser().parse_args(["run", "--quick", "--device", "cpu", "--time-repeats", "1", "--warmup", "0",
                                      "--no-progress", *argv])
    plan = plan_from_args(args)
    result = harness.new_result(plan, [])
    return harness.execute(plan, result)


def cell(result, subject, backend, dtype="fp32", mode="default"):
    (c,) = [c for c in result.cells if (c.subject, c.backend, c.dtype, c.mode) == (subject, backend, dtype, mode)]
    return c


def differing(result, subject, backend, dtype="fp32", mode="default"):
    return {r.tensor for r in result.repeats if (r.subject, r.backend, r.dtype, r.mode) == (subject, backend, dtype, mode)
            and r.n_equal_to_first != r.repeats}


# ------------------------------------------------------------------------------------------------
# the check primitives
# ------------------------------------------------------------------------------------------------


def test_missable_fraction_is_computed_from_n():
    assert checks.missable_fraction(1) is None
    assert checks.missable_fraction(20) == pytest.approx(1 - 0.05 ** (1 / 19))
    assert checks.missable_fraction(2) == pytest.approx(0.95)
    assert checks.missable_fraction(100) < checks.missable_fraction(20) < checks.missable_fraction(5)
    assert "15%" in checks.bound_sentence(20) and "N=20" in checks.bound_sentence(20)


def _from_bits(values, dtype=torch.float32, int_dtype=torch.int32):
    return torch.tensor(values, dtype=int_dtype).view(dtype)


def test_bitwise_checks_tell_nan_payloads_and_signed_zeros_apart():
    qnan, payload_nan = _from_bits([0x7FC00000]), _from_bits([0x7FC00001])
    assert torch.isnan(qnan).all() and torch.isnan(payload_nan).all()
    assert not mismatch(qnan, payload_nan).equal
    assert mismatch(qnan, qnan.clone()).equal  # same NaN bits: equal
    zero, neg_zero = torch.tensor([0.0]), torch.tensor([-0.0])
    assert not mismatch(zero, neg_zero).equal
    assert fingerprints([zero]) != fingerprints([neg_zero])
    assert fingerprints([qnan]) != fingerprints([payload_nan])

    tracker = checks.RepeatTracker()
    for t in (qnan, qnan.clone(), payload_nan, zero, neg_zero, qnan.clone()):
        tracker.add({"out": t})
    st = tracker.stats["out"]
    assert (st.repeats, st.n_equal_to_first, st.n_distinct) == (6, 3, 4)
    assert st.nan == 1 and not tracker.deterministic
    assert st.first_mismatch["repeat"] == 2 and st.first_mismatch["n_diff"] == 1


def test_mismatch_counts_and_measures():
    a = torch.tensor([1.0, 2.0, 3.0, float("inf")])
    b = a.clone()
    b[1] = torch.nextafter(b[1], torch.tensor(10.0))
    b[3] = float("nan")
    d = mismatch(a, b)
    assert (d.equal, d.n_diff, d.n_total, d.max_ulp, d.inf_a, d.nan_b) == (False, 2, 4, 1, 1, 1)
    assert d.max_abs == pytest.approx(2.0 ** -22)


def test_accuracy_counts_ulps_of_the_dtype():
    ref = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    exact = ref.to(torch.bfloat16)
    assert checks.accuracy(exact, ref).max_ulp == 0.0 and checks.accuracy(exact, ref).rel_l2 == 0.0
    off = exact.clone()
    off[0] = torch.nextafter(off[0], torch.tensor(2.0, dtype=torch.bfloat16))
    acc = checks.accuracy(off, ref)
    assert acc.max_ulp == pytest.approx(1.0) and acc.rel_l2 > 0
    nan = exact.clone()
    nan[1] = float("nan")
    assert math.isnan(checks.accuracy(nan, ref).rel_l2)


# ------------------------------------------------------------------------------------------------
# subjects: identical inputs, fresh copies
# ------------------------------------------------------------------------------------------------


def test_every_subject_runs_forward_and_backward_with_identical_inputs(small_shapes):
    route = {op: "eager" for op in registry.OPS}
    for name in subjects.SUBJECTS:
        case = subjects.build_case(name, PRESETS["qwen3-tiny"], "quick", seed=0)
        inst = case.instantiate(torch.bfloat16, torch.device("cpu"), route)
        for k, v in case.inputs.items():
            expect = v.to(torch.bfloat16) if v.is_floating_point() else v
            assert torch.equal(inst.inputs[k], expect), f"{name}: input {k} is not the cast float32 master"
        r1, r2 = inst.run(), inst.run()
        assert r1.keys() == r2.keys() and any(k.startswith("grad.") for k in r1), name
        for k in r1:  # fresh copies each repeat: nothing accumulates
            assert torch.equal(bits(r1[k]), bits(r2[k])), f"{name}: {k} changed between repeats"
        assert all(p.grad is None for p in inst.module.parameters()), name
        if case.batch_sizes():
            sub = inst.run(rows=case.batch_sizes()[0])
            for k in case.row_outputs:
                assert sub[k].shape[0] == case.batch_sizes()[0]


def test_reference_route_is_scoped_and_float64():
    with subjects.reference_route() as route:
        assert route["attention"] == subjects.REFERENCE_BACKEND
        assert subjects.REFERENCE_BACKEND in registry.names("loss")
    assert subjects.REFERENCE_BACKEND not in registry.names("loss")


# ------------------------------------------------------------------------------------------------
# the matrix: negative controls
# ------------------------------------------------------------------------------------------------


def test_planted_faults_are_caught_by_the_code_that_passes_eager(small_shapes, planted):
    res = run_matrix("--subjects", "linear,rmsnorm,attention,lm-head-loss", "--dtypes", "fp32", "--modes", "default",
                     "--repeats", "8", "--backends",
                     "eager,planted-nondet,planted-nondet-bwd,planted-batch-variant,planted-nondet-dw")
    assert res.status == "complete"
    for subject in ("linear", "rmsnorm", "attention", "lm-head-loss"):
        c = cell(res, subject, "eager")
        assert c.status == "ok" and c.deterministic is True, (subject, c.verdict)
        assert "8 repeats" in c.verdict and c.missable_fraction == pytest.approx(checks.missable_fraction(8))
    assert cell(res, "rmsnorm", "eager").batch_invariant is True

    assert cell(res, "linear", "planted-nondet").deterministic is False
    assert "out" in differing(res, "linear", "planted-nondet")
    assert "NOT deterministic" in cell(res, "linear", "planted-nondet").verdict
    assert differing(res, "linear", "planted-nondet-bwd") == {"grad.weight"}  # forward and dX untouched
    assert differing(res, "rmsnorm", "planted-nondet-dw") == {"grad.norm.weight"}
    assert "grad.v" in differing(res, "attention", "planted-nondet-bwd")

    variant = cell(res, "linear", "planted-batch-variant")
    assert variant.deterministic is True and variant.batch_invariant is False
    bad = {(b.rows, b.tensor) for b in res.batch if b.backend == "planted-batch-variant" and not b.equal}
    assert (1, "out") in bad and (3, "out") in bad


def test_planted_loss_is_caught(small_shapes, planted):
    res = run_matrix("--subjects", "lm-head-loss", "--dtypes", "fp32", "--modes", "default", "--repeats", "5",
                     "--backends", "planted-nondet")
    assert cell(res, "lm-head-loss", "planted-nondet").deterministic is False
    assert "loss" in differing(res, "lm-head-loss", "planted-nondet")


def test_accuracy_is_reported_next_to_eager(small_shapes):
    res = run_matrix("--subjects", "mlp", "--dtypes", "fp32,bf16", "--modes", "default", "--repeats", "2",
                     "--backends", "eager")
    acc = {(a.dtype, a.tensor): a for a in res.accuracy}
    fp32, bf16 = acc[("fp32", "out")], acc[("bf16", "out")]
    assert 0 < fp32.rel_l2 < 1e-5 and 1e-4 < bf16.rel_l2 < 5e-2
    for a in acc.values():  # the eager backend is the eager baseline
        assert a.rel_l2 == a.eager_rel_l2 and a.max_ulp == a.eager_max_ulp
    timing = {t.phase: t for t in res.timings}
    assert set(timing) == {"fwd", "bwd", "fwd+bwd"} and all(t.median_s > 0 for t in timing.values())
    assert timing["fwd"].flops == res.subjects[0].flops_fwd > 0


def test_refusals_errors_and_nan_are_reported_not_raised(small_shapes, scoped_backends):
    def refuses(x, weight, bias=None):
        if torch.are_deterministic_algorithms_enabled():
            raise RuntimeError("test_linear does not have a deterministic implementation, but you set "
                               "'torch.use_deterministic_algorithms(True)'")
        return F.linear(x, weight, bias)

    def broken(x, weight, bias=None):
        if x.shape[0] > 64:  # passes the small dtype probe, fails on the subject's shape
            raise ValueError("shape too large for this test kernel")
        return F.linear(x, weight, bias)

    def nan_out(x, weight, bias=None):
        y = F.linear(x, weight, bias)
        mask = torch.zeros_like(y, dtype=torch.bool)
        mask[..., 0] = True
        return y + torch.where(mask, torch.tensor(float("nan"), dtype=y.dtype), torch.tensor(0.0, dtype=y.dtype))

    scoped_backends("linear", "test-refuses", refuses)
    scoped_backends("linear", "test-broken", broken)
    scoped_backends("linear", "test-nan", nan_out)
    res = run_matrix("--subjects", "linear", "--dtypes", "fp32", "--modes", "default,torch-det", "--repeats", "3",
                     "--backends", "test-refuses,test-broken,test-nan,eager")
    assert res.status == "complete"
    assert cell(res, "linear", "test-refuses").status == "ok"
    refused = cell(res, "linear", "test-refuses", mode="torch-det")
    assert refused.status == "refused" and "deterministic implementation" in refused.reason
    assert refused.verdict.startswith("refused:")
    broken_cell = cell(res, "linear", "test-broken")
    assert broken_cell.status == "error" and "shape too large" in broken_cell.reason
    nan_cell = cell(res, "linear", "test-nan")
    assert nan_cell.status == "ok" and nan_cell.nonfinite and nan_cell.deterministic is True
    assert "NaN" in nan_cell.verdict
    assert any(math.isnan(a.rel_l2) for a in res.accuracy if a.backend == "test-nan")
    assert cell(res, "linear", "eager", mode="torch-det").status == "ok"  # the run went on


def test_ctrl_c_marks_the_run_interrupted(small_shapes, scoped_backends):
    def interrupt(x, weight, bias=None):
        if x.shape[0] > 64:
            raise KeyboardInterrupt
        return F.linear(x, weight, bias)

    scoped_backends("linear", "test-interrupt", interrupt)
    res = run_matrix("--subjects", "linear", "--dtypes", "fp32", "--modes", "default", "--repeats", "2",
                     "--backends", "eager,test-interrupt")
    assert res.status == "interrupted"
    assert "linear / test-interrupt / fp32 / default" in res.stopped_at and "1 of 2 cells complete" in res.stopped_at
    assert [c.backend for c in res.cells] == ["eager"]


def test_backends_come_from_the_registry(small_shapes, scoped_backends):
    scoped_backends("rmsnorm", "test-extra", lambda x, w, eps: w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    scoped_backends("rmsnorm", "test-elsewhere", lambda x, w, eps: x, available=lambda d: "needs a test accelerator")
    args = build_parser().parse_args(["run", "--quick", "--device", "cpu", "--subjects", "rmsnorm"])
    plan = plan_from_args(args)
    assert "test-extra" in plan.backends["rmsnorm"] and "test-elsewhere" not in plan.backends["rmsnorm"]
    assert any("test-elsewhere" in s and "needs a test accelerator" in s for s in plan.skipped)
    args = build_parser().parse_args(["run", "--quick", "--device", "cpu", "--subjects", "rmsnorm",
                                      "--backends", "test-elsewhere"])
    with pytest.raises(InputError, match="needs a test accelerator; drop it from --backends"):
        plan_from_args(args)


def test_route_sends_other_ops_to_the_named_backend(small_shapes, scoped_backends):
    calls = []

    def counting(x, weight, bias=None):
        calls.append(x.shape)
        return F.linear(x, weight, bias)

    scoped_backends("linear", "test-counting", counting)
    res = run_matrix("--subjects", "attention-block", "--dtypes", "fp32", "--modes", "default", "--repeats", "2",
                     "--backends", "eager", "--route", "linear=test-counting")
    assert calls, "the attention block's projections did not use the routed linear backend"
    assert res.settings.route == {"linear": "test-counting"}
    assert res.subjects[0].route["linear"] == "test-counting"


def test_triton_backends_are_picked_up_by_name_and_their_twin_ratio_reported(small_shapes, monkeypatch):
    """Triton entries need no harness change: named, they run; their twin gives a cost ratio."""

    if "triton" not in registry.names("rmsnorm") or registry.get("rmsnorm", "triton").why_not("cpu"):
        pytest.skip("no runnable Triton rmsnorm here")
    twin = registry.get("rmsnorm", "triton").twin
    monkeypatch.setitem(subjects.SIZES["quick"], "rmsnorm", (8,))  # the interpreter is slow: 8 rows
    res = run_matrix("--subjects", "rmsnorm", "--dtypes", "fp32", "--modes", "default", "--repeats", "2",
                     "--backends", ",".join(["triton"] + ([twin] if twin else [])))
    c = cell(res, "rmsnorm", "triton")
    assert c.status == "ok" and c.deterministic is True, c.verdict
    acc = {a.tensor: a for a in res.accuracy if a.backend == "triton"}
    assert acc["out"].rel_l2 < 1e-5
    if twin:
        (row,) = [r for r in cost_rows(Index(res)) if r["backend"] == "triton"]
        assert row["twin"] == twin and row["twin_ratio"][0] > 0


def test_route_of_an_op_primary_for_one_subject_and_secondary_for_another(small_shapes, scoped_backends):
    """--route linear=X with attention-block (calls linear besides attention) and linear (linear is its axis):
    the route applies to attention-block only, and each subject records what was applied to it."""
    calls = []

    def counting(x, weight, bias=None):
        calls.append(x.shape)
        return F.linear(x, weight, bias)

    scoped_backends("linear", "test-counting", counting)
    res = run_matrix("--subjects", "attention-block,linear", "--dtypes", "fp32", "--modes", "default",
                     "--repeats", "2", "--backends", "eager", "--route", "linear=test-counting")
    assert res.status == "complete" and calls
    assert res.settings.route == {"linear": "test-counting"}
    routes = {s.subject: s.route for s in res.subjects}
    assert routes["attention-block"]["linear"] == "test-counting"
    assert "linear" not in routes["linear"]  # its linear op is the backend axis (eager here), not the route
    assert {c.backend for c in res.cells} == {"eager"}


@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen2.5-tiny"])
@pytest.mark.parametrize("name", list(subjects.SUBJECTS))
def test_subject_declares_the_ops_it_calls(small_shapes, name, preset):
    """Subject.calls(config) is what the harness checks --route against: it must be exactly what runs."""
    seen = set()

    def observer(fn, op, backend):
        seen.add(op)
        return fn

    config = PRESETS[preset]
    case = subjects.build_case(name, config, "quick", seed=0)
    inst = case.instantiate(torch.float32, torch.device("cpu"), {op: "eager" for op in registry.OPS})
    with registry.observe(observer):
        inst.run()
    sub = subjects.SUBJECTS[name]
    assert seen == set(sub.calls(config)) and sub.calls(config)[0] == sub.primary_op


@pytest.mark.parametrize("seed", [subjects.SEED_MIN, subjects.SEED_MAX], ids=["min", "max"])
def test_seed_range_ends_run(small_shapes, seed):
    res = run_matrix("--subjects", "linear", "--dtypes", "fp32", "--modes", "default", "--repeats", "2",
                     "--backends", "eager", "--seed", str(seed))
    assert res.status == "complete" and cell(res, "linear", "eager").status == "ok"


def test_interrupt_while_a_mode_is_entered_is_an_interrupted_run(small_shapes, scoped_backends, half_imported_inductor):
    """Ctrl-C while apply_mode calls torch.use_deterministic_algorithms (which imports torch._inductor.config on
    newer torch, 5-6 s into a run): the run is saved as interrupted with the cells so far, not failed with
    ``module 'torch._dynamo' has no attribute 'utils'``."""

    def arming(x, weight, bias=None):  # cell 1 (default mode) arms the trap; cell 2 enters torch-det
        if x.shape[0] > 64:  # the subject's shape, not the dtype probe's
            half_imported_inductor["armed"] = True
        return F.linear(x, weight, bias)

    scoped_backends("linear", "test-arming", arming)
    before = determinism_state()
    res = run_matrix("--subjects", "linear", "--dtypes", "fp32", "--modes", "default,torch-det", "--repeats", "2",
                     "--backends", "test-arming")
    half_imported_inductor["armed"] = False
    assert half_imported_inductor["interrupted"] == 1 and half_imported_inductor["failed"] == 0
    assert res.status == "interrupted" and res.error is None, (res.status, res.error)
    assert "linear / test-arming / fp32 / torch-det" in res.stopped_at and "1 of 2 cells complete" in res.stopped_at
    assert [(c.mode, c.status) for c in res.cells] == [("default", "ok")]
    assert determinism_state() == before


# ------------------------------------------------------------------------------------------------
# a backend a determinism mode switches off is refused by that mode; probes are per mode
# ------------------------------------------------------------------------------------------------


def _off_under_deterministic_algorithms(q, k, v, *, scale, causal=True, attn_mask=None):
    """What SDPA forced to cuDNN does under use_deterministic_algorithms(True): no kernel left, and an error
    that does not say why (torch's reason goes to a warning)."""
    if torch.are_deterministic_algorithms_enabled():
        raise RuntimeError("No available kernel. Aborting execution.")

    return eager_attention(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask)


def test_backend_switched_off_by_a_mode_is_refused_not_an_error(small_shapes, scoped_backends):
    scoped_backends("attention", "test-no-det-kernel", _off_under_deterministic_algorithms)
    res = run_matrix("--subjects", "attention", "--dtypes", "fp32", "--modes", "default,torch-det,hf-full",
                     "--repeats", "2", "--backends", "test-no-det-kernel")
    assert res.status == "complete"
    assert cell(res, "attention", "test-no-det-kernel").status == "ok"
    for mode in ("torch-det", "hf-full"):
        c = cell(res, "attention", "test-no-det-kernel", mode=mode)
        assert c.status == "refused", (c.status, c.reason)
        assert "RuntimeError: No available kernel" in c.reason and f"only under {mode}" in c.reason
        assert c.verdict == f"refused: {c.reason}"


def test_an_error_in_every_mode_stays_an_error(small_shapes, scoped_backends):
    """The probe is the evidence: a backend whose probes pass in every mode and whose cells then fail the same
    way under default and torch-det is an error in both, not a refusal by torch-det."""
    armed = []

    def broken_after_planning(q, k, v, *, scale, causal=True, attn_mask=None):
        if armed:
            raise RuntimeError("No available kernel. Aborting execution.")
        return q.clone()

    scoped_backends("attention", "test-broken", broken_after_planning)
    args = build_parser().parse_args(["run", "--quick", "--device", "cpu", "--time-repeats", "1", "--warmup", "0",
                                      "--subjects", "attention", "--dtypes", "fp32", "--modes", "default,torch-det",
                                      "--repeats", "2", "--backends", "test-broken"])
    plan = plan_from_args(args)
    assert not plan.mode_refused
    armed.append(True)
    res = harness.execute(plan, harness.new_result(plan, []))
    assert [c.status for c in res.cells] == ["error", "error"]


def test_probes_run_per_mode_and_dtype(small_shapes, scoped_backends, monkeypatch):
    """Support is probed under default and again under each selected mode, in each dtype: what a mode
    switches off is known before the run (plan.mode_refused), not taken from one cached answer."""
    scoped_backends("attention", "test-no-det-kernel", _off_under_deterministic_algorithms)
    seen = []
    real_probe = harness.probe

    def recording(op, name, dtype, device):
        seen.append((op, name, dtype, torch.are_deterministic_algorithms_enabled()))
        return real_probe(op, name, dtype, device)

    monkeypatch.setattr(harness, "probe", recording)
    plan = harness.make_plan(device="cpu", subjects=["attention"], backends=["eager", "test-no-det-kernel"],
                             dtypes=["fp32", "bf16"], modes=["default", "torch-det"], quick=True)
    for name in ("eager", "test-no-det-kernel"):
        for dt in (torch.float32, torch.bfloat16):
            assert {det for op, n, d, det in seen if (n, d) == (name, dt)} == {False, True}
    assert plan.mode_refused == {
        ("attention", "test-no-det-kernel", dt, "torch-det"): "RuntimeError: No available kernel. Aborting execution."
        for dt in ("fp32", "bf16")}
    assert not plan.unsupported  # it runs under default: not a dtype problem, and --backends named it


def test_sdpa_availability_is_cached_per_determinism_state():
    """The registry's SDPA availability probe is re-run when the determinism switches change (torch-det
    switches cuDNN attention off); it used to be one answer per device for the whole process."""

    backends._probe_sdpa_cached.cache_clear()
    available = registry.get("attention", "sdpa-math").available
    assert available(torch.device("cpu")) is None
    with apply_mode("torch-det"):
        assert available(torch.device("cpu")) is None
    with apply_mode("default"):
        assert available(torch.device("cpu")) is None
    info = backends._probe_sdpa_cached.cache_info()
    assert (info.misses, info.hits) == (2, 1)


def test_sdpa_refusal_reason_carries_torchs_warning(monkeypatch):
    """SDPA says why it switched a backend off in warnings; the availability reason keeps them, so a cell
    under torch-det reads as a refusal ('not deterministic')."""
    import warnings


    def refusing(kind):
        def fn(q, k, v, *, scale, causal=True, attn_mask=None):
            warnings.warn("CuDNN attention kernel not used because:")
            warnings.warn("cuDNN SDPA is not deterministic. (Triggered internally at sdp_utils.cpp:1)")
            raise RuntimeError("No available kernel. Aborting execution.")
        return fn

    monkeypatch.setattr(backends, "_forced_sdpa", refusing)
    backends._probe_sdpa_cached.cache_clear()
    try:
        reason = backends._probe_sdpa("MATH", "cpu", None)
    finally:
        backends._probe_sdpa_cached.cache_clear()
    assert reason == ("torch refused a float32 causal probe: No available kernel. Aborting execution. "
                      "(torch: cuDNN SDPA is not deterministic.)")
    assert is_refusal(BackendUnavailable(f"attention backend 'sdpa-cudnn' cannot run on cuda: {reason}"))


# ------------------------------------------------------------------------------------------------
# the run-wide environment (CUBLAS_WORKSPACE_CONFIG) and the fill of uninitialised memory
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modes, expected", [("default,hf-full", ":16:8"), ("default,torch-det", ":4096:8"),
                                             ("default,torch-det,hf-full", ":4096:8"), ("default", None)])
def test_workspace_config_is_set_before_the_first_cell_and_restored(small_shapes, scoped_backends, monkeypatch,
                                                                     modes, expected):
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    def watching(x, weight, bias=None):
        if x.shape[0] > 64:  # the subject's calls, not the probe's
            seen.append((os.environ.get("CUBLAS_WORKSPACE_CONFIG"), torch.are_deterministic_algorithms_enabled()))
        return F.linear(x, weight, bias)

    scoped_backends("linear", "test-watching", watching)
    res = run_matrix("--subjects", "linear", "--dtypes", "fp32", "--modes", modes, "--repeats", "2",
                     "--backends", "test-watching")
    assert res.status == "complete"
    assert seen[0] == (expected, False), "the first (default-mode) cell already runs with the run's value"
    default_calls = {v for v, det in seen if not det}
    assert default_calls == {expected}
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ, "restored (removed) after the run"
    rec = res.run_env
    assert rec["in_force"] == {"CUBLAS_WORKSPACE_CONFIG": expected}
    assert rec["inherited"] == {"CUBLAS_WORKSPACE_CONFIG": None}
    assert rec["set_by_run"] == {"CUBLAS_WORKSPACE_CONFIG": expected is not None}
    if "hf-full" in modes and expected != ":16:8":
        assert any("hf-full asks CUBLAS_WORKSPACE_CONFIG=:16:8" in n for n in rec["notes"])


def test_exported_workspace_config_is_kept(small_shapes, monkeypatch):
    import os

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    res = run_matrix("--subjects", "linear", "--dtypes", "fp32", "--modes", "default,torch-det", "--repeats", "2",
                     "--backends", "eager")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert res.run_env["in_force"] == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    assert res.run_env["set_by_run"] == {"CUBLAS_WORKSPACE_CONFIG": False}
    assert any("torch-det asks CUBLAS_WORKSPACE_CONFIG=:4096:8" in n for n in res.run_env["notes"])


def test_fill_of_uninitialised_memory_is_recorded_per_cell_and_mode(small_shapes):
    res = run_matrix("--subjects", "rmsnorm", "--dtypes", "fp32", "--modes", "default,torch-det,hf-full",
                     "--repeats", "2", "--backends", "eager")
    fill = {c.mode: c.fill_uninitialized_memory for c in res.cells}
    assert fill == {"default": False, "torch-det": True, "hf-full": True}
    assert {m["name"]: m["fill_uninitialized_memory"] for m in res.modes} == fill
