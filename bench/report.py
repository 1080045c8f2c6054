"""Rendering a stored ``detbench run`` result: the summaries every view shares, Markdown and plots.

Everything here reads a :class:`bench.results.RunResult`; nothing measures and nothing prints. The
terminal tables are ``bench.cli.report.print_run`` (shared by ``detbench run`` and ``detbench report``,
so what a run shows and what ``report`` re-renders from the file are the same), built on
:class:`Index`, :func:`cost_rows` and :func:`agreement_lines` from here.

* :func:`render_markdown` - the same as Markdown (written next to each result by ``detbench run``).
* the PNGs are ``bench.plots`` (verdict map, cost of determinism, error vs speed; needs matplotlib).

A time or a ratio that cannot be read as a measurement carries ``~`` (:func:`bench.timing.noise`): a
wide interval, too few rounds, a loaded machine, a cell whose fwd+bwd is faster than one of its parts,
a ratio whose interval includes 1x, or (files before ``detbench.run/2``) a ratio of two separate loops.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

from bench import timing
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
    """The clause saying how many more tensors differ ("" for none); compact or not, it names what "+n" counts."""
    if n <= 0:
        return ""
    return f"(+{n} more)" if compact else f"(+{n} more tensor{'s' if n > 1 else ''})"


def join_clauses(clauses: list[str]) -> str:
    """A verdict's clauses on one line, as the Markdown shows it: ``DIFFERS: 3 distinct in 20 · out 177/4096 el,
    7 ulp (+1 more tensor)`` (a bracketed clause follows its neighbour with a space, the others with `` · ``)."""
    out = ""
    for c in clauses:
        out += c if not out else (f" {c}" if c[:1] in "([" else f" · {c}")
    return out


# A space a wrapped verdict may break at: not one before a unit (``177/4096 el``, ``7 ulp``, ``3 distinct``)
# nor around "in" (``3 distinct in 20``).
_BREAKABLE = re.compile(r"(?<!\bin) (?!(?:el|ulp|distinct|more|tensors?|in)\b)")


def _tokens(clause: str, width: int) -> list[str]:
    """A clause cut after each comma (``177/4096 el,`` / ``7 ulp``); a piece still wider than ``width`` cut at
    the spaces :data:`_BREAKABLE` allows."""
    parts = clause.split(", ")
    out = []
    for piece in [p + "," for p in parts[:-1]] + parts[-1:]:
        out += _BREAKABLE.split(piece) if len(piece) > width else [piece]
    return out


def wrap_clauses(clauses: list[str], width: int) -> list[str]:
    """A verdict's lines for a column ``width`` wide: each clause starts a line, one wider than ``width``
    breaks after a comma first, and a number never parts from its unit, so no line reads as a verdict of
    its own (``DIFFERS @1,3`` / ``out 177/4096 el, 832 ulp`` / ``(+1 more tensor)``). A token wider than
    ``width`` stays whole: the line is wider."""
    lines = []
    for clause in clauses:
        line = ""
        for token in _tokens(clause, width):
            if line and len(line) + 1 + len(token) > width:
                lines.append(line)
                line = ""
            line = f"{line} {token}" if line else token
        lines.append(line)
    return lines


@dataclass
class CellView:
    """What the tables show for one cell (plain strings plus flags for styling)."""

    subject: str
    backend: str
    dtype: str
    mode: str
    status: str
    run_to_run: str                # the clauses below on one line (join_clauses)
    batch: str
    run_to_run_clauses: list[str]  # pieces a terminal may put on separate lines (wrap_clauses), never split
    batch_clauses: list[str]
    claim_broken: bool             # registered deterministic=True, and the repeats differ
    rng_consumed: list[str]        # generators the call advanced although each repeat was reseeded
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
    time_noise: dict[str, list[str]]  # phase -> why its time is marked ~ (empty lists: not marked)

    @property
    def times_noisy(self) -> bool:
        return any(self.time_noise.values())


class RatioCell(NamedTuple):
    """A time ratio as the tables show it: median, interval, and every reason it is marked ``~``."""

    mid: float
    lo: float
    hi: float
    noise: tuple[str, ...]
    paired: bool                   # per-round ratios of one interleaved loop (False: two separate loops)


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
        env = result.environment
        self.cpus = env.cpu_affinity or env.cpu_count
        self.device_type = env.device_type

    def time(self, subject, backend, dtype, mode, phase="fwd+bwd") -> float | None:
        t = self.timings.get((subject, backend, dtype, mode, phase))
        return t.median_s if t else None

    def _phases(self, k: tuple) -> dict:
        return {ph: self.timings[k + (ph,)] for ph in timing.PHASES if k + (ph,) in self.timings}

    def inconsistency(self, k: tuple) -> str | None:
        """Why the phases of cell ``k`` contradict each other (fwd+bwd faster than a part), or None."""
        return timing.inconsistency(self._phases(k))

    def time_noise(self, k: tuple) -> dict[str, list[str]]:
        """Phase -> why the time of cell ``k`` in that phase is marked ``~`` (its own spread and the load of
        its loop; every phase when the cell's parts contradict each other)."""
        out = {ph: timing.noise(t, self.cpus, self.device_type) for ph, t in self._phases(k).items()}
        bad = self.inconsistency(k)
        if bad:
            for reasons in out.values():
                reasons.insert(0, bad)
        return out

    def ratio(self, a: tuple, b: tuple, phase="fwd+bwd") -> RatioCell | None:
        """time(a) / time(b): per-round ratios when both were timed in one loop (their median and quartiles),
        else the medians' ratio with the range the quartiles allow (q1a/q3b, q3a/q1b); with its ``~`` reasons."""
        ta, tb = self.timings.get(a + (phase,)), self.timings.get(b + (phase,))
        if ta is None or tb is None:
            return None
        paired = bool(ta.loop) and ta.loop == tb.loop and ta.samples_s and len(ta.samples_s) == len(tb.samples_s)
        r = timing.paired_ratio(ta.samples_s, tb.samples_s) if paired else timing.crosswise_ratio(ta, tb)
        if r is None:
            return None
        noise = []
        if r.lo <= 1.0 <= r.hi:
            noise.append("includes 1×")
        noise += [x for x in [timing.spread(r.mid, r.lo, r.hi, r.rounds)] if x]
        if not paired:
            noise.append("separate loops (the two times were not interleaved: a result from before detbench.run/2)")
        for t in (ta, tb):
            noise += timing.load_reasons(t.load1, t.cpu_share, t.threads, self.cpus, self.device_type)
        for k in (a, b):
            bad = self.inconsistency(k)
            if bad:
                noise.append(f"{bad[:-1]} in {k[1]} {k[3]})")
        return RatioCell(r.mid, r.lo, r.hi, tuple(dict.fromkeys(noise)), paired)

    def view(self, cell, compact: bool = False) -> CellView:
        k = (cell.subject, cell.backend, cell.dtype, cell.mode)
        reps, batch, acc = self.repeats[k], self.batch[k], self.accuracy[k]
        nondet = cell.deterministic is False
        rng = list(cell.rng_consumed or [])
        # run to run, as clauses (see wrap_clauses)
        if cell.status == "unsupported":
            r2r = [f"unsupported: {cell.reason}"]
        elif cell.status == "refused":
            r2r = [f"refused: {cell.reason}"]
        elif cell.status == "error" and not reps:
            r2r = [f"error {cell.reason}"]
        elif cell.deterministic:
            r2r = [f"same ×{cell.repeats}, given the seed", f"consumes RNG ({', '.join(rng)})"] if rng else [
                f"same ×{cell.repeats}"]
        else:
            bad = [r for r in reps if r.n_equal_to_first != r.repeats]
            w = _first_of(bad, lambda r: (r.max_n_diff, r.max_ulp))
            distinct = max((r.n_distinct for r in reps), default=0)
            r2r = ["BREAKS deterministic claim"] if cell.claim_broken else []
            r2r.append(f"DIFFERS: {distinct} distinct in {cell.repeats}")
            if w is not None:
                n = f"{w.max_n_diff}" if compact else f"{w.max_n_diff}/{w.n_total}"
                r2r += [f"{w.tensor} {n} el, {w.max_ulp} ulp", _more(len(bad) - 1, compact)]
            if rng:
                r2r.append(f"consumes RNG ({', '.join(rng)})")
        if cell.status == "error" and reps:
            r2r.append(f"(then error {cell.reason})")
        if cell.nonfinite:
            r2r.append("[NaN/inf]")
        r2r = [c for c in r2r if c]
        # batch invariance
        if not batch:
            bt = ["-" if cell.batch_invariant is None else ("same" if cell.batch_invariant else "differs")]
        else:
            sizes = sorted({b.rows for b in batch})
            bad = [b for b in batch if not b.equal]
            if not bad:
                bt = ["same @" + ",".join(map(str, sizes))]
            else:
                w = _first_of(bad, lambda b: (b.max_ulp, b.n_diff))
                others = {b.tensor for b in bad} - {w.tensor}
                n = f"{w.n_diff}" if compact else f"{w.n_diff}/{w.n_total}"
                bt = [f"DIFFERS @{','.join(map(str, sorted({b.rows for b in bad})))}",
                      f"{w.tensor} {n} el, {w.max_ulp} ulp", _more(len(others), compact)]
                if nondet:  # the full batch itself changes from run to run
                    bt.append("(includes run-to-run noise)")
                bt = [c for c in bt if c]
        # accuracy: the worst tensor
        rels = [a.rel_l2 for a in acc]
        rel = float("nan") if any(math.isnan(x) for x in rels) else max(rels, default=None)
        eager = max((a.eager_rel_l2 for a in acc if not math.isnan(a.eager_rel_l2)), default=None)
        ulp = max((a.max_ulp for a in acc), default=None)
        eager_ulp = max((a.eager_max_ulp for a in acc if not math.isnan(a.eager_max_ulp)), default=None)
        worse = bool(acc) and rel is not None and eager is not None and (
            math.isnan(rel) or rel > 2 * eager + 1e-12)
        # time
        t = {ph: self.time(*k, ph) for ph in timing.PHASES}
        noise = self.time_noise(k)
        info = self.subjects.get(cell.subject)
        rate = "-"
        tr = self.timings.get(k + ("fwd+bwd",))
        if tr is not None and info is not None and tr.median_s > 0:
            rate = (fmt_rate(tr.flops / tr.median_s, "FLOP/s") if info.bound == "flops"
                    else fmt_rate(tr.bytes / tr.median_s, "B/s"))
        return CellView(
            subject=cell.subject, backend=cell.backend, dtype=cell.dtype, mode=cell.mode, status=cell.status,
            run_to_run=join_clauses(r2r), batch=join_clauses(bt), run_to_run_clauses=r2r, batch_clauses=bt,
            claim_broken=cell.claim_broken, rng_consumed=rng, err=fmt_err(rel), eager_err=fmt_err(eager),
            ulp="-" if ulp is None else f"{ulp:.3g}" + (f" ({eager_ulp:.3g})" if eager_ulp is not None else ""),
            fwd=_marked(fmt_time(t["fwd"]), noise.get("fwd")), bwd=_marked(fmt_time(t["bwd"]), noise.get("bwd")),
            both=_marked(fmt_time(t["fwd+bwd"]), noise.get("fwd+bwd")), rate=rate,
            nondeterministic=nondet, batch_variant=any(not b.equal for b in batch), worse_than_eager=worse,
            both_s=t["fwd+bwd"], rel_l2=rel, time_noise=noise,
        )


def _marked(text: str, reasons: list[str] | None) -> str:
    return f"{text} ~" if reasons and text != "-" else text


def cost_rows(ix: Index) -> list[dict]:
    """Time ratios measured in the same run: each mode / default, and deterministic kernel / its twin.

    Each ratio is a :class:`RatioCell` (:meth:`Index.ratio`): from a loop that timed both cells round by
    round, the median of the per-round ratios and their quartiles; ``noise`` says why it is marked ``~``.
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


def fmt_ratio(r: RatioCell | str | None) -> str:
    if isinstance(r, str):
        return r
    if r is None:
        return "-"
    text = f"{_x(r.mid)}× [{_x(r.lo)}–{_x(r.hi)}]"
    return text + " ~" if r.noise else text


def _x(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.2g}"


def ratio_notes(row: dict, modes: list[str]) -> list[str]:
    """The kinds of reason behind the ``~`` marks of one cost row ("includes 1×", "wide interval", "loaded"...)."""
    notes = [timing.kind(n) for r in [row[m] for m in modes] + [row["twin_ratio"]] if isinstance(r, RatioCell)
             for n in r.noise]
    return list(dict.fromkeys(notes))


COST_LEGEND = (f"`~`: not to be read as a measured difference: the interval includes 1×, its quartile range is "
               f"over {timing.SPREAD_LIMIT:.0%} of the ratio, fewer than {timing.MIN_ROUNDS} rounds were timed, "
               f"the machine was loaded (1-minute load average over {timing.LOAD_LIMIT:g} per CPU, or on the CPU "
               f"the process got under {timing.SHARE_LIMIT:g} CPU seconds per second), a cell's fwd+bwd was "
               f"faster than one of its parts, or the two times come from separate loops (older results)")


def load_line(res: RunResult) -> str | None:
    """How loaded the machine was while the cells were timed (None: nothing was timed)."""
    if not res.timings:
        return None
    env = res.environment
    cpus = env.cpu_affinity or env.cpu_count
    loops: dict = {}
    for t in res.timings:
        loops.setdefault(t.loop or (t.subject, t.backend, t.dtype, t.mode), t)
    recorded = [t for t in loops.values() if t.load1 is not None or t.cpu_share is not None]
    if not recorded:
        return ("timing: load not recorded (this result predates it); its ratios compare separately timed "
                "cells and are marked ~")
    loads = [t.load1 for t in recorded if t.load1 is not None]
    shares = [t.cpu_share for t in recorded if t.cpu_share is not None]
    busy = [t for t in recorded if timing.load_reasons(t.load1, t.cpu_share, t.threads, cpus, env.device_type)]
    parts = [f"timing: {len(loops)} interleaved loop{'s' if len(loops) != 1 else ''}"]
    if loads:
        parts.append(f"1-minute load average {min(loads):.1f}–{max(loads):.1f} on {cpus} CPUs")
    if shares:
        parts.append(f"CPU share {min(shares):.2f}–{max(shares):.2f} of {recorded[0].threads} threads")
    verdict = (f"loaded during {len(busy)} of {len(recorded)} loops: their times and ratios are marked ~" if busy
               else "not loaded")
    return "; ".join(parts) + f"; {verdict}"


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


# How many cells the status line names per kind before "+N more".
STATUS_NAMES = 3


def cell_label(c) -> str:
    """``subject/backend dtype mode``: how the status line names a cell."""
    return f"{c.subject}/{c.backend} {c.dtype} {c.mode}"


def _named(cells: list, what: str, cap: int = STATUS_NAMES) -> str:
    """``2 nondeterministic (a, b)``; past ``cap`` names ``(a, b, c, +4 more)``; ``0 what`` when none."""
    if not cells:
        return f"0 {what}"
    names = [cell_label(c) for c in cells[:cap]] + ([f"+{len(cells) - cap} more"] if len(cells) > cap else [])
    return f"{len(cells)} {what} ({', '.join(names)})"


def _counts(res: RunResult) -> str:
    """The cell counts of the status line, naming the cells that failed a check (:func:`_named`)."""
    cells = res.cells
    parts = [f"{len(cells)} cells", _named([c for c in cells if c.deterministic is False], "nondeterministic"),
             _named([c for c in cells if c.batch_invariant is False], "batch-variant")]
    for pick, what in ((lambda c: c.claim_broken, "breaking their deterministic claim"),
                       (lambda c: c.rng_consumed, "consuming RNG (deterministic given the seed)"),
                       (lambda c: c.status == "error", "errors")):
        chosen = [c for c in cells if pick(c)]
        if chosen:
            parts.append(_named(chosen, what))
    parts += [f"{x} {name}" for x, name in ((sum(c.status == "refused" for c in cells), "refused"),
                                             (sum(c.status == "unsupported" for c in cells), "unsupported")) if x]
    return ", ".join(parts)


def status_line(res: RunResult) -> str:
    """``status: complete; 12 cells, 1 nondeterministic (linear/planted-nondet fp32 default), ...``."""
    return f"status: {res.status}" + (f" - {res.stopped_at}" if res.stopped_at else "") + f"; {_counts(res)}"


def header_lines(res: RunResult) -> list[str]:
    env, s = res.environment, res.settings
    hw = f"{env.device_name}" + (f", {env.sm_count} SMs" if env.sm_count else f", {env.torch_threads} torch threads")
    lines = [
        f"device {env.device} ({hw}); torch {env.torch}, triton {env.triton or '-'}"
        + (f", CUDA {env.cuda}, driver {env.driver}" if env.device_type == "cuda" else ""),
        f"preset {s.preset}{' (quick shapes)' if s.quick else ''}; seed {s.seed}; "
        f"commit {(env.detbench_commit or '?')[:10]}{' (dirty)' if env.detbench_dirty else ''}",
        status_line(res),
        bound_sentence(s.repeats) + ".",
    ]
    load = load_line(res)
    if load:
        lines.append(load)
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
            "reference (worst tensor), next to eager PyTorch's in the same dtype. Times are medians of rounds "
            "that alternate every cell of a subject and dtype; `~` marks a time whose quartile range is over "
            f"{timing.SPREAD_LIMIT:.0%} of it, taken on a loaded machine, or from a cell whose fwd+bwd was "
            "faster than one of its parts.", ""]
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
        bad = [f"{c.backend} {c.dtype} {c.mode}: {why}" for c in cells
               if (why := ix.inconsistency((c.subject, c.backend, c.dtype, c.mode)))]
        if bad:
            out += ["", "Phases that contradict each other (all three times marked ~): " + "; ".join(bad) + "."]
        out.append("")
    rows = cost_rows(ix)
    modes = [m for m in res.settings.modes if m != "default"]
    if rows:
        out += ["## Cost of determinism", "",
                "Fwd+bwd time under each mode divided by the same backend's time under `default`, and a "
                "deterministic kernel's time divided by its nondeterministic twin's, both timed in one loop that "
                "alternates the cells round by round: the median of the per-round ratios, in brackets their "
                f"quartiles. {COST_LEGEND}; the last column says which (the load is in the header above, "
                "contradicting phases under each subject's table).", ""]
        head = ["subject", "backend", "dtype", "default"] + [f"{m} / default" for m in modes] + ["det / twin", "~"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["subject"], r["backend"], r["dtype"], fmt_time(r["default_s"])]
            cells += [fmt_ratio(r[m]) for m in modes]
            cells.append(f"{fmt_ratio(r['twin_ratio'])} vs {r['twin']}" if r["twin_ratio"] else "-")
            cells.append(_md_escape("; ".join(ratio_notes(r, modes))) or "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    lines = agreement_lines(res)
    if lines:
        out += ["## Cross-backend agreement", "", *[f"- {_md_escape(x)}" for x in lines], ""]
    if res.skipped:
        out += ["## Not run", "", *[f"- {_md_escape(x)}" for x in res.skipped], ""]
    return "\n".join(out)
