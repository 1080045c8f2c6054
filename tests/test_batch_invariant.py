"""The batch-invariant mode (bench.invariant): the harness's per-op batch check under it, the ops' contracts,
scoping, KV-cache decoding, and the generate experiment with and without it."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import bench
from bench import harness
from bench.compare import assert_bitwise_equal
from bench.generate import make_plan, run
from bench.invariant import _overrides, batch_invariant, describe_mode, triton_mm
from bench.planted import planted_registered
from bench.subjects import build_case
from qwen_layers import build_model, get_preset, registry

CPU = torch.device("cpu")
# The subjects whose ops the mode overrides: every matmul, the RMSNorm mean, softmax, log-softmax, silu.
SUBJECTS = ["linear", "mlp", "rmsnorm", "attention", "attention-block", "decoder-layer", "lm-head-loss"]


def batch_check(subject: str, preset: str, route: dict, mode: bool):
    """The harness's own batch-invariance check (first k rows alone vs the full batch, forward and the
    batched inputs' gradients, k = 1, 3, 127) of one subject, with or without the mode around it."""
    case = build_case(subject, get_preset(preset), "quick")
    key = {"subject": subject, "backend": route.get(case.subject.primary_op, "eager"), "dtype": "fp32",
           "mode": "default"}
    records = []
    with batch_invariant() if mode else contextlib.nullcontext():
        inst = case.instantiate(torch.float32, CPU, route)
        torch.manual_seed(0)
        first = inst.run()
        ok = harness._batch_invariance(key, case, inst, first, 0, records)
    return ok, records


@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen2.5-tiny"])
@pytest.mark.parametrize("subject", SUBJECTS)
def test_harness_batch_check_passes_under_the_mode(small_shapes, subject, preset):
    ok, records = batch_check(subject, preset, {}, mode=True)
    assert records, "the check compared nothing"
    bad = [(r.tensor, r.rows, r.n_diff, r.max_ulp) for r in records if not r.equal]
    assert ok and not bad, f"{subject} under the batch-invariant mode: rows differ (tensor, k, n, ulp): {bad}"


@pytest.mark.parametrize("op", [
    pytest.param(lambda x, w: F.linear(x, w[:, :24], w[:, 24]), id="linear"),
    pytest.param(lambda x, w: x.pow(2).mean(-1, keepdim=True), id="mean"),
    pytest.param(lambda x, w: torch.softmax(x, -1), id="softmax"),
    pytest.param(lambda x, w: F.silu(x), id="silu"),
])
def test_a_rows_place_in_the_batch_does_not_matter_under_the_mode(op):
    """The harness's check keeps a row where it was (the first k rows); a prompt can sit in any row. Under
    the mode every row of a 37-row batch (rows 0..15 of a block, and the zero-padded last block) equals the
    same row computed alone, bit for bit."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(37, 24, generator=g), torch.randn(19, 25, generator=g)
    with batch_invariant():
        full = op(x, w)
        for j in range(37):
            assert_bitwise_equal(op(x[j:j + 1], w), full[j:j + 1], f"row {j}")


def test_the_same_check_catches_a_planted_batch_variant_linear_under_the_mode(small_shapes):
    """The negative control: a linear whose K-chunking follows the row count (bench.planted) stays
    batch-variant under the mode (its chunks are separate matmuls summed in Python), and the check says so."""
    with planted_registered():
        ok, records = batch_check("linear", "qwen3-tiny", {"linear": "planted-batch-variant"}, mode=True)
    assert ok is False and any(not r.equal for r in records)


@pytest.mark.parametrize("call", [
    pytest.param(lambda t: torch.mm(t["a"], t["b"]), id="mm"),
    pytest.param(lambda t: torch.mm(t["a"][:1], t["b"]), id="mm-1-row"),
    pytest.param(lambda t: torch.mm(t["a"][:0], t["b"]), id="mm-0-rows"),
    pytest.param(lambda t: torch.mm(t["a"].t().contiguous().t(), t["b"]), id="mm-transposed"),
    pytest.param(lambda t: F.linear(t["a"], t["b"].t(), t["bias"]), id="addmm-bias"),
    pytest.param(lambda t: torch.addmm(t["c"], t["a"], t["b"], beta=0.5, alpha=2.0), id="addmm-2d-beta-alpha"),
    pytest.param(lambda t: torch.bmm(t["q"], t["k"].transpose(1, 2)), id="bmm"),
    pytest.param(lambda t: torch.bmm(t["q"].bfloat16(), t["k"].transpose(1, 2).bfloat16()), id="bmm-bf16"),
    pytest.param(lambda t: torch.softmax(t["a"], -1), id="softmax"),
    pytest.param(lambda t: torch.softmax(t["q"], 1), id="softmax-dim1"),
    pytest.param(lambda t: torch.softmax(t["a"].bfloat16(), -1, dtype=torch.float32), id="softmax-bf16-to-fp32"),
    pytest.param(lambda t: torch.log_softmax(t["a"], -1), id="log_softmax"),
    pytest.param(lambda t: F.cross_entropy(t["a"], t["labels"], ignore_index=-100), id="cross_entropy"),
    pytest.param(lambda t: t["a"].pow(2).mean(-1, keepdim=True), id="mean-keepdim"),
    pytest.param(lambda t: t["q"].mean((0, 2)), id="mean-two-dims"),
    pytest.param(lambda t: t["q"].mean(dtype=torch.float64), id="mean-all-fp64"),
    pytest.param(lambda t: t["q"].sum(1), id="sum"),
    pytest.param(lambda t: (t["a"] > 0).sum(-1), id="sum-bool"),
    pytest.param(lambda t: t["labels"].sum(0, keepdim=True), id="sum-int"),
    pytest.param(lambda t: t["a"][:0].sum(-1), id="sum-empty"),
    pytest.param(lambda t: F.silu(t["a"]), id="silu"),
    pytest.param(lambda t: F.silu(t["a"].bfloat16()), id="silu-bf16"),
])
def test_overrides_keep_each_ops_contract(call):
    """Under the mode every overridden op returns what the op returns: shape, dtype, strides' contiguity,
    and the values within the rounding of a reordered sum (an output of the wrong dtype or size is a
    memory error in the caller, not just a wrong number)."""
    g = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(37, 24, generator=g), "b": torch.randn(24, 19, generator=g),
         "bias": torch.randn(19, generator=g), "c": torch.randn(37, 19, generator=g),
         "q": torch.randn(3, 5, 8, generator=g), "k": torch.randn(3, 7, 8, generator=g),
         "labels": torch.randint(0, 24, (37,), generator=g)}
    t["labels"][::5] = -100
    want = call(t)
    with batch_invariant():
        got = call(t)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous() == want.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-2 if want.dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if want.dtype == torch.bfloat16 else 1e-5, equal_nan=True)


def _kernels() -> dict[str, str]:
    """The CPU kernel of each overridden op as torch's dispatch table names it (where it was registered)."""
    return {op: next(line for line in torch._C._dispatch_dump_table(f"aten::{op}").splitlines()
                     if line.startswith("CPU:")) for op in _overrides(16)}


def test_the_mode_is_scoped_and_undone_after_an_exception():
    """Inside, the CPU kernels of the overridden ops are the mode's and the registry resolves every attention
    backend to eager; after the block (also when it raised) the original kernels and resolution are back."""
    before = _kernels()
    sdpa = registry.resolve("attention", "sdpa", CPU)
    with pytest.raises(RuntimeError, match="boom"):
        with batch_invariant() as mode:
            inside = _kernels()
            assert registry.resolve("attention", "sdpa", CPU) is registry.get("attention", "eager").fn
            raise RuntimeError("boom")
    assert all(inside[op] != before[op] for op in before), (inside, before)
    assert _kernels() == before
    assert registry.resolve("attention", "sdpa", CPU) is sdpa
    assert mode == describe_mode(16) and sorted(mode.aten_ops) == sorted(f"aten.{op}" for op in before)
    assert bench.batch_invariant is batch_invariant


def test_rows_must_be_positive():
    with pytest.raises(ValueError, match="positive integer"):
        with batch_invariant(rows=0):
            pass


@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen2.5-tiny"])
def test_kv_cache_decoding_equals_recomputation_under_the_mode(preset):
    """Under the mode a row's every op is computed the same way whatever the row count, so projecting only
    the newest token (cached decoding) and projecting the whole sequence again (recomputation) give the
    same logits at every step, bit for bit (without the mode only the prefill step must agree:
    tests/test_generate.py)."""
    cfg = get_preset(preset)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, cfg.vocab_size, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    with batch_invariant():
        cached = model.generate(ids, mask, max_new_tokens=5, use_cache=True)
        recomputed = model.generate(ids, mask, max_new_tokens=5, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert_bitwise_equal(cached.logits, recomputed.logits, "per-step logits, cached vs recomputed")


def test_experiment_distinct_completions_drop_to_one_under_the_mode():
    """qwen2.5-tiny with near-tied token pairs (--near-ties 2e-7): one prompt in batches of 1..8, with and
    without left padding. Why this model: with the seeded weights as drawn the best token leads the next by
    far more than the batch moves the logits (a few ulp: MKL's sgemm blocks by the row count, so a row's
    x @ W.T changes in the last bits with the batch size), and greedy decoding never flips; near-ties
    put a twin token within an ulp or two of the best, as a trained vocabulary's near-synonyms do. Without
    the mode the completions differ; with it every completion and every logit equals the prompt alone's."""
    plan = make_plan(model="qwen2.5-tiny", near_ties=2e-7, prompt_len=8, new_tokens=8, completions=9, max_batch=8,
                     padding="none,left", invariant="off,on", threads=1, out=None)
    result = run(plan)
    standard, invariant = result.summary
    assert (standard.mode, invariant.mode) == ("standard", "batch-invariant")
    assert standard.completions == invariant.completions == 9
    assert standard.logits_differ > 0, "the prompt's logits never changed with the batch: this CPU is batch-invariant"
    assert standard.distinct > 1, standard.verdict
    assert invariant.distinct == 1 and invariant.logits_differ == 0 and invariant.comparable, invariant.verdict
    assert result.cost is not None and math.isfinite(result.cost.ratio_median)


def test_the_cuda_matmul_is_the_registrys_batch_invariant_triton_kernel():
    """What the mode runs for mm/addmm on CUDA (here through the Triton interpreter on CPU tensors): a @ b +
    bias to float32 rounding, and a row's bits the same in 1, 3 and 37-row products."""
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(37, 24, generator=g), torch.randn(24, 19, generator=g), torch.randn(19, generator=g)
    full = triton_mm(a, b, bias)
    torch.testing.assert_close(full, torch.addmm(bias, a, b), rtol=1e-5, atol=1e-5)
    for k in (1, 3):
        assert_bitwise_equal(triton_mm(a[:k], b, bias), full[:k], f"rows 0..{k - 1}")
