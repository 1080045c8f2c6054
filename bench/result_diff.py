"""Two stored results of the same command, cell by cell: did an upgrade change anything?

::

    a, b = load_result_file("before.json"), load_result_file("after.json")
    diff = diff_results(a, b)
    print(render_markdown(diff))        # or bench.cli.compare's terminal tables
    raise SystemExit(1 if diff.worse() else 0)

``detbench run`` results are compared per cell (subject x backend x dtype x mode): the verdict of each
side, whether it got worse (identical -> batch-variant -> nondeterministic, or a comparable cell that
became not comparable, refused, unsupported or failing), the error against float64, and the time ratio
B/A with the range the quartiles allow. ``detbench sft`` results are compared per configuration and per
data-parallel setup: the verdict, and whether repeat 0's loss curve kept its bits. The environments'
differences (versions, device, flags) and the settings' come first. Cells present on one side only are
kept, marked ``only in A`` / ``only in B``.

Nothing here measures or prints; :func:`render_markdown` returns text.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from bench import sft, timing
from bench.errors import InputError
from bench.report import Index, fmt_err, fmt_time
from bench.results import RunResult, load_result, run_kinds, to_json

__all__ = ["CompareError", "load_result_file", "diff_results", "ResultDiff", "Section", "CellDiff", "TimeRatio",
           "EnvChange", "render_markdown", "summary_line", "VERDICTS"]

# Verdict classes, best first. The first three are measurements and are ordered; the others say why a
# cell has no measurement (``not comparable``: a non-finite output, where equal bits prove nothing).
IDENTICAL, BATCH_VARIANT, NONDET = "identical", "batch-variant", "nondeterministic"
NOT_COMPARABLE, REFUSED, UNSUPPORTED, ERROR = "not comparable", "refused", "unsupported", "error"
VERDICTS = (IDENTICAL, BATCH_VARIANT, NONDET, NOT_COMPARABLE, REFUSED, UNSUPPORTED, ERROR)
_RANK = {IDENTICAL: 0, BATCH_VARIANT: 1, NONDET: 2}

# Changes of a cell's verdict (CellDiff.change).
WORSE, BETTER, SAME, CHANGED, ONLY_A, ONLY_B = "worse", "better", "same", "changed", "only in A", "only in B"

# An error against float64 counts as higher (lower) when it is more than this factor above (below) the other
# side's: the factor detbench report uses to call a backend's error worse than eager's.
ERROR_FACTOR = 2.0

# Default --time-threshold: a time changed when the whole quartile range of B/A lies beyond 1 +- 10%. Two
# runs are not interleaved (minutes or machines apart), so their noise is wider than one run's quartiles.
DEFAULT_TIME_THRESHOLD = 0.10

_KINDS = {**run_kinds(), sft.SCHEMA: sft.SFTResult}
_KIND_NAMES = {RunResult: "run", sft.SFTResult: "sft"}

# Environment fields shown when they differ, in this order (run and sft results share bench.results.Environment).
_ENV_FIELDS = ("device", "device_name", "sm_count", "compute_capability", "gpu_memory_bytes", "cpu_model",
               "cpu_count", "cpu_affinity", "torch_threads", "torch", "triton", "cuda", "cudnn", "driver",
               "python", "numpy", "platform", "detbench_commit", "detbench_dirty", "env", "torch_flags")
# Settings that only select cells (they show up as cells on one side) or name a file: not listed as changes.
_SELECTION = {"subjects", "backends", "dtypes", "modes", "attention", "lrs", "out"}


class CompareError(InputError):
    """Two results that cannot be compared (different commands); the message names the fix."""


def load_result_file(path: str | os.PathLike) -> RunResult | sft.SFTResult:
    """A ``detbench run`` or ``detbench sft`` result file, typed (bench.results.ResultFileError otherwise)."""
    return load_result(path, _KINDS)


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------


@dataclass
class TimeRatio:
    """Median time of B over A's for one phase of one cell, with the range the quartiles allow."""

    phase: str
    a_s: float
    b_s: float
    ratio: float                   # median B / median A
    low: float                     # q1 B / q3 A
    high: float                    # q3 B / q1 A
    change: str                    # slower | faster | same (the range reaches within the threshold of 1)
    noise: list[str] = field(default_factory=list)  # why A's or B's time is marked ~ in its own result


@dataclass
class CellDiff:
    """One cell (or sft configuration / setup) as A and B hold it."""

    key: list[str]                 # the values of Section.key_names
    a: str | None                  # verdict class (VERDICTS) in A; None: absent from A
    b: str | None
    a_text: str | None             # the result's own words for it
    b_text: str | None
    change: str                    # worse | better | same | changed | only in A | only in B
    a_error: float | None = None   # run: worst relative L2 error against float64
    b_error: float | None = None
    error_change: str = "-"        # run: same | higher | lower | changed; sft: the loss curve, same | differs
    error_text: str = "-"
    time: TimeRatio | None = None
    notes: list[str] = field(default_factory=list)

    def interesting(self) -> bool:
        """Anything changed: the verdict, the error or loss curve, the time, or a cell on one side only."""
        return (self.change != SAME or self.error_change not in (SAME, "-")
                or (self.time is not None and self.time.change != SAME) or bool(self.notes))


@dataclass
class Section:
    """A table of cells sharing their key columns."""

    title: str
    key_names: list[str]
    error_name: str                # the column comparing values: "err vs fp64" or "loss curve"
    cells: list[CellDiff]


@dataclass
class EnvChange:
    what: str                      # "torch", "torch_flags.deterministic_algorithms", "settings.repeats" ...
    a: Any
    b: Any


@dataclass
class ResultDiff:
    kind: str                      # run | sft
    a_path: str
    b_path: str
    a_status: str
    b_status: str
    environment: list[EnvChange]   # environment fields that differ
    settings: list[EnvChange]      # settings that differ (besides the selection of cells)
    same: list[str]                # what both share, for the header ("device cpu (Xeon)", "torch 2.6.0" ...)
    sections: list[Section]
    time_phase: str
    time_threshold: float
    notes: list[str]               # what was not compared and why

    def cells(self) -> list[CellDiff]:
        return [c for s in self.sections for c in s.cells]

    def worse(self) -> list[CellDiff]:
        return [c for c in self.cells() if c.change == WORSE]


# ------------------------------------------------------------------------------------------------
# verdicts
# ------------------------------------------------------------------------------------------------


def verdict_change(a: str | None, b: str | None) -> str:
    """How B's verdict class stands to A's. Worse: a measured cell ranks lower (identical -> batch-variant ->
    nondeterministic), loses its measurement (not comparable, refused, unsupported, error), or a cell starts
    failing; better: the reverse; changed: one reason for no measurement became another."""
    if a is None:
        return ONLY_B
    if b is None:
        return ONLY_A
    if a == b:
        return SAME
    if a in _RANK and b in _RANK:
        return WORSE if _RANK[b] > _RANK[a] else BETTER
    if a in _RANK:
        return WORSE
    if b in _RANK:
        return BETTER
    if b == ERROR:
        return WORSE
    if a == ERROR:
        return BETTER
    return CHANGED


def run_verdict(cell) -> str:
    """The verdict class of one ``detbench run`` cell (bench.results.CellRecord)."""
    if cell.status in (REFUSED, UNSUPPORTED, ERROR):
        return cell.status
    if cell.nonfinite or cell.deterministic is None:
        return NOT_COMPARABLE
    if not cell.deterministic:
        return NONDET
    return BATCH_VARIANT if cell.batch_invariant is False else IDENTICAL


def _run_text(ix: Index, cell, verdict: str) -> str:
    view = ix.view(cell, compact=True)
    if verdict == IDENTICAL:
        return f"identical ×{cell.repeats}"
    if verdict == BATCH_VARIANT:
        return f"batch-variant: {view.batch}"
    if verdict == NONDET:
        return f"nondeterministic: {view.run_to_run}"
    return view.run_to_run if verdict != NOT_COMPARABLE else f"not comparable: {view.run_to_run}"


# ------------------------------------------------------------------------------------------------
# values: errors, loss curves, times
# ------------------------------------------------------------------------------------------------


def error_change(a: float | None, b: float | None) -> str:
    """same (equal, NaN counting as equal to NaN), higher / lower (beyond ERROR_FACTOR, or NaN on one side),
    changed (a different value within the factor), ``-`` (missing on a side)."""
    if a is None or b is None:
        return "-"
    if a == b or (math.isnan(a) and math.isnan(b)):
        return SAME
    if math.isnan(b) or b > ERROR_FACTOR * a:
        return "higher"
    if math.isnan(a) or a > ERROR_FACTOR * b:
        return "lower"
    return CHANGED


def time_ratio(phase: str, ta, tb, threshold: float, noise: list[str] | None = None) -> TimeRatio | None:
    """B's time over A's for two bench.results.TimingRecord: the medians' ratio with the range the quartiles
    allow (bench.timing.crosswise_ratio: two runs are never one loop). Slower: the whole range lies above
    1 + threshold; faster: below 1 / (1 + threshold); otherwise same. ``noise``: why either time is marked ~
    in its own result (it is kept next to the change, which it does not alter). None when a time is missing."""
    if ta is None or tb is None:
        return None
    r = timing.crosswise_ratio(tb, ta)
    if r is None:
        return None
    change = "slower" if r.lo > 1 + threshold else "faster" if r.hi < 1 / (1 + threshold) else SAME
    return TimeRatio(phase=phase, a_s=ta.median_s, b_s=tb.median_s, ratio=r.mid, low=r.lo, high=r.hi,
                     change=change, noise=list(noise or []))


def fmt_time_ratio(t: TimeRatio | None) -> str:
    """``1.52× [1.31–1.80]``: the median ratio and its range (TimeRatio.change says whether it counts)."""
    return "-" if t is None else f"{t.ratio:.2f}× [{t.low:.2f}–{t.high:.2f}]"


def fmt_time_change(t: TimeRatio | None, markdown: bool = False) -> str:
    """``slower`` / ``faster`` (bold in Markdown), ``~`` when within the threshold, and after a change ``~``
    plus the kinds of noise when a side's time was marked in its own run (``slower ~ loaded``)."""
    if t is None:
        return "-"
    if t.change == SAME:
        return "~"
    kinds = ", ".join(dict.fromkeys(timing.kind(r.split(" ", 1)[1]) for r in t.noise))
    word = f"**{t.change}**" if markdown else t.change
    return f"{word} ~ {kinds}" if kinds else word


def fmt_error_change(a: float | None, b: float | None) -> str:
    """``= 1.2e-07`` when equal, else ``A → B`` with digits enough to tell them apart."""
    if a is None and b is None:
        return "-"
    if error_change(a, b) == SAME:
        return f"= {fmt_err(a)}"
    digits = next((d for d in (1, 3, 6) if a is None or b is None or math.isnan(a) or math.isnan(b)
                   or f"{a:.{d}e}" != f"{b:.{d}e}"), 16)
    fmt = lambda x: fmt_err(x) if x is None or not math.isfinite(x) or x == 0 else f"{x:.{digits}e}"  # noqa: E731
    return f"{fmt(a)} → {fmt(b)}"


def loss_curve_change(a_bits: list[str], a_losses: list[float], b_bits: list[str],
                      b_losses: list[float]) -> tuple[str, str]:
    """Repeat 0's loss curve of B against A's, bit for bit over the steps both ran: (same | differs | -, words)."""
    n = min(len(a_bits), len(b_bits))
    if n == 0:
        return "-", "-"
    extra = f" (first {n} steps; A ran {len(a_bits)}, B {len(b_bits)})" if len(a_bits) != len(b_bits) else ""
    first = next((k for k in range(n) if a_bits[k] != b_bits[k]), None)
    if first is None:
        return SAME, f"same bits over {n} steps{extra}"
    worst = max(abs(b_losses[k] - a_losses[k]) for k in range(first, n))
    return "differs", f"differs from step {first + 1}, max |Δloss| {worst:.2e}{extra}"


# ------------------------------------------------------------------------------------------------
# environment and settings
# ------------------------------------------------------------------------------------------------


def _as_dict(value: Any) -> dict:
    value = to_json(value)
    return value if isinstance(value, dict) else {}


def _dict_changes(prefix: str, a: dict, b: dict) -> list[EnvChange]:
    return [EnvChange(f"{prefix}.{k}", a.get(k), b.get(k)) for k in sorted({*a, *b}) if a.get(k) != b.get(k)]


def environment_changes(a_env: Any, b_env: Any) -> list[EnvChange]:
    """Environment fields that differ (dict fields such as ``torch_flags`` key by key)."""
    a, b = _as_dict(a_env), _as_dict(b_env)
    out = []
    for name in _ENV_FIELDS:
        va, vb = a.get(name), b.get(name)
        if isinstance(va, dict) or isinstance(vb, dict):
            out += _dict_changes(name, va or {}, vb or {})
        elif va != vb:
            out.append(EnvChange(name, va, vb))
    return out


def settings_changes(a_settings: Any, b_settings: Any) -> list[EnvChange]:
    a, b = _as_dict(a_settings), _as_dict(b_settings)
    return [EnvChange(f"settings.{k}", a.get(k), b.get(k)) for k in sorted({*a, *b} - _SELECTION)
            if a.get(k) != b.get(k)]


def _shared(a_env: Any, b_env: Any) -> list[str]:
    a, b = _as_dict(a_env), _as_dict(b_env)
    out = []
    if a.get("device") == b.get("device") and a.get("device_name") == b.get("device_name"):
        out.append(f"device {a.get('device')} ({a.get('device_name')})")
    for name in ("torch", "triton", "cuda", "driver", "python"):
        if a.get(name) == b.get(name) and a.get(name) is not None:
            out.append(f"{name} {a.get(name)}")
    return out


# ------------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------------


def diff_results(a: RunResult | sft.SFTResult, b: RunResult | sft.SFTResult, *, a_path: str = "A",
                 b_path: str = "B", time_phase: str = "fwd+bwd",
                 time_threshold: float = DEFAULT_TIME_THRESHOLD) -> ResultDiff:
    """Compare two results of the same command (CompareError when they come from different ones)."""
    kind_a, kind_b = _KIND_NAMES.get(type(a)), _KIND_NAMES.get(type(b))
    if kind_a is None or kind_b is None:
        raise CompareError("detbench compare reads results of detbench run and detbench sft only")
    if kind_a != kind_b:
        raise CompareError(f"{a_path} is a detbench {kind_a} result and {b_path} a detbench {kind_b} result; "
                           f"compare two results of the same command")
    if time_threshold < 0 or not math.isfinite(time_threshold):
        raise CompareError(f"time threshold {time_threshold!r} must be a fraction >= 0, e.g. 0.1 for 10%")
    notes: list[str] = []
    environment = environment_changes(a.environment, b.environment)
    if kind_a == "run":
        sections = [_run_section(a, b, time_phase, time_threshold, notes)]
        # the variables a run holds for all its cells (CUBLAS_WORKSPACE_CONFIG), as they were in force
        environment += _dict_changes("run_env.in_force", a.run_env.get("in_force") or {},
                                     b.run_env.get("in_force") or {})
    else:
        sections = _sft_sections(a, b, notes)
    return ResultDiff(
        kind=kind_a, a_path=str(a_path), b_path=str(b_path), a_status=a.status, b_status=b.status,
        environment=environment,
        settings=settings_changes(a.settings, b.settings), same=_shared(a.environment, b.environment),
        sections=sections, time_phase=time_phase, time_threshold=time_threshold, notes=notes)


def _run_section(a: RunResult, b: RunResult, phase: str, threshold: float, notes: list[str]) -> Section:
    ia, ib = Index(a), Index(b)
    shapes_differ = {s for s in ia.subjects.keys() & ib.subjects.keys()
                     if ia.subjects[s].shapes != ib.subjects[s].shapes}
    for s in sorted(shapes_differ):
        notes.append(f"{s}: shapes differ (A {ia.subjects[s].shapes}, B {ib.subjects[s].shapes}); its times are "
                     f"not compared")
    cells = []
    for key in list(ia.cells) + [k for k in ib.cells if k not in ia.cells]:
        ca, cb = ia.cells.get(key), ib.cells.get(key)
        va = run_verdict(ca) if ca is not None else None
        vb = run_verdict(cb) if cb is not None else None
        d = CellDiff(key=list(key), a=va, b=vb, a_text=_run_text(ia, ca, va) if ca is not None else None,
                     b_text=_run_text(ib, cb, vb) if cb is not None else None, change=verdict_change(va, vb))
        if ca is not None and cb is not None:
            d.a_error, d.b_error = ia.view(ca).rel_l2, ib.view(cb).rel_l2
            d.error_change = error_change(d.a_error, d.b_error)
            d.error_text = fmt_error_change(d.a_error, d.b_error)
            if key[0] not in shapes_differ:
                noise = [f"{side} {reason}" for side, ix in (("A", ia), ("B", ib))
                         for reason in ix.time_noise(key).get(phase, [])]
                d.time = time_ratio(phase, ia.timings.get(key + (phase,)), ib.timings.get(key + (phase,)), threshold,
                                    noise)
            if ca.repeats != cb.repeats and min(ca.repeats, cb.repeats) > 0:
                d.notes.append(f"repeats {ca.repeats} → {cb.repeats}")
        cells.append(d)
    return Section(title="cells", key_names=["subject", "backend", "dtype", "mode"], error_name="err vs fp64",
                   cells=cells)


def sft_verdict(res: sft.ConfigResult) -> str:
    if res.status in (REFUSED, ERROR):
        return res.status
    if res.identical is None:
        return NOT_COMPARABLE
    return IDENTICAL if res.identical else NONDET


def _setup_verdict(row: dict) -> str:
    """A data-parallel setup (bench.distributed's row): repeats that differ are nondeterministic; a setup whose
    bits differ from its reference setup (another world size or accumulation) is batch-variant."""
    if not row.get("run_to_run_identical", True):
        return NONDET
    return IDENTICAL if (row.get("comparison") or {}).get("identical", True) else BATCH_VARIANT


def _sft_sections(a: sft.SFTResult, b: sft.SFTResult, notes: list[str]) -> list[Section]:
    notes.append("sft results hold one wall time per configuration, without quartiles: times are not compared")
    sections = []
    ca, cb = {c.key(): c for c in a.configs}, {c.key(): c for c in b.configs}
    if ca or cb:
        cells = []
        for key in list(ca) + [k for k in cb if k not in ca]:
            ra, rb = ca.get(key), cb.get(key)
            va = sft_verdict(ra) if ra is not None else None
            vb = sft_verdict(rb) if rb is not None else None
            d = CellDiff(key=[ra.attention if ra else rb.attention, (ra or rb).mode, (ra or rb).dtype,
                              f"{(ra or rb).lr:g}"],
                         a=va, b=vb, a_text=ra.verdict if ra else None, b_text=rb.verdict if rb else None,
                         change=verdict_change(va, vb))
            if ra is not None and rb is not None and ra.loss_bits and rb.loss_bits:
                d.error_change, d.error_text = loss_curve_change(ra.loss_bits[0], ra.losses[0], rb.loss_bits[0],
                                                                 rb.losses[0])
            cells.append(d)
        sections.append(Section(title="configurations", key_names=["attention", "mode", "dtype", "lr"],
                                error_name="loss curve (repeat 0)", cells=cells))
    sa, sb = _setups(a), _setups(b)
    if sa or sb:
        cells = []
        for key in list(sa) + [k for k in sb if k not in sa]:
            ra, rb = sa.get(key), sb.get(key)
            va = _setup_verdict(ra) if ra is not None else None
            vb = _setup_verdict(rb) if rb is not None else None
            d = CellDiff(key=list(key), a=va, b=vb, a_text=ra.get("verdict") if ra else None,
                         b_text=rb.get("verdict") if rb else None, change=verdict_change(va, vb))
            if ra is not None and rb is not None:
                d.error_change, d.error_text = loss_curve_change(ra.get("loss_bits", []), ra.get("losses", []),
                                                                 rb.get("loss_bits", []), rb.get("losses", []))
            cells.append(d)
        sections.append(Section(title="data-parallel setups", key_names=["setup", "reduce"],
                                error_name="loss curve (repeat 0)", cells=cells))
    return sections


def _setups(res: sft.SFTResult) -> dict[tuple[str, str], dict]:
    rows = (res.distributed or {}).get("setups") or []
    return {(r.get("label", "?"), r.get("reduce", "?")): r for r in rows}


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------


def _fmt_value(v: Any) -> str:
    return "-" if v is None else str(v)


def header_lines(diff: ResultDiff) -> list[str]:
    """A and B, what both share, and every environment and settings difference."""
    lines = [f"A: {diff.a_path} ({diff.a_status})", f"B: {diff.b_path} ({diff.b_status})"]
    if diff.same:
        lines.append("same in both: " + ", ".join(diff.same))
    changes = diff.environment + diff.settings
    if changes:
        lines.append("differs:")
        lines += [f"  {c.what} {_fmt_value(c.a)} → {_fmt_value(c.b)}" for c in changes]
    else:
        lines.append("environment and settings: no difference recorded")
    if diff.kind == "run":
        lines.append(f"time: {diff.time_phase} median B/A [q1 B/q3 A – q3 B/q1 A]; slower/faster when the whole "
                     f"range lies beyond ±{diff.time_threshold:.0%} (two runs, not interleaved), else ~")
    return lines + diff.notes


def summary_line(diff: ResultDiff) -> str:
    """Counts of each kind of change; then, by name, the cells that got worse."""
    cells = diff.cells()
    both = [c for c in cells if c.a is not None and c.b is not None]
    counts = {k: sum(1 for c in both if c.change == k) for k in (WORSE, BETTER, CHANGED)}
    parts = [f"{len(both)} in both: {counts[WORSE]} worse, {counts[BETTER]} better"]
    if counts[CHANGED]:
        parts[0] += f", {counts[CHANGED]} changed reason"
    values = sum(1 for c in both if c.error_change not in (SAME, "-"))
    parts.append(f"{values} with {'another error' if diff.kind == 'run' else 'another loss curve'}")
    if diff.kind == "run":
        moved = [c.time for c in both if c.time and c.time.change != SAME]
        slower = sum(1 for t in moved if t.change == "slower")
        noisy = sum(1 for t in moved if t.noise)
        parts.append(f"{slower} slower, {len(moved) - slower} faster"
                     + (f" ({noisy} of them ~: a time noisy or loaded in its own run)" if noisy else ""))
    for side in (ONLY_A, ONLY_B):
        n = sum(1 for c in cells if c.change == side)
        if n:
            parts.append(f"{n} only in {side[-1]}")
    line = "; ".join(parts)
    worse = diff.worse()
    if worse:
        line += ". Worse: " + ", ".join(f"{' '.join(c.key)} ({c.a} → {c.b})" for c in worse)
    return line


def one_side_lines(section: Section) -> list[str]:
    """Cells present on one side only, grouped by their first key (a subject whose every cell is missing from
    a side is one line)."""
    lines = []
    for side in (ONLY_A, ONLY_B):
        missing = [c for c in section.cells if c.change == side]
        by_first: dict[str, list[CellDiff]] = {}
        for c in missing:
            by_first.setdefault(c.key[0], []).append(c)
        for first, group in by_first.items():
            total = sum(1 for c in section.cells if c.key[0] == first)
            if len(group) == total and len(group) > 1:
                lines.append(f"{side}: {first}, all {total} {section.title}")
            else:
                lines.extend(f"{side}: {' '.join(c.key)} ({c.a or c.b})" for c in group)
    return lines


def _md(text: str | None) -> str:
    return "-" if text is None else text.replace("|", "\\|").replace("\n", " ")


def render_markdown(diff: ResultDiff, only_changed: bool = False) -> str:
    out = [f"# detbench compare ({diff.kind} results)", ""]
    out += [f"{'  ' if line.startswith('  ') else ''}- {_md(line.strip())}" for line in header_lines(diff)]
    out += [f"- **{_md(summary_line(diff))}**" if diff.worse() else f"- {_md(summary_line(diff))}", ""]
    for s in diff.sections:
        rows = [c for c in s.cells if c.a is not None and c.b is not None and (c.interesting() or not only_changed)]
        out += [f"## {s.title}", ""]
        head = s.key_names + ["A", "B", "change", s.error_name] + (
            [f"{diff.time_phase} A → B", "B/A [range]", "time"] if diff.kind == "run" else [])
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in rows:
            change = f"**{c.change}**" if c.change == WORSE else c.change
            row = [*c.key, _md(c.a_text), _md(c.b_text), change + (f" ({', '.join(c.notes)})" if c.notes else ""),
                   _md(c.error_text)]
            if diff.kind == "run":
                row += [fmt_seconds(c.time), fmt_time_ratio(c.time), fmt_time_change(c.time, markdown=True)]
            out.append("| " + " | ".join(row) + " |")
        if not rows:
            out.append("| " + " | ".join(["(nothing changed)"] + [""] * (len(head) - 1)) + " |")
        out.append("")
        out += [f"- {_md(line)}" for line in one_side_lines(s)]
        if one_side_lines(s):
            out.append("")
    return "\n".join(out)


def fmt_seconds(t: TimeRatio | None) -> str:
    """``A → B``: the two median times, each in its own unit."""
    return "-" if t is None else f"{fmt_time(t.a_s)} → {fmt_time(t.b_s)}"
