"""Timing: warm-up, synchronise, median of many repeats.

On CUDA each call is bracketed by CUDA events after the L2 cache has been flushed by writing a
256 MiB buffer (what ``triton.testing.do_bench`` does), so small subjects are not timed out of a
warm cache. On the CPU a monotonic clock (``time.perf_counter_ns``) brackets each call.

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


@dataclass
class Timing:
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


def measure(fn: Callable[[Any], Any], setup: Callable[[], Any], device: torch.device,
            repeats: int, warmup: int) -> Timing:
    """Time ``fn(setup())``; ``setup`` runs untimed before every call (warm-up calls are not kept)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    device = torch.device(device)
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        samples = []
        for i in range(warmup + repeats):
            state = setup()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state)
            end.record()
            end.synchronize()
            if i >= warmup:
                samples.append(start.elapsed_time(end) / 1e3)
            del state
        return _summary(samples, warmup, "cuda-events")
    samples = []
    for i in range(warmup + repeats):
        state = setup()
        t0 = time.perf_counter_ns()
        fn(state)
        t1 = time.perf_counter_ns()
        if i >= warmup:
            samples.append((t1 - t0) / 1e9)
        del state
    return _summary(samples, warmup, "perf_counter")


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
        "fwd": measure(forward, synced(fresh), instance.device, repeats, warmup),
        "bwd": measure(backward, synced(built), instance.device, repeats, warmup),
        "fwd+bwd": measure(both, synced(fresh), instance.device, repeats, warmup),
    }
