"""``detbench kernel-bench`` in its tiny mode on the CPU: the code runs and the results hold together.

The Triton backends run through the interpreter here (tests/conftest.py), so the timings mean
nothing; what is checked is the structure: every timing is ok or skipped with a reason, a ratio has a
value exactly when both of its sides ran, tiny ratios carry no verdict, and the JSON is complete.
The verdict logic itself is checked on made-up timings, where the right answer is known.
"""

from __future__ import annotations

import json

import pytest

from bench import kernel_speed as ks
from bench.cli import main
from bench.timing import Timer

FAST = Timer(repeats=2, warmup=1)


@pytest.fixture(scope="module")
def tiny_result() -> ks.KernelBenchResult:
    return ks.run_kernel_bench("cpu", tiny=True, timer=FAST)


def test_every_backend_is_timed_or_skipped_with_a_reason(tiny_result):
    r = tiny_result
    assert r.tiny and r.device == "cpu" and r.shapes["dtype"] == "float32"
    expected = ({("attention", b, p) for b in ks.ATTENTION_BACKENDS for p in ("forward", "backward")}
                | {("matmul", b, "forward") for b in ks.MATMUL_BACKENDS}
                | {("rmsnorm", b, p) for b in ks.RMSNORM_BACKENDS for p in ("forward", "backward")}
                | {("rmsnorm", ks.COPY, "copy")})
    assert {t.key for t in r.timings} == expected
    for t in r.timings:
        assert t.status in ("ok", "skipped"), f"{t.key}: {t.status}: {t.reason}"
        if t.status == "ok":
            assert t.median_ms > 0 and t.samples == FAST.repeats and t.reason is None
            assert t.bytes > 0 and t.gbytes_per_s > 0
        else:
            assert t.reason and t.median_ms is None, f"{t.key} skipped without a reason"
    # Always runnable on the CPU: eager everywhere and the copy.
    ok = {t.key for t in r.timings if t.status == "ok"}
    assert {("attention", "eager", "forward"), ("matmul", "eager", "forward"), ("rmsnorm", ks.COPY, "copy")} <= ok


def test_linear_triton_runs_under_the_interpreter(tiny_result):
    from qwen_layers.registry import REGISTRY

    if REGISTRY.get("linear", "triton").why_not("cpu") is not None:
        pytest.skip("Triton interpreter not active in this session")
    timed = {t.key: t for t in tiny_result.timings}
    assert timed[("matmul", "triton", "forward")].status == "ok"
    assert timed[("matmul", "triton", "forward")].flops == 2 * 64 ** 3


def test_ratios_present_exactly_where_both_sides_ran(tiny_result):
    ok = {"/".join(t.key) for t in tiny_result.timings if t.status == "ok"}
    names = [x.name for x in tiny_result.ratios]
    assert names == [spec[0] for spec in ks.RATIO_SPECS]
    for x in tiny_result.ratios:
        sides = [x.numerator, x.denominator]
        expanded = [s for side in sides for s in (
            [side.replace("forward+backward", "forward"), side.replace("forward+backward", "backward")]
            if side.endswith("forward+backward") else [side])]
        if all(s in ok for s in expanded):
            assert x.value is not None and x.value > 0, x
        else:
            assert x.value is None and x.note, f"{x.name}: missing side without a note"
        assert x.met is None, "tiny shapes on the CPU must not be judged against the GPU targets"


def test_verdicts_on_known_timings():
    """speed = other's time / ours; time = ours / other's; bandwidth compares bytes per second."""
    def t(section, backend, phase, ms, nbytes=None):
        return ks.KernelTiming(section, "", backend, phase, "ok", median_ms=ms, bytes=nbytes)

    timings = [
        t("attention", "triton", "forward", 2.0), t("attention", "sdpa-flash", "forward", 1.0),
        t("attention", "triton", "backward", 1.05), t("attention", "triton-atomic", "backward", 1.0),
        ks.KernelTiming("attention", "attention", "eager", "forward", "skipped", "not here"),
        t("matmul", "triton", "forward", 1.0), t("matmul", "eager", "forward", 0.95),
        t("rmsnorm", "triton", "forward", 1.0, 200.0), t("rmsnorm", "triton", "backward", 1.0, 300.0),
        t("rmsnorm", ks.COPY, "copy", 1.0, 200.0),
    ]
    got = {x.name: x for x in ks.compute_ratios(timings, judge=True)}
    fwd = got["attention forward: triton vs sdpa-flash"]
    assert fwd.value == pytest.approx(0.5) and fwd.met is False
    bwd = got["attention backward: triton vs triton-atomic"]
    assert bwd.value == pytest.approx(1.05) and bwd.met is True
    eager = got["attention forward: triton vs eager"]
    assert eager.value is None and "attention/eager/forward skipped: not here" in eager.note
    mm = got["matmul forward: triton vs eager (cuBLAS)"]
    assert mm.value == pytest.approx(0.95) and mm.met is True
    rms = got["rmsnorm fwd+bwd bytes/s: triton vs device copy"]
    assert rms.value == pytest.approx((500 / 2.0) / (200 / 1.0)) and rms.met is True


def test_cli_writes_json_atomically(tmp_path):
    out = tmp_path / "speed.json"
    assert main(["kernel-bench", "--device", "cpu", "--only", "matmul", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"environment", "device", "tiny", "timer", "shapes", "timings", "ratios"}
    assert data["tiny"] is True and {t["section"] for t in data["timings"]} == {"matmul"}
    assert {"torch", "triton", "seeds", "detbench_commit", "sm_count"} <= set(data["environment"])  # bench.results
    assert [p.name for p in tmp_path.iterdir()] == ["speed.json"], "temporary file left behind"


@pytest.mark.parametrize("argv, message", [
    (["--only", "attention,conv"], "--only 'attention,conv': choose sections from attention,matmul,rmsnorm"),
    (["--json", "/nonexistent-dir/x.json"], "folder /nonexistent-dir does not exist"),
])
def test_cli_bad_input(argv, message, capsys):
    assert main(["kernel-bench", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err
