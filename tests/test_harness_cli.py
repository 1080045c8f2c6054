"""``detbench run`` / ``detbench report`` from the command line: bad input, files written, re-rendering."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from bench.cli import main
from bench.results import load_run
from qwen_layers import registry

from .signals import SIGNAL_IDS, SIGNALS, interrupt, paused_child

FAST = ["--quick", "--device", "cpu", "--time-repeats", "1", "--warmup", "0", "--no-progress"]
# The smallest matrix, for tests that expect a refusal: should the refusal not come, the run stays short.
BOUNDED = ["--dtypes", "fp32", "--modes", "default", "--repeats", "2"]


@pytest.fixture
def fp32_only_backend():
    def fp32_only(x, weight, bias=None):
        if x.dtype != torch.float32:
            raise TypeError(f"test-fp32-only takes float32, got {x.dtype}")
        return F.linear(x, weight, bias)

    registry.register("linear", "test-fp32-only", fp32_only, origin="test", replace=True)
    yield
    registry.unregister("linear", "test-fp32-only")


def one_line_error(capsys, argv, *needles):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("detbench: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv, needles", [
    (["--subjects", "softmax"], ["unknown subject 'softmax'", "choose from: rmsnorm"]),
    (["--backends", "warp-speed"], ["unknown backend 'warp-speed'", "registered:"]),
    (["--backends", "planted-nondet"], ["unknown backend 'planted-nondet'", "need --plant"]),
    (["--dtypes", "fp8"], ["unknown dtype 'fp8'", "fp32, bf16, fp16"]),
    (["--modes", "strict"], ["unknown mode 'strict'", "default, torch-det, hf-full"]),
    (["--backends", "sdpa-cudnn", "--subjects", "attention"], ["sdpa-cudnn", "drop it from --backends"]),
    (["--repeats", "1"], ["at least 2 repeats"]),
    (["--preset", "qwen9"], ["unknown preset 'qwen9'", "qwen3-0.6b"]),
    (["--route", "linear"], ["write OP=BACKEND"]),
    (["--route", "matmul=eager"], ["unknown op 'matmul'"]),
    (["--route", "linear=warp-speed"], ["unknown linear backend 'warp-speed'"]),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needles):
    one_line_error(capsys, ["run", "--device", "cpu", "--quick", *argv], *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys):
    one_line_error(capsys, ["run", "--device", "cuda"], "no CUDA device", "--device cpu")


@pytest.mark.parametrize("below", [False, True], ids=["out-is-a-file", "out-below-a-file"])
def test_out_that_is_a_file(capsys, tmp_path, below):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "sub" if below else blocker
    line = one_line_error(capsys, ["run", "--subjects", "rmsnorm", "--backends", "eager", "--out", str(out), *FAST],
                          f"{str(blocker)!r} is a file, not a directory", "pass --out a directory")
    assert "File exists" not in line and "cannot create" not in line
    assert list(tmp_path.iterdir()) == [blocker] and blocker.read_text() == "x"


def test_dtype_a_backend_does_not_support(capsys, fp32_only_backend):
    one_line_error(capsys, ["run", "--subjects", "linear", "--backends", "test-fp32-only", "--dtypes", "fp32,bf16", *FAST],
                   "'test-fp32-only' does not support bf16", "drop bf16 from --dtypes or test-fp32-only from --backends")


def test_default_backend_set_marks_unsupported_dtypes(capsys, tmp_path, small_shapes, fp32_only_backend):
    assert main(["run", "--subjects", "linear", "--dtypes", "fp32,bf16", "--modes", "default", "--repeats", "2",
                 "--out", str(tmp_path), *FAST]) == 0
    (path,) = tmp_path.glob("*.json")
    res = load_run(path)
    by = {(c.backend, c.dtype): c for c in res.cells}
    assert by[("test-fp32-only", "bf16")].status == "unsupported"
    assert "takes float32" in by[("test-fp32-only", "bf16")].reason
    assert by[("test-fp32-only", "fp32")].status == "ok" and by[("eager", "bf16")].status == "ok"


def test_report_bad_input(capsys, tmp_path):
    one_line_error(capsys, ["report", str(tmp_path / "missing.json")], "no such file")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    one_line_error(capsys, ["report", str(bad)], "is not JSON")


def test_run_writes_result_and_summary_and_report_rerenders(capsys, tmp_path, small_shapes):
    out = tmp_path / "results"
    rc = main(["run", "--subjects", "linear,rmsnorm", "--backends", "eager,planted-nondet", "--plant",
               "--dtypes", "fp32", "--modes", "default,torch-det", "--repeats", "4", "--out", str(out), *FAST])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "planted-nondet" not in registry.names("linear")  # --plant is scoped to the run
    (path,) = out.glob("run-*-cpu-*.json")
    assert path.with_suffix(".md").exists()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    res = load_run(path)
    assert res.status == "complete" and res.settings.plant and res.environment.device_type == "cpu"
    verdicts = {(c.subject, c.backend, c.mode): c for c in res.cells}
    assert verdicts[("linear", "planted-nondet", "default")].deterministic is False
    assert verdicts[("linear", "eager", "default")].deterministic is True
    assert "DIFFERS" in printed and "linear: linear backends" in printed and str(path) in printed

    md = path.with_suffix(".md").read_text()
    assert "## linear" in md and "**DIFFERS" in md and "## Cost of determinism" in md
    assert res.command[:2] == ["detbench", "run"] and "--plant" in res.command

    assert main(["report", str(path), "--markdown", "-"]) == 0
    assert capsys.readouterr().out.strip() == md.strip()
    assert main(["report", str(path)]) == 0
    assert "cost of determinism" in capsys.readouterr().out

    # a second run never overwrites the first
    assert main(["run", "--subjects", "rmsnorm", "--backends", "eager", "--dtypes", "fp32", "--modes", "default",
                 "--repeats", "2", "--out", str(out), *FAST]) == 0
    assert len(list(out.glob("run-*.json"))) == 2
    json.loads(path.read_text())


def test_interrupted_run_writes_what_it_measured(capsys, tmp_path, small_shapes):
    def interrupt(x, weight, bias=None):
        if x.shape[0] > 64:
            raise KeyboardInterrupt
        return F.linear(x, weight, bias)

    registry.register("linear", "test-interrupt", interrupt, origin="test", replace=True)
    try:
        rc = main(["run", "--subjects", "linear", "--backends", "eager,test-interrupt", "--dtypes", "fp32",
                   "--modes", "default", "--repeats", "2", "--out", str(tmp_path), *FAST])
    finally:
        registry.unregister("linear", "test-interrupt")
    assert rc == 130
    (path,) = tmp_path.glob("*.json")
    res = load_run(path)
    assert res.status == "interrupted" and "test-interrupt" in res.stopped_at
    assert "interrupted (SIGINT) during" in capsys.readouterr().out


def test_plots_when_matplotlib_is_installed(tmp_path, small_shapes, capsys):
    pytest.importorskip("matplotlib")
    assert main(["run", "--subjects", "rmsnorm", "--backends", "eager", "--dtypes", "fp32,bf16", "--repeats", "2",
                 "--out", str(tmp_path), *FAST]) == 0
    (path,) = tmp_path.glob("*.json")
    assert main(["report", str(path), "--no-table", "--plots", str(tmp_path / "plots")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == [f"{path.stem}-{name}.png" for name in ("cost", "error-vs-speed", "verdicts")]


@pytest.mark.parametrize("seed", [str(2 ** 70), str(-2 ** 63 - 1), str(2 ** 64 - 1)], ids=["2**70", "below-int64", "2**64-1"])
def test_seed_out_of_range_is_refused_before_anything_is_written(capsys, tmp_path, seed):
    """torch's generators take 64-bit seeds and the harness derives seed+1 and seed+2+crc32(name) from it."""
    out = tmp_path / "results"
    line = one_line_error(capsys, ["run", "--subjects", "rmsnorm", "--backends", "eager", "--seed", seed, *BOUNDED,
                                   "--out", str(out), *FAST], f"--seed {seed}", "must be between")
    assert "Traceback" not in line
    assert not out.exists()


@pytest.mark.parametrize("argv, needles", [
    (["--subjects", "attention", "--backends", "eager", "--route", "attention=sdpa"],
     ["--route attention=sdpa", "primary op of attention", "--backends"]),
    (["--subjects", "attention,decoder-layer", "--route", "attention=sdpa"],
     ["--route attention=sdpa", "primary op of attention, decoder-layer"]),
    (["--subjects", "mlp,linear", "--route", "linear=eager"], ["--route linear=eager", "primary op of mlp, linear"]),
    (["--subjects", "rmsnorm", "--route", "swiglu=eager"],
     ["--route swiglu=eager", "none of the selected subjects (rmsnorm) calls swiglu", "mlp, decoder-layer"]),
], ids=["primary-of-the-one-subject", "primary-of-every-subject", "linear-primary-of-both", "op-not-called"])
def test_route_that_would_not_apply_is_refused(capsys, tmp_path, small_shapes, argv, needles):
    one_line_error(capsys, ["run", *argv, *BOUNDED, "--out", str(tmp_path), *FAST], *needles)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["json", "md"])
def test_disk_full_while_saving_prints_the_tables_then_one_line(capsys, tmp_path, small_shapes, monkeypatch, failing):
    """The tables are printed before saving; a failed save is one line naming the file (exit 1) and leaves
    no temporary file in the results folder."""
    import errno
    import os

    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == (1 if failing == "json" else 2):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc = main(["run", "--subjects", "linear", "--backends", "eager", *BOUNDED, "--out", str(tmp_path), *FAST])
    out, err = capsys.readouterr()
    assert rc == 1, (rc, out, err)
    assert "status: complete" in out and "same ×2" in out, out  # the tables came first
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("detbench run: error: could not save "), err
    assert "No space left on device" in lines[0] and "Traceback" not in err
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in left if n.endswith(".tmp")], left
    if failing == "json":
        assert left == [] and ".json" in lines[0]
    else:
        (json_file,) = tmp_path.glob("*.json")
        assert left == [json_file.name] and load_run(json_file).status == "complete"
        assert str(json_file.with_suffix(".md")) in lines[0] and f"the result is saved in {json_file}" in lines[0]


def test_run_sets_the_workspace_config_before_planning_and_records_it(capsys, tmp_path, small_shapes, monkeypatch):
    """CUBLAS_WORKSPACE_CONFIG is in force from the plan's probes (the first CUDA matmuls on a GPU) to the last
    cell, under every mode, removed again afterwards, recorded in the file; the notes say what a reader of
    the times must know (hf-full's :16:8 not in force with torch-det; memsets inside the deterministic times)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    def watching(x, weight, bias=None):
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return F.linear(x, weight, bias)

    registry.register("linear", "test-watching", watching, origin="test", replace=True)
    try:
        rc = main(["run", "--subjects", "linear", "--backends", "test-watching", "--dtypes", "fp32", "--modes",
                   "default,torch-det,hf-full", "--repeats", "2", "--out", str(tmp_path), *FAST])
    finally:
        registry.unregister("linear", "test-watching")
    out = capsys.readouterr().out
    assert rc == 0
    assert seen and set(seen) - {":16:8"} == {":4096:8"}  # hf-full's cells set their own; the probes did not
    assert seen[0] == ":4096:8", "the first probe (planning) already ran with the run's value"
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    (path,) = tmp_path.glob("*.json")
    res = load_run(path)
    assert res.run_env["in_force"] == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert res.run_env["set_by_run"] == {"CUBLAS_WORKSPACE_CONFIG": True}
    assert "note: hf-full asks CUBLAS_WORKSPACE_CONFIG=:16:8" in out
    assert "note: times under hf-full, torch-det include PyTorch filling the memory torch.empty returns" in out


def test_result_files_without_the_new_fields_still_load(tmp_path, small_shapes, capsys):
    """run_env and CellRecord.fill_uninitialized_memory are new: a file written before them loads, with {} and
    None."""
    assert main(["run", "--subjects", "rmsnorm", "--backends", "eager", *BOUNDED, "--out", str(tmp_path), *FAST]) == 0
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    del data["run_env"]
    for c in data["cells"]:
        del c["fill_uninitialized_memory"]
    for m in data["modes"]:
        del m["fill_uninitialized_memory"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    res = load_run(old)
    assert res.run_env == {} and {c.fill_uninitialized_memory for c in res.cells} == {None}
    assert main(["report", str(old)]) == 0


# ---- signals, end to end (tests/signals.py: the child stops at a pause point the test names).


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", SIGNALS, ids=SIGNAL_IDS)
def test_signal_during_run_saves_the_finished_cells(tmp_path, sig, code):
    out_dir = tmp_path / "results"
    proc = paused_child(tmp_path, "after-cell-1",
                        ["run", "--subjects", "linear", "--backends", "eager", "--dtypes", "fp32",
                         "--modes", "default,torch-det", "--repeats", "2", "--out", str(out_dir), *FAST], cwd=tmp_path)
    out, err = interrupt(proc, sig)
    assert proc.returncode == code, (out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    (path,) = out_dir.glob("run-*.json")
    assert path.with_suffix(".md").exists() and not list(out_dir.glob(".*.tmp"))
    res = load_run(path)
    assert res.status == "interrupted" and res.finished is not None
    assert [(c.backend, c.mode, c.status) for c in res.cells] == [("eager", "default", "ok")]
    assert f"interrupted ({sig.name})" in res.stopped_at and "1 of 2 cells complete" in res.stopped_at
    assert "same ×2" in out and str(path) in out.replace("\n", "")  # the tables were printed, then the path


@pytest.mark.slow
@pytest.mark.parametrize("point", ["start", "import-bench.cli.run"])
@pytest.mark.parametrize("sig, code", SIGNALS, ids=SIGNAL_IDS)
def test_signal_before_the_command_runs_is_one_line(tmp_path, sig, code, point):
    """An interrupt before the parser is built (while torch and the command modules are being imported) is
    one line and exit 130/143, not a KeyboardInterrupt traceback."""
    proc = paused_child(tmp_path, point, ["run", "--subjects", "linear", "--out", str(tmp_path / "results"), *FAST],
                        cwd=tmp_path)
    out, err = interrupt(proc, sig)
    assert proc.returncode == code, (out, err)
    assert out == "" and err.splitlines() == [f"detbench: interrupted ({sig.name}); nothing partial was written"], err
    assert not (tmp_path / "results").exists()
