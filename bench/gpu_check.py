"""`detbench gpu-check`: the project's bounded GPU validation script, in parts that fit a lease.

A lent GPU comes with 15 minutes of device time in all, the machine's start included, and one
command may run 10 minutes. So the script is split into parts, each meant to finish within
:data:`PART_BUDGET_S` (420 s) and each saving its own results; run them one per call, part 1 first:

    part 1  headline   env; tests-core: the kernels' correctness and repeat-equality tests on CUDA
                       (bf16 included); sft: Qwen2.5-0.5B shapes, eager vs sdpa vs detbench attention,
                       bf16, lr 3e-4; pinpoint: the op behind the first SFT divergence
    part 2  cost       env; run-0.6b: detbench run on Qwen3-0.6B shapes, bf16, default vs torch-det
                       (the cost of determinism per backend); kernels: detbench kernel-bench
    part 3  breadth    env; tests-all: every kernel and drop-in test; run-8b: Qwen3-8B shapes
    part 4  setups     env; sft-1e-5: part 1's SFT at lr 1e-5; sft-nccl: data-parallel SFT on every
                       visible GPU with NCCL, standard vs invariant reduction (skipped below 2 GPUs);
                       generate: distinct greedy completions of one prompt in batches of 1..8,
                       standard vs batch-invariant mode, and the mode's cost

Every stage is a subprocess in its own process group with a time limit: its share of the part's
budget in proportion to its estimate, plus what earlier stages left unused. A stage that runs over
is stopped, recorded as timed out, and the next stage starts. Each stage carries an estimate of its
cost (:func:`estimate`) with the basis it rests on: compile seconds from the committed AOT table
(``python -m kernels.aot``, measured on a 2-core CPU) and stated assumptions for GPU work, so the
plan can be checked here (``--plan``; CI asserts every part fits) and corrected by what a GPU run
measures (summary.json holds estimate and seconds side by side).

Each part writes at most 8 files into --out (the device tool brings back at most 8): summary.md
(with part 1's headline table), summary.json, gpu_check.log and its stages' results.
``--dry-run`` runs the part's stages on the CPU with tiny shapes; CI runs part 1 that way.

Ctrl-C or SIGTERM stops the running stage's whole process group (SIGTERM, a grace period, SIGKILL),
removes the temporary ``gpu-check-*`` folder, writes summary.md/summary.json for the stages that
finished (the stopped one marked ``interrupted``) and names the files --out holds; exit 130 (143 for
SIGTERM). For tests, ``DETBENCH_TEST_STAGE_HOOK="STAGE=COMMAND"`` runs COMMAND in place of a stage's
own command (:func:`_hooked`).

On the lent GPU machine (no install there; its python3 has torch, triton, transformers, rich,
pytest, pytest-xdist, safetensors), from the repository root:

    python3 -m bench gpu-check --part 1 --out "$OUT"
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import torch

from bench.results import capture_environment, write_json_atomic, write_text_atomic
from bench.subjects import SUBJECTS
from kernels import aot
from qwen_layers.registry import REGISTRY

PART_BUDGET_S = 420.0
REPO = Path(__file__).resolve().parents[1]
DRY_RUN_PLANT = "model.layers.1.mlp.down_proj=linear/planted-nondet"
INTERRUPT_GRACE_S = 20  # time a stage stopped for its time limit gets to write its partial result
STOP_GRACE_S = 5.0  # time a stage gets after SIGTERM when gpu-check itself is interrupted
MAX_FILES = 8  # what the device tool brings back from --out

# ---- the cost model behind each stage's estimate ------------------------------------------------
# Measured: compile seconds per specialisation, from the AOT table committed under results/ (one
# process on this project's 2-core CPU machine). Assumed, generous, to be replaced by what the first
# GPU run measures: everything below marked (assumed).
GPU_MACHINE_CORES = 16      # the lent H200 machine's CPU cores (the device tool's description)
START_S = 20.0              # one stage process: python, torch, triton, transformers, CUDA context (assumed)
TEST_S = 0.5                # one kernel test case on the GPU, compile excluded (assumed)
TEST_SPECIALISATIONS = 3    # new kernel specialisations one test case compiles, at most (assumed)
CALL_S = {"qwen3-0.6b": 0.01, "qwen3-8b": 0.04}  # one forward+backward of a subject at the preset's
#                             shapes on an H200, Python overhead included (assumed)
BATCH_CALLS = 3             # extra calls of a cell for batch invariance (batches 1, 3, 127)
REFERENCE_CALLS = 10        # a subject's float64 reference, in calls (fp64 runs at ~1/15 of bf16 rates)
SFT_STEP_S = 0.25           # one AdamW step of Qwen2.5-0.5B shapes, 4 x 64 tokens, bf16 (assumed)
SFT_BUILD_S = 8.0           # building and seeding a Qwen2.5-0.5B model on the GPU, per repeat (assumed)
PINPOINT_S = 90.0           # pinpoint's replay and trace-compare of 2 steps of Qwen2.5-0.5B (assumed)
KERNEL_BENCH_S = 120.0      # kernel-bench's timings at full shapes, every backend (assumed)
GENERATE_BATCH_S = {"standard": 0.5, "batch-invariant": 3.0}  # one batch of the generate stage (<= 8 rows, a
#                             16-token prompt, 16 new tokens, Qwen2.5-0.5B shapes, fp32): the mode's bmm and
#                             softmax loop over the keys in Python, ~100 kernel launches per layer per step (assumed)
COMPILE_FALLBACK_S = 1.0    # per specialisation when no AOT table is committed (assumed)

# The kernel tests whose names say they check correctness against float64 or repeat equality: part 1's
# subset (tests/test_gpu_check.py checks it selects both kinds from every kernel's test file).
CORE_TESTS = "float64 or reference or d128 or atomic_twin or repeat or run_to_run"
# The dry run rehearses the tests stages on a handful of interpreter-speed cases.
DRY_RUN_TESTS = "rmsnorm and (float64 or repeats_are)"


@dataclass
class Stage:
    name: str
    status: str = "not run"        # ok | failed (rc N) | timed out | skipped: reason | interrupted
    seconds: float = 0.0
    limit_s: float = 0.0
    estimate_s: float = 0.0        # what the cost model expects on the GPU (see the basis)
    basis: str = ""
    command: list[str] = field(default_factory=list)
    output: str | None = None      # file in --out this stage produced
    note: str = ""


@dataclass(frozen=True)
class Estimate:
    seconds: float
    basis: str


def _bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench", *args]


def _run_stage(stage: Stage, argv: list[str], limit_s: float, log, env=None) -> None:
    """Run ``argv`` in its own process group; stop the group when it exceeds ``limit_s``.

    The group never outlives this call: on a timeout it gets SIGINT (detbench run saves what it
    measured), then SIGTERM, then SIGKILL; on any other way out (Ctrl-C or SIGTERM here, which raise
    ``KeyboardInterrupt``, or an exception) SIGTERM, :data:`STOP_GRACE_S`, SIGKILL, and the stage is
    marked ``interrupted`` (or failed) before the exception goes on. Whatever is left of the group
    (the stage's own children) is killed once its leader has exited, before the leader is reaped, so
    the group id cannot have been reused.
    """
    stage.command, stage.limit_s = argv, round(limit_s, 1)
    log.write(f"\n===== {stage.name}: {' '.join(argv)} (limit {limit_s:.0f}s)\n")
    log.flush()
    if limit_s < 5:
        stage.status = "skipped: budget spent"
        return
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    stage.status = "running"
    try:
        if not _exited(proc, limit_s):
            stage.status = "timed out"
            # SIGINT first: detbench run then saves what it measured as an "interrupted" result.
            _stop(proc, ((signal.SIGINT, INTERRUPT_GRACE_S), (signal.SIGTERM, 10)))
    except BaseException as e:
        stage.status = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed ({type(e).__name__})"
        _stop(proc, ((signal.SIGTERM, STOP_GRACE_S),))
        raise
    finally:
        _kill_group(proc)
        if stage.status == "running":
            rc = proc.returncode
            stage.status = "ok" if rc == 0 else f"failed (rc {rc})"
        stage.seconds = round(time.monotonic() - t0, 1)
        log.write(f"===== {stage.name}: {stage.status} after {stage.seconds}s\n")
        log.flush()


def _exited(proc: subprocess.Popen, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds for ``proc`` to exit, without reaping it (so its process group id
    stays reserved for :func:`_kill_group`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:  # already reaped
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        delay = min(delay * 2, 0.05)
        time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.returncode is not None:  # reaped: its group id may belong to someone else by now
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen, steps) -> None:
    """Send each (signal, grace seconds) of ``steps`` to the group until its leader exits; SIGKILL is
    :func:`_kill_group`'s, in ``finally``."""
    for sig, grace in steps:
        _signal_group(proc, sig)
        if _exited(proc, grace):
            return


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the stage's process group, then reap its leader."""
    _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # stuck in the kernel; init reaps it once it dies
        pass


def _newest_json(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def _adopt(src: Path | None, out: Path, name: str, stage: Stage) -> None:
    """Move a stage's result file into --out under its fixed name."""
    if src is None or not src.is_file():
        if stage.status == "ok":
            stage.note = "no result file written"
        return
    shutil.move(str(src), str(out / name))
    stage.output = name


def environment_summary(device: str) -> dict:
    return asdict(capture_environment(device))


def env_line(env: dict) -> str:
    parts = [env["device_name"]]
    if env.get("sm_count"):
        parts.append(f"{env['sm_count']} SMs, sm_{(env.get('compute_capability') or '').replace('.', '')}")
    parts.append(f"driver {env.get('driver')}, torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}")
    return "; ".join(parts)


TEST_STAGE_HOOK = "DETBENCH_TEST_STAGE_HOOK"


def _hooked(name: str, argv: list[str]) -> list[str]:
    """For tests only: ``DETBENCH_TEST_STAGE_HOOK="STAGE=COMMAND"`` runs COMMAND (split as a shell
    would, :func:`shlex.split`) in place of stage STAGE's own command, with everything else unchanged
    (its own process group, time limit, log). tests/test_gpu_check.py uses it to put a child that
    writes its PID and sleeps where a real stage runs, then interrupts gpu-check."""
    stage, sep, command = os.environ.get(TEST_STAGE_HOOK, "").partition("=")
    return shlex.split(command) if sep and stage == name else argv


# ---- estimates ----------------------------------------------------------------------------------


def _aot_table() -> dict | None:
    """The committed AOT compile table for the installed triton version (else the newest one)."""
    tables = sorted((REPO / "results").glob("aot-triton*.json"))
    try:
        mine = REPO / "results" / f"aot-triton{metadata.version('triton')}.json"
    except metadata.PackageNotFoundError:
        mine = None
    for path in ([mine] if mine in tables else []) + tables[::-1]:
        try:
            return json.loads(path.read_text()) | {"_file": path.name}
        except (OSError, json.JSONDecodeError):
            continue
    return None


def _compile_cost(table: dict | None, presets: tuple[str, ...], dtypes: tuple[str, ...],
                  kernels: tuple[str, ...] | None = None) -> tuple[int, float, str]:
    """(specialisations, mean compile seconds of one, where that comes from) for the kernels detbench
    launches at ``presets``' shapes in ``dtypes`` (all presets and dtypes when empty), on sm_90a (the
    H200's target) in the AOT table."""
    if table is None:
        return 0, COMPILE_FALLBACK_S, "no AOT table committed"
    rows = [r for r in table.get("entries", []) if r.get("target") == "sm_90a" and (r.get("result") or {}).get("ok")]
    if not rows:
        return 0, COMPILE_FALLBACK_S, f"{table['_file']} has no sm_90a entries"
    mean = sum(r["result"]["compile_s"] for r in rows) / len(rows)

    def wanted(r: dict) -> bool:
        sites = [cs.split("/") for cs in r.get("call_sites", [])]
        return (any((not presets or s[0] in presets) and (not dtypes or s[1] in dtypes) for s in sites)
                and (kernels is None or any(k in r.get("kernel", "") for k in kernels)))

    return sum(1 for r in rows if wanted(r)), mean, table["_file"]


def _backends_per_subject() -> dict[str, int]:
    """How many backends `detbench run` would pick per subject where every registered one is
    available (an upper figure: the GPU image lacks flash-attn, for one)."""
    hidden = {"detbench-reference", "planted"}
    return {name: sum(1 for b in REGISTRY.backends(s.primary_op) if b.origin not in hidden)
            for name, s in SUBJECTS.items()}


def _est_tests(cases: int, workers: int) -> Estimate:
    table = _aot_table()
    _, per_spec, source = _compile_cost(table, (), ())
    compile_s = cases * TEST_SPECIALISATIONS * per_spec / workers
    run_s = cases * TEST_S / workers
    return Estimate(START_S + compile_s + run_s,
                    f"{START_S:.0f} s start + {cases} cases x {TEST_SPECIALISATIONS} specialisations x "
                    f"{per_spec:.2f} s compile ({source}) / {workers} workers + {cases} x {TEST_S} s run / {workers}")


def _est_run(preset: str, dtypes: tuple[str, ...], modes: int, repeats: int, timed: int) -> Estimate:
    per_subject = _backends_per_subject()
    cells = sum(per_subject.values()) * len(dtypes) * modes
    calls = repeats + BATCH_CALLS + timed
    work = (cells * calls + len(per_subject) * REFERENCE_CALLS) * CALL_S[preset]
    n, per_spec, source = _compile_cost(_aot_table(), (preset,), dtypes)
    return Estimate(START_S + n * per_spec + work,
                    f"{START_S:.0f} s start + {n} specialisations x {per_spec:.2f} s compile ({source}) + "
                    f"({cells} cells x {calls} calls + {len(per_subject)} fp64 references x {REFERENCE_CALLS}) "
                    f"x {CALL_S[preset]} s")


def _est_sft(configs: int, repeats: int, steps: int) -> Estimate:
    n, per_spec, source = _compile_cost(_aot_table(), ("qwen2.5-0.5b",), ("bf16",), ("attn", "attention"))
    work = configs * repeats * (SFT_BUILD_S + steps * SFT_STEP_S)
    return Estimate(START_S + n * per_spec + work,
                    f"{START_S:.0f} s start + {n} attention specialisations x {per_spec:.2f} s compile ({source}) "
                    f"+ {configs} configs x {repeats} repeats x ({SFT_BUILD_S} s build + {steps} steps x {SFT_STEP_S} s)")


def _est_generate(completions: int) -> Estimate:
    n, per_spec, source = _compile_cost(_aot_table(), ("qwen2.5-0.5b",), ("fp32",), ("_matmul_kernel",))
    per_batch = sum(GENERATE_BATCH_S.values())
    return Estimate(START_S + SFT_BUILD_S + n * per_spec + completions * per_batch,
                    f"{START_S:.0f} s start + {SFT_BUILD_S} s build + {n} matmul specialisations x {per_spec:.2f} s "
                    f"compile ({source}) + {completions} batches x ({GENERATE_BATCH_S['standard']} s standard + "
                    f"{GENERATE_BATCH_S['batch-invariant']} s batch-invariant)")


def _est_fixed(seconds: float, what: str) -> Estimate:
    return Estimate(START_S + seconds, f"{START_S:.0f} s start + {seconds:.0f} s {what} (assumed)")


# ---- the parts and their stages -------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What a stage's command is built from."""
    out: Path          # --out
    folder: Path       # this stage's own temporary folder
    dry_run: bool

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


@dataclass(frozen=True)
class StageSpec:
    name: str
    what: str                                     # one line: what it measures
    output: str | None                            # its file in --out
    command: Callable[[Ctx], list[str] | str]     # the command, or why it is skipped
    estimate: Callable[[], Estimate]              # its cost on the GPU
    result: str | None = None                     # the file its command writes in its folder (else: newest JSON)


def _kernel_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernel_*.py"))


def _pytest(ctx: Ctx, files: list[str], select: str | None) -> list[str]:
    """The kernel tests compiled on CUDA (bf16 included), in parallel where pytest-xdist is installed
    (the GPU image has it), with a JUnit XML report of every case."""
    if ctx.dry_run:
        select = DRY_RUN_TESTS
    workers = [] if ctx.dry_run or find_spec("xdist") is None else ["-n", str(min(GPU_MACHINE_CORES, os.cpu_count() or 1))]
    return [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", *workers,
            *(["-k", select] if select else []), f"--junitxml={ctx.folder / 'tests.xml'}"]


# The number of test cases each tests stage selects (tests/test_gpu_check.py checks them against
# `pytest --collect-only`, so the estimates cannot drift from the test files).
CORE_TEST_CASES = 159
ALL_TEST_CASES = 307


def _run_cmd(preset: str, repeats: int, time_repeats: int, warmup: int) -> Callable[[Ctx], list[str]]:
    def command(ctx: Ctx) -> list[str]:
        if ctx.dry_run:
            return _bench("run", "--quick", "--device", "cpu", "--subjects", "rmsnorm,attention",
                          "--dtypes", "fp32", "--modes", "default,torch-det", "--repeats", "3",
                          "--time-repeats", "2", "--out", str(ctx.folder), "--no-progress")
        return _bench("run", "--device", "cuda", "--preset", preset, "--dtypes", "bf16",
                      "--modes", "default,torch-det", "--repeats", str(repeats), "--time-repeats", str(time_repeats),
                      "--warmup", str(warmup), "--out", str(ctx.folder), "--no-progress")
    return command


SFT_ATTENTION = "eager,sdpa,triton"  # transformers' two, and detbench's deterministic Triton kernel
SFT_STEPS, SFT_REPEATS = 10, 3


def _sft_model(dry_run: bool) -> str:
    return "qwen2.5-tiny" if dry_run else "qwen2.5-0.5b"


def _plant(dry_run: bool) -> list[str]:
    """The dry run plants a fault so that the pinpoint stage has a divergence to work on."""
    return ["--plant", DRY_RUN_PLANT] if dry_run else []


def _sft_cmd(lr: str, modes: str) -> Callable[[Ctx], list[str]]:
    def command(ctx: Ctx) -> list[str]:
        if ctx.dry_run:
            return _bench("sft", "--model", _sft_model(True), "--device", "cpu", "--attention", "eager,sdpa",
                          "--dtype", "fp32", "--lr", lr, "--steps", "2", "--repeats", "2", "--batch-size", "2",
                          "--seq-len", "16", "--out", str(ctx.folder), "--summary-only", *_plant(True))
        return _bench("sft", "--model", _sft_model(False), "--device", "cuda", "--attention", SFT_ATTENTION,
                      "--mode", modes, "--dtype", "bf16", "--lr", lr, "--steps", str(SFT_STEPS),
                      "--repeats", str(SFT_REPEATS), "--out", str(ctx.folder), "--summary-only")
    return command


def _pinpoint_cmd(ctx: Ctx) -> list[str] | str:
    """Pinpoint the first SFT configuration that diverged (skipped, with the reason, when none did)."""
    sft = _load(ctx.out / "sft.json")
    if sft is None:
        return "no SFT result"
    target = _first_diverged(sft)
    if target is None:
        return "no SFT configuration diverged"
    return _bench("pinpoint", "--model", _sft_model(ctx.dry_run), "--device", ctx.device,
                  "--attention", target["attention"], "--mode", target["mode"], "--dtype", target["dtype"],
                  "--lr", repr(target["lr"]), "--steps", "2", "--out", str(ctx.folder), *_plant(ctx.dry_run))


def _kernels_cmd(ctx: Ctx) -> list[str]:
    return _bench("kernel-bench", "--device", ctx.device, "--json", str(ctx.folder / "kernel_speed.json"),
                  *(["--tiny"] if ctx.dry_run else []))


def _nccl_cmd(ctx: Ctx) -> list[str] | str:
    """Data-parallel SFT on every visible GPU with NCCL, standard against invariant reduction (the dry
    run rehearses it on two gloo ranks)."""
    if ctx.dry_run:
        return _bench("sft", "--model", "qwen3-tiny", "--device", "cpu", "--world-size", "2", "--micro-batch", "2",
                      "--batch-size", "4", "--seq-len", "16", "--steps", "2", "--repeats", "2",
                      "--reduce", "standard,invariant", "--out", str(ctx.folder), "--summary-only")
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return f"{gpus} GPU visible; data-parallel NCCL needs at least 2"
    return _bench("sft", "--model", _sft_model(False), "--device", "cuda", "--world-size", str(gpus),
                  "--micro-batch", "1", "--batch-size", str(gpus * 2), "--dtype", "bf16", "--lr", "3e-4",
                  "--steps", str(SFT_STEPS), "--repeats", "2", "--reduce", "standard,invariant",
                  "--out", str(ctx.folder), "--summary-only")


GENERATE_COMPLETIONS = 24


def _generate_cmd(ctx: Ctx) -> list[str]:
    """One prompt greedy in batches of 1..8, standard and batch-invariant in alternating order (fp32: the
    near-tied token pairs differ by 2e-7, below bf16's resolution)."""
    common = ("--near-ties", "2e-7", "--batch-invariant", "both", "--out", str(ctx.folder), "--no-progress")
    if ctx.dry_run:
        return _bench("generate", "--model", "qwen2.5-tiny", "--device", "cpu", "--completions", "6",
                      "--max-batch", "4", "--prompt-len", "8", "--new-tokens", "4", *common)
    return _bench("generate", "--model", "qwen2.5-0.5b", "--device", "cuda", "--dtype", "fp32",
                  "--completions", str(GENERATE_COMPLETIONS), "--max-batch", "8", "--prompt-len", "16",
                  "--new-tokens", "16", *common)


RUN_06B = dict(repeats=10, time_repeats=20, warmup=3)
RUN_8B = dict(repeats=5, time_repeats=10, warmup=2)

PARTS: dict[int, tuple[str, list[StageSpec]]] = {
    1: ("headline: do the deterministic kernels pass on CUDA; does SFT diverge with sdpa but not eager "
        "(bf16, lr 3e-4); which op does pinpoint name", [
        StageSpec("tests-core", "the kernels' correctness (vs float64) and repeat-equality tests on CUDA",
                  "tests-core.xml", lambda c: _pytest(c, _kernel_test_files(), CORE_TESTS),
                  lambda: _est_tests(CORE_TEST_CASES, GPU_MACHINE_CORES), result="tests.xml"),
        StageSpec("sft", "detbench sft, Qwen2.5-0.5B shapes, eager vs sdpa vs triton attention, bf16, lr 3e-4",
                  "sft.json", _sft_cmd("3e-4", "default"), lambda: _est_sft(3, SFT_REPEATS, SFT_STEPS)),
        StageSpec("pinpoint", "detbench pinpoint on the first SFT configuration whose repeats diverged",
                  "pinpoint.json", _pinpoint_cmd, lambda: _est_fixed(PINPOINT_S, "replay and trace-compare")),
    ]),
    2: ("cost of determinism: every backend on Qwen3-0.6B shapes, default vs torch-det; kernel speed", [
        StageSpec("run-0.6b", "detbench run, Qwen3-0.6B shapes, bf16, default and torch-det, 10 repeats",
                  "run-qwen3-0.6b.json", _run_cmd("qwen3-0.6b", **RUN_06B),
                  lambda: _est_run("qwen3-0.6b", ("bf16",), 2, RUN_06B["repeats"],
                                   2 * (RUN_06B["time_repeats"] + RUN_06B["warmup"]))),
        StageSpec("kernels", "detbench kernel-bench: each kernel against its atomic twin and torch",
                  "kernel_speed.json", _kernels_cmd, lambda: _est_fixed(KERNEL_BENCH_S, "of timings"),
                  result="kernel_speed.json"),
    ]),
    3: ("breadth: every kernel and drop-in test on CUDA, Qwen3-8B shapes", [
        StageSpec("tests-all", "every kernel and transformers drop-in test on CUDA", "tests-all.xml",
                  lambda c: _pytest(c, [*_kernel_test_files(), "tests/test_hf_dropin.py"], None),
                  lambda: _est_tests(ALL_TEST_CASES, GPU_MACHINE_CORES), result="tests.xml"),
        StageSpec("run-8b", "detbench run, Qwen3-8B shapes, bf16, default and torch-det, 5 repeats",
                  "run-qwen3-8b.json", _run_cmd("qwen3-8b", **RUN_8B),
                  lambda: _est_run("qwen3-8b", ("bf16",), 2, RUN_8B["repeats"],
                                   2 * (RUN_8B["time_repeats"] + RUN_8B["warmup"]))),
    ]),
    4: ("setups: SFT at lr 1e-5; data-parallel SFT on every visible GPU with NCCL; one prompt in many batches", [
        StageSpec("sft-1e-5", "detbench sft as in part 1 at lr 1e-5", "sft-lr1e-5.json",
                  _sft_cmd("1e-5", "default"), lambda: _est_sft(3, SFT_REPEATS, SFT_STEPS)),
        StageSpec("sft-nccl", "detbench sft on every visible GPU (NCCL), standard vs invariant reduction; skipped "
                  "with fewer than 2 GPUs", "sft-nccl.json", _nccl_cmd, lambda: _est_sft(2, 2, SFT_STEPS)),
        StageSpec("generate", "detbench generate, Qwen2.5-0.5B shapes, fp32: distinct greedy completions of one "
                  "prompt in batches of 1..8, standard vs batch-invariant, and the mode's cost", "generate.json",
                  _generate_cmd, lambda: _est_generate(GENERATE_COMPLETIONS)),
    ]),
}


def part_stages(part: int) -> list[Stage]:
    """The part's stages, env first, each with its estimate."""
    stages = [Stage("env", estimate_s=5.0, basis="in this process (assumed)")]
    for spec in PARTS[part][1]:
        est = spec.estimate()
        stages.append(Stage(spec.name, estimate_s=round(est.seconds, 1), basis=est.basis))
    return stages


def plan(part: int, budget_s: float = PART_BUDGET_S) -> dict:
    """The part's stages with their GPU estimates and limits, and whether the estimates fit ``budget_s``."""
    stages = part_stages(part)
    total = sum(s.estimate_s for s in stages)
    for s in stages:
        s.limit_s = round(budget_s * s.estimate_s / total, 1)
    return {"part": part, "title": PARTS[part][0], "budget_s": budget_s, "estimate_s": round(total, 1),
            "fits": total <= budget_s, "stages": stages}


class _Budget:
    """Runs stages, each within its share of the budget (in proportion to its estimate) plus what
    earlier stages left unused, never past the part's deadline."""

    def __init__(self, stages: list[Stage], budget_s: float, log) -> None:
        self.by_name = {s.name: s for s in stages}
        self.budget_s = budget_s
        self.total_est = sum(s.estimate_s for s in stages) or 1.0
        self.deadline = time.monotonic() + budget_s
        self.carry = 0.0
        self.log = log

    def step(self, name: str, argv: list[str], env_extra=None) -> Stage:
        st = self.by_name[name]
        argv = _hooked(name, argv)
        share = self.budget_s * st.estimate_s / self.total_est
        lim = max(0.0, min(share + self.carry, self.deadline - time.monotonic()))
        _run_stage(st, argv, lim, self.log, env_extra)
        self.carry = max(0.0, lim - st.seconds) if st.status == "ok" else 0.0
        return st

    def skip(self, name: str, reason: str) -> None:
        st = self.by_name[name]
        st.status = f"skipped: {reason}"
        self.carry += self.budget_s * st.estimate_s / self.total_est


@dataclass
class CheckRun:
    """One gpu-check part, filled in as it goes, so that an interrupted run still says what finished."""

    budget_s: float
    dry_run: bool
    part: int = 1
    stages: list[Stage] = field(default_factory=list)
    env: dict | None = None
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM; the stage it was in says "interrupted"
    triton_cache: str | None = None  # a Triton cache folder filled ahead of time (python -m kernels.aot)

    def __post_init__(self) -> None:
        if not self.stages:
            self.stages = part_stages(self.part)


def run_checks(out: Path, run: CheckRun) -> CheckRun:
    """Run every stage of ``run.part`` into ``out``, recording into ``run`` (the caller's, so it
    survives an interrupt).

    On ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM under ``bench.cli``) the running stage's process group
    is killed (:func:`_run_stage`), the stage is marked ``interrupted``, ``run.interrupted`` is set and
    the interrupt goes on; the caller then writes the summary (:func:`write_summary`). The temporary
    ``gpu-check-*`` folder is removed on every way out.
    """
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        with open(out / "gpu_check.log", "w") as log:
            budget = _Budget(run.stages, run.budget_s, log)
            run.env = _env_stage(budget.by_name["env"], "cpu" if run.dry_run else "cuda", log)
            stage_env = _use_triton_cache(run, budget.by_name["env"], log) if run.triton_cache else None
            for spec in PARTS[run.part][1]:
                ctx = Ctx(out=out, folder=work / spec.name, dry_run=run.dry_run)
                ctx.folder.mkdir()
                argv = spec.command(ctx)
                if isinstance(argv, str):
                    budget.skip(spec.name, argv)
                    continue
                st = budget.step(spec.name, argv, stage_env)
                src = ctx.folder / spec.result if spec.result else _newest_json(ctx.folder)
                _adopt(src, out, spec.output, st)
    except KeyboardInterrupt:
        run.interrupted = True
        for st in run.stages:
            if st.status == "running":  # the env stage (in this process) or a stage not yet marked
                st.status = "interrupted"
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return run


def _use_triton_cache(run: CheckRun, st: Stage, log) -> dict:
    """Point the cache's group files at where it is now and hand it to every stage (TRITON_CACHE_DIR).
    A cache filled by another Triton build (another Python's libtriton, another ptxas) only misses:
    the note says so, and the stages compile as they would without it."""
    folder = Path(run.triton_cache).resolve()
    info = aot.relocate_cache(folder)
    mismatch = info.get("mismatch")
    st.note += (f"; Triton cache {folder.name}: {info['groups'] - info['dropped_groups']} kernels, "
                + (f"built elsewhere ({'; '.join(mismatch)}): expect misses" if mismatch else
                   "fingerprint matches" if mismatch == [] else "no fingerprint to check"))
    log.write(f"===== triton cache {folder}: {json.dumps(info)}\n")
    return {"TRITON_CACHE_DIR": str(folder)}


def _env_stage(st: Stage, device: str, log) -> dict:
    st.status = "running"
    t0 = time.monotonic()
    env = environment_summary(device)
    st.status, st.seconds, st.note = "ok", round(time.monotonic() - t0, 1), env_line(env)
    print(f"gpu-check on {st.note}", flush=True)
    log.write("===== env\n" + json.dumps(env, indent=1) + "\n")
    return env


def _first_diverged(sft: dict) -> dict | None:
    """The first configuration of an SFT result whose repeats were not bitwise equal."""
    for cfg in sft.get("configs", []):
        if cfg.get("status") == "ok" and cfg.get("identical") is False:
            return cfg
    return None


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _junit(path: Path) -> dict | None:
    """Counts of a pytest JUnit XML report, and the failed cases' names."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname', '')}::{c.get('name', '')}" for c in root.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


# ---- what the results say -----------------------------------------------------------------------


def _tests_answer(report: dict | None, file: str) -> tuple[str, str]:
    if report is None:
        return "not answered: no test report", file
    passed = report["tests"] - report["failures"] - report["errors"] - report["skipped"]
    if report["tests"] == 0:
        return "not answered: no test ran", file
    if report["failures"] or report["errors"]:
        names = ", ".join(report["failed"][:3]) + (" ..." if len(report["failed"]) > 3 else "")
        return f"NO: {report['failures'] + report['errors']} of {report['tests']} failed ({names})", file
    return f"yes: {passed} passed, {report['skipped']} skipped", file


def _plants(sft: dict | None) -> list[str]:
    """The faults an SFT result was planted with (``--plant``, e.g. the dry run's), as ``PATH=op/backend``."""
    return list(((sft or {}).get("settings") or {}).get("plants") or [])


def _planted(plants: list[str]) -> str:
    """What a divergence caused by a planted fault says next to it: `` (planted: PATH=op/backend)``."""
    return f" (planted: {', '.join(plants)})" if plants else ""


def _is_planted(op: str, module: str, plants: list[str]) -> bool:
    """Whether ``op`` at ``module`` (a pinpoint finding: ``linear/planted-nondet``, a module path) is one of
    ``plants``: the same op/backend, at the planted path or below it."""
    for p in plants:
        path, _, target = p.partition("=")
        path = "" if path == "<root>" else path
        if target == op and (not path or module == path or module.startswith(path + ".")):
            return True
    return False


def _sft_answer(sft: dict | None) -> tuple[str, str]:
    if sft is None:
        return "not answered: no SFT result", "sft.json"
    by_attn = {c["attention"]: c for c in sft.get("configs", [])}
    planted = _planted(_plants(sft))
    parts = []
    for name, c in by_attn.items():
        if c.get("status") != "ok":
            parts.append(f"{name} {c.get('status')}")
        elif c.get("identical") is None:
            parts.append(f"{name} not comparable")
        elif c["identical"]:
            parts.append(f"{name} identical x{c.get('repeats')}")
        else:
            parts.append(f"{name} DIVERGED at step {c.get('first_divergent_step')} x{c.get('repeats')}{planted}")
    eager, sdpa = by_attn.get("eager", {}), by_attn.get("sdpa", {})
    if eager.get("identical") is True and sdpa.get("identical") is False:
        verdict = "yes"
    elif eager.get("identical") is None or sdpa.get("identical") is None:
        verdict = "not answered"
    else:
        verdict = "no"
    return f"{verdict}: {'; '.join(parts) or 'no configuration'}", "sft.json"


def _found(op: str, module: str, plants: list[str]) -> str:
    """`` - the planted fault`` after a finding that is one of ``plants``, or "" ."""
    return " - the planted fault" if _is_planted(op, module, plants) else ""


def _pinpoint_answer(pin: dict | None, pin_stage: Stage | None, plants: list[str] | None = None) -> tuple[str, str]:
    plants = plants or []
    if pin is None:
        reason = pin_stage.status if pin_stage else "not run"
        return f"not answered: pinpoint {reason}", "pinpoint.json"
    for pair in (pin.get("compare") or {}).get("pairs", []):
        rc = pair.get("root_cause")
        if rc:
            return (f"{rc['op']} at {rc['module']} ({rc['phase']}), from trace-compare"
                    f"{_found(rc['op'], rc['module'], plants)}", "pinpoint.json")
    for f in (pin.get("replay") or {}).get("findings", [])[:1]:
        return (f"{f['op']} at {f['module']} ({f['phase']}), from replay{_found(f['op'], f['module'], plants)}",
                "pinpoint.json")
    return "none: the runs pinpoint compared did not differ", "pinpoint.json"


def headline(out: Path, stages: list[Stage]) -> list[tuple[str, str, str]]:
    """Part 1's answers: (question, answer, file it rests on)."""
    by_name = {s.name: s for s in stages}
    return [
        ("Do detbench's deterministic kernels pass their correctness and repeat-equality tests on CUDA?",
         *_tests_answer(_junit(out / "tests-core.xml"), "tests-core.xml")),
        ("Does SFT of Qwen2.5-0.5B shapes (bf16, lr 3e-4) diverge with sdpa but not with eager?",
         *_sft_answer(_load(out / "sft.json"))),
        ("Which op does pinpoint name?", *_pinpoint_answer(_load(out / "pinpoint.json"), by_name.get("pinpoint"),
                                                           _plants(_load(out / "sft.json")))),
    ]


def findings(out: Path) -> list[str]:
    """One line per measurement found in the stage results (missing files are skipped)."""
    lines = []
    for name in ("tests-core.xml", "tests-all.xml"):
        report = _junit(out / name)
        if report is not None:
            lines.append(f"{name}: {_tests_answer(report, name)[0]}")
    for name in ("run-qwen3-0.6b.json", "run-qwen3-8b.json"):
        run = _load(out / name)
        if run is None:
            continue
        cells = run.get("cells", [])
        nondet = sorted({f"{c['subject']}/{c['backend']} {c['dtype']} {c['mode']}" for c in cells
                         if c.get("deterministic") is False})
        variant = sorted({f"{c['subject']}/{c['backend']} {c['dtype']}" for c in cells
                          if c.get("batch_invariant") is False})
        lines.append(f"{name}: {len(cells)} cells ({run.get('status')}); nondeterministic: "
                     f"{', '.join(nondet) or 'none'}; batch-variant: {', '.join(variant) or 'none'}")
    speed = _load(out / "kernel_speed.json")
    for r in (speed or {}).get("ratios", []):
        value = "n/a" if r.get("value") is None else f"{r['value']:.3g}"
        met = {True: "met", False: "MISSED", None: "not judged"}[r.get("met")]
        lines.append(f"kernel-bench {r['name']}: {value} (target {r.get('target') or '-'}, {met})")
    for name in ("sft.json", "sft-lr1e-5.json"):
        sft = _load(out / name)
        for c in (sft or {}).get("configs", []):
            planted = _planted(_plants(sft)) if c.get("identical") is False else ""
            lines.append(f"sft {c['attention']} {c['mode']} {c['dtype']} lr={c['lr']:g}: "
                         f"{c.get('verdict') or c.get('status')}{planted}")
    for r in ((_load(out / "sft-nccl.json") or {}).get("distributed") or {}).get("setups", []):
        lines.append(f"sft data-parallel {r['reduce']} {r['label']}: run to run "
                     f"{'identical' if r['run_to_run_identical'] else 'DIFFERS'}; {r['verdict']}")
    gen = _load(out / "generate.json")
    for m in (gen or {}).get("summary", []):
        lines.append(f"generate {m['mode']}: {m['verdict']}; {m['tokens_per_s']:.0f} tokens/s")
    cost = (gen or {}).get("cost")
    if cost:
        lines.append(f"generate: the batch-invariant mode takes {cost['ratio_median']:.2f}x a batch's time (median "
                     f"over {cost['batches']} batches, quartiles {cost['ratio_q1']:.2f}-{cost['ratio_q3']:.2f})")
    pin = _load(out / "pinpoint.json")
    if pin:
        plants = _plants(_load(out / "sft.json"))  # pinpoint runs the SFT stage's plants
        for f in (pin.get("replay") or {}).get("findings", [])[:3]:
            lines.append(f"pinpoint replay: {f['op']} at {f['module']} ({f['phase']}), {f['n_diff']} elements differ"
                         f"{_found(f['op'], f['module'], plants)}")
        for pair in (pin.get("compare") or {}).get("pairs", [])[:1]:
            rc = pair.get("root_cause")
            if rc:
                lines.append(f"pinpoint trace-compare root cause: {rc['op']} at {rc['module']} ({rc['phase']})"
                             f"{_found(rc['op'], rc['module'], plants)}")
    return lines


def write_summary(out: Path, run: CheckRun) -> str:
    """Write summary.md and summary.json (each atomically) from ``run``, finished or interrupted."""
    where = env_line(run.env) if run.env else "Environment not captured"
    estimate = sum(s.estimate_s for s in run.stages)
    lines = [
        f"# detbench gpu-check part {run.part}{' (CPU dry run)' if run.dry_run else ''}",
        "",
        f"Part {run.part}, {PARTS[run.part][0]}.",
        "",
        f"{where}. Budget {run.budget_s:.0f}s; GPU estimate {estimate:.0f}s. Stage logs: gpu_check.log.",
        "",
    ]
    if run.interrupted:
        stopped = [s.name for s in run.stages if s.status == "interrupted"]
        lines += [f"**Interrupted** (Ctrl-C or SIGTERM){' during ' + ', '.join(stopped) if stopped else ''}; "
                  f"the stages after it did not run.", ""]
    if run.part == 1:
        lines += ["## Headline", "", "| question | answer | from |", "|---|---|---|"]
        lines += [f"| {q} | {a} | {f} |" for q, a, f in headline(out, run.stages)] + [""]
    lines += [
        "## Stages",
        "",
        "| stage | status | seconds | estimate | limit | output | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in run.stages:
        lines.append(f"| {s.name} | {s.status} | {s.seconds} | {s.estimate_s} | {s.limit_s} | {s.output or ''} "
                     f"| {s.note} |")
    lines += ["", "Estimates (GPU, from `bench/gpu_check.py`'s cost model):", ""]
    lines += [f"- {s.name}: {s.estimate_s:.0f} s = {s.basis}" for s in run.stages]
    found = findings(out)
    if found:
        lines += ["", "## Findings", ""] + [f"- {line}" for line in found]
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "summary.md", text, exclusive=False)
    write_json_atomic(out / "summary.json", {"part": run.part, "dry_run": run.dry_run, "budget_s": run.budget_s,
                                             "interrupted": run.interrupted, "environment": run.env,
                                             "headline": [dict(zip(("question", "answer", "from"), h))
                                                          for h in headline(out, run.stages)] if run.part == 1 else None,
                                             "stages": [asdict(s) for s in run.stages]}, exclusive=False)
    return text


def files(part: int) -> tuple[str, ...]:
    """The files --out receives for ``part``."""
    return ("summary.md", "summary.json", "gpu_check.log", *(s.output for s in PARTS[part][1] if s.output))
