"""Rendering a stored ``detbench run`` result: the summaries every view shares, Markdown and plots.

Everything here reads a :class:`bench.results.RunResult`; nothing measures and nothing prints. The
terminal tables are ``bench.cli.report.print_run`` (shared by ``detbench run`` and ``detbench report``,
so what a run shows and what ``report`` re-renders from the file are the same), built on
:class:`Index`, :func:`cost_rows` and :func:`agreement_lines` from here.

* :func:`render_markdown` - the same as Markdown (written next to each result by ``detbench run``).
* :func:`render_plots` - PNGs of the cost of determinism and of error vs speed (needs matplotlib).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench.checks import bound_sentence
from bench.results import RunResult

# ------------------------------------------------------------------------------------------------
# summaries shared by every renderer
# ------------------------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_times(*seconds: float | None) -> str:
    """Several times in one unit: ``9.99 / 50.8 / 39.9 ms``."""
    known = [t for t in seconds if t is not None and math.isfinite(t)]
    if not known:
        return "-"
    top = max(known)
    scale, unit = (1, "s") if top >= 1 else (1e3, "ms") if top >= 1e-3 else (1e6, "µs")
    return " / ".join("-" if t is None or not math.isfinite(t) else f"{t * scale:.3g}" for t in seconds) + f" {unit}"


def fmt_rate(value: float | None, unit: str) -> str:
    if value is None or not math.isfinite(value) or value <= 0:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf"
    return "0" if x == 0 else f"{x:.1e}"


def _first_of(records, worst):
    """The record to show: an output (``out``/``loss``...) before any gradient, then the worst."""
    if not records:
        return None
    outs = [r for r in records if not r.tensor.startswith("grad.")]
    return max(outs or records, key=worst)


def _more(n: int, compact: bool = False) -> str:
    if n <= 0:
        return ""
    return f" +{n}" if compact else f" (+{n} more tensor{'s' if n > 1 else ''})"


@dataclass
class CellView:
    """What the tables show for one cell (plain strings plus flags for styling)."""

    subject: str
    backend: str
    dtype: str
    mode: str
    status: str
    run_to_run: str
    batch: str
    err: str
    eager_err: str
    ulp: str
    fwd: str
    bwd: str
    both: str
    rate: str
    nondeterministic: bool
    batch_variant: bool
    worse_than_eager: bool
    both_s: float | None
    rel_l2: float | None


class Index:
    """The records of a result, grouped by cell."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        key = lambda r: (r.subject, r.backend, r.dtype, r.mode)  # noqa: E731
        self.cells = {key(c): c for c in result.cells}
        self.repeats, self.batch, self.accuracy = defaultdict(list), defaultdict(list), defaultdict(list)
        self.timings = {}
        for r in result.repeats:
            self.repeats[key(r)].append(r)
        for r in result.batch:
            self.batch[key(r)].append(r)
        for r in result.accuracy:
            self.accuracy[key(r)].append(r)
        for r in result.timings:
            self.timings[key(r) + (r.phase,)] = r
        self.subjects = {s.subject: s for s in result.subjects}

    def time(self, subject, backend, dtype, mode, phase="fwd+bwd") -> float | None:
        t = self.timings.get((subject, backend, dtype, mode, phase))
        return t.median_s if t else None

    def ratio(self, a: tuple, b: tuple, phase="fwd+bwd") -> tuple[float, float, float] | None:
        """time(a) / time(b) of two cells' medians, with the range the quartiles allow (q1a/q3b, q3a/q1b)."""
        ta, tb = self.timings.get(a + (phase,)), self.timings.get(b + (phase,))
        if ta is None or tb is None or tb.median_s <= 0 or tb.q1_s <= 0 or tb.q3_s <= 0:
            return None
        return ta.median_s / tb.median_s, ta.q1_s / tb.q3_s, ta.q3_s / tb.q1_s

    def view(self, cell, compact: bool = False) -> CellView:
        k = (cell.subject, cell.backend, cell.dtype, cell.mode)
        reps, batch, acc = self.repeats[k], self.batch[k], self.accuracy[k]
        nondet = cell.deterministic is False
        # run to run
        if cell.status == "unsupported":
            r2r = f"unsupported: {cell.reason}"
        elif cell.status == "refused":
            r2r = f"refused: {cell.reason}"
        elif cell.status == "error" and not reps:
            r2r = f"error {cell.reason}"
        elif cell.deterministic:
            r2r = f"same ×{cell.repeats}"
        else:
            bad = [r for r in reps if r.n_equal_to_first != r.repeats]
            w = _first_of(bad, lambda r: (r.max_n_diff, r.max_ulp))
            distinct = max((r.n_distinct for r in reps), default=0)
            r2r = f"DIFFERS: {distinct} distinct in {cell.repeats}"
            if w is not None:
                n = f"{w.max_n_diff}" if compact else f"{w.max_n_diff}/{w.n_total}"
                r2r += f" · {w.tensor} {n} el, {w.max_ulp} ulp" + _more(len(bad) - 1, compact)
        if cell.status == "error" and reps:
            r2r += f" (then error {cell.reason})"
        if cell.nonfinite:
            r2r += " [NaN/inf]"
        # batch invariance
        if not batch:
            bt = "-" if cell.batch_invariant is None else ("same" if cell.batch_invariant else "differs")
        else:
            sizes = sorted({b.rows for b in batch})
            bad = [b for b in batch if not b.equal]
            if not bad:
                bt = "same @" + ",".join(map(str, sizes))
            else:
                w = _first_of(bad, lambda b: (b.max_ulp, b.n_diff))
                others = {b.tensor for b in bad} - {w.tensor}
                n = f"{w.n_diff}" if compact else f"{w.n_diff}/{w.n_total}"
                bt = (f"DIFFERS @{','.join(map(str, sorted({b.rows for b in bad})))} · "
                      f"{w.tensor} {n} el, {w.max_ulp} ulp" + _more(len(others), compact))
                if nondet:  # the full batch itself changes from run to run
                    bt += " (includes run-to-run noise)"
        # accuracy: the worst tensor
        rels = [a.rel_l2 for a in acc]
        rel = float("nan") if any(math.isnan(x) for x in rels) else max(rels, default=None)
        eager = max((a.eager_rel_l2 for a in acc if not math.isnan(a.eager_rel_l2)), default=None)
        ulp = max((a.max_ulp for a in acc), default=None)
        eager_ulp = max((a.eager_max_ulp for a in acc if not math.isnan(a.eager_max_ulp)), default=None)
        worse = bool(acc) and rel is not None and eager is not None and (
            math.isnan(rel) or rel > 2 * eager + 1e-12)
        # time
        t = {ph: self.time(*k, ph) for ph in ("fwd", "bwd", "fwd+bwd")}
        info = self.subjects.get(cell.subject)
        rate = "-"
        tr = self.timings.get(k + ("fwd+bwd",))
        if tr is not None and info is not None and tr.median_s > 0:
            rate = (fmt_rate(tr.flops / tr.median_s, "FLOP/s") if info.bound == "flops"
                    else fmt_rate(tr.bytes / tr.median_s, "B/s"))
        return CellView(
            subject=cell.subject, backend=cell.backend, dtype=cell.dtype, mode=cell.mode, status=cell.status,
            run_to_run=r2r, batch=bt, err=fmt_err(rel), eager_err=fmt_err(eager),
            ulp="-" if ulp is None else f"{ulp:.3g}" + (f" ({eager_ulp:.3g})" if eager_ulp is not None else ""),
            fwd=fmt_time(t["fwd"]), bwd=fmt_time(t["bwd"]), both=fmt_time(t["fwd+bwd"]), rate=rate,
            nondeterministic=nondet, batch_variant=any(not b.equal for b in batch), worse_than_eager=worse,
            both_s=t["fwd+bwd"], rel_l2=rel,
        )


def cost_rows(ix: Index) -> list[dict]:
    """Time ratios measured in the same run: each mode / default, and deterministic kernel / its twin.

    Each ratio is ``(median ratio, low, high)`` where low/high divide the quartiles crosswise: when
    the range straddles 1 the difference is within the timing noise of this run.
    """
    res = ix.result
    modes = [m for m in res.settings.modes if m != "default"]
    backends = {(b.op, b.name): b for b in res.backends}
    rows = []
    seen = set()
    for c in res.cells:
        k = (c.subject, c.backend, c.dtype)
        if k in seen:
            continue
        seen.add(k)
        row = {"subject": c.subject, "backend": c.backend, "dtype": c.dtype,
               "default_s": ix.time(c.subject, c.backend, c.dtype, "default")}
        for m in modes:
            cell = ix.cells.get((c.subject, c.backend, c.dtype, m))
            if cell is not None and cell.status == "refused":
                row[m] = "refused"
            else:
                row[m] = ix.ratio(k + (m,), k + ("default",))
        op = ix.subjects[c.subject].primary_op if c.subject in ix.subjects else None
        b = backends.get((op, c.backend))
        row["twin"], row["twin_ratio"] = None, None
        if b is not None and b.twin and b.deterministic_claim:
            r = ix.ratio(k + ("default",), (c.subject, b.twin, c.dtype, "default"))
            if r is not None:
                row["twin"], row["twin_ratio"] = b.twin, r
        rows.append(row)
    return rows


def fmt_ratio(r) -> str:
    if isinstance(r, str):
        return r
    if r is None:
        return "-"
    mid, lo, hi = r
    text = f"{mid:.2f}× [{lo:.2f}–{hi:.2f}]"
    return text + " ~" if lo <= 1.0 <= hi else text


def agreement_lines(res: RunResult) -> list[str]:
    """Per subject and dtype, the groups of backends whose results are bitwise identical (modes with the
    same grouping share a line), and the backends whose bits a determinism mode changes."""
    lines = []
    groups = defaultdict(list)
    for r in res.cross:
        groups[(r.subject, r.dtype)].append(r)
    for (subject, dtype), recs in groups.items():
        by_mode = defaultdict(list)
        for r in recs:
            if r.a_mode == r.b_mode:
                by_mode[r.a_mode].append(r)
        texts: dict[str, list] = {}  # grouping -> [modes, worst relative L2, number of groups]
        for mode, rs in by_mode.items():
            parent: dict[str, str] = {}

            def find(x):
                while parent.setdefault(x, x) != x:
                    x = parent[x]
                return x

            for r in rs:
                find(r.a_backend), find(r.b_backend)
                if r.equal:
                    parent[find(r.a_backend)] = find(r.b_backend)
            clusters = defaultdict(list)
            for b in parent:
                clusters[find(b)].append(b)
            if len(parent) < 2:
                continue
            worst = max((r.max_rel_l2 for r in rs), default=0.0)
            text = " | ".join("{" + ", ".join(v) + "}" for v in clusters.values())
            entry = texts.setdefault(text, [[], 0.0, len(clusters)])
            entry[0].append(mode)
            entry[1] = max(entry[1], worst)
        for text, (modes, worst, n) in texts.items():
            tail = "all bitwise identical" if n == 1 else f"groups differ by up to {worst:.1e} relative L2"
            lines.append(f"{subject} {dtype} [{', '.join(modes)}]: {text} ({tail})")
        det = {(c.backend, c.mode) for c in res.cells
               if c.subject == subject and c.dtype == dtype and c.deterministic}
        changed = [f"{r.a_backend} under {r.b_mode if r.a_mode == 'default' else r.a_mode}"
                   for r in recs if r.a_backend == r.b_backend and not r.equal
                   and (r.a_backend, r.a_mode) in det and (r.b_backend, r.b_mode) in det]
        if changed:
            lines.append(f"{subject} {dtype}: the mode changes the bits of " + ", ".join(changed))
    return lines


def _counts(res: RunResult) -> str:
    n = len(res.cells)
    nondet = sum(1 for c in res.cells if c.deterministic is False)
    variant = sum(1 for c in res.cells if c.batch_invariant is False)
    refused = sum(1 for c in res.cells if c.status == "refused")
    errors = sum(1 for c in res.cells if c.status == "error")
    unsup = sum(1 for c in res.cells if c.status == "unsupported")
    parts = [f"{n} cells", f"{nondet} nondeterministic", f"{variant} batch-variant"]
    parts += [f"{x} {name}" for x, name in ((refused, "refused"), (errors, "errors"), (unsup, "unsupported")) if x]
    return ", ".join(parts)


def header_lines(res: RunResult) -> list[str]:
    env, s = res.environment, res.settings
    hw = f"{env.device_name}" + (f", {env.sm_count} SMs" if env.sm_count else f", {env.torch_threads} torch threads")
    lines = [
        f"device {env.device} ({hw}); torch {env.torch}, triton {env.triton or '-'}"
        + (f", CUDA {env.cuda}, driver {env.driver}" if env.device_type == "cuda" else ""),
        f"preset {s.preset}{' (quick shapes)' if s.quick else ''}; seed {s.seed}; "
        f"commit {(env.detbench_commit or '?')[:10]}{' (dirty)' if env.detbench_dirty else ''}",
        f"status: {res.status}" + (f" - {res.stopped_at}" if res.stopped_at else "") + f"; {_counts(res)}",
        bound_sentence(s.repeats) + ".",
    ]
    return lines


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(res: RunResult, json_name: str | None = None) -> str:
    ix = Index(res)
    out = [f"# detbench run {res.run_id}", ""]
    if json_name:
        out += [f"Data: `{json_name}` (schema `{res.schema}`, see results/README.md).", ""]
    out += [f"- {_md_escape(line)}" for line in header_lines(res)]
    out += [f"- command: `{' '.join(res.command)}`", ""]
    out += ["Cells in **bold** are not bitwise reproducible run to run; *batch* shows whether rows computed in "
            "smaller batches match the full batch bit for bit. Errors are relative L2 against a float64 "
            "reference (worst tensor), next to eager PyTorch's in the same dtype.", ""]
    for info in res.subjects:
        cells = [c for c in res.cells if c.subject == info.subject]
        if not cells:
            continue
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in info.shapes.items())
        out += [f"## {info.subject}", "", f"{info.description}; primary op `{info.primary_op}`; {shapes}."]
        if info.notes:
            out += ["", f"Note: {info.notes}."]
        out += ["", "| backend | dtype | mode | run to run | batch invariance | err vs fp64 | eager err | max ulp (eager) "
                "| fwd | bwd | fwd+bwd | rate |", "|" + "---|" * 12]
        for c in cells:
            v = ix.view(c)
            r2r = f"**{_md_escape(v.run_to_run)}**" if v.nondeterministic else _md_escape(v.run_to_run)
            batch = f"**{_md_escape(v.batch)}**" if v.batch_variant else _md_escape(v.batch)
            out.append(f"| {v.backend} | {v.dtype} | {v.mode} | {r2r} | {batch} | {v.err} | {v.eager_err} | {v.ulp} "
                       f"| {v.fwd} | {v.bwd} | {v.both} | {v.rate} |")
        out.append("")
    rows = cost_rows(ix)
    modes = [m for m in res.settings.modes if m != "default"]
    if rows:
        out += ["## Cost of determinism", "",
                "Median fwd+bwd time under each mode divided by the same backend's time under `default`, and a "
                "deterministic kernel's time divided by its nondeterministic twin's (both measured in this run). "
                "In brackets the range the quartiles allow; `~` marks ratios within this run's timing noise.", ""]
        head = ["subject", "backend", "dtype", "default"] + [f"{m} / default" for m in modes] + ["det / twin"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["subject"], r["backend"], r["dtype"], fmt_time(r["default_s"])]
            cells += [fmt_ratio(r[m]) for m in modes]
            cells.append(f"{fmt_ratio(r['twin_ratio'])} vs {r['twin']}" if r["twin_ratio"] else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    lines = agreement_lines(res)
    if lines:
        out += ["## Cross-backend agreement", "", *[f"- {_md_escape(x)}" for x in lines], ""]
    if res.skipped:
        out += ["## Not run", "", *[f"- {_md_escape(x)}" for x in res.skipped], ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------


def matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401  (in here: matplotlib is optional)
    except ImportError:
        return "matplotlib is not installed: pip install 'detbench[plot]'"
    return None


def render_plots(res: RunResult, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>-cost.png`` and ``<stem>-error-vs-speed.png`` into ``out_dir``; returns the paths."""
    import matplotlib  # in here: matplotlib is optional (detbench[plot])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ix = Index(res)
    paths = []
    for name, draw in (("cost", _plot_cost), ("error-vs-speed", _plot_error_vs_speed)):
        fig = draw(plt, res, ix)
        if fig is None:
            continue
        fig.tight_layout()
        p = out_dir / f"{stem}-{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _plot_cost(plt, res: RunResult, ix: Index):
    """Horizontal bars: each mode's (and each det kernel's twin) time ratio, with quartile whiskers."""
    from matplotlib.ticker import FuncFormatter  # in here: matplotlib is optional

    rows = cost_rows(ix)
    modes = [m for m in res.settings.modes if m != "default"]
    bars = []
    for r in rows:
        series = {m: r[m] for m in modes if isinstance(r[m], tuple)}
        if r["twin_ratio"]:
            series["det / twin"] = r["twin_ratio"]
        if series:
            bars.append((f"{r['subject']} {r['backend']} {r['dtype']}", series))
    if not bars:
        return None
    labels = [m for m in modes] + (["det / twin"] if any("det / twin" in b[1] for b in bars) else [])
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(bars) * max(1, len(labels)) / 2 + 1.8))
    h = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        ys, mids, err = [], [], [[], []]
        for y, (_, series) in enumerate(bars):
            if label in series:
                mid, lo, hi = series[label]
                ys.append(y + i * h)
                mids.append(mid)
                err[0].append(max(mid - lo, 0.0))
                err[1].append(max(hi - mid, 0.0))
        ax.barh(ys, [m - 1.0 for m in mids], left=1.0, height=h, xerr=err, capsize=2,
                label=f"{label} / default" if label != "det / twin" else label,
                error_kw={"elinewidth": 0.7})
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
    ax.set_yticks([y + h * (len(labels) - 1) / 2 for y in range(len(bars))])
    ax.set_yticklabels([b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time ratio, fwd+bwd median (log scale; whiskers: quartile range); > 1: determinism costs time")
    ax.set_title(f"cost of determinism - {res.environment.device_name}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def _plot_error_vs_speed(plt, res: RunResult, ix: Index):
    """One scatter per subject: fwd+bwd time against error vs fp64, default mode, nondeterministic in red."""
    from matplotlib.ticker import NullFormatter  # in here: matplotlib is optional

    points = defaultdict(list)
    for c in res.cells:
        v = ix.view(c)
        if v.both_s and v.rel_l2 is not None and math.isfinite(v.rel_l2) and v.rel_l2 > 0 and c.mode == "default":
            points[c.subject].append((v.both_s, v.rel_l2, c.backend, c.dtype, v.nondeterministic))
    subjects = [s.subject for s in res.subjects if points[s.subject]]
    if not subjects:
        return None
    ncol = min(3, len(subjects))
    nrow = -(-len(subjects) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    markers = {"fp32": "o", "bf16": "s", "fp16": "^"}
    for ax, subject in zip(axes.flat, subjects):
        for t, err, backend, dtype, nondet in points[subject]:
            ax.scatter(t * 1e3, err, marker=markers.get(dtype, "x"), color="red" if nondet else "tab:blue", s=22)
            ax.annotate(f"{backend} {dtype}", (t * 1e3, err), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(subject, fontsize=9)
        ax.set_xlabel("fwd+bwd median (ms)", fontsize=7)
        ax.set_ylabel("rel L2 error vs fp64", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(subjects):]:
        ax.set_visible(False)
    fig.suptitle("error vs speed, default mode (red: not bitwise reproducible)", fontsize=9)
    return fig
