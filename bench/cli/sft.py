"""``detbench sft``: repeated SFT steps over a configuration matrix, compared bit for bit (``bench.sft``)."""

from __future__ import annotations

import json
import sys
import time
from typing import Sequence

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from bench.cli.common import (
    UsageError,
    command_text,
    coverage_lines,
    make_progress,
    parse_device,
    pause_point,
    progress_line,
    recorded_argv,
    with_option,
)
from bench.cli.sft_dp import add_dp_args, cmd_sft_dp, dp_settings
from bench.plugins import import_options, requested
from bench.results import check_out_dir, to_json
from bench.sft import ConfigResult, Plan, SFTResult, SFTSettings, fmt_exact, make_plan, parse_list, run, save


def step_table(res: ConfigResult):
    """Rich table: one row per step, the loss of every repeat (all digits that matter, differing ones in
    red), ``=`` where loss, grad norm and every gradient are bitwise equal in all repeats (else which of
    them differ; ``non-finite`` from the step a value went NaN/inf on, where equal bits prove nothing),
    and the spreads. The verdict sentence is printed once, under the summary table."""
    t = Table(title=res.key(), title_justify="left")
    t.add_column("step", justify="right")
    for r in range(len(res.losses)):
        t.add_column(f"loss r{r}", justify="right")
    t.add_column("bits", justify="center")
    t.add_column("loss spread", justify="right")
    t.add_column("gnorm spread", justify="right")
    for k in range(len(res.step_equal)):
        ref_bits = res.loss_bits[0][k]
        cells = []
        for r in range(len(res.losses)):
            text = fmt_exact(res.losses[r][k], res.loss_dtype)
            cells.append(text if res.loss_bits[r][k] == ref_bits else f"[red]{text}[/]")
        if not res.step_equal[k]:
            mark = f"[red]{','.join(res.step_differs[k])}[/]"
        elif res.non_finite is not None and k + 1 >= res.non_finite["step"]:
            mark = "[yellow]non-finite[/]"
        else:
            mark = "[green]=[/]"
        t.add_row(str(k + 1), *cells, mark, f"{res.loss_spread[k]:.2e}", f"{res.grad_norm_spread[k]:.2e}")
    return t


def _params_cell(res: ConfigResult) -> str:
    if not res.param_diff:
        return "(1 repeat)"
    worst = max(res.param_diff, key=lambda d: d.elements_differ)
    if worst.tensors_differ == 0:
        return "equal"
    return f"{worst.tensors_differ}/{worst.tensors_total} differ, max {max(d.max_abs for d in res.param_diff):.1e}"


def agreement(res: ConfigResult) -> str:
    """A configuration's outcome in a word or two: identical, diverge @k, params differ, not comparable,
    or its status (refused, error)."""
    if res.status != "ok":
        return res.status
    if res.identical is None:
        return "not comparable"
    if res.identical:
        return "identical"
    return f"diverge @{res.first_divergent_step}" if res.first_divergent_step else "params differ"


_AGREEMENT_STYLE = {"identical": "green", "not comparable": "yellow"}


def summary_table(results: list[ConfigResult], repeats: int, steps: int):
    """Rich table: one row per configuration, then each configuration's verdict sentence."""
    t = Table(title=f"detbench sft: {repeats} repeats x {steps} steps per configuration", title_justify="left")
    t.add_column("configuration", no_wrap=True)
    t.add_column("repeats", no_wrap=True)
    t.add_column("max dloss", justify="right", no_wrap=True)
    t.add_column("max dgnorm", justify="right", no_wrap=True)
    t.add_column("final params", min_width=10)
    lines = []
    for res in results:
        if res.status != "ok":
            t.add_row(res.key(), f"[yellow]{res.status}[/]", "-", "-", "-")
        else:
            word = agreement(res)
            agree = f"[{_AGREEMENT_STYLE.get(word, 'red')}]{word}[/]"
            t.add_row(res.key(), agree, f"{max(res.loss_spread):.2e}", f"{max(res.grad_norm_spread):.2e}",
                      _params_cell(res))
        lines.append(escape(f"{res.key()}: {res.verdict}"))
    return Group(t, *lines)


# What detbench pinpoint does not take from an sft run: it steps AdamW with its default betas, no weight
# decay and clipping at 1.0, on one batch per step.
_PINPOINT_FIXED = {"betas": [0.9, 0.999], "weight_decay": 0.0, "clip": 1.0}


def pinpoint_command(s: SFTSettings, res: ConfigResult, imports: Sequence[str] = ()) -> tuple[list[str], str | None]:
    """The ``detbench pinpoint`` command that reruns ``res``'s configuration (the modules ``imports``
    registered backends from, model, data, seeds, plants, attention, mode, dtype, lr) up to its first
    diverging step (every step when only the final parameters differ), tracing as many runs as the sft
    run had repeats; and a note naming the settings of this run that pinpoint cannot take (None when
    there are none)."""
    cmd = ["detbench", "pinpoint", *import_options(imports), "--model", s.model, "--attention", res.attention,
           "--mode", res.mode, "--dtype", res.dtype, "--lr", repr(res.lr),
           "--steps", str(res.first_divergent_step or res.steps), "--runs", str(res.repeats),
           "--batch-size", str(s.batch_size)]
    if s.data != "synthetic":
        cmd += ["--data", s.data]
    elif s.seq_len is not None:
        cmd += ["--seq-len", str(s.seq_len)]
    cmd += ["--seed", str(s.seed), "--data-seed", str(s.data_seed)]
    for plant in s.plants:
        cmd += ["--plant", plant]
    cmd += ["--device", s.device]
    differ = [f"{k} {getattr(s, k)}" for k, v in _PINPOINT_FIXED.items() if getattr(s, k) != v]
    if s.data == "synthetic" and s.n_batches < res.steps:
        differ.append(f"{s.n_batches} batches cycled")
    note = None
    if differ:
        note = (f"pinpoint steps AdamW with betas (0.9, 0.999), no weight decay, clip 1.0 and one batch per step; "
                f"this run had {', '.join(differ)}")
    return cmd, note


def next_steps(result: SFTResult, args, console: Console) -> None:
    """After the summary: for each configuration whose repeats differ, the pinpoint command that reproduces
    it; when nothing differed on a CPU, what the run could not exercise and the command for a GPU."""
    s = result.settings
    diverged = [res for res in result.configs if res.status == "ok" and res.identical is False]
    for res in diverged:
        cmd, note = pinpoint_command(s, res, requested(args.imports))
        console.print(f"find the op: {command_text(cmd)}", highlight=False, soft_wrap=True)
        if note:
            console.print(f"  note: {note}", highlight=False)
    if not diverged and any(res.identical for res in result.configs) and result.coverage is not None:
        gpu = with_option(["detbench", *result.command[1:]], "--device", "cuda")
        for line in coverage_lines(result.coverage, gpu):
            console.print(line, highlight=False, soft_wrap=True)


# An interrupted run that saved what finished exits like one killed by SIGINT (bench.cli.main reports
# SIGTERM's 143 instead when that was the signal).
EXIT_INTERRUPTED = 130


def add_common_model_args(p) -> None:
    """Arguments shared by ``detbench sft`` and ``detbench pinpoint``."""
    p.add_argument("--model", default="qwen3-tiny",
                   help="preset, checkpoint folder, hf:preset or hf:folder (default qwen3-tiny)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--seq-len", type=int, default=64, help="longest synthetic sequence (default 64)")
    p.add_argument("--data", help="JSONL token file (one list of ids per line, or {input_ids, loss_mask})")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic data seed (default 0)")
    p.add_argument("--plant", action="append", default=[], metavar="MODULE_PATH=op/backend",
                   help="route one module's op to a backend, e.g. model.layers.1.mlp.down_proj=linear/planted-nondet "
                        "(repeatable)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")


def add_parser(sub) -> None:
    p = sub.add_parser("sft", help="repeat SFT steps and compare the repeats bit for bit",
                       description="Train the same seeded model on the same batches R times for K AdamW steps, over "
                                   "a matrix of attention backend x mode x dtype x learning rate, and compare every "
                                   "step's loss and gradient norm and the final parameters bit for bit.")
    add_common_model_args(p)
    p.add_argument("--attention", default="eager",
                   help="comma-separated attention backends (registry names, or attn_implementation for hf: models)")
    p.add_argument("--mode", default="default", help="comma-separated determinism modes: default, torch-det, hf-full")
    p.add_argument("--dtype", default="float32", help="comma-separated dtypes: fp32, bf16, fp16 (default fp32)")
    p.add_argument("--lr", default="1e-5", help="comma-separated learning rates, e.g. 1e-5,3e-4 (default 1e-5)")
    p.add_argument("--steps", "-k", type=int, default=10, help="training steps per repeat (default 10)")
    p.add_argument("--repeats", "-r", type=int, default=3, help="repeats per configuration, at least 2 (default 3)")
    p.add_argument("--batches", type=int, help="distinct batches, cycled (default: one per step)")
    p.add_argument("--betas", default="0.9,0.999", help="AdamW betas (default 0.9,0.999)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0.0)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm, 0 disables (default 1.0)")
    p.add_argument("--out", default="results", help="results directory (default results/)")
    p.add_argument("--no-save", action="store_true", help="do not write a result file")
    p.add_argument("--json", action="store_true", help="print the result record as JSON instead of tables")
    p.add_argument("--summary-only", action="store_true", help="print only the summary table, not every step")
    add_dp_args(p)
    p.set_defaults(func=cmd_sft)


def parse_betas(text: str) -> tuple[float, float]:
    try:
        vals = tuple(float(x) for x in parse_list(text, "--betas"))
    except ValueError:
        raise UsageError(f"--betas {text!r}: write two numbers, e.g. 0.9,0.999") from None
    if len(vals) != 2:
        raise UsageError(f"--betas {text!r}: write two numbers, e.g. 0.9,0.999")
    return vals


def plan_from_args(args, **overrides) -> Plan:
    """A :class:`bench.sft.Plan` from parsed CLI arguments (bad input raises an ``InputError``)."""
    kw = dict(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len, data=args.data, seed=args.seed,
              data_seed=args.data_seed, device=parse_device(args.device), plants=args.plant)
    kw.update(overrides)
    return make_plan(**kw)


def cmd_sft(args) -> int:
    betas = parse_betas(args.betas)
    plan = plan_from_args(args, attention=args.attention, modes=args.mode, dtypes=args.dtype, lrs=args.lr,
                          steps=args.steps, repeats=args.repeats, n_batches=args.batches, betas=betas,
                          weight_decay=args.weight_decay, clip=args.clip, out=None if args.no_save else args.out)
    out_dir = None if args.no_save else check_out_dir(args.out)
    settings = dp_settings(args)
    if settings.requested:
        return cmd_sft_dp(args, plan, settings, out_dir)
    console = Console()
    # Where no progress bar can show (output to a file or a pipe; --json), one line per configuration.
    lines_to = Console(stderr=True) if args.json else None if console.is_terminal else console
    total = plan.n_configs * plan.repeats * plan.steps
    if not args.json:
        s = plan.settings
        console.print(f"[bold]detbench sft[/] {s.model} on {s.device}: {plan.n_configs} configuration(s) x "
                      f"{plan.repeats} repeats x {plan.steps} steps; {len(plan.batches)} batch(es) of "
                      f"{s.batch_size} ({s.data}); AdamW betas {tuple(s.betas)}, weight decay {s.weight_decay}, "
                      f"clip {s.clip}" + (f"; planted: {', '.join(s.plants)}" if s.plants else ""))
    started = time.monotonic()
    with make_progress(console, disable=args.json or lines_to is not None) as progress:
        task = progress.add_task("SFT steps", total=total)

        finished = []

        def on_config(res: ConfigResult) -> None:
            finished.append(res)
            if lines_to is not None:
                lines_to.print(progress_line(len(finished), plan.n_configs, time.monotonic() - started,
                                             f"{res.key()}: {agreement(res)}"), highlight=False, soft_wrap=True)
            if not args.json and not args.summary_only and res.status == "ok":
                progress.console.print(step_table(res))
            pause_point(f"after-config-{len(finished)}")

        result = run(plan, command=recorded_argv(args), on_step=lambda: progress.advance(task), on_config=on_config)
    interrupted = result.status == "interrupted"
    if interrupted and not result.configs:
        raise KeyboardInterrupt  # nothing finished: bench.cli says so, and nothing is written
    # What finished is printed first, then saved: a failed save (SaveError, exit 1) leaves it on screen.
    if args.json:
        json.dump(to_json(result), sys.stdout, indent=1)
        print()
    else:
        console.print(summary_table(result.configs, plan.repeats, plan.steps))
        next_steps(result, args, console)
        if interrupted:
            console.print(f"[yellow]interrupted: {len(result.configs)} of {plan.n_configs} configurations "
                          f"finished[/]")
    path = save(result, out_dir) if out_dir is not None else None
    if path is not None and not args.json:
        console.print(f"result: {path}", highlight=False)
    return EXIT_INTERRUPTED if interrupted else 0
