"""kernels/aot.py: launches recorded from the real wrappers, the judging of a compile, cache relocation,
bad input, and (slow) the --subset table compiled for sm_90a in a child process.

The test session runs the kernels in the Triton interpreter (tests/conftest.py), where nothing can be
compiled for a GPU; recording works there all the same (the interpreter's ``run`` is replaced too), so
only the compile goes to a child process without TRITON_INTERPRET.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="package triton not installed (Linux only)")

import kernels  # noqa: E402
from kernels import _common, aot  # noqa: E402
from kernels.attention import attention, attention_atomic  # noqa: E402
from kernels.rmsnorm import CONFIG as RMS_CONFIG  # noqa: E402
from kernels.rmsnorm import rmsnorm, rmsnorm_atomic  # noqa: E402
from qwen_layers.backends import padded_causal_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _names(launches) -> list[tuple[str, str]]:
    return [(x.kernel.rpartition(".")[2], x.phase) for x in launches]


def _kwargs(launch) -> dict:
    return dict(launch.kwargs)


# ------------------------------------------------------------------------------------------------
# recording the wrappers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn,atomic", [(rmsnorm, False), (rmsnorm_atomic, True)])
def test_rmsnorm_records_forward_and_backward(fn, atomic):
    rows = 3 * RMS_CONFIG.rows_per_program * RMS_CONFIG.reduce_chunk  # 3 partial-sum chunks: two reduce levels
    x = torch.empty(rows, 896, device="meta", requires_grad=True)
    w = torch.empty(896, device="meta", requires_grad=True)
    with aot.record_launches() as launches:
        fn(x, w, 1e-6).sum().backward()
    expected = [("_rmsnorm_fwd_kernel", "forward"), ("_rmsnorm_bwd_kernel", "backward")]
    if not atomic:  # the fixed-order dW: 3 * 64 partials -> 3 -> 1
        expected += [("_dw_reduce_kernel", "backward")] * 2
    assert _names(launches) == expected
    fwd, bwd = launches[0], launches[1]
    assert _kwargs(fwd) == {"BLOCK_N": 1024, "num_warps": RMS_CONFIG.num_warps(1024)}
    assert _kwargs(bwd)["ATOMIC"] is atomic
    assert fwd.grid == (rows,)
    assert all(isinstance(a, aot.TensorStandIn) and a.aligned for a in fwd.args[:4])  # meta pointers are 0


def _qkv(device, b=2, hq=4, hkv=2, s=48, d=64, dtype=torch.bfloat16):
    q = torch.empty(b, hq, s, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.empty(b, hkv, s, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.empty(b, hkv, s, d, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def test_attention_records_forward_and_backward_and_the_atomic_twin_differs():
    recorded = {}
    for fn in (attention, attention_atomic):
        q, k, v = _qkv("meta")
        with aot.record_launches() as launches:
            o = fn(q, k, v, scale=0.125)
            o.backward(torch.empty_like(o))
        recorded[fn.__name__] = launches
    det, atomic = recorded["attention"], recorded["attention_atomic"]
    assert _names(det) == [("_attn_fwd_kernel", "forward"), ("_attn_bwd_delta_kernel", "backward"),
                           ("_attn_bwd_dkdv_kernel", "backward"), ("_attn_bwd_dq_kernel", "backward")]
    assert _names(atomic) == [("_attn_fwd_kernel", "forward"), ("_attn_bwd_delta_kernel", "backward"),
                              ("_attn_bwd_dkdv_kernel", "backward")]
    assert _kwargs(det[2])["ATOMIC_DQ"] is False and _kwargs(atomic[2])["ATOMIC_DQ"] is True
    assert det[0].call == atomic[0].call  # the forward is the same code and the same specialisation
    masked = [_kwargs(x) for x in det if "HAS_KEEP" in _kwargs(x)]
    assert len(masked) == 3 and all(kw["CAUSAL"] is True and kw["HAS_KEEP"] is False for kw in masked)


def test_padded_attention_records_the_key_padding_variant_on_cpu_tensors():
    q, k, v = _qkv("cpu", s=32)
    keep = (torch.arange(32)[None, :] < torch.tensor([32, 20])[:, None]).long()
    with aot.record_launches() as launches:
        o = attention(q, k, v, scale=0.125, attn_mask=padded_causal_mask(keep, 32))
        o.backward(torch.empty_like(o))
    kernels_with_keep = [x for x in launches if "HAS_KEEP" in _kwargs(x)]
    assert len(kernels_with_keep) == 3 and all(_kwargs(x)["HAS_KEEP"] is True for x in kernels_with_keep)
    assert q.grad is not None and q.grad.shape == q.shape  # backward ran through autograd, nothing launched


def test_the_model_scenario_launches_every_op_of_a_layer():
    """The causal LM on meta tensors, one layer: norms, projections (with bias on Qwen2.5), rope, attention,
    SwiGLU, the LM head and the loss, forward and backward."""
    with aot.record_launches() as launches, aot.call_site("tiny"):
        aot.record_model(aot.PRESETS["qwen2.5-tiny"], torch.bfloat16, "deterministic", aot.Shape(2, 32))
    names = {n for n, _ in _names(launches)}
    assert {"_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel", "_matmul_kernel", "_column_sum_kernel", "_rope_kernel",
            "_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
            "_ce_forward_kernel", "_mean_kernel", "_ce_backward_kernel"} <= names
    assert not any("atomic" in n for n in names)
    assert {x.site for x in launches} == {"tiny"}


def test_recording_is_scoped():
    classes = {aot.JITFunction} | {type(k) for k in aot.discover_kernels().values()}
    before = {cls: cls.__dict__.get("__getitem__") for cls in classes}
    meta = torch.device("meta")
    assert _common.triton_available(meta) is not None
    with pytest.raises(RuntimeError, match="boom"):
        with aot.record_launches():
            assert _common.triton_available(meta) is None
            raise RuntimeError("boom")
    assert {cls: cls.__dict__.get("__getitem__") for cls in classes} == before
    assert _common.triton_available(meta) is not None
    with pytest.raises(RuntimeError, match="cannot run on meta"):
        rmsnorm(torch.empty(4, 8, device="meta"), torch.empty(8, device="meta"), 1e-6)


def _linear_tile(launches) -> tuple:
    kw = _kwargs(next(x for x in launches if x.kernel.endswith("._matmul_kernel")))
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], kw["num_stages"]


def test_recording_for_a_target_uses_that_gpus_launch_configs():
    """The wrappers choose some configs by compute capability (kernels.matmul, kernels.attention): recorded
    for sm_80 they pick the sm_80 tables, for sm_90a (and with no target, as off CUDA) Hopper's; only for
    the block, and in this context only."""
    from kernels import attention as ka
    from kernels import matmul as mm

    def record(target, dtype=torch.bfloat16):
        x = torch.empty(64, 896, dtype=dtype, device="meta", requires_grad=True)
        w = torch.empty(128, 896, dtype=dtype, device="meta", requires_grad=True)
        q, k, v = _qkv("meta", d=128, dtype=dtype)
        with aot.record_launches(target) as launches:
            mm.linear(x, w).sum().backward()
            o = attention(q, k, v, scale=0.125)
            o.backward(torch.empty_like(o))
        return launches

    def dkdv(launches) -> tuple:
        kw = _kwargs(next(x for x in launches if x.kernel.endswith("_dkdv_kernel")))
        return kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]

    a100, h100, default = record(A100), record(H100), record(None)
    sm80, sm90 = mm.config_for(torch.bfloat16, (8, 0)), mm.CONFIGS[torch.bfloat16]
    assert _linear_tile(a100) == (sm80.block_m, sm80.block_n, sm80.block_k, sm80.num_warps, sm80.num_stages)
    assert _linear_tile(h100) == _linear_tile(default) == (sm90.block_m, sm90.block_n, sm90.block_k,
                                                           sm90.num_warps, sm90.num_stages)
    assert sm80.block_n != sm90.block_n  # 16-bit: 128x128 on sm_80, 128x256 on Hopper
    a100, h100 = record(A100, torch.float32), record(H100, torch.float32)
    for launches, table in ((a100, ka.CONFIGS_SM80), (h100, ka.CONFIGS)):
        c = table[(128, torch.float32)]
        assert dkdv(launches) == (c.dkdv_block_m, c.dkdv_block_n, c.dkdv_warps, c.dkdv_stages)
    assert dkdv(a100) != dkdv(h100)
    for module in (mm, ka):  # scoped: nothing assumed after the blocks
        assert module.device_capability(torch.device("meta")) == (9, 0)


def test_assumed_capability_is_per_context_and_never_for_cuda_tensors():
    from kernels import matmul as mm

    with mm.assume_capability((8, 0)):
        assert mm.device_capability(torch.device("cpu")) == (8, 0)
        assert contextvars.copy_context().run(mm.device_capability, torch.device("cpu")) == (8, 0)
        assert contextvars.Context().run(mm.device_capability, torch.device("cpu")) == (9, 0)  # another context
        if torch.cuda.is_available():
            assert mm.device_capability(torch.device("cuda")) == torch.cuda.get_device_capability()
    assert mm.config_for(torch.float32, (8, 0)) is mm.config_for(torch.float32, (9, 0))  # float32: one tile
    assert mm.config_for(torch.float16, (8, 6)) is mm.CONFIGS_SM80[torch.float16]
    assert mm.config_for(torch.float16, (10, 0)) is mm.CONFIGS[torch.float16]


def test_select_kernels_by_module_kernel_or_both():
    assert aot.select_kernels("rmsnorm") == ("kernels.rmsnorm._dw_reduce_kernel", "kernels.rmsnorm._rmsnorm_bwd_kernel",
                                             "kernels.rmsnorm._rmsnorm_fwd_kernel")
    assert aot.select_kernels("_attn_bwd_dq_kernel, kernels.matmul._matmul_kernel,attention._attn_bwd_dq_kernel") == (
        "kernels.attention._attn_bwd_dq_kernel", "kernels.matmul._matmul_kernel")
    with pytest.raises(aot._BadInput, match="no kernel or module 'attn'; kernels: attention._attn_bwd_delta_kernel"):
        aot.select_kernels("attn")


# ------------------------------------------------------------------------------------------------
# judging a compile
# ------------------------------------------------------------------------------------------------

H100 = aot.TARGETS["sm_90a"]
A100 = aot.TARGETS["sm_80"]


def _result(**changes) -> aot.CompileResult:
    base = dict(spec_id="x", kernel="kernels.matmul._matmul_kernel", target="sm_90a", ok=True, registers=168,
                spill_stores=0, spill_loads=0, stack_frame=0, shared=147456, num_warps=8)
    return aot.CompileResult(**{**base, **changes})


def test_judge_passes_a_kernel_within_limits():
    assert aot.judge(_result(), H100) == []
    assert aot.judge(_result(shared=H100.max_shared), H100) == []  # the limit itself fits


def test_judge_fails_shared_memory_over_the_target_limit():
    over_a100 = _result(shared=A100.max_shared + 1)
    assert aot.judge(over_a100, H100) == []
    (problem,) = aot.judge(over_a100, A100)
    assert "shared memory 166913 B > 166912 B" in problem
    assert H100.max_shared == 232448 and A100.max_shared == 166912  # 227 KiB and 163 KiB


def test_judge_fails_spills_and_unknown_spills_and_failed_compiles():
    (problem,) = aot.judge(_result(spill_stores=48, spill_loads=40, stack_frame=48), H100)
    assert "register spills: 48 B stored, 40 B loaded" in problem
    (problem,) = aot.judge(_result(spill_stores=None, spill_loads=None, stack_frame=16), H100)
    assert "spills unknown" in problem
    (problem,) = aot.judge(_result(ok=False, error="CompilationError: at 12:4: boom"), H100)
    assert problem.startswith("compile failed: CompilationError")
    (problem,) = aot.judge(_result(registers=255, num_warps=16), H100)  # 255 x 512 threads > 65536
    assert "registers" in problem


def test_a_fabricated_bad_result_makes_the_table_exit_nonzero():
    """build_entries judges every compile result; one bad row is a problem entry (main returns 1 then)."""
    launch = aot.Launch("kernels.matmul._matmul_kernel", (), (), (1,), "p/bf16/deterministic/model", "forward")
    spec = aot.Specialisation("kernels.matmul._matmul_kernel", "sm_80", "abc", {}, {}, (), (), 8, 3)
    plan = aot.Plan({"sm_80": [launch]}, {(launch.call, "sm_80"): spec}, [(spec, launch)])
    (entry,) = aot.build_entries(plan, {("sm_80", "abc"): _result(target="sm_80", spec_id="abc", shared=200000)},
                                 [A100])
    assert entry.problems and entry.presets == ["p"] and entry.call_sites == ["p/bf16/deterministic/model/forward"]
    assert aot.counts([entry], {"sm_80": [launch]}, [A100])["with_problems"] == 1


def test_ptxas_log_parsing():
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_k' for 'sm_90a'
        ptxas info    : Function properties for _k
            56 bytes stack frame, 52 bytes spill stores, 48 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers
        """)
    assert aot.parse_ptxas_log(log) == {"registers": 255, "stack_frame": 56, "spill_stores": 52, "spill_loads": 48}
    assert aot.parse_ptxas_log("nothing here") is None


# ------------------------------------------------------------------------------------------------
# cache relocation
# ------------------------------------------------------------------------------------------------


def _fake_cache(root: Path, old: str) -> None:
    for h, files in (("AAA", ("k.json", "k.cubin", "k.ptx", "k.llir")), ("BBB", ("m.json", "m.ptx"))):
        (root / h).mkdir(parents=True)
        for f in files:
            (root / h / f).write_text("x")
        stem = files[0].split(".")[0]
        group = {"child_paths": {f: f"{old}/{h}/{f}" for f in files}}
        (root / h / f"__grp__{stem}.json").write_text(json.dumps(group))


def test_relocate_cache_rewrites_absolute_paths_and_prunes(tmp_path):
    cache = tmp_path / "moved"
    _fake_cache(cache, "/somewhere/else/cache")
    out = aot.relocate_cache(cache, binary_only=True)
    assert out["groups"] == 2 and out["rewritten"] == 1 and out["dropped_groups"] == 1 and out["deleted_files"] == 3
    group = json.loads((cache / "AAA" / "__grp__k.json").read_text())["child_paths"]
    assert group == {"k.json": str(cache.resolve() / "AAA" / "k.json"), "k.cubin": str(cache.resolve() / "AAA" / "k.cubin")}
    assert not (cache / "BBB" / "__grp__m.json").exists()  # no cubin: a clean miss, not a broken hit


def test_relocate_compares_the_fill_fingerprint_with_this_process(tmp_path):
    if aot.knobs is None:
        pytest.skip(f"triton {aot.triton.__version__} has no triton.knobs: no fingerprint to compare")
    cache = tmp_path / "c"
    _fake_cache(cache, "/old")
    assert aot.relocate_cache(cache)["mismatch"] is None  # no manifest: nothing to compare
    here = aot.cache_fingerprint()
    (cache / aot.MANIFEST).write_text(json.dumps({"fingerprint": here}))
    assert aot.relocate_cache(cache)["mismatch"] == []
    other = {**here, "triton": "0.0.1", "kernel_sources_sha256": {**here["kernel_sources_sha256"], "rope.py": "0"}}
    (cache / aot.MANIFEST).write_text(json.dumps({"fingerprint": other}))
    first, last = aot.relocate_cache(cache)["mismatch"]
    assert first == f"triton: cache '0.0.1', here {here['triton']!r}"
    assert last == "kernel sources differ: rope.py (their kernels miss)"


def test_relocate_keeps_every_file_without_binary_only(tmp_path):
    cache = tmp_path / "c"
    _fake_cache(cache, "/old")
    aot.relocate_cache(cache)
    group = json.loads((cache / "AAA" / "__grp__k.json").read_text())["child_paths"]
    assert sorted(group) == ["k.cubin", "k.json", "k.llir", "k.ptx"]
    assert all(p.startswith(str(cache.resolve())) for p in group.values())


# ------------------------------------------------------------------------------------------------
# bad input: one message, exit 2
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["--targets", "sm_75"], "unknown target 'sm_75'; choose from sm_80"),
    (["--targets", ""], "--targets: empty list"),
    (["--presets", "qwen9"], "unknown preset 'qwen9'"),
    (["--dtypes", "fp8"], "unknown dtype 'fp8'"),
    (["--jobs", "0"], "--jobs 0: need at least 1"),
    (["--json", "/nonexistent-aot-dir/t.json"], "folder /nonexistent-aot-dir does not exist"),
    (["--binary-only"], "--binary-only needs --cache-dir"),
    (["--kernels", "rms"], "--kernels: no kernel or module 'rms'"),
    (["--kernels", ","], "--kernels: empty list"),
    (["--relocate-cache", "/nonexistent-aot-cache"], "no such folder"),
])
def test_bad_input_exits_2_with_one_message(argv, message, capsys):
    assert aot.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_json_into_an_unwritable_folder_exits_2(capsys):
    """/proc takes no new files, not even from root."""
    assert aot.main(["--json", "/proc/aot-table.json"]) == 2
    err = capsys.readouterr().err
    assert "--json /proc/aot-table.json: cannot write in /proc" in err and err.count("\n") == 1


def test_a_triton_without_knobs_is_refused_with_a_reason(monkeypatch, capsys):
    monkeypatch.setattr(aot, "knobs", None)
    monkeypatch.setattr(_common, "INTERPRET", False)
    assert aot.main(["--subset"]) == 2
    assert "has no triton.knobs, which compiling ahead of time needs" in capsys.readouterr().err


def test_interpreter_mode_is_refused_with_a_reason(capsys):
    if not _common.INTERPRET:
        pytest.skip("this session compiles for real (TRITON_INTERPRET unset)")
    assert aot.main(["--subset"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_target_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--targets", "sm_90"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("kernels.aot: --targets: unknown target 'sm_90'; choose from "
                                   f"{', '.join(aot.TARGETS)}")


# ------------------------------------------------------------------------------------------------
# end to end: the CI subset, compiled for sm_90a in a child process
# ------------------------------------------------------------------------------------------------


def _entry_kernels_by_source() -> set[str]:
    """Every @triton.jit object in the kernels modules that no other JIT function of its module calls,
    found from the source text (independently of aot.discover_kernels)."""
    out = set()
    for short in kernels.KERNEL_MODULES:
        module = importlib.import_module(f"kernels.{short}")
        jitted = {n: o for n, o in vars(module).items() if hasattr(o, "fn") and hasattr(o, "run")
                  and getattr(o.fn, "__module__", None) == module.__name__}
        sources = {n: inspect.getsource(o.fn) for n, o in jitted.items()}
        for name in jitted:
            called = re.compile(rf"(?<![\w.]){re.escape(name)}\(")
            if not any(called.search(src) for other, src in sources.items() if other != name):
                out.add(f"{module.__name__}.{name}")
    return out


def test_entry_kernel_discovery_agrees_with_the_source():
    found = set(aot.discover_kernels())
    assert found == _entry_kernels_by_source()
    assert "kernels.attention._attn_fwd_kernel" in found and "kernels.attention._load_kv" not in found


@pytest.mark.slow
def test_subset_compiles_every_kernel_for_sm_90a(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot compile for sm_90a")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.aot", "--subset", "--targets", "sm_90a", "--jobs", "2", "--json", str(out),
         "--markdown", str(tmp_path / "aot.md"), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table["targets"][0]["name"] == "sm_90a" and table["settings"]["subset"] is True
    covered = {e["kernel"] for e in table["entries"] if e["result"]["ok"]}
    missing = _entry_kernels_by_source() - covered
    assert not missing, f"kernels never compiled by the subset (add their call to kernels/aot.py): {missing}"
    assert table["uncovered_kernels"] == []
    assert all(e["result"]["stats_from"] == "ptxas -v" for e in table["entries"])  # a fresh cache: all compiled
    assert table["command"].startswith("python -m kernels.aot --subset")
    assert (tmp_path / "aot.md").read_text().startswith("# Ahead-of-time compile table")
