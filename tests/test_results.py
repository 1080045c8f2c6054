"""Result files: typed round trip (NaN/inf included), strict JSON, atomic writes that never overwrite."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from bench import results as R


def _env():
    return R.capture_environment("cpu", seeds={"seed": 7})


def _sample_run() -> R.RunResult:
    key = dict(subject="linear", backend="eager", dtype="fp32", mode="default")
    return R.RunResult(
        schema=R.RUN_SCHEMA, run_id="abc123", started="2025-01-01T00:00:00+00:00", finished=None,
        status="interrupted", stopped_at="interrupted during linear / eager / fp32 / default (cell 1 of 1)",
        error=None, command=["detbench", "run", "--quick"],
        settings=R.RunSettings(subjects=["linear"], backends=None, dtypes=["fp32"], modes=["default"], repeats=20,
                               device="cpu", preset="qwen3-tiny", quick=True, seed=0, route={"linear": "eager"},
                               plant=False, time_repeats=5, time_warmup=1, out="results"),
        environment=_env(),
        modes=[{"name": "default", "env": {}}],
        backends=[R.BackendInfo("linear", "eager", None, None, "built-in", "F.linear")],
        subjects=[R.SubjectInfo("linear", "linear", True, "x @ W.T", "qwen3-tiny", {"x": [4, 8]}, 4, [1, 3],
                                {"linear": "eager"}, 10, 20, {"fp32": 100}, {"fp32": 200}, "flops", "")],
        cells=[R.CellRecord(**key, status="ok", reason=None, repeats=20, deterministic=True,
                            missable_fraction=0.146, batch_invariant=False, verdict="v", nonfinite=True)],
        repeats=[R.RepeatRecord(**key, tensor="out", shape=[4, 8], tensor_dtype="float32", repeats=20,
                                n_equal_to_first=20, n_distinct=1, max_n_diff=0, n_total=32, max_abs=0.0, max_ulp=0,
                                nan=1, inf=2, first_mismatch={"worst": [{"a": "NaN"}]})],
        batch=[R.BatchRecord(**key, tensor="out", rows=1, full_rows=4, equal=False, n_diff=3, n_total=8,
                             max_abs=float("inf"), max_ulp=5)],
        accuracy=[R.AccuracyRecord(**key, tensor="out", rel_l2=float("nan"), max_ulp=1.5, max_abs=-0.0,
                                   eager_rel_l2=float("-inf"), eager_max_ulp=2.0, nan=1, inf=0)],
        cross=[R.CrossRecord("linear", "fp32", "eager", "default", "eager", "torch-det", True, [], 0.0, 0, 0.0)],
        timings=[R.TimingRecord(**key, phase="fwd", median_s=1e-3, q1_s=9e-4, q3_s=2e-3, min_s=8e-4, repeats=5,
                                warmup=1, clock="perf_counter", flops=10, bytes=100)],
        skipped=["attention/sdpa-cudnn: not available"],
    )


def _same(a, b) -> bool:
    """Dataclass equality where NaN equals NaN and -0.0 differs from 0.0 (as stored bits would)."""
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


def test_run_result_round_trips_through_strict_json(tmp_path):
    run = _sample_run()
    path = R.write_json_atomic(tmp_path / "r.json", run)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=no_constants)  # strict JSON: no NaN/Infinity literals
    assert data["accuracy"][0]["rel_l2"] == "NaN" and data["batch"][0]["max_abs"] == "Infinity"
    assert set(data) == {f.name for f in dataclasses.fields(R.RunResult)}  # field names are the JSON keys
    back = R.load_run(path)
    assert _same(back, run)
    assert math.copysign(1, back.accuracy[0].max_abs) == -1.0  # -0.0 survives


def test_from_json_rejects_wrong_types():
    with pytest.raises(ValueError, match="expected an integer"):
        R.from_json(R.BatchRecord, {**R.to_json(_sample_run().batch[0]), "rows": "1"})
    with pytest.raises(ValueError, match="missing field 'rows'"):
        d = R.to_json(_sample_run().batch[0])
        del d["rows"]
        R.from_json(R.BatchRecord, d)


def test_atomic_write_never_overwrites(tmp_path):
    p = R.write_json_atomic(tmp_path / "r.json", {"a": 1})
    with pytest.raises(FileExistsError, match="never overwrites"):
        R.write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", interrupted)
    with pytest.raises(KeyboardInterrupt):
        R.write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_result_path_is_new_and_named_by_date_device_id(tmp_path):
    p1 = R.result_path(tmp_path, "run", "cuda-h200", "abc123")
    assert p1.name.startswith("run-") and p1.name.endswith("-cuda-h200-abc123.json")
    p1.write_text("{}")
    p2 = R.result_path(tmp_path, "run", "cuda-h200", "abc123")
    assert p2 != p1 and not p2.exists()


def test_check_out_dir(tmp_path):
    assert R.check_out_dir(tmp_path / "new" / "dir").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(R.OutDirError, match="is a file, not a directory; pass --out a directory"):
        R.check_out_dir(blocker / "sub")
    with pytest.raises(R.OutDirError, match="is a file, not a directory"):
        R.check_out_dir(blocker)


def test_environment_records_what_a_result_depends_on(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env = R.capture_environment("cpu", seeds={"seed": 3})
    assert env.device == "cpu" and env.device_type == "cpu" and env.cpu_model
    assert env.torch and env.torch_threads >= 1 and env.seeds == {"seed": 3}
    assert env.env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "deterministic_algorithms" in env.torch_flags
    assert env.detbench_commit is None or len(env.detbench_commit) == 40
    assert R.device_label(env) == "cpu"


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("not json", "is not JSON"),
    ('{"schema": "other/1"}', "is not a detbench run result"),
    ('{"schema": "detbench.run/1"}', "does not match schema"),
])
def test_load_run_errors_say_what_is_wrong(tmp_path, content, message):
    p = tmp_path / "r.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(R.ResultFileError, match=message):
        R.load_run(p)


def test_schema_is_documented():
    """Every record type and field of the run schema appears in results/README.md."""
    readme = (Path(__file__).resolve().parents[1] / "results" / "README.md").read_text()
    for cls in (R.RunResult, R.RunSettings, R.Environment, R.BackendInfo, R.SubjectInfo, R.CellRecord,
                R.RepeatRecord, R.BatchRecord, R.AccuracyRecord, R.CrossRecord, R.TimingRecord):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in readme, f"{cls.__name__}.{f.name} is not documented in results/README.md"


@pytest.mark.parametrize("where", ["the path", "a parent"])
def test_out_dir_that_is_a_file_says_so(tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker if where == "the path" else blocker / "sub" / "dir"
    with pytest.raises(R.OutDirError) as e:
        R.check_out_dir(out)
    msg = str(e.value)
    assert f"{str(blocker)!r} is a file, not a directory" in msg and "File exists" not in msg, msg
    assert "pass --out a directory" in msg
    assert blocker.read_text() == "x" and list(tmp_path.iterdir()) == [blocker]
