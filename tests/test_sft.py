"""``detbench sft``: SFT batches, repeated training steps, the comparison of repeats, bad input.

The planted tests bound their own chance of missing the way tests/planted_checks.py explains (exact
per-call coincidence probabilities from the recorded partial results; asserted below 1e-6 before the
finding is asserted). To be seen by ``detbench sft`` a planted difference must also reach a loss, a
gradient norm, a gradient or a final parameter. The per-step gradient fingerprint makes that direct
for the backward faults (the planted reduction *is* a gradient, or feeds one through a matmul); the
forward faults reach the loss through the residual stream, with hundreds of elements differing per
call. (Without the gradient fingerprint the RMSNorm fault was seen to vanish: a one-ulp change in a
small gradient rounds away in the norm, and AdamW's first steps, g/sqrt(g^2), absorb it.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

import bench.data as data
from bench import cli, results, sft
from bench.compare import bits
from bench.data import IGNORE_INDEX, DataError, batch_for_step, read_token_file, synthetic_batches
from qwen_layers.registry import REGISTRY

from .planted_checks import MAX_MISS, PLACES, OrderSpy, nan_checkpoint, token_file
from .signals import SIGNAL_IDS, SIGNALS, interrupt, paused_child

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def test_synthetic_batches_are_seeded_sft_batches():
    a = synthetic_batches(256, n_batches=3, batch_size=5, seq_len=24, seed=1)
    b = synthetic_batches(256, n_batches=3, batch_size=5, seq_len=24, seed=1)
    c = synthetic_batches(256, n_batches=3, batch_size=5, seq_len=24, seed=2)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
    assert not torch.equal(a[0].input_ids, c[0].input_ids)
    lengths = set()
    for batch in a:
        ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
        assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= 24
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            lengths.add(n)
            assert mask[row, :n].all() and not mask[row, n:].any()          # right padding
            assert (labels[row, n:] == IGNORE_INDEX).all()                   # padding not scored
            scored = (labels[row, :n] != IGNORE_INDEX).nonzero().flatten()
            assert scored.numel() >= 1 and scored[0] >= 1                     # a prompt, then the response
            assert (labels[row, scored[0]:n] == ids[row, scored[0]:n]).all()  # the response is scored
            assert (labels[row, :scored[0]] == IGNORE_INDEX).all()            # the prompt is not
            assert (ids[row, :n] >= 1).all() and (ids[row, :n] < 256).all()
        assert batch.n_scored > 0
    assert len(lengths) > 3  # varied lengths
    assert batch_for_step(a, 4) is a[1]


def test_token_file_lists_and_masks(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('[5, 6, 7]\n\n{"input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 1, 1]}\n[9, 9]\n')
    batches = read_token_file(path, vocab_size=10, batch_size=2)
    assert len(batches) == 2
    b0 = batches[0]
    assert b0.input_ids.tolist() == [[5, 6, 7, 0], [1, 2, 3, 4]]
    assert b0.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b0.labels.tolist() == [[5, 6, 7, -100], [-100, -100, 3, 4]]
    assert batches[1].input_ids.tolist() == [[9, 9]]


@pytest.mark.parametrize("text,msg", [
    ("[1, 2, 300]\n", "token id 300 is outside the model's vocabulary [0, 256)"),
    ("[1, 2, -1]\n", "token id -1 is outside"),
    ("[1, 2\n", "not JSON"),
    ('{"input_ids": [1, 2], "loss_mask": [1]}\n', "loss_mask must be a list of 0/1"),
    ('{"ids": [1, 2]}\n', 'without "input_ids"'),
    ("[]\n", "non-empty list of integers"),
    ("\n\n", "no sequences"),
    ('{"input_ids": [1, 2], "loss_mask": [1, 0]}\n', "no token that counts in the loss"),
])
def test_token_file_errors_name_the_line_and_fix(tmp_path, text, msg):
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=None) as e:
        read_token_file(path, vocab_size=256, batch_size=4)
    assert msg in str(e.value) and str(path) in str(e.value)


# ------------------------------------------------------------------------------------------------
# detbench sft on deterministic backends
# ------------------------------------------------------------------------------------------------


def test_sft_matrix_is_identical_on_deterministic_backends(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out_dir = tmp_path / "results"
    rc = cli.main(["sft", "--model", "qwen3-tiny", "--device", "cpu", "--steps", "3", "--repeats", "3",
                   "--seq-len", "24", "--attention", "eager,sdpa", "--dtype", "fp32,bf16", "--lr", "1e-5,3e-4",
                   "--out", str(out_dir)])
    assert rc == 0
    text = capsys.readouterr().out
    files = list(out_dir.iterdir())
    assert len(files) == 1 and files[0].name.startswith("sft-") and files[0].suffix == ".json"
    rec = json.loads(files[0].read_text())
    assert rec["schema"] == sft.SCHEMA and rec["status"] == "complete"
    assert rec["environment"]["device_type"] == "cpu" and rec["environment"]["seeds"] == {"model": 0, "data": 0}
    assert rec["settings"]["attention"] == ["eager", "sdpa"] and rec["settings"]["lrs"] == [1e-5, 3e-4]
    assert len(rec["configs"]) == 8 and len(rec["batches"]) == 3
    for c in rec["configs"]:
        assert c["status"] == "ok" and c["identical"] is True, c["verdict"]
        assert len(c["losses"]) == 3 and all(len(r) == 3 for r in c["losses"])
        # the recorded measurements themselves agree across the repeats (not the verdict computed from them)
        for table in ("loss_bits", "grad_norm_bits", "grad_digests"):
            assert len(c[table]) == 3 and len({tuple(r) for r in c[table]}) == 1, (table, c[table])
        assert len(c["param_diff"]) == 2
        assert "3 repeats x 3 steps" in c["verdict"]
        assert all(math.isfinite(x) for r in c["losses"] for x in r)
    by = {(c["attention"], c["dtype"], c["lr"]): c for c in rec["configs"]}
    # the learning rate matters from step 2 on; bf16 differs from fp32 from step 1 on
    assert by[("eager", "float32", 1e-5)]["losses"][0][0] == by[("eager", "float32", 3e-4)]["losses"][0][0]
    assert by[("eager", "float32", 1e-5)]["losses"][0][1] != by[("eager", "float32", 3e-4)]["losses"][0][1]
    assert by[("eager", "bfloat16", 1e-5)]["losses"][0][0] != by[("eager", "float32", 1e-5)]["losses"][0][0]
    # the table prints every digit that matters and marks equal steps
    loss0 = sft.fmt_exact(by[("eager", "float32", 1e-5)]["losses"][0][0], "float32")
    assert loss0 in text and "identical" in text and "differ" not in text


def test_sft_step_loss_is_the_models_loss():
    spec = sft.parse_model("qwen3-tiny")
    (batch,) = synthetic_batches(256, n_batches=1, batch_size=3, seq_len=16, seed=0)
    model = sft.build(spec, attention="eager", dtype=torch.float32, device="cpu")
    with torch.no_grad():
        expected = model(batch.input_ids, batch.attention_mask, batch.labels).loss
    opt = sft.make_optimizer(model, lr=1e-3)
    loss, norm = sft.sft_step(model, opt, batch)
    assert torch.equal(bits(loss), bits(expected)) and norm > 0
    assert sft.value_bits(torch.tensor(1.0)) == "float32:3f800000"


def test_hf_model_trains_bitwise_like_the_detbench_model():
    """hf:qwen3-tiny gets the same seeded weights in transformers' class: eager fp32 losses are equal."""
    pytest.importorskip("transformers")
    results = {}
    for name in ("qwen3-tiny", "hf:qwen3-tiny"):
        plan = sft.make_plan(model=name, steps=3, repeats=2, seq_len=16, device="cpu")
        (res,) = sft.run_plan(plan)
        assert res.identical, res.verdict
        results[name] = res
    assert results["qwen3-tiny"].loss_bits == results["hf:qwen3-tiny"].loss_bits
    assert results["qwen3-tiny"].grad_norm_bits == results["hf:qwen3-tiny"].grad_norm_bits


def test_modes_are_applied_and_recorded():
    plan = sft.make_plan(model="qwen3-tiny", modes="default,torch-det", steps=2, repeats=2, seq_len=16)
    seen = []
    orig = torch.are_deterministic_algorithms_enabled

    def on_step():
        seen.append(orig())

    res = sft.run_plan(plan, on_step=on_step)
    assert [r.mode for r in res] == ["default", "torch-det"] and all(r.identical for r in res)
    assert seen == [False] * 4 + [True] * 4
    assert orig() is False  # restored


# ------------------------------------------------------------------------------------------------
# the verdict against the bits: each repeat's final parameters read from the model itself
# ------------------------------------------------------------------------------------------------


def run_watching_parameters(plan, monkeypatch):
    """Run a one-configuration plan; return its result, the model's parameters when built and each
    repeat's final parameters, as bit patterns read from the model (not from ``sft``'s own comparison)."""
    assert len(plan.attention) == len(plan.dtypes) == len(plan.modes) == len(plan.lrs) == 1
    real_build = sft.build
    models, init, finals = [], {}, []

    def recording_build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        models.append(model)
        init.update({n: bits(p.detach()).clone() for n, p in model.named_parameters()})
        return model

    calls = []

    def on_step():  # called after every step; a repeat's last step leaves its final parameters
        calls.append(None)
        if len(calls) % plan.steps == 0:
            finals.append({n: bits(p.detach()).clone() for n, p in models[0].named_parameters()})

    monkeypatch.setattr(sft, "build", recording_build)
    (res,) = sft.run_plan(plan, on_step=on_step)
    assert len(models) == 1 and len(finals) == plan.repeats
    return res, init, finals


def differing_parameters(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [n for n in a if not torch.equal(a[n], b[n])]


def test_identical_verdict_agrees_with_the_bits_of_every_repeat(monkeypatch):
    """Eager fp32 on the CPU: the repeats' losses, grad norms and final parameters are bitwise equal when
    compared here, each repeat did change the weights (so equal is not "untouched"), and the verdict says
    identical."""
    plan = sft.make_plan(model="qwen3-tiny", steps=3, repeats=3, seq_len=16, lrs="3e-4")
    res, init, finals = run_watching_parameters(plan, monkeypatch)
    for r, final in enumerate(finals):
        assert len(differing_parameters(final, init)) == len(init), f"repeat {r} left some weights untouched"
        assert differing_parameters(final, finals[0]) == [], f"repeat {r}'s final parameters differ from repeat 0's"
        assert res.loss_bits[r] == res.loss_bits[0] and res.grad_norm_bits[r] == res.grad_norm_bits[0]
    assert len(res.loss_bits) == 3 and all(len(row) == 3 for row in res.loss_bits)
    assert res.identical is True, res.verdict


# ------------------------------------------------------------------------------------------------
# planted: the repeats diverge
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, place", [
    *(("qwen3-tiny", p) for p in PLACES),
    # --plant on hf: models: the planted module's forward calls the registry backend (a negative control
    # for a user's transformers step as much as for detbench's model)
    pytest.param("hf:qwen3-tiny", "linear-fwd", marks=pytest.mark.slow), ("hf:qwen3-tiny", "rmsnorm-dw"),
])
def test_sft_sees_planted_divergence(tmp_path, monkeypatch, model, place):
    if model.startswith("hf:"):
        pytest.importorskip("transformers")
    plant, _, (bs, length, prompt, steps) = PLACES[place]
    path = token_file(tmp_path / "t.jsonl", n_seqs=bs * steps, length=length, prompt=prompt)
    plan = sft.make_plan(model=model, data=str(path), batch_size=bs, steps=steps, repeats=2, lrs="1e-3",
                         plants=[plant])
    spy = OrderSpy()
    with spy.installed():
        res, _, finals = run_watching_parameters(plan, monkeypatch)
    miss = spy.miss_probability(spy.calls[:steps])  # repeat 0: the repeats agree only if every call agreed
    assert miss < MAX_MISS, f"test too weak: it would miss with probability {miss:.2e}"
    assert res.identical is False, res.verdict
    assert plan.settings.model_kind == ("transformers" if model.startswith("hf:") else "detbench")
    # the repeats' own measurements differ, compared here: per-step bits, or the final parameters' bits
    measured = [(res.loss_bits[r], res.grad_norm_bits[r], res.grad_digests[r]) for r in (0, 1)]
    assert measured[0] != measured[1] or differing_parameters(finals[0], finals[1])
    assert "planted" in plan.settings.plants[0]


def test_plants_of_eager_backends_into_a_transformers_model_change_no_bit_and_come_off():
    """Planting the eager backends computes what transformers' forwards compute, bit for bit (so a planted
    difference is the backend's, not the plant's); remove_plants gives every module its class's forward back;
    a deep copy of a planted model runs with its own weights."""
    pytest.importorskip("transformers")
    import copy

    spec = sft.parse_model("hf:qwen3-tiny")
    (batch,) = synthetic_batches(256, n_batches=1, batch_size=2, seq_len=16, seed=0)
    plants = [sft.parse_plant(p) for p in ("model=linear/eager", "model.layers=rmsnorm/eager",
                                           "model.layers.1=swiglu/eager")]

    def step(model):
        loss, norm = sft.sft_step(model, sft.make_optimizer(model, lr=1e-3), batch)
        return [bits(loss), bits(norm)] + [bits(p.detach()) for p in model.parameters()]

    plain = step(sft.build(spec, attention="eager", dtype=torch.float32, device="cpu"))
    model = sft.build(spec, attention="eager", dtype=torch.float32, device="cpu", plants=plants)
    planted = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(planted) == 14 + 8 + 1  # Linears under model (not lm_head); the layers' 4 RMSNorms x 2; one MLP
    twin = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(step(model), plain))
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert twin.model.layers[1].mlp.forward.__self__ is twin.model.layers[1].mlp
    assert not all(torch.equal(a, b) for a, b in zip(step(twin), plain))
    assert sft.remove_plants(model) == len(planted) and not any("forward" in m.__dict__ for m in model.modules())
    assert sft.remove_plants(model) == 0


def test_cli_sft_prints_the_divergence(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    path = token_file(tmp_path / "t.jsonl", n_seqs=12, length=16, prompt=4)
    spy = OrderSpy()
    with spy.installed():
        rc = cli.main(["sft", "--data", str(path), "--batch-size", "2", "--steps", "6", "--repeats", "2",
                       "--lr", "1e-3", "--device", "cpu", "--no-save",
                       "--plant", "model.layers.1.mlp.down_proj=linear/planted-nondet"])
    assert rc == 0 and spy.miss_probability(spy.calls[:6]) < MAX_MISS
    out = capsys.readouterr().out
    assert "planted: model.layers.1.mlp.down_proj=linear/planted-nondet" in out
    assert "diverge" in out and "differ" in out


def test_no_false_positives_over_many_repeats():
    plan = sft.make_plan(model="qwen3-tiny", steps=4, repeats=6, seq_len=16, lrs="3e-4")
    (res,) = sft.run_plan(plan)
    assert res.identical and "6 repeats x 4 steps" in res.verdict


# ------------------------------------------------------------------------------------------------
# bad input: one clear line, exit 2, nothing in results/
# ------------------------------------------------------------------------------------------------


# Each case: an id, the arguments after ``detbench sft --device cpu --out DIR`` ("{tmp}" is the test's
# tmp_path, where ``bad_files`` wrote the files the arguments point at), and the text the error names.
BAD_INPUTS = [
    ("unknown-model", ["--model", "qwen9-huge"], "unknown model 'qwen9-huge'"),
    ("checkpoint-without-config", ["--model", "{tmp}/not_a_checkpoint"], "config.json: missing"),
    ("checkpoint-config-not-json", ["--model", "{tmp}/bad_ckpt"], "not valid JSON"),
    ("token-outside-vocab", ["--data", "{tmp}/big.jsonl"], "token id 99999 is outside the model's vocabulary [0, 256)"),
    ("missing-token-file", ["--data", "{tmp}/missing.jsonl"], "no such token file"),
    ("lr-not-a-number", ["--lr", "1e-5,abc"], "'abc' is not a number"),
    ("lr-empty-entry", ["--lr", "1e-5,,3e-4"], "without empty entries"),
    ("lr-negative", ["--lr", "-1"], "finite positive"),
    ("zero-steps", ["--steps", "0"], "--steps must be at least 1"),
    ("zero-repeats", ["--repeats", "0"], "at least 2 repeats"),
    ("one-repeat", ["--repeats", "1"], "--repeats 1: comparing repeats needs at least 2 repeats"),
    ("weight-decay-nan", ["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    ("weight-decay-negative", ["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    ("weight-decay-infinite", ["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
    ("data-seed-too-large", ["--data-seed", "99999999999999999999"],
     "--data-seed 99999999999999999999 is out of range"),
    ("seed-too-large", ["--seed", str(2 ** 64)], f"--seed {2 ** 64} is out of range"),
    ("seed-too-small", ["--seed", str(-2 ** 63 - 1)], f"--seed {-2 ** 63 - 1} is out of range"),
    ("unknown-dtype", ["--dtype", "fp8"], "unknown dtype"),
    ("unknown-mode", ["--mode", "fast"], "unknown mode"),
    ("unknown-attention", ["--attention", "nope"], "unknown backend 'nope'"),
    ("attention-needs-cuda", ["--attention", "sdpa-efficient"], "needs a CUDA device"),
    ("plant-without-backend", ["--plant", "model.layers.0.mlp"], "write MODULE_PATH=op/backend"),
    ("plant-unknown-module", ["--plant", "model.layers.7.mlp=linear/planted-nondet"],
     "has no module 'model.layers.7.mlp'"),
    ("plant-op-not-run-there", ["--plant", "model.layers.0.mlp=attention/planted-nondet-bwd"],
     "does not run op 'attention'"),
    ("plant-unknown-backend", ["--plant", "model.layers.0.mlp=linear/nope"], "unknown backend 'nope'"),
    ("plant-attention-into-hf-model", ["--model", "hf:qwen3-tiny", "--plant",
                                       "model.layers.0.self_attn=attention/planted-nondet-bwd"],
     "attention cannot be planted into a transformers model: transformers picks one attention implementation"),
    ("plant-embedding-into-hf-model", ["--model", "hf:qwen3-tiny", "--plant", "model.embed_tokens=embedding/eager"],
     "embedding cannot be planted into a transformers model; what can: linear in nn.Linear modules"),
    ("plant-hf-op-not-run-there", ["--model", "hf:qwen3-tiny", "--plant",
                                   "model.layers.0.self_attn.q_norm=linear/planted-nondet"],
     "(Qwen3RMSNorm) has no nn.Linear modules below it"),
    ("plant-hf-unknown-module", ["--model", "hf:qwen3-tiny", "--plant", "model.layers.7=linear/planted-nondet"],
     "has no module 'model.layers.7'"),
    ("hf-attention-not-implemented", ["--model", "hf:qwen3-tiny", "--attention", "sdpa-math"],
     "not an attn_implementation"),
    ("betas-one-number", ["--betas", "0.9"], "two numbers"),
]


@pytest.fixture
def bad_files(tmp_path):
    """The files BAD_INPUTS point at: a folder that is no checkpoint, one with a broken config.json, and a
    token file with an id outside the vocabulary."""
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    (not_ckpt / "weights.bin").write_text("x")
    bad_json_ckpt = tmp_path / "bad_ckpt"
    bad_json_ckpt.mkdir()
    (bad_json_ckpt / "config.json").write_text("{not json")
    (tmp_path / "big.jsonl").write_text("[1, 2, 3, 99999]\n")
    return tmp_path


@pytest.mark.parametrize("argv,msg", [pytest.param(argv, msg, id=name) for name, argv, msg in BAD_INPUTS])
def test_bad_input_gives_one_line_and_exit_2(bad_files, capsys, argv, msg):
    out_dir = bad_files / "results"
    argv = [a.format(tmp=bad_files) for a in argv]
    rc = cli.main(["sft", "--device", "cpu", "--out", str(out_dir), *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert msg in err and err.startswith("detbench: error: ") and err.count("\n") == 1, err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_hf_model_without_transformers(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    out_dir = tmp_path / "results"
    assert cli.main(["sft", "--model", "hf:qwen3-tiny", "--device", "cpu", "--out", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert "needs transformers, which is not installed" in err and "pip install 'detbench[hf]'" in err
    assert not out_dir.exists()


def test_planted_backends_are_registered_only_while_needed():

    assert "planted-nondet" not in REGISTRY.names("linear")
    plan = sft.make_plan(model="qwen3-tiny", steps=1, repeats=2, seq_len=8,
                         plants=["model.layers.0.mlp.down_proj=linear/planted-nondet"])
    sft.run_plan(plan)
    assert "planted-nondet" not in REGISTRY.names("linear")


# ------------------------------------------------------------------------------------------------
# non-finite values: never "identical"
# ------------------------------------------------------------------------------------------------

NAN_PARAM = "model.layers.0.mlp.down_proj.weight"


def test_nan_weight_with_planted_nondeterminism_is_not_comparable(tmp_path, capsys, monkeypatch):
    """One NaN weight in the checkpoint: every loss is NaN and the NaN bits agree, although a planted
    nondeterministic down_proj runs. The verdict says not comparable and why; never identical."""
    monkeypatch.setenv("COLUMNS", "250")
    ckpt = nan_checkpoint(tmp_path / "ckpt", param=NAN_PARAM)
    out_dir = tmp_path / "results"
    rc = cli.main(["sft", "--model", str(ckpt), "--device", "cpu", "--steps", "2", "--repeats", "2",
                   "--seq-len", "16", "--plant", "model.layers.1.mlp.down_proj=linear/planted-nondet",
                   "--out", str(out_dir)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "not comparable (non-finite from step 1" in out and NAN_PARAM in out
    assert "identical" not in out
    (path,) = out_dir.iterdir()
    (c,) = json.loads(path.read_text())["configs"]
    assert all(x == "NaN" for r in c["losses"] for x in r)  # the case: NaN everywhere (as JSON writes it)
    assert c["status"] == "ok" and c["identical"] is None
    assert c["non_finite"]["step"] == 1 and c["non_finite"]["what"] == "initial weights"
    assert NAN_PARAM in c["non_finite"]["detail"]
    assert c["verdict"].startswith("not comparable (non-finite from step 1: ")


def test_huge_learning_rate_goes_non_finite_and_is_not_comparable():
    """--lr 1e30: the losses turn NaN at step 3 and the NaN bits agree; the verdict names the first
    step and what went non-finite there, which is no later than the first non-finite loss."""
    plan = sft.make_plan(model="qwen3-tiny", steps=4, repeats=2, seq_len=16, lrs="1e30")
    (res,) = sft.run_plan(plan)
    first_nan_loss = next(k + 1 for k, x in enumerate(res.losses[0]) if not math.isfinite(x))
    assert first_nan_loss == 3 and res.loss_bits[0] == res.loss_bits[1]
    nf = res.non_finite
    assert nf is not None and 1 <= nf["step"] <= first_nan_loss
    assert nf["what"] in ("loss", "gradient norm", "gradients", "parameters")
    assert res.identical is None and res.first_divergent_step is None
    assert res.verdict.startswith(f"not comparable (non-finite from step {nf['step']}: {nf['what']}")
    assert "identical in 2 repeats x" not in res.verdict  # only the steps before it are said to agree
    assert nf["step"] == 1 or "identical in 2 repeats; equal NaN/inf bits hide differences" in res.verdict


def test_finite_training_records_no_non_finite():
    plan = sft.make_plan(model="qwen3-tiny", steps=2, repeats=2, seq_len=16)
    (res,) = sft.run_plan(plan)
    assert res.non_finite is None and res.identical is True


# ------------------------------------------------------------------------------------------------
# interrupted, and a disk that fills while saving
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", SIGNALS, ids=SIGNAL_IDS)
def test_interrupted_sft_prints_and_saves_the_finished_configurations(tmp_path, sig, code):
    """The signal arrives after the first of two configurations finished (the test hook pauses there):
    its summary is printed, then a result marked interrupted holding it is saved."""
    out_dir = tmp_path / "results"
    proc = paused_child(tmp_path, "after-config-1", ["sft", "--device", "cpu", "--steps", "1", "--repeats", "2",
                                                     "--seq-len", "8", "--lr", "1e-5,3e-4", "--out", str(out_dir)],
                        env={"COLUMNS": "200"})
    out, err = interrupt(proc, sig)
    assert proc.returncode == code, err
    assert "nothing partial was written" not in err
    (path,) = out_dir.iterdir()
    rec = json.loads(path.read_text())
    assert rec["status"] == "interrupted" and rec["finished"]
    assert [c["lr"] for c in rec["configs"]] == [1e-5] and rec["configs"][0]["identical"] is True
    summary = out.index("detbench sft: 2 repeats x 1 steps")
    assert "lr=1e-05" in out[summary:] and "lr=0.0003" not in out
    assert "interrupted: 1 of 2 configurations finished" in out
    assert out.index(f"result: {path}") > summary  # printed first, then saved


def test_full_disk_prints_the_tables_then_fails_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out_dir = tmp_path / "results"

    def disk_full(path, tmp, data, exclusive):
        with open(tmp, "xb") as f:
            f.write(data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results, "_write_and_place", disk_full)
    rc = cli.main(["sft", "--device", "cpu", "--steps", "2", "--repeats", "2", "--seq-len", "8", "--out", str(out_dir)])
    cap = capsys.readouterr()
    assert rc == 1, cap.err
    assert "detbench sft: 2 repeats x 2 steps per configuration" in cap.out  # the summary table
    assert "eager default fp32 lr=1e-05: bitwise identical" in cap.out
    assert cap.err.startswith("detbench sft: error: could not save ") and cap.err.count("\n") == 1, cap.err
    assert os.strerror(errno.ENOSPC) in cap.err and str(out_dir) in cap.err
    assert list(out_dir.iterdir()) == []  # no temporary file left


# ------------------------------------------------------------------------------------------------
# many steps: batches are made as they are used
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the block after ``seconds`` (so a test of something that would run for hours
    fails fast instead)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_hundred_million_steps_plan_fast_in_little_memory():
    tracemalloc.start()
    try:
        with time_limit(20):
            plan = sft.make_plan(model="qwen3-tiny", steps=10 ** 8, repeats=2, seq_len=16)
            described, not_described = sft.describe_batches(plan.batches, plan.steps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2 ** 20, f"{peak / 2 ** 20:.1f} MiB of Python objects"
    assert len(plan.batches) == 10 ** 8 and plan.settings.n_batches == 10 ** 8
    assert len(described) == sft.MAX_DESCRIBED_BATCHES and not_described == 10 ** 8 - sft.MAX_DESCRIBED_BATCHES


def test_a_hundred_million_batches_train_only_the_batches_of_their_steps():
    with time_limit(60):
        plan = sft.make_plan(model="qwen3-tiny", steps=2, repeats=2, seq_len=8, n_batches=10 ** 8)
        result = sft.run(plan)
    assert result.configs[0].identical is True
    assert len(result.batches) == 2 and result.batches_not_described == 0


def test_lazy_synthetic_batches_are_the_same_in_any_order(monkeypatch):
    """Out of order, and past the kept batches (which makes the generator start over), every batch is
    the one an in-order walk gives."""

    monkeypatch.setattr(data, "KEEP_BATCHES", 3)
    walk = [(b.input_ids.clone(), b.labels.clone()) for b in synthetic_batches(256, n_batches=8, batch_size=2,
                                                                               seq_len=12, seed=4)]
    lazy = synthetic_batches(256, n_batches=8, batch_size=2, seq_len=12, seed=4)
    for i in (6, 1, 7, 4, 0, 5, 5, 2, 3, -1):
        assert torch.equal(lazy[i].input_ids, walk[i][0]) and torch.equal(lazy[i].labels, walk[i][1]), i
    assert len(lazy) == 8 and lazy[1] is lazy[1] and batch_for_step(lazy, 9) is lazy[1]
    with pytest.raises(IndexError):
        lazy[8]


def test_synthetic_batches_are_those_of_earlier_versions():
    """Made lazily now, the batches are bit for bit those detbench drew when it made the whole list up front
    (digest recorded from that version), so recorded results stay reproducible."""
    import hashlib

    h = hashlib.sha256()
    for b in synthetic_batches(256, n_batches=5, batch_size=3, seq_len=24, seed=1):
        for t in (b.input_ids, b.attention_mask, b.labels):
            h.update(t.numpy().tobytes())
    assert h.hexdigest() == "7574909565b89d2bd3c6b212ef259d4ddf1560a49b63e5823ab2959abc354cff"
