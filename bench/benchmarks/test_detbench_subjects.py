"""pytest-benchmark: forward+backward time of every subject x backend, with its determinism verdict.

One benchmark per subject (``bench.subjects``) and per available backend of its primary op, as the
registry lists them on the chosen device (nothing here names a backend). Each timed round runs the
forward and backward on fresh copies made in an untimed ``setup``; on CUDA the round ends with
``torch.cuda.synchronize()`` (and ``setup`` synchronises before it), so the timer measures the GPU
work, not the launch. ``extra_info`` of each benchmark holds the subject, backend, dtype, shapes, the
run-to-run verdict over ``--detbench-repeats`` repeats (with N and what it can miss) and the
environment (``bench.results.capture_environment``).

This folder is outside ``testpaths``; run it explicitly::

    pytest bench/benchmarks/test_detbench_subjects.py --benchmark-json bench.json
    pytest bench/benchmarks/test_detbench_subjects.py --detbench-quick --detbench-device cpu \\
        --detbench-subjects rmsnorm,linear --benchmark-json bench.json
    pytest bench/benchmarks/test_detbench_subjects.py --detbench-device cuda --detbench-dtype bf16 \\
        --benchmark-min-rounds 20 --benchmark-json bench-h200.json

Compare runs with ``pytest-benchmark compare``. ``detbench run`` is the full matrix (modes, batch
invariance, accuracy); this module is the pytest-benchmark view of its speed column.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench import checks
from bench.planted import register_planted
from bench.results import capture_environment, to_json
from bench.subjects import DTYPES, SUBJECTS, build_case, dtype_name, probe
from qwen_layers import registry
from qwen_layers.config import PRESETS

_HIDDEN = {"detbench-reference"}


def _device(config) -> torch.device:
    name = config.getoption("--detbench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--detbench-device cuda: no CUDA device is visible; use --detbench-device cpu")
    return device


def pytest_generate_tests(metafunc):
    if "subject_backend" not in metafunc.fixturenames:
        return
    config = metafunc.config
    if config.getoption("--detbench-plant"):
        register_planted()  # for the whole benchmark session: this pytest process runs only these
    device = _device(config)
    wanted = config.getoption("--detbench-subjects")
    names = [s.strip() for s in wanted.split(",")] if wanted else list(SUBJECTS)
    for s in names:
        if s not in SUBJECTS:
            raise pytest.UsageError(f"--detbench-subjects: unknown subject {s!r}; choose from: {', '.join(SUBJECTS)}")
    params, ids = [], []
    for s in names:
        for b in registry.backends(SUBJECTS[s].primary_op):
            if b.origin in _HIDDEN or (b.origin == "planted" and not config.getoption("--detbench-plant")):
                continue
            reason = b.why_not(device)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param((s, b.name), marks=marks))
            ids.append(f"{s}-{b.name}")
    metafunc.parametrize("subject_backend", params, ids=ids)


@pytest.fixture(scope="session")
def settings(request):
    config = request.config
    device = _device(config)
    quick = config.getoption("--detbench-quick")
    dtype = dtype_name(config.getoption("--detbench-dtype") or ("bf16" if device.type == "cuda" else "fp32"))
    preset = config.getoption("--detbench-preset") or ("qwen3-tiny" if quick else "qwen3-0.6b")
    if preset not in PRESETS:
        raise pytest.UsageError(f"--detbench-preset: unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    return {"device": device, "dtype": dtype, "preset": preset, "profile": "quick" if quick else device.type,
            "repeats": max(2, config.getoption("--detbench-repeats"))}


@pytest.fixture(scope="session")
def environment(settings):
    return to_json(capture_environment(settings["device"], seeds={"seed": 0}))


@functools.lru_cache(maxsize=2)
def _case(subject: str, preset: str, profile: str):
    return build_case(subject, PRESETS[preset], profile, seed=0)


def test_subject(benchmark, subject_backend, settings, environment):
    subject, backend = subject_backend
    device, dtype = settings["device"], DTYPES[settings["dtype"]]
    op = SUBJECTS[subject].primary_op
    reason = probe(op, backend, dtype, device)
    if reason is not None:
        pytest.skip(f"{op}/{backend} does not support {settings['dtype']} on {device}: {reason}")
    case = _case(subject, settings["preset"], settings["profile"])
    route = {o: "eager" for o in registry.OPS}
    route[op] = backend
    inst = case.instantiate(dtype, device, route)

    n = settings["repeats"]
    tracker = checks.RepeatTracker()
    for _ in range(n):
        torch.manual_seed(0)
        tracker.add(inst.run())
    worst = tracker.worst()
    benchmark.extra_info.update({
        "subject": subject, "primary_op": op, "backend": backend, "dtype": settings["dtype"],
        "preset": settings["preset"], "profile": settings["profile"], "shapes": case.shapes(),
        "deterministic": tracker.deterministic, "repeats": n,
        "missable_fraction": checks.missable_fraction(n) if tracker.deterministic else None,
        "verdict": (f"bitwise identical in all {n} repeats ({checks.bound_sentence(n)})" if tracker.deterministic
                    else f"NOT deterministic over {n} repeats: {worst.name} differs in up to {worst.max_n_diff} "
                         f"elements, {worst.n_distinct} distinct results"),
        "environment": environment,
    })
    work = case.work(case.rows, torch.tensor([], dtype=dtype).element_size())
    benchmark.extra_info.update({"flops_fwd_bwd": work.flops_fwd + work.flops_bwd,
                                 "bytes_fwd_bwd": work.bytes_fwd + work.bytes_bwd})

    module, inputs = inst.fresh()
    grads = inst.upstream(case.call(module, inputs), inputs, None)
    del module, inputs
    cuda = device.type == "cuda"

    def setup():
        module, inputs = inst.fresh()
        if cuda:
            torch.cuda.synchronize(device)
        return (module, inputs), {}

    def fwd_bwd(module, inputs):
        torch.autograd.backward(list(case.call(module, inputs).values()), grad_tensors=grads)
        if cuda:
            torch.cuda.synchronize(device)

    rounds = 50 if cuda else (10 if settings["profile"] == "quick" else 5)
    benchmark.pedantic(fwd_bwd, setup=setup, rounds=rounds, warmup_rounds=2 if cuda else 1)
