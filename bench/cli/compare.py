"""``detbench compare A.json B.json``: two stored results side by side (``bench.result_diff``).

Exit status 1 when some cell's verdict got worse in B (for CI: did a driver or torch upgrade break
determinism?), 0 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json

from rich import box
from rich.markup import escape
from rich.table import Table

from bench.cli.common import UsageError
from bench.cli.report import make_console
from bench.result_diff import (
    BETTER,
    DEFAULT_TIME_THRESHOLD,
    WORSE,
    ResultDiff,
    Section,
    diff_results,
    fmt_seconds,
    fmt_time_change,
    fmt_time_ratio,
    header_lines,
    load_result_file,
    one_side_lines,
    render_markdown,
    summary_line,
)
from bench.results import to_json

PHASES = ("fwd", "bwd", "fwd+bwd")
_CHANGE_STYLE = {WORSE: "bold red", BETTER: "green", "changed": "yellow"}


def _verdicts(c) -> str:
    """``identical`` when unchanged, ``identical → batch-variant`` when not (the results' words follow the
    table)."""
    return c.a if c.change == "same" else f"{c.a} → {c.b}"


def _section_table(diff: ResultDiff, s: Section, rows: list) -> Table:
    table = Table(title=f"{s.title}: A → B", title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                  padding=(0, 1))
    for name in s.key_names:
        table.add_column(name, no_wrap=True)
    table.add_column("verdict", overflow="fold", min_width=13)
    table.add_column("change", no_wrap=True)
    table.add_column(s.error_name, overflow="fold", min_width=18)
    if diff.kind == "run":
        table.add_column(f"{diff.time_phase} A → B", justify="right", no_wrap=True)
        table.add_column(escape("B/A [range]"), justify="right", no_wrap=True)
        table.add_column("time", overflow="fold", min_width=6)
    for c in rows:
        style = _CHANGE_STYLE.get(c.change)
        change = f"[{style}]{c.change}[/]" if style else c.change
        if c.notes:
            change += f" ({escape(', '.join(c.notes))})"
        error = f"[yellow]{escape(c.error_text)}[/]" if c.error_change not in ("same", "-") else escape(c.error_text)
        cells = [*map(escape, c.key), escape(_verdicts(c)), change, error]
        if diff.kind == "run":
            moved = c.time is not None and c.time.change != "same"
            change = escape(fmt_time_change(c.time))
            cells += [fmt_seconds(c.time), fmt_time_ratio(c.time), f"[yellow]{change}[/]" if moved else change]
        table.add_row(*cells)
    return table


def print_diff(diff: ResultDiff, only_changed: bool, console=None) -> None:
    console = console or make_console()
    for line in header_lines(diff):
        console.print(escape(line), highlight=False)
    for s in diff.sections:
        rows = [c for c in s.cells if c.a is not None and c.b is not None and (c.interesting() or not only_changed)]
        if rows:
            console.print(_section_table(diff, s, rows))
        elif any(c.a is not None and c.b is not None for c in s.cells):
            console.print(f"{s.title}: nothing changed", highlight=False)
        for c in rows:
            if c.change != "same":
                console.print(escape(f"{' '.join(c.key)}: A {c.a_text}; B {c.b_text}"), highlight=False)
        for line in one_side_lines(s):
            console.print(escape(line), highlight=False)
    style = "bold red" if diff.worse() else "bold"
    console.print(f"[{style}]{escape(summary_line(diff))}[/]", highlight=False)


def cmd_compare(args: argparse.Namespace) -> int:
    if args.time_threshold < 0:
        raise UsageError(f"--time-threshold {args.time_threshold:g}: give a fraction >= 0, e.g. 0.1 for 10%")
    a, b = load_result_file(args.a), load_result_file(args.b)
    diff = diff_results(a, b, a_path=args.a, b_path=args.b, time_phase=args.phase,
                        time_threshold=args.time_threshold)
    if args.json:
        payload = to_json(diff)
        if args.only_changed:
            for section, record in zip(payload["sections"], diff.sections):
                section["cells"] = [c for c, d in zip(section["cells"], record.cells) if d.interesting()]
        payload["worse"] = len(diff.worse())
        payload["summary"] = summary_line(diff)
        print(json.dumps(payload, indent=1, allow_nan=False))
    elif args.markdown:
        print(render_markdown(diff, only_changed=args.only_changed))
    else:
        print_diff(diff, args.only_changed)
    return 1 if diff.worse() else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="two stored results side by side: verdict, error and time changes (exit 1 if worse)",
        description="Compare two results of detbench run (cell by cell) or of detbench sft (configuration and "
                    "setup by setup), e.g. before and after a driver or torch upgrade. Exit status 1 when a "
                    "verdict got worse in B (identical -> batch-variant -> nondeterministic, or a measured cell "
                    "that became not comparable, refused, unsupported or failed), 0 otherwise, 2 on bad input.")
    p.add_argument("a", metavar="A.json", help="the baseline result (before)")
    p.add_argument("b", metavar="B.json", help="the result to check against it (after)")
    p.add_argument("--only-changed", action="store_true",
                   help="show only cells whose verdict, error, loss curve or time changed (cells on one side only "
                        "are always listed)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print Markdown instead of the terminal tables")
    fmt.add_argument("--json", action="store_true", help="print the comparison as JSON instead of the tables")
    p.add_argument("--time-threshold", type=float, default=DEFAULT_TIME_THRESHOLD, metavar="FRACTION",
                   help=f"a time counts as changed only when its whole range (q1 B/q3 A to q3 B/q1 A) lies beyond "
                        f"1 +- FRACTION (default {DEFAULT_TIME_THRESHOLD:g}: 10%%)")
    p.add_argument("--phase", choices=PHASES, default="fwd+bwd",
                   help="which timed phase of detbench run cells to compare (default fwd+bwd)")
    p.set_defaults(func=cmd_compare)
