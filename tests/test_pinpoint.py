"""``bench.pinpoint``: replay and trace-compare name the op that is nondeterministic, and nothing else.

Negative controls: bench/planted.py backends planted in exactly one place of the tiny model, and a
custom aten op that adds OS-random noise (nondeterminism at aten level, as a GPU atomic would be).

How sure the planted tests are: see tests/planted_checks.py (``OrderSpy``; every planted test asserts
its miss probability is below ``MAX_MISS`` = 1e-6 before asserting the finding).
"""

from __future__ import annotations

import json
import random
import types

import pytest
import torch
from torch import nn

import qwen_layers.registry as reg
from bench import cli, pinpoint, sft
from bench.compare import bits
from bench.data import batch_for_step, read_token_file
from bench.pinpoint.bounds import percent
from bench.pinpoint.fingerprint import Fingerprints
from bench.pinpoint.locate import _PHASE
from bench.planted import planted_registered
from qwen_layers.registry import REGISTRY

from .planted_checks import MAX_MISS, PLACES, OrderSpy, nan_checkpoint, token_file

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


class PlantedSFT:
    """The tiny model with one planted place, its batches, and SFT steps as a callable."""

    def __init__(self, tmp_path, plant: str | None, data=(2, 16, 4, 6), lr: float = 1e-3,
                 model: str = "qwen3-tiny") -> None:
        bs, length, prompt, steps = data
        path = token_file(tmp_path / "tokens.jsonl", n_seqs=bs * steps, length=length, prompt=prompt)
        self.spec = sft.parse_model(model)
        self.batches = read_token_file(path, vocab_size=256, batch_size=bs)
        self.plants = [sft.parse_plant(plant)] if plant else []
        self.steps, self.lr, self.path = steps, lr, path

    def setup(self):
        model = sft.build(self.spec, attention="eager", dtype=torch.float32, device="cpu", plants=self.plants)
        return model, sft.make_optimizer(model, lr=self.lr)

    def run(self, model, opt):
        return [sft.sft_step(model, opt, batch_for_step(self.batches, k))[0] for k in range(self.steps)]


@pytest.fixture
def planted_registry():
    with planted_registered():
        yield


# ------------------------------------------------------------------------------------------------
# the planted places: replay and trace-compare name the op, its module path and its phase
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("place", list(PLACES))
def test_replay_names_the_planted_op(tmp_path, planted_registry, place):
    plant, (level, op, module, phase), data = PLACES[place]
    job = PlantedSFT(tmp_path, plant, data)
    spy = OrderSpy()
    with spy.installed():
        report = pinpoint.replay(job.run, *job.setup())
    miss = spy.miss_probability()
    assert miss < MAX_MISS, f"test too weak: it would miss with probability {miss:.2e}"
    found = [(f.level, f.op, f.module, f.phase) for f in report.findings]
    assert found == [(level, op, module, phase)], str(report)
    f = report.findings[0]
    assert f.n_diff > 0 and f.max_ulp > 0
    assert "order in which Python combined them changed" in f.note
    assert not report.errors


def compare_planted(job: "PlantedSFT", **kw):
    """Two runs of the planted job compared (compare_runs(..., **kw)), checking that the planted op's random
    orders were strong enough: the runs agree only if each of run 0's calls agreed by chance."""
    spy = OrderSpy()
    n_calls = []

    def setup():
        n_calls.append(len(spy.calls))
        return job.setup()

    with spy.installed():
        report = pinpoint.compare_runs(job.run, runs=2, setup=setup, **kw)
    miss = spy.miss_probability(spy.calls[:n_calls[1]])
    assert miss < MAX_MISS, f"test too weak: it would miss with probability {miss:.2e}"
    return report


@pytest.mark.slow
@pytest.mark.parametrize("place", list(PLACES))
def test_trace_compare_names_the_planted_op(tmp_path, planted_registry, place):
    plant, (level, op, module, phase), data = PLACES[place]
    report = compare_planted(PlantedSFT(tmp_path, plant, data))
    assert not report.identical
    root = report.root_cause
    kinds = {"registry": "registry", "autograd.Function": "autograd.Function"}
    assert (root["kind"], root["op"], root["module"], root["phase"]) == (kinds[level], op, module, phase), str(report)
    pair = report.pairs[0]
    assert pair.control_flow is None
    first = pair.first_difference
    assert first["kind"] == "aten" and first["module"] == module and first["inside"] == op
    assert "combined in another order" in pair.first_difference_note
    if phase == "forward" and module:
        assert pair.first_module["module"] == module and pair.first_module["index"] > root["index"]


@pytest.mark.slow
def test_sft_planted_divergence_is_seen_by_both_methods_from_the_cli(tmp_path, capsys):
    """`detbench pinpoint` on a planted SFT step: both methods name the op (6 steps: miss <= 12^-6)."""
    path = token_file(tmp_path / "t.jsonl", n_seqs=12, length=16, prompt=4)
    spy = OrderSpy()
    with spy.installed():
        rc = cli.main(["pinpoint", "--model", "qwen3-tiny", "--data", str(path), "--batch-size", "2", "--steps", "6",
                       "--lr", "1e-3", "--device", "cpu", "--json",
                       "--plant", "model.layers.1.mlp.down_proj=linear/planted-nondet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    # replay's calls come in (call, replay) pairs, then the two traced runs: the replay alone bounds the miss
    assert spy.miss_probability(spy.calls[:12]) < MAX_MISS
    assert [(f["op"], f["module"], f["phase"]) for f in out["replay"]["findings"]] == [
        ("linear/planted-nondet", "model.layers.1.mlp.down_proj", "forward")]
    assert out["compare"]["root_cause"]["op"] == "linear/planted-nondet"
    assert out["compare"]["root_cause"]["module"] == "model.layers.1.mlp.down_proj"
    assert "planted-nondet" not in REGISTRY.names("linear")  # registered for the command only


@pytest.mark.slow
def test_cli_pinpoint_tables_name_the_planted_op(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long names in narrow tables
    path = token_file(tmp_path / "t.jsonl", n_seqs=12, length=16, prompt=4)
    spy = OrderSpy()
    with spy.installed():
        rc = cli.main(["pinpoint", "--data", str(path), "--batch-size", "2", "--steps", "6", "--lr", "1e-3",
                       "--device", "cpu", "--method", "replay",
                       "--plant", "model.layers.0.post_attention_layernorm=rmsnorm/planted-nondet-dw"])
    assert rc == 0 and spy.miss_probability() < MAX_MISS
    out = capsys.readouterr().out
    assert "_RMSNormNondetDWBackward" in out and "post_attention_layernorm" in out and "backward" in out


# ------------------------------------------------------------------------------------------------
# no false positives
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_false_positives_on_the_unplanted_model(tmp_path):
    """Eager fp32 tiny model, 4 SFT steps: replay flags nothing; 4 traced runs are identical."""
    job = PlantedSFT(tmp_path, None, (2, 16, 4, 4))
    report = pinpoint.replay(job.run, *job.setup())
    assert report.clean, str(report)
    assert report.ops_replayed > 100 and report.units_replayed > 40
    cmp = pinpoint.compare_runs(job.run, runs=4, setup=job.setup)
    assert cmp.identical, str(cmp)
    assert len(set(cmp.events)) == 1 and cmp.events[0] > 1000
    assert cmp.root_cause is None
    _assert_bound_stated(report, 1, job.steps)
    _assert_bound_stated(cmp, 3, job.steps)
    assert "fingerprints of differing tensors collide with probability" in str(cmp) and "2^-33" in str(cmp)


def _assert_bound_stated(report, per_call: int, steps: int) -> None:
    """A clean report says what it rests on: k (compared calls) per op class, and for the rarest class the
    difference rate that could be missed with 5% probability, (1-p)^(k x per_call) = 0.05."""
    calls = report.calls_compared if per_call == 1 else report.calls_per_run
    assert calls["registry"]["loss/eager"] == steps  # one loss per SFT step
    k = min(n for ops in calls.values() for n in ops.values())
    b = report.bound
    assert b["rarest"]["calls"] == k and b["rarest"]["comparisons"] == k * per_call
    assert b["missable_rate"] == pytest.approx(1 - 0.05 ** (1 / (k * per_call)))
    text = str(report)
    n = f"{k} call(s)" + (f" x {per_call} = {k * per_call} comparisons" if per_call > 1 else "")
    assert (f"the rarest op class, {b['rarest']['op']}, k = {n}: a difference occurring in fewer than "
            f"{percent(b['missable_rate'])} of its calls could be missed with 5% probability") in text, text
    assert f"loss/eager {steps}" in text
    assert json.loads(report.to_json())["bound"]["rarest"] == b["rarest"]


def test_no_false_positives_replaying_every_op_in_exact_mode(tmp_path):
    job = PlantedSFT(tmp_path, None, (2, 8, 2, 2))
    report = pinpoint.replay(job.run, *job.setup(), all_ops=True)
    assert report.clean and "order_free" not in report.skipped
    cmp = pinpoint.compare_runs(job.run, runs=2, setup=job.setup, exact=True)
    assert cmp.identical, str(cmp)


# ------------------------------------------------------------------------------------------------
# aten-level nondeterminism (the GPU-atomics case) on any callable, with module path and phase
# ------------------------------------------------------------------------------------------------

_sysrand = random.SystemRandom()


@torch.library.custom_op("detbench_test::noisy_sum", mutates_args=())
def noisy_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim, with OS-random low mantissa bits in element 0: like an atomic reduction,
    it disagrees with itself. Two calls agree with probability 2^-22 (the XOR mask), so each test below
    that compares two calls misses with probability 2.4e-7."""
    out = x.sum(-1).contiguous()
    out.view(torch.int32).view(-1)[0] ^= _sysrand.getrandbits(22)
    return out


@noisy_sum.register_fake
def _(x):
    return x.new_empty(x.shape[:-1])


class NoisyFn(torch.autograd.Function):
    """Identity forward; backward goes through the noisy aten op."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return noisy_sum(g.unsqueeze(-1))  # = g, up to the noise in element 0


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        return noisy_sum(self.inner(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(NoisyFn.apply(x))


def test_replay_catches_an_aten_op_in_forward_with_its_module_path():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8)
    report = pinpoint.replay(lambda: net.block(x), roots={"net": net})
    (f,) = report.findings
    assert (f.level, f.op, f.module, f.phase) == ("aten", "detbench_test.noisy_sum.default", "net.block", "forward")
    assert f.n_diff == 1 and f.n_total == 4 and f.inside is None


def test_replay_catches_an_aten_op_inside_a_custom_backward_at_both_levels():
    """The noisy op in a custom Function's backward: reported as an aten op (inside the node) and,
    because the node's output changed, at the custom-Function level too."""
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8, requires_grad=True)

    def step():
        net(x).sum().backward()

    report = pinpoint.replay(step, roots={"net": net})
    by_level = {f.level: f for f in report.findings}
    assert by_level["aten"].op == "detbench_test.noisy_sum.default"
    assert by_level["aten"].phase == "backward" and by_level["aten"].inside == "NoisyFnBackward"
    assert by_level["autograd.Function"].op == "NoisyFnBackward"
    assert all(f.module == "net" for f in report.findings), str(report)


def test_trace_compare_catches_an_aten_op_and_counts_the_spread():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8)

    def fn():
        y = net.block(x)
        return (y * 2).exp().sum()

    report = pinpoint.compare_runs(fn, runs=3, roots={"net": net})
    assert not report.identical
    root = report.root_cause
    assert (root["kind"], root["op"], root["module"], root["phase"]) == (
        "aten", "detbench_test.noisy_sum.default", "net.block", "forward")
    pair = report.pairs[0]
    assert pair.first_module["module"] == "net.block"
    assert pair.differing_ops_after_root >= 3 and pair.ops_after_root >= pair.differing_ops_after_root
    exact = pinpoint.compare_runs(fn, runs=2, exact=True, roots={"net": net})
    assert exact.root_cause["op"] == "detbench_test.noisy_sum.default"
    assert exact.pairs[0].root_cause_diff["n_diff"] == 1


class NoisySGD(torch.optim.SGD):
    """SGD whose update of every parameter goes through the noisy op (an optimizer-phase fault)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(noisy_sum(p.grad.unsqueeze(-1)), alpha=-group["lr"])


def test_optimizer_phase_is_named_with_the_parameter():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4))
    opt = NoisySGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 4)

    def step():
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()

    report = pinpoint.replay(step, roots={"net": net})
    phases = {(f.op, f.phase, f.module) for f in report.findings}
    assert ("detbench_test.noisy_sum.default", "optimizer", "net.0.weight") in phases, str(report)


# ------------------------------------------------------------------------------------------------
# replay leaves the run exactly as a plain run: in-place, out=, views, random ops
# ------------------------------------------------------------------------------------------------


def mixed_ops(x, out):
    a = torch.nn.functional.dropout(x, p=0.5, training=True)  # random: generator restored for the replay
    b = a.clone()
    b.add_(1.0)                                                # in-place
    torch.mul(b, 2.0, out=out)                                 # out=
    v = out.view(-1)[::2]                                      # views
    v.mul_(3.0)                                                # in-place through a view
    r = torch.randn(3)                                         # random factory
    s = torch.empty(5).fill_(2.0)                              # uninitialised, then filled
    return a.sum() + out.sum() + r.sum() + s.sum(), torch.bernoulli(torch.full((4,), 0.5))


def test_replay_leaves_results_and_generator_state_as_a_plain_run():
    x = torch.randn(6, 5)
    torch.manual_seed(7)
    plain_out = torch.zeros(6, 5)
    plain = mixed_ops(x, plain_out)
    plain_state = torch.get_rng_state()
    torch.manual_seed(7)
    rep_out = torch.zeros(6, 5)
    report = pinpoint.replay(mixed_ops, x, rep_out)
    assert report.clean, str(report)
    for a, b in zip(plain, report.value):
        assert torch.equal(bits(a), bits(b))
    assert torch.equal(bits(plain_out), bits(rep_out))
    assert torch.equal(torch.get_rng_state(), plain_state)
    assert report.skipped.get("view", 0) > 0 and report.skipped.get("uninitialised", 0) >= 1


def test_trace_leaves_results_as_a_plain_run_and_is_deterministic():
    x = torch.randn(6, 5)
    torch.manual_seed(3)
    plain = mixed_ops(x, torch.zeros(6, 5))
    report = pinpoint.compare_runs(mixed_ops, x, torch.zeros(6, 5), runs=3, seed=3)
    assert report.identical, str(report)
    for a, b in zip(plain, report.value):
        assert torch.equal(bits(a), bits(b))


def test_every_skipped_op_kind_is_documented():
    x = torch.randn(6, 5)
    report = pinpoint.replay(mixed_ops, x, torch.zeros(6, 5))
    for reason in report.skipped:
        assert reason in pinpoint.SKIP_REASONS or reason in pinpoint.SKIP_NAMESPACES
    assert set(report.to_dict()["skip_reasons"]) == set(report.skipped)


# ------------------------------------------------------------------------------------------------
# fingerprints
# ------------------------------------------------------------------------------------------------


def _fp(t, exact=False):
    f = Fingerprints(exact)
    d = f.value(t)
    return f.resolver()(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool])
def test_fingerprints_see_every_single_bit(dtype):
    """Flipping any one bit of any element changes the fingerprint (including the top bit of the upper
    32-bit half of a 64-bit word, the case a plain int64 dot product would see only half the time)."""
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(37, 11, generator=gen) * 100).to(dtype)
    ref = _fp(base)
    assert _fp(base.clone()) == ref
    raw = base.view(torch.uint8).reshape(-1)
    n = raw.numel()
    for byte in sorted({0, 1, 3, 4, 7, n // 2, n // 2 + 3, n - 13, n - 5, n - 1}):
        for bit in (0, 7):
            t = base.clone()
            t.view(torch.uint8).reshape(-1)[byte] ^= (1 << bit)
            assert _fp(t) != ref, (byte, bit)


def test_fingerprints_distinguish_signed_zero_and_nan_payloads():
    z = torch.zeros(100)
    nz = z.clone()
    nz[51] = -0.0
    assert _fp(z) != _fp(nz)
    a = torch.full((100,), float("nan"))
    b = a.clone()
    b.view(torch.int32)[77] += 1
    assert _fp(a) != _fp(b)


def test_fingerprints_are_reproducible_integers():
    """The same values give the same fingerprint, also when they arrive through another layout."""
    t = torch.randn(64, 33)
    assert _fp(t) == _fp(t.t().contiguous().t().contiguous())
    f = Fingerprints(False)
    d = f.value(t)
    assert d[0] == "h" and all(isinstance(v, int) for v in d[3] + d[4])


# ------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reports_serialise_to_json_and_print(tmp_path, planted_registry):
    plant, _, data = PLACES["linear-fwd"]
    job = PlantedSFT(tmp_path, plant, data)
    rep = pinpoint.replay(job.run, *job.setup())
    cmp = pinpoint.compare_runs(job.run, runs=2, setup=job.setup)
    for r in (rep, cmp):
        d = json.loads(r.to_json())
        assert d["method"] in ("replay", "compare")
        text = str(r)
        assert "linear/planted-nondet" in text and "model.layers.1.mlp.down_proj" in text
    assert json.loads(cmp.to_json())["collision_bound"].startswith("fingerprints")


def test_pinpoint_leaves_no_hooks_or_wrappers_behind():
    from torch.nn.modules import module as nn_module


    before = (reg.resolve, "resolve" in reg.REGISTRY.__dict__, torch.autograd.Function.__dict__["apply"],
              len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks))

    def boom():
        nn.Linear(2, 2)(torch.randn(1, 2))
        raise RuntimeError("boom")

    for method in (pinpoint.replay, pinpoint.trace):
        with pytest.raises(RuntimeError, match="boom"):
            method(boom)
    after = (reg.resolve, "resolve" in reg.REGISTRY.__dict__, torch.autograd.Function.__dict__["apply"],
             len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks))
    assert after == before


def test_phase_context_restores():
    assert _PHASE.get() is None
    with pinpoint.phase("optimizer"):
        assert _PHASE.get() == "optimizer"
    assert _PHASE.get() is None


def test_pinpoint_cli_on_a_harness_subject(capsys, monkeypatch):
    assert cli.main(["pinpoint", "--subject", "rmsnorm", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["replay"]["clean"] and out["compare"]["identical"]
    assert out["replay"]["bound"]["rarest"]["calls"] >= 1 and out["compare"]["bound"]["comparisons_per_call"] == 1
    monkeypatch.setenv("COLUMNS", "400")
    assert cli.main(["pinpoint", "--subject", "rmsnorm", "--device", "cpu", "--units", "modules"]) == 0
    text = capsys.readouterr().out
    assert text.count("bound: the rarest op class") == 2 and text.count("could be missed with 5% probability") == 2
    assert "calls compared per op class" in text and "calls per run per op class" in text and "2^-33" in text


@pytest.mark.parametrize("argv,msg", [
    (["--subject", "nope"], "unknown"),
    (["--runs", "1"], "--runs"),
    (["--steps", "0"], "--steps"),
    (["--dtype", "fp32,bf16"], "one value"),
    (["--units", "all"], "--units 'all': choose one of ops, leaves, modules"),
    (["--plant", "model.layers.9.mlp=linear/planted-nondet"], "no module"),
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999 is out of range"),
    (["--data-seed", str(2 ** 64)], f"--data-seed {2 ** 64} is out of range"),
    (["--subject", "rmsnorm", "--seed", str(-2 ** 63 - 1)], f"--seed {-2 ** 63 - 1} is out of range"),
])
def test_pinpoint_cli_bad_input(capsys, argv, msg):
    assert cli.main(["pinpoint", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------
# non-finite values: never "agreed with itself" / "identical" over NaN
# ------------------------------------------------------------------------------------------------

NAN_PARAM = "model.layers.0.mlp.down_proj.weight"
NAN_PLANT = "model.layers.1.mlp.down_proj=linear/planted-nondet"


def test_replay_over_a_nan_weight_is_not_comparable(tmp_path, planted_registry):
    """A NaN weight and a planted nondeterministic down_proj after it: every planted sum is NaN, so the
    planted op agrees with itself; the report says not comparable and where the NaN came from."""
    job = PlantedSFT(tmp_path, NAN_PLANT, (2, 16, 4, 1), model=str(nan_checkpoint(tmp_path / "ckpt", param=NAN_PARAM)))
    report = pinpoint.replay(job.run, *job.setup())
    assert not report.comparable and not report.clean
    nan = report.non_finite.nan
    assert (nan["op"], nan["module"], nan["phase"], nan["source"]) == (
        "aten.mm.default", "model.layers.0.mlp.down_proj", "forward", "input")
    assert NAN_PARAM in nan["input"]
    text = report.summary()
    assert text.startswith("replay: not comparable") and NAN_PARAM in text and "agreed with itself" not in text
    d = json.loads(report.to_json())
    assert d["comparable"] is False and d["clean"] is False and d["non_finite"]["nan"]["source"] == "input"


def test_trace_compare_over_a_nan_weight_is_not_comparable(tmp_path, planted_registry):
    job = PlantedSFT(tmp_path, NAN_PLANT, (2, 16, 4, 1), model=str(nan_checkpoint(tmp_path / "ckpt", param=NAN_PARAM)))
    report = pinpoint.compare_runs(job.run, runs=2, setup=job.setup)
    assert all(p.identical for p in report.pairs)  # the case: the NaN bits agree
    assert not report.comparable and not report.identical
    nan = report.non_finite[0].nan
    assert (nan["kind"], nan["module"], nan["phase"], nan["source"]) == (
        "aten", "model.layers.0.mlp.down_proj", "forward", "input")
    assert NAN_PARAM in nan["input"]
    text = report.summary()
    assert text.startswith("trace-compare: not comparable") and NAN_PARAM in text and "identical" not in text
    d = json.loads(report.to_json())
    assert d["comparable"] is False and d["identical"] is False


class Overflow(nn.Module):
    """exp overflows to inf from finite inputs; inf - inf is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        y = (self.inner(x) * 1000).exp()
        return y - y


def _overflow_job():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), Overflow())
    x = torch.randn(4, 8)
    return net, x


def _assert_overflow_found(nf, unit: str) -> None:
    assert (nf.inf["op"], nf.inf["module"], nf.inf["phase"], nf.inf["source"]) == (
        "aten.exp.default", "net.1", "forward", "produced")
    assert (nf.nan["op"], nf.nan["module"], nf.nan["phase"], nf.nan["source"]) == (
        "aten.sub.Tensor", "net.1", "forward", "produced")
    assert nf.inf["index"] < nf.nan["index"]
    text = nf.sentence(unit)
    assert "aten.sub.Tensor" in text and "aten.exp.default" in text and "from finite inputs" in text


def test_replay_names_the_op_that_made_nan_from_finite_inputs():
    net, x = _overflow_job()
    report = pinpoint.replay(lambda: net(x), roots={"net": net})
    assert not report.comparable and report.findings == []
    _assert_overflow_found(report.non_finite, "op")
    assert "aten.sub.Tensor" in report.summary() and "agreed with itself" not in report.summary()


def test_trace_compare_names_the_event_that_made_nan_from_finite_inputs():
    net, x = _overflow_job()
    report = pinpoint.compare_runs(lambda: net(x), runs=2, roots={"net": net})
    assert not report.comparable and not report.identical
    for nf in report.non_finite:
        _assert_overflow_found(nf, "event")
    assert "aten.sub.Tensor" in report.summary()


def masked_softmax(x):
    mask = torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool).triu(1)
    return x.masked_fill(mask, float("-inf")).softmax(-1)  # the -inf entries become exact zeros


def test_infinities_of_a_mask_leave_replay_comparable():
    x = torch.randn(2, 5, 5)
    report = pinpoint.replay(masked_softmax, x, all_ops=True)
    assert report.comparable and report.clean, str(report)
    assert report.non_finite.inf["op"] == "aten.masked_fill.Scalar" and report.non_finite.inf["source"] == "input"


def test_infinities_of_a_mask_leave_trace_compare_identical():
    x = torch.randn(2, 5, 5)
    report = pinpoint.compare_runs(masked_softmax, x, runs=2)
    assert report.comparable and report.identical, str(report)


def test_a_non_finite_result_is_not_comparable():
    x = torch.full((3,), 1e30)
    report = pinpoint.compare_runs(lambda: (x * x).sum(), runs=2)  # inf, and no NaN anywhere
    assert not report.comparable and report.non_finite[0].value == "inf"
    assert report.non_finite[0].nan is None and report.non_finite[0].inf["op"] == "aten.mul.Tensor"
    assert pinpoint.replay(lambda: (x * x).sum()).comparable is False


@pytest.mark.slow
def test_cli_pinpoint_over_a_nan_checkpoint_says_not_comparable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    ckpt = nan_checkpoint(tmp_path / "ckpt", param=NAN_PARAM)
    out_dir = tmp_path / "reports"
    rc = cli.main(["pinpoint", "--model", str(ckpt), "--device", "cpu", "--steps", "1", "--seq-len", "16",
                   "--plant", NAN_PLANT, "--out", str(out_dir)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "replay: not comparable" in out and "trace-compare: not comparable" in out and NAN_PARAM in out
    assert "agreed with itself" not in out and "identical" not in out
    (path,) = out_dir.iterdir()
    rec = json.loads(path.read_text())
    assert rec["replay"]["comparable"] is False and rec["replay"]["clean"] is False
    assert rec["compare"]["comparable"] is False and rec["compare"]["identical"] is False


# ------------------------------------------------------------------------------------------------
# reports of a function returning its loss; setup's return value
# ------------------------------------------------------------------------------------------------


def _loss_fn():
    torch.manual_seed(0)
    net = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    return (lambda: net(x).square().mean()), net


@pytest.mark.parametrize("method", ["replay", "compare"])
def test_reports_serialise_when_fn_returns_a_loss_that_requires_grad(method):
    fn, net = _loss_fn()
    report = pinpoint.replay(fn) if method == "replay" else pinpoint.compare_runs(fn, runs=2)
    assert report.value.requires_grad
    d = json.loads(report.to_json())
    assert d["method"] == method and "value" not in d
    assert report.to_dict()["method"] == method and str(report)


@pytest.mark.parametrize("returned", [None, 3, "model"], ids=["None", "int", "str"])
def test_compare_runs_setup_must_return_a_tuple_of_arguments(returned):
    with pytest.raises(TypeError, match=r"setup must return a tuple of the arguments for fn .*got "):
        pinpoint.compare_runs(lambda *a: None, runs=2, setup=lambda: returned)


# ------------------------------------------------------------------------------------------------
# module units: nondeterminism written in Python inside a user's own module
# ------------------------------------------------------------------------------------------------


def shuffled_forward(self, x):
    """A Linear forward as a user might write it: x @ W.T summed over 4 K-chunks in an order drawn from the
    OS on every call (seeding torch does not tame it). Every mm and add in it is deterministic on its own.
    The partial products are kept in ``self.spy`` (an OrderSpy) for the miss probability."""
    parts = [x[..., s] @ self.weight[:, s].T for s in torch.arange(self.in_features).chunk(4)]
    self.spy.calls.append([p.detach().clone() for p in parts])
    order = list(range(len(parts)))
    _sysrand.shuffle(order)
    total = parts[order[0]]
    for i in order[1:]:
        total = total + parts[i]
    return total if self.bias is None else total + self.bias


def _shuffle(module: nn.Linear) -> OrderSpy:
    module.spy = OrderSpy()
    module.forward = types.MethodType(shuffled_forward, module)
    return module.spy


@pytest.mark.slow
def test_replay_names_python_random_order_in_a_transformers_module_by_its_path(tmp_path):
    """The issue's case, as a new user would meet it: transformers' Qwen2 model whose down_proj.forward sums
    K-chunks in an OS-random order. Replay with module units (the default) names the module; replaying ops
    and registry calls only (units="ops") sees every op agree with itself."""
    job = PlantedSFT(tmp_path, None, (2, 16, 4, 6), model="hf:qwen2.5-tiny")
    model, opt = job.setup()
    spy = _shuffle(model.model.layers[1].mlp.down_proj)
    report = pinpoint.replay(job.run, model, opt)
    miss = spy.miss_probability()
    assert len(spy.calls) == 2 * job.steps  # each forward call and its replay
    assert miss < MAX_MISS, f"test too weak: it would miss with probability {miss:.2e}"
    found = [(f.level, f.op, f.module, f.phase) for f in report.findings]
    assert found == [("module", "Linear", "model.layers.1.mlp.down_proj", "forward")], str(report)
    f = report.findings[0]
    assert f.n_diff > 0 and f.max_ulp > 0 and "order in which Python combined them changed" in f.note
    assert not report.errors and not report.not_replayable

    model, opt = job.setup()
    _shuffle(model.model.layers[1].mlp.down_proj)

    def two_steps(m, o):  # enough to show it: no op disagrees with itself in any step
        return [sft.sft_step(m, o, batch_for_step(job.batches, k))[0] for k in range(2)]

    without = pinpoint.replay(two_steps, model, opt, units="ops")
    assert without.clean and without.module_units_replayed == 0, str(without)


class ShuffledLinear(nn.Linear):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.spy = OrderSpy()

    forward = shuffled_forward


def test_replay_names_a_random_order_leaf_module_of_a_plain_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), ShuffledLinear(32, 16))
    x = torch.randn(6, 16)

    def steps():
        for _ in range(6):
            net(x).square().mean().backward()

    report = pinpoint.replay(steps, roots={"net": net})
    miss = net[2].spy.miss_probability()
    assert miss < MAX_MISS, f"test too weak: it would miss with probability {miss:.2e}"
    assert [(f.level, f.op, f.module, f.phase) for f in report.findings] == [
        ("module", "ShuffledLinear", "net.2", "forward")], str(report)
    assert 1 <= report.findings[0].count <= 6  # the calls whose two orders gave other bits (each: 11/12)
    assert report.calls_compared["module"] == {"Linear": 6, "ReLU": 6, "ShuffledLinear": 6}
    assert pinpoint.replay(steps, roots={"net": net}, units="ops").clean  # every op agrees with itself


class Mixture(nn.Module):
    """A non-leaf module whose own code sums its submodules' outputs in an OS-random order; ``shared``
    is called twice per call."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.shared = nn.Linear(16, 16)
        self.spy = OrderSpy()

    def forward(self, x):
        parts = [e(x) for e in self.experts] + [self.shared(x), self.shared(2 * x)]
        self.spy.calls.append([p.detach().clone() for p in parts])
        _sysrand.shuffle(parts)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total


def test_units_modules_names_a_random_order_in_a_parent_modules_own_code():
    """units="modules" replays every module; a module's replay reruns only its own code (the Linears answer
    with their first run's outputs: each ran once per call, hooks included), and names the parent. Leaf units
    cannot see it: each Linear agrees with itself."""
    torch.manual_seed(0)
    net = nn.Sequential(Mixture(), nn.Tanh())
    x = torch.randn(4, 16)
    ran = []
    for m in net.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, args, out: ran.append(mod))

    def steps():
        for _ in range(4):
            net(x).sum().backward()

    assert pinpoint.replay(steps, roots={"net": net}).clean  # leaves: the Linears and Tanh agree
    ran.clear()
    net[0].spy.calls.clear()
    report = pinpoint.replay(steps, roots={"net": net}, units="modules")
    miss = net[0].spy.miss_probability()
    assert miss < MAX_MISS, f"test too weak: it would miss with probability {miss:.2e}"
    assert [(f.level, f.op, f.module) for f in report.findings] == [("module", "Mixture", "net.0")], str(report)
    assert "order in which Python combined them changed" in report.findings[0].note
    assert len(ran) == 4 * 5  # the submodules' forwards did not run again in the parent's replay
    assert report.calls_compared["module"]["Sequential"] == 4 and not report.errors


class Stateful(nn.Module):
    """Buffers written in forward (BatchNorm's running statistics), an in-place op on its input, dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.bn(self.lin(x))
        return self.drop(nn.functional.relu_(h)).sum(-1)


def stateful_step(n: int):
    """(step, net, ...): ``n`` Stateful nets with the same weights and buffers, and a step (forward,
    backward, forward again) on one fixed input."""
    torch.manual_seed(0)
    nets = [Stateful() for _ in range(n)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    x = torch.randn(6, 8)

    def step(net):
        net(x).square().mean().backward()
        return net(x)

    return (step, *nets)


@pytest.mark.parametrize("units", ["leaves", "modules"])
def test_module_replays_leave_results_buffers_and_generator_state_as_a_plain_run(units):
    step, plain, replayed = stateful_step(2)
    torch.manual_seed(5)
    want = step(plain)
    want_rng = torch.get_rng_state()
    torch.manual_seed(5)
    report = pinpoint.replay(step, replayed, units=units)
    assert report.clean and report.module_units_replayed >= 6, str(report)
    assert torch.equal(bits(report.value), bits(want)) and torch.equal(torch.get_rng_state(), want_rng)
    for (name, a), b in zip(plain.state_dict().items(), replayed.state_dict().values()):
        assert torch.equal(bits(a), bits(b)), name  # running statistics updated once per call, not twice
    for a, b in zip(plain.parameters(), replayed.parameters()):
        assert torch.equal(bits(a.grad), bits(b.grad))


def test_ops_that_update_running_statistics_run_once_on_them():
    """aten.native_batch_norm writes running_mean and running_var although its schema marks neither as
    written: replayed op by op (units="ops") it must replay on copies, and trace must describe both the
    statistics it wrote and its outputs."""
    step, plain, replayed, traced = stateful_step(3)
    torch.manual_seed(5)
    want = step(plain)
    torch.manual_seed(5)
    report = pinpoint.replay(step, replayed, units="ops")
    torch.manual_seed(5)
    tr = pinpoint.trace(step, traced)
    assert report.clean and report.calls_compared["aten"]["aten.native_batch_norm.default"] == 2, str(report)
    for net, got in ((replayed, report.value), (traced, tr.value)):
        assert torch.equal(bits(got), bits(want))
        for (name, a), b in zip(plain.state_dict().items(), net.state_dict().values()):
            assert torch.equal(bits(a), bits(b)), name  # running statistics updated once per call, not twice
    bn = [e for e in tr.events if e.op == "aten.native_batch_norm.default"]
    assert len(bn) == 2 and all(e.outputs == ["float32[8]", "float32[8]", "float32[6, 8]", "float32[8]",
                                              "float32[8]"] for e in bn)


class Counting(nn.Module):
    """Rebinds an attribute in forward, and runs the noisy aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return noisy_sum(x * 2)


class WritesWeight(nn.Linear):
    def forward(self, x):
        self.weight.data.mul_(1.0)
        return noisy_sum(super().forward(x))


class Cache:
    def __init__(self) -> None:
        self.items: list = []


class TakesCache(nn.Module):
    def forward(self, x, cache):
        cache.items.append(x) if isinstance(cache, Cache) else cache.append(x)
        return noisy_sum(x)


_NOT_REPLAYABLE = {
    "attribute": (Counting, lambda m, x: m(x), "it sets attribute(s) calls in forward"),
    "parameter": (lambda: WritesWeight(8, 8), lambda m, x: m(x), "it writes its parameter(s) weight in place"),
    "positional": (TakesCache, lambda m, x: m(x, Cache()), "it takes a Cache argument"),
    "keyword": (TakesCache, lambda m, x: m(x, cache=Cache()), "its keyword argument cache is a Cache"),
    "keyword-list": (TakesCache, lambda m, x: m(x, cache=[]), "its keyword argument cache is a list, which its "
                                                              "forward may have changed"),
}


@pytest.mark.parametrize("case", list(_NOT_REPLAYABLE))
def test_a_module_that_cannot_be_replayed_is_named_and_its_ops_are_still_replayed(case):
    """Not skipped silently: the report says which module and why, and the nondeterministic aten op inside it
    is still found (its ops are replayed one by one, after the fact when the reason shows only then)."""
    make, call, reason = _NOT_REPLAYABLE[case]
    torch.manual_seed(0)
    m = make()
    x = torch.randn(3, 8)
    report = pinpoint.replay(lambda: [call(m, x) for _ in range(2)], roots={"m": m}, units="modules")
    (entry,) = report.not_replayable
    assert entry["module"] == "m" and entry["calls"] == 2 and reason in entry["reason"], entry
    assert entry["ops_not_compared"] == 0
    assert [(f.level, f.op, f.module) for f in report.findings] == [
        ("aten", "detbench_test.noisy_sum.default", "m")], str(report)
    assert report.findings[0].count == 2  # both calls (each agrees with itself with probability 2^-22)
    assert reason in str(report) and not report.errors


def test_replay_units_must_be_known():
    with pytest.raises(ValueError, match="units must be one of ops, leaves, modules; got 'all'"):
        pinpoint.replay(lambda: None, units="all")


@pytest.mark.slow
def test_replay_names_an_op_planted_into_a_transformers_model(tmp_path, planted_registry):
    """--plant on an hf: model: the planted registry call is named at the module path, at registry level
    (inside the Linear's module unit, whose replay gets the call's recorded output back)."""
    job = PlantedSFT(tmp_path, "model.layers.1.mlp.down_proj=linear/planted-nondet", (2, 16, 4, 6),
                     model="hf:qwen3-tiny")
    spy = OrderSpy()
    with spy.installed():
        report = pinpoint.replay(job.run, *job.setup())
    miss = spy.miss_probability()
    assert miss < MAX_MISS, f"test too weak: it would miss with probability {miss:.2e}"
    assert [(f.level, f.op, f.module, f.phase) for f in report.findings] == [
        ("registry", "linear/planted-nondet", "model.layers.1.mlp.down_proj", "forward")], str(report)


class Raises(nn.Module):
    def forward(self, x):
        raise ValueError("refused")


def test_a_forward_that_raises_closes_its_module_call(recwarn):
    """torch calls the global always-call hook without kwargs when a forward raises: the module's call is
    closed all the same (its path no longer labels the ops after it; its unit is dropped), with no warning."""
    net = nn.ModuleDict({"bad": Raises(), "good": nn.Linear(4, 4)})
    x = torch.randn(2, 4)

    def fn():
        with pytest.raises(ValueError, match="refused"):
            net["bad"](x)
        return noisy_sum(net["good"](x))  # run at the root

    for units in ("leaves", "modules"):
        report = pinpoint.replay(fn, roots={"net": net}, units=units)
        assert [(f.op, f.module) for f in report.findings] == [("detbench_test.noisy_sum.default", "")], str(report)
    assert not [w for w in recwarn if "always_call" in str(w.message)]
