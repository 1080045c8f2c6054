"""``detbench sft --world-size/--accum/--vary/--reduce``: data-parallel setups compared (``bench.distributed``)."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from bench import distributed as dp
from bench.cli import EXIT_SIGINT
from bench.cli.common import (
    UsageError,
    coverage_lines,
    progress_line,
    recorded_argv,
    split_list,
    with_option,
)
from bench.plugins import requested
from bench.results import to_json
from bench.sft import Plan, fmt_exact, make_record, now, save


def add_dp_args(p) -> None:
    g = p.add_argument_group("data-parallel (torch.distributed: gloo on CPU, NCCL on CUDA)")
    g.add_argument("--world-size", type=int, default=1,
                   help="ranks; detbench starts them (or run it under torchrun --nproc-per-node N)")
    g.add_argument("--accum", type=int, default=1, help="micro-batches accumulated per rank and step (default 1)")
    g.add_argument("--micro-batch", type=int,
                   help="sequences per micro-batch; each setup's accumulation then follows from its world size")
    g.add_argument("--parallel", default="ddp", choices=dp.PARALLEL, help="DDP or FSDP2 fully_shard (default ddp)")
    g.add_argument("--reduce", default="standard",
                   help="standard (all-reduce, p.grad accumulation), invariant (one fixed reduction tree), "
                        "or both: standard,invariant (their cost compared in the same run)")
    g.add_argument("--vary", action="append", default=[], metavar="AXIS=VALUES",
                   help="setups that are the same training, compared with the first: world=1,2,4 | accum=1,2,4 | "
                        "resume=K | threads=1,2")
    g.add_argument("--master-port", type=int, help="loopback port for the ranks' rendezvous (default: a free one)")
    g.add_argument("--rank-timeout", type=float, default=dp.RANK_TIMEOUT_S,
                   help=f"seconds a collective waits for a rank before the run fails (default {dp.RANK_TIMEOUT_S:.0f})")


def dp_settings(args) -> dp.DPSettings:
    if args.rank_timeout <= 0:
        raise UsageError("--rank-timeout must be a positive number of seconds")
    return dp.DPSettings(world=args.world_size, accum=args.accum, micro_batch=args.micro_batch,
                         parallel=args.parallel, reduce=tuple(split_list([args.reduce], "--reduce")), vary=tuple(args.vary),
                         master_port=args.master_port, timeout_s=args.rank_timeout,
                         imports=tuple(requested(args.imports)))


def _bits_cell(row: dict) -> str:
    c = row["comparison"]
    if c["identical"]:
        return "[green]identical[/]"
    step = f"loss @{c['first_loss_step']}" if c["first_loss_step"] else "params only"
    return f"[red]{step}; {c['params_differ']}/{c['params_total']} params, {c['max_ulp']} ulp[/]"


def _bits_word(row: dict) -> str:
    """The comparison with the first setup in a word (the sentence is printed once, under the table)."""
    c = row["comparison"]
    return "identical to the first" if c["identical"] else "DIFFERS from the first"


def clean_setups(rows: list[dict]) -> bool:
    """Every setup's repeats identical, and every setup identical to the first of its reduction."""
    return bool(rows) and all(r["run_to_run_identical"] and (r["label"] == r["vs"] or r["comparison"]["identical"])
                              for r in rows)


def setups_table(rows: list[dict], steps: int):
    t = Table(title=f"detbench sft: setups compared bit for bit over {steps} steps", title_justify="left")
    for col in ("setup", "reduce", "micro", "run to run", "loss at last step", "vs first setup", "step s",
                "bytes/step/rank"):
        t.add_column(col, justify="right" if col in ("micro", "step s", "bytes/step/rank") else "left")
    for r in rows:
        r2r = f"[green]same x{r['repeats']}[/]" if r["run_to_run_identical"] else f"[red]DIFFERS (x{r['repeats']})[/]"
        t.add_row(r["label"], r["reduce"], str(r["micro_batch"]), r2r, fmt_exact(r["losses"][-1]),
                  _bits_cell(r) if r["label"] != r["vs"] else "(reference)", f"{r['median_step_s']:.4f}",
                  f"{r['bytes_per_step_per_rank']:,}")
    lines = []
    for r in rows:
        if r["label"] != r["vs"]:
            lines.append(escape(f"{r['reduce']} {r['label']}: {r['verdict']}"))
            if r.get("where"):
                lines.append(escape(f"  where it enters ({r['where']['where']}): {r['where']['detail']}"))
    return Group(t, *lines)


def cost_table(cost: list[dict]):
    t = Table(title="cost of --reduce invariant (same run; median step time, bytes each rank receives per step)",
              title_justify="left")
    for col in ("setup", "standard s", "invariant s", "ratio", "standard bytes", "invariant bytes"):
        t.add_column(col, justify="left" if col == "setup" else "right")
    for c in cost:
        t.add_row(c["setup"], f"{c['standard_step_s']:.4f}", f"{c['invariant_step_s']:.4f}",
                  "-" if c["ratio"] is None else f"{c['ratio']:.2f}", f"{c['standard_bytes']:,}",
                  f"{c['invariant_bytes']:,}")
    return t


def cmd_sft_dp(args, plan: Plan, settings: dp.DPSettings, out_dir) -> int:
    console = Console()
    started = now()
    with dp.scratch() as tmp:
        jobs = dp.plan_jobs(plan, settings, tmp)
        if dp.launched_by_torchrun():
            result = dp.run_torchrun_rank(jobs[0])
            if result is None:  # ranks other than 0 report nothing
                return 0
        else:
            if not args.json:
                s = plan.settings
                console.print(f"[bold]detbench sft[/] {s.model} on {s.device}: {len(jobs)} setup(s), each "
                              f"{s.repeats} repeats x {s.steps} steps, global batch {s.batch_size}; "
                              f"{plan.attention[0]} {plan.modes[0]} {s.dtypes[0]} lr={plan.lrs[0]:g}")

            t0, done = time.monotonic(), []

            def on_setup(row: dict) -> None:
                done.append(row)
                if not args.json:
                    what = (f"{row['reduce']} {row['label']}: run to run "
                            f"{'identical' if row['run_to_run_identical'] else 'DIFFERS'}"
                            f"{'' if row['label'] == row['vs'] else '; ' + _bits_word(row)}")
                    console.print("  " + progress_line(len(done), len(jobs), time.monotonic() - t0, what),
                                  highlight=False)

            result = dp.run_setups(jobs, timeout_s=settings.timeout_s * 4 + 60 * plan.settings.steps,
                                   on_setup=on_setup)
    status = result.status
    if status == "failed":
        print(f"detbench sft: {result.reason}", file=sys.stderr)
        if not result.setups:
            return 1
    if status == "interrupted" and not result.setups:
        raise KeyboardInterrupt  # nothing finished: bench.cli says so, and nothing is written
    record = make_record(plan, command=recorded_argv(args), started=started, status=status, configs=[],
                         distributed=dp.record(result, settings, jobs))
    if args.json:
        json.dump(to_json(record), sys.stdout, indent=1)
        print()
    else:
        console.print(setups_table(result.setups, plan.steps))
        if result.cost:
            console.print(cost_table(result.cost))
        if clean_setups(result.setups) and record.coverage is not None:
            gpu = with_option(["detbench", *record.command[1:]], "--device", "cuda")
            for line in coverage_lines(record.coverage, gpu):
                console.print(line, highlight=False, soft_wrap=True)
        if status != "complete":
            console.print(f"[yellow]{status}: {len(result.setups)} of {len(jobs)} setups finished"
                          f"{': ' + result.reason if result.reason else ''}[/]")
    path = save(record, out_dir) if out_dir is not None else None
    if path is not None and not args.json:
        console.print(f"result: {path}", highlight=False)
    if status == "failed":
        return 1
    return EXIT_SIGINT if status == "interrupted" else 0
