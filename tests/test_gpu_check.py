"""`detbench gpu-check`: the CPU dry run of the GPU validation script, so it cannot rot."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bench import cli
from bench.gpu_check import FILES, Stage, _run_stage


@pytest.mark.slow
def test_dry_run_writes_every_file(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["gpu-check", "--dry-run", "--out", str(out), "--budget", "400"])
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert rc == 0, stages
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # at most 8, the device tool's limit
    assert all(s["status"] == "ok" for s in stages.values()), stages
    # The dry run plants a fault in one MLP projection; the pinpoint stage must name it.
    text = (out / "summary.md").read_text()
    assert "pinpoint trace-compare root cause: linear/planted-nondet at model.layers.1.mlp.down_proj" in text
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("┘")  # the summary table comes last


@pytest.mark.slow
def test_stage_over_its_limit_is_stopped(tmp_path):
    st = Stage("slow")
    with open(tmp_path / "log", "w") as log:
        _run_stage(st, [sys.executable, "-c", "import time; time.sleep(60)"], 5.5, log)
    assert st.status == "timed out" and st.seconds < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_needs_cuda_unless_dry_run(tmp_path, capsys):
    assert cli.main(["gpu-check", "--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_refuses_a_folder_holding_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert cli.main(["gpu-check", "--dry-run", "--out", str(tmp_path)]) == 2
    assert "give an empty folder" in capsys.readouterr().err


def test_refuses_a_bad_budget(tmp_path, capsys):
    assert cli.main(["gpu-check", "--dry-run", "--out", str(tmp_path), "--budget", "0"]) == 2
    assert "--budget" in capsys.readouterr().err
