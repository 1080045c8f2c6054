"""``detbench run``: every subject through every backend, in each dtype and mode (``bench.harness``)."""

from __future__ import annotations

import argparse
import contextlib

from bench.cli.common import make_progress, parse_device, pause_point, split_list
from bench.cli.report import make_console, print_run
from bench.errors import SaveError
from bench.harness import DEFAULT_PRESET, DEFAULT_REPEATS, QUICK_PRESET, Plan, execute, make_plan, new_result, save
from bench.modes import MODES, run_environment
from bench.planted import negative_control_subjects, planted_registered
from bench.plugins import import_options, requested
from bench.report import status_line, wrap_clauses
from bench.results import RunSettings, check_out_dir
from bench.subjects import SUBJECTS


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The harness plan for parsed ``detbench run`` arguments (planted backends registered by the caller)."""
    return make_plan(
        device=parse_device(args.device), subjects=split_list(args.subjects, "--subjects"),
        backends=split_list(args.backends, "--backends"), dtypes=split_list(args.dtypes, "--dtypes"),
        modes=split_list(args.modes, "--modes"), repeats=args.repeats, quick=bool(args.quick), preset=args.preset,
        seed=args.seed, route=split_list(args.route, "--route") or [], plant=bool(args.plant),
        time_repeats=args.time_repeats, warmup=args.warmup, out=args.out, imports=requested(args.imports),
    )


def equivalent_command(s: RunSettings) -> list[str]:
    """The ``detbench run`` command line that asks for exactly these settings."""
    cmd = ["detbench", "run", "--subjects", ",".join(s.subjects), "--dtypes", ",".join(s.dtypes),
           "--modes", ",".join(s.modes), "--repeats", str(s.repeats), "--device", s.device.split(":")[0],
           "--preset", s.preset, "--seed", str(s.seed), "--time-repeats", str(s.time_repeats),
           "--warmup", str(s.time_warmup), "--out", s.out]
    if s.backends is not None:
        cmd[2:2] = ["--backends", ",".join(s.backends)]
    cmd[2:2] = import_options(s.imports)  # $DETBENCH_IMPORT's modules too: the command re-runs as written
    if s.quick:
        cmd.append("--quick")
    if s.plant:
        cmd.append("--plant")
    for op, name in s.route.items():
        cmd += ["--route", f"{op}={name}"]
    return cmd


def run_notes(result) -> list[str]:
    """What a reader of the times must know that the tables do not say: memsets inside the deterministic
    modes' times, and a workspace size a mode asked for but could not have."""
    notes = []
    filled = sorted({c.mode for c in result.cells if c.fill_uninitialized_memory})
    if filled:
        notes.append(f"times under {', '.join(filled)} include PyTorch filling the memory torch.empty returns "
                     f"(torch.utils.deterministic.fill_uninitialized_memory, on with deterministic algorithms): "
                     f"part of a mode / default ratio is those memsets, not the kernel")
    notes.extend((result.run_env or {}).get("notes", []))
    return notes


def cmd_run(args: argparse.Namespace) -> int:
    """Plan, run, print the tables, then save: a run interrupted by SIGINT or SIGTERM is printed and saved
    (status interrupted) and returns 130; a save that fails raises SaveError after the tables were printed."""
    console = make_console()
    if args.plant and args.subjects is None:
        only = negative_control_subjects(split_list(args.backends, "--backends"), quick=bool(args.quick))
        if only:
            args.subjects = [",".join(only)]  # recorded as --subjects in the result's command
            console.print(f"negative control: one subject per op with a planted backend: {', '.join(only)} "
                          f"(name --subjects to choose others)", highlight=False)
    # CUBLAS_WORKSPACE_CONFIG must be in force before the first CUDA matmul, and the plan's probes run some:
    # the run-wide environment is entered before planning and left (restored) once the run is over.
    with planted_registered(args.plant), run_environment(split_list(args.modes, "--modes")):
        plan = plan_from_args(args)
        out_dir = check_out_dir(args.out)
        result = new_result(plan, equivalent_command(plan.settings))
        console.print(f"[bold]detbench run[/] on {plan.device} ({result.environment.device_name}): "
                      f"{plan.n_cells} cells, {plan.settings.repeats} repeats each, preset {plan.settings.preset}"
                      f"{' (quick shapes)' if plan.settings.quick else ''}", highlight=False)
        progress = None
        if args.progress:
            progress = make_progress(console)
        failed = None
        try:
            with progress if progress is not None else contextlib.nullcontext():
                execute(plan, result, progress, on_cell=lambda n: pause_point(f"after-cell-{n}"))
        except Exception as e:  # recorded in the result; re-raised after it is printed and written
            failed = e
    printing_stopped = None
    try:
        print_run(result, console)
    except (Exception, KeyboardInterrupt) as e:  # a second Ctrl-C (or a bug) while printing: save first
        printing_stopped = e
    try:
        json_path, md_path = save(result, out_dir)
    except SaveError:
        if failed is not None:
            console.print(f"[red]run failed {result.stopped_at}[/]: {result.error}", highlight=False)
        raise
    for line in run_notes(result):
        console.print(f"note: {line}", highlight=False)
    for part in wrap_clauses([status_line(result)], console.width):  # the last word: which cells failed
        console.print(part, markup=False, highlight=False, soft_wrap=True)
    console.print(f"result: {json_path}\nsummary: {md_path}", highlight=False)
    if failed is not None:
        console.print(f"[red]run failed {result.stopped_at}[/]; the records so far are in {json_path}", highlight=False)
        raise failed
    if isinstance(printing_stopped, Exception):
        raise printing_stopped
    if result.status == "interrupted":
        console.print(f"[yellow]{result.stopped_at}[/]; the records so far are in {json_path}", highlight=False)
        return 130
    if printing_stopped is not None:
        console.print(f"[yellow]interrupted while printing the tables[/]; the result is in {json_path}",
                      highlight=False)
        return 130
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run identical inputs through every backend: determinism, batch invariance, accuracy, speed",
        description="Run each subject (a Qwen op on its own) through every backend of its primary op, in "
                    "each dtype and determinism mode: run-to-run repeats, batch invariance, error against a "
                    "float64 reference next to eager PyTorch's, and time. Writes results/run-*.json and a "
                    "Markdown summary next to it.")
    p.add_argument("--subjects", action="append", metavar="LIST",
                   help=f"comma-separated subjects (default: all): {', '.join(SUBJECTS)}")
    p.add_argument("--backends", action="append", metavar="LIST",
                   help="backends of each subject's primary op (default: every available one; see detbench list). "
                        "Primary ops: " + ", ".join(f"{x.name}: {x.primary_op}" for x in SUBJECTS.values()))
    p.add_argument("--dtypes", action="append", metavar="LIST", help="fp32,bf16,fp16 (default: all three)")
    p.add_argument("--modes", action="append", metavar="LIST",
                   help=f"determinism modes (default: all): {', '.join(MODES)}")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help=f"run-to-run repeats per cell (default {DEFAULT_REPEATS})")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present, else cpu)")
    p.add_argument("--preset", help=f"model preset for the shapes (default {DEFAULT_PRESET}; {QUICK_PRESET} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny preset and tiny shapes (the linear subject keeps K=4096 x 512 rows); one to three "
                        "minutes on 2 CPU cores")
    p.add_argument("--route", action="append", metavar="OP=BACKEND",
                   help="backend of an op a subject calls besides its primary op, e.g. --route linear=triton for "
                        "the projections of attention-block (repeatable or comma-separated); refused when no "
                        "selected subject would use it")
    p.add_argument("--plant", action="store_true",
                   help="add bench.planted's deliberately nondeterministic / batch-variant backends (negative controls)")
    p.add_argument("--seed", type=int, default=0, help="seed of parameters, inputs and upstream gradients (default 0)")
    p.add_argument("--time-repeats", type=int, default=None,
                   help="timed calls per phase (default: 5 with --quick, 10 on cpu, 50 on cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per phase (default 1/2/5)")
    p.add_argument("--out", default="results", help="directory for the result files (default ./results)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_run)
