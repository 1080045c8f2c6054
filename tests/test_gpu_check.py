"""`detbench gpu-check`: the CPU dry run of the GPU validation script, so it cannot rot."""

from __future__ import annotations

import json
import os
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
from bench.gpu_check import FILES, TEST_STAGE_HOOK, Stage, _run_stage

ROOT = Path(__file__).resolve().parents[1]


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
           TEST_STAGE_HOOK: f"tests={shlex.join([sys.executable, '-c', child])}"}
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
    assert stages["env"] == "ok" and stages["tests"] == "interrupted" and stages["sft"] == "not run", stages


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
