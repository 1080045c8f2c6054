"""``detbench report``, and the terminal tables that ``detbench run`` prints too."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.cli.common import UsageError
from bench.plots import matplotlib_missing, render_plots
from bench.report import (
    Index,
    agreement_lines,
    cost_rows,
    fmt_ratio,
    fmt_time,
    fmt_times,
    header_lines,
    ratio_notes,
    render_markdown,
)
from bench.results import RunResult, load_run, write_text_atomic


def make_console():
    """A rich console; 160 columns wide when writing to a file or pipe (rich's default is 80)."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


def print_run(res: RunResult, console=None) -> None:
    """Print the tables of ``res`` to a rich console."""
    console = console or make_console()
    ix = Index(res)
    for line in header_lines(res):
        console.print(escape(line), highlight=False)
    for info in res.subjects:
        cells = [c for c in res.cells if c.subject == info.subject]
        if not cells:
            continue
        console.print(_subject_table(ix, info, cells))
        if info.notes:
            console.print(f"[dim]{escape(info.subject)}: {escape(info.notes)}[/]", highlight=False)
    cost = _cost_table(res, ix)
    if cost is not None:
        console.print(cost)
    lines = agreement_lines(res)
    if lines:
        console.print("[bold]cross-backend agreement (repeat 0, bitwise)[/]")
        for line in lines:
            console.print("  " + escape(line), highlight=False)
    for line in res.skipped:
        console.print(f"[dim]not run: {escape(line)}[/]", highlight=False)


def _subject_table(ix: Index, info, cells) -> Table:
    """One subject: a row per cell (backend x dtype x mode); nondeterministic red, batch-variant yellow."""
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in info.shapes.items())
    table = Table(title=f"{info.subject}: {info.primary_op} backends - {shapes}", title_justify="left",
                  show_lines=False, header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col, kw in (("backend", {"no_wrap": True}), ("dtype", {}), ("mode", {"no_wrap": True}),
                    ("run to run", {"overflow": "fold", "ratio": 1, "min_width": 18}),
                    ("batch invariance", {"overflow": "fold", "ratio": 1, "min_width": 18}),
                    ("err vs fp64 (eager)", {"justify": "right", "no_wrap": True}),
                    ("ulp (eager)", {"justify": "right", "no_wrap": True}),
                    ("fwd / bwd / fwd+bwd", {"justify": "right", "no_wrap": True}),
                    ("rate", {"justify": "right", "no_wrap": True})):
        table.add_column(col, **kw)
    last = None
    for c in cells:
        v = ix.view(c, compact=True)
        if last is not None and c.dtype != last:
            table.add_section()
        last = c.dtype
        style = None
        if v.nondeterministic:
            style = "bold red"
        elif v.status in ("refused", "unsupported"):
            style = "dim"
        elif v.status == "error":
            style = "magenta"
        batch = f"[yellow]{escape(v.batch)}[/]" if v.batch_variant else escape(v.batch)
        err = f"[yellow]{v.err}[/]" if v.worse_than_eager else v.err
        times = fmt_times(ix.time(c.subject, c.backend, c.dtype, c.mode, "fwd"),
                          ix.time(c.subject, c.backend, c.dtype, c.mode, "bwd"), v.both_s)
        if v.times_noisy:
            times += " ~"
        table.add_row(v.backend, v.dtype, v.mode, escape(v.run_to_run), batch, f"{err} ({v.eager_err})",
                      v.ulp, times, v.rate, style=style)
    return table


def _cost_table(res: RunResult, ix: Index) -> Table | None:
    """Time under each determinism mode over default, and each det kernel over its atomic twin."""
    rows = cost_rows(ix)
    modes = [m for m in res.settings.modes if m != "default"]
    if rows and (modes or any(r["twin_ratio"] for r in rows)):
        table = Table(title=escape("cost of determinism: fwd+bwd time ratios, interleaved in one loop: median of "
                                   "the per-round ratios [quartiles]; ~ = not a measured difference (see below)"),
                      title_justify="left", header_style="bold", box=box.SIMPLE_HEAD)
        for col in ["subject", "backend", "dtype", "default"] + [f"{m} / default" for m in modes] + ["det / twin"]:
            table.add_column(col, justify="left" if col in ("subject", "backend", "dtype") else "right")
        for r in rows:
            cells = [r["subject"], r["backend"], r["dtype"], fmt_time(r["default_s"])]
            cells += [fmt_ratio(r[m]) for m in modes]
            cells.append(f"{fmt_ratio(r['twin_ratio'])} vs {r['twin']}" if r["twin_ratio"] else "-")
            table.add_row(*cells)
        notes = [ratio_notes(r, modes) for r in rows]
        kinds = Counter(k for n in notes for k in n)
        if kinds:
            why = ", ".join(f"{k} ({n})" for k, n in kinds.most_common())
            table.caption = escape(f"~ in {sum(1 for n in notes if n)} of {len(rows)} rows: {why} (rows per reason; "
                                   f"detbench report FILE --markdown - lists each row's)")
        table.caption_justify = "left"
        return table
    return None


def cmd_report(args: argparse.Namespace) -> int:
    res = load_run(args.file)
    if args.plots is not None:
        missing = matplotlib_missing()
        if missing:
            raise UsageError(f"--plots: {missing}")
        try:
            Path(args.plots).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--plots {args.plots!r}: cannot create the directory ({e.strerror or e}); "
                             f"pass a writable directory") from None
    if args.markdown is not None:
        text = render_markdown(res, json_name=Path(args.file).name)
        if args.markdown == "-":
            print(text)
        else:
            try:
                write_text_atomic(args.markdown, text, exclusive=False)
            except OSError as e:
                raise UsageError(f"--markdown {args.markdown!r}: cannot write ({e.strerror or e}); "
                                 f"pass a writable path or - for stdout") from None
            print(f"markdown: {args.markdown}")
    if args.markdown != "-" and not args.no_table:
        print_run(res)
    if args.plots is not None:
        for p in render_plots(res, args.plots, Path(args.file).stem):
            print(f"plot: {p}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="re-render a stored detbench run result (tables, Markdown, plots)",
                              description="Re-render a results/run-*.json file written by detbench run.")
    p.add_argument("file", help="a result file written by detbench run")
    p.add_argument("--markdown", metavar="PATH", nargs="?", const="-",
                   help="write the Markdown summary to PATH (or stdout with no PATH or -)")
    p.add_argument("--plots", metavar="DIR",
                   help="write PNG plots into DIR, named after FILE: the verdict map, the cost of determinism, "
                        "error vs speed; needs matplotlib")
    p.add_argument("--no-table", action="store_true", help="do not print the tables")
    p.set_defaults(func=cmd_report)
