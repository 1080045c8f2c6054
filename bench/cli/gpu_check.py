"""``detbench gpu-check``: the bounded GPU validation script (``bench.gpu_check``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench import gpu_check
from bench.cli import EXIT_SIGINT
from bench.cli.common import UsageError
from bench.errors import SaveError
from bench.gpu_check import DEFAULT_BUDGET_S, FILES, CheckRun, Stage, findings, run_checks, write_summary


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
    run = CheckRun(float(args.budget), args.dry_run)
    try:
        run_checks(out, run)
    except KeyboardInterrupt:
        return report_interrupt(out, run)
    write_summary(out, run)
    print_summary(run.stages, out)
    failed = [s for s in run.stages if s.status.startswith(("failed", "timed out"))]
    return 1 if failed else 0


def report_interrupt(out: Path, run: CheckRun) -> int:
    """Ctrl-C or SIGTERM: the stage that ran is already stopped; write the summary of what finished and
    name exactly the files --out holds. Returns 130 (``bench.cli.main`` makes it 143 for SIGTERM)."""
    problem, mine = "", {"gpu_check.log"} | {s.output for s in run.stages if s.output}
    try:
        write_summary(out, run)
        mine |= {"summary.md", "summary.json"}
    except KeyboardInterrupt:
        problem = "; interrupted again, so the summary was not written"
    except SaveError as e:
        problem = f"; {e}"
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    written = [n for n in present if n in mine]
    earlier = [n for n in present if n not in mine]
    stopped = [s.name for s in run.stages if s.status == "interrupted"]
    print(f"detbench gpu-check: interrupted{' during ' + ', '.join(stopped) if stopped else ''}; "
          f"{out} holds {', '.join(written) or 'nothing'} from this run"
          f"{' and ' + ', '.join(earlier) + ' from an earlier one' if earlier else ''}{problem}",
          file=sys.stderr)
    return EXIT_SIGINT


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "gpu-check", help="the bounded GPU validation script (CUDA tests, run, kernel-bench, sft, pinpoint)",
        description=gpu_check.__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the (at most 8) result files; empty or new")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"total seconds for all stages (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--dry-run", action="store_true", help="run every stage on the CPU with tiny shapes")
    p.set_defaults(func=cmd_gpu_check)
