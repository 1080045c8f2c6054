"""Data-parallel SFT on torch.distributed (gloo, CPU): setups compared bit for bit, the invariant
reduction, resume, and every way a run can go wrong (bench.distributed, detbench sft --world-size)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from bench import cli
from bench import distributed as dp
from bench.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "qwen3-tiny", "--device", "cpu", "--seq-len", "32", "--lr", "3e-4"]


# ---- the reduction tree -------------------------------------------------------------------------


def test_tree_sum_is_the_same_bits_for_every_power_of_two_split():
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(1000, generator=g) * 10 ** torch.randint(-3, 4, (1000,), generator=g) for _ in range(8)]
    whole = dp.tree_sum(leaves)
    for per_rank in (1, 2, 4, 8):
        partial = [dp.tree_sum(leaves[i:i + per_rank]) for i in range(0, 8, per_rank)]
        assert dp.same_bits(dp.tree_sum(partial), whole), per_rank
    # and arrival order (what p.grad += does) is not the same bits: the test above could fail
    seq = leaves[0].clone()
    for t in leaves[1:]:
        seq = seq + t
    assert not dp.same_bits(seq, whole)


def test_ulp_distance_and_bits():
    one = torch.tensor([1.0])
    nxt = torch.nextafter(one, torch.tensor([2.0]))
    assert dp.ulp_distance(one, nxt) == 1
    assert dp.ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])) == 0
    assert dp.ulp_distance(torch.tensor([-1e-45]), torch.tensor([1e-45])) == 2
    assert not dp.same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    nan = torch.tensor([float("nan")])
    assert dp.same_bits(nan, nan.clone())


def test_bytes_per_step_follow_the_algorithms():
    assert dp.bytes_per_step("standard", 1, 1000) == 0
    assert dp.bytes_per_step("standard", 4, 1000) == 1500   # ring all-reduce: 2 (W-1)/W
    assert dp.bytes_per_step("invariant", 4, 1000) == 3000  # all-gather: W-1 copies


# ---- setups and bad input ----------------------------------------------------------------------


def test_vary_and_micro_batch_make_the_setups():
    base = dp.Setup()
    assert [s.world for s in dp.parse_vary(["world=1,2,4"], base)] == [1, 2, 4]
    fixed = dp.fix_micro_batch(dp.parse_vary(["world=1,2,4"], base), batch_size=8, micro_batch=2)
    assert [(s.world, s.accum) for s in fixed] == [(1, 4), (2, 2), (4, 1)]
    fixed = dp.fix_micro_batch(dp.parse_vary(["accum=1,2,4"], base), batch_size=8, micro_batch=2)
    assert [(s.world, s.accum) for s in fixed] == [(4, 1), (2, 2), (1, 4)]
    assert dp.parse_vary(["resume=3"], base) == [base, dp.Setup(resume=3)]


@pytest.mark.parametrize("argv, message", [
    (["--world-size", "16", "--batch-size", "8"], "raise --batch-size to at least 16"),
    (["--world-size", "4", "--batch-size", "6"], "does not split into world x accum = 4"),
    (["--vary", "world=1,3", "--batch-size", "6", "--micro-batch", "1", "--reduce", "invariant"], "powers of two"),
    (["--vary", "world=1,2", "--batch-size", "8", "--reduce", "invariant"], "give --micro-batch"),
    (["--vary", "ranks=1,2"], "AXIS one of world, accum, resume, threads"),
    (["--vary", "world=1,2", "--vary", "accum=1,2"], "one axis at a time"),
    (["--vary", "world=2"], "at least two different values"),
    (["--vary", "resume=9", "--steps", "3"], "between 1 and 2"),
    (["--reduce", "fastest"], "choose from standard, invariant"),
    (["--parallel", "fsdp", "--reduce", "invariant", "--world-size", "2"], "runs with --parallel ddp"),
    (["--world-size", "2", "--attention", "eager,sdpa"], "give one --attention"),
    (["--world-size", "2", "--micro-batch", "3", "--batch-size", "8"], "must divide --batch-size 8"),
    (["--world-size", "2", "--rank-timeout", "0"], "--rank-timeout must be a positive"),
])
def test_bad_input_is_one_message_and_exit_2(argv, message, capsys, tmp_path):
    rc = cli.main(["sft", *TINY, "--steps", "3", "--repeats", "2", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_port_in_use_is_refused_before_any_rank_starts(capsys, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = cli.main(["sft", *TINY, "--steps", "3", "--repeats", "2", "--world-size", "2", "--batch-size", "4",
                       "--master-port", str(port), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--master-port {port}: cannot listen there" in err, err


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="checks the refusal where fewer GPUs are visible than ranks")
def test_more_ranks_than_gpus_is_refused_with_the_fix():
    with pytest.raises(InputError, match="needs as many GPUs.*--device cpu"):
        dp.check_setups([dp.Setup(world=2)], batch_size=4, steps=3, reduce=("standard",), parallel="ddp",
                        device=torch.device("cuda"))


# ---- real runs on 1, 2 and 4 gloo ranks (tiny preset) ---------------------------------------------


def _strays(marker: str) -> list[int]:
    """Processes still running with ``marker`` in their environment (ranks, the fork server)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker.encode() in (d / "environ").read_bytes():
                state = next((ln.split()[1] for ln in (d / "status").read_text().splitlines()
                              if ln.startswith("State:")), "?")
                if state != "Z":
                    found.append(int(d.name))
        except OSError:
            continue
    return found


def _sft(tmp_path: Path, *argv: str, env: dict | None = None, timeout: float = 600) -> tuple[dict | None, str, int]:
    marker = f"detbench-test-{uuid.uuid4().hex}"
    proc = subprocess.run([sys.executable, "-m", "bench", "sft", *TINY, "--out", str(tmp_path), "--summary-only",
                           *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "DETBENCH_TEST_MARKER": marker, "COLUMNS": "200", **(env or {})})
    deadline = time.monotonic() + 10
    while _strays(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _strays(marker) == [], "a rank or the fork server outlived detbench"
    files = sorted(tmp_path.glob("sft-*.json"))
    return (json.loads(files[-1].read_text()) if files else None), proc.stdout + proc.stderr, proc.returncode


def _rows(record: dict) -> dict[tuple[str, str], dict]:
    return {(r["reduce"], r["label"]): r for r in record["distributed"]["setups"]}


@pytest.mark.slow
def test_accumulation_is_detected_with_the_standard_reduction(tmp_path):
    rec, out, rc = _sft(tmp_path, "--batch-size", "8", "--steps", "3", "--repeats", "2", "--vary", "accum=1,2,4")
    assert rc == 0, out
    rows = _rows(rec)
    assert all(r["run_to_run_identical"] for r in rows.values()), out
    for a in (2, 4):
        row = rows[("standard", f"world=1 accum={a}")]
        assert not row["comparison"]["identical"], out
        # the first micro-batch's sequences give the same bits at either size here, so it is the sum
        assert row["where"]["where"] == "reduction", row["where"]
    assert "where it enters (reduction)" in out


@pytest.mark.slow
def test_thread_count_is_detected_and_pinpointed_to_an_op(tmp_path):
    rec, out, rc = _sft(tmp_path, "--batch-size", "8", "--steps", "2", "--repeats", "2", "--vary", "threads=1,2")
    assert rc == 0, out
    row = _rows(rec)[("standard", "world=1 accum=1 threads=2")]
    assert [r["threads"] for r in row["ranks"]] == [2]
    # on this project's 2-core CPU machines one op splits its work by the thread count; pinpoint names it
    assert not row["comparison"]["identical"], row
    assert row["where"]["where"] == "threads" and row["where"]["root_cause"]["op"].startswith("aten."), row["where"]


@pytest.mark.slow
def test_world_size_with_standard_ddp_differs_and_the_invariant_tree_does_not(tmp_path):
    """world 1/2/4 with accum 4/2/1 (micro-batch 2, global batch 8), five steps, each setup repeated: with
    the standard reduction the world sizes differ (real, nothing planted), with the invariant one they are
    the same bits; both measured in the same run (the cost table)."""
    rec, out, rc = _sft(tmp_path, "--batch-size", "8", "--steps", "5", "--repeats", "2", "--vary", "world=1,2,4",
                        "--micro-batch", "2", "--reduce", "standard,invariant")
    assert rc == 0, out
    rows = _rows(rec)
    assert rec["schema"] == "detbench.sft/2" and rec["distributed"]["backend"] == "gloo"
    # every rank's bits gathered on rank 0
    assert [len(r["ranks"]) for r in rows.values()] == [1, 1, 2, 2, 4, 4]
    for w, a in ((2, 2), (4, 1)):
        assert rows[("invariant", f"world={w} accum={a}")]["comparison"]["identical"], out
        assert not rows[("standard", f"world={w} accum={a}")]["comparison"]["identical"], out
    assert all(r["run_to_run_identical"] for r in rows.values())
    cost = rec["distributed"]["cost"]
    assert [c["setup"] for c in cost] == ["world=1 accum=4", "world=2 accum=2", "world=4 accum=1"]
    assert all(c["ratio"] and c["ratio"] > 0 for c in cost)
    assert "cost of --reduce invariant" in out


@pytest.mark.slow
def test_resume_from_a_checkpoint_is_exact(tmp_path):
    rec, out, rc = _sft(tmp_path, "--batch-size", "4", "--steps", "4", "--repeats", "2", "--world-size", "2",
                        "--vary", "resume=2")
    assert rc == 0, out
    row = _rows(rec)[("standard", "world=2 accum=1 resume@2")]
    assert row["comparison"]["identical"] and len(row["loss_bits"]) == 4, row["verdict"]


@pytest.mark.slow
def test_a_rank_that_raises_stops_the_others_with_its_error(tmp_path):
    t0 = time.monotonic()
    rec, out, rc = _sft(tmp_path, "--batch-size", "4", "--steps", "3", "--repeats", "2", "--world-size", "2",
                        env={dp.TEST_FAIL_ENV: "1:1"}, timeout=300)
    assert rc == 1, out
    assert "rank 1 raised RuntimeError: planted failure on rank 1 at step 2" in out, out
    assert time.monotonic() - t0 < 120  # rank 0 waits in a collective: it was stopped, not left to hang
    assert rec is None  # nothing finished: nothing written


@pytest.mark.slow
def test_ctrl_c_ends_every_rank_and_saves_what_finished(tmp_path):
    marker = f"detbench-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "sft", *TINY, "--out", str(tmp_path), "--batch-size", "4",
                             "--steps", "40", "--repeats", "2", "--vary", "world=1,2"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "DETBENCH_TEST_MARKER": marker, "COLUMNS": "200"})
    lines = []
    try:
        for line in proc.stdout:  # the first setup has finished once its line is printed
            lines.append(line)
            if re.match(r"\s*(\[\d+/\d+\] )?standard world=1 ", line):  # "  [1/2] standard world=1 accum=1: ..."
                break
        time.sleep(3)  # the second setup's ranks are running
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while _strays(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _strays(marker) == [], "a rank outlived the interrupted run"
    assert proc.returncode == 130, "".join(lines) + rest
    rec = json.loads(sorted(tmp_path.glob("sft-*.json"))[-1].read_text())
    assert rec["status"] == "interrupted" and rec["distributed"]["status"] == "interrupted"
    assert [r["label"] for r in rec["distributed"]["setups"]] == ["world=1 accum=1"]


@pytest.mark.slow
def test_under_torchrun_each_process_is_a_rank(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    marker = f"detbench-test-{uuid.uuid4().hex}"
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "bench", "sft", *TINY, "--batch-size", "4",
                           "--steps", "2", "--repeats", "2", "--world-size", "2", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DETBENCH_TEST_MARKER": marker, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(tmp_path.glob("sft-*.json"))
    assert len(files) == 1  # rank 0 alone writes
    rec = json.loads(files[0].read_text())
    assert rec["distributed"]["launcher"] == "torchrun"
    row = rec["distributed"]["setups"][0]
    assert row["run_to_run_identical"] and len(row["ranks"]) == 2
    assert _strays(marker) == []
