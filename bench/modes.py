"""Determinism modes: the process-wide switches a user can flip, each as a scoped context manager.

A *mode* is a named set of PyTorch flags and environment variables. :func:`apply_mode` sets them on
entry and restores every one of them on exit (in ``finally``, so an exception inside the block never
leaves a mode behind): environment variables come back to their old value or are removed again if
they were absent, and ``torch.use_deterministic_algorithms`` gets back both its value and its
``warn_only``.

======================  ===========================================================================
``default``             PyTorch's defaults for the switches below: deterministic algorithms off,
                        ``cudnn.deterministic`` off, ``cudnn.benchmark`` off. Environment untouched.
``torch-det``           What PyTorch's reproducibility notes ask for:
                        ``torch.use_deterministic_algorithms(True)`` (errors, not warnings, so an op
                        without a deterministic implementation refuses), ``CUBLAS_WORKSPACE_CONFIG=
                        :4096:8``, ``cudnn.deterministic=True``, ``cudnn.benchmark=False``.
``hf-full``             What ``transformers.trainer_utils.enable_full_determinism`` applies (copied
                        from transformers 5.x, without importing it): ``CUDA_LAUNCH_BLOCKING=1``,
                        ``CUBLAS_WORKSPACE_CONFIG=:16:8``, ``ASCEND_LAUNCH_BLOCKING=1``,
                        ``HCCL_DETERMINISTIC=1``, ``FLASH_ATTENTION_DETERMINISTIC=1``,
                        ``use_deterministic_algorithms(True)``, ``cudnn.deterministic=True``,
                        ``cudnn.benchmark=False``. (Its seeding is done by the harness for every mode.)
======================  ===========================================================================

What an environment variable set inside a running process can and cannot do:

* ``CUDA_LAUNCH_BLOCKING`` is read by the CUDA driver when the CUDA context is created. Set after
  CUDA has initialised (the harness has already touched the GPU by then), it changes nothing.
  :func:`apply_mode` reports whether CUDA was initialised on entry (``ModeState.cuda_initialised``)
  so a result can say so.
* ``CUBLAS_WORKSPACE_CONFIG`` is checked by ``use_deterministic_algorithms`` on every cuBLAS call,
  but cuBLAS's workspace *size* is fixed at the first cuBLAS call of the process. Setting it when a
  mode is entered is too late once anything ran a CUDA matmul (a probe, the float64 reference, a
  default-mode cell). So a run sets it once, before its first CUDA work, for the whole run
  (:func:`run_environment`, used by ``detbench run``): the value of the first selected mode that asks
  for one (``torch-det`` before ``hf-full`` in the default order), or the value already exported,
  which is kept. One process has one workspace size, so when two selected modes ask for different
  sizes only one is in force; the run records which (``RunEnvironment``, the result's ``run_env``).
  To measure ``hf-full``'s ``:16:8``, run it without ``torch-det`` (``--modes default,hf-full``).
* ``FLASH_ATTENTION_DETERMINISTIC`` is read by transformers' flash-attention integration, not by the
  ``flash_attn`` package; detbench's flash-attn backends take their ``deterministic`` flag from the
  registry entry (``flash-attn`` vs ``flash-attn-det``), so this variable does not change them.

What a deterministic mode costs that is not the kernels': ``use_deterministic_algorithms(True)``
also makes PyTorch fill the memory ``torch.empty`` / ``empty_like`` return (NaN for floats, the largest
value for integers) while ``torch.utils.deterministic.fill_uninitialized_memory`` is true, its default.
``torch-det`` and ``hf-full`` keep that, as PyTorch defines the mode, so their time includes a memset of
every output a backend allocates uninitialised (detbench's Triton wrappers allocate theirs with
``torch.empty``). Each mode's record (:meth:`Mode.to_dict`) and each cell (``ModeState``) say whether the
fill was on.

Nothing here runs at import time; only entering :func:`apply_mode` or :func:`run_environment` changes
global state.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import torch

from bench.errors import InputError

_ABSENT = object()


@dataclass(frozen=True)
class Mode:
    """One determinism mode: the flags it sets and the environment variables it exports."""

    name: str
    description: str
    deterministic_algorithms: bool
    warn_only: bool = False
    cudnn_deterministic: bool = False
    cudnn_benchmark: bool = False
    env: Mapping[str, str] = field(default_factory=dict)

    def fills_uninitialized_memory(self) -> bool:
        """Whether PyTorch fills uninitialised memory under this mode (given the process's
        ``torch.utils.deterministic.fill_uninitialized_memory``, which this mode leaves as it is)."""
        return self.deterministic_algorithms and _fill_flag()

    def to_dict(self) -> dict:
        return {
            "name": self.name, "description": self.description,
            "deterministic_algorithms": self.deterministic_algorithms, "warn_only": self.warn_only,
            "cudnn_deterministic": self.cudnn_deterministic, "cudnn_benchmark": self.cudnn_benchmark,
            "env": dict(self.env),
            "fill_uninitialized_memory": self.fills_uninitialized_memory(),
        }


def _fill_flag() -> bool:
    try:
        return bool(torch.utils.deterministic.fill_uninitialized_memory)
    except AttributeError:  # a torch without the switch never fills
        return False


MODES: dict[str, Mode] = {
    "default": Mode(
        name="default",
        description="PyTorch defaults: deterministic algorithms off, cudnn.deterministic off, "
                    "cudnn.benchmark off; environment as inherited",
        deterministic_algorithms=False,
    ),
    "torch-det": Mode(
        name="torch-det",
        description="torch.use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG=:4096:8, "
                    "cudnn.deterministic=True, cudnn.benchmark=False",
        deterministic_algorithms=True,
        cudnn_deterministic=True,
        env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    ),
    "hf-full": Mode(
        name="hf-full",
        description="transformers' enable_full_determinism: CUDA_LAUNCH_BLOCKING=1, "
                    "CUBLAS_WORKSPACE_CONFIG=:16:8, FLASH_ATTENTION_DETERMINISTIC=1, "
                    "use_deterministic_algorithms(True), cudnn.deterministic=True, cudnn.benchmark=False",
        deterministic_algorithms=True,
        cudnn_deterministic=True,
        env={
            "CUDA_LAUNCH_BLOCKING": "1",
            "CUBLAS_WORKSPACE_CONFIG": ":16:8",
            "ASCEND_LAUNCH_BLOCKING": "1",
            "HCCL_DETERMINISTIC": "1",
            "FLASH_ATTENTION_DETERMINISTIC": "1",
        },
    ),
}

# Every environment variable any mode touches (recorded with each result).
MODE_ENV_VARS: tuple[str, ...] = tuple(sorted({k for m in MODES.values() for k in m.env}))


class UnknownMode(InputError):
    pass


def get_mode(name: str | Mode) -> Mode:
    """The mode called ``name`` (a :class:`Mode` is passed through); the error lists the valid names."""
    if isinstance(name, Mode):
        return name
    try:
        return MODES[name]
    except KeyError:
        raise UnknownMode(f"unknown mode {name!r}; choose from: {', '.join(MODES)}") from None


@dataclass(frozen=True)
class ModeState:
    """What :func:`apply_mode` found on entry (yielded to the block)."""

    mode: Mode
    cuda_initialised: bool  # CUDA_LAUNCH_BLOCKING cannot take effect once this is True
    # PyTorch fills the memory torch.empty returns inside the block (deterministic algorithms on and
    # torch.utils.deterministic.fill_uninitialized_memory true): times then include those memsets.
    fill_uninitialized_memory: bool = False


def determinism_state() -> dict:
    """The current values of every switch a mode touches (for results and for tests)."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "fill_uninitialized_memory": _fill_flag(),
        "env": {k: os.environ.get(k) for k in MODE_ENV_VARS},
    }


def _set_env(key: str, value) -> None:
    if value is _ABSENT or value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


_INDUCTOR_CONFIG = "torch._inductor.config"


def _loaded_inductor_config():
    """``torch._inductor.config`` if it is already imported, else None; never imports it."""
    mod = sys.modules.get(_INDUCTOR_CONFIG)
    return mod if mod is not None and hasattr(mod, "deterministic") else None


def _saved_state(mode: Mode) -> dict:
    """Every switch ``mode`` may change, read as plain values (no imports)."""
    inductor = _loaded_inductor_config()
    det = torch.are_deterministic_algorithms_enabled()
    return {
        "env": {k: os.environ.get(k, _ABSENT) for k in mode.env},
        "deterministic_algorithms": det,
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        # torch.use_deterministic_algorithms(x) also sets torch._inductor.config.deterministic = x (importing
        # that module the first time, which takes seconds); put back what it was, or what
        # use_deterministic_algorithms(det) would have set.
        "inductor_deterministic": inductor.deterministic if inductor is not None else det,
    }


def _restore_inductor(value: bool) -> None:
    inductor = _loaded_inductor_config()
    if inductor is not None:
        inductor.deterministic = value


def _restore_steps(saved: dict) -> list[Callable[[], None]]:
    """The rollback of :func:`apply_mode`, one step per switch. Each step sets a plain flag or variable and
    imports nothing: the rollback may run because an interrupt arrived while torch was importing a module
    (``torch.use_deterministic_algorithms`` imports ``torch._inductor.config``), and importing from a
    half-imported package fails (``module 'torch._dynamo' has no attribute 'utils'``)."""
    steps: list[Callable[[], None]] = [lambda k=k, v=v: _set_env(k, v) for k, v in saved["env"].items()]
    steps += [
        lambda: torch._C._set_deterministic_algorithms(saved["deterministic_algorithms"],
                                                       warn_only=saved["warn_only"]),
        lambda: setattr(torch.backends.cudnn, "deterministic", saved["cudnn_deterministic"]),
        lambda: setattr(torch.backends.cudnn, "benchmark", saved["cudnn_benchmark"]),
        lambda: _restore_inductor(saved["inductor_deterministic"]),
    ]
    return steps


def _restore(saved: dict) -> None:
    """Run every rollback step even if one raises (a second Ctrl-C arriving during the rollback), then
    raise the first exception."""
    first: BaseException | None = None
    for step in _restore_steps(saved):
        try:
            step()
        except BaseException as e:  # re-raised below, after the other steps
            first = first or e
    if first is not None:
        raise first


@contextmanager
def apply_mode(name: str | Mode) -> Iterator[ModeState]:
    """Enter determinism mode ``name``; everything it changed is restored on exit, even on error.

    An interrupt (KeyboardInterrupt, or SIGTERM's :class:`bench.errors.Terminated`) at any point inside,
    entering included, leaves every switch as it was on entry and propagates unchanged: the rollback
    reads and writes plain flags only (see :func:`_restore_steps`).

    >>> with apply_mode("torch-det") as state:
    ...     torch.are_deterministic_algorithms_enabled()
    True
    """
    mode = get_mode(name)
    saved = _saved_state(mode)
    cuda_init = bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    try:
        for k, v in mode.env.items():
            os.environ[k] = v
        torch.use_deterministic_algorithms(mode.deterministic_algorithms, warn_only=mode.warn_only)
        torch.backends.cudnn.deterministic = mode.cudnn_deterministic
        torch.backends.cudnn.benchmark = mode.cudnn_benchmark
        fill = torch.are_deterministic_algorithms_enabled() and _fill_flag()
        yield ModeState(mode=mode, cuda_initialised=cuda_init, fill_uninitialized_memory=fill)
    finally:
        _restore(saved)


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch (or a backend) refusing to run deterministically.

    PyTorch raises ``RuntimeError("... does not have a deterministic implementation ...")`` under
    ``use_deterministic_algorithms(True)``; cuBLAS raises one naming ``CUBLAS_WORKSPACE_CONFIG``.
    """
    text = str(exc).lower()
    return "determinis" in text or "cublas_workspace_config" in text


# ------------------------------------------------------------------------------------------------
# the run-wide environment: variables read once per process
# ------------------------------------------------------------------------------------------------

# Variables a mode asks for that take effect only when set before the process first uses what reads
# them: cuBLAS fixes its workspace size at its first call.
RUN_SCOPED_ENV: tuple[str, ...] = ("CUBLAS_WORKSPACE_CONFIG",)


@dataclass(frozen=True)
class RunEnvironment:
    """What :func:`run_environment` put in force for a whole run, per variable of :data:`RUN_SCOPED_ENV`."""

    in_force: dict[str, str | None]         # the value every cell of the run had (None: unset)
    inherited: dict[str, str | None]        # the value before the run (None: unset)
    asked: dict[str, dict[str, str]]        # variable -> {selected mode: the value it asks for}
    set_by_run: dict[str, bool]             # detbench set it (False: inherited value kept, or nobody asked)
    cuda_initialised: bool                  # CUDA was initialised on entry: a CUDA matmul may have run before
    notes: tuple[str, ...] = ()             # modes whose value could not be in force, and why

    def to_dict(self) -> dict:
        return {"in_force": dict(self.in_force), "inherited": dict(self.inherited),
                "asked": {k: dict(v) for k, v in self.asked.items()}, "set_by_run": dict(self.set_by_run),
                "cuda_initialised": self.cuda_initialised, "notes": list(self.notes)}


_RUN_ENVIRONMENTS: list[RunEnvironment] = []  # the active one last; nested entries reuse it


def _decide_run_environment(modes: list[Mode], cuda_init: bool) -> RunEnvironment:
    in_force, inherited, asked, set_by_run, notes = {}, {}, {}, {}, []
    for var in RUN_SCOPED_ENV:
        old = os.environ.get(var)
        wants = {m.name: m.env[var] for m in modes if var in m.env}
        inherited[var], asked[var] = old, wants
        if not wants:
            value, source = old, None
        elif old is not None:
            value, source = old, f"the exported {var}={old}"
        else:
            first = next(iter(wants))
            value, source = wants[first], f"{first}'s {var}={wants[first]}"
        in_force[var], set_by_run[var] = value, bool(wants) and old is None
        for name, v in wants.items():
            if v != value:
                notes.append(f"{name} asks {var}={v}, but one process has one cuBLAS workspace size: every cell of "
                             f"this run used {source}; run {name} without the other modes to measure its own")
    if cuda_init and any(set_by_run.values()):
        notes.append("CUDA was already initialised when the run set these variables: a CUDA matmul before that "
                     "may have fixed cuBLAS's workspace size already")
    return RunEnvironment(in_force, inherited, asked, set_by_run, cuda_init, tuple(notes))


@contextmanager
def run_environment(modes: Iterable[str | Mode] | None = None) -> Iterator[RunEnvironment]:
    """Put the :data:`RUN_SCOPED_ENV` variables the selected modes ask for in force for a whole run.

    Enter it before the run's first CUDA work (``detbench run`` enters it before probing backends); every
    variable comes back to its old value, or is removed again, on exit (in ``finally``). ``modes`` are the
    run's modes (None: all; names that are not modes are ignored here, the plan refuses them). A value
    already exported is kept; otherwise the first mode (in ``modes`` order) that asks for one sets it.
    Nested entries (the harness enters it again around its cells) change nothing and yield the outer record.
    """
    if _RUN_ENVIRONMENTS:
        yield _RUN_ENVIRONMENTS[-1]
        return
    chosen = [get_mode(m) for m in (MODES if modes is None else modes) if isinstance(m, Mode) or m in MODES]
    cuda_init = bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    record = _decide_run_environment(list({m.name: m for m in chosen}.values()), cuda_init)
    saved = {var: os.environ.get(var, _ABSENT) for var in RUN_SCOPED_ENV}
    try:
        for var, value in record.in_force.items():
            if record.set_by_run[var]:
                os.environ[var] = value
        _RUN_ENVIRONMENTS.append(record)
        yield record
    finally:
        if _RUN_ENVIRONMENTS and _RUN_ENVIRONMENTS[-1] is record:
            _RUN_ENVIRONMENTS.pop()
        for var, value in saved.items():
            _set_env(var, value)
