"""``detbench sft`` and ``detbench pinpoint`` say what to do next: after a clean CPU run, what the CPU
could not exercise and the command for a GPU; after a divergence, the pinpoint command that reproduces
it. And ``sft`` prints each verdict once, with one line per configuration where no progress bar shows.
"""

from __future__ import annotations

import itertools
import json
import shlex
import sys

import pytest

from bench import cli, planted
from bench.cli.common import with_option
from bench.cli.sft import pinpoint_command
from bench.cli.sft_dp import clean_setups
from bench.sft import ConfigResult, make_plan
from tests.planted_checks import token_file

SFT = ["sft", "--model", "qwen3-tiny", "--device", "cpu", "--steps", "1", "--repeats", "2", "--seq-len", "16"]
PLANT = "model.layers.1.mlp.down_proj=linear/planted-nondet"


def run_cli(monkeypatch, argv: list[str]) -> int:
    """``detbench ARGV`` as typed in a shell (the hints quote the command line as typed)."""
    monkeypatch.setattr(sys, "argv", ["detbench", *argv])
    monkeypatch.delenv("DETBENCH_IMPORT", raising=False)
    return cli.main(argv)


class CyclingOrder:
    """Stands in for the planted backends' OS shuffle: each call sums its parts in the next of 12 orders
    no two of which differ only by swapping the first two parts (the one swap that gives the same bits),
    so that calls a test compares are summed differently, every time the test runs."""

    ORDERS = [list(p) for p in itertools.permutations(range(4)) if p[0] < p[1]]

    def __init__(self) -> None:
        self.calls = 0

    def shuffle(self, order: list[int]) -> None:
        assert len(order) == 4, "the planted backends sum 4 chunks"
        order[:] = self.ORDERS[self.calls % len(self.ORDERS)]
        self.calls += 1


def gpu_line(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("run the same on a GPU: ")]


def test_with_option_sets_one_option_in_any_spelling():
    assert with_option(["sft", "--device", "cpu", "--dtype", "bf16"], "--device", "cuda") == \
        ["sft", "--device", "cuda", "--dtype", "bf16"]
    assert with_option(["sft", "--device=cpu", "--lr", "1e-5"], "--device", "cuda") == \
        ["sft", "--device", "cuda", "--lr", "1e-5"]
    assert with_option(["sft", "--dev", "cpu", "--device", "cpu"], "--device", "cuda") == ["sft", "--device", "cuda"]
    assert with_option(["sft", "--data", "t.jsonl"], "--device", "cuda") == \
        ["sft", "--data", "t.jsonl", "--device", "cuda"]


def test_clean_cpu_sft_prints_one_line_per_configuration_each_verdict_once_and_the_gpu_command(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    argv = [*SFT, "--lr", "1e-5,3e-4", "--out", str(tmp_path)]
    assert run_cli(monkeypatch, argv) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("sft-*.json")
    rec = json.loads(path.read_text())
    assert [c["identical"] for c in rec["configs"]] == [True, True]

    # captured output is not a terminal: no progress bar, a line per finished configuration instead
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 2, out
    assert lines[0].startswith("[1/2] eager default fp32 lr=1e-05: identical (elapsed ") and ", ETA " in lines[0]
    assert lines[1].startswith("[2/2] eager default fp32 lr=0.0003: identical (elapsed ") and lines[1].endswith(
        ", ETA 0:00)")
    for c in rec["configs"]:  # once: under the summary table (not also in each step table's title)
        key = f"eager default fp32 lr={c['lr']:g}"
        assert out.count(f"{key}: {c['verdict']}") == 1 and out.count(c["verdict"]) == 2, (c["verdict"], out)

    # what the CPU exercised and not, in the output and in the result, and the command for a GPU
    cov = rec["coverage"]
    assert cov["device"] == "cpu" and cov["exercised"] and cov["not_exercised"]
    for source in ("atomic adds", "split-K", "SM count"):
        assert any(source in item for item in cov["not_exercised"]) and source in out
    assert any("intra-op threads" in item for item in cov["exercised"])
    expected = ["detbench", *[("cuda" if a == "cpu" else a) for a in argv]]
    assert gpu_line(out) == [f"run the same on a GPU: {shlex.join(expected)}"]
    assert "find the op" not in out


def test_diverged_sft_prints_a_pinpoint_command_of_its_configuration(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(planted, "_sysrand", CyclingOrder())
    data = token_file(tmp_path / "t.jsonl", n_seqs=4, length=16, prompt=4)
    argv = [*SFT, "--data", str(data), "--batch-size", "2", "--lr", "3e-4", "--seed", "3", "--plant", PLANT,
            "--no-save", "--summary-only"]
    assert run_cli(monkeypatch, argv) == 0
    out = capsys.readouterr().out
    assert "diverge @1" in out and not gpu_line(out) and "exercised" not in out
    (line,) = [line for line in out.splitlines() if line.startswith("find the op: ")]
    cmd = shlex.split(line.removeprefix("find the op: "))
    assert cmd[:2] == ["detbench", "pinpoint"]
    args = cli.build_parser().parse_args(cmd[1:])
    assert (args.model, args.attention, args.mode, args.dtype, float(args.lr), args.device) == \
        ("qwen3-tiny", "eager", "default", "float32", 3e-4, "cpu")
    assert (args.steps, args.runs, args.batch_size, args.data, args.seed, args.data_seed, args.plant) == \
        (1, 2, 2, str(data), 3, 0, [PLANT])


def test_pinpoint_command_notes_what_pinpoint_cannot_take():
    plan = make_plan(model="qwen3-tiny", lrs="1e-5", steps=4, repeats=3, n_batches=2, clip=0.5, device="cpu")
    res = ConfigResult(attention="sdpa", mode="torch-det", dtype="bfloat16", lr=1e-5, steps=4, repeats=3, status="ok",
                       identical=False, first_divergent_step=None)
    cmd, note = pinpoint_command(plan.settings, res, ["mykernels"])
    args = cli.build_parser().parse_args(cmd[1:])
    assert (args.attention, args.mode, args.dtype, args.steps, args.runs) == ("sdpa", "torch-det", "bfloat16", 4, 3)
    assert args.imports == ["mykernels"]  # the module that registered the backends is imported again
    assert "clip 0.5" in note and "2 batches cycled" in note


@pytest.mark.slow
def test_the_printed_pinpoint_command_finds_the_planted_op(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(planted, "_sysrand", CyclingOrder())
    assert run_cli(monkeypatch, [*SFT, "--plant", PLANT, "--no-save", "--summary-only"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("find the op: ")]
    cmd = shlex.split(line.removeprefix("find the op: "))
    assert run_cli(monkeypatch, [*cmd[1:], "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["replay"]["findings"][0]["op"] == "linear/planted-nondet"
    assert rep["compare"]["identical"] is False and "linear/planted-nondet" in json.dumps(rep["compare"])


def test_clean_cpu_pinpoint_prints_the_gpu_command_and_stores_coverage(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    argv = ["pinpoint", "--subject", "rmsnorm", "--device", "cpu", "--out", str(tmp_path)]
    assert run_cli(monkeypatch, argv) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("pinpoint-*.json")
    rep = json.loads(path.read_text())
    assert rep["replay"]["findings"] == [] and rep["compare"]["identical"] is True
    assert rep["coverage"]["device"] == "cpu" and any("atomic adds" in x for x in rep["coverage"]["not_exercised"])
    assert "atomic adds" in out and "split-K" in out
    gpu = ["detbench", *with_option(argv, "--device", "cuda")]
    assert gpu_line(out) == [f"run the same on a GPU: {shlex.join(gpu)}"]


def _row(label: str, vs: str, run_to_run: bool, same_as_first: bool) -> dict:
    return {"label": label, "vs": vs, "run_to_run_identical": run_to_run, "comparison": {"identical": same_as_first}}


def test_data_parallel_setups_are_clean_only_when_nothing_differs():
    first = _row("world=1", "world=1", True, True)
    assert clean_setups([first, _row("world=2", "world=1", True, True)])
    assert not clean_setups([first, _row("world=2", "world=1", True, False)])
    assert not clean_setups([_row("world=1", "world=1", False, True)])
    assert not clean_setups([])
