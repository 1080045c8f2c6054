"""Options of the pytest-benchmark modules in this folder (not collected by the plain ``pytest`` run).

    pytest bench/benchmarks/test_detbench_subjects.py --benchmark-json bench.json \\
        [--detbench-device cuda] [--detbench-dtype bf16] [--detbench-preset qwen3-0.6b] [--detbench-quick] \\
        [--detbench-subjects attention,linear] [--detbench-repeats 5] [--detbench-plant]
"""

from __future__ import annotations


def pytest_addoption(parser):
    g = parser.getgroup("detbench", "detbench subjects benchmark")
    g.addoption("--detbench-device", default=None, help="cpu or cuda (default: cuda when present)")
    g.addoption("--detbench-dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on cuda, fp32 on cpu)")
    g.addoption("--detbench-preset", default=None, help="shape preset (default qwen3-0.6b; qwen3-tiny with --detbench-quick)")
    g.addoption("--detbench-quick", action="store_true", help="tiny preset and tiny shapes")
    g.addoption("--detbench-subjects", default=None, help="comma-separated subjects (default: all)")
    g.addoption("--detbench-repeats", type=int, default=5,
                help="run-to-run repeats behind the determinism verdict stored in extra_info (default 5)")
    g.addoption("--detbench-plant", action="store_true", help="include bench.planted's negative controls")
