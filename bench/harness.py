"""``detbench run``: identical inputs through every backend, checked bit for bit, timed, stored.

The matrix is subject x backend x dtype x mode. For each subject the harness

1. draws the subject's inputs and parameters once (float32, CPU, seeded) and computes a float64
   reference on the device (``bench.subjects.reference_route``);
2. for each dtype, runs the all-eager route once under the default mode: the error eager PyTorch
   makes in that dtype, printed next to each backend's;
3. for each mode and each backend of the subject's primary op (every available one by default, as
   the registry lists them), runs one *cell*:

   * run to run: N repeats (fresh copies each), every output and gradient compared with repeat 0; each
     repeat is reseeded (``torch.manual_seed``), so a backend drawing from the default CPU or CUDA
     generator repeats itself: the generator states before and after each call tell on it, and its
     verdict says "deterministic given the seed; consumes RNG" (``CellRecord.rng_consumed``). A backend
     registered ``deterministic=True`` whose repeats differ is flagged as breaking its claim;
   * batch invariance: the first 1, 3 (and 127 for token rows) rows run alone vs the full batch;
   * accuracy: repeat 0 against the float64 reference;

4. times forward, backward and both of every cell of the dtype that ran ok in one interleaved loop
   (``bench.timing``): round by round, every backend under every mode, so each ratio the reports show
   compares samples of the same rounds; the loop records the machine's load while it ran;
5. compares the cells of one dtype with each other (backend vs backend in a mode, and each backend's
   torch-det/hf-full result vs its default one).

A backend that raises inside a determinism mode is recorded as *refused* with its reason, any other
exception as *error*; neither stops the run. A raise counts as a refusal when its text says so (PyTorch's
"does not have a deterministic implementation", ``CUBLAS_WORKSPACE_CONFIG``, or an SDPA backend switched
off with torch's reason, e.g. "cuDNN SDPA is not deterministic"), or when the plan's probe showed it: the
plan probes every backend in every dtype under ``default`` and again under each selected mode, so a
backend that runs under ``default`` and fails only under ``torch-det`` (cuDNN attention raises a bare "No
available kernel" there) is refused by that mode, with the reason.

The environment a mode asks for that is read once per process (``CUBLAS_WORKSPACE_CONFIG``: cuBLAS fixes
its workspace size at its first call) is set for the whole run before any CUDA work, by
``bench.modes.run_environment`` (``detbench run`` enters it before planning; :func:`execute` enters it too
when called on its own), restored at the end, and recorded in the result's ``run_env``.

Times under ``torch-det`` and ``hf-full`` include PyTorch's fill of uninitialised memory: with deterministic
algorithms on, every ``torch.empty`` a backend allocates is filled (NaN) first
(``torch.utils.deterministic.fill_uninitialized_memory``, left at PyTorch's default). Each cell records
whether the fill was on (``fill_uninitialized_memory``); the mode / default time ratio of a backend that
allocates its outputs uninitialised (the Triton wrappers do) includes those memsets.

Ctrl-C (SIGINT) or SIGTERM stops a run: the records so far are written with ``status: interrupted``, the
signal and the cell it stopped in.

``--route OP=BACKEND`` sets an op a subject calls besides its primary op (``Subject.calls``); a route that
no selected subject would use (the op is the primary op of every subject that calls it, or of none) is
refused, and each subject's record lists the routes applied to it.
"""

from __future__ import annotations

import datetime as _dt
import functools
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench import checks
from bench.compare import mismatch
from bench.errors import InputError, SaveError, Terminated
from bench.modes import MODES, apply_mode, get_mode, is_refusal, run_environment
from bench.report import render_markdown
from bench.results import (
    RUN_SCHEMA,
    AccuracyRecord,
    BackendInfo,
    BatchRecord,
    CellRecord,
    CrossRecord,
    RepeatRecord,
    RunResult,
    RunSettings,
    SubjectInfo,
    TimingRecord,
    capture_environment,
    device_label,
    new_run_id,
    result_path,
    write_json_atomic,
    write_text_atomic,
)
from bench.subjects import DTYPES, SUBJECTS, build_case, check_seed, dtype_name, probe, reference_route
from bench.timing import PHASES, interleave, phase_arms
from qwen_layers import registry
from qwen_layers.config import PRESETS

DEFAULT_REPEATS = 20
DEFAULT_PRESET = "qwen3-0.6b"
QUICK_PRESET = "qwen3-tiny"
# Timed repeats / warm-up calls per phase, by shape profile.
TIME_DEFAULTS = {"quick": (5, 1), "cpu": (10, 2), "cuda": (50, 5)}
# Registry origins that are never part of the default backend set.
_HIDDEN_ORIGINS = {"detbench-reference"}


# ------------------------------------------------------------------------------------------------
# the plan: every input checked before anything runs
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    settings: RunSettings
    device: torch.device
    profile: str
    config: object
    backends: dict[str, list[str]]        # subject -> backends of its primary op, in registry order
    route: dict[str, str]                 # every op -> backend (the primary op is overridden per subject)
    unsupported: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (op, backend, dtype)
    skipped: list[str] = field(default_factory=list)
    # (op, backend, dtype, mode) -> why the probe failed under that mode although it passed under default
    mode_refused: dict[tuple[str, str, str, str], str] = field(default_factory=dict)

    def cells(self):
        """The matrix in execution order: subject, dtype, mode, backend."""
        s = self.settings
        for subject in s.subjects:
            for dtype in s.dtypes:
                for mode in s.modes:
                    for backend in self.backends[subject]:
                        yield subject, backend, dtype, mode

    @property
    def n_cells(self) -> int:
        s = self.settings
        return sum(len(self.backends[x]) for x in s.subjects) * len(s.dtypes) * len(s.modes)


def _dedupe(items):
    return list(dict.fromkeys(items))


INTERPRETED_REASON = ("left out of the default set: on this CPU it runs through the Triton interpreter "
                      "(TRITON_INTERPRET=1), seconds to minutes per call; name it in --backends to run it anyway")


def _interpreted(backend, device: torch.device) -> bool:
    """Whether ``backend`` is a Triton kernel that would run through the CPU interpreter on ``device``."""
    if device.type != "cpu":
        return False
    try:
        from kernels import _common  # in here: kernels may be absent or foreign (the CLI says so first)
    except ImportError:
        return False
    return backend.available is _common.triton_available and _common.INTERPRET


def _cuda_hint(reason: str) -> str:
    return " or use --device cuda on a machine with a GPU" if "cuda" in reason.lower() else ""


def _choose(items: list[str] | None, known, what: str) -> list[str]:
    """``items`` checked against ``known`` (all of ``known`` when ``items`` is None), duplicates dropped."""
    chosen = list(known) if items is None else items
    for x in chosen:
        if x not in known:
            raise InputError(f"unknown {what} {x!r}; choose from: {', '.join(known)}")
    return _dedupe(chosen)


def _parse_route(items: list[str], device: torch.device) -> dict[str, str]:
    """``["op=backend", ...]`` -> {op: backend}, each checked against the registry and this device."""
    user_route: dict[str, str] = {}
    for item in items:
        op, sep, name = item.partition("=")
        op, name = op.strip(), name.strip()
        if not sep or not op or not name:
            raise InputError(f"--route {item!r}: write OP=BACKEND, e.g. --route linear=eager")
        if op not in registry.OPS:
            raise InputError(f"--route {item!r}: unknown op {op!r}; ops are: {', '.join(registry.OPS)}")
        if name not in registry.names(op):
            raise InputError(f"--route {item!r}: unknown {op} backend {name!r}; registered: "
                             f"{', '.join(registry.names(op))}")
        reason = registry.get(op, name).why_not(device)
        if reason is not None:
            raise InputError(f"--route {item}: cannot run on {device}: {reason}; choose another {op} backend"
                             f"{_cuda_hint(reason)}")
        user_route[op] = name
    return user_route


def _check_route_applies(user_route: dict[str, str], subjects: list[str], config) -> None:
    """Refuse a route that no selected subject would use: one for an op no subject calls, or for an op that
    is the primary op (the backend axis, chosen by --backends) of every subject that calls it. A route that
    applies to some subjects and not others is kept; each subject records the routes applied to it."""
    for op, name in user_route.items():
        users = [s for s in subjects if op in SUBJECTS[s].calls(config)]
        if any(SUBJECTS[s].primary_op != op for s in users):
            continue
        if users:
            raise InputError(
                f"--route {op}={name}: {op} is the primary op of {', '.join(users)}, so its backend is chosen by "
                f"--backends (e.g. --backends {name}); --route sets the other ops a subject calls")
        callers = [s for s, x in SUBJECTS.items() if op in x.calls(config) and x.primary_op != op]
        hint = f"; subjects that call it: {', '.join(callers)}" if callers else ""
        raise InputError(f"--route {op}={name}: none of the selected subjects ({', '.join(subjects)}) calls {op}, "
                         f"so the route would change nothing; drop it{hint}")


def _requested_backends(requested: list[str], subjects: list[str],
                        device: torch.device) -> tuple[dict[str, list[str]], list[str]]:
    """The backend axis when the user named backends: each must exist for some subject and run here."""
    primary_ops = _dedupe(SUBJECTS[s].primary_op for s in subjects)
    for name in requested:
        ops = [op for op in primary_ops if name in registry.names(op)]
        if not ops:
            known = "; ".join(
                f"{op}: {', '.join(n for n in registry.names(op) if registry.get(op, n).origin not in _HIDDEN_ORIGINS)}"
                for op in primary_ops)
            hint = " (planted negative controls need --plant)" if name.startswith("planted") else registry.IMPORT_HINT
            raise InputError(f"unknown backend {name!r} for the selected subjects{hint}; registered: {known}")
        for op in ops:
            reason = registry.get(op, name).why_not(device)
            if reason is not None:
                raise InputError(f"--backends {name}: the {op} backend cannot run on {device}: {reason}; "
                                 f"drop it from --backends{_cuda_hint(reason)}")
    backends: dict[str, list[str]] = {}
    skipped: list[str] = []
    for s in subjects:
        op = SUBJECTS[s].primary_op
        backends[s] = [n for n in requested if n in registry.names(op)]
        missing = [n for n in requested if n not in registry.names(op)]
        if missing:
            skipped.append(f"{s}: its {op} op has no backend {', '.join(missing)}")
    return backends, skipped


def _default_backends(subjects: list[str], device: torch.device) -> tuple[dict[str, list[str]], list[str]]:
    """The backend axis by default: every registered backend that runs here (and is not interpreted)."""
    backends: dict[str, list[str]] = {}
    unavailable: dict[str, list[str]] = {}  # reason -> ["op/backend", ...]
    for s in subjects:
        op = SUBJECTS[s].primary_op
        names = []
        for b in registry.backends(op):
            if b.origin in _HIDDEN_ORIGINS:
                continue
            reason = b.why_not(device)
            if reason is None and _interpreted(b, device):
                reason = INTERPRETED_REASON
            if reason is None:
                names.append(b.name)
            elif f"{op}/{b.name}" not in unavailable.setdefault(reason, []):
                unavailable[reason].append(f"{op}/{b.name}")
        backends[s] = names
    skipped = [f"{', '.join(entries)}: {reason}" if reason == INTERPRETED_REASON
               else f"{', '.join(entries)}: not available on {device} ({reason})"
               for reason, entries in unavailable.items()]
    return backends, skipped


def _probe_dtypes(subjects: list[str], backends: dict[str, list[str]], user_route: dict[str, str],
                  dtypes: list[str], modes: list[str], device: torch.device, strict: bool
                  ) -> tuple[dict[tuple[str, str, str], str], dict[tuple[str, str, str, str], str]]:
    """Dtype support, probed on tiny inputs before the run, under ``default`` and then under each other
    selected mode (what runs can change with the mode: deterministic algorithms switch SDPA backends off).

    Under ``default``: a backend the user named (``strict``) or routed must support every dtype; a default
    one that does not is left out of that dtype's cells (``unsupported``). Under another mode: a failure is
    that mode refusing the backend (``mode_refused``, keyed by mode), never an input error; the cells still
    run, and the probe's reason tells their failure apart from an error. All ``default`` probes run first, so
    CUDA is initialised under ``default`` (``hf-full``'s ``CUDA_LAUNCH_BLOCKING`` must not reach the driver).
    """
    unsupported: dict[tuple[str, str, str], str] = {}
    to_probe = {(SUBJECTS[s].primary_op, b) for s in subjects for b in backends[s]}
    to_probe |= set(user_route.items())
    supported = []
    for op, name in sorted(to_probe):
        for dt in dtypes:
            with apply_mode("default"):
                reason = probe(op, name, DTYPES[dt], device)
            if reason is None:
                supported.append((op, name, dt))
                continue
            if (op, name) in user_route.items():
                raise InputError(f"--route {op}={name} does not support {dt} on {device} ({reason}); "
                                 f"drop {dt} from --dtypes or route {op} elsewhere")
            if strict:
                raise InputError(f"{op} backend {name!r} does not support {dt} on {device} ({reason}); "
                                 f"drop {dt} from --dtypes or {name} from --backends")
            unsupported[(op, name, dt)] = reason
    mode_refused: dict[tuple[str, str, str, str], str] = {}
    for mode in modes:
        if mode == "default":
            continue
        for op, name, dt in supported:
            with apply_mode(mode):
                reason = probe(op, name, DTYPES[dt], device)
            if reason is not None:
                mode_refused[(op, name, dt, mode)] = reason
    return unsupported, mode_refused


def make_plan(*, device: torch.device | str = "cpu", subjects: list[str] | None = None,
              backends: list[str] | None = None, dtypes: list[str] | None = None, modes: list[str] | None = None,
              repeats: int = DEFAULT_REPEATS, quick: bool = False, preset: str | None = None, seed: int = 0,
              route: list[str] = (), plant: bool = False, time_repeats: int | None = None,
              warmup: int | None = None, out: str = "results", imports: list[str] = ()) -> Plan:
    """Check every setting against the registry and this machine; :class:`InputError` on bad input.

    ``None`` means the default: every subject, every available backend, every dtype and mode.
    ``route`` items are ``"op=backend"``. Planted backends must already be registered
    (``with bench.planted.planted_registered():``) when ``plant`` is set, and the modules in ``imports``
    imported (``bench.plugins.load``): they are only recorded here.
    """
    device = torch.device(device)
    profile = "quick" if quick else device.type
    subjects = _choose(subjects, list(SUBJECTS), "subject")
    try:
        dtypes = _dedupe(dtype_name(d) for d in (dtypes or list(DTYPES)))
    except InputError as e:
        raise InputError(f"--dtypes: {e}") from None
    modes = _choose(modes, list(MODES), "mode")
    if repeats < 2:
        raise InputError(f"--repeats {repeats}: run-to-run checks need at least 2 repeats (default {DEFAULT_REPEATS})")
    preset = preset or (QUICK_PRESET if quick else DEFAULT_PRESET)
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    t_rep, t_warm = TIME_DEFAULTS[profile]
    time_repeats = t_rep if time_repeats is None else time_repeats
    warmup = t_warm if warmup is None else warmup
    if time_repeats < 1 or warmup < 0:
        raise InputError("--time-repeats must be >= 1 and --warmup >= 0")

    seed = check_seed(seed)
    user_route = _parse_route(list(route), device)
    _check_route_applies(user_route, subjects, PRESETS[preset])
    requested = _dedupe(backends) if backends else None
    if requested is not None:
        chosen, skipped = _requested_backends(requested, subjects, device)
    else:
        chosen, skipped = _default_backends(subjects, device)
    for s in subjects:
        if not chosen[s]:
            raise InputError(f"subject {s}: none of the chosen backends implements its op "
                             f"{SUBJECTS[s].primary_op}; add one to --backends or drop {s} from --subjects")
    unsupported, mode_refused = _probe_dtypes(subjects, chosen, user_route, dtypes, modes, device,
                                              strict=requested is not None)

    settings = RunSettings(
        subjects=subjects, backends=requested, dtypes=dtypes, modes=modes, repeats=repeats,
        device=str(device), preset=preset, quick=quick, seed=seed, route=user_route,
        plant=bool(plant), time_repeats=time_repeats, time_warmup=warmup, out=str(out), imports=list(imports),
    )
    full_route = {op: "eager" for op in registry.OPS} | user_route
    return Plan(settings, device, profile, PRESETS[preset], chosen, full_route, unsupported, skipped, mode_refused)


# ------------------------------------------------------------------------------------------------
# running one cell
# ------------------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


# What a verdict says about a backend registered deterministic=True whose repeats differ.
CLAIM_BROKEN = "BREAKS ITS CLAIM (registered deterministic=True)"


def _verdict(tracker: checks.RepeatTracker, n: int, rng: list[str] | None = None, seed: int = 0,
             claim_broken: bool = False) -> str:
    """The run-to-run sentence. ``rng``: the generators the call advanced although each repeat was reseeded
    (``checks.rng_advanced``); such a cell is deterministic given the seed only."""
    bound = checks.bound_sentence(n)
    if tracker.deterministic:
        same = f"bitwise identical in all {n} repeats ({bound})"
        if not rng:
            return same
        return (f"deterministic given the seed; consumes RNG: the call advanced the {', '.join(rng)} generator"
                f"{'s' if len(rng) > 1 else ''}, and each repeat was reseeded first (torch.manual_seed({seed})): "
                f"{same}")
    w = tracker.worst()
    distinct = max(st.n_distinct for st in tracker.stats.values())
    verdict = (f"NOT deterministic: {distinct} distinct results in {n} repeats; {w.name}: "
               f"{w.max_n_diff}/{_numel(w.shape)} elements differ, max {w.max_ulp} ulp, max abs {w.max_abs:.3g}")
    if rng:
        verdict += f"; it also consumes RNG ({', '.join(rng)})"
    return f"{CLAIM_BROKEN}: {verdict}" if claim_broken else verdict


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _routes_applied(plan: Plan, subject: str) -> dict[str, str]:
    """The backend of every op ``subject`` calls besides its primary op (the route its cells run with)."""
    return {op: plan.route[op] for op in SUBJECTS[subject].calls(plan.config)[1:]}


def _unsupported(plan: Plan, subject: str, backend: str, dtype: str) -> str | None:
    """Why this cell cannot run (its backend or a routed op does not support the dtype), or None."""
    op = SUBJECTS[subject].primary_op
    reason = plan.unsupported.get((op, backend, dtype))
    if reason is None:
        for rop, rname in _routes_applied(plan, subject).items():
            if (rop, rname, dtype) in plan.unsupported:
                reason = f"--route {rop}={rname}: {plan.unsupported[(rop, rname, dtype)]}"
    return reason


def _mode_refusal(plan: Plan, subject: str, backend: str, dtype: str, mode: str) -> str | None:
    """Why the plan's probe says ``mode`` refuses this cell (its backend, or a routed op, fails only under
    that mode), or None."""
    op = SUBJECTS[subject].primary_op
    reason = plan.mode_refused.get((op, backend, dtype, mode))
    if reason is not None:
        return reason
    for rop, rname in _routes_applied(plan, subject).items():
        if (rop, rname, dtype, mode) in plan.mode_refused:
            return f"--route {rop}={rname}: {plan.mode_refused[(rop, rname, dtype, mode)]}"
    return None


def _refusal(plan: Plan, subject: str, backend: str, dtype: str, mode: str, e: Exception) -> str | None:
    """The reason to record when ``e``, raised in a cell, is ``mode`` refusing it; None for an error."""
    if mode == "default":
        return None
    if is_refusal(e):
        return _first_line(e)
    probed = _mode_refusal(plan, subject, backend, dtype, mode)
    if probed is None:
        return None
    return (f"{_first_line(e)} (only under {mode}: the same probe runs under default and fails under {mode}"
            f"{'' if probed in _first_line(e) else f' with {probed}'})")


def _repeat_records(key: dict, tracker: checks.RepeatTracker) -> list[RepeatRecord]:
    return [RepeatRecord(**key, tensor=st.name, shape=st.shape, tensor_dtype=st.dtype, repeats=st.repeats,
                         n_equal_to_first=st.n_equal_to_first, n_distinct=st.n_distinct, max_n_diff=st.max_n_diff,
                         n_total=_numel(st.shape), max_abs=st.max_abs, max_ulp=st.max_ulp, nan=st.nan, inf=st.inf,
                         first_mismatch=st.first_mismatch)
            for st in tracker.stats.values()]


def _batch_invariance(key: dict, case, inst, first: dict, seed: int, records: list[BatchRecord]) -> bool | None:
    """The first k rows run alone (k from the case's batch sizes) against the same rows of the full batch;
    appends to ``records`` as it goes (a failure keeps what was compared)."""
    row_tensors = list(case.row_outputs) + [f"grad.{k}" for k in case.grad_inputs if k in case.batched_inputs]
    batch_ok = True
    for k in case.batch_sizes():
        torch.manual_seed(seed)
        sub = inst.run(rows=k)
        for name in row_tensors:
            if name not in sub or name not in first:
                continue
            d = mismatch(sub[name], first[name][:k], k=0)
            batch_ok &= d.equal
            records.append(BatchRecord(**key, tensor=name, rows=k, full_rows=case.rows, equal=d.equal,
                                       n_diff=d.n_diff, n_total=d.n_total, max_abs=d.max_abs, max_ulp=d.max_ulp))
        del sub
    return batch_ok if case.batch_sizes() else None


def _accuracy(key: dict, first: dict, reference: dict, eager_acc: dict, records: list[AccuracyRecord]) -> None:
    for name, t in first.items():
        if name not in reference:
            continue
        a = checks.accuracy(t, reference[name])
        e = eager_acc.get(name)
        nan, inf = checks.count_nonfinite(t)
        records.append(AccuracyRecord(
            **key, tensor=name, rel_l2=a.rel_l2, max_ulp=a.max_ulp, max_abs=a.max_abs,
            eager_rel_l2=e.rel_l2 if e else float("nan"), eager_max_ulp=e.max_ulp if e else float("nan"),
            nan=nan, inf=inf))


def _time_cells(plan: Plan, case, subject: str, dtype: str, out: RunResult) -> None:
    """Time every cell of ``subject`` and ``dtype`` that ran ok, in one interleaved loop (``bench.timing``):
    each round times forward, backward and both of every backend under every mode, so the ratios the
    reports show (a mode over ``default``, a deterministic kernel over its twin) and the parts of one cell
    compare samples of the same rounds. A cell whose timing raises becomes an error cell."""
    s = plan.settings
    cells = [c for c in out.cells if c.subject == subject and c.dtype == dtype and c.status == "ok"]
    if not cells:
        return
    op = SUBJECTS[subject].primary_op
    arms = []
    for backend in _dedupe(c.backend for c in cells):
        with apply_mode("default"):
            inst = case.instantiate(DTYPES[dtype], plan.device, {**plan.route, op: backend})
        for c in cells:
            if c.backend == backend:
                arms += phase_arms(inst, (backend, c.mode), functools.partial(apply_mode, c.mode))
    loop = interleave(arms, plan.device, repeats=s.time_repeats, warmup=s.time_warmup)
    work = case.work(case.rows, torch.tensor([], dtype=DTYPES[dtype]).element_size())
    flops = {"fwd": work.flops_fwd, "bwd": work.flops_bwd, "fwd+bwd": work.flops_fwd + work.flops_bwd}
    nbytes = {"fwd": work.bytes_fwd, "bwd": work.bytes_bwd, "fwd+bwd": work.bytes_fwd + work.bytes_bwd}
    for c in cells:
        failed = [loop.failed[((c.backend, c.mode), ph)] for ph in PHASES if ((c.backend, c.mode), ph) in loop.failed]
        if failed:
            c.status, c.reason = "error", f"during timing: {_first_line(failed[0])}"
            c.verdict = f"error {c.reason} (run to run: {c.verdict})"
            continue
        for phase in PHASES:
            tm = loop.timings[((c.backend, c.mode), phase)]
            out.timings.append(TimingRecord(subject=subject, backend=c.backend, dtype=dtype, mode=c.mode, phase=phase,
                                            **asdict(tm), flops=flops[phase], bytes=nbytes[phase],
                                            loop=f"{subject}/{dtype}"))


def _cell_verdict(status: str, why: str | None, tracker: checks.RepeatTracker, n: int,
                  recs_rep: list[RepeatRecord], **run_to_run) -> str:
    """``run_to_run``: :func:`_verdict`'s keywords (rng, seed, claim_broken)."""
    if status == "ok":
        verdict = _verdict(tracker, n, **run_to_run)
        if any(r.nan or r.inf for r in recs_rep):
            verdict += "; NaN/inf in " + ", ".join(r.tensor for r in recs_rep if r.nan or r.inf)
        return verdict
    if status == "refused":
        return f"refused: {why}"
    verdict = f"error {why}"
    if recs_rep:
        verdict += f" (run to run: {_verdict(tracker, n, **run_to_run)})"
    return verdict


def run_cell(plan: Plan, case, subject: str, backend: str, dtype: str, mode: str,
             reference: dict, eager_acc: dict, out: RunResult) -> dict | None:
    """Run one cell, append its records to ``out``; return repeat 0's results (None on failure)."""
    s = plan.settings
    key = dict(subject=subject, backend=backend, dtype=dtype, mode=mode)
    op = SUBJECTS[subject].primary_op
    n = s.repeats
    reason = _unsupported(plan, subject, backend, dtype)
    if reason is not None:
        out.cells.append(CellRecord(**key, status="unsupported", reason=reason, repeats=0, deterministic=None,
                                    missable_fraction=None, batch_invariant=None,
                                    verdict=f"not run: {backend} does not support {dtype} here ({reason})"))
        return None

    route = {**plan.route, op: backend}
    t0 = time.perf_counter()
    stage = "setup"
    recs_rep, recs_batch, recs_acc = [], [], []
    tracker = checks.RepeatTracker()
    rng: list[str] = []  # generators the call under test advanced in some repeat (each repeat reseeds them)
    batch_ok = None
    cuda_init = False
    fill = None
    first = None
    try:
        with apply_mode(mode) as state:
            cuda_init = state.cuda_initialised
            fill = state.fill_uninitialized_memory
            inst = case.instantiate(DTYPES[dtype], plan.device, route)
            stage = "run-to-run repeats"
            for _ in range(n):
                torch.manual_seed(s.seed)
                before = checks.rng_states(plan.device)
                res = inst.run()
                rng += [g for g in checks.rng_advanced(before, checks.rng_states(plan.device)) if g not in rng]
                if first is None:
                    first = res
                tracker.add(res)
            recs_rep = _repeat_records(key, tracker)
            stage = "batch invariance"
            batch_ok = _batch_invariance(key, case, inst, first, s.seed, recs_batch)
            stage = "accuracy"
            _accuracy(key, first, reference, eager_acc, recs_acc)
            del inst
        status, why = "ok", None
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a backend failing must not stop the run
        refused = _refusal(plan, subject, backend, dtype, mode, e)
        status = "refused" if refused is not None else "error"
        why = refused if refused is not None else f"during {stage}: {_first_line(e)}"
        if stage == "run-to-run repeats":
            recs_rep = []
            first = None
    elapsed = time.perf_counter() - t0

    ran = tracker.repeats if status == "ok" or recs_rep else 0
    deterministic = tracker.deterministic if recs_rep else None
    claim_broken = deterministic is False and registry.get(op, backend).deterministic is True
    nonfinite = any(r.nan or r.inf for r in recs_rep)
    verdict = _cell_verdict(status, why, tracker, n, recs_rep, rng=rng, seed=s.seed, claim_broken=claim_broken)
    out.cells.append(CellRecord(
        **key, status=status, reason=why, repeats=ran, deterministic=deterministic,
        missable_fraction=checks.missable_fraction(ran) if deterministic else None,
        batch_invariant=batch_ok if stage == "accuracy" else None,
        verdict=verdict, nonfinite=nonfinite, cuda_initialised_at_mode_entry=cuda_init, seconds=elapsed,
        fill_uninitialized_memory=fill, rng_consumed=rng if recs_rep else None, claim_broken=claim_broken))
    out.repeats.extend(recs_rep)
    out.batch.extend(recs_batch)
    out.accuracy.extend(recs_acc)
    return first if status == "ok" else None


def cross_records(subject: str, dtype: str, firsts: dict[tuple[str, str], dict]) -> list[CrossRecord]:
    """Compare repeat 0 of the cells of one subject and dtype: backends within a mode, modes within a backend."""
    keys = list(firsts)
    pairs = []
    for i, (b1, m1) in enumerate(keys):
        for b2, m2 in keys[i + 1:]:
            if m1 == m2 or (b1 == b2 and "default" in (m1, m2)):
                pairs.append(((b1, m1), (b2, m2)))
    recs = []
    for a, b in pairs:
        ra, rb = firsts[a], firsts[b]
        differing, max_abs, max_ulp, max_rel = [], 0.0, 0, 0.0
        for name in ra:
            if name not in rb:
                continue
            d = mismatch(ra[name], rb[name], k=0)
            if not d.equal:
                differing.append(name)
                max_abs, max_ulp = max(max_abs, d.max_abs), max(max_ulp, d.max_ulp)
                max_rel = max(max_rel, checks.rel_l2(ra[name], rb[name]))
        recs.append(CrossRecord(subject=subject, dtype=dtype, a_backend=a[0], a_mode=a[1], b_backend=b[0],
                                b_mode=b[1], equal=not differing, differing=differing, max_abs=max_abs,
                                max_ulp=max_ulp, max_rel_l2=max_rel))
    return recs


# ------------------------------------------------------------------------------------------------
# the whole run
# ------------------------------------------------------------------------------------------------


def _subject_info(plan: Plan, case) -> SubjectInfo:
    subj = case.subject
    sizes = {name: torch.tensor([], dtype=dt).element_size() for name, dt in DTYPES.items()}
    works = {name: case.work(case.rows, e) for name, e in sizes.items()}
    w = next(iter(works.values()))
    route = _routes_applied(plan, subj.name)
    return SubjectInfo(
        subject=subj.name, primary_op=subj.primary_op, rowwise=subj.rowwise, description=subj.description,
        preset=plan.settings.preset, shapes=case.shapes(), rows=case.rows, batch_sizes=case.batch_sizes(),
        route=route, flops_fwd=w.flops_fwd, flops_bwd=w.flops_bwd,
        bytes_fwd={k: v.bytes_fwd for k, v in works.items()}, bytes_bwd={k: v.bytes_bwd for k, v in works.items()},
        bound=subj.bound, notes=case.notes,
    )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_result(plan: Plan, command: list[str]) -> RunResult:
    s = plan.settings
    env = capture_environment(plan.device, seeds={"seed": s.seed, "params": s.seed, "inputs": s.seed + 1,
                                                  "upstream": s.seed + 2, "torch_manual_seed": s.seed})
    used = {(SUBJECTS[x].primary_op, b) for x in s.subjects for b in plan.backends[x]} | set(plan.route.items())
    infos = [BackendInfo(op=b.op, name=b.name, deterministic_claim=b.deterministic, twin=b.twin, origin=b.origin,
                         description=b.description) for b in registry.backends() if (b.op, b.name) in used]
    return RunResult(schema=RUN_SCHEMA, run_id=new_run_id(), started=_now(), finished=None, status="running",
                     stopped_at=None, error=None, command=command, settings=s, environment=env,
                     modes=[get_mode(m).to_dict() for m in s.modes], backends=infos, skipped=list(plan.skipped))


def _signal_name(e: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(e, Terminated) else "SIGINT"


def execute(plan: Plan, result: RunResult, progress=None,
            on_cell: Callable[[int], None] | None = None) -> RunResult:
    """Run the plan, filling ``result`` in place. KeyboardInterrupt (Ctrl-C, and SIGTERM as
    :class:`bench.errors.Terminated`) marks it interrupted, naming the signal, and is not raised: the cells
    finished so far are in ``result``. ``on_cell(n)`` is called once ``n`` cells are recorded.

    Everything runs inside ``bench.modes.run_environment(modes)`` (a no-op when the caller entered it already,
    as ``detbench run`` does before planning), recorded in ``result.run_env``."""
    s = plan.settings
    task = progress.add_task("detbench run", total=plan.n_cells) if progress is not None else None
    where = "before the first cell"
    done = 0
    recorded = 0

    try:
        with run_environment(s.modes) as run_env:  # before the first CUDA matmul: reference, baseline, cells
            result.run_env = run_env.to_dict()
            for subject in s.subjects:
                where = f"{subject}: building inputs and the float64 reference"
                if progress is not None:
                    progress.update(task, description=f"{subject}: float64 reference")
                case = build_case(subject, plan.config, plan.profile, s.seed)
                result.subjects.append(_subject_info(plan, case))
                with reference_route() as ref_route, apply_mode("default"):
                    torch.manual_seed(s.seed)
                    reference = case.instantiate(torch.float64, plan.device, ref_route).run()
                for dtype in s.dtypes:
                    where = f"{subject} / {dtype}: eager baseline"
                    eager_acc = {}
                    try:
                        with apply_mode("default"):
                            torch.manual_seed(s.seed)
                            eager = case.instantiate(DTYPES[dtype], plan.device,
                                                     {op: "eager" for op in plan.route}).run()
                        eager_acc = {k: checks.accuracy(v, reference[k]) for k, v in eager.items() if k in reference}
                        del eager
                    except Exception as e:  # eager itself failing: say so in every accuracy record (NaN)
                        result.skipped.append(f"{subject} {dtype}: eager baseline failed: {_first_line(e)}")
                    firsts: dict[tuple[str, str], dict] = {}
                    for backend in plan.backends[subject]:
                        for mode in s.modes:
                            done += 1
                            where = f"{subject} / {backend} / {dtype} / {mode} (cell {done} of {plan.n_cells})"
                            if progress is not None:
                                progress.update(task, description=f"{subject} {backend} {dtype} {mode}")
                            first = run_cell(plan, case, subject, backend, dtype, mode, reference, eager_acc, result)
                            recorded += 1
                            where = (f"{subject} / {backend} / {dtype} / {mode}, after cell {done} of "
                                     f"{plan.n_cells}")
                            if first is not None:
                                firsts[(backend, mode)] = first
                            if progress is not None:
                                progress.update(task, advance=1)
                            if on_cell is not None:
                                on_cell(recorded)
                    # Timed after the checks, every cell of this subject and dtype in one interleaved loop.
                    where = f"{subject} / {dtype}: timing its cells (after cell {done} of {plan.n_cells})"
                    if progress is not None:
                        progress.update(task, description=f"{subject} {dtype}: timing, interleaved")
                    _time_cells(plan, case, subject, dtype, result)
                    result.cross.extend(cross_records(subject, dtype, firsts))
                    del firsts
                del reference, case
        result.status = "complete"
    except KeyboardInterrupt as e:
        result.status = "interrupted"
        result.stopped_at = (f"interrupted ({_signal_name(e)}) during {where}; {recorded} of {plan.n_cells} cells "
                             f"complete")
    except Exception as e:
        result.status = "failed"
        result.stopped_at = f"failed during {where}"
        result.error = "".join(traceback.format_exception_only(type(e), e)).strip()
        raise
    finally:
        result.finished = _now()
    return result


def save(result: RunResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and its Markdown summary ``<stem>.md``, atomically, never overwriting.

    A failed write raises :class:`bench.errors.SaveError` naming the file; no temporary file is left. When the
    summary fails after the result was written, the message says where the result is.
    """
    path = result_path(out_dir, "run", device_label(result.environment), result.run_id)
    json_path = write_json_atomic(path, result)
    try:
        md_path = write_text_atomic(path.with_suffix(".md"), render_markdown(result, json_name=json_path.name))
    except SaveError as e:
        raise SaveError(f"{e}; the result is saved in {json_path} (detbench report {json_path} --markdown "
                        f"FILE writes the summary)") from None
    return json_path, md_path
