"""Signals end to end, shared by the commands' interrupt tests: a child ``python -m bench ...`` stops at a pause
point the test names (:func:`bench.cli.common.pause_point`), writes a marker file there, and the test sends the
signal only once the marker exists, so the signal always lands at the same place in the command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli.common import PAUSE_ENV, PAUSE_MARKER_ENV

ROOT = Path(__file__).resolve().parent.parent

# (signal, the exit status a shell reports for it), with pytest ids.
SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
SIGNAL_IDS = ["SIGINT", "SIGTERM"]


def _default_sigint() -> None:
    # An interactive shell starts commands with SIGINT at its default; a background test runner may not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def paused_child(marker_dir: Path, point: str, argv: list[str], *, cwd: Path = ROOT, env: dict | None = None,
                 limit_s: float = 300) -> subprocess.Popen:
    """``python -m bench *argv`` started and waited for until it reaches pause point ``point`` (fails the test,
    with the child's output, if it ends or takes over ``limit_s`` first)."""
    marker = marker_dir / "paused"
    env = {**os.environ, **(env or {}), PAUSE_ENV: point, PAUSE_MARKER_ENV: str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "bench", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    deadline = time.monotonic() + limit_s
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the child never reached pause point {point!r} (rc {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.02)
    return proc


def interrupt(proc: subprocess.Popen, sig: int, timeout: float = 120) -> tuple[str, str]:
    """Send ``sig`` to the paused child and collect its output; the child is killed if it outlives the test."""
    try:
        proc.send_signal(sig)
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
