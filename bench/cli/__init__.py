"""The ``detbench`` command line: one module per command, on top of the library.

Each command module has ``add_parser(subparsers)``, which registers its subcommand with
``set_defaults(func=...)``; ``func(args)`` parses the arguments, calls the library and prints. Bad input
anywhere (:class:`bench.errors.InputError`, of which :class:`UsageError` is the CLI's own kind) is
printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bench.cli.common import UsageError, check_kernels_package, parse_device
from bench.errors import InputError

__all__ = ["main", "build_parser", "UsageError", "parse_device"]

# The command modules, in the order `detbench --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "bench.cli.listing", "bench.cli.run", "bench.cli.report", "bench.cli.sft", "bench.cli.pinpoint",
    "bench.cli.kernel_bench", "bench.cli.gpu_check",
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
        importlib.import_module(modname).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_kernels_package()
        return args.func(args)
    except InputError as e:
        print(f"detbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detbench {args.command}: interrupted; nothing partial was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
