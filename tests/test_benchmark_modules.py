"""The pytest-benchmark modules in bench/benchmarks still run (CI does not collect them otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_subject_benchmarks_run_and_store_verdicts(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/benchmarks/test_detbench_subjects.py", "-q", "-p", "no:cacheprovider",
         "--detbench-quick", "--detbench-device", "cpu", "--detbench-subjects", "rmsnorm",
         "--detbench-repeats", "2", "--benchmark-min-rounds", "2", "--benchmark-max-time", "0.01",
         "--benchmark-warmup", "off", "--benchmark-json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmarks"], "no benchmark ran"
    for b in data["benchmarks"]:
        extra = b["extra_info"]
        assert extra["repeats"] == 2 and extra["deterministic"] is True, b["name"]
        assert "all 2 repeats" in extra["verdict"] and "could be missed" in extra["verdict"], extra["verdict"]
        assert extra["environment"]["device_type"] == "cpu"
