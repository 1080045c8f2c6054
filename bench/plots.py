"""PNGs of a stored ``detbench run`` result (needs matplotlib): the verdict map first, then the cost of
determinism, then error vs speed. Made from the stored result, never during measurement.

>>> from bench.results import load_run
>>> paths = render_plots(load_run("results/run-....json"), "plots", "run-...")  # doctest: +SKIP

* ``<stem>-verdicts.png`` (:func:`draw_verdicts`): one row per subject / backend, one column per dtype x
  mode; the colour is the cell's verdict (identical, batch-variant, nondeterministic, not comparable,
  not run), the text the number of distinct results in its run-to-run repeats.
* ``<stem>-cost.png`` (:func:`draw_cost`): one panel per subject, each ratio of the cost table with its
  interval; hollow markers are the ratios the tables mark ``~``.
* ``<stem>-error-vs-speed.png`` (:func:`draw_error_vs_speed`): one panel per subject, fwd+bwd time against
  the error vs float64, default mode; colour is the backend, marker the dtype, a ring a batch-variant
  cell, a cross a nondeterministic one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from bench.report import Index, RatioCell, cost_rows
from bench.results import RunResult

# Verdict -> (colour, label); Okabe-Ito colours, readable by colour-blind readers.
VERDICTS = {
    "identical": ("#009E73", "identical (run to run and batch)"),
    "batch-variant": ("#E69F00", "batch-variant (identical run to run)"),
    "nondeterministic": ("#D55E00", "nondeterministic (differs run to run)"),
    "not comparable": ("#CC79A7", "not comparable (NaN/inf, nothing differed)"),
    "not run": ("#D9D9D9", "not run (unsupported, refused, error)"),
}
DTYPE_MARKERS = {"fp32": "o", "bf16": "s", "fp16": "^"}
DPI = 110


def matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401  (in here: matplotlib is optional)
    except ImportError:
        return "matplotlib is not installed: pip install 'detbench[plot]'"
    return None


def _pyplot():
    import matplotlib  # in here: matplotlib is optional (detbench[plot])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figures(res: RunResult) -> list[tuple[str, object]]:
    """(name, matplotlib Figure) of every plot the result has data for, in the order of :func:`render_plots`."""
    plt = _pyplot()
    ix = Index(res)
    out = []
    for name, draw in (("verdicts", draw_verdicts), ("cost", draw_cost), ("error-vs-speed", draw_error_vs_speed)):
        fig = draw(plt, res, ix)
        if fig is not None:
            out.append((name, fig))
    return out


def render_plots(res: RunResult, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>-verdicts.png``, ``<stem>-cost.png`` and ``<stem>-error-vs-speed.png`` into ``out_dir``
    (those the result has data for); returns the paths."""
    return save_figures(figures(res), out_dir, stem)


def save_figures(named: list[tuple[str, object]], out_dir: str | Path, stem: str) -> list[Path]:
    """Write each (name, figure) of :func:`figures` as ``<stem>-<name>.png`` and close it; returns the paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in named:
        p = out_dir / f"{stem}-{name}.png"
        fig.savefig(p, dpi=DPI)
        plt.close(fig)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------
# the verdict map
# ------------------------------------------------------------------------------------------------


def verdict_of(cell) -> str:
    """The verdict map's category of a CellRecord."""
    if cell.status != "ok" or cell.deterministic is None:
        return "not run"
    if cell.deterministic is False:
        return "nondeterministic"
    if cell.nonfinite:
        return "not comparable"
    return "batch-variant" if cell.batch_invariant is False else "identical"


def _cell_text(cell, ix: Index) -> str:
    """The distinct results of the cell's repeats (worst tensor), or what kept it from running."""
    reps = ix.repeats[(cell.subject, cell.backend, cell.dtype, cell.mode)]
    if reps:
        return str(max(r.n_distinct for r in reps))
    return {"refused": "ref", "error": "err", "unsupported": "n/a"}.get(cell.status, "-")


def draw_verdicts(plt, res: RunResult, ix: Index):
    """Rows subject / backend, columns dtype x mode, colour the verdict, text the distinct results."""
    from matplotlib.patches import Patch  # in here: matplotlib is optional

    if not res.cells:
        return None
    rows = list(dict.fromkeys((c.subject, c.backend) for c in res.cells))
    dtypes = [d for d in res.settings.dtypes if any(c.dtype == d for c in res.cells)]
    modes = [m for m in res.settings.modes if any(c.mode == m for c in res.cells)]
    cols = [(d, m) for d in dtypes for m in modes]
    width = max(2.6 + 0.62 * len(cols), 6.8)  # at least what two legend columns take
    ncol = 3 if width >= 9.5 else 2
    legend_rows = -(-len(VERDICTS) // ncol)
    height = 1.6 + 0.26 * len(rows) + 0.17 * legend_rows
    fig, ax = plt.subplots(figsize=(width, height))
    for y, (subject, backend) in enumerate(rows):
        for x, (dtype, mode) in enumerate(cols):
            cell = ix.cells.get((subject, backend, dtype, mode))
            verdict = verdict_of(cell) if cell is not None else "not run"
            colour = VERDICTS[verdict][0]
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=colour, edgecolor="white", linewidth=1.5))
            text = _cell_text(cell, ix) if cell is not None else "-"
            ax.text(x, y, text, ha="center", va="center", fontsize=7,
                    color="white" if verdict == "nondeterministic" else "black")
    # Lines between subjects and between dtypes.
    for y in range(1, len(rows)):
        if rows[y][0] != rows[y - 1][0]:
            ax.axhline(y - 0.5, color="black", linewidth=0.8)
    for x in range(len(modes), len(cols), len(modes)):
        ax.axvline(x - 0.5, color="black", linewidth=0.8)
    ax.set_xlim(-0.5, len(cols) - 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{d}\n{m}" for d, m in cols], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{s} / {b}" for s, b in rows], fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.legend(handles=[Patch(facecolor=colour, label=label) for colour, label in VERDICTS.values()],
               loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    n = res.settings.repeats
    fig.suptitle(f"verdicts - {res.environment.device_name}; cell text: distinct results in {n} repeats",
                 fontsize=9)
    fig.tight_layout(rect=(0, (0.15 + 0.17 * legend_rows) / height, 1, 1 - 0.3 / height))
    return fig


# ------------------------------------------------------------------------------------------------
# axes with real ticks
# ------------------------------------------------------------------------------------------------


def _log_axis(axis, lo: float, hi: float, unit: str = "") -> tuple[float, float]:
    """A log axis over [lo, hi] plus a margin, with at least three labelled ticks: evenly stepped values
    (0.5, 0.75, 1, 1.25 ...) when the range is under a decade and a bit, else 1-2-5 (or 1) per decade.
    Returns the limits to set."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator  # optional

    pad = 10 ** (0.08 * max(math.log10(hi / lo), 0.3))
    lo, hi = lo / pad, hi * pad
    decades = math.log10(hi / lo)
    if decades < 1.2:
        raw = (hi - lo) / 5
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        ticks = [round(k * step, 12) for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
        axis.set_major_locator(FixedLocator([t for t in ticks if t > 0]))
    else:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 4 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())
    return lo, hi


# ------------------------------------------------------------------------------------------------
# the cost of determinism
# ------------------------------------------------------------------------------------------------


def draw_cost(plt, res: RunResult, ix: Index):
    """One panel per subject: every ratio of the cost table (rows backend dtype), with its interval."""
    from matplotlib.lines import Line2D  # in here: matplotlib is optional

    rows = cost_rows(ix)
    modes = [m for m in res.settings.modes if m != "default"]
    series = [(m, f"{m} / default") for m in modes] + [("twin_ratio", "det / twin")]
    panels: dict[str, list] = defaultdict(list)
    for r in rows:
        ratios = {label: r[key] for key, label in series if isinstance(r[key], RatioCell)}
        if ratios:
            panels[r["subject"]].append((f"{r['backend']} {r['dtype']}", ratios))
    if not panels:
        return None
    labels = [label for _, label in series if any(label in x[1] for p in panels.values() for x in p)]
    values = [v for p in panels.values() for _, rs in p for r in rs.values() for v in (r.lo, r.hi) if v > 0]
    lo, hi = min(values + [1.0]), max(values + [1.0])
    colours = dict(zip(labels, ("tab:blue", "tab:orange", "tab:purple", "tab:green")))
    markers = dict(zip(labels, ("o", "s", "D", "^")))
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    tallest = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, nrow * (0.9 + 0.24 * tallest) + 1.0), squeeze=False)
    step = 0.7 / max(1, len(labels))
    for ax, (subject, entries) in zip(axes.flat, panels.items()):
        for i, label in enumerate(labels):
            pts = [(y - 0.35 + step * (i + 0.5), ratios[label]) for y, (_, ratios) in enumerate(entries)
                   if label in ratios]
            if not pts:
                continue
            c = colours[label]
            ax.errorbar([r.mid for _, r in pts], [y for y, _ in pts], fmt="none", ecolor=c, elinewidth=0.8, capsize=2,
                        xerr=[[max(r.mid - r.lo, 0) for _, r in pts], [max(r.hi - r.mid, 0) for _, r in pts]])
            for noisy in (False, True):
                sel = [(y, r) for y, r in pts if bool(r.noise) == noisy]
                if sel:
                    ax.plot([r.mid for _, r in sel], [y for y, _ in sel], marker=markers[label], markersize=4.5,
                            linestyle="none", color=c, markerfacecolor="white" if noisy else c)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(*_log_axis(ax.xaxis, lo, hi, "×"))
        ax.set_yticks(range(len(entries)))
        ax.set_yticklabels([e[0] for e in entries], fontsize=7)
        ax.set_ylim(len(entries) - 0.5, -0.5)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", linewidth=0.3, alpha=0.6)
        ax.set_title(subject, fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], marker=markers[label], color=colours[label], linestyle="none", label=label)
               for label in labels]
    handles.append(Line2D([], [], marker="o", color="grey", markerfacecolor="white", linestyle="none",
                          label="hollow: marked ~ (noise, load or includes 1×)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    paired = all(r.paired for p in panels.values() for _, rs in p for r in rs.values())
    bars = ("quartiles of the per-round ratios" if paired
            else "the range the quartiles allow; some pairs not timed in one loop (older result)")
    fig.suptitle(f"cost of determinism, fwd+bwd time ratio (log scale; bars: {bars}; > 1×: slower) - "
                 f"{res.environment.device_name}", fontsize=9)
    fig.tight_layout(rect=(0, 0.25 / (nrow * (0.9 + 0.24 * tallest) + 1.0), 1, 0.97))
    return fig


# ------------------------------------------------------------------------------------------------
# error vs speed
# ------------------------------------------------------------------------------------------------


def draw_error_vs_speed(plt, res: RunResult, ix: Index):
    """One scatter per subject: fwd+bwd time against error vs fp64, default mode."""
    from matplotlib.lines import Line2D  # in here: matplotlib is optional
    from matplotlib.ticker import FuncFormatter

    points = defaultdict(list)
    for c in res.cells:
        if c.mode != "default":
            continue
        v = ix.view(c)
        if v.both_s and v.both_s > 0 and v.rel_l2 is not None and math.isfinite(v.rel_l2) and v.rel_l2 > 0:
            points[c.subject].append((v.both_s * 1e3, v.rel_l2, c.backend, c.dtype, v.nondeterministic,
                                      v.batch_variant))
    subjects = [s.subject for s in res.subjects if points[s.subject]]
    if not subjects:
        return None
    backends = list(dict.fromkeys(p[2] for s in subjects for p in points[s]))
    cmap = plt.get_cmap("tab10")
    colours = {b: cmap(i % 10) for i, b in enumerate(backends)}
    dtypes = list(dict.fromkeys(p[3] for s in subjects for p in points[s]))
    ncol = min(3, len(subjects))
    nrow = -(-len(subjects) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.1 * nrow + 1.0), squeeze=False)
    for ax, subject in zip(axes.flat, subjects):
        pts = points[subject]
        for dtype in dtypes:
            sel = [p for p in pts if p[3] == dtype]
            if sel:
                ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=DTYPE_MARKERS.get(dtype, "x"), s=26,
                           color=[colours[p[2]] for p in sel], zorder=3)
        for flag, style in ((5, dict(marker="o", s=110, facecolors="none", edgecolors="black", linewidths=0.8,
                                     zorder=2)),
                            (4, dict(marker="x", s=60, color="red", linewidths=1.2, zorder=4))):
            sel = [p for p in pts if p[flag]]
            if sel:
                ax.scatter([p[0] for p in sel], [p[1] for p in sel], **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(*_log_axis(ax.xaxis, min(p[0] for p in pts), max(p[0] for p in pts)))
        ax.set_ylim(*_log_axis(ax.yaxis, min(p[1] for p in pts), max(p[1] for p in pts)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}" if v < 1e-2 else f"{v:g}"))
        ax.set_title(subject, fontsize=9)
        ax.set_xlabel("fwd+bwd median (ms)", fontsize=7)
        ax.set_ylabel("rel L2 error vs fp64", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(linewidth=0.3, alpha=0.6)
    for ax in list(axes.flat)[len(subjects):]:
        ax.set_visible(False)
    handles = [Line2D([], [], marker="o", color=colours[b], linestyle="none", label=b) for b in backends]
    handles += [Line2D([], [], marker=DTYPE_MARKERS.get(d, "x"), color="grey", linestyle="none", label=d)
                for d in dtypes]
    handles += [Line2D([], [], marker="o", markersize=9, markerfacecolor="none", markeredgecolor="black",
                       linestyle="none", label="batch-variant"),
                Line2D([], [], marker="x", color="red", linestyle="none", label="nondeterministic")]
    per_row = 10
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), per_row), fontsize=7, frameon=False)
    fig.suptitle(f"error vs speed, default mode - {res.environment.device_name}", fontsize=9)
    fig.tight_layout(rect=(0, 0.3 / (3.1 * nrow + 1.0) * -(-len(handles) // per_row) + 0.01, 1, 0.97))
    return fig
