"""kernels/hf.py: detbench kernels inside transformers' Qwen3 / Qwen2 models.

Tiny random models built from configs in the test (hidden 64, 2 layers, 4 query heads, 2 kv heads,
head dim 16, vocab 256), float32; on a CPU-only machine every Triton kernel runs in the interpreter.
One batch carries a full row, a right-padded row and a left-padded row.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bench.compare import assert_bitwise_equal, bitwise_equal
from qwen_layers.registry import REGISTRY, UnknownBackend

from . import kernel_checks as kc
from .kernel_checks import DEVICE, assert_repeats_bitwise, repeat_mismatches

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[hf]')")
pytest.importorskip("triton", reason="package triton not installed (Linux only)")

from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config  # noqa: E402

from bench.planted import rmsnorm_nondet_dw
from kernels import hf  # noqa: E402

pytestmark = kc.requires_triton

FAMILIES = {"qwen3": Qwen3Config, "qwen2": Qwen2Config}
B, S, VOCAB = 3, 8, 256
REPEATS = 3  # whole-model forward + backward under the interpreter is slow; the kernels' own tests do 20

# Full drop-in (attention, RMSNorm, SwiGLU, rotary) against float64 transformers eager: its logit
# and gradient errors may be at most FACTOR x those of float32 eager, plus a floor of FLOOR_ULPS
# float32 ulps of the largest reference value. Reasons: each kernel is within a few ulps of eager per
# op (tests/test_kernel_*.py) but sums in its own order (online softmax, tree sums over rows), and two
# layers compound those differences, so 4x eager's float32 error. The floor covers results where
# eager happens to be almost exact (the loss can be exact) and gradients that are sums over tokens
# with cancellation (biases, norm weights), whose error scales with the summed terms rather than the
# smaller result: 64 ulps is 8e-6 relative, far below what a real defect (a wrong mask, a missing
# term, a wrong rotation) moves these results (percents).
FACTOR, FLOOR_ULPS = 4.0, 64.0


def config(family: str, **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.3)
    kw.update(overrides)
    return FAMILIES[family](**kw)


def build(family: str, attn: str, state=None, **overrides):
    """A transformers causal LM (own config copy: transformers writes the attention choice into it)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config(family, **overrides)), attn_implementation=attn)
    if state is not None:
        model.load_state_dict(state)
    return model.to(DEVICE).train()


def padded_batch():
    """Row 0 full, row 1 right-padded (3 pads), row 2 left-padded (2 pads); pads carry no loss.

    transformers scores the logits at t against labels[t + 1], so the first real token of the
    left-padded row is unlabelled too: otherwise the last pad position's logits would enter the loss,
    and those rows are backend-defined (eager: mean of V; Triton and SDPA: zeros).
    """
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 3:] = 0
    mask[2, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 2] = -100
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def forward_backward(model, ids, mask, labels):
    """Logits, loss and every parameter gradient (by name) of one training step, grads zeroed first."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def step_outputs(model, batch) -> dict:
    """One training step's logits, loss and gradients as one {name: tensor} mapping."""
    logits, loss, grads = forward_backward(model, *batch)
    return {"logits": logits, "loss": loss, **{f"grad of {n}": g for n, g in grads.items()}}


@pytest.fixture(scope="module")
def detbench_attention():
    """transformers knows "detbench" (Triton attention) while this module's tests run."""
    REGISTRY.get("attention", "triton")  # the Triton attention kernel must be registered
    try:
        yield hf.register_attention("triton")
    finally:
        hf.unregister_attention()


@pytest.fixture(scope="module", params=list(FAMILIES))
def dropin_run(request, detbench_attention):
    """Eager float32, eager float64 and the full detbench drop-in, one padded training step each."""
    family = request.param
    eager = build(family, "eager")
    state = eager.state_dict()
    batch = padded_batch()
    eager_out = forward_backward(eager, *batch)
    # float64 reference through SDPA's math kernel: transformers' eager attention casts float64 scores
    # to float32 for its softmax, which turns its float64 "minimum" mask into -inf and the left-padding
    # rows (no key to attend) into NaN; SDPA's math path gives those rows zeros instead.
    ref_out = forward_backward(build(family, "sdpa", state).double(), *batch)
    model = build(family, detbench_attention, state)
    with hf.apply_detbench_kernels(model) as handle:
        det_out = forward_backward(model, *batch)
    return dict(family=family, handle=handle, batch=batch, eager=eager_out, ref=ref_out, det=det_out, model=model,
                state=state)


def assert_close_to_reference(out, ref64, eager, what):
    kc.assert_close_to_reference(out, ref64, eager, what, factor=FACTOR, floor_ulps=FLOOR_ULPS,
                                 rounding_dtype=torch.float32)


# -------------------------------------------------------------------------------------------------
# the full drop-in
# -------------------------------------------------------------------------------------------------


def test_dropin_patches_every_module(dropin_run):
    handle, layers = dropin_run["handle"], 2
    norms_per_layer = 4 if dropin_run["family"] == "qwen3" else 2  # Qwen3 adds q_norm and k_norm
    assert handle.counts == {"rmsnorm": layers * norms_per_layer + 1, "swiglu": layers, "rope": layers}
    assert handle.backends == {"rmsnorm": "triton", "swiglu": "triton", "rope": "triton"}
    assert not handle.active and "reverted" in repr(handle)


def test_logits_loss_and_gradients_close_to_eager(dropin_run):
    """At real (non-pad) positions, and for every gradient: the padded batch's training step."""
    keep = dropin_run["batch"][1].bool()
    (logits, loss, grads), (e_logits, e_loss, e_grads), (r_logits, r_loss, r_grads) = (
        dropin_run["det"], dropin_run["eager"], dropin_run["ref"])
    assert_close_to_reference(logits[keep], r_logits[keep], e_logits[keep], "logits at real positions")
    assert_close_to_reference(loss, r_loss, e_loss, "loss")
    assert set(grads) == set(e_grads)
    for name, g in grads.items():
        assert_close_to_reference(g, r_grads[name], e_grads[name], f"grad of {name}")


def test_gradients_reach_every_parameter(dropin_run):
    grads = dropin_run["det"][2]
    params = dict(dropin_run["model"].named_parameters())
    assert set(grads) == set(params), f"no gradient: {sorted(set(params) - set(grads))}"
    for name, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"gradient of {name} is zero or not finite"


def test_left_padding_rows_stay_finite(dropin_run):
    """Left-padding query rows attend no key; the Triton kernel gives them zeros, never NaN."""
    assert torch.isfinite(dropin_run["det"][0]).all()


@pytest.mark.slow
def test_repeats_are_bitwise_equal(detbench_attention):
    """Logits, loss and every gradient of the padded training step, 3 runs, bitwise equal."""
    model = build("qwen3", detbench_attention)
    batch = padded_batch()
    with hf.apply_detbench_kernels(model):
        assert_repeats_bitwise(lambda: step_outputs(model, batch), None, "the patched training step", REPEATS)


# -------------------------------------------------------------------------------------------------
# the patch: routing, negative control, revert, isolation, refusals
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def planted_rmsnorm():
    """rmsnorm/planted-nondet-dw in the registry for one test, removed afterwards."""

    REGISTRY.register("rmsnorm", "planted-nondet-dw", rmsnorm_nondet_dw, deterministic=False, origin="planted",
                      replace=True, description="negative control: random-order dW")
    try:
        yield "planted-nondet-dw"
    finally:
        REGISTRY.unregister("rmsnorm", "planted-nondet-dw")


def test_repeat_check_catches_a_planted_rmsnorm(planted_rmsnorm):
    """Negative control: patching the norms with a random-order-dW backend makes repeats differ.

    Also shows the patch routes through the named backend (the eager model alone repeats exactly).
    """
    model = build("qwen3", "eager")
    batch = padded_batch()
    with hf.apply_detbench_kernels(model, rmsnorm=planted_rmsnorm, swiglu=False, rope=False):
        found = repeat_mismatches(lambda: step_outputs(model, batch), repeats=REPEATS + 3)  # first + 5 repeats
    heads = [f.split(":", 1)[0] for f in found]  # "repeat {i} grad of {name}"
    assert any(" grad of " in h and "norm" in h for h in heads), (
        "the repeat check did not flag a backend whose dW is summed in random order")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_revert_restores_eager_bits(family):
    """Eager before, patched, reverted: the reverted model's step is bitwise the one before."""
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    module = {"qwen3": modeling_qwen3, "qwen2": modeling_qwen2}[family]
    original_rope = module.apply_rotary_pos_emb
    model = build(family, "eager")
    batch = padded_batch()
    before = forward_backward(model, *batch)
    handle = hf.apply_detbench_kernels(model)
    try:  # a failure in here must not leave the module-level rotary patch for the tests after this one
        assert module.apply_rotary_pos_emb is not original_rope
        patched = forward_backward(model, *batch)
        assert not bitwise_equal(patched[0], before[0]), "the patch changed nothing: are the kernels called?"
        handle.revert()
        handle.revert()  # idempotent
    finally:
        handle.revert()
    assert module.apply_rotary_pos_emb is original_rope
    assert not any("forward" in m.__dict__ for m in model.modules())
    after = forward_backward(model, *batch)
    assert_bitwise_equal(before[0], after[0], "logits after revert")
    for name, g in before[2].items():
        assert_bitwise_equal(g, after[2][name], f"grad of {name} after revert")


def test_other_models_of_the_class_are_untouched():
    """The rotary dispatcher only acts inside patched attention modules; an unpatched twin keeps its bits."""
    batch = padded_batch()
    other = build("qwen3", "eager")
    with torch.no_grad():
        before = other(input_ids=batch[0], attention_mask=batch[1]).logits
        with hf.apply_detbench_kernels(build("qwen3", "eager")):
            during = other(input_ids=batch[0], attention_mask=batch[1]).logits
    assert_bitwise_equal(before, during, "unpatched model's logits while another model is patched")


def test_two_handles_share_the_rotary_patch():
    """The module-level rotary dispatcher stays until the last handle using it is reverted."""
    from transformers.models.qwen3 import modeling_qwen3

    original = modeling_qwen3.apply_rotary_pos_emb
    a = hf.apply_detbench_kernels(build("qwen3", "eager"), rmsnorm=False, swiglu=False)
    try:
        b = hf.apply_detbench_kernels(build("qwen3", "eager"), rmsnorm=False, swiglu=False)
        try:
            a.revert()
            assert modeling_qwen3.apply_rotary_pos_emb is not original
        finally:
            b.revert()
        assert modeling_qwen3.apply_rotary_pos_emb is original
    finally:
        a.revert()  # idempotent: a no-op when the revert above ran


def test_context_manager_reverts_after_an_exception():
    model = build("qwen2", "eager")
    with pytest.raises(RuntimeError, match="boom"):
        with hf.apply_detbench_kernels(model):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_refusals_leave_the_model_untouched():
    model = build("qwen3", "eager")
    with pytest.raises(ValueError, match="only transformers' Qwen2 and Qwen3 models"):
        hf.apply_detbench_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(UnknownBackend, match="unknown backend 'nope' for op 'rmsnorm'"):
        hf.apply_detbench_kernels(model, rmsnorm="nope")
    with pytest.raises(TypeError, match="swiglu must be True, False or a backend name"):
        hf.apply_detbench_kernels(model, swiglu=3)
    gelu = build("qwen3", "eager", hidden_act="gelu")
    with pytest.raises(ValueError, match="not SiLU; pass swiglu=False"):
        hf.apply_detbench_kernels(gelu)
    assert not any("forward" in m.__dict__ for m in gelu.modules())
    with hf.apply_detbench_kernels(model):
        with pytest.raises(ValueError, match="already has an instance-level forward"):
            hf.apply_detbench_kernels(model)


# -------------------------------------------------------------------------------------------------
# the attention entry: plumbing and masks
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_plumbing_with_eager_backend_is_bitwise_transformers(family):
    """register_attention(backend="eager"): transformers' masks arrive intact, padded rows included.

    detbench's eager attention reproduces transformers' eager math, so any mask or layout slip in the
    plumbing shows as a bit difference, at every position including the fully masked pad rows.
    """
    eager = build(family, "eager")
    name = hf.register_attention("eager", name="detbench-eager-test")
    try:
        ours = build(family, name, eager.state_dict())
        batch = padded_batch()
        a, b = forward_backward(eager, *batch), forward_backward(ours, *batch)
    finally:
        hf.unregister_attention("detbench-eager-test")
    assert_bitwise_equal(a[0], b[0], "logits")
    for n, g in a[2].items():
        assert_bitwise_equal(g, b[2][n], f"grad of {n}")


def test_registration_and_removal():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = hf.register_attention("eager", name="detbench-reg-test")
    try:  # unregistered even when an assertion fails, so later tests see transformers' own table
        assert name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping
        model = build("qwen2", "eager")
        model.set_attn_implementation(name)  # switching an existing model works too
        assert model.config._attn_implementation == name
    finally:
        hf.unregister_attention(name)
    assert name not in AttentionInterface._global_mapping and name not in AttentionMaskInterface._global_mapping
    with pytest.raises(UnknownBackend, match="unknown backend 'nope' for op 'attention'"):
        hf.register_attention("nope")


def test_bool_mask_conversion():
    keep = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    keep[1, ..., 0] = False
    assert hf._bool_mask(None, 4, 4, 2) is None
    assert torch.equal(hf._bool_mask(keep, 4, 4, 2), keep)
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(hf._bool_mask(additive, 4, 4, 2), keep)
    assert torch.equal(hf._bool_mask(torch.where(keep, 0.0, float("-inf")), 4, 4, 2), keep)
    with pytest.raises(ValueError, match="additive mask carrying biases"):
        hf._bool_mask(additive + 0.5, 4, 4, 2)
    with pytest.raises(ValueError, match=r"\(B, 1, Sq, Sk\) mask"):
        hf._bool_mask(keep[:, 0], 4, 4, 2)
    with pytest.raises(ValueError, match="does not cover 4 queries x 5 keys"):
        hf._bool_mask(keep, 4, 5, 2)
    with pytest.raises(TypeError, match="bool or float mask"):
        hf._bool_mask(keep.long(), 4, 4, 2)


def test_attention_refuses_what_it_cannot_do():
    fn = hf._make_attention_forward("eager")
    module = torch.nn.Module()
    q, k = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 3, 16)
    with pytest.raises(ValueError, match="no dropout"):
        fn(module, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="does not support sliding_window=4"):
        fn(module, q, k, k, None, sliding_window=4)
    with pytest.raises(ValueError, match="query length == key length"):
        fn(module, q[:, :, :1], k, k, None)
    out, weights = fn(module, q, k, k, None, scaling=0.25, sliding_window=None)
    assert out.shape == (1, 3, 4, 16) and weights is None
