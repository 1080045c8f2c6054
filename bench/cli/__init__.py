"""The ``detbench`` command line."""

from __future__ import annotations

import argparse
import json
import sys


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def check_kernels_package() -> None:
    """Refuse to run when ``import kernels`` is PyPI's unrelated ``kernels`` package, not detbench's."""
    try:
        import kernels
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
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(text: str | None):
    import torch

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


def cmd_list(args) -> int:
    from qwen_layers.registry import OPS, REGISTRY

    device = parse_device(args.device)
    rows = []
    for b in REGISTRY.backends():
        reason = b.why_not(device)
        rows.append({
            "op": b.op, "backend": b.name, "available": reason is None, "reason": reason,
            "deterministic_claim": b.deterministic, "twin": b.twin, "origin": b.origin,
            "description": b.description,
        })
    if args.json:
        json.dump({"device": str(device), "ops": OPS, "backends": rows}, sys.stdout, indent=2)
        print()
        return 0

    from rich.console import Console
    from rich.table import Table

    from rich.markup import escape

    table = Table(title=f"detbench backends on {device}", show_lines=False)
    cols = ("op", "backend", "status", "claims") + (("description",) if args.verbose else ())
    for col in cols:
        table.add_column(col, overflow="fold")
    claim = {True: "deterministic", False: "nondeterministic", None: "depends"}
    last_op = None
    for r in rows:
        status = "[green]available[/]" if r["available"] else f"[yellow]{escape(r['reason'])}[/]"
        op = r["op"] if r["op"] != last_op else ""
        if r["op"] != last_op and last_op is not None:
            table.add_section()
        last_op = r["op"]
        cells = [op, r["backend"], status, claim[r["deterministic_claim"]]]
        table.add_row(*cells, *([escape(r["description"])] if args.verbose else []))
    Console().print(table)
    return 0


# Subcommands defined in other modules: each module has add_parser(subparsers), which registers
# its subcommand with set_defaults(func=...). The func raises UsageError for bad input.
COMMAND_MODULES: tuple[str, ...] = (
    "bench.harness", "bench.report", "bench.sft", "bench.pinpoint", "bench.kernel_speed", "bench.gpu_check",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detbench",
        description="Measure run-to-run determinism, batch invariance, accuracy and speed of every "
                    "implementation of every Qwen op.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p_list = sub.add_parser("list", help="table of ops x backends and whether each runs here")
    p_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_list.add_argument("-v", "--verbose", action="store_true", help="add a description column")
    p_list.add_argument("--device", help="device to check availability on (default: cuda if present, else cpu)")
    p_list.set_defaults(func=cmd_list)

    import importlib

    for modname in COMMAND_MODULES:
        importlib.import_module(modname).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_kernels_package()
        return args.func(args)
    except UsageError as e:
        print(f"detbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detbench {args.command}: interrupted; nothing partial was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
