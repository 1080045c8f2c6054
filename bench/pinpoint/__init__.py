"""``detbench pinpoint``: which op made two runs differ.

Usage (any callable: a block, one SFT step, a user's function)::

    from bench import pinpoint

    report = pinpoint.replay(step, model, optimizer)     # one run, every op replayed on the spot
    print(report)                                        # table of the ops that disagreed with themselves
    for f in report.findings:                            # e.g. linear/planted-nondet at
        print(f.op, f.module, f.phase, f.n_diff)         #      model.layers.1.mlp.down_proj (forward)

    cmp = pinpoint.compare_runs(step, runs=2, setup=lambda: (fresh_model(), fresh_optimizer()))
    cmp.identical, cmp.root_cause                        # the first event with equal inputs, unequal outputs

    with pinpoint.phase("optimizer"):                    # file the ops of a block under a phase name;
        torch.nn.utils.clip_grad_norm_(params, 1.0)      # free when no pinpoint run is active

Two complementary methods:

**Replay** (:func:`replay`, one run, no cascade). Every aten op runs a second time right after the
first, on the same inputs, and the two results are compared bit for bit; registry calls, custom-Function
backwards and module forwards (``units="leaves"`` by default, ``"modules"``, ``"ops"``) are replayed as
whole units too, so nondeterminism in how Python composes deterministic ops - in a user's own
``nn.Module`` too - is found as well. How each kind of op is handled: :mod:`bench.pinpoint.replay`;
module units: :mod:`bench.pinpoint.units`.

**Trace and compare** (:func:`compare_runs`, two or more full runs). Every op's inputs and outputs
are fingerprinted in execution order (:func:`trace`), together with every registry call, every
custom-Function backward and every module's forward output; the runs are aligned event by event and
the report names the *root cause*, the first module whose output differs and how far the difference
spread (:mod:`bench.pinpoint.compare`). ``compare_runs(..., coarse=True)`` first compares runs traced
through hooks only (module outputs, registry calls, custom backwards, gradients, parameters: about the
cost of plain runs) and traces op by op only when they differ. Fingerprints and their collision bound:
:mod:`bench.pinpoint.fingerprint` (:func:`fingerprints` is also usable on its own).

A clean report says what it rests on (``report.bound``, printed under it): how many calls of each op
class were compared (k), and for the rarest class the fault rate that could still be missed with 5%
probability, (1-p)^k = 0.05 - replay compares each call once, trace-compare R - 1 times - plus the
fingerprints' collision bound (:mod:`bench.pinpoint.bounds`, shared with ``detbench run``).

Where an op ran is reported as a module path and a phase (forward, backward, optimizer or a
:func:`phase` name): :mod:`bench.pinpoint.locate`, which also says how registry calls and custom
``autograd.Function`` nodes are seen without patching anything outside the calling context. Nothing
changes global state outside the ``with`` blocks of :func:`replay`, :func:`trace` and
:func:`compare_runs`. Tensor subclasses with their own ``__torch_dispatch__`` (DTensor, FakeTensor)
are not supported. Overhead: ``bench/benchmarks/bench_pinpoint_overhead.py``.

Modules, each importing only those before it::

    bounds       what k agreeing comparisons can miss: missable_rate(), class_bound()
    ops          what kind of op; tree helpers; generator state; bitwise comparison
    locate       phase(); module path / phase / autograd node of the running op; hooks   (ops)
    fingerprint  Fingerprints, Coefficients, fingerprints(), COLLISION_BOUND             (ops)
    units        replay's units: Unit, ModuleUnit, which modules can be replayed         (ops)
    replay       replay(), ReplayMode, ReplayReport, Finding                 (bounds, ops, locate, units)
    trace        trace(), TraceMode, Trace, Event                                        (ops, locate, fingerprint)
    compare      compare_runs(), CompareReport, PairComparison       (bounds, ops, fingerprint, trace)
    batch        pinpoint_batch(): the prompt alone vs in a batch, on its rows        (ops, locate, fingerprint)

(``bench.pinpoint.replay`` and ``bench.pinpoint.trace`` as attributes are the functions; import
from the modules with ``from bench.pinpoint.trace import TraceMode``.)
"""

from __future__ import annotations

from bench.pinpoint.compare import CompareReport, compare_runs
from bench.pinpoint.fingerprint import fingerprints
from bench.pinpoint.locate import phase
from bench.pinpoint.ops import SKIP_NAMESPACES, SKIP_REASONS
from bench.pinpoint.replay import Finding, ReplayReport, replay
from bench.pinpoint.trace import Trace, trace

__all__ = [
    "replay", "trace", "compare_runs", "phase", "fingerprints",
    "ReplayReport", "CompareReport", "Trace", "Finding",
    "SKIP_REASONS", "SKIP_NAMESPACES",
]
