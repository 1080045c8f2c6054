"""Long runs: the progress bar's ETA, the negative control's short plan, and kernel-bench choosing the
Triton interpreter by itself on a CPU."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from importlib import metadata

import pytest
from rich.console import Console
from rich.progress import Progress

from bench import cli
from bench.cli import kernel_bench
from bench.cli.common import EtaColumn, eta_seconds, fmt_duration, progress_line
from bench.errors import InputError
from bench.planted import PLANTED, negative_control_subjects
from bench.subjects import SUBJECTS
from kernels._common import interpreter_conflict

# ------------------------------------------------------------------------------------------------
# ETA
# ------------------------------------------------------------------------------------------------


def test_eta_is_the_mean_pace_of_the_finished_items():
    assert eta_seconds(10.0, 2, 4) == 10.0
    assert eta_seconds(30.0, 3, 4) == 10.0
    assert eta_seconds(5.0, 4, 4) == 0.0
    assert eta_seconds(5.0, 0, 4) is None
    assert [fmt_duration(s) for s in (None, 0.4, 75, 3725)] == ["-:--", "0:00", "1:15", "1:02:05"]
    assert progress_line(1, 3, 20.0, "x: identical") == "[1/3] x: identical (elapsed 0:20, ETA 0:40)"


def test_the_eta_column_shows_the_time_left():
    clock = [0.0]
    progress = Progress(EtaColumn(), get_time=lambda: clock[0], console=Console(file=io.StringIO()))
    task_id = progress.add_task("cells", total=4)
    task = progress.tasks[0]
    assert EtaColumn().render(task).plain == "ETA -:--"
    clock[0] = 12.0
    progress.advance(task_id, 3)
    assert EtaColumn().render(task).plain == "ETA 0:04"


# ------------------------------------------------------------------------------------------------
# the negative control runs the subjects that have a planted backend
# ------------------------------------------------------------------------------------------------


def _first_subject_of_each(ops: set[str]) -> list[str]:
    firsts = [name for i, name in enumerate(SUBJECTS)
              if SUBJECTS[name].primary_op not in {SUBJECTS[m].primary_op for m in list(SUBJECTS)[:i]}]
    return [name for name in firsts if SUBJECTS[name].primary_op in ops]


def test_negative_control_subjects_are_one_per_planted_op():
    ops_of = {name: {op for op, n in PLANTED if n == name} for _, name in PLANTED}
    chosen = negative_control_subjects(["eager", "planted-nondet"], quick=False)
    assert chosen == _first_subject_of_each(ops_of["planted-nondet"])
    assert sorted(SUBJECTS[s].primary_op for s in chosen) == sorted(ops_of["planted-nondet"])
    assert negative_control_subjects(None, quick=True) == _first_subject_of_each({op for op, _ in PLANTED})
    # not a negative control: every subject is wanted
    assert negative_control_subjects(None, quick=False) is None
    assert negative_control_subjects(["eager"], quick=True) is None
    assert negative_control_subjects(["eager", "sdpa", "planted-nondet"], quick=True) is None


def test_run_plant_with_planted_backends_plans_only_their_subjects(tmp_path, capsys, monkeypatch):
    """The plan of ``detbench run --quick --plant --backends eager,planted-nondet``, stopped before any cell
    runs; and its progress bar has an ETA column."""
    seen = {}

    def stop_before_running(plan, result, progress=None, on_cell=None):
        seen["subjects"], seen["progress"] = plan.settings.subjects, progress
        raise InputError("stopped by the test before the first cell")

    monkeypatch.setattr("bench.cli.run.execute", stop_before_running)
    monkeypatch.setattr("bench.cli.run.print_run", lambda result, console: None)
    monkeypatch.setenv("COLUMNS", "250")
    rc = cli.main(["run", "--quick", "--plant", "--backends", "eager,planted-nondet", "--dtypes", "fp32",
                   "--modes", "default", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 2
    out = capsys.readouterr().out
    expected = negative_control_subjects(["eager", "planted-nondet"], quick=True)
    assert seen["subjects"] == expected
    assert f"negative control: one subject per op with a planted backend: {', '.join(expected)}" in out
    assert any(isinstance(c, EtaColumn) for c in seen["progress"].columns)


# ------------------------------------------------------------------------------------------------
# kernel-bench --tiny on a CPU re-executes itself under the Triton interpreter
# ------------------------------------------------------------------------------------------------

NEW = {"triton_version": "3.8.0", "numpy_version": "2.4.0"}


def test_kernel_bench_reexecutes_under_the_interpreter_only_when_it_helps():
    decide = kernel_bench.interpreter_reexec
    yes, line = decide("cpu", {}, interpreted=False, **NEW)
    assert yes and "TRITON_INTERPRET=1" in line
    assert decide("cuda", {}, interpreted=False, **NEW) == (False, None)
    assert decide("cpu", {}, interpreted=True, **NEW) == (False, None)
    assert decide("cpu", {}, interpreted=False, triton_version=None, numpy_version="2.4.0") == (False, None)
    # the guard against a loop: the re-executed process never re-executes
    no, line = decide("cpu", {kernel_bench.REEXEC_ENV: "1"}, interpreted=False, **NEW)
    assert not no and kernel_bench.REEXEC_ENV in line
    # the user's own TRITON_INTERPRET is respected
    no, line = decide("cpu", {"TRITON_INTERPRET": "0"}, interpreted=False, **NEW)
    assert not no and "TRITON_INTERPRET=0" in line
    # triton < 3.7's interpreter breaks on numpy >= 2.4: refused with the fix
    no, line = decide("cpu", {}, interpreted=False, triton_version="3.6.0", numpy_version="2.4.1")
    assert not no and interpreter_conflict("3.6.0", "2.4.1") in line


def test_kernel_bench_cli_execs_itself_with_the_interpreter_set(monkeypatch, capsys):
    argv = ["kernel-bench", "--tiny", "--device", "cpu", "--only", "rmsnorm"]
    execs = []

    def fake_execve(path, args, env):
        execs.append((path, args, env))
        raise SystemExit(0)

    monkeypatch.setattr(kernel_bench, "INTERPRET", False)
    monkeypatch.setattr(kernel_bench, "_version", lambda name: NEW[f"{name}_version"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(kernel_bench.REEXEC_ENV, raising=False)
    monkeypatch.delenv("DETBENCH_IMPORT", raising=False)
    monkeypatch.setattr(kernel_bench.os, "execve", fake_execve)
    monkeypatch.setattr(kernel_bench, "run_kernel_bench", lambda *a, **k: pytest.fail("measured before re-exec"))
    monkeypatch.setattr(sys, "argv", ["detbench", *argv])
    with pytest.raises(SystemExit):
        cli.main(argv)
    ((path, args, env),) = execs
    assert path == sys.executable and args == [sys.executable, "-m", "bench", *argv]
    assert env["TRITON_INTERPRET"] == "1" and env[kernel_bench.REEXEC_ENV] == "1"
    assert capsys.readouterr().err.count("TRITON_INTERPRET=1") == 1


@pytest.mark.slow
def test_kernel_bench_on_a_cpu_without_the_interpreter_runs_the_triton_kernels():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", kernel_bench.REEXEC_ENV)}
    proc = subprocess.run([sys.executable, "-m", "bench", "kernel-bench", "--tiny", "--device", "cpu",
                           "--only", "rmsnorm"], env={**env, "COLUMNS": "250"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    conflict = interpreter_conflict(metadata.version("triton"), metadata.version("numpy"))
    if conflict is None:
        assert proc.stderr.count("running again under the Triton CPU interpreter") == 1, proc.stderr
        rows = [line for line in proc.stdout.splitlines() if line.startswith("│ rmsnorm │") and "triton" in line]
        assert len(rows) == 4 and all(" ok " in row for row in rows), proc.stdout
    else:
        assert conflict in proc.stderr and "skipped" in proc.stdout
