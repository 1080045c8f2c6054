"""The backend registry: availability, refusal without fallback, third-party registration."""

from __future__ import annotations

import threading

import pytest
import torch

from qwen_layers import MLP, build_model, get_preset, registry, set_backends
from qwen_layers.backends import eager_attention, eager_linear
from qwen_layers.registry import OPS, REGISTRY, BackendUnavailable, Registry, UnknownBackend

ATTENTION_NAMES = ["eager", "sdpa", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                   "flash-attn", "flash-attn-det"]


def test_every_op_has_eager():
    for op in OPS:
        assert "eager" in REGISTRY.names(op), op
        assert REGISTRY.get(op, "eager").is_available("cpu")


def test_attention_entries():
    names = REGISTRY.names("attention")
    for n in ATTENTION_NAMES:
        assert n in names


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_cuda_only_backends_say_why_on_cpu():
    assert REGISTRY.get("attention", "sdpa-cudnn").why_not("cpu") == "needs a CUDA device"
    assert REGISTRY.get("attention", "sdpa-efficient").why_not("cpu") == "needs a CUDA device"
    with pytest.raises(BackendUnavailable, match="sdpa-cudnn.*cannot run on cpu: needs a CUDA device"):
        REGISTRY.resolve("attention", "sdpa-cudnn", "cpu")


def test_flash_attn_reason_when_missing():
    import importlib.util

    b = REGISTRY.get("attention", "flash-attn")
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash_attn not installed" in b.why_not("cuda")
    assert b.twin == "flash-attn-det"


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownBackend, match="registered: .*eager.*sdpa"):
        REGISTRY.get("attention", "nope")
    with pytest.raises(UnknownBackend, match="ops are: attention"):
        REGISTRY.get("softmax", "eager")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks refusal on a CPU-only machine")
def test_model_refuses_unavailable_backend_without_fallback():
    """Choosing a backend that cannot run raises its reason; nothing silently runs eager instead."""
    model = build_model(get_preset("qwen3-tiny"), backends={"attention": "sdpa-cudnn"})
    with pytest.raises(BackendUnavailable, match="needs a CUDA device"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_sdpa_backends_agree_with_eager_on_cpu():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    ref = eager_attention(q, k, v, scale=0.25)
    for name in REGISTRY.available("attention", "cpu"):
        out = REGISTRY.resolve("attention", name, "cpu")(q, k, v, scale=0.25)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=name)


def test_third_party_registration_and_per_op_choice():
    """A user's own linear is chosen for one model by name and really runs."""
    calls = []

    def my_linear(x, weight, bias=None):
        calls.append(tuple(x.shape))
        return eager_linear(x, weight, bias)

    registry.register("linear", "my-linear", my_linear, deterministic=True, description="test")
    try:
        b = REGISTRY.get("linear", "my-linear")
        assert b.origin == "third-party" and b.is_available("cpu")
        model = build_model(get_preset("qwen3-tiny"), backends={"linear": "my-linear"})
        ref = build_model(get_preset("qwen3-tiny"))
        ids = torch.randint(0, 256, (2, 5))
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
        # 7 projections per layer x 2 layers + the LM head
        assert len(calls) == 7 * 2 + 1
    finally:
        registry.unregister("linear", "my-linear")
    assert "my-linear" not in REGISTRY.names("linear")


def test_decorator_registration_with_availability():
    reg = Registry()

    @reg.register("rmsnorm", "gpu-only", available=lambda d: None if d.type == "cuda" else "needs a CUDA device")
    def fn(x, w, eps):
        return x

    assert reg.get("rmsnorm", "gpu-only").why_not("cpu") == "needs a CUDA device"
    with pytest.raises(BackendUnavailable):
        reg.resolve("rmsnorm", "gpu-only", "cpu")


def test_duplicate_registration_refused():
    reg = Registry()
    reg.register("swiglu", "x", lambda g, u: g)
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        reg.register("swiglu", "x", lambda g, u: u)
    reg.register("swiglu", "x", lambda g, u: u, replace=True)


def test_broken_probe_is_a_reason_not_a_crash():
    reg = Registry()

    def probe(device):
        raise OSError("driver exploded")

    reg.register("loss", "broken", lambda *a, **k: None, available=probe)
    assert "driver exploded" in reg.get("loss", "broken").why_not("cpu")


def test_set_backends_on_one_module():
    """A choice made for one module's subtree reaches that module only."""
    seen = []

    def spy(x, weight, bias=None):
        seen.append(tuple(weight.shape))
        return eager_linear(x, weight, bias)

    registry.register("linear", "spy", spy)
    try:
        cfg = get_preset("qwen3-tiny")
        model = build_model(cfg)
        set_backends(model.model.layers[1].mlp.down_proj, {"linear": "spy"})
        model(torch.randint(0, cfg.vocab_size, (1, 4)))
        assert seen == [(cfg.hidden_size, cfg.intermediate_size)]
        assert model.model.layers[0].mlp.down_proj.backends["linear"] == "eager"
        with pytest.raises(UnknownBackend):
            set_backends(model.model.layers[1].mlp, {"linear": "no-such"})
    finally:
        registry.unregister("linear", "spy")


def test_module_rejects_unknown_choice():
    with pytest.raises(UnknownBackend, match="unknown backend 'fast'"):
        MLP(get_preset("qwen3-tiny"), backends={"swiglu": "fast"})


def test_observer_sees_resolves_in_its_context_only():
    """registry.observe: every resolve in the block (module shorthand and REGISTRY alike) goes through the
    observer; another thread, the code after the block and the table itself are untouched."""
    seen = []

    def observer(fn, op, name):
        def call(*args, **kwargs):
            seen.append((op, name))
            return fn(*args, **kwargs)
        return call

    x, w = torch.randn(3, 4), torch.randn(5, 4)
    before = {op: dict(REGISTRY._table[op]) for op in OPS}
    plain = REGISTRY.resolve("linear", "eager", "cpu")
    with registry.observe(observer):
        registry.resolve("linear", "eager", "cpu")(x, w)
        REGISTRY.resolve("swiglu", "eager")(x, x)
        assert seen == [("linear", "eager"), ("swiglu", "eager")]
        other = []
        t = threading.Thread(target=lambda: other.append(REGISTRY.resolve("linear", "eager", "cpu")))
        t.start()
        t.join()
        assert other == [plain]  # the other thread resolves the plain implementation
    assert registry.resolve("linear", "eager", "cpu") is plain and REGISTRY.resolve("linear", "eager") is plain
    plain(x, w)
    assert len(seen) == 2

    with pytest.raises(RuntimeError, match="inside"):
        with registry.observe(observer):
            raise RuntimeError("inside")
    assert REGISTRY.resolve("linear", "eager", "cpu") is plain
    assert "resolve" not in REGISTRY.__dict__ and registry.resolve == REGISTRY.resolve
    assert {op: dict(REGISTRY._table[op]) for op in OPS} == before


def test_observers_nest():
    order = []

    def tag(label):
        def observer(fn, op, name):
            def call(*args, **kwargs):
                order.append(label)
                return fn(*args, **kwargs)
            return call
        return observer

    with registry.observe(tag("outer")):
        with registry.observe(tag("inner")):
            REGISTRY.resolve("swiglu", "eager")(torch.ones(2), torch.ones(2))
        REGISTRY.resolve("swiglu", "eager")(torch.ones(2), torch.ones(2))
    assert order == ["inner", "outer", "outer"]


@pytest.mark.parametrize("name", ["a,b", "op=x", "linear/x", "has space", " lead", "tab\tname", "", "\n"])
def test_names_the_command_line_cannot_choose_are_refused(name):
    """--backends is comma-separated, --route is OP=BACKEND, plants are op/backend: such names could never
    be chosen, so registering one is an error that says why."""
    reg = Registry()
    with pytest.raises(ValueError, match="backend name") as e:
        reg.register("rmsnorm", name, lambda x, w, eps: x)
    assert repr(name) in str(e.value)
    with pytest.raises(ValueError, match="backend name"):
        reg.register("rmsnorm", name)(lambda x, w, eps: x)  # the decorator form checks it too
    assert reg.names("rmsnorm") == []


@pytest.mark.parametrize("name", [None, 3, b"bytes"])
def test_backend_name_must_be_a_string(name):
    with pytest.raises(ValueError, match="backend name must be a non-empty string"):
        Registry().register("rmsnorm", name, lambda x, w, eps: x)
