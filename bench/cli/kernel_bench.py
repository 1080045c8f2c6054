"""``detbench kernel-bench``: the deterministic kernels timed against what they replace (``bench.kernel_speed``)."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Mapping

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.cli.common import UsageError, command_text, parse_device, recorded_argv
from bench.kernel_speed import SECTIONS, KernelBenchResult, check_json_path, run_kernel_bench, write_json
from kernels._common import INTERPRET, interpreter_conflict

# Set in the environment of the process kernel-bench re-executes under the Triton interpreter: a process
# that finds it never re-executes again.
REEXEC_ENV = "DETBENCH_INTERPRETER_REEXEC"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def interpreter_reexec(device_type: str, environ: Mapping[str, str], *, interpreted: bool,
                       triton_version: str | None, numpy_version: str | None) -> tuple[bool, str | None]:
    """Whether kernel-bench on ``device_type`` should re-execute itself with ``TRITON_INTERPRET=1`` (the
    Triton kernels only run on a CPU through the interpreter, which must be on before they are defined),
    and the one line to print about it (None: nothing to say).

    Not on CUDA, not when the kernels already are interpreted, not without triton, not when the user set
    TRITON_INTERPRET to something else, not when this process is already the re-executed one
    (``$DETBENCH_INTERPRETER_REEXEC``), and not when this triton's interpreter breaks on this numpy
    (:func:`kernels._common.interpreter_conflict`).
    """
    if device_type != "cpu" or interpreted or triton_version is None:
        return False, None
    if environ.get(REEXEC_ENV):
        return False, (f"kernel-bench: re-executed with TRITON_INTERPRET=1 ({REEXEC_ENV} is set) and still not "
                       f"interpreted; the Triton kernels are skipped")
    if "TRITON_INTERPRET" in environ:
        return False, (f"kernel-bench: TRITON_INTERPRET={environ['TRITON_INTERPRET']} is set, so the Triton "
                       f"kernels are skipped on the CPU; set it to 1 (or unset it) to run them through the interpreter")
    conflict = interpreter_conflict(triton_version, numpy_version or "0")
    if conflict is not None:
        return False, f"kernel-bench: not using the Triton CPU interpreter: {conflict}"
    return True, "kernel-bench: no GPU; running again under the Triton CPU interpreter (TRITON_INTERPRET=1)"


def _reexec_interpreted(argv: list[str]) -> None:
    """Replace this process by ``python -m bench ARGV`` with TRITON_INTERPRET=1 (does not return)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", REEXEC_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "bench", *argv], env)


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
    reexec, line = interpreter_reexec(device.type, os.environ, interpreted=INTERPRET,
                                      triton_version=_version("triton"), numpy_version=_version("numpy"))
    argv = recorded_argv(args)[1:]
    if reexec and argv[:1] != ["kernel-bench"]:  # called as a function, not as this process's command
        reexec, line = False, (f"kernel-bench: the Triton kernels are skipped on the CPU; run "
                               f"TRITON_INTERPRET=1 {command_text(['detbench', 'kernel-bench', '--tiny'])} to run "
                               f"them through the interpreter")
    if line:
        print(line, file=sys.stderr)
    if reexec:
        _reexec_interpreted(argv)
    result = run_kernel_bench(device, tiny=tiny, sections=sections, seed=args.seed)
    print_table(result)
    if args.json is not None:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0
