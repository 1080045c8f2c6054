"""``detbench gpu-check``: the bounded GPU validation script (``bench.gpu_check``)."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench import gpu_check
from bench.cli.common import UsageError
from bench.gpu_check import DEFAULT_BUDGET_S, FILES, Stage, findings, run_checks, write_summary


def print_summary(stages: list[Stage], out: Path) -> None:
    table = Table(title="detbench gpu-check")
    for col in ("stage", "status", "seconds", "limit", "output"):
        table.add_column(col)
    for s in stages:
        colour = "green" if s.status == "ok" else "yellow" if s.status.startswith("skipped") else "red"
        table.add_row(s.name, f"[{colour}]{escape(s.status)}[/]", f"{s.seconds}", f"{s.limit_s}",
                      escape(s.output or s.note))
    console = Console()
    for line in findings(out):
        console.print(escape(line), highlight=False)
    console.print(table)


def cmd_gpu_check(args) -> int:
    if not args.dry_run and not torch.cuda.is_available():
        raise UsageError("gpu-check needs a CUDA device; use --dry-run to rehearse it on the CPU")
    if args.budget <= 0:
        raise UsageError("--budget must be a positive number of seconds")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror}); choose a writable folder")
    stray = [p.name for p in out.iterdir() if p.name not in FILES]
    if stray:
        raise UsageError(f"--out {out} already holds other files ({', '.join(stray[:3])}); give an empty folder")
    stages, env = run_checks(out, float(args.budget), args.dry_run)
    write_summary(out, stages, env, float(args.budget), args.dry_run)
    print_summary(stages, out)
    failed = [s for s in stages if s.status.startswith(("failed", "timed out"))]
    return 1 if failed else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "gpu-check", help="the bounded GPU validation script (CUDA tests, run, kernel-bench, sft, pinpoint)",
        description=gpu_check.__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the (at most 8) result files; empty or new")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"total seconds for all stages (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--dry-run", action="store_true", help="run every stage on the CPU with tiny shapes")
    p.set_defaults(func=cmd_gpu_check)
