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
from bench.gpu_check import (
    PART_BUDGET_S,
    PARTS,
    CheckRun,
    files,
    findings,
    headline,
    plan,
    run_checks,
    write_summary,
)


def print_summary(run: CheckRun, out: Path) -> None:
    console = Console()
    for line in findings(out):
        console.print(escape(line), highlight=False)
    if run.part == 1:
        answers = Table(title="detbench gpu-check part 1: headline")
        for col in ("question", "answer", "from"):
            answers.add_column(col)
        for q, a, f in headline(out, run.stages):
            answers.add_row(escape(q), escape(a), f)
        console.print(answers)
    table = Table(title=f"detbench gpu-check part {run.part}")
    for col in ("stage", "status", "seconds", "estimate", "limit", "output"):
        table.add_column(col)
    for s in run.stages:
        colour = "green" if s.status == "ok" else "yellow" if s.status.startswith("skipped") else "red"
        table.add_row(s.name, f"[{colour}]{escape(s.status)}[/]", f"{s.seconds}", f"{s.estimate_s}", f"{s.limit_s}",
                      escape(s.output or s.note))
    console.print(table)


def print_plan(parts: list[int], budget_s: float) -> bool:
    """Each part's stages with their GPU estimates and limits; True when every part fits its budget."""
    console, ok = Console(), True
    for part in parts:
        p = plan(part, budget_s)
        ok &= p["fits"]
        verdict = "[green]fits[/]" if p["fits"] else "[red]OVER BUDGET[/]"
        table = Table(title=f"part {part}: {escape(p['title'])}", title_justify="left")
        for col in ("stage", "estimate s", "limit s", "basis"):
            table.add_column(col, overflow="fold")
        for s in p["stages"]:
            table.add_row(s.name, f"{s.estimate_s:.0f}", f"{s.limit_s:.0f}", escape(s.basis))
        table.add_row("[bold]total[/]", f"[bold]{p['estimate_s']:.0f}[/]", f"{budget_s:.0f}", verdict)
        console.print(table)
    return ok


def cmd_gpu_check(args) -> int:
    if args.budget <= 0:
        raise UsageError("--budget must be a positive number of seconds")
    if args.plan:
        return 0 if print_plan(sorted(PARTS), args.budget) else 1
    if not args.dry_run and not torch.cuda.is_available():
        raise UsageError("gpu-check needs a CUDA device; use --dry-run to rehearse it on the CPU, --plan to see its parts")
    if args.out is None:
        raise UsageError("--out is required (a new or empty folder for the part's result files)")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror}); choose a writable folder")
    stray = [p.name for p in out.iterdir() if p.name not in files(args.part)]
    if stray:
        raise UsageError(f"--out {out} already holds other files ({', '.join(stray[:3])}); give an empty folder")
    if args.triton_cache is not None and not any(Path(args.triton_cache).glob("*/__grp__*.json")):
        raise UsageError(f"--triton-cache {args.triton_cache}: no Triton cache there; fill one with "
                         "python -m kernels.aot --targets sm_90a --cache-dir DIR (results/aot/README.md)")
    run = CheckRun(float(args.budget), args.dry_run, args.part, triton_cache=args.triton_cache)
    print_plan([args.part], args.budget)
    try:
        run_checks(out, run)
    except KeyboardInterrupt:
        return report_interrupt(out, run)
    write_summary(out, run)
    print_summary(run, out)
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
    parts = "; ".join(f"{n}: {title.split(':')[0]}" for n, (title, _) in PARTS.items())
    p = subparsers.add_parser(
        "gpu-check", help="the bounded GPU validation script, in parts (CUDA tests, sft, pinpoint, run, kernel-bench)",
        description=gpu_check.__doc__.split("\n\n")[0] + f" Parts: {parts}.")
    p.add_argument("--part", type=int, choices=sorted(PARTS), default=1,
                   help="which part to run, one per device call (default 1: the headline answers)")
    p.add_argument("--out", help="folder for the part's (at most 8) result files; empty or new")
    p.add_argument("--budget", type=float, default=PART_BUDGET_S,
                   help=f"seconds for the part's stages (default {PART_BUDGET_S:.0f}); limits are shared by estimate")
    p.add_argument("--plan", action="store_true",
                   help="print every part's stages with their GPU cost estimates and limits, run nothing; "
                        "exit 1 if a part's estimate exceeds the budget")
    p.add_argument("--dry-run", action="store_true", help="run the part's stages on the CPU with tiny shapes")
    p.add_argument("--triton-cache", metavar="DIR",
                   help="a Triton cache filled ahead of time with the GPU's Triton and Python (python -m kernels.aot "
                        "--cache-dir DIR); relocated, then used by every stage (TRITON_CACHE_DIR)")
    p.set_defaults(func=cmd_gpu_check)
