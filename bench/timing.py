"""The one timer of detbench: warm-up, synchronise, median of many repeats, interleaved, seconds inside.

Both ``detbench run`` (``bench.harness`` times every cell of one subject and dtype in one loop of
:func:`phase_arms`) and ``detbench kernel-bench`` (``bench.kernel_speed``, through :func:`measure`, the
one-arm case) time through :func:`interleave`; numbers stay in seconds and unrounded until something
prints them.

On CUDA each call is bracketed by CUDA events after the L2 cache has been flushed by writing a
256 MiB buffer (what ``triton.testing.do_bench`` does), and the end event is waited for before the
next call, so small subjects are not timed out of a warm cache or overlapping each other. On the CPU
a monotonic clock (``time.perf_counter_ns``) brackets each call. ``warmup`` rounds run first and are
not kept; the summary is the median (and quartiles, minimum) of the ``repeats`` timed calls.

Interleaved: :func:`interleave` times several *arms* (a phase of a cell, a backend under a mode) in
one loop, round by round (A, B, A, B, ...), so drift and bursts of load hit every arm alike. The
ratio of two arms of one loop is the median of their per-round ratios, with the quartiles of those
ratios as its interval (:func:`paired_ratio`).

Each loop records what the machine was doing while it ran (:class:`Load`): the highest 1-minute load
average read at the start of a round (``os.getloadavg``) and the process's CPU share (CPU seconds of
the process / wall seconds of the loop / torch's threads). :func:`noise` and :func:`inconsistency`
say why a time or a ratio cannot be read as a measurement; every report marks those with ``~``.

What is timed always starts from fresh copies made outside the timed region: the forward is timed
on fresh parameter leaves and inputs (with autograd recording, as in training), the backward on a
freshly built graph, and forward+backward on fresh copies again.

>>> loop = interleave([Arm("a", lambda: sum(range(100))), Arm("b", lambda: sum(range(200)))], "cpu",
...                   repeats=5, warmup=1)
>>> paired_ratio(loop.timings["b"].samples_s, loop.timings["a"].samples_s).rounds
5
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ContextManager, Hashable, Iterator, NamedTuple, Sequence

import torch

PHASES = ("fwd", "bwd", "fwd+bwd")
L2_FLUSH_BYTES = 256 * 1024 * 1024
_NO_STATE = object()  # an arm without setup calls fn()
CLOCKS = {"cuda": "cuda-events", "cpu": "perf_counter"}  # device type -> Timing.clock

# When a time or a ratio is marked ``~`` (not to be read as a measured difference); see noise().
SPREAD_LIMIT = 0.25  # (q3 - q1) / median above this: the middle half of the samples disagree by more than
#                      the 10-20% costs the tables are read for
LOAD_LIMIT = 1.25    # 1-minute load average per CPU above this: runnable threads outnumbered the CPUs by a
#                      quarter (our own threads count too), so timed threads waited for a CPU
SHARE_LIMIT = 0.8    # CPU seconds per wall second of the loop below this, on the CPU: the timing thread is
#                      never idle in the loop (setup, call, clock), so it waited for a CPU a fifth of the time
MIN_ROUNDS = 3       # fewer timed rounds: quartiles say nothing about the noise


@dataclass
class Timing:
    """Summary of the timed calls of one arm, in seconds (``bench.results.TimingRecord`` copies it)."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    repeats: int
    warmup: int
    clock: str
    samples_s: list[float] = field(default_factory=list)  # round by round, in the order timed
    load1: float | None = None      # highest 1-minute load average read during the loop
    cpu_share: float | None = None  # process CPU seconds / wall seconds of the loop / threads
    threads: int | None = None      # torch's intra-op threads during the loop


@dataclass(frozen=True)
class Load:
    """What the machine was doing during one loop."""

    load1: float | None
    cpu_share: float | None
    threads: int


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block (None: left as it is), restored in ``finally``."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load1() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


@dataclass(frozen=True)
class Probe:
    """Where a loop reads the load, the process's CPU time and the wall clock (tests pass fakes)."""

    load1: Callable[[], float | None] = _load1
    cpu_seconds: Callable[[], float] = time.process_time  # every thread of this process
    wall_seconds: Callable[[], float] = time.perf_counter
    threads: Callable[[], int] = torch.get_num_threads


def _summary(samples: list[float], warmup: int, clock: str) -> Timing:
    s = sorted(samples)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return Timing(statistics.median(s), q1, q3, s[0], len(s), warmup, clock, list(samples))


def describe(device: torch.device | str, repeats: int, warmup: int) -> str:
    """One line saying how :func:`interleave` times calls on ``device`` (for result files and tables)."""
    device = torch.device(device)
    if device.type == "cuda":
        how = f"CUDA events around each call after a {L2_FLUSH_BYTES >> 20} MiB L2 flush"
    else:
        how = "time.perf_counter_ns around each call"
    return f"{how}, {warmup} warm-up calls, median of {repeats} calls"


# ------------------------------------------------------------------------------------------------
# one call
# ------------------------------------------------------------------------------------------------


def _call(fn: Callable[..., Any], state: Any) -> None:
    fn() if state is _NO_STATE else fn(state)


class _CpuCall:
    clock = CLOCKS["cpu"]

    def __call__(self, fn: Callable[..., Any], state: Any) -> float:
        t0 = time.perf_counter_ns()
        _call(fn, state)
        return (time.perf_counter_ns() - t0) / 1e9


class _CudaCall:
    clock = CLOCKS["cuda"]

    def __init__(self, device: torch.device) -> None:
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[..., Any], state: Any) -> float:
        self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _call(fn, state)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def call_timer(device: torch.device | str) -> Callable[[Callable[..., Any], Any], float]:
    """The per-call clock of ``device``: ``timer(fn, state) -> seconds`` (``fn()`` when state is absent);
    its ``clock`` attribute names it (:data:`CLOCKS`)."""
    device = torch.device(device)
    return _CudaCall(device) if device.type == "cuda" else _CpuCall()


# ------------------------------------------------------------------------------------------------
# loops
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One thing timed in a loop: ``fn(setup())`` (``fn()`` without ``setup``), with ``context()`` entered
    around setup and call (a determinism mode, say); setup and context stay outside the timed region."""

    name: Hashable
    fn: Callable[..., Any]
    setup: Callable[[], Any] | None = None
    context: Callable[[], ContextManager] | None = None


@dataclass
class Loop:
    """What :func:`interleave` measured: a Timing per arm that finished, the exception of each that raised."""

    timings: dict[Hashable, Timing]
    failed: dict[Hashable, Exception]
    load: Load


def interleave(arms: Sequence[Arm], device: torch.device | str, *, repeats: int, warmup: int,
               timer: Callable[[Callable[..., Any], Any], float] | None = None,
               probe: Probe | None = None) -> Loop:
    """Time ``arms`` round by round: ``warmup`` untimed rounds, then ``repeats`` timed ones, each arm once
    per round in the order given (A, B, A, B, ...).

    An arm that raises (``Exception``; an interrupt propagates) leaves the loop and is reported in
    ``Loop.failed``; the others go on, their samples still aligned by round. ``timer`` times one call
    (default :func:`call_timer`), ``probe`` reads load and CPU time (default :class:`Probe`).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique: {names}")
    timer = timer if timer is not None else call_timer(device)
    probe = probe if probe is not None else Probe()
    samples: dict[Hashable, list[float]] = {a.name: [] for a in arms}
    failed: dict[Hashable, Exception] = {}
    live = list(arms)
    threads = probe.threads()
    loads: list[float] = []
    cpu0, wall0 = probe.cpu_seconds(), probe.wall_seconds()
    for i in range(warmup + repeats):
        load = probe.load1()
        if load is not None:
            loads.append(load)
        for arm in list(live):
            try:
                with arm.context() if arm.context is not None else contextlib.nullcontext():
                    state = _NO_STATE if arm.setup is None else arm.setup()
                    seconds = timer(arm.fn, state)
                    del state
            except Exception as e:  # a backend failing leaves the loop, not the run
                failed[arm.name] = e
                live.remove(arm)
                continue
            if i >= warmup:
                samples[arm.name].append(seconds)
    wall = probe.wall_seconds() - wall0
    share = (probe.cpu_seconds() - cpu0) / wall / threads if wall > 0 and threads > 0 else None
    load = Load(max(loads) if loads else None, share, threads)
    clock = getattr(timer, "clock", "injected")
    timings = {}
    for arm in live:
        t = _summary(samples[arm.name], warmup, clock)
        timings[arm.name] = replace(t, load1=load.load1, cpu_share=load.cpu_share, threads=load.threads)
    return Loop(timings, failed, load)


def measure(fn: Callable[..., Any], device: torch.device | str, *, repeats: int, warmup: int,
            setup: Callable[[], Any] | None = None) -> Timing:
    """Time ``fn(setup())``, or ``fn()`` without ``setup``; ``setup`` runs untimed before every call.

    The one-arm case of :func:`interleave` (an exception in ``fn`` or ``setup`` propagates).
    """
    loop = interleave([Arm("only", fn, setup)], device, repeats=repeats, warmup=warmup)
    if loop.failed:
        raise loop.failed["only"]
    return loop.timings["only"]


@dataclass(frozen=True)
class Timer:
    """The repeat counts of :func:`measure` and :func:`interleave`, for callers that time many things alike
    (kernel-bench)."""

    repeats: int
    warmup: int

    def measure(self, fn: Callable[..., Any], device: torch.device | str,
                setup: Callable[[], Any] | None = None) -> Timing:
        return measure(fn, device, repeats=self.repeats, warmup=self.warmup, setup=setup)

    def interleave(self, arms: Sequence[Arm], device: torch.device | str) -> Loop:
        return interleave(arms, device, repeats=self.repeats, warmup=self.warmup)

    def describe(self, device: torch.device | str) -> str:
        return describe(device, self.repeats, self.warmup)


# ------------------------------------------------------------------------------------------------
# the cells of detbench run
# ------------------------------------------------------------------------------------------------


def phase_arms(instance, name: Hashable, context: Callable[[], ContextManager] | None = None) -> list[Arm]:
    """Forward, backward and both of a :class:`bench.subjects.Instance` as three arms named
    ``(name, phase)``, each with ``context`` entered around its setup and call."""
    case = instance.case
    # The upstream gradient is fixed: take it once, untimed, from one forward.
    with context() if context is not None else contextlib.nullcontext():
        module, inputs = instance.fresh()
        grads = instance.upstream(case.call(module, inputs), inputs, None)
        del module, inputs

    def synced(make):
        def setup():
            state = make()
            if instance.device.type == "cuda":
                torch.cuda.synchronize(instance.device)
            return state
        return setup

    def forward(state):
        module, inputs = state
        return case.call(module, inputs)

    def built():
        module, inputs = instance.fresh()
        return list(case.call(module, inputs).values())

    def backward(outs):
        torch.autograd.backward(outs, grad_tensors=grads)

    def both(state):
        module, inputs = state
        torch.autograd.backward(list(case.call(module, inputs).values()), grad_tensors=grads)

    return [Arm((name, "fwd"), forward, synced(instance.fresh), context),
            Arm((name, "bwd"), backward, synced(built), context),
            Arm((name, "fwd+bwd"), both, synced(instance.fresh), context)]


# ------------------------------------------------------------------------------------------------
# what can be trusted
# ------------------------------------------------------------------------------------------------


class Ratio(NamedTuple):
    """``num / den``: the median of the per-round ratios and their quartiles (paired), or for timings not
    taken in one loop the ratio of medians with the range the quartiles allow crosswise."""

    mid: float
    lo: float
    hi: float
    rounds: int
    paired: bool


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> Ratio | None:
    """The ratio of two arms of one loop, round by round (None when a side has no positive sample)."""
    pairs = [a / b for a, b in zip(num, den) if b > 0]
    if not pairs:
        return None
    s = sorted(pairs)
    lo, _, hi = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else (s[0], s[0], s[0])
    return Ratio(statistics.median(s), lo, hi, len(s), True)


def crosswise_ratio(num: Timing, den: Timing) -> Ratio | None:
    """Medians' ratio of two timings from different loops, the range q1(num)/q3(den) .. q3(num)/q1(den)."""
    if den.median_s <= 0 or den.q1_s <= 0 or den.q3_s <= 0:
        return None
    return Ratio(num.median_s / den.median_s, num.q1_s / den.q3_s, num.q3_s / den.q1_s,
                 min(num.repeats, den.repeats), False)


def spread(mid: float, lo: float, hi: float, n: int) -> str | None:
    """Why an interval is too wide to read (quartile range over SPREAD_LIMIT of the middle), or None."""
    if n < MIN_ROUNDS:
        return f"few rounds ({n} timed, under {MIN_ROUNDS}: no spread to judge by)"
    if mid > 0 and (hi - lo) / mid > SPREAD_LIMIT:
        return f"wide interval (quartile range {(hi - lo) / mid:.0%} of the median)"
    return None


def load_reasons(load1: float | None, cpu_share: float | None, threads: int | None, cpus: int | None,
                 device_type: str) -> list[str]:
    """Why the machine was too busy for a time taken under this load to be trusted (empty: it was not)."""
    out = []
    if load1 is not None and cpus and load1 > LOAD_LIMIT * cpus:
        out.append(f"loaded (load {load1:.1f} on {cpus} CPU{'s' if cpus != 1 else ''})")
    if device_type == "cpu" and cpu_share is not None and threads and cpu_share * threads < SHARE_LIMIT:
        out.append(f"loaded (CPU share {cpu_share:.2f} of {threads} thread{'s' if threads != 1 else ''}: "
                   f"the timing thread waited for a CPU)")
    return out


def kind(reason: str) -> str:
    """The short name of a reason from :func:`spread`, :func:`load_reasons` or :func:`inconsistency`
    ("wide interval", "few rounds", "loaded", "inconsistent"): its words before the parenthesis."""
    return reason.split(" (", 1)[0]


def noise(t, cpus: int | None, device_type: str) -> list[str]:
    """Every reason to mark ``t`` (a :class:`Timing` or a stored ``TimingRecord``) with ``~`` (empty: none)."""
    out = [r for r in [spread(t.median_s, t.q1_s, t.q3_s, t.repeats)] if r]
    return out + load_reasons(t.load1, t.cpu_share, t.threads, cpus, device_type)


def inconsistency(parts: dict) -> str | None:
    """Why the phases of one cell (phase -> Timing or TimingRecord) contradict each other, or None: fwd+bwd
    must not be faster than either part beyond the noise (a part's first quartile above the whole's third)."""
    both = parts.get("fwd+bwd")
    if both is None:
        return None
    for phase in ("fwd", "bwd"):
        p = parts.get(phase)
        if p is not None and p.q1_s > both.q3_s:
            return f"inconsistent ({phase} {p.median_s * 1e3:.3g} ms > fwd+bwd {both.median_s * 1e3:.3g} ms)"
    return None
