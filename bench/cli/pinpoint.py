"""``detbench pinpoint``: name the op that makes runs differ (``bench.pinpoint``), on SFT steps or a subject."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from torch import get_num_threads

from bench.cli.common import UsageError, coverage_lines, one_value, parse_device, recorded_argv, with_option
from bench.cli.sft import add_common_model_args, plan_from_args
from bench.coverage import device_coverage
from bench.data import batch_for_step, on_device
from bench.dtypes import parse_dtype, torch_name
from bench.generate import load, pinpoint_batch_of
from bench.modes import MODES, apply_mode
from bench.pinpoint import CompareReport, ReplayReport, compare_runs, replay
from bench.pinpoint.batch import BatchVarianceReport
from bench.pinpoint.units import UNITS
from bench.planted import planted_registered
from bench.results import (
    capture_environment,
    check_out_dir,
    device_label,
    new_run_id,
    result_path,
    to_json,
    write_json_atomic,
)
from bench.sft import apply_plants, build, check_seed, make_optimizer, parse_model, parse_plant, sft_step
from bench.subjects import PROFILES, SUBJECTS, build_case
from qwen_layers.registry import REGISTRY, BackendError


def replay_table(report: ReplayReport) -> Group:
    """A replay report as a rich table: one row per op that disagreed with its own replay (and the
    summary, in yellow, when outputs became non-finite)."""
    if not report.findings:
        parts = [f"[{'green' if report.comparable else 'yellow'}]{escape(report.summary())}[/]"]
    else:
        t = Table(title="replay: ops that disagreed with their own replay", title_justify="left")
        for col in ("#", "level", "op", "module", "phase", "calls", "differs", "max |d|", "max ulp"):
            t.add_column(col, overflow="fold")
        for i, f in enumerate(report.findings, 1):
            t.add_row(str(i), f.level, f"[bold]{escape(f.op)}[/]", escape(f.module or "<root>"), f.phase,
                      str(f.count), f"{f.n_diff}/{f.n_total} of output {f.output_index}", f"{f.max_abs:.3e}",
                      str(f.max_ulp))
        parts = [t, *[escape(f"  #{i}: {f.detail()}") for i, f in enumerate(report.findings, 1)]]
        if not report.comparable:
            parts.append(f"[yellow]{escape(report.summary())}[/]")
    parts += [f"[yellow]{escape(e)}[/]" for e in report.errors]
    parts += [escape(line) for line in report.not_replayable_lines()]
    if report.skipped:
        parts.append(escape(report.skipped_line()))
    if report.clean:
        parts += [escape(line) for line in report.bound_lines()]
    return Group(*parts)


def compare_tables(report: CompareReport) -> Group:
    """A trace-compare report as rich tables: per differing pair of runs, its findings, then its notes."""
    style = "green" if report.identical else "yellow" if report.bitwise_equal else "red"
    parts = [f"[{style}]{escape(report.summary())}[/]"]
    if report.identical:
        parts += [escape(line) for line in report.bound_lines()]
    if report.coarse_line():
        parts.append(escape(report.coarse_line()))
    for p in report.pairs:
        if p.identical:
            continue
        t = Table(title=f"runs {p.run_a} vs {p.run_b} ({'exact' if report.exact else 'fingerprints'})",
                  title_justify="left")
        for col in ("finding", "event", "op", "module", "phase"):
            t.add_column(col, overflow="fold")
        for label, ev in p.findings():
            op = f"{escape(ev['op'])} [dim]({ev['kind']})[/]"
            t.add_row(label, str(ev["index"]), f"[bold]{op}[/]" if label == "root cause" else op,
                      escape(ev["module"] or "<root>"), ev["phase"])
        parts.append(t)
        parts += [escape(line) for line in p.notes()]
    return Group(*parts)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pinpoint", help="name the op that makes runs differ (replay and trace-compare)",
        description="Pinpoint run-to-run nondeterminism: replay every op on the spot and compare (one run), and "
                    "trace two or more runs and compare them op by op (root cause, first module, spread). "
                    "The subject is one or more SFT steps (default) or a harness subject of detbench run. "
                    "A clean report says what it rests on: k, the calls of each op class compared, and for the "
                    "rarest class how rare a fault could be and still be missed with 5% probability "
                    "((1-p)^k; trace-compare: k x (runs - 1) comparisons), plus the fingerprints' collision "
                    "bound. More steps (--steps) or runs (--runs) tighten it.")
    add_common_model_args(p)
    p.add_argument("--subject", default="sft",
                   help="sft (SFT steps of --model, default) or a harness subject: rmsnorm, attention, "
                        "decoder-layer, ... (see detbench run --help)")
    p.add_argument("--method", choices=("both", "replay", "compare"), default="both",
                   help="replay, compare (trace and compare runs) or both (default)")
    p.add_argument("--runs", type=int, default=2, help="runs to trace and compare (default 2)")
    p.add_argument("--steps", "-k", type=int, default=1, help="SFT steps per run (default 1)")
    p.add_argument("--exact", action="store_true", help="compare full copies instead of fingerprints (memory!)")
    p.add_argument("--coarse", action="store_true",
                   help="trace-compare coarsely first: module outputs, registry calls, custom backwards, gradients "
                        "and parameters through hooks, with no per-op cost (about a plain run's time); the runs are "
                        "traced again op by op only when those differ (not with --exact)")
    p.add_argument("--all-ops", action="store_true", help="replay order-free (pointwise, copy) ops too")
    p.add_argument("--units", default="leaves", metavar="{" + ",".join(UNITS) + "}",
                   help="which module forwards replay also runs twice as a whole, to catch nondeterminism in a "
                        "module's own Python code: leaves (default: leaf modules such as nn.Linear, an RMSNorm, your own leaf "
                        "module; detbench's routed modules are covered by their registry calls), modules (every "
                        "module; each replay reruns only the module's own code, its submodules answer with their "
                        "recorded outputs), ops (none; only registry calls and custom-Function backwards). "
                        "Modules that cannot be replayed (a KV-cache argument, parameters written in forward) are "
                        "listed with the reason and their ops replayed one by one")
    p.add_argument("--attention", default="eager", help="attention backend (sft subject; default eager)")
    p.add_argument("--backend", default="eager", help="backend of a harness subject's primary op (default eager)")
    p.add_argument("--mode", default="default", help="determinism mode: default, torch-det, hf-full")
    p.add_argument("--dtype", default="float32", help="dtype (default float32)")
    p.add_argument("--lr", default="1e-5", help="learning rate of the SFT steps (default 1e-5)")
    p.add_argument("--profile", help="shape profile of a harness subject: quick, cpu, cuda (default: quick on "
                                     "the CPU, cuda on a GPU)")
    p.add_argument("--batch-of", metavar="RESULT.json",
                   help="batch variance instead of run-to-run: rebuild a detbench generate result's model and prompt, "
                        "decode the prompt alone and in one of its batches, and name the first op whose result for "
                        "the prompt's rows changed with the batch (module, prefill or decode step); --plant routes ops "
                        "of the rebuilt model, --device moves it; model, seeds, dtype and threads are the result's")
    p.add_argument("--batch", type=int, metavar="N",
                   help="with --batch-of: the batch to compare (default: the smallest whose completion differed)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument("--out", help="also write the reports as a JSON file into this directory")
    p.set_defaults(func=cmd_pinpoint)


def _one(value: str, what: str) -> str:
    return one_value(value, what, "pinpoint")


def _sft_subject(args, device):
    """(setup, fn, roots, description) for --subject sft."""
    # repeats: the runs trace-compare compares (at least 2, checked by cmd_pinpoint); replay runs once.
    plan = plan_from_args(args, attention=_one(args.attention, "--attention"), modes=_one(args.mode, "--mode"),
                          dtypes=_one(args.dtype, "--dtype"), lrs=_one(args.lr, "--lr"), steps=args.steps,
                          repeats=args.runs, out=None)
    batches = on_device(plan.batches, device)
    lr, clip = plan.lrs[0], plan.settings.clip

    def setup():
        model = build(plan.spec, attention=plan.attention[0], dtype=plan.dtypes[0], device=device,
                      seed=plan.settings.seed, plants=plan.plants)
        return model, make_optimizer(model, lr=lr)

    def fn(model, optimizer):
        return [sft_step(model, optimizer, batch_for_step(batches, k), clip)[0] for k in range(plan.steps)]

    desc = (f"{plan.steps} SFT step(s) of {plan.spec.text} ({plan.attention[0]}, {plan.settings.dtypes[0]}, "
            f"lr {lr:g}" + (f", planted {', '.join(plan.settings.plants)}" if plan.plants else "") + ")")
    return setup, fn, None, desc, plan.modes[0]


def _harness_subject(args, device):
    """(setup, fn, roots, description) for a subject of bench.subjects."""
    if args.subject not in SUBJECTS:
        raise UsageError(f"--subject {args.subject!r}: unknown; choose sft or one of: {', '.join(SUBJECTS)}")
    profile = args.profile or ("cuda" if device.type == "cuda" else "quick")
    if profile not in PROFILES:
        raise UsageError(f"--profile {profile!r}: choose from {', '.join(PROFILES)}")
    mode = _one(args.mode, "--mode")
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: unknown mode; choose from: {', '.join(MODES)}")
    spec = parse_model(args.model)
    dtype = parse_dtype(_one(args.dtype, "--dtype"))
    plants = [parse_plant(p) for p in args.plant]
    if spec.transformers:
        raise UsageError("harness subjects are built from detbench's model; drop the 'hf:' prefix of --model")
    subject = SUBJECTS[args.subject]
    backend = _one(args.backend, "--backend")
    try:
        REGISTRY.resolve(subject.primary_op, backend, device)
    except BackendError as e:
        raise UsageError(f"--backend {backend!r}: {e}") from None
    case = build_case(args.subject, spec.config, profile, seed=args.seed)
    inst = case.instantiate(dtype, device, {subject.primary_op: backend})
    apply_plants(inst.module, plants, device)
    inst.run()  # draws and caches the fixed upstream gradient, so every traced run does the same work
    desc = (f"subject {args.subject} ({profile} shapes, {subject.primary_op}={backend}, {torch_name(dtype)})"
            + (f", planted {', '.join(str(p) for p in plants)}" if plants else ""))
    return (lambda: ()), (lambda: inst.run()), None, desc, mode


def cmd_pinpoint(args) -> int:
    if args.batch_of is not None:
        return _pinpoint_batch(args)
    if args.batch is not None:
        raise UsageError("--batch names a batch of a detbench generate result: give the result with --batch-of")
    device = parse_device(args.device)
    if args.runs < 2:
        raise UsageError(f"--runs must be at least 2 (trace-compare compares runs), got {args.runs}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.units not in UNITS:
        raise UsageError(f"--units {args.units!r}: choose one of {', '.join(UNITS)} (default leaves)")
    if args.coarse and args.exact:
        raise UsageError("--coarse fingerprints module outputs, gradients and parameters and has no exact mode: "
                         "drop --coarse or --exact")
    if args.coarse and args.method == "replay":
        raise UsageError("--coarse is an option of trace-compare: use --method compare or both, or drop --coarse")
    check_seed(args.seed, "--seed")
    check_seed(args.data_seed, "--data-seed")
    out_dir = check_out_dir(args.out) if args.out else None
    with planted_registered(bool(args.plant)):
        return _pinpoint(args, device, out_dir)


def _pinpoint(args, device, out_dir) -> int:
    if args.subject == "sft":
        setup, fn, roots, desc, mode = _sft_subject(args, device)
    else:
        setup, fn, roots, desc, mode = _harness_subject(args, device)
    console = Console()
    reports: dict[str, Any] = {}
    with apply_mode(mode):
        if args.method in ("both", "replay"):
            if not args.json:
                console.print(f"[bold]replay[/]: {desc}, mode {mode}")
            reports["replay"] = replay(fn, *setup(), roots=roots, all_ops=args.all_ops, units=args.units)
            if not args.json:
                console.print(replay_table(reports["replay"]))
        if args.method in ("both", "compare"):
            if not args.json:
                console.print(f"[bold]trace-compare[/]: {desc}, mode {mode}, {args.runs} runs")
            reports["compare"] = compare_runs(fn, runs=args.runs, exact=args.exact, setup=setup, seed=args.seed,
                                              roots=roots, coarse=args.coarse)
            if not args.json:
                console.print(compare_tables(reports["compare"]))
    payload = {"schema": "detbench.pinpoint/1", "subject": desc, "mode": mode, "device": str(device),
               "command": recorded_argv(args), **{k: r.to_dict() for k, r in reports.items()}}
    # On a CPU: what the reports could not have found (stored; printed when they found nothing).
    payload["coverage"] = device_coverage(device, threads=get_num_threads())
    if payload["coverage"] is not None and not args.json and all(
            r.clean if isinstance(r, ReplayReport) else r.identical for r in reports.values()):
        gpu = with_option(["detbench", *payload["command"][1:]], "--device", "cuda")
        for line in coverage_lines(payload["coverage"], gpu):
            console.print(line, highlight=False, soft_wrap=True)
    return _emit(payload, args, console, out_dir, device, {"model": args.seed, "data": args.data_seed})


def _emit(payload: dict, args, console: Console, out_dir, device, seeds: dict) -> int:
    """Write the report into ``out_dir`` with the environment (printing its path), or print it as JSON."""
    if out_dir is not None:
        env = capture_environment(device, seeds=seeds)
        payload["environment"] = env
        path = write_json_atomic(result_path(out_dir, "pinpoint", device_label(env), new_run_id()), payload)
        if not args.json:
            console.print(f"report: {path}")
    if args.json:
        print(json.dumps(to_json(payload), indent=1))
    return 0


def batch_tables(report: BatchVarianceReport) -> Group:
    """A batch-variance report: its summary, the root cause (and the first difference) as a table, its notes."""
    style = "green" if report.identical else "red" if report.comparable else "yellow"
    parts: list = [f"[{style}]{escape(report.summary())}[/]"]
    rows = [("root cause", report.root_cause), ("first diff", report.first_difference)]
    rows = [(label, ev) for label, ev in rows if ev is not None]
    if len(rows) == 2 and rows[0][1]["index"] == rows[1][1]["index"]:  # the root is in the first differing call
        rows = rows[:1]
    if rows:
        t = Table(title="the prompt alone vs in the batch, its rows only", title_justify="left")
        for col in ("finding", "#", "op", "in", "module", "step"):
            t.add_column(col, overflow="fold")
        for label, ev in rows:
            op = escape(ev["op"])
            t.add_row(label, ev["label"], f"[bold]{op}[/]" if label == "root cause" else op,
                      escape(ev["inside"] or "-"), escape(ev["module"] or "<root>"), ev["step"])
        parts.append(t)
    parts += [escape(line) for line in report.lines()]
    return Group(*parts)


def _pinpoint_batch(args) -> int:
    if args.subject != "sft" or args.method != "both" or args.coarse or args.exact:
        raise UsageError("--batch-of compares the prompt alone with the prompt in a batch; --subject, --method, "
                         "--coarse and --exact are for run-to-run pinpointing: drop them")
    result = load(args.batch_of)
    plants = [parse_plant(p) for p in args.plant]
    device = parse_device(args.device) if args.device else None
    out_dir = check_out_dir(args.out) if args.out else None
    console = Console()
    with planted_registered(bool(args.plant)):
        report, spec, completion, new_tokens = pinpoint_batch_of(result, args.batch, plants, device)
    s = result.settings
    div = completion.divergence
    what = (f"its completion chose token {div.token} instead of {div.ref_token} at step {div.step}" if div else
            "its completion's tokens were the same" if completion.first_logit_diff is None else
            f"its tokens were the same, its logits first differed at step {completion.first_logit_diff}")
    desc = (f"{s.model} ({s.attention} attention, {s.dtype}, {s.threads} thread(s)"
            + (f", planted {', '.join(args.plant)}" if plants else "") + f"): the prompt ({s.prompt_len} tokens) "
            f"alone vs batch {spec.index} ({spec.batch_size} rows, the prompt in row {spec.row}"
            + (", left padding" if spec.padded else "") + f"; {what}), {new_tokens} new token(s) decoded")
    if not args.json:
        console.print(f"[bold]batch-variance pinpoint[/]: {escape(desc)}")
        console.print(batch_tables(report))
    payload = {"schema": "detbench.pinpoint/1", "subject": desc, "device": s.device if device is None else str(device),
               "command": recorded_argv(args), "generate_result": str(args.batch_of), "batch": spec.index,
               "batch_variance": report.to_dict()}
    return _emit(payload, args, console, out_dir, device or s.device, {"model": s.seed, "data": s.data_seed})
