"""``detbench kernel-bench``: the deterministic kernels timed against what they replace (``bench.kernel_speed``)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.cli.common import UsageError, parse_device
from bench.kernel_speed import SECTIONS, KernelBenchResult, check_json_path, run_kernel_bench, write_json


def print_table(result: KernelBenchResult, console=None) -> None:
    """Timings and ratios as rich tables (numbers rounded for printing only)."""
    console = console or Console()
    env = result.environment
    title = (f"kernel speed on {env.get('device_name')} ({result.device}), {result.shapes['dtype']}"
             f"{', tiny shapes' if result.tiny else ''}")
    t = Table(title=title, caption=escape(result.timer))
    for col in ("section", "phase", "backend", "median ms", "TFLOP/s", "GB/s", "status"):
        t.add_column(col, overflow="fold", justify="right" if col in ("median ms", "TFLOP/s", "GB/s") else "left")
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    last = None
    for x in result.timings:
        if last is not None and x.section != last:
            t.add_section()
        last = x.section
        status = "[green]ok[/]" if x.status == "ok" else f"[yellow]{x.status}: {escape(x.reason or '')}[/]"
        t.add_row(x.section, x.phase, x.backend, fmt(x.median_ms, ".4g"), fmt(x.tflops, ".4g"),
                  fmt(x.gbytes_per_s, ".4g"), status)
    console.print(t)
    r = Table(title="ratios (one interleaved loop per section: median of the per-round ratios [quartiles]; "
                    "~ = wide interval or loaded machine)")
    for col in ("ratio", "kind", "value", "target", "met"):
        r.add_column(col, overflow="fold")
    notes, noisy = [], []
    for x in result.ratios:
        if x.met is not None:
            met = "[green]yes[/]" if x.met else "[red]no[/]"
        elif x.target is None:
            met = ""
        else:
            met = "n/a"
            if x.note and x.note not in notes:
                notes.append(x.note)
        value = fmt(x.value, ".3f")
        if x.value is not None and x.low is not None:
            value += f" [{x.low:.3f}–{x.high:.3f}]"
        if x.noise:
            value += " ~"
            noisy.append(f"{x.name}: {'; '.join(x.noise)}")
        r.add_row(x.name, x.kind, escape(value), x.target or "(context)", met)
    console.print(r)
    for note in notes:
        console.print(f"[dim]n/a: {escape(note)}[/]")
    for line in noisy:
        console.print(f"[dim]~ {escape(line)}[/]")
    if result.tiny:
        console.print("[dim]tiny shapes: proves the code runs; not a speed measurement[/]")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "kernel-bench", help="time the deterministic kernels against their atomic twins, the fastest "
                             "other backend and a device copy",
        description="Time the registry's deterministic kernels (those with an atomic twin) against what "
                    "they replace: their twin, the fastest of the op's other backends in this run "
                    "(attention, matmul) and a device copy (RMSNorm bytes/s); all ratios from one run.",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda if present, else cpu)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny float32 shapes that prove the code runs (automatic on cpu)")
    p.add_argument("--only", help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.set_defaults(func=cmd_kernel_bench)


def cmd_kernel_bench(args) -> int:
    device = parse_device(args.device)
    sections = SECTIONS
    if args.only:
        sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown or not sections:
            raise UsageError(f"--only {args.only!r}: choose sections from {','.join(SECTIONS)}")
    if args.json is not None:
        check_json_path(args.json)  # before measuring: a bad destination costs no benchmark run
    tiny = True if args.tiny or device.type == "cpu" else False
    result = run_kernel_bench(device, tiny=tiny, sections=sections, seed=args.seed)
    print_table(result)
    if args.json is not None:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0
