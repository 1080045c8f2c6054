"""`detbench list`, and the guard against PyPI's unrelated `kernels` package."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from bench import cli
from qwen_layers.registry import OPS, REGISTRY


def test_list_json(capsys):
    assert cli.main(["list", "--json", "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "cpu" and set(data["ops"]) == set(OPS)
    rows = {(r["op"], r["backend"]): r for r in data["backends"]}
    assert len(rows) == len(REGISTRY.backends())
    assert rows[("attention", "eager")]["available"] is True
    for r in data["backends"]:
        assert r["available"] == (r["reason"] is None)
        assert r["available"] == REGISTRY.get(r["op"], r["backend"]).is_available("cpu")


def test_list_table(capsys):
    assert cli.main(["list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for op in OPS:
        assert op in out
    assert "sdpa-math" in out and "available" in out


@pytest.mark.slow
def test_console_script_runs():
    """The installed `detbench` entry point works from a fresh interpreter."""
    r = subprocess.run([sys.executable, "-m", "bench", "list", "--json", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["device"] == "cpu"


def test_cuda_without_cuda_is_one_clear_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert cli.main(["list", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and "--device cpu" in err[0]


def test_foreign_kernels_package_is_refused(monkeypatch, capsys):
    foreign = types.ModuleType("kernels")
    foreign.__file__ = "/site-packages/kernels/__init__.py"
    monkeypatch.setitem(sys.modules, "kernels", foreign)
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert "not detbench's kernels package" in err and "virtual environment" in err
