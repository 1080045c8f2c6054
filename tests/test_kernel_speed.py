"""``detbench kernel-bench`` in its tiny mode on the CPU: the code runs and the results hold together.

The Triton backends run through the interpreter here (tests/conftest.py), so the timings mean
nothing; what is checked is the structure: every timing is ok or skipped with a reason, a ratio has a
value exactly when both of its sides ran, tiny ratios carry no verdict, and the JSON is complete.
The verdict logic itself is checked on made-up timings, where the right answer is known, and who is
timed in which role is checked against the registry's claims and twins.
"""

from __future__ import annotations

import json
import time

import pytest

from bench import kernel_speed as ks
from bench.cli import main
from bench.timing import Timer, measure
from qwen_layers.registry import REGISTRY

FAST = Timer(repeats=2, warmup=1)


@pytest.fixture(scope="module")
def tiny_result() -> ks.KernelBenchResult:
    return ks.run_kernel_bench("cpu", tiny=True, timer=FAST)


def test_measure_counts_calls_and_keeps_seconds():
    """The one timer: warm-up calls dropped, setup outside the timed region, seconds in the summary."""
    calls = {"setup": 0, "fn": 0}

    def setup():
        calls["setup"] += 1
        time.sleep(0.02)  # untimed: must not show in the samples
        return 0.002

    def fn(secs):
        calls["fn"] += 1
        time.sleep(secs)

    t = measure(fn, "cpu", repeats=3, warmup=2, setup=setup)
    assert calls == {"setup": 5, "fn": 5}
    assert (t.repeats, t.warmup, t.clock) == (3, 2, "perf_counter")
    assert 0.002 <= t.min_s <= t.q1_s <= t.median_s <= t.q3_s < 0.02, t
    n = []
    assert measure(lambda: n.append(1), "cpu", repeats=4, warmup=1).repeats == 4 and len(n) == 5
    with pytest.raises(ValueError):
        measure(lambda: None, "cpu", repeats=0, warmup=0)


def test_kernel_timing_is_in_milliseconds():
    """The JSON keeps milliseconds (its schema) while bench.timing measures seconds."""
    (rec,) = ks._timed([ks._pending("matmul", "linear", "sleep", "forward", lambda: time.sleep(0.005), 1e9, 1e6)],
                       "cpu", Timer(repeats=3, warmup=1))
    assert rec.status == "ok" and rec.samples == 3
    assert 5.0 <= rec.median_ms < 100.0, rec
    assert rec.tflops == pytest.approx(1e9 / (rec.median_ms / 1e3) / 1e12)


@pytest.mark.parametrize("section", ks.SECTIONS)
def test_lineup_follows_the_registry(section):
    lu = ks.lineup(section)
    op = ks.SECTION_OPS[section]
    assert sorted(lu.backends) == sorted(REGISTRY.names(op)), "every registered backend, each once"
    for s in lu.subjects:
        b = REGISTRY.get(op, s)
        assert b.deterministic is True and b.twin == lu.twins[s]
        assert REGISTRY.get(op, b.twin).deterministic is not True
    assert not set(lu.baselines) & (set(lu.subjects) | set(lu.twins.values()))
    assert lu.reference == "eager" and lu.reference in lu.baselines
    # What the section is about today: the Triton pair against the vendor paths.
    assert lu.twins.get("triton") == "triton-atomic" and "triton-atomic" not in lu.subjects
    if section == "attention":
        assert {"sdpa-flash", "sdpa", "eager"} <= set(lu.baselines)
    else:
        assert lu.baselines == ("eager",)


def test_lineup_picks_up_what_is_registered():
    with REGISTRY.scoped():
        REGISTRY.register("rmsnorm", "mine", lambda x, w, eps: x, deterministic=True, twin="mine-atomic")
        REGISTRY.register("rmsnorm", "mine-atomic", lambda x, w, eps: x, deterministic=False, twin="mine")
        REGISTRY.register("rmsnorm", "both-det", lambda x, w, eps: x, deterministic=True, twin="both-det2")
        REGISTRY.register("rmsnorm", "both-det2", lambda x, w, eps: x, deterministic=True, twin="both-det")
        REGISTRY.register("rmsnorm", "vendor", lambda x, w, eps: x, deterministic=None)
        lu = ks.lineup("rmsnorm")
    assert lu.subjects == ("triton", "mine") and lu.twins["mine"] == "mine-atomic"
    # a pair with no atomic side is no subject/twin pair: both are baselines
    assert lu.baselines == ("eager", "both-det", "both-det2", "vendor")
    assert ks.lineup("rmsnorm").subjects == ("triton",), "scoped registrations must be gone"


def test_every_backend_is_timed_or_skipped_with_a_reason(tiny_result):
    r = tiny_result
    assert r.tiny and r.device == "cpu" and r.shapes["dtype"] == "float32"
    phases = {"attention": ("forward", "backward"), "matmul": ("forward",), "rmsnorm": ("forward", "backward")}
    expected = ({(s, b, p) for s in ks.SECTIONS for b in ks.lineup(s).backends for p in phases[s]}
                | {("rmsnorm", ks.COPY, "copy")})
    assert {t.key for t in r.timings} == expected
    # what the hand-written lists used to time is still timed
    assert {("attention", b, "forward") for b in ("triton", "triton-atomic", "sdpa-flash", "eager")} <= expected
    assert {("matmul", b, "forward") for b in ("triton", "triton-atomic", "eager")} <= expected
    for t in r.timings:
        assert t.status in ("ok", "skipped"), f"{t.key}: {t.status}: {t.reason}"
        if t.status == "ok":
            assert t.median_ms > 0 and t.samples == FAST.repeats and t.reason is None
            assert t.bytes > 0 and t.gbytes_per_s == pytest.approx(t.bytes / (t.median_ms / 1e3) / 1e9)
        else:
            assert t.reason and t.median_ms is None, f"{t.key} skipped without a reason"
    # Always runnable on the CPU: eager everywhere and the copy.
    ok = {t.key for t in r.timings if t.status == "ok"}
    assert {("attention", "eager", "forward"), ("matmul", "eager", "forward"), ("rmsnorm", ks.COPY, "copy")} <= ok
    assert r.timer == FAST.describe("cpu")


def test_linear_triton_runs_under_the_interpreter(tiny_result):

    if REGISTRY.get("linear", "triton").why_not("cpu") is not None:
        pytest.skip("Triton interpreter not active in this session")
    timed = {t.key: t for t in tiny_result.timings}
    assert timed[("matmul", "triton", "forward")].status == "ok"
    assert timed[("matmul", "triton", "forward")].flops == 2 * 64 ** 3


def test_ratios_present_exactly_where_both_sides_ran(tiny_result):
    by_key = {t.key: t for t in tiny_result.timings}
    ok = {"/".join(t.key) for t in tiny_result.timings if t.status == "ok"}
    expected = 0
    for section in ks.SECTIONS:
        lu = ks.lineup(section)
        for _, who, *_ in (spec for spec in ks.RATIO_SPECS if spec[0] == section):
            expected += len(lu.subjects) if who == ks.SUBJECT else 1
    assert len(tiny_result.ratios) == expected
    for x in tiny_result.ratios:
        section, num = x.numerator.split("/")[:2]
        lu = ks.lineup(section)
        assert num in lu.subjects or num == lu.reference, x
        if "(fastest baseline)" in x.name:
            den, phase = x.denominator.split("/")[1:]
            fastest = ks.fastest_baseline(by_key, lu, phase)
            assert den == fastest and fastest in lu.baselines, x
            assert all(by_key[(section, b, phase)].median_ms >= by_key[(section, den, phase)].median_ms
                       for b in lu.baselines if by_key[(section, b, phase)].status == "ok")
        sides = [x.numerator, x.denominator]
        expanded = [s for side in sides for s in (
            [side.replace("forward+backward", "forward"), side.replace("forward+backward", "backward")]
            if side.endswith("forward+backward") else [side])]
        if all(s in ok for s in expanded):
            assert x.value is not None and x.value > 0, x
        else:
            assert x.value is None and x.note, f"{x.name}: missing side without a note"
        assert x.met is None, "tiny shapes on the CPU must not be judged against the GPU targets"
    names = {x.name for x in tiny_result.ratios}
    assert "attention backward: triton vs triton-atomic (atomic twin)" in names
    assert "matmul forward: triton vs eager (fastest baseline)" in names


def test_verdicts_on_known_timings():
    """speed = other's time / ours; time = ours / other's; bandwidth compares bytes per second."""
    def t(section, backend, phase, ms, nbytes=None):
        return ks.KernelTiming(section, "", backend, phase, "ok", median_ms=ms, bytes=nbytes)

    lineups = {
        "attention": ks.Lineup("attention", "attention", ("triton",), {"triton": "triton-atomic"},
                               ("eager", "sdpa", "sdpa-flash"), "eager"),
        "matmul": ks.Lineup("matmul", "linear", ("triton",), {"triton": "triton-atomic"}, ("eager",), "eager"),
        "rmsnorm": ks.Lineup("rmsnorm", "rmsnorm", ("triton",), {"triton": "triton-atomic"}, ("eager",), "eager"),
    }
    timings = [
        t("attention", "triton", "forward", 2.0), t("attention", "sdpa", "forward", 1.5),
        t("attention", "sdpa-flash", "forward", 1.0),
        t("attention", "triton", "backward", 1.05), t("attention", "triton-atomic", "backward", 1.0),
        ks.KernelTiming("attention", "attention", "eager", "forward", "skipped", "not here"),
        t("matmul", "triton", "forward", 1.0), t("matmul", "eager", "forward", 0.95),
        t("rmsnorm", "triton", "forward", 1.0, 200.0), t("rmsnorm", "triton", "backward", 1.0, 300.0),
        t("rmsnorm", ks.COPY, "copy", 1.0, 200.0),
    ]
    got = {x.name: x for x in ks.compute_ratios(timings, judge=True, lineups=lineups)}
    fwd = got["attention forward: triton vs sdpa-flash (fastest baseline)"]
    assert fwd.denominator == "attention/sdpa-flash/forward"
    assert fwd.value == pytest.approx(0.5) and fwd.met is False
    bwd = got["attention backward: triton vs triton-atomic (atomic twin)"]
    assert bwd.value == pytest.approx(1.05) and bwd.met is True
    none_ran = got["attention backward: triton vs none (fastest baseline)"]
    assert none_ran.value is None and "no baseline of attention/backward ran" in none_ran.note
    eager = got["attention forward: triton vs eager (reference)"]
    assert eager.value is None and "attention/eager/forward skipped: not here" in eager.note
    mm = got["matmul forward: triton vs eager (fastest baseline)"]
    assert mm.value == pytest.approx(0.95) and mm.met is True
    rms = got["rmsnorm fwd+bwd bytes/s: triton vs device copy"]
    assert rms.value == pytest.approx((500 / 2.0) / (200 / 1.0)) and rms.met is True
    slow = ks.compute_ratios([t("matmul", "triton", "forward", 1.0), t("matmul", "eager", "forward", 0.8)],
                             judge=True, lineups=lineups)
    assert slow[0].value == pytest.approx(0.8) and slow[0].met is False


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


# --- --json destinations: checked before anything is measured; a save failing later is one line, exit 1 ---


@pytest.fixture
def no_measuring(monkeypatch):
    """Measuring fails loudly: a --json refusal must come before the benchmark runs."""
    def fail(*args, **kwargs):
        raise AssertionError("kernel-bench measured before checking --json")

    monkeypatch.setattr("bench.cli.kernel_bench.run_kernel_bench", fail)


TINY = ["kernel-bench", "--tiny", "--device", "cpu", "--only", "rmsnorm"]


def _one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_cli_json_to_a_directory_is_refused_before_measuring(tmp_path, no_measuring, capsys):
    assert main([*TINY, "--json", str(tmp_path)]) == 2
    assert "is a directory" in _one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_cli_json_in_a_read_only_folder_is_refused_before_measuring(tmp_path, no_measuring, monkeypatch, capsys):
    import errno
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes through a mode of 0o555: the OS refusal is simulated instead
        real_open = os.open

        def refusing_open(path, *args, **kwargs):
            if os.path.dirname(os.path.abspath(path)) == str(ro):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    try:
        assert main([*TINY, "--json", str(ro / "speed.json")]) == 2
    finally:
        ro.chmod(0o755)
    err = _one_line(capsys.readouterr().err)
    assert "cannot write" in err and str(ro) in err
    assert list(ro.iterdir()) == [], "the probe file was left behind"


def test_cli_json_under_a_file_is_refused_before_measuring(tmp_path, no_measuring, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main([*TINY, "--json", str(tmp_path / "notes.txt" / "speed.json")]) == 2
    assert "is not a folder" in _one_line(capsys.readouterr().err)


def test_cli_json_with_a_missing_folder_is_refused_before_measuring(tmp_path, no_measuring, capsys):
    assert main([*TINY, "--json", str(tmp_path / "missing" / "speed.json")]) == 2
    assert "does not exist" in _one_line(capsys.readouterr().err)


def test_cli_json_save_failing_after_measuring_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    """The destination turns into a folder while the benchmark runs: SaveError, one line, no temp file."""
    dest = tmp_path / "speed.json"
    real = ks.run_kernel_bench

    def run_then_block(*args, **kwargs):
        result = real(*args, **{**kwargs, "timer": FAST})
        dest.mkdir()
        return result

    monkeypatch.setattr("bench.cli.kernel_bench.run_kernel_bench", run_then_block)
    assert main([*TINY, "--json", str(dest)]) == 1
    err = _one_line(capsys.readouterr().err)
    assert "could not save" in err and str(dest) in err
    assert [p.name for p in tmp_path.iterdir()] == ["speed.json"] and dest.is_dir(), "temporary file left behind"
