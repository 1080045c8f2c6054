"""The one timer of detbench: warm-up, synchronise, median of many repeats, seconds inside.

Both ``detbench run`` (:func:`time_instance`) and ``detbench kernel-bench`` (``bench.kernel_speed``)
time through :func:`measure`; numbers stay in seconds and unrounded until something prints them.

On CUDA each call is bracketed by CUDA events after the L2 cache has been flushed by writing a
256 MiB buffer (what ``triton.testing.do_bench`` does), and the end event is waited for before the
next call, so small subjects are not timed out of a warm cache or overlapping each other. On the CPU
a monotonic clock (``time.perf_counter_ns``) brackets each call. ``warmup`` calls run first and are
not kept; the summary is the median (and quartiles, minimum) of the ``repeats`` timed calls.

What is timed always starts from fresh copies made outside the timed region: the forward is timed
on fresh parameter leaves and inputs (with autograd recording, as in training), the backward on a
freshly built graph, and forward+backward on fresh copies again.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

PHASES = ("fwd", "bwd", "fwd+bwd")
L2_FLUSH_BYTES = 256 * 1024 * 1024
_NO_STATE = object()  # measure() without setup calls fn()
CLOCKS = {"cuda": "cuda-events", "cpu": "perf_counter"}  # device type -> Timing.clock


@dataclass
class Timing:
    """Summary of the timed calls of one subject, in seconds (``bench.results.TimingRecord`` copies it)."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    repeats: int
    warmup: int
    clock: str


def _summary(samples: list[float], warmup: int, clock: str) -> Timing:
    s = sorted(samples)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return Timing(statistics.median(s), q1, q3, s[0], len(s), warmup, clock)


def describe(device: torch.device | str, repeats: int, warmup: int) -> str:
    """One line saying how :func:`measure` times calls on ``device`` (for result files and tables)."""
    device = torch.device(device)
    if device.type == "cuda":
        how = f"CUDA events around each call after a {L2_FLUSH_BYTES >> 20} MiB L2 flush"
    else:
        how = "time.perf_counter_ns around each call"
    return f"{how}, {warmup} warm-up calls, median of {repeats} calls"


def measure(fn: Callable[..., Any], device: torch.device | str, *, repeats: int, warmup: int,
            setup: Callable[[], Any] | None = None) -> Timing:
    """Time ``fn(setup())``, or ``fn()`` without ``setup``; ``setup`` runs untimed before every call.

    ``warmup`` calls run first (untimed, their results dropped), then ``repeats`` timed calls; see the
    module docstring for the clocks.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    device = torch.device(device)
    samples: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        for i in range(warmup + repeats):
            state = _NO_STATE if setup is None else setup()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn() if state is _NO_STATE else fn(state)
            end.record()
            end.synchronize()
            if i >= warmup:
                samples.append(start.elapsed_time(end) / 1e3)
            del state
        return _summary(samples, warmup, CLOCKS["cuda"])
    for i in range(warmup + repeats):
        state = _NO_STATE if setup is None else setup()
        t0 = time.perf_counter_ns()
        fn() if state is _NO_STATE else fn(state)
        t1 = time.perf_counter_ns()
        if i >= warmup:
            samples.append((t1 - t0) / 1e9)
        del state
    return _summary(samples, warmup, CLOCKS["cpu"])


@dataclass(frozen=True)
class Timer:
    """The repeat counts of :func:`measure`, for callers that time many things alike (kernel-bench)."""

    repeats: int
    warmup: int

    def measure(self, fn: Callable[..., Any], device: torch.device | str,
                setup: Callable[[], Any] | None = None) -> Timing:
        return measure(fn, device, repeats=self.repeats, warmup=self.warmup, setup=setup)

    def describe(self, device: torch.device | str) -> str:
        return describe(device, self.repeats, self.warmup)


def time_instance(instance, repeats: int, warmup: int) -> dict[str, Timing]:
    """Median time of forward, backward and both for a :class:`bench.subjects.Instance`."""
    case = instance.case
    # The upstream gradient is fixed: take it once, untimed, from one forward.
    module, inputs = instance.fresh()
    grads = instance.upstream(case.call(module, inputs), inputs, None)
    del module, inputs

    def fresh():
        return instance.fresh()

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

    def synced(make):
        def setup():
            state = make()
            if instance.device.type == "cuda":
                torch.cuda.synchronize(instance.device)
            return state
        return setup

    return {
        "fwd": measure(forward, instance.device, repeats=repeats, warmup=warmup, setup=synced(fresh)),
        "bwd": measure(backward, instance.device, repeats=repeats, warmup=warmup, setup=synced(built)),
        "fwd+bwd": measure(both, instance.device, repeats=repeats, warmup=warmup, setup=synced(fresh)),
    }
