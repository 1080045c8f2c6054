"""Ahead-of-time compile table: every Triton kernel specialisation detbench launches at Qwen shapes.

No GPU is needed. The launches are *recorded* by running the real host wrappers (the model's forward
and backward through the backend registry, and the attention wrapper with a padded mask), with every
``kernel[grid](...)`` turned into a record instead of a launch, once per target: some wrappers choose
their launch configs by the GPU's compute capability (``kernels.matmul``, ``kernels.attention``), and
recording for a target makes them choose as on it (:func:`assume_target`). Each distinct
specialisation is then compiled by Triton's own JIT path (``kernel.run(..., warmup=True)``) against a
stand-in driver that reports the target GPU, so divisibility attributes, constexprs, dtypes, warps and
stages are exactly what the runtime computes there. Registers and spills come from ``ptxas -v`` (or,
for a Triton cache hit, from ``cuobjdump -res-usage``), shared memory from the compiled kernel's
metadata::

    python -m kernels.aot                                  # sm_80 and sm_90a, every real preset
    python -m kernels.aot --subset --targets sm_90a        # CI: one preset, bf16, every kernel once
    python -m kernels.aot --jobs 16 --json results/aot-triton3.6.0.json --markdown results/aot-triton3.6.0.md
    python -m kernels.aot --kernels attention,_rmsnorm_bwd_kernel   # only these kernels (modules or names)
    python -m kernels.aot --targets sm_90a --cache-dir .triton-aot   # fill a Triton cache to carry to a GPU
    python -m kernels.aot --relocate-cache .triton-aot      # after moving it: rewrite its absolute paths

Exit status: 0 when every specialisation compiled within the target's shared memory without register
spills, 1 when one did not, 2 for bad input. As a library::

    with record_launches(TARGETS["sm_80"]) as launches:   # the launch configs chosen on an A100
        rmsnorm(x_meta, w_meta, 1e-6).sum().backward()
    [launch.kernel for launch in launches]   # ['kernels.rmsnorm._rmsnorm_fwd_kernel', ...]
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import contextvars
import datetime as _dt
import hashlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

import kernels
from kernels import _common
from qwen_layers import registry
from qwen_layers.backends import padded_causal_mask
from qwen_layers.config import PRESETS, QwenConfig
from qwen_layers.model import QwenForCausalLM

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
except ImportError:  # no Triton on this platform: main() says so and exits 2
    triton = None
try:  # the compile half: Triton's knobs (hooks, listener, scoped settings); recording works without them
    from triton import knobs
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import driver
    from triton.runtime.cache import triton_key
except ImportError:
    knobs = None

__all__ = [
    "TARGETS", "Target", "Shape", "Launch", "TensorStandIn", "Specialisation", "CompileResult", "Entry",
    "discover_kernels", "record_launches", "record_presets", "specialise", "compile_job", "judge",
    "relocate_cache", "main",
]

# ================================================================================================
# targets and the shapes launched
# ================================================================================================


@dataclass(frozen=True)
class Target:
    """A GPU architecture to compile for, and the most dynamic shared memory one block may opt into.

    ``max_shared`` is ``cudaDevAttrMaxSharedMemoryPerBlockOptin`` (CUDA C Programming Guide, "Technical
    Specifications per Compute Capability"), the figure Triton's launcher compares ``metadata.shared``
    with before it raises OutOfResources.
    """

    name: str
    capability: int
    max_shared: int  # bytes
    gpus: str


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("sm_80", 80, 166912, "A100 (163 KiB)"),
    Target("sm_86", 86, 101376, "A10, RTX 30xx (99 KiB)"),
    Target("sm_89", 89, 101376, "L4, L40, RTX 40xx (99 KiB)"),
    # Triton names capability 9.0 sm_90a (wgmma needs the arch-specific target).
    Target("sm_90a", 90, 232448, "H100, H200 (227 KiB)"),
)}
DEFAULT_TARGETS = ("sm_80", "sm_90a")
REGISTERS_PER_BLOCK = 65536  # register file one block may use, every architecture above

# The real presets (published architectures with the 151936-word vocabulary), not the tiny test ones.
REAL_PRESETS = tuple(name for name, c in PRESETS.items() if c.published_params is not None)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TWINS = ("deterministic", "atomic")

# --subset: qwen2.5-0.5b is the preset with a projection bias (the only user of the bias-gradient
# kernels), so with bf16 and both twins every kernel is compiled at least once.
SUBSET_PRESETS = ("qwen2.5-0.5b",)
SUBSET_DTYPES = ("bf16",)
SUBSET_TARGETS = ("sm_90a",)


@dataclass(frozen=True)
class Shape:
    """Tokens per launch: ``batch`` sequences of ``seq`` tokens (bench's cuda profile: 4 x 2048).

    A specialisation depends on sizes only through which integer arguments equal 1 or are multiples of
    16, so any batch and sequence length with the same answers (every multiple of 16 above 16) gives the
    same table. The padded attention call right-pads the batch to lengths ``seq, 3/4, 1/2, 1/4 seq, ...``.
    """

    batch: int = 4
    seq: int = 2048

    def padded_lengths(self) -> list[int]:
        return [max(1, self.seq - (i % 4) * self.seq // 4) for i in range(self.batch)]


# ================================================================================================
# which functions are kernels
# ================================================================================================


def _jit_objects(module) -> dict[str, Any]:
    """The module's own ``@triton.jit`` functions (interpreted ones under TRITON_INTERPRET=1)."""
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, (JITFunction, InterpretedFunction)) and obj.fn.__module__ == module.__name__}


def discover_kernels() -> dict[str, Any]:
    """Every launchable ``@triton.jit`` kernel of ``kernels/``, by ``module.name``.

    Found by scanning the modules of :data:`kernels.KERNEL_MODULES` for JIT functions and leaving out
    the device helpers, i.e. those another JIT function of the module calls (``_load_kv``, ...).
    """
    found = {}
    for short in kernels.KERNEL_MODULES:
        module = importlib.import_module(f"kernels.{short}")
        jitted = _jit_objects(module)
        called = set()
        for obj in jitted.values():
            tree = ast.parse(textwrap.dedent(inspect.getsource(obj.fn)))
            called |= {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        found.update({f"{module.__name__}.{name}": obj for name, obj in jitted.items() if name not in called})
    return found


def kernel_name(kernel) -> str:
    return f"{kernel.fn.__module__}.{kernel.fn.__name__}"


def resolve_kernel(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


# ================================================================================================
# recording launches
# ================================================================================================


class TensorStandIn:
    """What Triton's specialiser reads of a tensor argument: its dtype and whether its address is a
    multiple of 16 (the ``tt.divisibility`` attribute). Light and picklable, for compile workers.

    The recorded tensors are meta tensors (``data_ptr()`` is 0, which Triton takes as 16-byte aligned)
    or fresh CPU tensors (the allocator aligns to 64 bytes). On the GPU, PyTorch's caching allocator
    hands out 512-byte aligned blocks and the wrappers pass whole tensors or views at offset 0, so
    "aligned" is what the runtime sees there too.
    """

    __slots__ = ("dtype", "aligned")

    def __init__(self, dtype: torch.dtype, aligned: bool) -> None:
        self.dtype, self.aligned = dtype, aligned

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8  # only the address modulo 16 matters to the specialiser

    def __eq__(self, other) -> bool:
        return isinstance(other, TensorStandIn) and (self.dtype, self.aligned) == (other.dtype, other.aligned)

    def __hash__(self) -> int:
        return hash((self.dtype, self.aligned))

    def __repr__(self) -> str:
        return f"TensorStandIn({self.dtype}, aligned={self.aligned})"

    def __getstate__(self):
        return self.dtype, self.aligned

    def __setstate__(self, state) -> None:
        self.dtype, self.aligned = state


def _stand_in(value):
    if isinstance(value, torch.Tensor):
        return TensorStandIn(value.dtype, value.data_ptr() % 16 == 0)
    return value


@dataclass(frozen=True)
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` a wrapper made, with tensors replaced by stand-ins."""

    kernel: str  # module.name
    args: tuple
    kwargs: tuple  # sorted (name, value) pairs: launch options (num_warps, ...) and keyword arguments
    grid: tuple
    site: str  # the call site label set by whoever recorded (preset/dtype/twin/scenario)
    phase: str  # "forward", or "backward" when autograd's engine was running a backward node

    @property
    def call(self) -> tuple:
        """What decides the specialisation: the kernel and its arguments (not the grid, not the site)."""
        return self.kernel, self.args, self.kwargs


_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar("kernels_aot_sink", default=None)
_SITE: contextvars.ContextVar[str] = contextvars.ContextVar("kernels_aot_site", default="")


@contextlib.contextmanager
def call_site(label: str) -> Iterator[None]:
    """Launches recorded inside the block are labelled ``label``."""
    token = _SITE.set(label)
    try:
        yield
    finally:
        _SITE.reset(token)


def _recording_getitem(original: Callable) -> Callable:
    def getitem(self, grid):
        sink = _SINK.get()
        if sink is None:  # another thread or context: the real launch
            return original(self, grid)

        def record(*args, **kwargs):
            backward = torch._C._current_autograd_node() is not None  # set while autograd runs a backward node
            sink.append(Launch(kernel_name(self), tuple(_stand_in(a) for a in args),
                               tuple(sorted((k, _stand_in(v)) for k, v in kwargs.items())),
                               tuple(grid) if not callable(grid) else ("callable",), _SITE.get(),
                               "backward" if backward else "forward"))

        return record

    return getitem


@contextlib.contextmanager
def assume_target(target: Target) -> Iterator[None]:
    """Within the block, in this context only, the wrappers choose their launch configs for ``target``.

    A kernel module whose configs depend on the GPU (``kernels.matmul``, ``kernels.attention``) picks
    them from the device's compute capability, and for tensors on other devices (meta, CPU) from the
    capability its ``assume_capability(capability)`` context manager sets; this enters that of every
    kernel module that has one.
    """
    capability = divmod(target.capability, 10)
    with contextlib.ExitStack() as stack:
        for short in kernels.KERNEL_MODULES:
            assume = getattr(importlib.import_module(f"kernels.{short}"), "assume_capability", None)
            if assume is not None:
                stack.enter_context(assume(capability))
        yield


@contextlib.contextmanager
def record_launches(target: Target | None = None) -> Iterator[list[Launch]]:
    """Within the block, in this context, every Triton kernel launch ``kernel[grid](...)`` is appended to
    the list yielded instead of running, and the wrappers accept meta and CPU tensors
    (``_common.recording_launches``). With ``target``, the wrappers choose their launch configs as on
    that GPU (:func:`assume_target`); without, as for tensors off CUDA (the kernels' defaults, Hopper's).

    ``__getitem__`` of the JIT function classes (compiled and interpreted) is replaced for the block and
    restored in ``finally``; the replacement launches as usual outside this context. Compiles
    (``kernel.run(..., warmup=True)``) do not go through it.
    """
    launches: list[Launch] = []
    classes = {JITFunction} | {type(k) for k in discover_kernels().values()}
    saved = {cls: cls.__dict__.get("__getitem__") for cls in classes}
    token = _SINK.set(launches)
    try:
        for cls in classes:
            cls.__getitem__ = _recording_getitem(cls.__getitem__)
        with _common.recording_launches(), (assume_target(target) if target else contextlib.nullcontext()):
            yield launches
    finally:
        _SINK.reset(token)
        for cls, original in saved.items():
            if original is None:  # inherited: remove the shadowing attribute
                del cls.__getitem__
            else:
                cls.__getitem__ = original


def twin_backends(twin: str) -> dict[str, str]:
    """Registry backend per op for one twin: ``triton`` everywhere (deterministic), or each op's atomic
    twin where it has one (``triton-atomic``); ops without a Triton backend keep ``eager``."""
    out = {}
    for op in registry.OPS:
        if "triton" not in registry.names(op):
            continue
        det = registry.get(op, "triton")
        out[op] = det.name if twin == "deterministic" else (det.twin or det.name)
    return out


def record_model(config: QwenConfig, dtype: torch.dtype, twin: str, shape: Shape) -> None:
    """Forward and backward of the causal LM (one decoder layer: the layers are alike) on meta tensors,
    with labels, so the loss and the LM head run too. Every op on its Triton backend of ``twin``."""
    with torch.device("meta"):
        model = QwenForCausalLM(config.replace(num_hidden_layers=1), twin_backends(twin)).to(dtype)
    ids = torch.zeros(shape.batch, shape.seq, dtype=torch.long, device="meta")
    model(ids, labels=ids).loss.backward()


def record_padded_attention(config: QwenConfig, dtype: torch.dtype, twin: str, shape: Shape) -> None:
    """Forward and backward of the attention backend with a right-padded causal mask, as the model passes
    it for an SFT batch. On CPU tensors, not meta: the wrapper reads the mask back to validate it."""
    b, s, d = shape.batch, shape.seq, config.head_dim
    q = torch.empty(b, config.num_attention_heads, s, d, dtype=dtype, requires_grad=True)
    k = torch.empty(b, config.num_key_value_heads, s, d, dtype=dtype, requires_grad=True)
    v = torch.empty(b, config.num_key_value_heads, s, d, dtype=dtype, requires_grad=True)
    lengths = torch.tensor(shape.padded_lengths())
    keep = (torch.arange(s)[None, :] < lengths[:, None]).long()
    attention = registry.resolve("attention", twin_backends(twin)["attention"], q.device)
    o = attention(q, k, v, scale=d ** -0.5, causal=True, attn_mask=padded_causal_mask(keep, s))
    o.backward(torch.empty_like(o))


SCENARIOS: dict[str, Callable[[QwenConfig, torch.dtype, str, Shape], None]] = {
    "model": record_model,
    "attention-padded": record_padded_attention,
}


def record_presets(presets: Sequence[str], dtypes: Sequence[str], shape: Shape,
                   twins: Sequence[str] = TWINS, *, target: Target | None = None) -> list[Launch]:
    """Every launch of every scenario for each preset x dtype x twin, labelled ``preset/dtype/twin/scenario``,
    with the launch configs the wrappers choose on ``target`` (see :func:`record_launches`)."""
    with record_launches(target) as launches:
        for preset in presets:
            for dtype in dtypes:
                for twin in twins:
                    for scenario, run in SCENARIOS.items():
                        with call_site(f"{preset}/{dtype}/{twin}/{scenario}"):
                            run(PRESETS[preset], DTYPES[dtype], twin, shape)
    return launches


# ================================================================================================
# specialising and compiling for a target without its GPU
# ================================================================================================


class _StandInDriver:
    """The three things ``JITFunction.run`` asks of Triton's active driver, answered for ``target``."""

    def __init__(self, target: Target, device: int) -> None:
        self._target = GPUTarget("cuda", target.capability, 32)
        self._device = device

    def get_current_device(self) -> int:
        return self._device

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self._target


@contextlib.contextmanager
def stand_in_driver(target: Target, *, device: int | None = None) -> Iterator[None]:
    """Make ``target`` Triton's active driver for the block. ``device`` keys the JIT's per-device caches
    (default: the capability, so each target keeps its own compiled kernels)."""
    previous = driver._active  # restored as it was: reset_active() would create the real (absent) driver
    driver.set_active(_StandInDriver(target, target.capability if device is None else device))
    try:
        yield
    finally:
        driver._active = previous


@dataclass(frozen=True)
class Specialisation:
    """What Triton's runtime makes of one call for one target (from its ``jit_cache_hook``)."""

    kernel: str
    target: str
    spec_id: str  # sha256 of Triton's serialised specialisation data, first 16 hex digits
    signature: dict  # parameter -> type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict  # declared tl.constexpr parameters -> value
    equal_to_1: tuple  # integer parameters specialised to the constant 1
    not_divisible_by_16: tuple  # integer and pointer parameters without the divisibility-by-16 attribute
    num_warps: int
    num_stages: int

    def summary(self) -> str:
        consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        ptrs = []
        for ty in self.signature.values():
            if ty.startswith("*") and ty[1:] not in ptrs:
                ptrs.append(ty[1:])
        parts = [consts, ",".join(ptrs), f"w{self.num_warps} s{self.num_stages}"]
        if self.equal_to_1:
            parts.append("=1:" + ",".join(self.equal_to_1))
        if self.not_divisible_by_16:
            parts.append("not16:" + ",".join(self.not_divisible_by_16))
        return " | ".join(p for p in parts if p)


def _plain(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    inner = getattr(value, "value", value)  # tl.constexpr
    return inner if isinstance(inner, (bool, int, float, str)) else str(value)


def specialise(kernel, args: tuple, kwargs: tuple, target: Target) -> Specialisation:
    """Run Triton's JIT front half for ``target`` (binder, options, cache key) and stop before compiling:
    its ``jit_cache_hook`` sees exactly the signature, constants and attributes a launch there would get."""
    seen: dict = {}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        seen.update(compile)
        return True  # "handled": Triton skips the compile

    # Its own device key: nothing is ever compiled into this cache, so the hook runs on every call.
    with stand_in_driver(target, device=-target.capability), knobs.runtime.scope():
        knobs.runtime.jit_cache_hook = hook
        kernel.run(*args, grid=(1,), warmup=True, **dict(kwargs))
    names = [p.name for p in kernel.params]
    declared = {p.name for p in kernel.params if p.is_constexpr}
    constants = {names[path[0]]: _plain(v) for path, v in seen["constants"].items()}
    divisible = {names[path[0]] for path, attrs in seen["configs"][0].items()
                 if any(a[0] == "tt.divisibility" and a[1] % 16 == 0 for a in attrs)}
    signature = {k: str(v) for k, v in seen["signature"].items()}
    # Pointers and integers Triton may mark divisible by 16 (floats and do_not_specialize ones it never does).
    specialisable = {p.name for p in kernel.params if not p.do_not_specialize
                     and (signature[p.name].startswith("*") or signature[p.name][0] in "iu")}
    return Specialisation(
        kernel=kernel_name(kernel), target=target.name,
        spec_id=hashlib.sha256(seen["specialization_data"].encode()).hexdigest()[:16],
        signature=signature,
        constexprs={n: constants[n] for n in names if n in declared},
        equal_to_1=tuple(n for n in names if n not in declared and n in constants and constants[n] == 1),
        not_divisible_by_16=tuple(n for n in names if n in specialisable and n not in divisible),
        num_warps=int(seen["num_warps"]), num_stages=int(seen["num_stages"]),
    )


@dataclass
class CompileResult:
    """The outcome of compiling one specialisation for one target."""

    spec_id: str
    kernel: str
    target: str
    ok: bool
    error: str | None = None
    compile_s: float = 0.0  # wall time of Triton's compile (a cache hit: loading it)
    cache_hit: bool | None = None  # Triton found it in its file cache
    stats_from: str | None = None  # "ptxas -v" (this compile's log) or "cuobjdump -res-usage" (a cache hit)
    registers: int | None = None  # per thread
    spill_stores: int | None = None  # bytes; None when unknown (a cache hit with a stack frame)
    spill_loads: int | None = None
    stack_frame: int | None = None  # bytes of local memory per thread
    shared: int | None = None  # bytes of dynamic shared memory per block (metadata.shared)
    num_warps: int | None = None
    triton_hash: str | None = None  # Triton's cache key hash (its cache folder is base32 of it)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def parse_ptxas_log(log: str) -> dict | None:
    """Registers of the entry function; stack frame and spills summed over every function in the log."""
    used = _PTXAS_USED.search(log)
    frames = [tuple(map(int, m)) for m in _PTXAS_FRAME.findall(log)]
    if used is None or not frames:
        return None
    return {"registers": int(used.group(1)), "stack_frame": max(f[0] for f in frames),
            "spill_stores": sum(f[1] for f in frames), "spill_loads": sum(f[2] for f in frames)}


def _res_usage(cubin: bytes) -> dict:
    """Registers and stack frame read back from a cubin. Spills live in the stack frame, so a zero frame
    means no spills; a nonzero one leaves them unknown (only ptxas's log counts them)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = _RES_USAGE.search(out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line: {out.strip()[:200]}")
    regs, stack, local = map(int, m.groups())
    frame = max(stack, local)
    return {"registers": regs, "stack_frame": frame, "spill_stores": 0 if frame == 0 else None,
            "spill_loads": 0 if frame == 0 else None}


def _first_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return "\n".join(lines[:n]) + ("\n..." if len(lines) > n else "")


def compile_job(kernel: str, args: tuple, kwargs: tuple, target: str, spec_id: str,
                cache_dir: str | None = None, binary_only: bool = False) -> CompileResult:
    """Compile one specialisation through ``kernel.run(..., warmup=True)`` for ``target`` (any process).

    ``cache_dir`` is Triton's cache folder for the compile (default: Triton's own); ``binary_only`` stores
    only the cubin and its metadata there (``TRITON_STORE_BINARY_ONLY``).
    """
    tgt = TARGETS[target]
    result = CompileResult(spec_id=spec_id, kernel=kernel, target=target, ok=False)
    events: dict = {}

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        events["cache_hit"] = cache_hit

    log = io.StringIO()
    start = time.perf_counter()
    try:
        with (stand_in_driver(tgt), knobs.cache.scope(), knobs.compilation.scope(), knobs.nvidia.scope(),
              contextlib.redirect_stdout(log)):
            if cache_dir is not None:
                knobs.cache.dir = cache_dir
            knobs.compilation.store_binary_only = binary_only
            knobs.compilation.listener = listener
            knobs.nvidia.dump_ptxas_log = True  # printed to stdout, which is captured in ``log``
            compiled = resolve_kernel(kernel).run(*args, grid=(1,), warmup=True, **dict(kwargs))
    except Exception as e:  # a compile error is a result to report, whatever its type
        result.compile_s = time.perf_counter() - start
        result.error = f"{type(e).__name__}: {_first_lines(e)}"
        return result
    result.compile_s = time.perf_counter() - start
    result.cache_hit = events.get("cache_hit", True)  # no event: compiled earlier in this process
    result.shared = int(compiled.metadata.shared)
    result.num_warps = int(compiled.metadata.num_warps)
    result.triton_hash = compiled.hash
    stats = parse_ptxas_log(log.getvalue())
    result.stats_from = "ptxas -v"
    if stats is None:
        stats = _res_usage(compiled.asm["cubin"])
        result.stats_from = "cuobjdump -res-usage"
    for key, value in stats.items():
        setattr(result, key, value)
    result.ok = True
    return result


def judge(result: CompileResult, target: Target) -> list[str]:
    """Why this specialisation would fail or be slow at run time on ``target``; empty when it is fine."""
    if not result.ok:
        return [f"compile failed: {(result.error or '').splitlines()[0] if result.error else 'unknown error'}"]
    problems = []
    if result.shared is not None and result.shared > target.max_shared:
        problems.append(f"shared memory {result.shared} B > {target.max_shared} B, the most one block may use "
                        f"on {target.name} ({target.gpus})")
    if result.spill_stores is None or result.spill_loads is None:
        problems.append(f"spills unknown: {result.stack_frame} B stack frame and no ptxas log (a cache hit); "
                        f"rerun with TRITON_ALWAYS_COMPILE=1")
    elif result.spill_stores or result.spill_loads:
        problems.append(f"register spills: {result.spill_stores} B stored, {result.spill_loads} B loaded")
    if result.registers is not None and result.num_warps is not None \
            and result.registers * result.num_warps * 32 > REGISTERS_PER_BLOCK:
        problems.append(f"{result.registers} registers x {result.num_warps * 32} threads > {REGISTERS_PER_BLOCK}")
    return problems


# ================================================================================================
# the table
# ================================================================================================


@dataclass
class Entry:
    """One row: one specialisation of one kernel for one target, what it costs, and who needs it."""

    kernel: str
    target: str
    spec_id: str
    summary: str
    specialisation: Specialisation
    result: CompileResult
    shared_limit: int
    problems: list[str]
    presets: list[str]
    call_sites: list[str]  # preset/dtype/twin/scenario/phase
    launches: int
    grid_example: list

    def to_json(self) -> dict:
        """The row as JSON; ``kernel``, ``target`` and ``spec_id`` once, at the top."""
        d = asdict(self)
        for part in ("specialisation", "result"):
            for k in ("kernel", "target", "spec_id"):
                del d[part][k]
        return d


@dataclass
class Plan:
    """Per target, the launches recorded for it grouped into distinct calls, and their distinct
    specialisations."""

    launches: dict[str, list[Launch]]  # target name -> the launches recorded with that target's configs
    specs: dict[tuple, Specialisation] = field(default_factory=dict)  # (call, target) -> specialisation
    jobs: list[tuple[Specialisation, Launch]] = field(default_factory=list)  # one per (target, spec_id)


def plan(launches: dict[str, list[Launch]], targets: Sequence[Target]) -> Plan:
    """Specialise each distinct call recorded for a target once for that target; one compile job per
    distinct specialisation. ``launches`` maps each target's name to the launches recorded for it
    (``record_presets(..., target=target)``: the launch configs may depend on the GPU)."""
    p = Plan(launches)
    for target in targets:
        first: dict[tuple, Launch] = {}
        for launch in launches[target.name]:
            first.setdefault(launch.call, launch)
        seen = set()
        for call, launch in first.items():
            spec = specialise(resolve_kernel(launch.kernel), launch.args, launch.kwargs, target)
            p.specs[(call, target.name)] = spec
            if spec.spec_id not in seen:
                seen.add(spec.spec_id)
                p.jobs.append((spec, launch))
    return p


def _cost_rank(job: tuple[Specialisation, Launch]) -> tuple:
    """Longest compiles first (attention, then the matmuls, float32 before 16-bit), for even workers."""
    spec, _ = job
    module = spec.kernel.split(".")[1]
    fp32 = any(t == "*fp32" for t in spec.signature.values()) and not any(t in ("*bf16", "*fp16")
                                                                         for t in spec.signature.values())
    return (module != "attention", module != "matmul", not fp32, spec.kernel)


def build_entries(p: Plan, results: dict[tuple, CompileResult], targets: Sequence[Target]) -> list[Entry]:
    """One judged row per compiled specialisation, with the launches (call sites, presets) that need it."""
    by_target = {t.name: t for t in targets}
    needs: dict[tuple, list[Launch]] = {}
    for t in targets:
        for launch in p.launches[t.name]:
            spec = p.specs[(launch.call, t.name)]
            needs.setdefault((t.name, spec.spec_id), []).append(launch)
    entries = []
    for spec, _ in p.jobs:
        key = (spec.target, spec.spec_id)
        result = results[key]
        used = needs[key]
        target = by_target[spec.target]
        entries.append(Entry(
            kernel=spec.kernel, target=spec.target, spec_id=spec.spec_id, summary=spec.summary(),
            specialisation=spec, result=result, shared_limit=target.max_shared, problems=judge(result, target),
            presets=sorted({u.site.split("/")[0] for u in used}),
            call_sites=sorted({f"{u.site}/{u.phase}" for u in used}), launches=len(used),
            grid_example=list(used[0].grid),
        ))
    entries.sort(key=lambda e: (e.kernel, e.target, e.summary))
    return entries


def _short_kernel(name: str) -> str:
    return name.removeprefix("kernels.")


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _spills(r: CompileResult) -> str:
    if not r.ok:
        return "-"
    if r.spill_stores is None:
        return f"?({r.stack_frame}B frame)"
    return "0" if not (r.spill_stores or r.spill_loads) else f"{r.spill_stores}/{r.spill_loads}"


def format_table(entries: list[Entry]) -> str:
    """One line per entry: kernel, specialisation, target, registers, spills, shared KiB, compile s."""
    header = ("kernel", "specialisation", "target", "regs", "spills B (st/ld)", "smem KiB", "compile s", "presets",
              "problems")
    rows = [header]
    for e in entries:
        r = e.result
        rows.append((_short_kernel(e.kernel), e.summary, e.target, "-" if r.registers is None else str(r.registers),
                     _spills(r), _kib(r.shared), f"{r.compile_s:.2f}" + (" (hit)" if r.cache_hit else ""),
                     ",".join(e.presets), "; ".join(e.problems) or "ok"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def counts(entries: list[Entry], launches: dict[str, list[Launch]], targets: Sequence[Target]) -> dict:
    """Totals, and per target; launches and distinct calls are counted per target (recorded once each)."""
    out = {"launches_recorded": sum(len(launches[t.name]) for t in targets),
           "distinct_calls": sum(len({x.call for x in launches[t.name]}) for t in targets),
           "specialisations": len(entries), "failures": sum(1 for e in entries if not e.result.ok),
           "with_problems": sum(1 for e in entries if e.problems),
           "spilling": sum(1 for e in entries if e.result.spill_stores or e.result.spill_loads),
           "cache_hits": sum(1 for e in entries if e.result.cache_hit), "per_target": {}}
    for t in targets:
        mine = [e for e in entries if e.target == t.name]
        biggest = max(mine, key=lambda e: e.result.shared or 0, default=None)
        out["per_target"][t.name] = {
            "launches_recorded": len(launches[t.name]),
            "distinct_calls": len({x.call for x in launches[t.name]}),
            "specialisations": len(mine),
            "compile_s": sum(e.result.compile_s for e in mine),
            "max_shared": biggest.result.shared if biggest else None,
            "max_shared_kernel": f"{_short_kernel(biggest.kernel)} [{biggest.summary}]" if biggest else None,
            "max_registers": max((e.result.registers or 0 for e in mine), default=None),
            "spilling": sum(1 for e in mine if e.result.spill_stores or e.result.spill_loads),
            "failures": sum(1 for e in mine if not e.result.ok),
        }
    return out


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_markdown(payload: dict) -> str:
    """A short summary: versions, settings, counts, then per kernel and target the worst case."""
    c = payload["counts"]
    chosen = payload["settings"].get("kernels")
    only = f"; only the kernels {', '.join(map(_short_kernel, chosen))}" if chosen else ""
    lines = [
        f"# Ahead-of-time compile table (triton {payload['versions']['triton']})", "",
        f"Regenerate: `{payload['command']}` (torch {payload['versions']['torch']}, ptxas "
        f"{payload['versions']['ptxas']}, commit {payload['commit'] or 'unknown'}).", "",
        f"Presets {', '.join(payload['settings']['presets'])}; dtypes {', '.join(payload['settings']['dtypes'])}; "
        f"deterministic and atomic twins; the causal LM (forward + backward, one layer) and padded attention at "
        f"batch {payload['settings']['batch']} x seq {payload['settings']['seq']}{only}.", "",
        f"{c['launches_recorded']} launches recorded (once per target, with the launch configs the wrappers choose "
        f"there), {c['distinct_calls']} distinct calls, "
        f"{c['specialisations']} specialisations compiled in {payload['wall_s']:.0f} s with "
        f"{payload['settings']['jobs']} jobs ({c['cache_hits']} Triton cache hits): {c['failures']} failed, "
        f"{c['spilling']} spill, {c['with_problems']} with problems.", "",
        "| target | specialisations | compile s (sum) | max registers | max shared KiB (limit) | largest |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in c["per_target"].items():
        limit = TARGETS[name].max_shared
        lines.append(f"| {name} | {t['specialisations']} | {t['compile_s']:.0f} | {t['max_registers']} | "
                     f"{_kib(t['max_shared'])} ({_kib(limit)}) | {_cell(t['max_shared_kernel'])} |")
    lines += ["", "Per kernel (the worst specialisation of each column):", "",
              "| kernel | target | specs | max regs | spills B (st/ld, max) | max smem KiB | compile s (sum) |",
              "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for e in payload["entries"]:
        groups.setdefault((e["kernel"], e["target"]), []).append(e)
    for (kernel, target), es in sorted(groups.items()):
        rs = [e["result"] for e in es]
        stores = [r["spill_stores"] for r in rs if r["spill_stores"] is not None]
        loads = [r["spill_loads"] for r in rs if r["spill_loads"] is not None]
        unknown = sum(1 for r in rs if r["ok"] and r["spill_stores"] is None)
        spill = f"{max(stores, default=0)}/{max(loads, default=0)}" + (f" ({unknown} unknown)" if unknown else "")
        lines.append(f"| {_short_kernel(kernel)} | {target} | {len(es)} | "
                     f"{max((r['registers'] or 0) for r in rs)} | {spill} | "
                     f"{_kib(max((r['shared'] or 0) for r in rs))} | {sum(r['compile_s'] for r in rs):.1f} |")
    bad = [e for e in payload["entries"] if e["problems"]]
    if bad:
        lines += ["", "Problems:", ""]
        lines += [f"- {_short_kernel(e['kernel'])} {e['target']} [{e['summary']}]: {'; '.join(e['problems'])}"
                  for e in bad]
    if payload["uncovered_kernels"]:
        lines += ["", f"Never launched at these settings: {', '.join(payload['uncovered_kernels'])}"]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a plain file's mode instead
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ================================================================================================
# Triton cache folders
# ================================================================================================

INTERMEDIATE_SUFFIXES = (".source", ".ttir", ".ttgir", ".llir", ".ptx")
MANIFEST = "detbench-aot-manifest.json"  # next to the <hash> folders; Triton never reads it


def cache_fingerprint() -> dict:
    """What Triton's cache key depends on besides the kernel and its specialisation, in this process:
    Triton's version and files (``triton_key``: its Python sources and libtriton), the ptxas version
    (in the NVIDIA backend's hash), the cache-invalidating environment variables, and the kernel sources
    (a kernel's hash covers its source text and its first line number). ``backend_hash`` is the NVIDIA
    backend's own hash per target: the ptxas version and the architecture."""
    root = Path(kernels.__file__).parent
    return {
        "triton": triton.__version__,
        "triton_key_sha256": hashlib.sha256(triton_key().encode()).hexdigest(),
        "backend_hash": {t.name: make_backend(GPUTarget("cuda", t.capability, 32)).hash() for t in TARGETS.values()},
        "cache_env": dict(sorted(get_cache_invalidating_env_vars().items())),
        "kernel_sources_sha256": {f"{m}.py": hashlib.sha256((root / f"{m}.py").read_bytes()).hexdigest()
                                  for m in kernels.KERNEL_MODULES},
    }


def fingerprint_mismatch(recorded: dict, here: dict) -> list[str]:
    """Why a cache filled under ``recorded`` would miss under ``here`` (empty: it can hit)."""
    out = [f"{k}: cache {recorded.get(k)!r}, here {here[k]!r}" for k in ("triton", "triton_key_sha256", "backend_hash",
                                                                          "cache_env") if recorded.get(k) != here[k]]
    src = recorded.get("kernel_sources_sha256", {})
    changed = [m for m, h in here["kernel_sources_sha256"].items() if src.get(m) != h]
    if changed:
        out.append(f"kernel sources differ: {', '.join(changed)} (their kernels miss)")
    return out


def relocate_cache(cache_dir: Path, *, binary_only: bool = False) -> dict:
    """Point every ``__grp__*.json`` of a Triton cache folder at the files where the folder is now.

    Triton records absolute paths in its group files and treats a group with a missing file as a miss,
    so a moved folder misses until this runs. ``binary_only`` first deletes the intermediate files
    (.source, .ttir, .ttgir, .llir, .ptx), which a cache hit does not need. A group left without its
    metadata (.json) or cubin is deleted (a clean miss).
    """
    cache_dir = cache_dir.resolve()
    out = {"groups": 0, "rewritten": 0, "dropped_groups": 0, "deleted_files": 0}
    for grp in sorted(cache_dir.glob("*/__grp__*.json")):
        out["groups"] += 1
        folder = grp.parent
        if binary_only:
            for f in folder.iterdir():
                if f.suffix in INTERMEDIATE_SUFFIXES:
                    f.unlink()
                    out["deleted_files"] += 1
        try:
            children = json.loads(grp.read_text())["child_paths"]
        except (ValueError, KeyError, TypeError):
            children = {}
        fixed = {name: str(folder / name) for name in children if (folder / name).exists()}
        if not any(n.endswith(".json") for n in fixed) or not any(n.endswith(".cubin") for n in fixed):
            grp.unlink()
            out["dropped_groups"] += 1
            continue
        if fixed != children:
            write_atomic(grp, json.dumps({"child_paths": fixed}))
            out["rewritten"] += 1
    out["bytes"] = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    manifest = cache_dir / MANIFEST
    if manifest.is_file() and knobs is not None:
        recorded = json.loads(manifest.read_text()).get("fingerprint", {})
        out["mismatch"] = fingerprint_mismatch(recorded, cache_fingerprint())
    else:
        out["mismatch"] = None  # no manifest (or a Triton without knobs): nothing to compare
    return out


# ================================================================================================
# command line
# ================================================================================================


class _BadInput(Exception):
    pass


def _csv(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise _BadInput(f"--{what}: empty list; choose from {', '.join(known)}")
    for x in items:
        if x not in known:
            raise _BadInput(f"--{what}: unknown {what.rstrip('s')} {x!r}; choose from {', '.join(known)}")
    return tuple(dict.fromkeys(items))


def select_kernels(text: str) -> tuple[str, ...]:
    """``--kernels``: the full names (``kernels.module.name``) of the kernels each comma-separated item
    names, as a module (``attention``), a kernel (``_attn_bwd_dq_kernel``) or both
    (``attention._attn_bwd_dq_kernel``, with or without the ``kernels.`` prefix)."""
    known = sorted(discover_kernels())
    items = tuple(x.strip().removeprefix("kernels.") for x in text.split(",") if x.strip())
    if not items:
        raise _BadInput("--kernels: empty list; name a module (attention) or a kernel (_attn_bwd_dq_kernel)")
    chosen: dict[str, None] = {}
    for item in items:
        hits = [k for k in known if item in (k.split(".")[1], k.split(".")[2], k.removeprefix("kernels."))]
        if not hits:
            raise _BadInput(f"--kernels: no kernel or module {item!r}; kernels: "
                            f"{', '.join(_short_kernel(k) for k in known)}")
        chosen.update(dict.fromkeys(hits))
    return tuple(chosen)


def _writable_file(path_text: str, flag: str) -> Path:
    path = Path(path_text)
    if path.is_dir():
        raise _BadInput(f"{flag} {path_text}: is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise _BadInput(f"{flag} {path_text}: folder {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".aot-probe-"):
            pass
    except OSError as e:
        raise _BadInput(f"{flag} {path_text}: cannot write in {parent} ({e.strerror})") from None
    return path


def _writable_dir(path_text: str, flag: str) -> Path:
    path = Path(path_text)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".aot-probe-"):
            pass
    except OSError as e:
        raise _BadInput(f"{flag} {path_text}: cannot create or write this folder ({e.strerror})") from None
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kernels.aot",
        description="Compile every Triton kernel specialisation detbench launches at Qwen shapes, ahead of time "
                    "and without a GPU; print registers, spills and shared memory per target. Exit 1 if one "
                    "fails to compile, exceeds the target's shared memory or spills registers; 2 for bad input.")
    p.add_argument("--targets", help=f"comma-separated, from {', '.join(TARGETS)} (default "
                                     f"{','.join(DEFAULT_TARGETS)}; with --subset {','.join(SUBSET_TARGETS)})")
    p.add_argument("--presets", help=f"comma-separated qwen_layers presets (default: {','.join(REAL_PRESETS)})")
    p.add_argument("--dtypes", help=f"comma-separated, from {', '.join(DTYPES)} (default: all)")
    p.add_argument("--kernels", metavar="NAME,...",
                   help="compile only these kernels: a module (attention), a kernel (_attn_bwd_dq_kernel) or "
                        "both (attention._attn_bwd_dq_kernel); the launches are recorded as usual (default: all)")
    p.add_argument("--subset", action="store_true",
                   help=f"CI: preset {','.join(SUBSET_PRESETS)}, {','.join(SUBSET_DTYPES)}, both twins, "
                        f"{','.join(SUBSET_TARGETS)} unless --targets says otherwise: every kernel compiled at least "
                        f"once (about 2 minutes on 2 cores)")
    p.add_argument("--batch", type=int, default=Shape.batch, help=f"sequences per batch (default {Shape.batch})")
    p.add_argument("--seq", type=int, default=Shape.seq, help=f"tokens per sequence (default {Shape.seq})")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    p.add_argument("--json", metavar="PATH", help="write the table as JSON (temp file + rename)")
    p.add_argument("--markdown", metavar="PATH", help="write a short Markdown summary (temp file + rename)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="compile into this Triton cache folder (default: Triton's own, TRITON_CACHE_DIR)")
    p.add_argument("--binary-only", action="store_true",
                   help="with --cache-dir or --relocate-cache: keep only cubins and their metadata in the cache")
    p.add_argument("--relocate-cache", metavar="DIR",
                   help="rewrite the absolute paths in DIR's Triton group files for where DIR is now, then exit")
    p.add_argument("--quiet", action="store_true", help="no table on stdout (summary and problems only)")
    return p


def _command_line(argv: Sequence[str]) -> str:
    return "python -m kernels.aot " + " ".join(shlex.quote(a) for a in argv)


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def compile_all(p: Plan, jobs: int, cache_dir: str | None, binary_only: bool,
                progress: Callable[[str], None]) -> dict[tuple, CompileResult]:
    """Compile every job of ``p`` (``jobs`` processes, or this one), reporting progress about 10 times."""
    order = sorted(p.jobs, key=_cost_rank)
    results: dict[tuple, CompileResult] = {}
    total, start, last = len(order), time.perf_counter(), [0.0]
    step = max(1, total // 10)

    def done(result: CompileResult) -> None:
        results[(result.target, result.spec_id)] = result
        n, now = len(results), time.perf_counter()
        if n % step == 0 or n == total or now - last[0] > 30:
            last[0] = now
            elapsed = now - start
            eta = elapsed / n * (total - n)
            hits = sum(1 for r in results.values() if r.cache_hit)
            fails = sum(1 for r in results.values() if not r.ok)
            progress(f"compiled {n}/{total} ({hits} cache hits, {fails} failed) in {_fmt_s(elapsed)}, "
                     f"ETA {_fmt_s(eta)}")

    calls = [(spec.kernel, launch.args, launch.kwargs, spec.target, spec.spec_id, cache_dir, binary_only)
             for spec, launch in order]
    if jobs == 1:
        for c in calls:
            done(compile_job(*c))
        return results
    # spawn: a fresh interpreter per worker, nothing inherited from this process's Triton state
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_job, *c): c for c in calls}
        for fut in concurrent.futures.as_completed(futures):
            kernel, _, _, target, spec_id, _, _ = futures[fut]
            try:
                done(fut.result())
            except Exception as e:  # a worker that died: the compile is a failure to report
                done(CompileResult(spec_id=spec_id, kernel=kernel, target=target, ok=False,
                                   error=f"compile worker failed: {type(e).__name__}: {_first_lines(e)}"))
    return results


def _validate(args) -> dict:
    if triton is None:
        raise _BadInput("package triton is not installed (Linux only: pip install triton)")
    if args.relocate_cache is not None:
        d = Path(args.relocate_cache)
        if not d.is_dir():
            raise _BadInput(f"--relocate-cache {args.relocate_cache}: no such folder")
        if not any(d.glob("*/__grp__*.json")):
            raise _BadInput(f"--relocate-cache {args.relocate_cache}: no Triton cache group files "
                            f"(<hash>/__grp__*.json) in this folder")
        return {}
    cfg = {
        "targets": _csv(args.targets, list(TARGETS), "targets") if args.targets is not None
        else (SUBSET_TARGETS if args.subset else DEFAULT_TARGETS),
        "presets": _csv(args.presets, list(PRESETS), "presets") if args.presets is not None
        else (SUBSET_PRESETS if args.subset else REAL_PRESETS),
        "dtypes": _csv(args.dtypes, list(DTYPES), "dtypes") if args.dtypes is not None
        else (SUBSET_DTYPES if args.subset else tuple(DTYPES)),
    }
    cfg["kernels"] = select_kernels(args.kernels) if args.kernels is not None else None
    if args.jobs < 1:
        raise _BadInput(f"--jobs {args.jobs}: need at least 1")
    if args.batch < 1 or args.seq < 2:
        raise _BadInput(f"--batch {args.batch} --seq {args.seq}: need a batch of at least 1 and sequences of at "
                        f"least 2 tokens")
    cfg["json"] = _writable_file(args.json, "--json") if args.json else None
    cfg["markdown"] = _writable_file(args.markdown, "--markdown") if args.markdown else None
    cfg["cache_dir"] = str(_writable_dir(args.cache_dir, "--cache-dir").resolve()) if args.cache_dir else None
    if args.binary_only and cfg["cache_dir"] is None:
        raise _BadInput("--binary-only needs --cache-dir (or --relocate-cache): it would prune Triton's default cache")
    if _common.INTERPRET:
        raise _BadInput("TRITON_INTERPRET=1 is set: the kernels were defined for the CPU interpreter and cannot "
                        "be compiled; unset it")
    if knobs is None:
        raise _BadInput(f"triton {triton.__version__} has no triton.knobs, which compiling ahead of time needs "
                        f"(tested with triton 3.6 and 3.8)")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        cfg = _validate(args)
    except _BadInput as e:
        print(f"kernels.aot: {e}", file=sys.stderr)
        return 2
    if args.relocate_cache is not None:
        moved = relocate_cache(Path(args.relocate_cache), binary_only=args.binary_only)
        print(f"{args.relocate_cache}: {moved['groups']} groups, {moved['rewritten']} rewritten for "
              f"{Path(args.relocate_cache).resolve()}, {moved['dropped_groups']} dropped, "
              f"{moved['deleted_files']} intermediate files deleted; {moved['bytes'] / 2**20:.1f} MiB")
        if moved["mismatch"] is None:
            print(f"  no {MANIFEST} (or no triton.knobs here): cannot tell whether this Triton and ptxas can hit "
                  f"these entries")
        elif moved["mismatch"]:
            print("  WARNING: filled under another setup, these lookups will miss: " + "; ".join(moved["mismatch"]))
        else:
            print(f"  {MANIFEST}: same Triton files, ptxas, environment and kernel sources as this process")
        return 0

    def progress(msg: str) -> None:
        print(f"[kernels.aot] {msg}", file=sys.stderr, flush=True)

    targets = [TARGETS[t] for t in cfg["targets"]]
    shape = Shape(args.batch, args.seq)
    t0 = time.perf_counter()
    wanted = cfg["kernels"] or tuple(discover_kernels())
    launches = {t.name: [x for x in record_presets(cfg["presets"], cfg["dtypes"], shape, target=t) if x.kernel in wanted]
                for t in targets}
    p = plan(launches, targets)
    record_s = time.perf_counter() - t0
    uncovered = sorted(set(wanted) - {x.kernel for per_target in launches.values() for x in per_target})
    recorded = ", ".join(f"{len(xs)} for {name} ({len({x.call for x in xs})} distinct calls)"
                         for name, xs in launches.items())
    progress(f"recorded {recorded} in {record_s:.1f} s; compiling {len(p.jobs)} specialisations with "
             f"{args.jobs} job(s)")
    try:
        results = compile_all(p, args.jobs, cfg["cache_dir"], args.binary_only, progress)
    except KeyboardInterrupt:
        print("kernels.aot: interrupted; nothing written", file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0
    entries = build_entries(p, results, targets)
    payload = {
        "schema": "detbench.aot/1",
        "command": _command_line(argv),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "versions": {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
                     "ptxas": knobs.nvidia.ptxas.version},
        "targets": [asdict(t) for t in targets],
        "settings": {"presets": list(cfg["presets"]), "dtypes": list(cfg["dtypes"]), "twins": list(TWINS),
                     "scenarios": list(SCENARIOS), "batch": shape.batch, "seq": shape.seq,
                     "padded_lengths": shape.padded_lengths(), "subset": args.subset,
                     "kernels": list(cfg["kernels"]) if cfg["kernels"] else None, "jobs": args.jobs,
                     "cache_dir": cfg["cache_dir"], "binary_only": args.binary_only},
        "wall_s": wall, "record_s": record_s,
        "counts": counts(entries, launches, targets),
        "uncovered_kernels": uncovered,
        "entries": [e.to_json() for e in entries],
    }
    if not args.quiet:
        print(format_table(entries))
    c = payload["counts"]
    per_target = ", ".join(f"{n}: {t['specialisations']}" for n, t in c["per_target"].items())
    print(f"\n{c['specialisations']} specialisations ({per_target}) from {c['launches_recorded']} launches in "
          f"{_fmt_s(wall)}: {c['failures']} failed, {c['spilling']} spill, {c['with_problems']} with problems, "
          f"{c['cache_hits']} Triton cache hits")
    for name, t in c["per_target"].items():
        print(f"  {name}: max shared {_kib(t['max_shared'])} KiB of {_kib(TARGETS[name].max_shared)} "
              f"({t['max_shared_kernel']}), max {t['max_registers']} registers, compile {t['compile_s']:.0f} s")
    if uncovered:
        print(f"  never launched at these settings: {', '.join(uncovered)}")
    for e in entries:
        if e.problems:
            print(f"  PROBLEM {_short_kernel(e.kernel)} {e.target} [{e.summary}]: {'; '.join(e.problems)}")
    if cfg["cache_dir"]:
        manifest = {"fingerprint": cache_fingerprint(), "command": payload["command"], "created": payload["created"],
                    "commit": payload["commit"], "targets": cfg["targets"], "binary_only": args.binary_only,
                    "entries": [{"kernel": e.kernel, "target": e.target, "triton_hash": e.result.triton_hash}
                                for e in entries if e.result.ok]}
        write_atomic(Path(cfg["cache_dir"]) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        size = sum(f.stat().st_size for f in Path(cfg["cache_dir"]).rglob("*") if f.is_file())
        print(f"  Triton cache {cfg['cache_dir']}: {size / 2**20:.1f} MiB")
    if cfg["json"]:
        write_atomic(cfg["json"], json.dumps(payload, indent=1) + "\n")
        print(f"  wrote {cfg['json']}")
    if cfg["markdown"]:
        write_atomic(cfg["markdown"], format_markdown(payload))
        print(f"  wrote {cfg['markdown']}")
    return 1 if any(e.problems for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
