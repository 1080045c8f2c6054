"""Built-in PyTorch backends of every op, and the attention backends that wrap SDPA and flash-attn.

The ``eager`` entries reproduce transformers' Qwen2/Qwen3 eager code op for op (same casts, same
order), which is what makes detbench's eager model bitwise equal to transformers' in float32.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# ------------------------------------------------------------------------------------------------
# eager implementations
# ------------------------------------------------------------------------------------------------


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D), each kv head repeated for its query-head group."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean (1, 1, q_len, k_len) mask, True where query i may attend key j (j <= i, top-left aligned)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]


def padded_causal_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Causal mask combined with a (B, S) key padding mask (1 = real token): bool (B, 1, S, S)."""
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    return causal_mask(q_len, attention_mask.shape[-1], attention_mask.device) & keep


def eager_attention(q, k, v, *, scale, causal=True, attn_mask=None):
    """transformers' ``eager_attention_forward``: repeat_kv, matmul, additive mask, float32 softmax."""
    n_rep = q.shape[1] // k.shape[1]
    k = repeat_kv(k, n_rep)
    v = repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if attn_mask is None and causal:
        attn_mask = causal_mask(q.shape[2], k.shape[2], q.device)
    if attn_mask is not None:
        # Same additive mask as transformers builds: 0 to keep, the dtype's lowest finite value to drop.
        zero = torch.zeros((), device=q.device, dtype=q.dtype)
        scores = scores + torch.where(attn_mask, zero, torch.finfo(q.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def eager_rmsnorm(x, weight, eps):
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q, k, cos, sin):
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def eager_swiglu(gate, up):
    return F.silu(gate) * up


def eager_linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def eager_embedding(ids, weight):
    return F.embedding(ids, weight)


def eager_loss(logits, labels, ignore_index=-100):
    """transformers' ForCausalLMLoss after the shift: logits upcast to float32, mean cross entropy."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="mean")


# ------------------------------------------------------------------------------------------------
# SDPA
# ------------------------------------------------------------------------------------------------

_SDPA_BACKENDS = {
    "sdpa-math": "MATH",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}


def _sdpa_call(q, k, v, scale, causal, attn_mask):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None, scale=scale, enable_gqa=gqa
    )


def sdpa_attention(q, k, v, *, scale, causal=True, attn_mask=None):
    """PyTorch's own SDPA dispatch (whatever backend it picks for these inputs)."""
    return _sdpa_call(q, k, v, scale, causal, attn_mask)


def _forced_sdpa(kind: str):
    def fn(q, k, v, *, scale, causal=True, attn_mask=None):
        with sdpa_kernel([getattr(SDPBackend, kind)]):
            return _sdpa_call(q, k, v, scale, causal, attn_mask)

    fn.__name__ = f"sdpa_{kind.lower()}"
    fn.__doc__ = f"SDPA restricted to its {kind} backend; raises if that backend cannot take the inputs."
    return fn


def _probe_sdpa(kind: str, device_type: str, index: int | None) -> str | None:
    """Run a tiny causal GQA call on the device; None if the backend takes it, else the reason.

    Cached per determinism state as well as per device: ``use_deterministic_algorithms(True)`` (torch-det,
    hf-full) switches SDPA backends off (cuDNN attention: "cuDNN SDPA is not deterministic"), so an answer
    found in one mode is not the answer in another.
    """
    return _probe_sdpa_cached(kind, device_type, index, torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled())


def _torch_said(caught) -> str:
    """The reasons torch warned about while refusing an SDPA backend (first lines, at most three)."""
    lines = []
    for w in caught:
        text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        text = text.split(" (Triggered internally at")[0].strip()
        if text and text not in lines and "kernel not used because" not in text:
            lines.append(text)
    return f" (torch: {'; '.join(lines[:3])})" if lines else ""


@functools.lru_cache(maxsize=None)
def _probe_sdpa_cached(kind: str, device_type: str, index: int | None, deterministic: bool,
                       warn_only: bool) -> str | None:
    if device_type != "cuda" and kind in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        return "needs a CUDA device"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    q = torch.zeros(1, 2, 16, 64, device=device, dtype=dtype)
    kv = torch.zeros(1, 1, 16, 64, device=device, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # SDPA says why it refused a backend in warnings, not in the error
        try:
            _forced_sdpa(kind)(q, kv, kv, scale=0.125)
        except Exception as e:  # the reason torch gives is the reason we report
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            det = " with deterministic algorithms on" if deterministic else ""
            return f"torch refused a {str(dtype).removeprefix('torch.')} causal probe{det}: {msg}{_torch_said(caught)}"
    return None


def _sdpa_available(kind: str):
    def available(device: torch.device) -> str | None:
        return _probe_sdpa(kind, device.type, device.index)

    return available


# ------------------------------------------------------------------------------------------------
# flash-attn (the package)
# ------------------------------------------------------------------------------------------------


def _flash_attn_available(device: torch.device) -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "package flash_attn not installed (pip install 'detbench[flash]' on a CUDA machine)"
    if device.type != "cuda":
        return "needs a CUDA device"
    return None


def _flash_attn(deterministic: bool):
    def fn(q, k, v, *, scale, causal=True, attn_mask=None):
        if attn_mask is not None:
            raise ValueError(
                "flash-attn backend takes no attention mask (padding needs flash_attn_varlen_func); "
                "run without padding or choose an sdpa/eager backend"
            )
        from flash_attn import flash_attn_func  # in here: flash-attn is optional (CUDA machines)

        # flash_attn works in (B, S, H, D); GQA is native when Hq is a multiple of Hkv.
        o = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=0.0, softmax_scale=scale, causal=causal, deterministic=deterministic,
        )
        return o.transpose(1, 2)

    fn.__name__ = "flash_attn_det" if deterministic else "flash_attn"
    return fn


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------


def register_backends(registry) -> None:
    reg = functools.partial(registry.register, origin="built-in")
    reg("attention", "eager", eager_attention, deterministic=True,
        description="transformers' eager math: repeat_kv, matmul, additive mask, float32 softmax")
    reg("attention", "sdpa", sdpa_attention, deterministic=None,
        description="torch SDPA, backend chosen by PyTorch's dispatcher")
    for name, kind in _SDPA_BACKENDS.items():
        reg("attention", name, _forced_sdpa(kind), available=_sdpa_available(kind),
            deterministic=True if kind == "MATH" else None,
            description=f"torch SDPA forced to {kind}")
    reg("attention", "flash-attn", _flash_attn(False), available=_flash_attn_available, deterministic=False,
        description="flash_attn.flash_attn_func, deterministic=False (atomic dQ)", twin="flash-attn-det")
    reg("attention", "flash-attn-det", _flash_attn(True), available=_flash_attn_available, deterministic=True,
        description="flash_attn.flash_attn_func, deterministic=True", twin="flash-attn")
    reg("rmsnorm", "eager", eager_rmsnorm, deterministic=True,
        description="float32 variance, rsqrt, cast back, times weight (transformers' Qwen RMSNorm)")
    reg("rope", "eager", eager_rope, deterministic=True, description="rotate-half rotary (transformers)")
    reg("swiglu", "eager", eager_swiglu, deterministic=True, description="F.silu(gate) * up")
    reg("linear", "eager", eager_linear, deterministic=None,
        description="F.linear (BLAS / cuBLAS; tiling may depend on the batch shape)")
    reg("embedding", "eager", eager_embedding, deterministic=None,
        description="F.embedding (backward is an index-add; atomic on CUDA)")
    reg("loss", "eager", eager_loss, deterministic=True, description="float32 F.cross_entropy, mean")
