"""The ``detbench`` command line: one module per command, on top of the library.

Each command module has ``add_parser(subparsers)``, which registers its subcommand with
``set_defaults(func=...)``; ``func(args)`` parses the arguments, calls the library and prints. The commands
that take backends (``IMPORT_COMMANDS``) get ``--import MODULE`` here, and the modules it and
``$DETBENCH_IMPORT`` name are imported before ``func`` runs (``bench.plugins``). Bad input
anywhere (:class:`bench.errors.InputError`, of which :class:`UsageError` is the CLI's own kind) is
printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
from typing import Iterator

from bench.cli.common import (
    IMPORT_COMMANDS,
    UsageError,
    add_import_option,
    check_kernels_package,
    load_imports,
    parse_device,
    pause_point,
)
from bench.errors import InputError, SaveError, Terminated

__all__ = ["main", "build_parser", "UsageError", "parse_device"]

# The command modules, in the order `detbench --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "bench.cli.listing", "bench.cli.run", "bench.cli.report", "bench.cli.sft", "bench.cli.generate",
    "bench.cli.pinpoint", "bench.cli.kernel_bench", "bench.cli.gpu_check",
    "bench.cli.compare",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detbench",
        description="Measure run-to-run determinism, batch invariance, accuracy and speed of every "
                    "implementation of every Qwen op.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for modname in COMMAND_MODULES:
        pause_point(f"import-{modname}")
        importlib.import_module(modname).add_parser(sub)
    for name in IMPORT_COMMANDS:  # every command that takes backends can import the module registering them
        add_import_option(sub.choices[name])
    return p


# Exit statuses of an interrupted command: 128 + the signal number, as a shell reports them.
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class Signals:
    """What a command received while :func:`sigterm_as_interrupt` was active."""

    def __init__(self) -> None:
        self.terminated = False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[Signals]:
    """While the block runs, SIGTERM (what ``timeout``, schedulers and containers send) raises
    :class:`bench.errors.Terminated`, a ``KeyboardInterrupt``: every command saves its finished work
    for it as it does for Ctrl-C. The previous handler is put back in ``finally``. Only the main
    thread can install signal handlers; elsewhere (a command called from a worker thread) nothing
    changes."""
    received = Signals()

    def handler(signum, frame):
        received.terminated = True
        raise Terminated(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input: one line, exit 2. A failed save: one line naming the file, exit 1.
    SIGINT / SIGTERM at any point after this is entered (even while torch is being imported): one line,
    exit 130 / 143; a command that saved its finished work (marked interrupted) says so itself."""
    received = Signals()
    name = "detbench"
    try:
        with sigterm_as_interrupt() as received:
            pause_point("start")
            args = build_parser().parse_args(argv)  # imports the command modules, and torch with them
            name = f"detbench {args.command}"
            check_kernels_package()
            if hasattr(args, "imports"):  # before the command checks any backend name
                load_imports(args)
            status = args.func(args)
    except InputError as e:
        print(f"detbench: error: {e}", file=sys.stderr)
        return 2
    except SaveError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        signame = "SIGTERM" if received.terminated else "SIGINT"
        print(f"{name}: interrupted ({signame}); nothing partial was written", file=sys.stderr)
        return EXIT_SIGTERM if received.terminated else EXIT_SIGINT
    # A command that saved its finished work on an interrupt returns EXIT_SIGINT; say which signal it was.
    return EXIT_SIGTERM if status == EXIT_SIGINT and received.terminated else status


if __name__ == "__main__":
    sys.exit(main())
