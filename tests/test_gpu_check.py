"""`detbench gpu-check`: the CPU dry run of the GPU validation script, so it cannot rot."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bench import cli, gpu_check
from bench.gpu_check import PART_BUDGET_S, PARTS, TEST_STAGE_HOOK, Stage, _run_stage, files, plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_part_1_alone_answers_the_headline(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["gpu-check", "--dry-run", "--part", "1", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert rc == 0, stages
    assert sorted(p.name for p in out.iterdir()) == sorted(files(1))
    assert all(s["status"] == "ok" for s in stages.values()), stages
    answers = {h["question"].split()[0]: h["answer"] for h in summary["headline"]}
    # tests-core ran its (dry-run) cases for real and all passed
    assert answers["Do"].startswith("yes: ") and " passed" in answers["Do"], answers
    # The dry run plants a fault in one MLP projection, so eager diverges too: the answer is "no", and says why.
    # The step is the first whose two repeats drew different chunk orders: usually 1, step 2 or later when the
    # OS shuffle gave both repeats the same order at step 1 (about 1 in 12).
    plant = gpu_check.DRY_RUN_PLANT
    assert re.match(rf"no: eager DIVERGED at step \d+ x2 \(planted: {re.escape(plant)}\)", answers["Does"]), answers
    assert answers["Which"] == ("linear/planted-nondet at model.layers.1.mlp.down_proj (forward), from trace-compare"
                                " - the planted fault")
    text = (out / "summary.md").read_text()
    assert "## Headline" in text and text.index("## Headline") < text.index("## Stages")
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("┘")  # the stage table comes last


@pytest.mark.slow
@pytest.mark.parametrize("part", [2, 4])  # part 3's commands are built as parts 1's and 2's are
def test_later_parts_rehearse_on_the_cpu(tmp_path, part):
    out = tmp_path / "out"
    rc = cli.main(["gpu-check", "--dry-run", "--part", str(part), "--out", str(out)])
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert rc == 0 and all(s["status"] == "ok" for s in stages.values()), stages
    assert sorted(p.name for p in out.iterdir()) == sorted(files(part))
    if part == 4:  # the NCCL stage rehearses on two gloo ranks
        text = (out / "summary.md").read_text()
        assert "sft data-parallel invariant world=1 accum=2" not in text  # one setup: world 2, compared with itself
        assert "sft data-parallel standard world=2 accum=1: run to run identical" in text, text


@pytest.mark.parametrize("part", sorted(PARTS))
def test_every_part_fits_its_budget_by_estimate(part):
    p = plan(part)
    assert p["fits"] and p["estimate_s"] <= PART_BUDGET_S, [(s.name, s.estimate_s, s.basis) for s in p["stages"]]
    assert all(s.estimate_s > 0 and s.basis for s in p["stages"])
    assert sum(s.limit_s for s in p["stages"]) == pytest.approx(PART_BUDGET_S, abs=0.5)
    assert len(files(part)) <= gpu_check.MAX_FILES


def test_plan_flags_a_part_over_its_budget(capsys):
    assert cli.main(["gpu-check", "--plan", "--budget", "60"]) == 1
    assert "OVER BUDGET" in capsys.readouterr().out
    assert cli.main(["gpu-check", "--plan"]) == 0


def _collected(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.mark.slow
def test_test_stages_select_what_their_estimates_count():
    kernel_files = gpu_check._kernel_test_files()
    core = _collected(*kernel_files, "-k", gpu_check.CORE_TESTS)
    assert len(core) == gpu_check.CORE_TEST_CASES
    everything = _collected(*kernel_files, "tests/test_hf_dropin.py")
    assert len(everything) == gpu_check.ALL_TEST_CASES
    # the headline subset checks every kernel both against float64 and for repeat equality
    for f in kernel_files:
        if f.endswith("test_kernel_speed.py"):
            continue
        mine = [c for c in core if c.startswith(f)]
        assert any(w in c for c in mine for w in ("float64", "reference", "accuracy", "atomic_twin")), f
        assert any(w in c for c in mine for w in ("repeat", "run_to_run")), f


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


# --- an interrupted gpu-check: the running stage's process group is killed, the temp folder removed,
# --- the summary of what finished written, and the message names the files in --out


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "?")
    return state != "Z"


def _wait_for_pid(pidfile: Path, proc: subprocess.Popen, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gpu-check ended before its stage started: {proc.communicate()}"
        try:
            return int(pidfile.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise AssertionError("the hooked stage never started")


def _default_sigint() -> None:
    # An interactive shell starts commands with SIGINT at its default; a background test runner may not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_kills_the_stage_and_lists_the_files(tmp_path, sig, code):
    tmp, out, pidfile = tmp_path / "tmp", tmp_path / "out", tmp_path / "stage.pid"
    tmp.mkdir()
    child = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    env = {**os.environ, "TMPDIR": str(tmp),
           TEST_STAGE_HOOK: f"tests-core={shlex.join([sys.executable, '-c', child])}"}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "gpu-check", "--dry-run", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    pid = None
    try:
        pid = _wait_for_pid(pidfile, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 5  # an orphan is reaped by init, not by us
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the interrupted stage was left running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert list(tmp.glob("gpu-check-*")) == [], "temporary folder left behind"
    written = sorted(p.name for p in out.iterdir())
    assert {"gpu_check.log", "summary.md", "summary.json"} <= set(written)
    assert "nothing partial was written" not in err
    message = [line for line in err.splitlines() if "interrupted" in line]
    assert message and all(name in message[-1] for name in written), err
    stages = {s["name"]: s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert stages["env"] == "ok" and stages["tests-core"] == "interrupted" and stages["sft"] == "not run", stages


# A stage child that ignores SIGTERM and leaves a grandchild (in its process group) that ignores it too.
_STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
g = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {g.pid}")
time.sleep(float(sys.argv[2]))
"""


def _pids(path: Path, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pids = [int(x) for x in path.read_text().split()]
            if len(pids) == 2:
                return pids
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError("the stage never started")


def _gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [p for p in pids if _alive(p)]
    for p in alive:  # never leave them behind, whatever the test says
        os.kill(p, signal.SIGKILL)
    return not alive


def test_interrupted_stage_ignoring_sigterm_is_killed_with_its_children(tmp_path, monkeypatch):
    """Ctrl-C in gpu-check: SIGTERM to the stage's group, a grace period, then SIGKILL."""
    import _thread

    monkeypatch.setattr(gpu_check, "STOP_GRACE_S", 0.5)
    pidfile = tmp_path / "pids"

    def interrupt_once_started():
        _pids(pidfile)
        _thread.interrupt_main()  # as Ctrl-C: KeyboardInterrupt in the main thread

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    st = Stage("stubborn")
    t0 = time.monotonic()
    with open(tmp_path / "log", "w") as log, pytest.raises(KeyboardInterrupt):
        _run_stage(st, [sys.executable, "-c", _STUBBORN, str(pidfile), "60"], 60, log)
    assert st.status == "interrupted" and time.monotonic() - t0 < 30
    assert _gone(_pids(pidfile)), "the stage or its child survived the interrupt"


def test_finished_stage_leaves_no_child_behind(tmp_path):
    """A stage whose command exits while its own child still runs: the child is killed with the group."""
    pidfile = tmp_path / "pids"
    st = Stage("leaves-a-child")
    with open(tmp_path / "log", "w") as log:
        _run_stage(st, [sys.executable, "-c", _STUBBORN, str(pidfile), "0"], 60, log)
    assert st.status == "ok"
    assert _gone(_pids(pidfile)), "the stage's child outlived it"


def _fake_cache(root: Path, moved_from: Path) -> Path:
    """A Triton cache folder as `kernels.aot --cache-dir` leaves it, then moved: group files still name
    the old absolute paths."""
    entry = root / "ABCDEF"
    entry.mkdir(parents=True)
    for name in ("_k.json", "_k.cubin"):
        (entry / name).write_text("{}")
    children = {n: str(moved_from / "ABCDEF" / n) for n in ("_k.json", "_k.cubin")}
    (entry / "__grp___k.json").write_text(json.dumps({"child_paths": children}))
    return root


def test_triton_cache_is_relocated_and_handed_to_every_stage(tmp_path):
    cache = _fake_cache(tmp_path / "here", tmp_path / "elsewhere")
    run = gpu_check.CheckRun(60.0, True, 1, triton_cache=str(cache))
    st = Stage("env")
    with open(tmp_path / "log", "w") as log:
        env = gpu_check._use_triton_cache(run, st, log)
    assert env == {"TRITON_CACHE_DIR": str(cache.resolve())}
    group = json.loads((cache / "ABCDEF" / "__grp___k.json").read_text())["child_paths"]
    assert group == {n: str(cache.resolve() / "ABCDEF" / n) for n in ("_k.json", "_k.cubin")}
    assert "Triton cache here: 1 kernels" in st.note


def test_a_folder_without_a_triton_cache_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["gpu-check", "--dry-run", "--out", str(tmp_path / "out"), "--triton-cache",
                     str(tmp_path / "empty")]) == 2
    assert "no Triton cache there" in capsys.readouterr().err
