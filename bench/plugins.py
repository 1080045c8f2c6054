"""User kernels on the command line: the modules to import before a command looks backends up by name.

A backend is registered by a call to ``qwen_layers.registry.register``, which has to run before
``detbench run --backends mine`` checks the name. Two ways get a user's registration run:

* ``--import MODULE`` on every command that takes backends (repeatable, or comma-separated), and
  ``DETBENCH_IMPORT=MODULE[,MODULE...]`` in the environment (commas or ``os.pathsep`` between names) for
  the same commands. Each module is imported the way ``python -m`` finds one: the current directory
  first, then ``sys.path``; its import registers its backends::

      detbench run --import mykernels --backends mine --subjects rmsnorm --quick

* an installed package's entry point in the group ``detbench.backends`` (see
  ``qwen_layers.registry.ENTRY_POINT_GROUP``), which the registry loads itself the first time it is
  read, so its backends appear in ``detbench list`` and everywhere else with no option at all.

What a command records (``detbench run``'s result, sft and pinpoint files) names every imported module as
an explicit ``--import``, those from ``DETBENCH_IMPORT`` included, so the recorded command re-runs as
written. A module that cannot be imported, or an installed entry point that fails, is one
:class:`PluginError` (an :class:`bench.errors.InputError`: one line, exit 2) naming it and the fix.

Usage::

    names = requested(["mykernels"])    # --import values, then $DETBENCH_IMPORT's; duplicates dropped
    load(names)                         # import them, load the entry points; PluginError if one fails
    import_options(names)               # ["--import", "mykernels"]: for a recorded command line
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from bench.errors import InputError
from qwen_layers import registry

__all__ = ["ENV", "PluginError", "requested", "from_environment", "load", "import_modules", "import_options"]

ENV = "DETBENCH_IMPORT"
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class PluginError(InputError):
    """A module named by --import / DETBENCH_IMPORT, or an installed entry point, could not be loaded."""


def _split(text: str, seps: str) -> list[str]:
    return [p.strip() for p in re.split("[" + re.escape(seps) + "]", text) if p.strip()]


def _check_name(name: str, source: str) -> str:
    if _MODULE_NAME.match(name) and not name.endswith(".py"):
        return name
    hint = ""
    if name.endswith(".py"):
        hint = f" (for the file {name}: {Path(name).stem}, run from the folder that holds it)"
    raise PluginError(f"{source} {name!r}: not a module name; write a dotted module name such as "
                      f"mypackage.kernels{hint}")


def from_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """The module names in ``$DETBENCH_IMPORT`` (commas or ``os.pathsep`` between them), checked."""
    text = (os.environ if environ is None else environ).get(ENV, "")
    return [_check_name(n, f"{ENV}:") for n in _split(text, "," + os.pathsep)]


def requested(cli: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The modules a command imports: the ``--import`` values (each may be comma-separated), then
    ``$DETBENCH_IMPORT``'s, each once, in that order."""
    names = [_check_name(n, "--import") for v in (cli or ()) for n in _split(v, ",")]
    if cli and not names:
        raise PluginError("--import was given an empty name; name a module or leave --import out")
    return list(dict.fromkeys(names + from_environment(environ)))


def _source(name: str) -> str:
    """How the user named ``name``, for messages: ``--import NAME`` or ``DETBENCH_IMPORT: NAME``."""
    try:
        from_env = name in from_environment()
    except PluginError:
        from_env = False
    return f"{ENV}: {name}" if from_env else f"--import {name}"


@contextlib.contextmanager
def _cwd_first() -> Iterator[None]:
    """The current directory at the front of ``sys.path`` for the block (as ``python -m`` has it), then
    removed again in ``finally`` if it was not there before."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _where(e: BaseException) -> str:
    """`` at file:line`` of the innermost frame of ``e``'s traceback in a real file (not importlib's frozen
    machinery), or ""."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<")]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


def import_modules(names: Sequence[str]) -> None:
    """Import each module (current directory first); :class:`PluginError` naming the first that fails."""
    with _cwd_first():
        for name in names:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                    raise PluginError(
                        f"{_source(name)}: no module {e.name!r} in the current directory ({os.getcwd()}) or on "
                        f"sys.path; run detbench from the folder that holds {e.name.replace('.', '/')}.py, add "
                        f"that folder to PYTHONPATH, or pip install the package that provides it") from None
                raise PluginError(f"{_source(name)}: importing it failed{_where(e)}: ModuleNotFoundError: {e}; "
                                  f"install what it needs") from None
            except Exception as e:  # the module's own error, in one line
                text = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise PluginError(f"{_source(name)}: importing it raised {type(e).__name__}{_where(e)}"
                                  f"{': ' + text if text else ''}; fix the module (python -c 'import {name}' "
                                  f"shows the traceback)") from None


def load(names: Sequence[str]) -> list[str]:
    """Read the registry once, so that installed ``detbench.backends`` entry points load now (a failing one
    is a :class:`PluginError`, not a traceback later), then import ``names``. Returns ``names``."""
    try:
        registry.REGISTRY.backends()  # first: a user module's register() call would meet the failure inside
    except registry.PluginLoadError as e:
        raise PluginError(str(e)) from None
    import_modules(names)
    return list(names)


def import_options(names: Sequence[str]) -> list[str]:
    """``["--import", name, ...]``: the options that make a recorded command import ``names`` again."""
    return [x for name in names for x in ("--import", name)]
