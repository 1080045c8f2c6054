"""``detbench list``: every implementation of every op, and whether it runs here."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.cli.common import parse_device
from qwen_layers.registry import OPS, REGISTRY


def cmd_list(args) -> int:
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


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="table of ops x backends and whether each runs here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("-v", "--verbose", action="store_true", help="add a description column")
    p.add_argument("--device", help="device to check availability on (default: cuda if present, else cpu)")
    p.set_defaults(func=cmd_list)
