"""Determinism modes set what they say and restore everything, even on error."""

import json
import os
import subprocess
import sys

import pytest
import torch

import bench.modes as modes
from bench.modes import (
    MODE_ENV_VARS,
    MODES,
    UnknownMode,
    apply_mode,
    determinism_state,
    get_mode,
    is_refusal,
    run_environment,
)


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """Start each test from PyTorch's defaults with none of the mode variables set; restore after."""
    before = determinism_state()
    for k in MODE_ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(before["deterministic_algorithms"], warn_only=before["warn_only"])
    torch.backends.cudnn.deterministic = before["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = before["cudnn_benchmark"]


@pytest.mark.parametrize("name", list(MODES))
def test_mode_sets_its_switches_inside(name):
    mode = MODES[name]
    with apply_mode(name) as state:
        assert state.mode is mode
        assert torch.are_deterministic_algorithms_enabled() is mode.deterministic_algorithms
        assert torch.is_deterministic_algorithms_warn_only_enabled() is mode.warn_only
        assert torch.backends.cudnn.deterministic is mode.cudnn_deterministic
        assert torch.backends.cudnn.benchmark is mode.cudnn_benchmark
        for k, v in mode.env.items():
            assert os.environ[k] == v


@pytest.mark.parametrize("name", list(MODES))
def test_mode_restores_everything_even_on_error(name, monkeypatch):
    # A non-default starting point: deterministic with warn_only, cudnn.benchmark on, one variable set
    # to a user value and the others absent.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":1:1")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = True
    before = determinism_state()
    with pytest.raises(RuntimeError, match="boom"):
        with apply_mode(name):
            assert determinism_state() != before
            raise RuntimeError("boom")
    assert determinism_state() == before
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":1:1"
    for k in MODE_ENV_VARS:
        if k != "CUBLAS_WORKSPACE_CONFIG":
            assert k not in os.environ, f"{k} leaked out of mode {name}"


def test_nested_modes_restore_in_order():
    with apply_mode("hf-full"):
        with apply_mode("default"):
            assert not torch.are_deterministic_algorithms_enabled()
            assert os.environ["CUDA_LAUNCH_BLOCKING"] == "1"  # default leaves the environment alone
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_unknown_mode_names_the_choices():
    with pytest.raises(UnknownMode, match="choose from: default, torch-det, hf-full"):
        get_mode("strict")
    with pytest.raises(UnknownMode):
        with apply_mode("strict"):
            pass


def test_refusal_is_recognised():
    assert is_refusal(RuntimeError("index_add_cuda_ does not have a deterministic implementation, but you set "
                                   "'torch.use_deterministic_algorithms(True)'"))
    assert is_refusal(RuntimeError("Deterministic behavior was enabled with either `torch.use_deterministic_"
                                   "algorithms(True)` ... you must set CUBLAS_WORKSPACE_CONFIG=:4096:8"))
    assert not is_refusal(ValueError("shapes do not match"))


# ---- memory fill: what a deterministic mode's time contains besides the kernels ---------------------------


@pytest.mark.parametrize("name", list(MODES))
def test_mode_records_whether_pytorch_fills_uninitialised_memory(name, monkeypatch):
    """torch-det keeps PyTorch's fill of torch.empty (NaN) and says so: in its record and in the state of
    every block it runs; switching the global flag off is seen too."""
    mode = MODES[name]
    with apply_mode(name) as state:
        assert state.fill_uninitialized_memory is mode.deterministic_algorithms
        if mode.deterministic_algorithms:
            assert torch.isnan(torch.empty(8)).all()  # what the flag does: the memset the time includes
    assert mode.to_dict()["fill_uninitialized_memory"] is mode.deterministic_algorithms
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    with apply_mode(name) as state:
        assert state.fill_uninitialized_memory is False
    assert mode.to_dict()["fill_uninitialized_memory"] is False


# ---- the run-wide environment: CUBLAS_WORKSPACE_CONFIG once, before any CUDA work ------------------------


@pytest.mark.parametrize("modes, value", [(["default"], None), (["default", "hf-full"], ":16:8"),
                                          (["hf-full", "torch-det"], ":16:8"), (None, ":4096:8")])
def test_run_environment_sets_the_first_asked_value_and_restores(modes, value):
    with run_environment(modes) as rec:
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == value
        assert rec.in_force == {"CUBLAS_WORKSPACE_CONFIG": value}
        with run_environment(["default", "hf-full"]) as inner:  # nested: the outer decision stands
            assert inner is rec and os.environ.get("CUBLAS_WORKSPACE_CONFIG") == value
        with apply_mode("torch-det"):
            pass
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == value  # a mode's exit puts the run's value back
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    asked = {m: MODES[m].env["CUBLAS_WORKSPACE_CONFIG"] for m in (modes or MODES) if m != "default"}
    assert rec.asked == {"CUBLAS_WORKSPACE_CONFIG": asked}
    assert [n.split(" asks")[0] for n in rec.notes] == [m for m, v in asked.items() if v != value]


def test_run_environment_keeps_an_exported_value_and_restores_on_error(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with pytest.raises(RuntimeError, match="boom"):
        with run_environment(["hf-full"]) as rec:
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
            raise RuntimeError("boom")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert rec.set_by_run == {"CUBLAS_WORKSPACE_CONFIG": False} and rec.inherited == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert "every cell of this run used the exported CUBLAS_WORKSPACE_CONFIG=:4096:8" in rec.notes[0]
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    with pytest.raises(KeyboardInterrupt):
        with run_environment(["torch-det"]):
            raise KeyboardInterrupt
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with run_environment(["strict", "hf-full"]) as rec:  # unknown names are the plan's to refuse
        assert rec.in_force == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    assert rec.to_dict()["in_force"] == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    json.dumps(rec.to_dict())


@pytest.mark.slow
def test_hf_full_matches_transformers_enable_full_determinism():
    """Run transformers' own enable_full_determinism in a child process and compare what it set."""
    pytest.importorskip("transformers")
    code = (
        "import json, os, torch\n"
        "keys = set(os.environ)\n"
        "from transformers.trainer_utils import enable_full_determinism\n"
        "before = dict(os.environ)\n"
        "enable_full_determinism(0)\n"
        "env = {k: v for k, v in os.environ.items() if before.get(k) != v}\n"
        "print(json.dumps({'env': env, 'det': torch.are_deterministic_algorithms_enabled(),\n"
        "  'warn_only': torch.is_deterministic_algorithms_warn_only_enabled(),\n"
        "  'cudnn_det': torch.backends.cudnn.deterministic, 'cudnn_bench': torch.backends.cudnn.benchmark}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in MODE_ENV_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hf = json.loads(out.stdout.strip().splitlines()[-1])
    mode = MODES["hf-full"]
    for k, v in hf["env"].items():
        if k in ("PYTHONHASHSEED",):  # seeding is the harness's job, not the mode's
            continue
        assert mode.env.get(k) == v, f"transformers sets {k}={v}, hf-full sets {mode.env.get(k)}"
    assert mode.deterministic_algorithms is hf["det"]
    assert mode.warn_only is hf["warn_only"]
    assert mode.cudnn_deterministic is hf["cudnn_det"]
    assert mode.cudnn_benchmark is hf["cudnn_bench"]


# ---- an interrupt inside apply_mode: state restored, KeyboardInterrupt propagates --------------------


def _non_default_start(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":1:1")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = True
    return determinism_state()


@pytest.mark.parametrize("name", ["default", "torch-det", "hf-full"])
def test_interrupt_while_entering_a_mode_restores_and_propagates(monkeypatch, half_imported_inductor, name):
    before = _non_default_start(monkeypatch)
    half_imported_inductor["armed"] = True
    with pytest.raises(KeyboardInterrupt):
        with apply_mode(name):
            pytest.fail("the block must not run")
    half_imported_inductor["armed"] = False
    assert half_imported_inductor["interrupted"] == 1
    assert determinism_state() == before


@pytest.mark.parametrize("name", ["torch-det", "hf-full"])
def test_interrupt_in_the_block_restores_without_importing(monkeypatch, half_imported_inductor, name):
    before = _non_default_start(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        with apply_mode(name):
            half_imported_inductor.update(armed=True, interrupted=1)  # every import fails from here on
            raise KeyboardInterrupt
    half_imported_inductor["armed"] = False
    assert half_imported_inductor["failed"] == 0, "the rollback imported something"
    assert determinism_state() == before


@pytest.mark.parametrize("step", range(4))
def test_interrupt_during_the_rollback_still_restores_the_rest(monkeypatch, step):
    """A second Ctrl-C while a mode is being rolled back: the other switches are still restored and the
    interrupt propagates."""

    before = _non_default_start(monkeypatch)
    real_steps = modes._restore_steps
    calls = []

    def steps(saved):
        out = list(real_steps(saved))

        def interrupted():
            calls.append(step)
            raise KeyboardInterrupt

        return out[:step] + [interrupted] + out[step:]

    monkeypatch.setattr(modes, "_restore_steps", steps)
    with pytest.raises(KeyboardInterrupt):
        with apply_mode("hf-full"):
            pass
    assert calls == [step] and determinism_state() == before
