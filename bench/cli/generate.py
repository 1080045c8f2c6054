"""``detbench generate``: one prompt, greedy, in many different batches; how many distinct completions
(``bench.generate``), with and without the batch-invariant mode (``bench.invariant``)."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.table import Table

from bench.cli.common import make_progress, parse_device, pause_point, progress_line, recorded_argv
from bench.generate import GenerateResult, distinct_groups, make_plan, run, save
from bench.invariant import BLOCK_ROWS
from bench.results import check_out_dir, to_json

# An interrupted run that saved what finished exits like one killed by SIGINT (bench.cli.main reports
# SIGTERM's 143 instead when that was the signal).
EXIT_INTERRUPTED = 130

# Distinct completions listed per mode in the detail table (the record holds all).
SHOWN_GROUPS = 12
# Where no progress bar shows (output to a file or a pipe), a line every this fraction of the batches.
LINE_EVERY = 0.05


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="greedy-decode one prompt in many batches and count the distinct completions",
        description="Decode one prompt greedily many times, each time in a batch with other prompts (batch sizes "
                    "1..--max-batch, the prompt in any row, companions of its length or of other lengths with left "
                    "padding, prefill then KV-cache decoding), and report how many distinct completions come out, "
                    "where each first differs from the prompt decoded alone, and by how many ulp the logits differ "
                    "there. --batch-invariant on runs the batch-invariant mode; both runs every batch both ways and "
                    "measures the mode's cost.")
    p.add_argument("--model", default="qwen3-tiny",
                   help="preset, checkpoint folder, hf:preset or hf:folder (default qwen3-tiny)")
    p.add_argument("--attention", default="eager",
                   help="attention backend (registry name; attn_implementation for hf: models), default eager")
    p.add_argument("--dtype", default="float32", help="fp32, bf16 or fp16 (default fp32)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the prompt, the batch plan and the companions' tokens (default 0)")
    p.add_argument("--near-ties", type=float, default=0.0, metavar="EPS",
                   help="make the second half of the vocabulary copies of the first half, each weight moved by a "
                        "relative EPS, e.g. 2e-7: near-tied top logits, as a trained model's near-synonyms give "
                        "(default 0: the seeded weights as drawn)")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens in the prompt (default 16)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--completions", "-n", type=int, default=100,
                   help="batches, hence completions of the prompt per mode, the prompt alone included (default 100)")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch; sizes cycle 1..this (default 16)")
    p.add_argument("--padding", default="none,left",
                   help="companions as long as the prompt (none), of other lengths with left padding (left), or "
                        "both in turn (default none,left)")
    p.add_argument("--batch-invariant", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="run inside bench.batch_invariant() (on), or every batch both ways in alternating order, "
                        "with the mode's cost (both); default off")
    p.add_argument("--rows", type=int, default=BLOCK_ROWS,
                   help=f"row block of the batch-invariant mode's blocked ops (default {BLOCK_ROWS})")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (no KV cache)")
    p.add_argument("--threads", type=int, help="torch intra-op threads for the run (default: torch's)")
    p.add_argument("--out", default="results", help="results directory (default results/)")
    p.add_argument("--no-save", action="store_true", help="do not write a result file")
    p.add_argument("--json", action="store_true", help="print the result record as JSON instead of tables")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar, and no progress lines where output is not a terminal")
    p.set_defaults(func=cmd_generate)


def summary_table(result: GenerateResult) -> Table:
    s = result.settings
    t = Table(title=f"detbench generate: {s.model}, a {s.prompt_len}-token prompt, {s.new_tokens} new tokens, "
                    f"batches of 1..{s.max_batch} ({'/'.join(s.padding)} padding), "
                    f"{'KV cache' if s.use_cache else 'no cache'}", title_justify="left")
    for col, kw in (("mode", {}), ("completions", {"justify": "right"}), ("distinct", {"justify": "right"}),
                    ("differ from alone", {"justify": "right"}), ("earliest", {"justify": "right"}),
                    ("logits differ", {"justify": "right"}), ("max logit ulp", {"justify": "right"}),
                    ("tokens/s", {"justify": "right"})):
        t.add_column(col, **kw)
    for m in result.summary:
        distinct = f"[red]{m.distinct}[/]" if m.distinct > 1 else "[green]1[/]"
        if not m.comparable:
            distinct = "[yellow]not comparable[/]"
        t.add_row(m.mode, f"{m.completions:,}", distinct, f"{m.diverged:,}",
                  "-" if m.earliest_divergence is None else f"token {m.earliest_divergence}",
                  f"{m.logits_differ:,}", f"{m.max_logit_ulp:,}", f"{m.tokens_per_s:,.0f}")
    return t


def _span(values: list[int]) -> str:
    """``-`` for none, ``3`` when all are 3, ``1-4`` otherwise."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def groups_table(result: GenerateResult, mode: str) -> Table:
    """One row per distinct completion: where it first differs from the prompt alone's, the two tokens and
    the logits' ulp there (the alone run's margin between them, how far they moved), and which batches."""
    groups = distinct_groups(result, mode)
    t = Table(title=f"{mode}: distinct completions (0: the prompt alone's)", title_justify="left")
    for col in ("#", "count", "first differs", "token (alone)", "alone's margin ulp", "logits moved ulp",
                "batch sizes", "padded", "new tokens"):
        t.add_column(col, justify="right" if col in ("#", "count") else "left")
    for g in groups[:SHOWN_GROUPS]:
        divs = g["divergences"]
        sizes = sorted(g["sizes"])
        shown = ",".join(map(str, sizes)) if len(sizes) <= 6 else f"{len(sizes)} sizes, {sizes[0]}..{sizes[-1]}"
        padded = "/".join("yes" if p else "no" for p in sorted(g["padded"]))
        tokens = " ".join(map(str, g["tokens"][:6])) + (" ..." if len(g["tokens"]) > 6 else "")
        first = f"token {divs[0].step}" if divs else "-"
        chose = f"{divs[0].token} ({divs[0].ref_token})" if divs else "-"
        t.add_row(str(g["distinct"]), f"{g['count']:,}", first, chose, _span([d.ref_margin_ulp for d in divs]),
                  _span([d.token_ulp for d in divs]), shown, padded, tokens)
    if len(groups) > SHOWN_GROUPS:
        t.caption = f"{len(groups) - SHOWN_GROUPS} more in the result file"
    return t


def cost_lines(result: GenerateResult) -> list[str]:
    c = result.cost
    if c is None:
        return []
    return [f"cost of the batch-invariant mode over {c.batches} batches run both ways in alternating order: "
            f"{c.standard_tokens_per_s:,.0f} -> {c.invariant_tokens_per_s:,.0f} tokens/s; per batch, invariant time "
            f"/ standard time: median {c.ratio_median:.2f} (quartiles {c.ratio_q1:.2f}-{c.ratio_q3:.2f}), "
            f"{c.clock}"]


def cmd_generate(args) -> int:
    plan = make_plan(model=args.model, attention=args.attention, dtype=args.dtype, device=parse_device(args.device),
                     seed=args.seed, data_seed=args.data_seed, near_ties=args.near_ties, prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, completions=args.completions, max_batch=args.max_batch,
                     padding=args.padding,
                     invariant="off,on" if args.batch_invariant == "both" else args.batch_invariant,
                     rows=args.rows, use_cache=not args.no_cache, threads=args.threads,
                     out=None if args.no_save else args.out)
    out_dir = None if args.no_save else check_out_dir(args.out)
    console = Console()
    s = plan.settings
    if not args.json:
        console.print(f"[bold]detbench generate[/] {s.model} ({s.attention} attention, {s.dtype}) on {s.device}, "
                      f"{s.threads} thread(s): {s.completions:,} batches x {len(s.modes)} mode(s) "
                      f"({', '.join(s.modes)})" + (f"; near ties {s.near_ties:g}" if s.near_ties else ""),
                      highlight=False)
    # Where no progress bar can show (output to a file or a pipe; --json), a line every 5% of the batches.
    lines_to = Console(stderr=True) if args.json else None if console.is_terminal else console
    every = max(1, round(len(plan.batches) * LINE_EVERY))
    distinct: dict[str, int] = {}
    started = time.monotonic()
    with make_progress(console, disable=args.json or args.no_progress or lines_to is not None) as progress:
        task = progress.add_task("batches", total=len(plan.batches))

        def on_batch(spec, done) -> None:
            for c in done:
                distinct[c.mode] = max(distinct.get(c.mode, 0), c.distinct + 1)
            counts = ", ".join(f"{mode} {n} distinct" for mode, n in distinct.items())
            progress.update(task, advance=1, description=f"batches ({counts})")
            n = spec.index + 1
            if lines_to is not None and not args.no_progress and (n % every == 0 or n == len(plan.batches)):
                lines_to.print(progress_line(n, len(plan.batches), time.monotonic() - started, counts),
                               highlight=False, soft_wrap=True)
            pause_point(f"after-batch-{n}")

        result = run(plan, command=recorded_argv(args), on_batch=on_batch)
    interrupted = result.status == "interrupted"
    if interrupted and not result.completions:
        raise KeyboardInterrupt  # nothing finished: bench.cli says so, and nothing is written
    # What finished is printed first, then saved: a failed save (SaveError, exit 1) leaves it on screen.
    if args.json:
        json.dump(to_json(result), sys.stdout, indent=1)
        print()
    else:
        console.print(summary_table(result))
        for m in result.summary:
            console.print(m.mode + ": " + m.verdict, highlight=False)
        for m in result.summary:
            if m.distinct > 1:
                console.print(groups_table(result, m.mode))
        for line in cost_lines(result):
            console.print(line, highlight=False)
        if interrupted:
            console.print(f"[yellow]interrupted ({result.stopped_at}): {len(result.batches)} of {s.completions} "
                          f"batches finished[/]")
    path = save(result, out_dir) if out_dir is not None else None
    if path is not None and not args.json:
        console.print(f"result: {path}", highlight=False)
        if any(c.first_logit_diff is not None for c in result.completions if c.mode == "standard"):
            console.print(f"which op made the prompt's result depend on its batch: detbench pinpoint --batch-of {path}",
                          highlight=False, soft_wrap=True)
    return EXIT_INTERRUPTED if interrupted else 0
