"""Overhead of ``detbench pinpoint`` on the tiny preset's SFT step on the CPU (a benchmark, not a test).

Targets (the issue's): replay <= 2.5x the plain step, trace <= 1.5x. Both methods pay a fixed Python
cost per aten op (a dispatch-mode call, plus fingerprinting or replaying), so the ratio falls as the
ops get bigger: it is measured at the default ``detbench sft`` batch (4 x 64 tokens) and at a larger
one (8 x 256 and 8 x 512 tokens), and printed for each.

Run as a script (prints medians and ratios)::

    OMP_NUM_THREADS=1 python bench/benchmarks/bench_pinpoint_overhead.py [--repeats 15] [--json]

or with pytest-benchmark (timings per method; compare them with ``--benchmark-group-by=param``)::

    pytest bench/benchmarks/bench_pinpoint_overhead.py --benchmark-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench import pinpoint
from bench.data import synthetic_batches
from bench.sft import build, make_optimizer, parse_model, sft_step

SHAPES = {"default-4x64": (4, 64), "8x256": (8, 256), "8x512": (8, 512)}
METHODS = ("plain", "replay", "trace")


def make_step(batch_size: int, seq_len: int, seed: int = 0):
    """A tiny-preset model, its AdamW, and a step function on one fixed synthetic batch."""
    spec = parse_model("qwen3-tiny")
    model = build(spec, attention="eager", dtype=torch.float32, device="cpu", seed=seed)
    opt = make_optimizer(model, lr=1e-5)
    (batch,) = synthetic_batches(spec.config.vocab_size, n_batches=1, batch_size=batch_size, seq_len=seq_len,
                                 seed=seed)

    def step():
        return sft_step(model, opt, batch)

    return step


def run_method(method: str, step) -> None:
    if method == "plain":
        step()
    elif method == "replay":
        pinpoint.replay(step)
    elif method == "trace":
        pinpoint.trace(step)
    else:
        raise ValueError(method)


def measure(batch_size: int, seq_len: int, repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median seconds per step of each method, interleaved so that machine load hits all alike."""
    step = make_step(batch_size, seq_len)
    for _ in range(warmup):
        for m in METHODS:
            run_method(m, step)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for m in METHODS:
            t0 = time.perf_counter()
            run_method(m, step)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = {"torch_threads": torch.get_num_threads(), "repeats": args.repeats, "shapes": {}}
    for name, (b, s) in SHAPES.items():
        med = measure(b, s, args.repeats)
        out["shapes"][name] = {"median_s": med, "replay_ratio": med["replay"] / med["plain"],
                               "trace_ratio": med["trace"] / med["plain"]}
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0
    print(f"tiny preset SFT step on CPU, {out['torch_threads']} torch thread(s), median of {args.repeats}")
    for name, r in out["shapes"].items():
        m = r["median_s"]
        print(f"  {name:>13}: plain {m['plain'] * 1e3:8.2f} ms   replay {m['replay'] * 1e3:8.2f} ms "
              f"({r['replay_ratio']:.2f}x, target <= 2.5x)   trace {m['trace'] * 1e3:8.2f} ms "
              f"({r['trace_ratio']:.2f}x, target <= 1.5x)")
    return 0


# -- pytest-benchmark ------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # running as a script without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("shape", list(SHAPES))
    @pytest.mark.parametrize("method", METHODS)
    def test_pinpoint_overhead(benchmark, method, shape):
        step = make_step(*SHAPES[shape])
        benchmark.group = f"pinpoint overhead {shape}"
        benchmark.pedantic(run_method, args=(method, step), rounds=10, warmup_rounds=2)


if __name__ == "__main__":
    sys.exit(main())
