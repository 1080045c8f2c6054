"""How verdicts are presented: a broken deterministic claim, the failing cells named in the status line, the
planted divergence of gpu-check's dry run called planted, and verdicts that stay whole when a narrow or
piped terminal wraps them."""

import io
import itertools
import json
import re

import pytest
from rich.console import Console

from bench import gpu_check
from bench.cli import main
from bench.cli.report import print_run
from bench.report import Index, cell_label, status_line, wrap_clauses
from bench.results import CellRecord, load_run
from qwen_layers import registry

FAST = ["--quick", "--device", "cpu", "--time-repeats", "1", "--warmup", "0", "--no-progress", "--dtypes", "fp32",
        "--modes", "default", "--repeats", "3"]


def rotating_linear():
    """A linear whose K-chunks are summed starting one chunk later on every call: other bits each call."""
    calls = itertools.count()

    def linear(x, weight, bias=None):
        k = x.shape[-1] // 4
        parts = [x[..., i * k:(i + 1) * k] @ weight[:, i * k:(i + 1) * k].T for i in range(4)]
        start = next(calls) % 4
        y = parts[start]
        for i in range(1, 4):
            y = y + parts[(start + i) % 4]
        return y if bias is None else y + bias

    return linear


@pytest.fixture(scope="module")
def claim_run(tmp_path_factory):
    """Two linear backends whose repeats differ, one registered deterministic=True and one claiming nothing,
    and eager: detbench run's output (100 columns) and its result."""
    out = tmp_path_factory.mktemp("claim")
    with pytest.MonkeyPatch.context() as mp, registry.scoped():
        from bench import subjects
        mp.setitem(subjects.SIZES, "quick", {**subjects.SIZES["quick"], "linear": (160,)})
        mp.setattr(subjects, "QUICK_LINEAR_K", 256)
        mp.setenv("COLUMNS", "100")
        registry.register("linear", "claims-det", rotating_linear(), deterministic=True, origin="test")
        registry.register("linear", "claims-nothing", rotating_linear(), deterministic=None, origin="test")
        buf = io.StringIO()
        mp.setattr("sys.stdout", buf)
        rc = main(["run", "--subjects", "linear", "--backends", "eager,claims-det,claims-nothing", *FAST,
                   "--out", str(out)])
    (path,) = out.glob("*.json")
    return rc, buf.getvalue(), load_run(path)


def cell(res, backend):
    (c,) = [c for c in res.cells if c.backend == backend]
    return c


# ---- a broken claim ------------------------------------------------------------------------------


def test_a_backend_that_claims_determinism_and_differs_breaks_its_claim(claim_run):
    rc, out, res = claim_run
    assert rc == 0, out
    broken = cell(res, "claims-det")
    assert broken.deterministic is False and broken.claim_broken is True
    assert broken.verdict.startswith("BREAKS ITS CLAIM (registered deterministic=True): NOT deterministic")
    assert Index(res).view(broken).run_to_run_clauses[0] == "BREAKS deterministic claim"
    unclaimed = cell(res, "claims-nothing")  # promised nothing: differing breaks no claim
    assert unclaimed.deterministic is False and unclaimed.claim_broken is False
    assert unclaimed.verdict.startswith("NOT deterministic")
    assert cell(res, "eager").claim_broken is False


# ---- the status line names the cells -------------------------------------------------------------


def test_the_status_line_names_the_failing_cells(claim_run):
    rc, out, res = claim_run
    line = status_line(res)
    assert ("2 nondeterministic (linear/claims-det fp32 default, linear/claims-nothing fp32 default)" in line
            and "1 breaking their deterministic claim (linear/claims-det fp32 default)" in line), line
    end = out[out.rindex("status: "):].splitlines()  # the end of detbench run: status (wrapped), result, summary
    assert " ".join(end[:-2]) == line and end[-2].startswith("result: ") and end[-1].startswith("summary: "), end
    assert all(re.search(r"(^|[(,;] ?|: )(linear/|status)", x) for x in end[:-2]), end  # a cell's name whole on a line


def test_the_status_line_caps_its_list():
    class Result:
        status, stopped_at = "complete", None
        cells = [CellRecord(subject="mlp", backend=f"b{i}", dtype="bf16", mode="default", status="ok", reason=None,
                            repeats=5, deterministic=False, missable_fraction=None, batch_invariant=True,
                            verdict="") for i in range(6)]

    line = status_line(Result)
    assert "6 nondeterministic (mlp/b0 bf16 default, mlp/b1 bf16 default, mlp/b2 bf16 default, +3 more)" in line
    assert "0 batch-variant" in line and cell_label(Result.cells[0]) == "mlp/b0 bf16 default"


# ---- gpu-check's dry run says which divergence was planted ---------------------------------------


def test_the_dry_run_summary_says_planted_next_to_the_planted_divergence(tmp_path):
    plant = "model.layers.1.mlp.down_proj=linear/planted-nondet"
    configs = [{"attention": "eager", "mode": "default", "dtype": "float32", "lr": 1e-5, "status": "ok",
                "identical": False, "first_divergent_step": 1, "repeats": 2, "verdict": "DIVERGED"},
               {"attention": "sdpa", "mode": "default", "dtype": "float32", "lr": 1e-5, "status": "ok",
                "identical": True, "repeats": 2, "verdict": "identical"}]
    (tmp_path / "sft.json").write_text(json.dumps({"settings": {"plants": [plant]}, "configs": configs}))
    root = {"op": "linear/planted-nondet", "module": "model.layers.1.mlp.down_proj", "phase": "forward"}
    other = {"op": "attention/sdpa", "module": "model.layers.0.self_attn", "phase": "backward", "n_diff": 3}
    (tmp_path / "pinpoint.json").write_text(json.dumps({"compare": {"pairs": [{"root_cause": root}]},
                                                        "replay": {"findings": [other]}}))
    answers = {q.split()[0]: a for q, a, _ in gpu_check.headline(tmp_path, [])}
    assert answers["Does"] == f"no: eager DIVERGED at step 1 x2 (planted: {plant}); sdpa identical x2"
    assert answers["Which"] == ("linear/planted-nondet at model.layers.1.mlp.down_proj (forward), from "
                                "trace-compare - the planted fault")
    found = gpu_check.findings(tmp_path)
    assert f"sft eager default float32 lr=1e-05: DIVERGED (planted: {plant})" in found
    assert "sft sdpa default float32 lr=1e-05: identical" in found
    assert ("pinpoint replay: attention/sdpa at model.layers.0.self_attn (backward), 3 elements differ"
            in found), found  # not the planted op: not called planted
    (tmp_path / "sft.json").write_text(json.dumps({"settings": {"plants": []}, "configs": configs}))
    text = " ".join(a for _, a, _ in gpu_check.headline(tmp_path, []))
    assert "(planted:" not in text and "the planted fault" not in text, text


# ---- wrapping ------------------------------------------------------------------------------------


def test_a_clause_breaks_after_a_comma_and_never_between_a_number_and_its_unit():
    clauses = ["DIFFERS: 3 distinct in 20", "grad.q_proj.weight 1234/4096 el, 4096 ulp", "(+1 more tensor)"]
    assert wrap_clauses(clauses, 80) == clauses
    assert wrap_clauses(clauses, 36) == ["DIFFERS: 3 distinct in 20", "grad.q_proj.weight 1234/4096 el,",
                                         "4096 ulp", "(+1 more tensor)"]
    assert wrap_clauses(clauses, 24) == ["DIFFERS:", "3 distinct in 20", "grad.q_proj.weight",
                                         "1234/4096 el, 4096 ulp", "(+1 more tensor)"]
    assert wrap_clauses(clauses, 14) == ["DIFFERS:", "3 distinct in 20", "grad.q_proj.weight", "1234/4096 el,",
                                         "4096 ulp", "(+1 more tensor)"]


@pytest.mark.parametrize("width", [60, 100, 160])
def test_verdicts_stay_whole_in_narrow_and_piped_consoles(claim_run, width):
    """Every clause of every verdict is on one line, whole (no piece cut off, no column dropped), at 60 and 100
    columns and at the 160 a pipe gets; the table stays a table at 160."""
    _, _, res = claim_run
    ix = Index(res)
    buf = io.StringIO()
    print_run(res, Console(width=width, file=buf, force_terminal=False))
    lines = buf.getvalue().splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("linear: linear backends"))):]
    assert "…" not in "\n".join(table[:30])
    for c in res.cells:
        v = ix.view(c)
        for clause in v.run_to_run_clauses + v.batch_clauses:
            for token in wrap_clauses([clause], 1):  # width 1: every piece a wrap must keep whole
                assert any(token in x for x in lines), (width, token)
        for number_then_unit in re.findall(r"\d+(?:/\d+)? (?:el|ulp)", " ".join(v.run_to_run_clauses + v.batch_clauses)):
            assert any(number_then_unit in x for x in lines), (width, number_then_unit)
    if width == 160:
        assert any(re.match(r"\s+backend\s+dtype\s+mode\s+run to run\s+batch invariance", x) for x in lines)
