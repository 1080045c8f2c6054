"""Drop detbench's Triton kernels into transformers' Qwen2 / Qwen3 models.

Two entry points, both explicit (nothing here runs at import time):

:func:`register_attention`
    Registers detbench's attention (by default the deterministic Triton kernel, resolved through the
    backend registry on every call) with transformers' attention-function registry under the name
    ``"detbench"``, together with a boolean mask builder, so that
    ``Qwen3ForCausalLM.from_config(cfg, attn_implementation="detbench")`` (or
    ``model.set_attn_implementation("detbench")`` / ``config._attn_implementation = "detbench"``)
    routes every attention layer through it. transformers' mask (``None`` for plain causal, a
    boolean ``(B, 1, Sq, Sk)`` mask, or an additive float mask in older versions) becomes
    detbench's boolean mask and is handed to the backend unchanged in meaning: right and left
    padding work with every backend (a left-padding query row that may attend no key gets a finite
    output from each: zeros from ``triton``, the mean of V from ``eager``; such positions carry no
    loss); masks the backend cannot take (the ``triton`` kernel takes causal + key padding, not
    packed-sequence masks) raise the backend's error. Refused here with a clear error: dropout > 0,
    sliding windows, soft-capping, attention sinks, additive masks carrying biases, and query length
    != key length (cached generation).

:func:`apply_detbench_kernels`
    Patches one model in place, like Liger-Kernel's ``apply_liger_kernel_to_*`` functions, and
    returns a :class:`KernelPatch` handle whose :meth:`~KernelPatch.revert` (or leaving its ``with``
    block) restores the model exactly. What is patched:

    * every ``Qwen2RMSNorm`` / ``Qwen3RMSNorm`` module (layer norms, final norm, Qwen3's q/k norms):
      its ``forward`` (an instance attribute, the class is untouched) calls the ``rmsnorm`` backend;
    * every ``Qwen2MLP`` / ``Qwen3MLP``: ``forward`` becomes
      ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` (refused unless the activation is SiLU);
    * rotary: the attention modules call the module-level function ``apply_rotary_pos_emb`` of
      their modeling file by name. That name is replaced (once per modeling file, reference-counted
      across handles) by a dispatcher that calls the ``rope`` backend while a patched attention
      module's forward is running (a context variable set by its instance-level ``forward``) and
      transformers' original otherwise, so other models of the same class are unaffected. The patch
      refuses a model whose attention forward does not read ``apply_rotary_pos_emb`` from its module.

    The backends are resolved through the registry on every call; ``True`` means ``"triton"``, a
    string names another backend of the op (e.g. ``rmsnorm="triton-atomic"``, the negative control).
"""

from __future__ import annotations

import contextvars
import inspect
import threading
from typing import Callable

import torch

from qwen_layers.registry import REGISTRY

# The registry backend behind ``True`` and behind attn_implementation "detbench": detbench's own Triton kernels.
DEFAULT_BACKEND = "triton"
ATTENTION_NAME = "detbench"

# -------------------------------------------------------------------------------------------------
# attention: transformers' AttentionInterface entry
# -------------------------------------------------------------------------------------------------


def _bool_mask(attention_mask, q_len: int, k_len: int, batch: int) -> torch.Tensor | None:
    """transformers' attention mask as detbench's boolean (B, 1, Sq, Sk) mask (True = attend), or None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"detbench attention takes a tensor mask (bool or additive float), got "
                        f"{type(attention_mask).__name__}; set attn_implementation='detbench' before building masks")
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        raise ValueError(f"detbench attention takes a (B, 1, Sq, Sk) mask shared by all heads, got shape "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        keep = attention_mask
    elif attention_mask.is_floating_point():
        # Additive mask: 0 keeps a key, a very negative value (finfo.min or -inf) drops it; any other
        # value is a bias this boolean interface cannot express.
        keep = attention_mask == 0
        dropped = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
        if not bool((keep | dropped).all()):
            raise ValueError("detbench attention got an additive mask carrying biases (values other than 0 and "
                             "the dtype's minimum); only keep/drop masks are supported, use eager or sdpa")
    else:
        raise TypeError(f"detbench attention takes a bool or float mask, got dtype {attention_mask.dtype}")
    if keep.shape[-2] != q_len or keep.shape[-1] < k_len:
        raise ValueError(f"detbench attention: mask of shape {tuple(keep.shape)} does not cover {q_len} queries "
                         f"x {k_len} keys")
    if keep.shape[0] not in (1, batch):
        raise ValueError(f"detbench attention: mask batch {keep.shape[0]} is neither 1 nor the batch size {batch}")
    return keep[..., :k_len]


def _make_attention_forward(backend: str) -> Callable:
    def detbench_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                   scaling: float | None = None, is_causal: bool | None = None, **kwargs):
        """transformers attention interface: (B, H, S, D) in, ((B, S, H, D), None) out."""
        if dropout:
            raise ValueError(f"detbench attention has no dropout, got dropout={dropout}; set the config's "
                             f"attention_dropout to 0 or call model.eval()")
        for unsupported in ("sliding_window", "softcap", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"detbench attention does not support {unsupported}={kwargs[unsupported]!r}; "
                                 f"use eager or sdpa for this model")
        q_len, k_len = query.shape[2], key.shape[2]
        if q_len != k_len:
            raise ValueError(f"detbench attention needs query length == key length (training or a prefill without "
                             f"cache), got {q_len} queries and {k_len} keys; pass use_cache=False or use sdpa to "
                             f"generate")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        mask = _bool_mask(attention_mask, q_len, k_len, query.shape[0])
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        fn = REGISTRY.resolve("attention", backend, query.device)
        out = fn(query, key, value, scale=scale, causal=bool(is_causal), attn_mask=mask)
        return out.transpose(1, 2).contiguous(), None

    detbench_attention_forward.backend = backend
    return detbench_attention_forward


def _interfaces():
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError("register_attention needs transformers with AttentionInterface (>= 4.51): "
                          "pip install -U 'detbench[hf]'") from e
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older transformers build the (additive float) mask themselves
        AttentionMaskInterface = sdpa_mask = None
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register_attention(backend: str = DEFAULT_BACKEND, name: str = ATTENTION_NAME) -> str:
    """Register detbench attention (``backend`` of the ``attention`` op) with transformers as ``name``.

    Also registers transformers' boolean ``sdpa_mask`` builder under ``name`` (without it transformers
    builds no mask at all for an unknown implementation, and padding would be lost). Registering again
    replaces the entry. Returns ``name``, for ``attn_implementation=``.
    """
    REGISTRY.get("attention", backend)  # unknown backend: raise now, with the registered names
    attention_interface, mask_interface, sdpa_mask = _interfaces()
    attention_interface.register(name, _make_attention_forward(backend))
    if mask_interface is not None:
        mask_interface.register(name, sdpa_mask)
    return name


def unregister_attention(name: str = ATTENTION_NAME) -> None:
    """Remove ``name`` from transformers' attention (and mask) registries; no error if absent."""
    attention_interface, mask_interface, _ = _interfaces()
    attention_interface._global_mapping.pop(name, None)
    if mask_interface is not None:
        mask_interface._global_mapping.pop(name, None)


# -------------------------------------------------------------------------------------------------
# in-place patching of RMSNorm, MLP and rotary
# -------------------------------------------------------------------------------------------------

_RMSNORM_CLASSES = ("Qwen2RMSNorm", "Qwen3RMSNorm")
_MLP_CLASSES = ("Qwen2MLP", "Qwen3MLP")
_ATTENTION_CLASSES = ("Qwen2Attention", "Qwen3Attention")
_SILU = ("SiLU", "SiLUActivation")
_ROPE_NAME = "apply_rotary_pos_emb"

# Rope backend name while a patched attention module's forward runs (None elsewhere).
_active_rope: contextvars.ContextVar[str | None] = contextvars.ContextVar("detbench_rope", default=None)

# One dispatcher per modeling file's globals: id(globals) -> [globals, original, dispatcher, users].
_rope_installs: dict[int, list] = {}
_rope_lock = threading.Lock()


def _rope_dispatcher(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        name = _active_rope.get()
        if name is None:
            return original(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = kwargs.pop("unsqueeze_dim", args[0] if len(args) == 1 else 1)
        if kwargs or len(args) > 1 or unsqueeze_dim != 1:
            raise TypeError(f"detbench rope patch: {_ROPE_NAME} called with arguments it cannot honour "
                            f"(args={args}, kwargs={kwargs}, unsqueeze_dim={unsqueeze_dim}); revert the patch")
        return REGISTRY.resolve("rope", name, q.device)(q, k, cos, sin)

    apply_rotary_pos_emb.__detbench__ = True
    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


def _install_rope(globals_: dict) -> Callable[[], None]:
    """Put the dispatcher in place of ``apply_rotary_pos_emb`` in ``globals_``; returns its undo."""
    key = id(globals_)
    with _rope_lock:
        entry = _rope_installs.get(key)
        if entry is None:
            original = globals_[_ROPE_NAME]
            entry = [globals_, original, _rope_dispatcher(original), 0]
            globals_[_ROPE_NAME] = entry[2]
            _rope_installs[key] = entry
        entry[3] += 1

    def undo() -> None:
        with _rope_lock:
            entry[3] -= 1
            if entry[3] == 0:
                if globals_.get(_ROPE_NAME) is entry[2]:
                    globals_[_ROPE_NAME] = entry[1]
                del _rope_installs[key]

    return undo


def _resolve_choice(op: str, choice: bool | str) -> str | None:
    if choice is False or choice is None:
        return None
    name = DEFAULT_BACKEND if choice is True else choice
    if not isinstance(name, str):
        raise TypeError(f"apply_detbench_kernels: {op} must be True, False or a backend name, got {choice!r}")
    REGISTRY.get(op, name)  # unknown backend: raise now, with the registered names
    return name


def _rmsnorm_forward(module, name: str) -> Callable:
    def forward(hidden_states):
        fn = REGISTRY.resolve("rmsnorm", name, hidden_states.device)
        return fn(hidden_states, module.weight, module.variance_epsilon)

    return forward


def _mlp_forward(module, name: str) -> Callable:
    def forward(x):
        fn = REGISTRY.resolve("swiglu", name, x.device)
        return module.down_proj(fn(module.gate_proj(x), module.up_proj(x)))

    return forward


def _attention_forward(module, name: str) -> Callable:
    inner = module.forward  # the class's forward, bound

    def forward(*args, **kwargs):
        token = _active_rope.set(name)
        try:
            return inner(*args, **kwargs)
        finally:
            _active_rope.reset(token)

    return forward


class KernelPatch:
    """Handle returned by :func:`apply_detbench_kernels`: what was patched, and how to undo it.

    ``counts`` maps op -> number of modules patched; ``backends`` maps op -> backend name.
    Usable as a context manager (reverts on exit, also after an exception). ``revert`` is idempotent.
    """

    def __init__(self, backends: dict[str, str]) -> None:
        self.backends = backends
        self.counts = {op: 0 for op in backends}
        self._undo: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def revert(self) -> None:
        """Restore every patched module (and the rotary function) exactly as it was."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "KernelPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        parts = ", ".join(f"{op}={self.backends[op]} x{n}" for op, n in self.counts.items())
        return f"KernelPatch({state}: {parts})"


def _set_forward(module, forward: Callable, patch: KernelPatch) -> None:
    module.forward = forward

    def undo() -> None:
        if module.__dict__.get("forward") is forward:
            del module.__dict__["forward"]

    patch._undo.append(undo)


def apply_detbench_kernels(model: torch.nn.Module, rmsnorm: bool | str = True, swiglu: bool | str = True,
                           rope: bool | str = True) -> KernelPatch:
    """Patch a transformers Qwen2/Qwen3 model in place to use detbench kernels (see the module docstring).

    Returns a :class:`KernelPatch`; ``handle.revert()`` or ``with apply_detbench_kernels(model): ...``
    undoes it. Checks everything before changing anything, so a refused model is left untouched.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply_detbench_kernels: expected a torch.nn.Module, got {type(model).__name__}")
    choice = {op: _resolve_choice(op, c) for op, c in (("rmsnorm", rmsnorm), ("swiglu", swiglu), ("rope", rope))}
    backends = {op: name for op, name in choice.items() if name is not None}
    targets: dict[str, list] = {"rmsnorm": [], "swiglu": [], "rope": []}
    for mod_name, m in model.named_modules():
        cls = type(m).__name__
        if cls in _RMSNORM_CLASSES:
            targets["rmsnorm"].append((mod_name, m))
        elif cls in _MLP_CLASSES:
            targets["swiglu"].append((mod_name, m))
        elif cls in _ATTENTION_CLASSES:
            targets["rope"].append((mod_name, m))
    if not any(targets.values()):
        raise ValueError(f"apply_detbench_kernels: {type(model).__name__} has no Qwen2/Qwen3 RMSNorm, MLP or "
                         f"attention modules; only transformers' Qwen2 and Qwen3 models are supported")
    rope_globals: dict[int, dict] = {}
    for op in backends:
        for mod_name, m in targets[op]:
            if "forward" in m.__dict__:
                raise ValueError(f"apply_detbench_kernels: {mod_name} ({type(m).__name__}) already has an "
                                 f"instance-level forward (patched already, or an accelerate hook); apply it to an "
                                 f"unpatched model")
            if op == "swiglu" and type(m.act_fn).__name__ not in _SILU:
                raise ValueError(f"apply_detbench_kernels: {mod_name} uses {type(m.act_fn).__name__}, not SiLU; "
                                 f"pass swiglu=False")
            if op == "rope":
                g = inspect.unwrap(type(m).forward).__globals__
                if not callable(g.get(_ROPE_NAME)):
                    raise ValueError(f"apply_detbench_kernels: {type(m).__name__}.forward does not read "
                                     f"{_ROPE_NAME} from its module ({g.get('__name__')}); this transformers "
                                     f"version is not supported, pass rope=False")
                rope_globals[id(g)] = g
    patch = KernelPatch(backends)
    try:
        for g in rope_globals.values():
            patch._undo.append(_install_rope(g))
        makers = {"rmsnorm": _rmsnorm_forward, "swiglu": _mlp_forward, "rope": _attention_forward}
        for op, name in backends.items():
            for _, m in targets[op]:
                _set_forward(m, makers[op](m, name), patch)
                patch.counts[op] += 1
    except BaseException:
        patch.revert()
        raise
    return patch
