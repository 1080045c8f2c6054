"""The plots of a stored result: the verdict map first, then the cost of determinism, then error vs speed;
every panel with labelled ticks on both axes, every figure with a legend, the map's colours the verdicts.

matplotlib comes with ``pip install -e '.[dev]'`` (the README's set-up line, which CI runs), so these run in
CI; without it they are skipped, saying so.
"""

import copy
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is not installed: pip install 'detbench[plot]'")

import matplotlib.colors as mcolors  # noqa: E402

from bench import plots  # noqa: E402
from bench.report import Index  # noqa: E402
from bench.results import load_run  # noqa: E402

COMMITTED = Path(__file__).resolve().parents[1] / "results" / "run-20261129-132551-cpu-715190.json"


@pytest.fixture(scope="module")
def stored():
    return load_run(COMMITTED)


@pytest.fixture(scope="module")
def saved(stored, tmp_path_factory):
    """The figures of the stored result, written as PNGs the way ``detbench report --plots`` writes them
    (saving draws them: their tick labels exist from then on)."""
    figs = plots.figures(stored)
    paths = plots.save_figures(figs, tmp_path_factory.mktemp("plots"), COMMITTED.stem)
    return figs, paths


@pytest.fixture
def drawn(saved):
    return dict(saved[0])


def _labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks if t.get_text().strip()]


def test_the_verdict_map_comes_first(stored, drawn):
    assert list(drawn) == ["verdicts", "cost", "error-vs-speed"]


@pytest.mark.parametrize("name", ["verdicts", "cost", "error-vs-speed"])
def test_every_panel_has_tick_labels_and_the_figure_a_legend(drawn, name):
    fig = drawn[name]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert panels
    for ax in panels:
        x, y = _labels(ax.get_xticklabels()), _labels(ax.get_yticklabels())
        assert len(set(x)) >= 2, f"{name} / {ax.get_title()}: x tick labels {x}"
        assert len(set(y)) >= 2, f"{name} / {ax.get_title()}: y tick labels {y}"
    legends = fig.legends + [ax.get_legend() for ax in panels if ax.get_legend()]
    assert legends and all(legend.get_texts() for legend in legends), f"{name} has no legend"


def test_the_cost_plot_has_one_panel_per_subject_and_ticks_besides_one(stored, drawn):
    panels = [ax for ax in drawn["cost"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [s.subject for s in stored.subjects]
    for ax in panels:
        assert set(_labels(ax.get_xticklabels())) - {"1×"}, ax.get_title()


def test_the_error_vs_speed_legend_names_the_dtype_markers_and_batch_variance(drawn):
    texts = {t.get_text() for legend in drawn["error-vs-speed"].legends for t in legend.get_texts()}
    assert {"fp32", "bf16", "fp16", "batch-variant", "nondeterministic"} <= texts


def test_the_verdict_map_colours_each_cell_by_its_verdict(stored):
    """On a copy with one cell nondeterministic (3 distinct results) and one refused: every cell's square
    has its verdict's colour and its text the distinct results."""
    res = copy.deepcopy(stored)
    nondet = res.cells[0]
    nondet.deterministic = False
    for r in res.repeats:
        if (r.subject, r.backend, r.dtype, r.mode) == (nondet.subject, nondet.backend, nondet.dtype, nondet.mode):
            r.n_distinct = 3
    refused = res.cells[1]
    refused.status, refused.deterministic, refused.reason = "refused", None, "no deterministic implementation"
    res.repeats = [r for r in res.repeats
                   if (r.subject, r.backend, r.dtype, r.mode) != (refused.subject, refused.backend, refused.dtype,
                                                                 refused.mode)]
    import matplotlib.pyplot as plt

    fig = plots.draw_verdicts(plt, res, Index(res))
    ax = fig.axes[0]
    squares = {(round(p.get_x() + 0.5), round(p.get_y() + 0.5)): p.get_facecolor() for p in ax.patches}
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    rows = [label.get_text() for label in ax.get_yticklabels()]
    cols = [label.get_text().replace("\n", " ") for label in ax.get_xticklabels()]
    seen = set()
    for c in res.cells:
        xy = (cols.index(f"{c.dtype} {c.mode}"), rows.index(f"{c.subject} / {c.backend}"))
        verdict = plots.verdict_of(c)
        assert mcolors.to_hex(squares[xy]) == plots.VERDICTS[verdict][0].lower(), (c, verdict)
        seen.add(verdict)
        if c is nondet:
            assert texts[xy] == "3"
        elif c is refused:
            assert texts[xy] == "ref"
    assert {"identical", "batch-variant", "nondeterministic", "not run"} <= seen
    plt.close(fig)


def test_the_pngs_are_named_after_the_result(saved):
    paths = saved[1]
    assert [p.name for p in paths] == [f"{COMMITTED.stem}-{n}.png" for n in ("verdicts", "cost", "error-vs-speed")]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
