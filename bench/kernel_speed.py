"""Kernel speed: what the deterministic kernels cost next to what they replace.

Which backends are timed, and in which role, is read from the registry (:func:`lineup`), never
named here. Per section (an op at a fixed shape), every backend registered for the op is timed:

* **subjects**: the deterministic kernels with an atomic twin (``deterministic`` claim ``True`` and a
  ``twin`` whose claim is not ``True``): today ``triton``, and ``flash-attn-det`` where installed;
* their **twins**: the same kernel adding its parts with atomics (``triton-atomic``, ``flash-attn``);
* **baselines**: every other backend of the op (attention: ``eager`` and the ``sdpa*`` variants;
  linear and rmsnorm: ``eager``). The *fastest baseline* of a phase is the baseline with the lowest
  median in this run, picked after timing them all: the vendor's fastest path on this machine (flash,
  cuDNN or efficient SDPA for attention; cuBLAS behind ``eager`` for linear), not a name guessed in
  advance. Taking the minimum of several noisy medians favours the baselines slightly, so a met
  target errs on the strict side;
* the **reference**: the one backend every op registers (``eager``, also the default of a per-op
  choice in ``qwen_layers.registry.check_choice``), see :func:`reference_backend`.

Measured in one run, every backend of a section in one interleaved loop (round by round, so a burst
of load slows both sides of a ratio alike); each ratio is the median of its per-round ratios, with
their quartiles (:data:`RATIO_SPECS`; one ratio per subject):

=====================================  ================================================  ========
measurement                            ratio                                             target
=====================================  ================================================  ========
attention forward, causal              speed of subject / speed of the fastest baseline  >= 1.0
attention backward, causal             time of subject / time of its atomic twin         <= 1.10
linear forward (one 4096^3 matmul)     speed of subject / speed of the fastest baseline  >= 0.9
rmsnorm forward + backward             bytes/s of subject / bytes/s of a device copy     >= 0.8
=====================================  ================================================  ========

Full shapes (bfloat16, a Qwen3-8B layer): attention B=1, Hq=32, Hkv=8, S=4096, D=128; linear
M=N=K=4096; rmsnorm 16384 rows of 4096. The device copy is ``torch.empty_like(x).copy_(x)`` on the
rmsnorm input. ``--tiny`` (automatic on the CPU) uses shapes that run in seconds through the Triton
interpreter in float32 (``tl.dot`` on bfloat16 is broken there, triton issue 11584): it proves the
code runs, it measures nothing, and its ratios carry no verdict.

A backend that cannot run on the device is reported as skipped with the registry's reason, and a
ratio missing a side says which (or, for the fastest baseline, that no baseline ran).

Timing: :func:`bench.timing.interleave`, the timer ``detbench run`` uses too: warm-up rounds, then on
CUDA events around each call after the L2 cache has been flushed (as ``triton.testing.do_bench``
does, so inputs need no rotation), on the CPU ``time.perf_counter_ns``; every forward and backward of
a section's backends (and the device copy) once per round; the median of the repeats
(:data:`CUDA_TIMER`, :data:`CPU_TIMER`; seconds inside, milliseconds in the JSON). A ratio whose
interval is wide or that was measured on a loaded machine carries its reasons (``Ratio.noise``;
``~`` in the table). Inputs are seeded normal draws (never zeros). Forward passes are timed as in
training (inputs require grad); a backward is timed with ``torch.autograd.grad(..., retain_graph=True)``
on one recorded forward (made before the loop, untimed), with a fixed upstream gradient. FLOPs and
bytes are the algorithmic counts (causal attention counts half the score matrix; the backward counts
2.5x the forward; bytes are what must be read and written once).

API (for scripts): :func:`run_kernel_bench` -> :class:`KernelBenchResult`; :func:`check_json_path`
(before measuring: refuses a destination that cannot be written); :func:`write_json`; :func:`lineup`;
the table is printed by ``bench.cli.kernel_bench.print_table``.
CLI: ``detbench kernel-bench [--tiny] [--device D] [--only SECTIONS] [--json PATH]``.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench import timing
from bench.errors import InputError
from bench.results import capture_environment, write_json_atomic
from bench.timing import Arm, Timer
from qwen_layers.registry import REGISTRY, BackendError, Registry

SECTIONS = ("attention", "matmul", "rmsnorm")
SECTION_OPS = {"attention": "attention", "matmul": "linear", "rmsnorm": "rmsnorm"}  # section -> registry op
COPY = "device copy"  # the pseudo-backend of the bandwidth reference (not a registry entry)

# -------------------------------------------------------------------------------------------------
# who is timed: roles read from the registry
# -------------------------------------------------------------------------------------------------


def reference_backend(registry: Registry = REGISTRY) -> str:
    """The name every op of the registry has an entry under (``eager``); an error unless exactly one."""
    common = set.intersection(*(set(registry.names(op)) for op in registry.ops()))
    if len(common) != 1:
        raise ValueError(f"the reference backend is the one name every op registers; found "
                         f"{sorted(common) or 'none'}")
    return common.pop()


@dataclass(frozen=True)
class Lineup:
    """The backends of one section by role (see the module docstring); names in registry order."""

    section: str
    op: str
    subjects: tuple[str, ...]  # deterministic claim True, with an atomic twin
    twins: dict[str, str]  # subject -> its atomic twin
    baselines: tuple[str, ...]  # every other backend of the op
    reference: str  # the backend every op registers

    @property
    def backends(self) -> tuple[str, ...]:
        """Everything to time: each subject followed by its twin, then the baselines."""
        return tuple(n for s in self.subjects for n in (s, self.twins[s])) + self.baselines


def lineup(section: str, registry: Registry = REGISTRY) -> Lineup:
    """Read the roles of ``section``'s op from the registry's claims and twins."""
    op = SECTION_OPS[section]
    entries = {b.name: b for b in registry.backends(op)}
    subjects = tuple(name for name, b in entries.items()
                     if b.deterministic is True and b.twin in entries
                     and entries[b.twin].deterministic is not True)
    twins = {s: entries[s].twin for s in subjects}
    paired = set(subjects) | set(twins.values())
    baselines = tuple(name for name in entries if name not in paired)
    return Lineup(section, op, subjects, twins, baselines, reference_backend(registry))


# -------------------------------------------------------------------------------------------------
# records
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """Problem sizes of one run."""

    dtype: str
    attention: dict  # B, Hq, Hkv, S, D, causal
    matmul: dict  # M, N, K
    rmsnorm: dict  # rows, hidden, eps


def shapes_for(tiny: bool) -> Shapes:
    if tiny:
        return Shapes(
            dtype="float32",
            attention={"B": 1, "Hq": 4, "Hkv": 2, "S": 64, "D": 16, "causal": True},
            matmul={"M": 64, "N": 64, "K": 64},
            rmsnorm={"rows": 64, "hidden": 128, "eps": 1e-6},
        )
    return Shapes(
        dtype="bfloat16",
        attention={"B": 1, "Hq": 32, "Hkv": 8, "S": 4096, "D": 128, "causal": True},
        matmul={"M": 4096, "N": 4096, "K": 4096},
        rmsnorm={"rows": 16384, "hidden": 4096, "eps": 1e-6},
    )


@dataclass
class KernelTiming:
    """One backend's timed calls in one phase: the JSON record (fields are the JSON keys; unrounded).

    ``median_ms`` and ``samples`` (and the rest, added with interleaving) are copied from the
    :class:`bench.timing.Timing` that measured it.
    """

    section: str  # attention | matmul | rmsnorm
    op: str  # registry op ("" for the device copy)
    backend: str  # registry name, or "device copy"
    phase: str  # forward | backward | copy
    status: str  # ok | skipped | error
    reason: str | None = None  # why skipped / the error
    median_ms: float | None = None
    samples: int | None = None  # timed calls behind the median (after the warm-up calls)
    flops: float | None = None
    bytes: float | None = None
    tflops: float | None = None
    gbytes_per_s: float | None = None
    deterministic_claim: bool | None = None  # the registry entry's claim (not measured here)
    q1_ms: float | None = None
    q3_ms: float | None = None
    samples_ms: list[float] = field(default_factory=list)  # each timed call, round by round (one loop per section)
    load1: float | None = None  # highest 1-minute load average during the section's loop
    cpu_share: float | None = None  # process CPU seconds / wall seconds of the loop / threads
    threads: int | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.section, self.backend, self.phase


@dataclass
class Ratio:
    """One comparison of two timings from this run against its target."""

    name: str
    numerator: str  # "section/backend/phase"
    denominator: str
    kind: str  # "speed" (denominator time / numerator time) | "time" (numerator / denominator) | "bandwidth"
    value: float | None
    target: str | None  # e.g. ">= 0.9"; None for a context-only ratio
    met: bool | None  # None when there is no value or the run cannot judge (tiny shapes, CPU)
    note: str | None = None
    low: float | None = None  # quartiles of the per-round ratios (both sides timed in one loop)
    high: float | None = None
    noise: list[str] = field(default_factory=list)  # why the value is not to be trusted (wide, loaded); [] none


@dataclass
class KernelBenchResult:
    environment: dict
    device: str
    tiny: bool
    timer: str
    shapes: dict
    timings: list[KernelTiming] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# -------------------------------------------------------------------------------------------------
# timing: bench.timing's one timer; only the repeat counts are chosen here
# -------------------------------------------------------------------------------------------------

CUDA_TIMER = Timer(repeats=100, warmup=10)  # ~0.1-10 ms calls at the full shapes: 100 samples each
CPU_TIMER = Timer(repeats=5, warmup=2)  # tiny shapes through the interpreter: proves the code runs


def default_timer(device: torch.device) -> Timer:
    return CUDA_TIMER if torch.device(device).type == "cuda" else CPU_TIMER


# -------------------------------------------------------------------------------------------------
# measurements
# -------------------------------------------------------------------------------------------------


def _resolve(op: str, name: str, device: torch.device):
    """(fn, claim, None) or (None, None, reason) from the registry."""
    try:
        backend = REGISTRY.get(op, name)
        return REGISTRY.resolve(op, name, device), backend.deterministic, None
    except BackendError as e:
        return None, None, str(e)


def _seeded(shape, seed: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)


def _failed(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]


def _timed(entries: list, device: torch.device, timer: Timer) -> list[KernelTiming]:
    """``entries`` in order: a finished KernelTiming (skipped, error), or (KernelTiming to fill, fn) timed with
    every other such fn of the list in one interleaved loop. A fn that raises becomes an error record."""
    arms = [Arm(i, e[1]) for i, e in enumerate(entries) if isinstance(e, tuple)]
    loop = timer.interleave(arms, device)
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, tuple):
            out.append(e)
            continue
        rec = e[0]
        if i in loop.failed:  # a backend that fails is a result, not a crash of the whole run
            out.append(KernelTiming(rec.section, rec.op, rec.backend, rec.phase, "error", _failed(loop.failed[i]),
                                    deterministic_claim=rec.deterministic_claim))
            continue
        t = loop.timings[i]
        secs = t.median_s  # the JSON keeps milliseconds (its schema); the rates come from seconds
        rec.median_ms, rec.samples, rec.q1_ms, rec.q3_ms = secs * 1e3, t.repeats, t.q1_s * 1e3, t.q3_s * 1e3
        rec.samples_ms = [x * 1e3 for x in t.samples_s]
        rec.load1, rec.cpu_share, rec.threads = t.load1, t.cpu_share, t.threads
        rec.tflops = rec.flops / secs / 1e12 if rec.flops and secs > 0 else None
        rec.gbytes_per_s = rec.bytes / secs / 1e9 if rec.bytes and secs > 0 else None
        out.append(rec)
    return out


def _pending(section, op, name, phase, fn, flops=None, nbytes=None, claim=None) -> tuple:
    return KernelTiming(section, op, name, phase, "ok", flops=flops, bytes=nbytes, deterministic_claim=claim), fn


def _fwd_bwd_entries(section, op, name, device, make_inputs, call, fwd_counts, bwd_counts, seed) -> list:
    """The forward (inputs requiring grad) and the backward of one backend, as :func:`_timed` entries; one
    untimed forward records the graph the backward is timed on."""
    fn, claim, reason = _resolve(op, name, device)
    if fn is None:
        return [KernelTiming(section, op, name, phase, "skipped", reason) for phase in ("forward", "backward")]
    inputs = [t.requires_grad_(True) for t in make_inputs()]
    try:
        y = call(fn, inputs)
    except Exception as e:  # a backend that fails is a result, not a crash of the whole run
        return [KernelTiming(section, op, name, "forward", "error", _failed(e), deterministic_claim=claim),
                KernelTiming(section, op, name, "backward", "skipped", "forward failed", deterministic_claim=claim)]
    grad = _seeded(y.shape, seed + 99, y.dtype, device)
    return [_pending(section, op, name, "forward", lambda: call(fn, inputs), *fwd_counts, claim),
            _pending(section, op, name, "backward", lambda: torch.autograd.grad(y, inputs, grad, retain_graph=True),
                     *bwd_counts, claim)]


def bench_attention(device: torch.device, shapes: Shapes, timer: Timer, seed: int = 0,
                    backends: tuple[str, ...] | None = None) -> list[KernelTiming]:
    """Forward and backward of causal GQA attention for each backend (default: :func:`lineup`'s)."""
    a = shapes.attention
    dtype = getattr(torch, shapes.dtype)
    B, Hq, Hkv, S, D = a["B"], a["Hq"], a["Hkv"], a["S"], a["D"]
    scale = D ** -0.5
    e = torch.finfo(dtype).bits // 8
    frac = 0.5 if a["causal"] else 1.0
    fwd_flops = 4 * B * Hq * S * S * D * frac  # QK^T and PV
    fwd_bytes = (2 * B * Hq * S * D + 2 * B * Hkv * S * D) * e  # read q, k, v; write o
    bwd_flops = 2.5 * fwd_flops  # five matmuls instead of two
    bwd_bytes = (4 * B * Hq * S * D + 4 * B * Hkv * S * D) * e  # read q, k, v, o, dO; write dq, dk, dv

    def make():
        return [_seeded((B, Hq, S, D), seed, dtype, device), _seeded((B, Hkv, S, D), seed + 1, dtype, device),
                _seeded((B, Hkv, S, D), seed + 2, dtype, device)]

    def call(fn, inputs):
        q, k, v = inputs
        return fn(q, k, v, scale=scale, causal=a["causal"])

    entries = []
    for name in (lineup("attention").backends if backends is None else backends):
        entries += _fwd_bwd_entries("attention", "attention", name, device, make, call,
                                    (fwd_flops, fwd_bytes), (bwd_flops, bwd_bytes), seed)
    out = _timed(entries, device, timer)
    del entries  # every backend's inputs and recorded graph
    _release(device)
    return out


def bench_matmul(device: torch.device, shapes: Shapes, timer: Timer, seed: int = 0,
                 backends: tuple[str, ...] | None = None) -> list[KernelTiming]:
    """Forward of one M x K by K x N product (the ``linear`` op without bias) for each backend (default:
    :func:`lineup`'s)."""
    m = shapes.matmul
    dtype = getattr(torch, shapes.dtype)
    M, N, K = m["M"], m["N"], m["K"]
    e = torch.finfo(dtype).bits // 8
    flops, nbytes = 2 * M * N * K, (M * K + N * K + M * N) * e
    x = _seeded((M, K), seed, dtype, device)
    w = _seeded((N, K), seed + 1, dtype, device, scale=K ** -0.5)
    entries = []
    for name in (lineup("matmul").backends if backends is None else backends):
        fn, claim, reason = _resolve("linear", name, device)
        if fn is None:
            entries.append(KernelTiming("matmul", "linear", name, "forward", "skipped", reason))
            continue
        entries.append(_pending("matmul", "linear", name, "forward", lambda fn=fn: fn(x, w), flops, nbytes, claim))
    with torch.no_grad():  # one product: no autograd bookkeeping in the comparison with cuBLAS
        out = _timed(entries, device, timer)
    _release(device)
    return out


def bench_rmsnorm(device: torch.device, shapes: Shapes, timer: Timer, seed: int = 0,
                  backends: tuple[str, ...] | None = None) -> list[KernelTiming]:
    """RMSNorm forward and backward for each backend (default: :func:`lineup`'s), and a device copy of its
    input as the roofline."""
    r = shapes.rmsnorm
    dtype = getattr(torch, shapes.dtype)
    R, H, eps = r["rows"], r["hidden"], r["eps"]
    e = torch.finfo(dtype).bits // 8
    fwd_bytes = (2 * R * H + H) * e  # read x and the weight, write y
    bwd_bytes = (3 * R * H + 2 * H) * e  # read x, dy and the weight, write dx and dW

    def make():
        return [_seeded((R, H), seed, dtype, device), 1.0 + _seeded((H,), seed + 1, dtype, device, scale=0.1)]

    def call(fn, inputs):
        return fn(inputs[0], inputs[1], eps)

    entries = []
    for name in (lineup("rmsnorm").backends if backends is None else backends):
        entries += _fwd_bwd_entries("rmsnorm", "rmsnorm", name, device, make, call,
                                    (None, fwd_bytes), (None, bwd_bytes), seed)
    x = _seeded((R, H), seed, dtype, device)
    entries.append(_pending("rmsnorm", "", COPY, "copy", lambda: torch.empty_like(x).copy_(x), None, 2 * R * H * e))
    out = _timed(entries, device, timer)
    del entries
    _release(device)
    return out


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------
# ratios
# -------------------------------------------------------------------------------------------------

SUBJECT, TWIN, FASTEST, REFERENCE = "subject", "atomic twin", "fastest baseline", "reference"

# (section, numerator role, phase, kind, denominator role, target op, target value): one ratio per
# backend in the numerator role (each subject, or the reference) of the section's :class:`Lineup`.
# Roles: SUBJECT, TWIN (the numerator's atomic twin), FASTEST (the baseline with the lowest median of
# that phase in this run), REFERENCE, COPY (the device copy's "copy" phase). "forward+backward" sums
# both phases (times and bytes).
RATIO_SPECS: tuple[tuple, ...] = (
    ("attention", SUBJECT, "forward", "speed", FASTEST, ">=", 1.0),
    ("attention", SUBJECT, "backward", "time", TWIN, "<=", 1.10),
    ("attention", SUBJECT, "backward", "speed", FASTEST, None, None),
    ("attention", SUBJECT, "forward", "speed", REFERENCE, None, None),
    ("matmul", SUBJECT, "forward", "speed", FASTEST, ">=", 0.9),
    ("matmul", SUBJECT, "forward", "speed", TWIN, None, None),
    ("rmsnorm", SUBJECT, "forward+backward", "bandwidth", COPY, ">=", 0.8),
    ("rmsnorm", SUBJECT, "forward+backward", "time", TWIN, None, None),
    ("rmsnorm", REFERENCE, "forward+backward", "bandwidth", COPY, None, None),
)


def _records(timings: dict, key: tuple[str, str, str]) -> tuple[list[KernelTiming], str | None]:
    """The records of a timing key (``forward+backward``: both phases), or why one is missing."""
    phases = ("forward", "backward") if key[2] == "forward+backward" else (key[2],)
    out = []
    for phase in phases:
        t = timings.get((key[0], key[1], phase))
        if t is None:
            return [], f"{key[0]}/{key[1]}/{phase} was not measured in this run"
        if t.status != "ok":
            return [], f"{key[0]}/{key[1]}/{phase} {t.status}: {t.reason}"
        out.append(t)
    return out, None


def _lookup(timings: dict, key: tuple[str, str, str]) -> tuple[float | None, float | None, str | None]:
    """(ms, bytes, why-missing) of a timing key; ``forward+backward`` sums both phases."""
    recs, why = _records(timings, key)
    if why:
        return None, None, why
    return sum(t.median_ms for t in recs), sum(t.bytes or 0.0 for t in recs), None


def _rounds(recs: list[KernelTiming]) -> list[float]:
    """Per-round ms of a key (phases summed round by round); [] when the records hold no samples."""
    if not recs or any(len(t.samples_ms) != len(recs[0].samples_ms) for t in recs):
        return []
    return [sum(x) for x in zip(*(t.samples_ms for t in recs))]


def fastest_baseline(timings: dict, lu: Lineup, phase: str) -> str | None:
    """The baseline of ``lu`` with the lowest median of ``phase`` in ``timings`` (None if none ran)."""
    best, best_ms = None, None
    for name in lu.baselines:
        ms, _, why = _lookup(timings, (lu.section, name, phase))
        if why is None and (best_ms is None or ms < best_ms):  # equal times: the first registered
            best, best_ms = name, ms
    return best


def _label(section: str, phase: str, kind: str) -> str:
    short = "fwd+bwd" if phase == "forward+backward" else phase
    return f"{section} {short}{' bytes/s' if kind == 'bandwidth' else ''}"


def _ratio(by_key: dict, lu: Lineup, num_name: str, phase: str, kind: str, against: str,
           op: str | None, target: float | None, judge: bool, cpus: int | None, device_type: str) -> Ratio:
    section = lu.section
    target_text = f"{op} {target}" if op else None
    num = (section, num_name, phase)
    if against == COPY:
        den_name, den_phase, shown = COPY, "copy", COPY
    else:
        den_name = {TWIN: lu.twins.get(num_name), REFERENCE: lu.reference,
                    FASTEST: fastest_baseline(by_key, lu, phase)}[against]
        den_phase, shown = phase, f"{den_name or 'none'} ({against})"
    den = (section, den_name or against, den_phase)
    name = f"{_label(section, phase, kind)}: {num_name} vs {shown}"
    n_ms, n_bytes, why_n = _lookup(by_key, num)
    if den_name is None:  # no backend in that role
        d_ms = d_bytes = None
        why_d = (f"no baseline of {section}/{phase} ran (of {', '.join(lu.baselines) or 'none registered'})"
                 if against == FASTEST else f"{section}/{num_name} has no {against}")
    else:
        d_ms, d_bytes, why_d = _lookup(by_key, den)
    if why_n or why_d:
        return Ratio(name, "/".join(num), "/".join(den), kind, None, target_text, None,
                     "; ".join(w for w in (why_n, why_d) if w))
    # speed: the denominator's time over ours; time: ours over its; bandwidth: bytes per second, ours over its.
    scale = {"speed": 1.0, "time": 1.0}.get(kind, n_bytes / d_bytes if d_bytes else 0.0)
    num_recs, _ = _records(by_key, num)
    den_recs, _ = _records(by_key, den)
    n_rounds, d_rounds = _rounds(num_recs), _rounds(den_recs)
    low = high = None
    noise: list[str] = []
    if n_rounds and len(n_rounds) == len(d_rounds):  # one loop: per-round ratios
        r = (timing.paired_ratio(d_rounds, n_rounds) if kind == "speed"
             else timing.paired_ratio(n_rounds, d_rounds) if kind == "time"
             else timing.paired_ratio(d_rounds, n_rounds))
        value, low, high = r.mid * scale, r.lo * scale, r.hi * scale
        noise += [x for x in [timing.spread(r.mid, r.lo, r.hi, r.rounds)] if x]
        for t in (num_recs[0], den_recs[0]):
            noise += timing.load_reasons(t.load1, t.cpu_share, t.threads, cpus, device_type)
    elif kind == "speed":
        value = d_ms / n_ms
    elif kind == "time":
        value = n_ms / d_ms
    else:  # bandwidth: bytes per second of the numerator over the denominator's
        value = (n_bytes / n_ms) / (d_bytes / d_ms)
    met, note = None, None
    if op and judge:
        met = value >= target if op == ">=" else value <= target
        if noise:
            note = "judged on a value marked ~: " + "; ".join(dict.fromkeys(noise))
    elif op:
        note = "not judged: tiny shapes / not a GPU; the target applies to the full shapes on CUDA"
    return Ratio(name, "/".join(num), "/".join(den), kind, value, target_text, met, note, low, high,
                 list(dict.fromkeys(noise)))


def compute_ratios(timings: list[KernelTiming], judge: bool, lineups: dict[str, Lineup] | None = None,
                   cpus: int | None = None, device_type: str = "cpu") -> list[Ratio]:
    """Every ratio of :data:`RATIO_SPECS` whose section ran; ``judge=False`` leaves ``met`` None.

    ``lineups`` (section -> :class:`Lineup`) defaults to :func:`lineup` of the registry. Two sides timed in
    one loop give the median of the per-round ratios and their quartiles; ``cpus`` and ``device_type`` judge
    the load the loop recorded (``Ratio.noise``).
    """
    by_key = {t.key: t for t in timings}
    sections = {t.section for t in timings}
    lineups = {s: (lineups or {}).get(s) or lineup(s) for s in sections}
    out = []
    for section in (s for s in SECTIONS if s in sections):
        lu = lineups[section]
        specs = [spec for spec in RATIO_SPECS if spec[0] == section]
        # Grouped by numerator: each subject's ratios together, then the reference's.
        for who, num_name in [(SUBJECT, n) for n in lu.subjects] + [(REFERENCE, lu.reference)]:
            for _, spec_who, phase, kind, against, op, target in specs:
                if spec_who == who:
                    out.append(_ratio(by_key, lu, num_name, phase, kind, against, op, target, judge, cpus,
                                      device_type))
    return out


# -------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------


def run_kernel_bench(device: torch.device | str | None = None, *, tiny: bool | None = None,
                     sections: tuple[str, ...] = SECTIONS, seed: int = 0,
                     timer: Timer | None = None) -> KernelBenchResult:
    """Measure every section on ``device`` (default: cuda if present); ``tiny`` defaults to CPU-ness.

    Ratios are judged against their targets only for the full shapes on CUDA.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tiny = device.type != "cuda" if tiny is None else tiny
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    timer = timer or default_timer(device)
    lineups = {s: lineup(s) for s in sections}
    shapes = shapes_for(tiny)
    env = asdict(capture_environment(device, seeds={"inputs": seed}))
    result = KernelBenchResult(env, str(device), tiny, timer.describe(device), asdict(shapes))
    benches = {"attention": bench_attention, "matmul": bench_matmul, "rmsnorm": bench_rmsnorm}
    for section in SECTIONS:
        if section in sections:
            result.timings += benches[section](device, shapes, timer, seed, lineups[section].backends)
    result.ratios = compute_ratios(result.timings, judge=not tiny and device.type == "cuda", lineups=lineups,
                                   cpus=env.get("cpu_affinity") or env.get("cpu_count"), device_type=device.type)
    return result


class JsonPathError(InputError):
    """The ``--json`` destination cannot be written; the message names the fix."""


def check_json_path(path: str | os.PathLike) -> Path:
    """Refuse a JSON destination :func:`write_json` could not write, before anything is measured.

    Refused: a folder (or a name ending in a slash), a folder that does not exist or is not a folder,
    and a folder this process cannot create files in (proved by creating and removing a probe file,
    as :func:`write_json` creates its temporary file there). An existing file is fine: it is replaced.
    A write that still fails later (disk full, folder removed meanwhile) is a
    :class:`bench.errors.SaveError` from :func:`write_json`.
    """
    text = os.fspath(path)
    dest = Path(text)
    if not text or text.endswith(os.sep) or dest.is_dir():
        raise JsonPathError(f"--json {text}: is a directory; give a file name, e.g. {dest / 'kernel_speed.json'}")
    folder = dest.resolve().parent
    if not folder.exists():
        raise JsonPathError(f"--json {text}: folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise JsonPathError(f"--json {text}: {folder} is not a folder; give a path inside a folder")
    probe = folder / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise JsonPathError(f"--json {text}: cannot write in {folder} ({e.strerror or e}); "
                            f"choose a writable folder") from None
    try:
        probe.unlink()
    except OSError:
        pass
    return dest


def write_json(result: KernelBenchResult, path: str | os.PathLike) -> Path:
    """Write ``result`` as JSON atomically (bench.results' writer; an existing file is replaced).

    A failure raises :class:`bench.errors.SaveError` naming the file; no temporary file is left."""
    return write_json_atomic(path, result, exclusive=False)
