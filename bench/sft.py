"""``detbench sft``: repeat the same supervised fine-tuning steps and see whether the repeats agree.

One *configuration* is a model, an attention backend, a determinism mode, a dtype and a learning
rate. For each configuration the same seeded weights are trained ``repeats`` times for ``steps``
AdamW steps on the same batches in the same order (see :mod:`bench.data`), and the repeats are
compared bit for bit: the loss and the gradient norm of every step, and every parameter at the end.

Models (``--model``):

==========================  ========================================================================
``qwen3-tiny``              a detbench preset (``qwen_layers.config.PRESETS``), seeded random weights
``path/to/ckpt``            a local Hugging Face Qwen checkpoint folder, loaded into detbench's model
``hf:qwen3-tiny``           transformers' Qwen3/Qwen2 model built from the preset's config, holding
                            the same seeded weights as the detbench model
``hf:path/to/ckpt``         transformers' ``from_pretrained`` on a local folder (no network)
==========================  ========================================================================

The attention axis names registry backends for detbench models (``eager``, ``sdpa``,
``sdpa-math`` ...) and ``attn_implementation`` values for transformers models (``eager``, ``sdpa``,
``flash_attention_2`` when flash-attn is installed, ``detbench`` for detbench's Triton attention via
:mod:`kernels.hf`, ``detbench-<backend>`` for another registry backend through the same interface).

A training step is what an SFT recipe does: ``zero_grad``, forward with labels (mean cross entropy
over the response tokens), backward, gradient clipping to norm ``clip`` (1.0 by default; the norm
before clipping is what is recorded), ``AdamW.step``. The module-level :func:`sft_step` is that step;
``detbench pinpoint`` runs the very same function.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import math
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from bench.compare import bits
from bench.coverage import device_coverage
from bench.data import SFTBatch, batch_for_step, on_device, read_token_file, synthetic_batches
from bench.dtypes import parse_dtype, short_name, torch_name
from bench.errors import InputError
from bench.modes import MODES, apply_mode, is_refusal
from bench.pinpoint import phase
from bench.pinpoint.fingerprint import Coefficients, fingerprints
from bench.planted import planted_registered
from bench.results import capture_environment, check_out_dir, device_label, new_run_id, result_path, write_json_atomic
from qwen_layers import model as qm
from qwen_layers.checkpoint import CheckpointError, from_pretrained, read_config
from qwen_layers.config import PRESETS, QwenConfig
from qwen_layers.model import QwenForCausalLM, Routed, build_model, set_backends
from qwen_layers.registry import OPS, REGISTRY, BackendError

SCHEMA = "detbench.sft/2"  # 2: the distributed section (bench.distributed)

class SFTError(InputError):
    """A setting that cannot be used; the message says which and how to fix it (the CLI exits 2)."""


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise SFTError(f"{what} {text!r}: give a comma-separated list without empty entries, e.g. a,b")
    return list(dict.fromkeys(items))  # keep order, drop duplicates


# What torch.manual_seed and torch.Generator.manual_seed accept.
SEED_MIN, SEED_END = -2 ** 63, 2 ** 64


def check_seed(value: int, option: str) -> int:
    """``value`` if torch can seed a generator with it, else :class:`SFTError` naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or not SEED_MIN <= value < SEED_END:
        raise SFTError(f"{option} {value} is out of range: a seed is an integer in [-2**63, 2**64), e.g. 0")
    return value


def parse_lrs(text: str) -> list[float]:
    """``"1e-5,3e-4"`` -> [1e-05, 0.0003]; every entry must be a finite positive number."""
    out = []
    for item in parse_list(text, "--lr"):
        try:
            lr = float(item)
        except ValueError:
            raise SFTError(f"--lr {text!r}: {item!r} is not a number; write learning rates like 1e-5,3e-4") from None
        if not math.isfinite(lr) or lr <= 0:
            raise SFTError(f"--lr {text!r}: {item!r} must be a finite positive number, e.g. 1e-5")
        out.append(lr)
    return out


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

HF_PREFIX = "hf:"


@dataclass(frozen=True)
class ModelSpec:
    """What ``--model`` named: a preset or a checkpoint folder, in detbench's model or transformers'."""

    text: str
    transformers: bool
    config: QwenConfig
    preset: str | None = None
    path: str | None = None

    @property
    def label(self) -> str:
        return self.text


def parse_model(text: str) -> ModelSpec:
    """Resolve ``--model``; raises :class:`SFTError` (unknown name, not a checkpoint folder)."""
    hf = text.startswith(HF_PREFIX)
    name = text[len(HF_PREFIX):] if hf else text
    if not name:
        raise SFTError(f"--model {text!r}: name a preset or a checkpoint folder after 'hf:', e.g. hf:qwen3-tiny")
    if hf and not _transformers_installed():
        raise SFTError(f"--model {text!r} needs transformers, which is not installed; pip install 'detbench[hf]' "
                       f"or drop the 'hf:' prefix to use detbench's own Qwen model")
    if name in PRESETS:
        return ModelSpec(text, hf, PRESETS[name], preset=name)
    path = Path(name)
    if path.exists():
        try:
            config = read_config(path)
        except CheckpointError as e:
            raise SFTError(f"--model {text!r} is not a checkpoint folder: {e}") from None
        return ModelSpec(text, hf, config, path=str(path))
    raise SFTError(f"unknown model {name!r}: not a detbench preset ({', '.join(PRESETS)}) and no such checkpoint "
                   f"folder")


def _transformers_installed() -> bool:
    try:
        import transformers  # noqa: F401  (in here: transformers is optional, detbench[hf])
    except ImportError:
        return False
    return True


def hf_attention_choices() -> list[str]:
    """attn_implementation values this tool knows how to ask transformers for."""
    names = ["eager", "sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attention_2")
    names.append("detbench")
    return names


def check_attention(spec: ModelSpec, name: str, device: torch.device) -> None:
    """Raise :class:`SFTError` unless attention ``name`` exists for this model and can run on ``device``."""
    if not spec.transformers:
        try:
            REGISTRY.resolve("attention", name, device)
        except BackendError as e:
            raise SFTError(f"--attention {name!r}: {e}") from None
        return
    if name in ("eager", "sdpa"):
        return
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise SFTError("--attention flash_attention_2: package flash_attn is not installed "
                           "(pip install 'detbench[flash]' on a CUDA machine)")
        if device.type != "cuda":
            raise SFTError("--attention flash_attention_2 needs a CUDA device; use --device cuda")
        return
    backend = _detbench_backend(name)
    if backend is not None:
        if importlib.util.find_spec("kernels.hf") is None:
            raise SFTError(f"--attention {name}: kernels/hf.py (register_attention) is not available in this checkout")
        try:
            REGISTRY.resolve("attention", backend, device)
        except BackendError as e:
            raise SFTError(f"--attention {name}: {e}") from None
        return
    raise SFTError(f"--attention {name!r} is not an attn_implementation detbench can ask transformers for; choose "
                   f"from: {', '.join(hf_attention_choices())}, or detbench-<registry backend>")


@dataclass(frozen=True)
class Plant:
    """``--plant PATH=op/backend``: route ``op`` of the module at ``PATH`` (and below) to ``backend``."""

    path: str
    op: str
    backend: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}={self.op}/{self.backend}"


ROOT_NAMES = ("", "<root>", ".")


def parse_plant(text: str) -> Plant:
    """``MODULE_PATH=op/backend``; an empty path (or ``<root>``) is the whole model, e.g. ``=loss/planted-nondet``."""
    path, eq, choice = text.partition("=")
    op, slash, backend = choice.partition("/")
    if not eq or not slash or not op.strip() or not backend.strip():
        raise SFTError(f"--plant {text!r}: write MODULE_PATH=op/backend, e.g. "
                       f"model.layers.1.mlp.down_proj=linear/planted-nondet (an empty path is the whole model)")
    path = path.strip()
    return Plant("" if path in ROOT_NAMES else path, op.strip(), backend.strip())


# Which op each detbench module class routes through the registry (for checking --plant targets).
def _ops_used(module: nn.Module) -> set[str]:
    table = {qm.Linear: {"linear"}, qm.Embedding: {"embedding"}, qm.RMSNorm: {"rmsnorm"},
             qm.Attention: {"attention", "rope"}, qm.MLP: {"swiglu"}, qm.QwenForCausalLM: {"loss"}}
    used: set[str] = set()
    for m in module.modules():
        for cls, ops in table.items():
            if isinstance(m, cls):
                used |= ops
    return used


def _plant_target(model: nn.Module, p: Plant, device: torch.device) -> nn.Module:
    """The module ``p`` names, after checking its op and backend."""
    if p.op not in OPS:
        raise SFTError(f"--plant {p}: unknown op {p.op!r}; ops are: {', '.join(OPS)}")
    try:
        REGISTRY.resolve(p.op, p.backend, device)
    except BackendError as e:
        raise SFTError(f"--plant {p}: {e}") from None
    try:
        return model.get_submodule(p.path)
    except AttributeError:
        raise SFTError(f"--plant {p}: the model has no module {p.path!r}; module paths look like "
                       f"model.layers.0.mlp.down_proj (see print(model))") from None


def apply_plants(model: nn.Module, plants: Iterable[Plant], device: torch.device) -> None:
    """Route each plant's op below its module path to its backend.

    detbench models: the op's backend choice of every routed module below the path. transformers models
    (``hf:``): the ``forward`` of every module below the path that runs the op is replaced, on the instance,
    by one that calls the registry backend (:data:`HF_PLANTABLE`; :func:`remove_plants` undoes it).
    Planted backends (``planted-*``) must be in the registry: run inside :func:`bench.planted.planted_registered`.
    """
    plants = list(plants)
    if not plants:
        return
    if not isinstance(model, Routed):
        _plant_transformers(model, plants, device)
        return
    for p in plants:
        target = _plant_target(model, p, device)
        if p.op not in _ops_used(target):
            raise SFTError(f"--plant {p}: module {p.path!r} ({type(target).__name__}) does not run op {p.op!r}; "
                           f"it runs: {', '.join(sorted(_ops_used(target))) or 'no routed op'}")
        set_backends(target, {p.op: p.backend})


# --plant on transformers models. Their modules do not call detbench's registry, so a plant replaces the
# forward of each module that runs the op (on the instance; the class is untouched) by one that calls the
# registry backend with the module's own weights, computing what transformers' forward computes.
HF_PLANTABLE = {
    "linear": "nn.Linear modules",
    "rmsnorm": "RMSNorm modules (a weight and variance_epsilon, as Qwen2RMSNorm / Qwen3RMSNorm)",
    "swiglu": "MLP modules (gate_proj, up_proj, down_proj and a SiLU act_fn, as Qwen2MLP / Qwen3MLP)",
}
_HF_REFUSED = {
    "attention": "transformers picks one attention implementation for every layer: choose it with --attention "
                 "(detbench-<backend> routes every layer through that registry backend)",
    "loss": "transformers computes the loss in the model's loss_function; plant the loss in detbench's model "
            "(drop the 'hf:' prefix of --model)",
}


def _planted_linear(self, x):
    return REGISTRY.resolve("linear", self._detbench_plant, x.device)(x, self.weight, self.bias)


def _planted_rmsnorm(self, hidden_states):
    return REGISTRY.resolve("rmsnorm", self._detbench_plant, hidden_states.device)(
        hidden_states, self.weight, self.variance_epsilon)


def _planted_swiglu(self, x):
    fn = REGISTRY.resolve("swiglu", self._detbench_plant, x.device)
    return self.down_proj(fn(self.gate_proj(x), self.up_proj(x)))


def _hf_runs(module: nn.Module, op: str) -> bool:
    """Whether transformers' ``module`` itself computes ``op`` in a way a planted forward reproduces."""
    if op == "linear":
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
    if op == "rmsnorm":
        return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
                and isinstance(getattr(module, "weight", None), torch.Tensor))
    if op == "swiglu":
        return (all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
                and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))
    return False


_PLANTED_FORWARD = {"linear": _planted_linear, "rmsnorm": _planted_rmsnorm, "swiglu": _planted_swiglu}


def _plant_transformers(model: nn.Module, plants: list[Plant], device: torch.device) -> None:
    """apply_plants for a transformers model: everything is checked before anything changes."""
    targets: list[tuple[nn.Module, Plant]] = []
    for p in plants:
        root = _plant_target(model, p, device)
        if p.op in _HF_REFUSED:
            raise SFTError(f"--plant {p}: {p.op} cannot be planted into a transformers model: {_HF_REFUSED[p.op]}")
        if p.op not in HF_PLANTABLE:
            raise SFTError(f"--plant {p}: {p.op} cannot be planted into a transformers model; what can: "
                           + "; ".join(f"{op} in {what}" for op, what in HF_PLANTABLE.items()))
        found = [(name, m) for name, m in root.named_modules() if _hf_runs(m, p.op)]
        if not found:
            raise SFTError(f"--plant {p}: module {p.path or '<root>'!r} ({type(root).__name__}) has no "
                           f"{HF_PLANTABLE[p.op]} below it, so it does not run {p.op}")
        for name, m in found:
            if "forward" in m.__dict__:
                where = ".".join(x for x in (p.path, name) if x) or "<root>"
                raise SFTError(f"--plant {p}: {where} ({type(m).__name__}) already has a forward of its own "
                               f"(planted twice, or patched by another library); plant each module once")
            targets.append((m, p))
    undo = model.__dict__.setdefault("_detbench_plants", [])
    for m, p in targets:
        m._detbench_plant = p.backend
        m.forward = types.MethodType(_PLANTED_FORWARD[p.op], m)  # bound to m: a deep copy stays with its copy
        undo.append(m)


def remove_plants(model: nn.Module) -> int:
    """Undo :func:`apply_plants` on a transformers model: every planted module gets its class's forward back.
    Returns how many modules were restored (0 for a model without plants, and for detbench models, whose
    plants are backend choices: :func:`qwen_layers.model.set_backends` sets them back)."""
    planted = model.__dict__.pop("_detbench_plants", [])
    for m in planted:
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_detbench_plant", None)
    return len(planted)


def _hf_classes(config: QwenConfig):
    if config.family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM  # in here: transformers is optional

        return Qwen3Config, Qwen3ForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM  # in here: transformers is optional

    return Qwen2Config, Qwen2ForCausalLM


def _hf_model_class(config: QwenConfig, attn: str):
    """(transformers causal-LM class, its config) for a detbench config."""
    config_cls, model_cls = _hf_classes(config)
    d = config.to_hf_dict()
    d.pop("model_type")
    d.pop("architectures")
    hf_config = config_cls(**d)
    hf_config._attn_implementation = attn
    return model_cls, hf_config


def _detbench_backend(name: str) -> str | None:
    """The registry attention backend behind attn_implementation ``detbench`` (kernels.hf's default) or
    ``detbench-<backend>``; None for transformers' own implementations."""
    if name == "detbench":
        from kernels.hf import DEFAULT_BACKEND  # in here: kernels.hf is only needed for hf: models

        return DEFAULT_BACKEND
    return name[len("detbench-"):] if name.startswith("detbench-") else None


def _hf_attn_name(name: str) -> str:
    """Register detbench's transformers attention when asked for; return the attn_implementation."""
    backend = _detbench_backend(name)
    if backend is not None:
        from kernels.hf import register_attention  # in here: kernels.hf is only needed for hf: models

        return register_attention(backend, name=name)
    return name


def _keep_inv_freq_fp32(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` that keeps rotary ``inv_freq`` buffers in float32 (as from_pretrained does)."""
    saved = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model = model.to(dtype)
    for n, b in saved.items():
        owner, _, attr = n.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, b)
    return model


def build(
    spec: ModelSpec,
    *,
    attention: str,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    plants: Sequence[Plant] = (),
) -> nn.Module:
    """The model ``spec`` names, in ``dtype`` on ``device``, in train mode, with ``attention``.

    Presets get detbench's seeded weights (:func:`qwen_layers.model.build_model`); ``hf:`` presets
    get the very same weights in transformers' class. Raises :class:`SFTError`.
    """
    device = torch.device(device)
    if not spec.transformers:
        if spec.preset is not None:
            model = build_model(spec.config, seed=seed, dtype=dtype, device=device, backends={"attention": attention})
        else:
            try:
                model = from_pretrained(spec.path, backends={"attention": attention}, dtype=dtype, device=device)
            except CheckpointError as e:
                raise SFTError(f"--model {spec.text!r}: {e}") from None
        apply_plants(model, plants, device)
        return model.train()
    attn = _hf_attn_name(attention)
    if spec.preset is not None:
        model_cls, hf_config = _hf_model_class(spec.config, attn)
        with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global generator
            model = model_cls(hf_config)
        seeded = build_model(spec.config, seed=seed)
        model.load_state_dict(seeded.state_dict())
        model = _keep_inv_freq_fp32(model, dtype).to(device)
        apply_plants(model, plants, device)
        return model.train()
    from transformers import AutoModelForCausalLM  # in here: transformers is optional

    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(spec.path, attn_implementation=attn, dtype=dtype,
                                                         local_files_only=True)
        except TypeError:  # transformers < 4.56 calls it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(spec.path, attn_implementation=attn, torch_dtype=dtype,
                                                         local_files_only=True)
    except (OSError, ValueError) as e:
        raise SFTError(f"--model {spec.text!r}: transformers cannot load it: {str(e).splitlines()[0]}") from None
    model = model.to(device)
    apply_plants(model, plants, device)
    return model.train()


# ------------------------------------------------------------------------------------------------
# one training step
# ------------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over every parameter (PyTorch picks its default foreach/for-loop implementation)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)


def sft_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: SFTBatch,
             clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One SFT step; returns (loss, gradient norm before clipping) as detached tensors.

    ``clip <= 0`` disables clipping (the norm is still computed). Gradient clipping and the AdamW
    update run inside ``bench.pinpoint.phase("optimizer")`` so that the pinpointer files them there.
    """
    optimizer.zero_grad(set_to_none=True)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    loss = out.loss
    loss.backward()
    with phase("optimizer"):
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        optimizer.step()
    return loss.detach(), norm.detach()


def value_bits(t: torch.Tensor) -> str:
    """A scalar tensor's exact bit pattern as ``dtype:hex`` (``float32:3f800000``): what the repeats are compared by."""
    width = t.element_size() * 2
    return f"{torch_name(t.dtype)}:{int(bits(t.detach().reshape(())).item()) & ((1 << (4 * width)) - 1):0{width}x}"


def fmt_exact(x: float, dtype: torch.dtype | str = torch.float32) -> str:
    """Shortest decimal that round-trips to the same value in ``dtype`` (all digits that matter)."""
    name = dtype if isinstance(dtype, str) else torch_name(dtype)
    if name == "float64" or not math.isfinite(x):
        return repr(x)
    if name == "float16":
        return np.format_float_scientific(np.float16(x), unique=True)
    return np.format_float_scientific(np.float32(x), unique=True)  # bf16 values are exact in float32


# ------------------------------------------------------------------------------------------------
# records (field names are the JSON keys)
# ------------------------------------------------------------------------------------------------


@dataclass
class ParamDiff:
    """Final parameters of one repeat compared with repeat 0's."""

    repeat: int                 # 0-based repeat index compared with repeat 0
    tensors_differ: int
    tensors_total: int
    elements_differ: int
    elements_total: int
    max_abs: float              # largest |a - b| over all parameters (0.0 when identical)
    worst_param: str | None     # the parameter holding max_abs


@dataclass
class ConfigResult:
    """One configuration (attention x mode x dtype x lr), all its repeats, and the comparison."""

    attention: str
    mode: str
    dtype: str
    lr: float
    steps: int
    repeats: int
    status: str                          # ok | refused (mode refused an op) | error
    reason: str | None = None
    losses: list[list[float]] = field(default_factory=list)       # [repeat][step], exact values
    loss_bits: list[list[str]] = field(default_factory=list)      # [repeat][step], "dtype:hex"
    grad_norms: list[list[float]] = field(default_factory=list)   # before clipping
    grad_norm_bits: list[list[str]] = field(default_factory=list)
    grad_digests: list[list[str]] = field(default_factory=list)   # [repeat][step]: fingerprint of every gradient
    step_equal: list[bool] = field(default_factory=list)          # [step]: loss, grad norm and gradients equal in all repeats
    step_differs: list[list[str]] = field(default_factory=list)   # [step]: which of loss/gnorm/grads differ
    first_divergent_step: int | None = None                       # 1-based; None: no step differs
    loss_spread: list[float] = field(default_factory=list)        # [step]: max - min over repeats (float64)
    grad_norm_spread: list[float] = field(default_factory=list)
    param_diff: list[ParamDiff] = field(default_factory=list)     # repeats 1.. vs repeat 0
    identical: bool | None = None                                 # every step and every final parameter equal;
    #                                                               None: not comparable (non_finite)
    non_finite: dict | None = None        # the first step where a value went NaN/inf: step, repeat, what, detail
    verdict: str = ""
    loss_dtype: str = "float32"
    seconds: float = 0.0

    def key(self) -> str:
        dtype = short_name(self.dtype)
        return f"{self.attention} {self.mode} {dtype} lr={self.lr:g}"


@dataclass
class SFTSettings:
    model: str
    model_kind: str                      # detbench | transformers
    preset: str | None
    checkpoint: str | None
    attention: list[str]
    modes: list[str]
    dtypes: list[str]
    lrs: list[float]
    steps: int
    repeats: int
    batch_size: int
    seq_len: int | None
    data: str                            # "synthetic" or the token file path
    n_batches: int
    seed: int
    data_seed: int
    betas: list[float]
    weight_decay: float
    clip: float
    device: str
    plants: list[str]
    out: str | None


@dataclass
class SFTResult:
    schema: str
    run_id: str
    started: str
    finished: str | None
    status: str                          # complete | interrupted (configs holds those that finished)
    command: list[str]
    settings: SFTSettings
    environment: Any                     # bench.results.Environment
    modes: list[dict[str, Any]]
    model_config: dict[str, Any]
    batches: list[dict[str, Any]]        # the first MAX_DESCRIBED_BATCHES batches the steps use
    configs: list[ConfigResult]
    batches_not_described: int = 0       # batches the steps use beyond those described
    distributed: dict[str, Any] | None = None  # data-parallel setups compared (bench.distributed.record)
    coverage: dict[str, Any] | None = None  # on a CPU: what the run exercised and not (bench.coverage)


# ------------------------------------------------------------------------------------------------
# running repeats
# ------------------------------------------------------------------------------------------------


def _param_diff(repeat: int, ref: dict[str, torch.Tensor], model: nn.Module) -> ParamDiff:
    td = ed = et = 0
    worst, worst_name = 0.0, None
    params = dict(model.named_parameters())
    for name, a in ref.items():
        b = params[name].detach()
        et += a.numel()
        n = int((bits(a) != bits(b)).sum())
        if n:
            td += 1
            ed += n
            d = float((a.double() - b.double()).abs().nan_to_num(nan=math.inf).max())
            if d > worst or worst_name is None:
                worst, worst_name = d, name
    return ParamDiff(repeat, td, len(ref), ed, et, worst, worst_name)


def train_repeats(
    model: nn.Module,
    init_state: dict[str, torch.Tensor],
    batches: Sequence[SFTBatch],
    *,
    steps: int,
    repeats: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    clip: float = 1.0,
    seed: int = 0,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train ``repeats`` times from ``init_state``; returns the raw per-repeat measurements.

    Before each repeat the parameters are reset to ``init_state``, a fresh AdamW is made and the global
    generators are seeded with ``seed`` (inside ``fork_rng``, so the caller's generator state is
    restored afterwards). ``non_finite`` in the result is the first step (over all repeats) at which
    the initial weights, the loss, the gradient norm (so a gradient) or the parameters after the update
    held a NaN or an infinity, or None.
    """
    device = next(model.parameters()).device
    batches = on_device(batches, device)
    losses, loss_bits, norms, norm_bits, digests, diffs = [], [], [], [], [], []
    ref: dict[str, torch.Tensor] | None = None
    loss_dtype = None
    params = dict(model.named_parameters())
    coefficients = Coefficients()  # drawn once for every step's gradient digest
    first = _non_finite_weights(init_state, "initial weights", 1, None, "")
    for r in range(repeats):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(init_state[name])
        opt = make_optimizer(model, lr=lr, betas=betas, weight_decay=weight_decay)
        rl, rlb, rn, rnb, rg = [], [], [], [], []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for k in range(steps):
                loss, norm = sft_step(model, opt, batch_for_step(batches, k), clip)
                rl.append(float(loss.item()))
                rlb.append(value_bits(loss))
                rn.append(float(norm.item()))
                rnb.append(value_bits(norm))
                rg.append(grad_digest(model, coefficients))
                loss_dtype = torch_name(loss.dtype)
                if first is None or k + 1 < first["step"]:  # only an earlier step than the one known is news
                    first = _non_finite_step(k + 1, r, rl[-1], rn[-1], params) or first
                if on_step is not None:
                    on_step()
        losses.append(rl), loss_bits.append(rlb), norms.append(rn), norm_bits.append(rnb), digests.append(rg)
        if r == 0:
            ref = {n: p.detach().clone() for n, p in params.items()}
        else:
            diffs.append(_param_diff(r, ref, model))
        del opt
    return {"losses": losses, "loss_bits": loss_bits, "grad_norms": norms, "grad_norm_bits": norm_bits,
            "grad_digests": digests, "param_diff": diffs, "loss_dtype": loss_dtype or "float32",
            "non_finite": first}


def _non_finite_weights(tensors: dict[str, torch.Tensor], what: str, step: int, repeat: int | None,
                        when: str) -> dict | None:
    """The first of ``tensors`` (by name, in order) holding NaN or an infinity, as a ``non_finite`` record."""
    with torch.no_grad():
        names = list(tensors)
        finite = torch.stack([torch.isfinite(tensors[n]).all() for n in names]).tolist() if names else []
    bad = [n for n, ok in zip(names, finite) if not ok]
    if not bad:
        return None
    t = tensors[bad[0]].detach()
    kind = "NaN" if bool(t.isnan().any()) else "inf"
    n_bad = int((~torch.isfinite(t)).sum())
    more = f"; {len(bad) - 1} more tensor(s) too" if len(bad) > 1 else ""
    detail = f"{what}: {bad[0]} holds {kind} ({n_bad} of {t.numel()} elements){more}{when}"
    return {"step": step, "repeat": repeat, "what": what, "detail": detail}


def _non_finite_step(step: int, repeat: int, loss: float, norm: float,
                     params: dict[str, torch.Tensor] | None) -> dict | None:
    """What went non-finite first in one step, in the order the step computes it: the loss (forward),
    the gradient norm (a gradient is NaN/inf when it is), the parameters after the update (checked
    when ``params`` is given)."""
    for what, value in (("loss", loss), ("gradient norm", norm)):
        if not math.isfinite(value):
            return {"step": step, "repeat": repeat, "what": what, "detail": f"{what} {value} in repeat {repeat}"}
    if params is None:
        return None
    return _non_finite_weights(params, "parameters", step, repeat, f" after the update in repeat {repeat}")


def grad_digest(model: nn.Module, coefficients: Coefficients | None = None) -> str:
    """One hex digest of every parameter's gradient (after clipping), by name, from bench.pinpoint's
    fingerprints (two differing gradients collide with probability <= 2^-33): it sees a gradient
    difference that the gradient norm rounds away and the optimizer absorbs. Pass the same
    ``coefficients`` to many calls to draw the fingerprint coefficients once."""
    named = [(n, p.grad) for n, p in model.named_parameters()]
    h = hashlib.blake2b(digest_size=12)
    for (name, _), fp in zip(named, fingerprints([g for _, g in named], coefficients)):
        h.update(repr((name, fp)).encode())
    return h.hexdigest()


def compare_repeats(res: ConfigResult) -> ConfigResult:
    """Fill the comparison fields of ``res`` from its per-repeat measurements."""
    k_steps = len(res.losses[0]) if res.losses else 0
    res.step_equal, res.step_differs, res.loss_spread, res.grad_norm_spread = [], [], [], []
    for k in range(k_steps):
        differs = [what for what, table in (("loss", res.loss_bits), ("gnorm", res.grad_norm_bits),
                                            ("grads", res.grad_digests))
                   if table and len({table[r][k] for r in range(len(res.losses))}) > 1]
        res.step_differs.append(differs)
        res.step_equal.append(not differs)
        ls = [res.losses[r][k] for r in range(len(res.losses))]
        ns = [res.grad_norms[r][k] for r in range(len(res.losses))]
        res.loss_spread.append(_spread(ls))
        res.grad_norm_spread.append(_spread(ns))
    res.first_divergent_step = next((k + 1 for k, eq in enumerate(res.step_equal) if not eq), None)
    params_equal = all(d.tensors_differ == 0 for d in res.param_diff)
    res.identical = all(res.step_equal) and params_equal
    n = len(res.losses)
    nf = res.non_finite
    if res.identical and nf is not None:
        # Equal bits prove nothing once values are NaN/inf: every NaN payload and every infinity compares
        # equal however it was computed. Never "identical" then.
        res.identical = None
        before = (f"; steps 1-{nf['step'] - 1} were bitwise identical in {n} repeats" if nf["step"] > 2 else
                  f"; step 1 was bitwise identical in {n} repeats" if nf["step"] == 2 else "")
        res.verdict = (f"not comparable (non-finite from step {nf['step']}: {nf['detail']}){before}; equal NaN/inf "
                       f"bits hide differences")
        return res
    if res.identical:
        res.verdict = (f"bitwise identical in {n} repeats x {k_steps} steps (losses, grad norms, gradients, "
                       f"final parameters)")
    elif res.first_divergent_step is not None:
        what = "/".join(res.step_differs[res.first_divergent_step - 1])
        res.verdict = (f"repeats diverge at step {res.first_divergent_step} of {k_steps} ({what} differ; {n} "
                       f"repeats)")
    else:
        res.verdict = f"losses and grad norms equal over {n} repeats, but the final parameters differ"
    if nf is not None:
        res.verdict += f"; non-finite from step {nf['step']} ({nf['detail']})"
    return res


def _spread(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) != len(values):
        return math.nan if len({repr(v) for v in values}) > 1 else 0.0
    return max(finite) - min(finite)


def run_config(
    model: nn.Module,
    init_state: dict[str, torch.Tensor],
    batches: Sequence[SFTBatch],
    *,
    attention: str,
    mode: str,
    dtype: torch.dtype,
    lr: float,
    steps: int,
    repeats: int,
    betas=(0.9, 0.999),
    weight_decay: float = 0.0,
    clip: float = 1.0,
    seed: int = 0,
    on_step: Callable[[], None] | None = None,
) -> ConfigResult:
    """Run one configuration under its determinism mode and compare its repeats."""
    res = ConfigResult(attention=attention, mode=mode, dtype=torch_name(dtype), lr=lr, steps=steps,
                       repeats=repeats, status="ok")
    t0 = time.perf_counter()
    try:
        with apply_mode(mode):
            raw = train_repeats(model, init_state, batches, steps=steps, repeats=repeats, lr=lr, betas=betas,
                                weight_decay=weight_decay, clip=clip, seed=seed, on_step=on_step)
    except RuntimeError as e:
        res.status = "refused" if is_refusal(e) else "error"
        res.reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        res.verdict = ("mode refused an op: " if res.status == "refused" else "failed: ") + res.reason
        res.seconds = time.perf_counter() - t0
        return res
    res.losses, res.loss_bits = raw["losses"], raw["loss_bits"]
    res.grad_norms, res.grad_norm_bits = raw["grad_norms"], raw["grad_norm_bits"]
    res.grad_digests = raw["grad_digests"]
    res.param_diff, res.loss_dtype = raw["param_diff"], raw["loss_dtype"]
    res.non_finite = raw["non_finite"]
    res.seconds = time.perf_counter() - t0
    return compare_repeats(res)


@dataclass
class Plan:
    """Everything checked before the first step runs (so bad input never leaves a partial result)."""

    spec: ModelSpec
    attention: list[str]
    modes: list[str]
    dtypes: list[torch.dtype]
    lrs: list[float]
    steps: int
    repeats: int
    batches: Sequence[SFTBatch]   # a token file's list, or synthetic batches drawn as they are used
    device: torch.device
    plants: list[Plant]
    settings: SFTSettings

    @property
    def n_configs(self) -> int:
        return len(self.attention) * len(self.modes) * len(self.dtypes) * len(self.lrs)


def _check_numbers(*, steps: int, repeats: int, batch_size: int, n_batches: int | None, clip: float,
                   betas: tuple[float, ...], weight_decay: float) -> None:
    if steps < 1:
        raise SFTError(f"--steps must be at least 1, got {steps}")
    if repeats < 2:
        raise SFTError(f"--repeats {repeats}: comparing repeats needs at least 2 repeats (default 3)")
    if batch_size < 1:
        raise SFTError(f"--batch-size must be at least 1, got {batch_size}")
    if n_batches is not None and n_batches < 1:
        raise SFTError(f"--batches must be at least 1, got {n_batches}")
    if not math.isfinite(clip) or clip < 0:
        raise SFTError(f"--clip must be a finite norm >= 0 (0 disables clipping), got {clip}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise SFTError(f"--betas must be two numbers in [0, 1), e.g. 0.9,0.999; got {betas}")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise SFTError(f"--weight-decay must be a finite number >= 0 (0 disables it), e.g. 0.01; got {weight_decay}")


def _check_plants(spec: ModelSpec, plants: list[Plant], device: torch.device) -> None:
    """Check the plant paths against a model of the same structure, without drawing weights."""
    if not plants:
        return
    if spec.transformers:
        model_cls, hf_config = _hf_model_class(spec.config, "eager")
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            skeleton = model_cls(hf_config)
    else:
        with torch.device("meta"):
            skeleton = QwenForCausalLM(spec.config)
    with planted_registered():
        apply_plants(skeleton, plants, device)


def _batches(config: QwenConfig, *, data: str | None, n_batches: int | None, steps: int, batch_size: int,
             seq_len: int, data_seed: int) -> Sequence[SFTBatch]:
    """The user's token file, or seeded synthetic batches (one per step unless ``n_batches``), drawn as
    the steps use them."""
    if data is not None:
        batches = read_token_file(data, vocab_size=config.vocab_size, batch_size=batch_size,
                                  max_len=config.max_position_embeddings)
        return batches[:n_batches] if n_batches is not None else batches
    if seq_len > config.max_position_embeddings:
        raise SFTError(f"--seq-len {seq_len} exceeds the model's {config.max_position_embeddings} positions")
    return synthetic_batches(config.vocab_size, n_batches=n_batches or steps, batch_size=batch_size,
                             seq_len=seq_len, seed=data_seed)


def make_plan(
    *,
    model: str,
    attention: str | Sequence[str] = "eager",
    modes: str | Sequence[str] = "default",
    dtypes: str | Sequence[str] = "float32",
    lrs: str | Sequence[float] = "1e-5",
    steps: int = 10,
    repeats: int = 3,
    batch_size: int = 4,
    seq_len: int = 64,
    data: str | None = None,
    n_batches: int | None = None,
    seed: int = 0,
    data_seed: int = 0,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    clip: float = 1.0,
    device: torch.device | str = "cpu",
    plants: Sequence[str | Plant] = (),
    out: str | None = "results",
) -> Plan:
    """Parse and check every setting; raises :class:`SFTError` / :class:`bench.data.DataError`.

    ``repeats`` must be at least 2 (the repeats are what is compared).
    """
    device = torch.device(device)
    betas = tuple(float(b) for b in betas)
    weight_decay = float(weight_decay)
    _check_numbers(steps=steps, repeats=repeats, batch_size=batch_size, n_batches=n_batches, clip=clip, betas=betas,
                   weight_decay=weight_decay)
    check_seed(seed, "--seed")
    check_seed(data_seed, "--data-seed")
    spec = parse_model(model)
    attention = parse_list(attention, "--attention") if isinstance(attention, str) else list(attention)
    modes = parse_list(modes, "--mode") if isinstance(modes, str) else list(modes)
    dtype_names = parse_list(dtypes, "--dtype") if isinstance(dtypes, str) else list(dtypes)
    lrs = parse_lrs(lrs) if isinstance(lrs, str) else [float(x) for x in lrs]
    if not lrs or any(not math.isfinite(x) or x <= 0 for x in lrs):
        raise SFTError(f"--lr must be finite positive numbers, got {lrs}")
    for m in modes:
        if m not in MODES:
            raise SFTError(f"--mode {m!r}: unknown mode; choose from: {', '.join(MODES)}")
    dtype_list = [parse_dtype(d) for d in dtype_names]
    for a in attention:
        check_attention(spec, a, device)
    plant_list = [p if isinstance(p, Plant) else parse_plant(p) for p in plants]
    _check_plants(spec, plant_list, device)
    batches = _batches(spec.config, data=data, n_batches=n_batches, steps=steps, batch_size=batch_size,
                       seq_len=seq_len, data_seed=data_seed)
    settings = SFTSettings(
        model=spec.text, model_kind="transformers" if spec.transformers else "detbench", preset=spec.preset,
        checkpoint=spec.path, attention=attention, modes=modes, dtypes=[torch_name(d) for d in dtype_list],
        lrs=lrs, steps=steps, repeats=repeats, batch_size=batch_size, seq_len=None if data else seq_len,
        data=str(data) if data else "synthetic", n_batches=len(batches), seed=seed, data_seed=data_seed,
        betas=list(betas), weight_decay=weight_decay, clip=clip, device=str(device),
        plants=[str(p) for p in plant_list], out=out,
    )
    return Plan(spec, attention, modes, dtype_list, lrs, steps, repeats, batches, device, plant_list, settings)


def run_plan(plan: Plan, on_step: Callable[[], None] | None = None,
             on_config: Callable[[ConfigResult], None] | None = None,
             results: list[ConfigResult] | None = None) -> list[ConfigResult]:
    """Run the configuration matrix: attention x mode x dtype x lr (models are built once per
    attention x dtype; every configuration starts from the same seeded weights).

    Each finished configuration is appended to ``results`` (a new list unless given; pass one to keep
    the finished configurations when an interrupt arrives) and handed to ``on_config``.
    """
    results = [] if results is None else results
    with planted_registered(bool(plan.plants)):
        _run_matrix(plan, results, on_step, on_config)
    return results


def _run_matrix(plan: Plan, results: list, on_step, on_config) -> None:
    s = plan.settings
    for dtype in plan.dtypes:
        for attention in plan.attention:
            model = build(plan.spec, attention=attention, dtype=dtype, device=plan.device, seed=s.seed,
                          plants=plan.plants)
            init_state = {n: p.detach().clone() for n, p in model.named_parameters()}
            for mode in plan.modes:
                for lr in plan.lrs:
                    res = run_config(model, init_state, plan.batches, attention=attention, mode=mode, dtype=dtype,
                                     lr=lr, steps=plan.steps, repeats=plan.repeats, betas=tuple(s.betas),
                                     weight_decay=s.weight_decay, clip=s.clip, seed=s.seed, on_step=on_step)
                    results.append(res)
                    if on_config is not None:
                        on_config(res)
            del model, init_state


# Batches described in a result record (SFTResult.batches); the rest are counted.
MAX_DESCRIBED_BATCHES = 256


def describe_batches(batches: Sequence[SFTBatch], steps: int) -> tuple[list[dict[str, Any]], int]:
    """(descriptions of the first :data:`MAX_DESCRIBED_BATCHES` distinct batches the ``steps`` use, how
    many more they use): a record stays small however many steps run."""
    used = min(len(batches), steps)
    shown = min(used, MAX_DESCRIBED_BATCHES)
    return [batches[i].describe() for i in range(shown)], used - shown


def run(plan: Plan, *, command: Sequence[str] = (), on_step=None, on_config=None) -> SFTResult:
    """Run ``plan`` and return the whole record (nothing is written; see :func:`save`).

    An interrupt (``KeyboardInterrupt``, which ``bench.errors.Terminated`` is) ends the run early: the
    record then has status ``interrupted`` and holds the configurations that finished (it is returned,
    not raised).
    """
    started = now()
    configs: list[ConfigResult] = []
    status = "complete"
    try:
        run_plan(plan, on_step=on_step, on_config=on_config, results=configs)
    except KeyboardInterrupt:
        status = "interrupted"
    return make_record(plan, command=command, started=started, status=status, configs=configs)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_record(plan: Plan, *, command: Sequence[str], started: str, status: str, configs: list[ConfigResult],
                distributed: dict[str, Any] | None = None) -> SFTResult:
    """The result record of a finished (or interrupted) run of ``plan``."""
    env = capture_environment(plan.device, seeds={"model": plan.settings.seed, "data": plan.settings.data_seed})
    described, not_described = describe_batches(plan.batches, plan.steps)
    return SFTResult(
        schema=SCHEMA, run_id=new_run_id(), started=started, finished=now(), status=status,
        command=list(command), settings=plan.settings, environment=env,
        modes=[MODES[m].to_dict() for m in plan.modes],
        model_config={k: v for k, v in plan.spec.config.__dict__.items()},
        batches=described, configs=configs, batches_not_described=not_described, distributed=distributed,
        coverage=device_coverage(plan.device, threads=None if distributed else torch.get_num_threads(),
                                 distributed=distributed is not None),
    )


def save(result: SFTResult, out_dir: str | Path) -> Path:
    """Write ``result`` atomically to a new file in ``out_dir`` (``sft-<date>-<time>-<device>-<id>.json``)."""
    out = check_out_dir(out_dir)
    path = result_path(out, "sft", device_label(result.environment), result.run_id)
    return write_json_atomic(path, result)
