"""RNG use: every repeat of ``detbench run`` is reseeded, and a backend that draws from the default generator
is labelled "deterministic given the seed; consumes RNG" instead of passing silently.

Three rmsnorm backends, each checked by the same code:

* ``randperm-sum`` sums the squares of a row in an order drawn by ``torch.randperm`` on the global
  generator: the reseeding hides that its bits change from call to call, so it must be flagged;
* ``global-dropout`` drops out with ``F.dropout``, i.e. from the global generator too: flagged, and still
  deterministic given the seed (that is what the reseeding is for);
* ``seeded-dropout`` drops out with its own ``torch.Generator`` seeded from an explicit seed: it never
  touches the global generator, is deterministic as it stands, and must not be flagged.
"""

import pytest
import torch
import torch.nn.functional as F

from bench import checks, harness, subjects
from bench.cli import build_parser
from bench.cli.run import plan_from_args
from bench.compare import bitwise_equal
from bench.report import Index, status_line
from qwen_layers import registry
from qwen_layers.backends import eager_rmsnorm

DROPOUT_SEED = 1234


def randperm_sum_rmsnorm(x, weight, eps):
    """RMSNorm whose sum of squares runs over the columns in an order from torch.randperm (global generator)."""
    xf = x.float()
    total = torch.zeros(xf.shape[:-1], dtype=torch.float32, device=x.device)
    for i in torch.randperm(x.shape[-1]).tolist():
        total = total + xf[..., i] * xf[..., i]
    return weight * (xf * torch.rsqrt(total / x.shape[-1] + eps).unsqueeze(-1)).to(x.dtype)


def global_dropout_rmsnorm(x, weight, eps):
    return F.dropout(eager_rmsnorm(x, weight, eps), p=0.1, training=True)


def seeded_dropout_rmsnorm(x, weight, eps):
    """Dropout with its own generator, seeded by an explicit seed (as a fused kernel's philox seed argument)."""
    y = eager_rmsnorm(x, weight, eps)
    gen = torch.Generator(device=y.device).manual_seed(DROPOUT_SEED)
    keep = torch.rand(y.shape, generator=gen, device=y.device) >= 0.1
    return y * keep / 0.9


BACKENDS = {"randperm-sum": randperm_sum_rmsnorm, "global-dropout": global_dropout_rmsnorm,
            "seeded-dropout": seeded_dropout_rmsnorm}


@pytest.fixture(scope="module")
def result():
    """One tiny run of the three backends (rmsnorm, fp32, default mode, 3 repeats)."""
    with pytest.MonkeyPatch.context() as mp, registry.scoped():
        mp.setitem(subjects.SIZES, "quick", {**subjects.SIZES["quick"], "rmsnorm": (160,)})  # 160 tokens
        for name, fn in BACKENDS.items():
            registry.register("rmsnorm", name, fn, deterministic=True, origin="test")
        args = build_parser().parse_args(
            ["run", "--quick", "--device", "cpu", "--time-repeats", "1", "--warmup", "0", "--subjects", "rmsnorm",
             "--backends", ",".join(BACKENDS), "--dtypes", "fp32", "--modes", "default", "--repeats", "3"])
        plan = plan_from_args(args)
        yield harness.execute(plan, harness.new_result(plan, []))


def cell(res, backend):
    (c,) = [c for c in res.cells if c.backend == backend]
    return c


def test_the_randperm_kernel_really_depends_on_the_generator():
    """Without reseeding two calls give other bits: the reseeding is all that makes its repeats agree."""
    x, w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), torch.ones(64)
    torch.manual_seed(0)
    a = randperm_sum_rmsnorm(x, w, 1e-6)
    b = randperm_sum_rmsnorm(x, w, 1e-6)
    torch.manual_seed(0)
    assert not bitwise_equal(a, b) and bitwise_equal(a, randperm_sum_rmsnorm(x, w, 1e-6))


def test_generator_states_name_what_a_call_advanced():
    before = checks.rng_states("cpu")
    assert checks.rng_advanced(before, checks.rng_states("cpu")) == []
    torch.randperm(4)
    assert checks.rng_advanced(before, checks.rng_states("cpu")) == ["cpu"]
    before = checks.rng_states("cpu")
    torch.rand(3, generator=torch.Generator().manual_seed(1))
    assert checks.rng_advanced(before, checks.rng_states("cpu")) == []


def test_a_kernel_drawing_its_order_from_the_global_generator_is_flagged(result):
    c = cell(result, "randperm-sum")
    assert c.status == "ok" and c.deterministic is True  # reseeded: every repeat the same order
    assert c.rng_consumed == ["cpu"]
    assert c.verdict.startswith("deterministic given the seed; consumes RNG: the call advanced the cpu generator")
    v = Index(result).view(c)
    assert v.run_to_run_clauses == ["same ×3, given the seed", "consumes RNG (cpu)"]


def test_dropout_from_the_global_generator_is_deterministic_given_the_seed(result):
    c = cell(result, "global-dropout")
    assert c.deterministic is True and c.rng_consumed == ["cpu"]
    assert c.verdict.startswith("deterministic given the seed; consumes RNG")


def test_dropout_with_its_own_seeded_generator_is_not_flagged(result):
    c = cell(result, "seeded-dropout")
    assert c.status == "ok" and c.deterministic is True and c.rng_consumed == []
    assert c.verdict.startswith("bitwise identical in all 3 repeats")
    assert Index(result).view(c).run_to_run == "same ×3"


def test_the_status_line_names_the_cells_that_consume_rng(result):
    line = status_line(result)
    assert ("2 consuming RNG (deterministic given the seed) (rmsnorm/randperm-sum fp32 default, "
            "rmsnorm/global-dropout fp32 default)") in line, line
