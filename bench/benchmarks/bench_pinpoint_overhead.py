"""Overhead of ``detbench pinpoint`` on one SFT step on the CPU (a benchmark, not a test).

Every method runs the same step (forward, backward, gradient clipping, AdamW) of the same model on the
same batch; the methods are interleaved within each round (their order rotating from round to round)
so that machine load hits all alike, and the report gives the median of the rounds and each median's
ratio to the plain step's:

=========  ======================================================================================
plain      the step itself
noop       the step under a do-nothing ``TorchDispatchMode``: the floor of any dispatch-mode tool
           (one Python call per aten op)
replay     ``pinpoint.replay(step)`` (default units)
trace      ``pinpoint.trace(step)``: one run traced op by op (``compare_runs`` traces R of them)
coarse     ``pinpoint.trace(step, coarse=True)``: one coarse run, through hooks only (module outputs,
           registry calls, custom backwards, gradients, parameters; ``compare_runs(coarse=True)``
           traces R of them, and op by op only when they differ)
=========  ======================================================================================

Steps (``--steps``):

``tiny``       the qwen3-tiny preset, ``detbench sft``'s default batch of 4 x 64 tokens (999 aten ops)
``qwen2.5-2l`` Qwen2.5-0.5B's layer shapes - hidden 896, intermediate 4864, 14 query and 2 key/value
               heads of 64, qkv bias - with 2 layers and the vocabulary cut to 12288, so that the output
               layer's share of the step's work is the full 24-layer model's (27%; at 151936 it would be
               82% with 2 layers); a batch of 2 x 512 tokens (the synthetic batch's longest sequence,
               426, sets the padded length); float32
``qwen2.5-2l-v151936``  the same with the full vocabulary (not run by default: 5x the time)

Goals (issue 13), on one thread: at ``qwen2.5-2l`` replay <= 2.1x and trace <= 1.2x the plain step
(replay runs every order-dependent op twice, so 2.0x is its floor; trace reads every order-dependent
output once more); at ``tiny`` each method's overhead per aten op <= 2x the no-op mode's (the
``per op`` columns: (method - plain) / aten ops, and its ratio to noop's).

Run as a script, not niced, on a quiet machine (the 1-minute load average is printed with the numbers)::

    python bench/benchmarks/bench_pinpoint_overhead.py [--steps tiny,qwen2.5-2l] [--threads 1]
        [--repeats N] [--json]

or with pytest-benchmark (the tiny step only; compare with ``--benchmark-group-by=param``)::

    pytest bench/benchmarks/bench_pinpoint_overhead.py --benchmark-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import pinpoint
from bench.data import synthetic_batches
from bench.sft import ModelSpec, build, make_optimizer, parse_model, sft_step
from bench.timing import torch_threads
from qwen_layers.config import PRESETS


@dataclass(frozen=True)
class Step:
    """One benchmarked SFT step: model, batch and how many rounds to time by default."""

    description: str
    spec: ModelSpec
    batch_size: int
    seq_len: int
    repeats: int


def _qwen25_2l(vocab: int) -> ModelSpec:
    config = dataclasses.replace(PRESETS["qwen2.5-0.5b"], num_hidden_layers=2, vocab_size=vocab)
    return ModelSpec(f"qwen2.5-0.5b (2 layers, vocabulary {vocab})", False, config, preset="qwen2.5-0.5b")


STEPS: dict[str, Callable[[], Step]] = {
    "tiny": lambda: Step("qwen3-tiny, 4 x 64", parse_model("qwen3-tiny"), 4, 64, 31),
    "qwen2.5-2l": lambda: Step("Qwen2.5-0.5B layers, 2 layers, vocab 12288, 2 x 512, fp32", _qwen25_2l(12288),
                               2, 512, 9),
    "qwen2.5-2l-v151936": lambda: Step("Qwen2.5-0.5B shapes, 2 layers, 2 x 512, fp32", _qwen25_2l(151936),
                                       2, 512, 5),
}
DEFAULT_STEPS = ("tiny", "qwen2.5-2l")
METHODS = ("plain", "noop", "replay", "trace", "coarse")
GOALS = {name: {"replay": 2.1, "trace": 1.2, "coarse": 1.2} for name in ("qwen2.5-2l", "qwen2.5-2l-v151936")}   # ratio to the plain step
PER_OP_GOAL = 2.0                                       # tiny: per-op overhead / the no-op mode's


class NoOpMode(TorchDispatchMode):
    """A dispatch mode that only calls the op: what any dispatch-mode tool pays at least."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class CountingMode(TorchDispatchMode):
    """Counts the aten ops of a block (not timed)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def make_step(step: Step, seed: int = 0) -> Callable[[], object]:
    """The step function of ``step``: its model, AdamW and one fixed synthetic batch."""
    model = build(step.spec, attention="eager", dtype=torch.float32, device="cpu", seed=seed)
    opt = make_optimizer(model, lr=1e-5)
    (batch,) = synthetic_batches(step.spec.config.vocab_size, n_batches=1, batch_size=step.batch_size,
                                 seq_len=step.seq_len, seed=seed)

    def run():
        return sft_step(model, opt, batch)

    return run


def run_method(method: str, step: Callable[[], object]) -> None:
    if method == "plain":
        step()
    elif method == "noop":
        with NoOpMode():
            step()
    elif method == "replay":
        pinpoint.replay(step)
    elif method == "trace":
        pinpoint.trace(step)
    elif method == "coarse":
        pinpoint.trace(step, coarse=True)
    else:
        raise ValueError(method)


def count_ops(step: Callable[[], object]) -> int:
    with CountingMode() as mode:
        step()
    return mode.ops


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per step of each method over ``repeats`` rounds; within a round every method runs once,
    in an order rotated by one each round."""
    for _ in range(warmup):
        for m in METHODS:
            run_method(m, fn)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(repeats):
        for m in METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]:
            t0 = time.perf_counter()
            run_method(m, fn)
            times[m].append(time.perf_counter() - t0)
    return times


def summarise(times: dict[str, list[float]], ops: int) -> dict:
    med = {m: statistics.median(v) for m, v in times.items()}
    plain = med["plain"]
    per_op = {m: (med[m] - plain) / ops for m in METHODS if m != "plain"}
    return {"aten_ops": ops, "median_s": med, "ratio": {m: med[m] / plain for m in METHODS},
            "per_op_s": per_op, "per_op_vs_noop": {m: per_op[m] / per_op["noop"] for m in per_op},
            "times_s": times}


def table(out: dict) -> str:
    """The results as a markdown table (ratios to the plain step; per-op overhead at the tiny step)."""
    lines = [f"{out['threads']} torch thread(s); load average (1 min) {out['load_before']:.2f} before, "
             f"{out['load_after']:.2f} after", "",
             "| step (ratio to the plain step) | aten ops | plain | no-op mode | replay | trace | coarse trace |",
             "|---|---|---|---|---|---|---|"]
    for name, r in out["steps"].items():
        ratio = r["ratio"]
        goal = GOALS.get(name, {})
        cells = [f"{ratio[m]:.2f}x" + (f" (goal <= {goal[m]}x)" if m in goal else "") for m in METHODS[1:]]
        lines.append(f"| {r['description']} | {r['aten_ops']} | {r['median_s']['plain'] * 1e3:.1f} ms | "
                     + " | ".join(cells) + " |")
    per_op = [(name, r) for name, r in out["steps"].items() if name == "tiny"]
    if per_op:  # at larger steps the no-op mode's cost is within the noise
        lines += ["", "| step (overhead per aten op) | no-op mode | replay | trace | coarse trace |",
                  "|---|---|---|---|---|"]
    for name, r in per_op:
        cells = [f"{r['per_op_s'][m] * 1e6:.1f} us ({r['per_op_vs_noop'][m]:.2f}x no-op"
                 + (f", goal <= {PER_OP_GOAL}x" if m != "noop" else "") + ")" for m in METHODS[1:]]
        lines.append(f"| {r['description']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                   help=f"comma-separated steps: {', '.join(STEPS)} (default {','.join(DEFAULT_STEPS)})")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, help="timed rounds per step (default 31 for tiny, 9 for qwen2.5-2l, 5 "
                                                 "with the full vocabulary)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    names = [s for s in args.steps.split(",") if s]
    unknown = [s for s in names if s not in STEPS]
    if unknown or not names:
        p.error(f"--steps: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(STEPS)}")
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1):
        p.error("--threads and --repeats must be at least 1")
    out = {"threads": args.threads, "load_before": os.getloadavg()[0], "steps": {}}
    with torch_threads(args.threads):
        for name in names:
            step = STEPS[name]()
            fn = make_step(step)
            fn()  # first-call costs (allocator, lazy initialisation) out of the count
            ops = count_ops(fn)
            times = measure(fn, args.repeats or step.repeats)
            out["steps"][name] = {"description": step.description, "repeats": args.repeats or step.repeats,
                                  **summarise(times, ops)}
            del fn
    out["load_after"] = os.getloadavg()[0]
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(table(out))
    return 0


# -- pytest-benchmark ------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # running as a script without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("method", METHODS)
    def test_pinpoint_overhead(benchmark, method):
        fn = make_step(STEPS["tiny"]())
        benchmark.group = "pinpoint overhead, tiny step"
        benchmark.pedantic(run_method, args=(method, fn), rounds=10, warmup_rounds=2)


if __name__ == "__main__":
    sys.exit(main())
