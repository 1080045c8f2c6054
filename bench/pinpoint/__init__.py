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
first, on the same inputs, and the two results are compared bit for bit; registry calls and
custom-Function backwards are replayed as whole units too, so nondeterminism in how Python composes
deterministic ops is found as well. How each kind of op is handled: :mod:`bench.pinpoint.replay`.

**Trace and compare** (:func:`compare_runs`, two or more full runs). Every op's inputs and outputs
are fingerprinted in execution order (:func:`trace`), together with every registry call, every
custom-Function backward and every module's forward output; the runs are aligned event by event and
the report names the *root cause*, the first module whose output differs and how far the difference
spread (:mod:`bench.pinpoint.compare`). Fingerprints and their collision bound:
:mod:`bench.pinpoint.fingerprint` (:func:`fingerprints` is also usable on its own).

Where an op ran is reported as a module path and a phase (forward, backward, optimizer or a
:func:`phase` name): :mod:`bench.pinpoint.locate`, which also says how registry calls and custom
``autograd.Function`` nodes are seen without patching anything outside the calling context. Nothing
changes global state outside the ``with`` blocks of :func:`replay`, :func:`trace` and
:func:`compare_runs`. Tensor subclasses with their own ``__torch_dispatch__`` (DTensor, FakeTensor)
are not supported. Overhead: ``bench/benchmarks/bench_pinpoint_overhead.py``.

Modules, each importing only those before it::

    ops          what kind of op; tree helpers; generator state; bitwise comparison
    locate       phase(); module path / phase / autograd node of the running op; hooks   (ops)
    fingerprint  Fingerprints, Coefficients, fingerprints(), COLLISION_BOUND             (ops)
    replay       replay(), ReplayMode, ReplayReport, Finding                             (ops, locate)
    trace        trace(), TraceMode, Trace, Event                                        (ops, locate, fingerprint)
    compare      compare_runs(), CompareReport, PairComparison                           (ops, fingerprint, trace)

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
