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
  but PyTorch reads the workspace *size* once per process. To measure a workspace size faithfully,
  export the variable before starting detbench (the result's environment records it).
* ``FLASH_ATTENTION_DETERMINISTIC`` is read by transformers' flash-attention integration, not by the
  ``flash_attn`` package; detbench's flash-attn backends take their ``deterministic`` flag from the
  registry entry (``flash-attn`` vs ``flash-attn-det``), so this variable does not change them.

Nothing here runs at import time; only entering :func:`apply_mode` changes global state.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

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

    def to_dict(self) -> dict:
        return {
            "name": self.name, "description": self.description,
            "deterministic_algorithms": self.deterministic_algorithms, "warn_only": self.warn_only,
            "cudnn_deterministic": self.cudnn_deterministic, "cudnn_benchmark": self.cudnn_benchmark,
            "env": dict(self.env),
        }


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


def determinism_state() -> dict:
    """The current values of every switch a mode touches (for results and for tests)."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
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
        yield ModeState(mode=mode, cuda_initialised=cuda_init)
    finally:
        _restore(saved)


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch (or a backend) refusing to run deterministically.

    PyTorch raises ``RuntimeError("... does not have a deterministic implementation ...")`` under
    ``use_deterministic_algorithms(True)``; cuBLAS raises one naming ``CUBLAS_WORKSPACE_CONFIG``.
    """
    text = str(exc).lower()
    return "determinis" in text or "cublas_workspace_config" in text
