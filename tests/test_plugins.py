"""User kernels from the command line: ``--import MODULE``, ``$DETBENCH_IMPORT`` and the ``detbench.backends``
entry points of an installed package (``bench.plugins``, ``qwen_layers.registry``).

The "installed package" is a throwaway one written into a temporary folder with a hand-written
``*.dist-info`` (METADATA and entry_points.txt): on ``sys.path`` (``PYTHONPATH`` for a child process),
``importlib.metadata`` finds it exactly as it finds a pip-installed one, and nothing is installed into the
test environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench import distributed as dp
from bench import plugins
from bench.cli import build_parser, main
from bench.cli.common import recorded_argv
from bench.cli.run import equivalent_command, plan_from_args
from bench.results import load_run
from qwen_layers import registry
from qwen_layers.registry import ENTRY_POINT_GROUP, PluginLoadError, Registry

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--quick", "--device", "cpu", "--time-repeats", "1", "--warmup", "0", "--no-progress", "--dtypes", "fp32",
        "--modes", "default", "--repeats", "2", "--subjects", "rmsnorm"]

# A user's kernel module: registers rmsnorm/<name> at import (what README's example does).
USER_MODULE = '''
import torch
from qwen_layers import registry


@registry.register("rmsnorm", "{name}", deterministic=True, description="a user's rmsnorm")
def rmsnorm(x, weight, eps):
    v = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(v + eps)).to(x.dtype)
'''

# The throwaway package: the module form registers at import, the callable form is handed the registry.
PACKAGE_INIT = USER_MODULE.format(name="ep-mod")
PACKAGE_HOOK = '''
from qwen_layers.backends import eager_rmsnorm


def register(registry):
    registry.register("rmsnorm", "ep-call", eager_rmsnorm, deterministic=True, description="from an entry point")
'''


def _install(site: Path, package: str, entry_points: dict[str, str], files: dict[str, str]) -> None:
    """Write ``package`` and a ``<package>-0.1.dist-info`` declaring ``entry_points`` into ``site``."""
    (site / package).mkdir(parents=True)
    for name, text in files.items():
        (site / package / name).write_text(text)
    info = site / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


@pytest.fixture
def site(tmp_path):
    """A folder holding the throwaway package dbt_plugin_pkg (entry points 'mod' and 'call')."""
    folder = tmp_path / "site"
    _install(folder, "dbt_plugin_pkg", {"mod": "dbt_plugin_pkg", "call": "dbt_plugin_pkg.hook:register"},
             {"__init__.py": PACKAGE_INIT, "hook.py": PACKAGE_HOOK})
    return folder


@pytest.fixture
def forget_modules():
    """Modules a test imports from its temporary folders are removed from sys.modules afterwards."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("dbt_"):
            del sys.modules[name]


@pytest.fixture
def user_module(tmp_path, monkeypatch, forget_modules):
    """dbt_user_kernels.py (rmsnorm/mine) in the current directory; the registry restored afterwards."""
    (tmp_path / "dbt_user_kernels.py").write_text(USER_MODULE.format(name="mine"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(plugins.ENV, raising=False)
    with registry.scoped():
        yield "dbt_user_kernels"


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("detbench: error: "), (rc, out, err)
    return lines[0]


# ---- which modules ------------------------------------------------------------------------------


def test_imports_come_from_the_option_then_the_environment():
    env = {plugins.ENV: f"b, c{os.pathsep}a.x"}
    assert plugins.requested(["a.x,b", "d"], env) == ["a.x", "b", "d", "c"]
    assert plugins.requested(None, {}) == []
    assert plugins.import_options(["a", "b.c"]) == ["--import", "a", "--import", "b.c"]
    with pytest.raises(plugins.PluginError, match="'mine.py': not a module name.*mine, run from the folder"):
        plugins.requested(["mine.py"], {})
    with pytest.raises(plugins.PluginError, match="DETBENCH_IMPORT: '1bad'"):
        plugins.requested(None, {plugins.ENV: "1bad"})


def test_every_command_that_takes_backends_has_import():
    parser = build_parser()
    for argv in (["list"], ["run"], ["sft"], ["pinpoint"], ["kernel-bench"]):
        assert parser.parse_args([*argv, "--import", "m", "--import", "n"]).imports == ["m", "n"]


# ---- --import on the command line ---------------------------------------------------------------


def test_unknown_backend_says_how_to_import_it(capsys, user_module):
    line = one_line_error(capsys, ["run", "--backends", "mine", *FAST])
    assert "unknown backend 'mine'" in line and "--import MODULE" in line


def test_import_registers_before_the_names_are_checked_and_the_command_records_it(capsys, user_module,
                                                                                 small_shapes, tmp_path):
    """detbench run --import MODULE --backends mine: the module's backend runs, and the recorded command
    (which names the import) runs again as written."""
    out = tmp_path / "out"
    assert main(["run", "--import", user_module, "--backends", "mine", *FAST, "--out", str(out)]) == 0
    (path,) = out.glob("*.json")
    res = load_run(path)
    assert res.settings.imports == [user_module]
    assert [(c.backend, c.status) for c in res.cells] == [("mine", "ok")]
    cmd = res.command
    assert cmd[cmd.index("--import") + 1] == user_module
    assert main(cmd[1:]) == 0  # the recorded command, as written
    assert len(list(out.glob("*.json"))) == 2
    assert str(tmp_path) not in sys.path, "the current directory is on sys.path only while importing"
    capsys.readouterr()


def test_modules_from_the_environment_become_explicit_imports_in_the_record(monkeypatch):
    monkeypatch.setenv(plugins.ENV, "envmod,climod")
    monkeypatch.setattr(sys, "argv", ["detbench", "sft", "--import", "climod"])
    args = build_parser().parse_args(["run", "--import", "climod", "--quick", "--subjects", "rmsnorm",
                                      "--backends", "eager", "--dtypes", "fp32", "--modes", "default"])
    assert recorded_argv(args) == ["detbench", "sft", "--import", "climod", "--import", "envmod"]
    cmd = equivalent_command(plan_from_args(args).settings)
    assert cmd[2:6] == ["--import", "climod", "--import", "envmod"]


@pytest.mark.parametrize("argv, env, needles", [
    (["--import", "dbt_no_such_module"], None,
     ["--import dbt_no_such_module: no module 'dbt_no_such_module' in the current directory", "PYTHONPATH"]),
    ([], "dbt_no_such_module", ["DETBENCH_IMPORT: dbt_no_such_module: no module"]),
    (["--import", "dbt_raises"], None, ["--import dbt_raises: importing it raised ValueError at dbt_raises.py:2: "
                                        "boom; fix the module"]),
    (["--import", "dbt_needs"], None, ["--import dbt_needs: importing it failed", "dbt_missing_dependency",
                                       "install what it needs"]),
    (["--import", "kernels.py"], None, ["'kernels.py': not a module name"]),
])
def test_an_import_that_fails_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, forget_modules, argv, env,
                                                      needles):
    (tmp_path / "dbt_raises.py").write_text("x = 1\nraise ValueError('boom\\nmore')\n")
    (tmp_path / "dbt_needs.py").write_text("import dbt_missing_dependency\n")
    monkeypatch.chdir(tmp_path)
    if env is None:
        monkeypatch.delenv(plugins.ENV, raising=False)
    else:
        monkeypatch.setenv(plugins.ENV, env)
    line = one_line_error(capsys, ["list", *argv])
    for needle in needles:
        assert needle in line, line


def test_data_parallel_ranks_import_the_modules_too(monkeypatch):
    """The ranks are fresh processes: each imports the job's modules before anything else."""
    args = build_parser().parse_args(["sft", "--world-size", "2", "--import", "dbt_rank_kernels"])
    from bench.cli.sft_dp import dp_settings
    settings = dp_settings(args)
    assert settings.imports == ("dbt_rank_kernels",)
    seen = []

    class Stop(Exception):
        pass

    def init_process_group(*a, **k):
        raise Stop

    monkeypatch.setattr(dp, "_die_with_parent", lambda: None)
    monkeypatch.setattr(dp, "import_modules", seen.extend)
    monkeypatch.setattr(dp.dist, "init_process_group", init_process_group)
    job = dp.Job(model="qwen3-tiny", attention="eager", mode="default", dtype="float32", device="cpu", seed=0,
                 data_seed=0, batch_size=2, seq_len=8, data=None, n_batches=None, steps=1, repeats=2, lr=1e-5,
                 betas=(0.9, 0.999), weight_decay=0.0, clip=1.0, reduce="standard", parallel="ddp",
                 setup=dp.Setup(world=2), port=1, out="unused")
    with pytest.raises(Stop):
        dp.rank_main(0, replace(job, imports=settings.imports))
    assert seen == ["dbt_rank_kernels"]


# ---- entry points of an installed package -------------------------------------------------------


def test_entry_points_register_into_the_registry(site, monkeypatch, forget_modules):
    """A callable entry point is handed the registry; a module entry point registers at import."""
    monkeypatch.syspath_prepend(str(site))
    with registry.scoped():
        fresh = Registry(entry_points=ENTRY_POINT_GROUP)
        assert fresh.names("rmsnorm") == ["ep-call"]
        assert "ep-mod" in registry.names("rmsnorm")  # the module registered into the table it imports
    assert "ep-mod" not in registry.names("rmsnorm")
    assert Registry().names("rmsnorm") == [], "a registry without the group loads no entry point"


def test_an_installed_package_appears_in_list_by_itself(site, monkeypatch, capsys, forget_modules):
    """detbench list with no option shows the package's backend: the table a fresh process loads (built-in
    providers, then the entry points) stands in for the global one, which this process loaded long ago."""
    from bench.cli import listing

    monkeypatch.syspath_prepend(str(site))
    fresh = Registry(registry._PROVIDERS, entry_points=ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "REGISTRY", fresh)
    monkeypatch.setattr(listing, "REGISTRY", fresh)
    with registry.scoped():  # the module entry point registers into the global table: undone here
        assert main(["list", "--json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)["backends"]
    assert ("rmsnorm", "ep-call", "available") in {(b["op"], b["backend"], "available" * b["available"]) for b in rows}
    assert ("rmsnorm", "eager") in {(b["op"], b["backend"]) for b in rows}


def test_a_broken_entry_point_names_its_package_on_every_read(tmp_path, monkeypatch, capsys, forget_modules):
    site = tmp_path / "broken-site"
    _install(site, "dbt_broken_pkg", {"oops": "dbt_broken_pkg:register"},
             {"__init__.py": "def register(registry):\n    raise RuntimeError('kernel library missing')\n"})
    monkeypatch.syspath_prepend(str(site))
    broken = Registry(entry_points=ENTRY_POINT_GROUP)
    for _ in range(2):
        with pytest.raises(PluginLoadError, match=r"entry point oops = dbt_broken_pkg:register \(group "
                                                  r"detbench.backends, installed by dbt_broken_pkg 0.1\) failed to "
                                                  r"load: RuntimeError: kernel library missing; .*pip uninstall "
                                                  r"dbt_broken_pkg"):
            broken.names("rmsnorm")
    monkeypatch.setattr(registry, "REGISTRY", broken)  # what a fresh detbench process would load
    assert "entry point oops = dbt_broken_pkg:register" in one_line_error(capsys, ["list"])


@pytest.mark.slow
def test_an_installed_package_runs_by_itself_and_a_recorded_run_reruns(site, tmp_path):
    """In fresh processes: the package's backends (both entry point forms) run with no option; a run that
    took a module from $DETBENCH_IMPORT records it as --import, and the recorded command runs as written
    without the variable."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "dbt_user_kernels.py").write_text(USER_MODULE.format(name="mine"))
    env = {k: v for k, v in os.environ.items() if k != plugins.ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])

    def detbench(*argv, extra=None):
        proc = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=work, capture_output=True, text=True,
                              env={**env, **(extra or {})}, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    detbench("run", "--backends", "mine,ep-call,ep-mod", *FAST, "--out", "first",
             extra={plugins.ENV: "dbt_user_kernels"})
    (first,) = (work / "first").glob("*.json")
    cmd = load_run(first).command
    assert cmd[:4] == ["detbench", "run", "--import", "dbt_user_kernels"], cmd
    detbench(*[("second" if a == "first" else a) for a in cmd[1:]])
    (second,) = (work / "second").glob("*.json")
    assert {c.backend for c in load_run(second).cells if c.status == "ok"} == {"mine", "ep-call", "ep-mod"}
