"""detbench compare: two stored results side by side, exit 1 when a verdict got worse, 2 on bad input.

The results compared are the committed CPU run (results/run-*-cpu-*.json) cut down to two subjects, and copies
of it with one verdict, time, error or version changed; the sft ones are the committed sft result and copies.
Everything runs in-process through bench.cli.main (no model runs), but one subprocess test.
"""

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sft
from bench.cli import main
from bench.result_diff import (
    BATCH_VARIANT,
    BETTER,
    CHANGED,
    ERROR,
    IDENTICAL,
    NONDET,
    NOT_COMPARABLE,
    REFUSED,
    SAME,
    UNSUPPORTED,
    WORSE,
    diff_results,
    load_result_file,
    time_ratio,
    verdict_change,
)
from bench.results import TimingRecord, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "results" / "run-20261129-132551-cpu-715190.json"
SFT = ROOT / "results" / "sft-20261202-000800-cpu-39ddc6.json"
SUBJECTS = ("rmsnorm", "linear")  # linear's fp32 cells are batch-variant on this CPU, the rest identical
CELL = ("rmsnorm", "eager", "fp32", "default")
VARIANT_CELL = ("linear", "eager", "fp32", "default")


@pytest.fixture(scope="module")
def base():
    """The committed run, only SUBJECTS (18 cells): small enough to load in milliseconds."""
    res = load_result_file(RUN)
    keep = lambda r: r.subject in SUBJECTS  # noqa: E731
    for name in ("subjects", "cells", "repeats", "batch", "accuracy", "cross", "timings"):
        setattr(res, name, [r for r in getattr(res, name) if keep(r)])
    res.settings.subjects = list(SUBJECTS)
    return res


def _records(res, name, key):
    return [r for r in getattr(res, name) if (r.subject, r.backend, r.dtype, r.mode) == key]


def _cell(res, key):
    (c,) = _records(res, "cells", key)
    return c


def _make_nondeterministic(res, key):
    """What a cell whose output changed in one of its repeats looks like in a result."""
    _cell(res, key).deterministic = False
    for r in _records(res, "repeats", key)[:1]:
        r.n_equal_to_first, r.n_distinct, r.max_n_diff, r.max_ulp = r.repeats - 1, 2, 3, 1


def _write(tmp_path, name, res) -> str:
    path = tmp_path / name
    write_json_atomic(path, res)
    return str(path)


def _run(capsys, *argv) -> tuple[int, str, str]:
    status = main(["compare", *map(str, argv)])
    out = capsys.readouterr()
    return status, out.out, out.err


# ------------------------------------------------------------------------------------------------
# the verdict order
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, change", [
    (IDENTICAL, BATCH_VARIANT, WORSE), (BATCH_VARIANT, NONDET, WORSE), (IDENTICAL, NONDET, WORSE),
    (IDENTICAL, NOT_COMPARABLE, WORSE), (BATCH_VARIANT, ERROR, WORSE), (NONDET, REFUSED, WORSE),
    (IDENTICAL, UNSUPPORTED, WORSE), (REFUSED, ERROR, WORSE),
    (NONDET, IDENTICAL, BETTER), (BATCH_VARIANT, IDENTICAL, BETTER), (ERROR, NONDET, BETTER),
    (NOT_COMPARABLE, IDENTICAL, BETTER), (ERROR, REFUSED, BETTER),
    (IDENTICAL, IDENTICAL, SAME), (NONDET, NONDET, SAME), (REFUSED, UNSUPPORTED, CHANGED),
])
def test_verdict_order(a, b, change):
    assert verdict_change(a, b) == change


@pytest.mark.parametrize("change_b, verdict", [
    (lambda c: setattr(c, "batch_invariant", False), BATCH_VARIANT),
    (lambda c: setattr(c, "deterministic", False), NONDET),
    (lambda c: setattr(c, "nonfinite", True), NOT_COMPARABLE),
    (lambda c: (setattr(c, "status", "error"), setattr(c, "reason", "during timing: boom")), ERROR),
])
def test_a_cell_read_from_a_result_gets_its_verdict(base, change_b, verdict):
    b = copy.deepcopy(base)
    change_b(_cell(b, CELL))
    (d,) = [c for c in diff_results(base, b).cells() if tuple(c.key) == CELL]
    assert (d.a, d.b, d.change) == (IDENTICAL, verdict, WORSE)
    assert d.b_text  # the result's own words come along


# ------------------------------------------------------------------------------------------------
# exit status and output
# ------------------------------------------------------------------------------------------------


def test_a_worse_verdict_exits_1_and_names_the_cell(base, tmp_path, capsys):
    b = copy.deepcopy(base)
    _make_nondeterministic(b, CELL)
    status, out, _ = _run(capsys, _write(tmp_path, "a.json", base), _write(tmp_path, "b.json", b))
    assert status == 1
    summary = out.strip().splitlines()[-1]
    assert "1 worse" in summary and "rmsnorm eager fp32 default (identical → nondeterministic)" in summary
    # every cell is shown without --only-changed: the 17 unchanged ones too
    assert sum(line.split()[:2] == ["linear", "eager"] for line in out.splitlines()) == 9


def test_batch_variant_to_nondeterministic_is_worse(base, tmp_path, capsys):
    b = copy.deepcopy(base)
    _make_nondeterministic(b, VARIANT_CELL)
    status, out, _ = _run(capsys, _write(tmp_path, "a.json", base), _write(tmp_path, "b.json", b))
    assert status == 1
    assert "linear eager fp32 default (batch-variant → nondeterministic)" in out


def test_better_or_unchanged_exits_0(base, tmp_path, capsys):
    a = _write(tmp_path, "a.json", base)
    status, out, _ = _run(capsys, a, a)
    assert status == 0 and "18 in both: 0 worse, 0 better" in out
    better = copy.deepcopy(base)
    _cell(better, VARIANT_CELL).batch_invariant = True
    status, out, _ = _run(capsys, a, _write(tmp_path, "b.json", better))
    assert status == 0 and "0 worse, 1 better" in out
    # and the other way round the same change is worse
    status, _, _ = _run(capsys, tmp_path / "b.json", a)
    assert status == 1


def test_cells_on_one_side_only_are_listed(base, tmp_path, capsys):
    b = copy.deepcopy(base)
    b.cells.remove(_cell(b, CELL))
    extra = dataclasses.replace(_cell(b, ("rmsnorm", "eager", "bf16", "default")), backend="mine")
    b.cells.append(extra)
    status, out, _ = _run(capsys, _write(tmp_path, "a.json", base), _write(tmp_path, "b.json", b))
    assert status == 0  # a missing cell is listed, not counted as worse
    assert "only in A: rmsnorm eager fp32 default (identical)" in out
    assert "only in B: rmsnorm mine bf16 default (identical)" in out
    assert "1 only in A; 1 only in B" in out
    # a subject missing altogether is one line
    c = copy.deepcopy(base)
    c.cells = [x for x in c.cells if x.subject != "linear"]
    _, out, _ = _run(capsys, tmp_path / "a.json", _write(tmp_path, "c.json", c))
    assert "only in A: linear, all 9 cells" in out


def test_header_shows_what_differs_between_the_environments(base, tmp_path, capsys):
    b = copy.deepcopy(base)
    b.environment.torch, b.environment.triton = "2.15.0", "3.9.0"
    b.environment.torch_flags["deterministic_algorithms"] = True
    b.settings.repeats = 50
    b.run_env = {"in_force": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}}
    _, out, _ = _run(capsys, _write(tmp_path, "a.json", base), _write(tmp_path, "b.json", b), "--only-changed")
    lines = out.splitlines()
    start = lines.index("differs:")
    differs = [line.strip() for line in lines[start + 1:start + 6]]
    assert differs == ["torch 2.14.1+cu130 → 2.15.0", "triton 3.8.0 → 3.9.0",
                       "torch_flags.deterministic_algorithms False → True",
                       "run_env.in_force.CUBLAS_WORKSPACE_CONFIG - → :4096:8", "settings.repeats 20 → 50"]
    assert "python 3.11.7" in next(line for line in out.splitlines() if line.startswith("same in both:"))


def _scale_time(res, key, phase, factor, spread=None):
    """Multiply one timing's median (and its quartiles, or set them ``spread`` around it)."""
    (t,) = [t for t in _records(res, "timings", key) if t.phase == phase]
    t.median_s *= factor
    t.q1_s, t.q3_s = ((t.q1_s * factor, t.q3_s * factor) if spread is None
                      else (t.median_s * (1 - spread), t.median_s * (1 + spread)))


def test_time_changes_by_interval_and_threshold(base, tmp_path, capsys):
    b = copy.deepcopy(base)
    _scale_time(b, CELL, "fwd+bwd", 1.5)
    _scale_time(b, VARIANT_CELL, "fwd+bwd", 1.5, spread=0.6)  # same median ratio, range straddles 1
    a, bp = _write(tmp_path, "a.json", base), _write(tmp_path, "b.json", b)
    status, out, _ = _run(capsys, a, bp, "--json")
    cells = {tuple(c["key"]): c for s in json.loads(out)["sections"] for c in s["cells"]}
    assert status == 0  # times never gate the exit status
    assert cells[CELL]["time"]["change"] == "slower" and cells[CELL]["time"]["ratio"] == pytest.approx(1.5)
    assert cells[VARIANT_CELL]["time"]["change"] == SAME
    assert cells[VARIANT_CELL]["time"]["ratio"] == pytest.approx(1.5)
    # a threshold wider than the change: the same 1.5x is not a change any more
    _, out, _ = _run(capsys, a, bp, "--json", "--time-threshold", "0.6")
    cells = {tuple(c["key"]): c for s in json.loads(out)["sections"] for c in s["cells"]}
    assert cells[CELL]["time"]["change"] == SAME
    # a time taken on a loaded machine keeps its change, marked ~ with the reason from its own run
    (t,) = [t for t in _records(b, "timings", CELL) if t.phase == "fwd+bwd"]
    t.load1, b.environment.cpu_affinity = 7.0, 2
    _, out, _ = _run(capsys, a, _write(tmp_path, "loaded.json", b), "--markdown")
    (row,) = [line for line in out.splitlines() if line.startswith("| rmsnorm | eager | fp32 | default |")]
    assert row.endswith("| **slower** ~ loaded |")
    assert "1 slower, 0 faster (1 of them ~" in out
    _, out, _ = _run(capsys, a, tmp_path / "loaded.json", "--json")
    cells = {tuple(c["key"]): c for s in json.loads(out)["sections"] for c in s["cells"]}
    assert cells[CELL]["time"]["noise"] == ["B loaded (load 7.0 on 2 CPUs)"]
    # the other phases are there to compare too
    _, out, _ = _run(capsys, a, bp, "--json", "--phase", "fwd")
    cells = {tuple(c["key"]): c for s in json.loads(out)["sections"] for c in s["cells"]}
    assert cells[CELL]["time"]["phase"] == "fwd" and cells[CELL]["time"]["change"] == SAME


def test_time_ratio_range_divides_quartiles_crosswise():
    rec = lambda med, q1, q3: TimingRecord("s", "b", "fp32", "default", "fwd", med, q1, q3, q1, 5, 1,  # noqa: E731
                                           "perf_counter", 0, 0)
    t = time_ratio("fwd", rec(1.0, 0.9, 1.1), rec(2.0, 1.8, 2.2), 0.1)
    assert (t.ratio, t.low, t.high, t.change) == (2.0, 1.8 / 1.1, 2.2 / 0.9, "slower")
    assert time_ratio("fwd", rec(2.0, 1.8, 2.2), rec(1.0, 0.9, 1.1), 0.1).change == "faster"
    # 15% faster by the medians, but the quartiles overlap within 10%: not a change
    assert time_ratio("fwd", rec(1.0, 0.8, 1.2), rec(0.85, 0.7, 1.0), 0.1).change == SAME
    assert time_ratio("fwd", None, rec(1.0, 0.9, 1.1), 0.1) is None


def test_error_changes_and_only_changed(base, tmp_path, capsys):
    b = copy.deepcopy(base)
    for r in _records(b, "accuracy", CELL):
        r.rel_l2 *= 3
    status, out, _ = _run(capsys, _write(tmp_path, "a.json", base), _write(tmp_path, "b.json", b),
                          "--only-changed", "--markdown")
    assert status == 0
    rows = [line for line in out.splitlines() if line.startswith("| rmsnorm") or line.startswith("| linear")]
    assert len(rows) == 1 and rows[0].startswith("| rmsnorm | eager | fp32 | default |")
    assert "1 with another error" in out
    status, out, _ = _run(capsys, tmp_path / "a.json", tmp_path / "b.json", "--json", "--only-changed")
    data = json.loads(out)
    (cell,) = data["sections"][0]["cells"]
    assert cell["error_change"] == "higher" and cell["b_error"] == pytest.approx(3 * cell["a_error"])
    assert data["worse"] == 0


# ------------------------------------------------------------------------------------------------
# bad input: exit 2 with one line
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b_content, extra, message", [
    (None, [], "no such file"),
    ("not json", [], "is not JSON"),
    ('{"schema": "pytest-benchmark/4"}', [], "is not a detbench run or sft result"),
    ("sft", [], "compare two results of the same command"),
    ("same", ["--time-threshold", "-0.1"], "--time-threshold -0.1"),
])
def test_bad_input_exits_2(base, tmp_path, capsys, b_content, extra, message):
    a = _write(tmp_path, "a.json", base)
    b = tmp_path / "b.json"
    if b_content == "sft":
        b = SFT
    elif b_content == "same":
        b = a
    elif b_content is not None:
        b.write_text(b_content)
    status, out, err = _run(capsys, a, b, *extra)
    assert status == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# sft results
# ------------------------------------------------------------------------------------------------


def _config(bits: list[str], identical: bool | None = True) -> sft.ConfigResult:
    losses = [float(i) for i in range(len(bits))]
    return sft.ConfigResult(attention="eager", mode="default", dtype="float32", lr=3e-4, steps=len(bits), repeats=2,
                            status="ok", losses=[losses, losses], loss_bits=[bits, bits], identical=identical,
                            verdict="identical in 2 repeats" if identical else "repeats differ")


def test_sft_setups_and_configurations(tmp_path, capsys):
    a = load_result_file(SFT)
    bits = [f"float32:{i:08x}" for i in range(4)]
    a.configs = [_config(bits)]
    b = copy.deepcopy(a)
    b.configs = [_config(bits[:2] + ["float32:ffffffff"] + bits[3:])]  # step 3's loss has other bits
    setup = b.distributed["setups"][1]
    setup["run_to_run_identical"] = False  # a data-parallel setup whose repeats differ
    pa, pb = _write(tmp_path, "a.json", a), _write(tmp_path, "b.json", b)
    status, out, _ = _run(capsys, pa, pb, "--markdown")
    assert status == 1
    assert f"{setup['label']} {setup['reduce']} (identical → nondeterministic)" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| eager | default | float32 |")]
    assert "same" in row and "differs from step 3" in row  # same verdict, another loss curve
    status, out, _ = _run(capsys, pa, pa)
    assert status == 0 and "times are not compared" in out


# ------------------------------------------------------------------------------------------------
# the command as a user runs it
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_python_m_bench_compare(base, tmp_path):
    b = copy.deepcopy(base)
    _make_nondeterministic(b, CELL)
    a, bp = _write(tmp_path, "a.json", base), _write(tmp_path, "b.json", b)
    proc = subprocess.run([sys.executable, "-m", "bench", "compare", a, bp, "--only-changed"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "rmsnorm eager fp32 default (identical → nondeterministic)" in proc.stdout
