"""`detbench gpu-check`: the project's one bounded GPU validation script.

One command runs every CUDA measurement the project needs, each stage a subprocess with its own
share of a total time budget that the script enforces (a stage that runs over is stopped, recorded
as timed out, and the next stage starts):

    env       device, SM count, driver, torch/triton/CUDA versions
    tests     the kernel and transformers drop-in tests, compiled on CUDA (bf16 cases included)
    run-0.6b  detbench run: all subjects x available backends x bf16,fp32 x default,torch-det,
              20 repeats, Qwen3-0.6B layer shapes
    run-8b    the same on Qwen3-8B layer shapes
    kernels   detbench kernel-bench: the kernels' speed targets, ratios from one run
    sft       detbench sft: Qwen2.5-0.5B shapes, eager vs sdpa vs detbench attention, bf16,
              lr 1e-5 and 3e-4, 20 steps x 3 repeats
    pinpoint  detbench pinpoint on the first SFT configuration whose repeats diverged

It writes at most 8 files into --out (the device tool brings back at most 8) and prints a short
summary table last. ``--dry-run`` runs the same stages on the CPU with tiny shapes in seconds; CI
runs it so the script cannot rot.

Ctrl-C or SIGTERM stops the running stage's whole process group (SIGTERM, a grace period, SIGKILL),
removes the temporary ``gpu-check-*`` folder, writes summary.md/summary.json for the stages that
finished (the stopped one marked ``interrupted``) and names the files --out holds; exit 130 (143 for
SIGTERM). For tests, ``DETBENCH_TEST_STAGE_HOOK="STAGE=COMMAND"`` runs COMMAND in place of a stage's
own command (:func:`_hooked`).

On the lent GPU machine (no install there; its python3 has torch, triton, transformers, rich,
pytest, safetensors), from the repository root:

    python3 -m bench gpu-check --out "$OUT" --budget 480
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.results import capture_environment, write_json_atomic, write_text_atomic

DEFAULT_BUDGET_S = 480.0
REPO = Path(__file__).resolve().parents[1]
DRY_RUN_PLANT = "model.layers.1.mlp.down_proj=linear/planted-nondet"
INTERRUPT_GRACE_S = 20  # time a stage stopped for its time limit gets to write its partial result
STOP_GRACE_S = 5.0  # time a stage gets after SIGTERM when gpu-check itself is interrupted

# Share of the budget per stage; unused time carries over to later stages.
SHARES = {
    "tests": 0.10,
    "run-0.6b": 0.22,
    "run-8b": 0.22,
    "kernels": 0.14,
    "sft": 0.22,
    "pinpoint": 0.10,
}

# The files --out receives (the device tool returns at most 8).
FILES = (
    "summary.md", "summary.json", "gpu_check.log", "run-qwen3-0.6b.json", "run-qwen3-8b.json",
    "kernel_speed.json", "sft.json", "pinpoint.json",
)


@dataclass
class Stage:
    name: str
    status: str = "not run"        # ok | failed (rc N) | timed out | skipped: reason
    seconds: float = 0.0
    limit_s: float = 0.0
    command: list[str] = field(default_factory=list)
    output: str | None = None      # file in --out this stage produced
    note: str = ""


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


class _Budget:
    """Runs stages, each within its share of the budget plus what earlier stages left unused."""

    def __init__(self, stages: list[Stage], budget_s: float, log) -> None:
        self.by_name = {s.name: s for s in stages}
        self.budget_s = budget_s
        self.deadline = time.monotonic() + budget_s
        self.carry = 0.0
        self.log = log

    def step(self, name: str, argv: list[str], env_extra=None) -> Stage:
        st = self.by_name[name]
        argv = _hooked(name, argv)
        lim = max(0.0, min(self.budget_s * SHARES[name] + self.carry, self.deadline - time.monotonic()))
        _run_stage(st, argv, lim, self.log, env_extra)
        self.carry = max(0.0, lim - st.seconds) if st.status == "ok" else 0.0
        return st


def _tests_argv(dry_run: bool) -> list[str]:
    """The kernel and drop-in tests run compiled on CUDA (bf16 included); a dry run only collects them."""
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernel_*.py"))
    tests.append("tests/test_hf_dropin.py")
    return [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider",
            *(["--collect-only"] if dry_run else [])]


def _run_argv(preset: str, folder: Path, dry_run: bool) -> list[str]:
    if dry_run:
        return _bench("run", "--quick", "--device", "cpu", "--subjects", "rmsnorm,attention",
                      "--dtypes", "fp32", "--modes", "default,torch-det", "--repeats", "3",
                      "--time-repeats", "2", "--out", str(folder), "--no-progress")
    return _bench("run", "--device", "cuda", "--preset", preset, "--dtypes", "bf16,fp32",
                  "--modes", "default,torch-det", "--repeats", "20", "--out", str(folder), "--no-progress")


def _sft_model(dry_run: bool) -> str:
    return "qwen2.5-tiny" if dry_run else "qwen2.5-0.5b"


def _plant(dry_run: bool) -> list[str]:
    """The dry run plants a fault so that the pinpoint stage has a divergence to work on."""
    return ["--plant", DRY_RUN_PLANT] if dry_run else []


def _sft_argv(folder: Path, dry_run: bool) -> list[str]:
    if dry_run:
        return _bench("sft", "--model", _sft_model(dry_run), "--device", "cpu", "--attention", "eager,sdpa",
                      "--dtype", "fp32", "--lr", "1e-5,3e-4", "--steps", "2", "--repeats", "2",
                      "--batch-size", "2", "--seq-len", "16", "--out", str(folder), "--summary-only",
                      *_plant(dry_run))
    return _bench("sft", "--model", _sft_model(dry_run), "--device", "cuda", "--attention",
                  "eager,sdpa,triton", "--dtype", "bf16", "--lr", "1e-5,3e-4", "--steps", "20",
                  "--repeats", "3", "--out", str(folder), "--summary-only")


@dataclass
class CheckRun:
    """One gpu-check, filled in as it goes, so that an interrupted run still says what finished."""

    budget_s: float
    dry_run: bool
    stages: list[Stage] = field(default_factory=lambda: [Stage(n) for n in ("env", *SHARES)])
    env: dict | None = None
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM; the stage it was in says "interrupted"


def run_checks(out: Path, run: CheckRun) -> CheckRun:
    """Run every stage into ``out``, recording into ``run`` (the caller's, so it survives an interrupt).

    On ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM under ``bench.cli``) the running stage's process group
    is killed (:func:`_run_stage`), the stage is marked ``interrupted``, ``run.interrupted`` is set and
    the interrupt goes on; the caller then writes the summary (:func:`write_summary`). The temporary
    ``gpu-check-*`` folder is removed on every way out.
    """
    device = "cpu" if run.dry_run else "cuda"
    dry_run = run.dry_run
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        with open(out / "gpu_check.log", "w") as log:
            budget = _Budget(run.stages, run.budget_s, log)
            run.env = _env_stage(budget.by_name["env"], device, log)
            budget.step("tests", _tests_argv(dry_run))
            for name, preset in (("run-0.6b", "qwen3-0.6b"), ("run-8b", "qwen3-8b")):
                d = work / name
                d.mkdir()
                st = budget.step(name, _run_argv(preset, d, dry_run))
                _adopt(_newest_json(d), out, f"run-{preset}.json", st)
            kjson = work / "kernel_speed.json"
            st = budget.step("kernels", _bench("kernel-bench", "--device", device, "--json", str(kjson),
                                               *(["--tiny"] if dry_run else [])))
            _adopt(kjson, out, "kernel_speed.json", st)
            d = work / "sft"
            d.mkdir()
            st = budget.step("sft", _sft_argv(d, dry_run))
            _adopt(_newest_json(d), out, "sft.json", st)
            _pinpoint_stage(budget, out, work, device, dry_run, sft_ok=bool(st.output))
    except KeyboardInterrupt:
        run.interrupted = True
        for st in run.stages:
            if st.status == "running":  # the env stage (in this process) or a stage not yet marked
                st.status = "interrupted"
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return run


def _env_stage(st: Stage, device: str, log) -> dict:
    st.status = "running"
    t0 = time.monotonic()
    env = environment_summary(device)
    st.status, st.seconds, st.note = "ok", round(time.monotonic() - t0, 1), env_line(env)
    print(f"gpu-check on {st.note}", flush=True)
    log.write("===== env\n" + json.dumps(env, indent=1) + "\n")
    return env


def _pinpoint_stage(budget: _Budget, out: Path, work: Path, device: str, dry_run: bool, sft_ok: bool) -> None:
    """Pinpoint the first SFT configuration that diverged (skipped, with the reason, when none did)."""
    target = _first_diverged(out / "sft.json") if sft_ok else None
    pin = budget.by_name["pinpoint"]
    if target is None:
        pin.status = "skipped: no SFT configuration diverged" if sft_ok else "skipped: no SFT result"
        return
    d = work / "pinpoint"
    d.mkdir()
    argv = _bench("pinpoint", "--model", _sft_model(dry_run), "--device", device, "--attention", target["attention"],
                  "--mode", target["mode"], "--dtype", target["dtype"], "--lr", repr(target["lr"]),
                  "--steps", "2", "--out", str(d), *_plant(dry_run))
    pin.note = f"on {target['attention']} {target['mode']} {target['dtype']} lr={target['lr']}"
    budget.step("pinpoint", argv)
    _adopt(_newest_json(d), out, "pinpoint.json", pin)


def _first_diverged(sft_json: Path) -> dict | None:
    """The first configuration of an SFT result whose repeats were not bitwise equal."""
    try:
        data = json.loads(sft_json.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for cfg in data.get("configs", []):
        if cfg.get("status") == "ok" and cfg.get("identical") is False:
            return cfg
    return None


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def findings(out: Path) -> list[str]:
    """One line per headline measurement found in the stage results (missing files are skipped)."""
    lines = []
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
    sft = _load(out / "sft.json")
    for c in (sft or {}).get("configs", []):
        lines.append(f"sft {c['attention']} {c['mode']} {c['dtype']} lr={c['lr']:g}: {c.get('verdict') or c.get('status')}")
    pin = _load(out / "pinpoint.json")
    if pin:
        for f in (pin.get("replay") or {}).get("findings", [])[:3]:
            lines.append(f"pinpoint replay: {f['op']} at {f['module']} ({f['phase']}), {f['n_diff']} elements differ")
        for pair in (pin.get("compare") or {}).get("pairs", [])[:1]:
            rc = pair.get("root_cause")
            if rc:
                lines.append(f"pinpoint trace-compare root cause: {rc['op']} at {rc['module']} ({rc['phase']})")
    return lines


def write_summary(out: Path, run: CheckRun) -> str:
    """Write summary.md and summary.json (each atomically) from ``run``, finished or interrupted."""
    where = env_line(run.env) if run.env else "Environment not captured"
    lines = [
        f"# detbench gpu-check{' (CPU dry run)' if run.dry_run else ''}",
        "",
        f"{where}. Budget {run.budget_s:.0f}s. Stage logs: gpu_check.log.",
        "",
    ]
    if run.interrupted:
        stopped = [s.name for s in run.stages if s.status == "interrupted"]
        lines += [f"**Interrupted** (Ctrl-C or SIGTERM){' during ' + ', '.join(stopped) if stopped else ''}; "
                  f"the stages after it did not run.", ""]
    lines += [
        "| stage | status | seconds | limit | output | note |",
        "|---|---|---|---|---|---|",
    ]
    for s in run.stages:
        lines.append(f"| {s.name} | {s.status} | {s.seconds} | {s.limit_s} | {s.output or ''} | {s.note} |")
    found = findings(out)
    if found:
        lines += ["", "## Findings", ""] + [f"- {line}" for line in found]
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "summary.md", text, exclusive=False)
    write_json_atomic(out / "summary.json", {"dry_run": run.dry_run, "budget_s": run.budget_s,
                                             "interrupted": run.interrupted, "environment": run.env,
                                             "stages": [asdict(s) for s in run.stages]}, exclusive=False)
    return text
