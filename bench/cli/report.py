"""``detbench report``, and the terminal tables that ``detbench run`` prints too."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

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
    wrap_clauses,
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
    for line in header_lines(res):  # cut after commas, so that a cell the status line names stays on one line
        for part in wrap_clauses([line], console.width):
            console.print(escape(part), highlight=False, soft_wrap=True)
    for info in res.subjects:
        cells = [c for c in res.cells if c.subject == info.subject]
        if not cells:
            continue
        console.print(subject_view(ix, info, cells, console.width))
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


# The narrowest a verdict column gets before a subject's cells are printed one block each instead of a table.
MIN_VERDICT_WIDTH = 22


def _row_style(v) -> str | None:
    if v.nondeterministic:
        return "bold red"
    if v.status in ("refused", "unsupported"):
        return "dim"
    return "magenta" if v.status == "error" else None


def _times(ix: Index, c, v) -> str:
    times = fmt_times(ix.time(c.subject, c.backend, c.dtype, c.mode, "fwd"),
                      ix.time(c.subject, c.backend, c.dtype, c.mode, "bwd"), v.both_s)
    return times + " ~" if v.times_noisy else times


def _ulp(text: str, before_eager: str) -> str:
    """``25.9 (25.1)`` (a view's ulp column) as ``25.9 ulp (25.1)`` or ``25.9 (eager 25.1)``."""
    value, sep, eager = text.partition(" (")
    if not sep:
        return text
    return f"{value} ulp ({eager}" if before_eager == "ulp " else f"{value} (eager {eager}"


def _verdict_text(clauses: list[str], width: int, style: str | None = None) -> str:
    text = escape("\n".join(wrap_clauses(clauses, width)))
    return f"[{style}]{text}[/]" if style else text


def _subject_table(ix: Index, info, cells, width: int, stacked: int = 0) -> Table:
    """One subject: a row per cell (backend x dtype x mode); nondeterministic red, batch-variant yellow. Every
    column is no_wrap: the verdicts are cut into lines by :func:`bench.report.wrap_clauses` at ``width``,
    never by rich (which breaks at any space and drops columns that do not fit). For narrower consoles,
    ``stacked`` 1: the error and its ulp share a column, and so do the times and the rate (two lines
    each); 2: also the backend over the dtype and mode."""
    stacked_numbers = stacked >= 1
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in info.shapes.items())
    table = Table(title=f"{info.subject}: {info.primary_op} backends - {shapes}", title_justify="left",
                  show_lines=False, header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 1))
    numbers = ((("err vs fp64 (eager)\nulp (eager)", {"justify": "right"}),
                ("fwd / bwd / fwd+bwd\nrate", {"justify": "right"})) if stacked_numbers else
               (("err vs fp64 (eager)", {"justify": "right"}), ("ulp (eager)", {"justify": "right"}),
                ("fwd / bwd / fwd+bwd", {"justify": "right"}), ("rate", {"justify": "right"})))
    names = (("backend\ndtype mode", {}),) if stacked >= 2 else (("backend", {}), ("dtype", {}), ("mode", {}))
    for col, kw in (*names, ("run to run", {}), ("batch invariance", {}), *numbers):
        table.add_column(col, no_wrap=True, **kw)
    last = None
    for c in cells:
        v = ix.view(c)
        if last is not None and c.dtype != last:
            table.add_section()
        last = c.dtype
        err = f"[yellow]{v.err}[/]" if v.worse_than_eager else v.err
        values = [f"{err} ({v.eager_err})", v.ulp, _times(ix, c, v), v.rate]
        if stacked_numbers:
            values = [f"{values[0]}\n{_ulp(v.ulp, 'ulp ')}", f"{values[2]}\n{v.rate}"]
        label = [f"{v.backend}\n{v.dtype} {v.mode}"] if stacked >= 2 else [v.backend, v.dtype, v.mode]
        table.add_row(*label, _verdict_text(v.run_to_run_clauses, width),
                      _verdict_text(v.batch_clauses, width, "yellow" if v.batch_variant else None),
                      *values, style=_row_style(v))
    return table


def _subject_blocks(ix: Index, info, cells, width: int) -> Group:
    """One subject for a console too narrow for its table: a block of labelled lines per cell, the verdicts
    cut by :func:`bench.report.wrap_clauses` to fit."""
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in info.shapes.items())
    label_w = len("fwd/bwd/fwd+bwd")
    value_w = max(MIN_VERDICT_WIDTH // 2, width - label_w - 6)
    lines = [Text(f"{info.subject}: {info.primary_op} backends - {shapes}", style="italic")]
    for c in cells:
        v = ix.view(c)
        style = _row_style(v)
        lines.append(Text(f"  {v.backend} {v.dtype} {v.mode}", style=f"bold {style}" if style else "bold"))
        fields = (("run to run", v.run_to_run_clauses, style),
                  ("batch", v.batch_clauses, "yellow" if v.batch_variant else style),
                  ("err vs fp64", [f"{v.err} (eager {v.eager_err})"], "yellow" if v.worse_than_eager else style),
                  ("max ulp", [_ulp(v.ulp, "(eager ")], style),
                  ("fwd/bwd/fwd+bwd", [_times(ix, c, v)], style), ("rate", [v.rate], style))
        for label, clauses, field_style in fields:
            for i, line in enumerate(wrap_clauses(clauses, value_w)):
                lines.append(Text(f"    {label if i == 0 else '':>{label_w}}  ") + Text(line, style=field_style or ""))
    return Group(*lines)


def subject_view(ix: Index, info, cells, width: int):
    """A subject's table when it fits ``width`` columns with verdict columns at least MIN_VERDICT_WIDTH wide
    (as wide as the longest verdict clause when there is room; the numbers, then the names, two lines a cell
    if that is what it takes), else :func:`_subject_blocks`."""
    console = Console(width=100_000)  # measuring: Measurement.get clamps to the console's width
    views = [ix.view(c) for c in cells]
    widest = max((len(x) for v in views for x in v.run_to_run_clauses + v.batch_clauses), default=0)
    def fits(verdict_w: int, stacked_numbers: bool) -> Table | None:
        table = _subject_table(ix, info, cells, verdict_w, stacked)
        return table if Measurement.get(console, console.options, table).maximum <= width else None

    for stacked in (0, 1, 2):
        best = fits(MIN_VERDICT_WIDTH, stacked)
        if best is None:
            continue
        lo, hi = MIN_VERDICT_WIDTH, max(widest, MIN_VERDICT_WIDTH)  # the widest verdict width that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            table = fits(mid, stacked)
            lo, hi, best = (mid, hi, table) if table is not None else (lo, mid - 1, best)
        return best
    return _subject_blocks(ix, info, cells, width)


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
