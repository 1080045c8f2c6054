"""What every command shares: the usage error, the kernels-package check, device and list options, the
``--import`` option of the commands that take backends, and the test hook :func:`pause_point`.

Nothing here imports torch at import time (``parse_device`` does, when called): ``bench.cli`` imports this
module before ``main()`` is running, and an interrupt that arrives during ``import torch`` must land inside
``main()``, which turns it into one line and exit 130.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from bench.errors import InputError


class UsageError(InputError):
    """Bad input from the user: printed as one line, exit status 2."""


def check_kernels_package() -> None:
    """Refuse to run when ``import kernels`` is PyPI's unrelated ``kernels`` package, not detbench's."""
    try:
        import kernels  # in here: this is the check that the package is ours, with a message if not
    except ImportError as e:
        raise UsageError(f"cannot import detbench's 'kernels' package ({e}); reinstall detbench: pip install -e .")
    if not getattr(kernels, "__detbench__", False):
        where = getattr(kernels, "__file__", None) or list(getattr(kernels, "__path__", []))
        raise UsageError(
            f"'import kernels' resolves to {where}, which is not detbench's kernels package (PyPI has an "
            f"unrelated package of that name). Install detbench into its own virtual environment: "
            f"python -m venv .venv && . .venv/bin/activate && pip install -e ."
        )


def default_device() -> str:
    import torch  # in here: see the module docstring

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(text: str | None):
    """``--device`` as a ``torch.device`` (cpu or cuda); UsageError otherwise."""
    import torch  # in here: see the module docstring

    name = text or default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r} is not supported; use cpu or cuda")
    return device


def split_list(values: list[str] | None, option: str) -> list[str] | None:
    """``--x a,b --x c`` -> [a, b, c] (None when the option was not given; an empty list is refused)."""
    if values is None:
        return None
    out = []
    for v in values:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    if not out:
        raise UsageError(f"{option} was given an empty list; name at least one item or leave {option} out")
    return out


# The commands whose arguments name backends (or list them): each takes --import MODULE (bench.plugins).
IMPORT_COMMANDS = ("list", "run", "sft", "pinpoint", "kernel-bench")


def add_import_option(p) -> None:
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="import MODULE first, so that the backends it registers can be named (repeatable or "
                        "comma-separated; also $DETBENCH_IMPORT, names separated by commas); the current "
                        "directory is searched first. Installed packages' detbench.backends entry points load "
                        "without it")


def load_imports(args) -> list[str]:
    """Import what ``--import`` and ``$DETBENCH_IMPORT`` name, after loading the registry's entry points
    (``bench.plugins.load``): before any backend name is checked. Returns the modules imported."""
    from bench import plugins  # in here: it imports torch (see the module docstring)

    return plugins.load(plugins.requested(args.imports))


def recorded_argv(args) -> list[str]:
    """The command line to record in a result: ``sys.argv``, plus an explicit ``--import`` for each module
    that came from ``$DETBENCH_IMPORT``, so that the recorded command re-runs as written."""
    from bench import plugins  # in here: it imports torch (see the module docstring)

    given = plugins.requested(getattr(args, "imports", None), environ={})
    return list(sys.argv) + plugins.import_options([m for m in plugins.from_environment() if m not in given])


def one_value(value: str, option: str, command: str) -> str:
    """Refuse a comma-separated list where ``command`` runs one configuration at a time."""
    if "," in str(value):
        raise UsageError(f"{option} takes one value in detbench {command}, got {value!r}; run one configuration "
                         f"at a time")
    return value


# ------------------------------------------------------------------------------------------------
# progress of long runs
# ------------------------------------------------------------------------------------------------


def eta_seconds(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left at the mean pace of the finished items: ``elapsed / done * (total - done)``; None
    before the first item has finished (no pace yet)."""
    if done <= 0 or total is None:
        return None
    return max(0.0, elapsed / done * (total - done))


def fmt_duration(seconds: float | None) -> str:
    """``m:ss`` or ``h:mm:ss``; ``-:--`` for an unknown duration."""
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class EtaColumn(ProgressColumn):
    """``ETA m:ss``: the time left at the mean pace of the finished items of the task (rich's own
    TimeRemainingColumn uses the pace of the last 30 s, which is no pace at all when one item takes
    longer than that)."""

    def render(self, task) -> Text:
        if task.finished:
            return Text("")
        return Text(f"ETA {fmt_duration(eta_seconds(task.elapsed or 0.0, int(task.completed), task.total))}",
                    style="progress.remaining")


def make_progress(console: Console, *, disable: bool = False) -> Progress:
    """The progress bar every command shows: description, bar, done/total, elapsed, ETA. Transient: gone
    once the block ends. Shows nothing when ``console`` is not a terminal (see :func:`progress_line`)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    EtaColumn(), console=console, transient=True, disable=disable)


def progress_line(done: int, total: int, elapsed: float, what: str) -> str:
    """One line per finished item, for output that is not a terminal (where a progress bar shows
    nothing): ``[done/total] what (elapsed m:ss, ETA m:ss)``."""
    eta = eta_seconds(elapsed, done, total)
    return f"[{done}/{total}] {what} (elapsed {fmt_duration(elapsed)}, ETA {fmt_duration(eta)})"


# ------------------------------------------------------------------------------------------------
# commands to run next
# ------------------------------------------------------------------------------------------------


def command_text(argv: list[str]) -> str:
    """``argv`` as one shell line (quoted where needed)."""
    return shlex.join(str(a) for a in argv)


def with_option(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option`` set to ``value``: every occurrence (``--opt v``, ``--opt=v``, or an
    abbreviation argparse accepts, at least ``--xy``) replaced by one ``option value`` at the place of
    the first; appended when absent."""
    out: list[str] = []
    placed = False
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name.startswith("--") and len(name) >= 4 and option.startswith(name):
            if not placed:
                out += [option, value]
                placed = True
            i += 1 if "=" in a else 2
            continue
        out.append(a)
        i += 1
    return out if placed else [*out, option, value]


def coverage_lines(coverage: dict, gpu_command: list[str]) -> list[str]:
    """The lines under a clean CPU verdict: what the run exercised, what only a GPU can (``coverage`` from
    :func:`bench.coverage.device_coverage`), and the command that runs the same on a GPU."""
    return [f"on the CPU, exercised: {'; '.join(coverage['exercised'])}.",
            f"not exercised, they exist only on a GPU: {'; '.join(coverage['not_exercised'])}.",
            f"run the same on a GPU: {command_text(gpu_command)}"]


# Test hook: stop at a named point until a signal arrives, so a test can send SIGINT/SIGTERM at a point it
# chooses instead of after a guessed delay. Points: "start" (first thing in main(), before the parser and
# torch are imported), "import-MODULE" (build_parser(), before importing command module MODULE, e.g.
# import-bench.cli.run), "after-cell-N" (detbench run, once N cells are recorded), "after-config-N"
# (detbench sft, once N configurations finished and were printed) and "after-batch-N" (detbench generate,
# once N batches ran in every mode).
PAUSE_ENV = "DETBENCH_TEST_PAUSE"           # the point to stop at
PAUSE_MARKER_ENV = "DETBENCH_TEST_PAUSE_MARKER"  # file written on arrival; the test waits for it to appear
PAUSE_LIMIT_S = 60.0


def pause_point(name: str) -> None:
    """When ``$DETBENCH_TEST_PAUSE`` is ``name``: write ``$DETBENCH_TEST_PAUSE_MARKER`` and sleep in short
    steps until a signal handler raises (KeyboardInterrupt for SIGINT, Terminated for SIGTERM); after
    PAUSE_LIMIT_S seconds without one, go on. Does nothing otherwise."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while time.monotonic() < deadline:
        time.sleep(0.01)  # a signal's handler runs (and raises) as soon as the sleep returns
    print(f"detbench: {PAUSE_ENV}={name}: no signal came within {PAUSE_LIMIT_S:.0f} s; going on", file=sys.stderr)
