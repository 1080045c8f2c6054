"""Greedy generation with a KV cache (qwen_layers) against transformers, and against recomputation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bench import cli, generate
from bench.cli import generate as gen_cli
from bench.compare import assert_bitwise_equal
from qwen_layers import KVCache, build_model, get_preset

from .hf_twins import twin_pair
from .signals import SIGNAL_IDS, SIGNALS, interrupt, paused_child

PRESETS = ["qwen3-tiny", "qwen2.5-tiny"]
ROOT = Path(__file__).resolve().parents[1]


def left_padded(cfg, seed: int = 3):
    """Three prompts of 9, 5 and 8 tokens, left-padded to 9 (padding ids 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "recompute"])
def test_generate_is_transformers_greedy_generate(preset, use_cache):
    """Same weights, left-padded batch: the tokens and every step's float32 logits equal transformers'
    ``generate(do_sample=False)`` bit for bit, with the KV cache and without."""
    cfg = get_preset(preset)
    hf, ours = twin_pair(cfg)
    hf.eval()
    ids, mask = left_padded(cfg)
    mine = ours.generate(ids, mask, max_new_tokens=5, use_cache=use_cache)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(mine.sequences, theirs.sequences)
    assert_bitwise_equal(mine.logits, torch.stack(theirs.logits), "per-step logits")


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_through_the_cache_is_the_plain_forward(preset):
    """Filling the cache changes nothing in the prefill: its last-position logits are the plain forward's,
    bit for bit, and the cache holds every layer's keys for all 9 positions. Both compute the LM head on
    the last position only (logits_to_keep=1): the head over all 27 rows sliced afterwards is another
    matmul shape, whose last bits a BLAS may compute differently (this project's AMD machines' MKL does)."""
    cfg = get_preset(preset)
    model = build_model(cfg).eval()
    ids, mask = left_padded(cfg)
    cache = KVCache(cfg.num_hidden_layers)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cached = model(ids, mask, position_ids=positions, cache=cache, logits_to_keep=1).logits
        plain = model(ids, mask, position_ids=positions, logits_to_keep=1).logits
    assert_bitwise_equal(cached, plain, "prefill logits")
    assert [layer.keys.shape[2] for layer in cache.layers] == [9] * cfg.num_hidden_layers


def test_decoding_without_the_mode_need_not_equal_recomputation():
    """Where cached decoding and recomputation agree without the batch-invariant mode, and where they need
    not. Step 0 (the prefill) is the same computation both ways: equal. From step 1 on, the cached step
    projects only the newest token (matmuls of B rows) while recomputation projects all B x (S + t)
    tokens; a BLAS that blocks by the row count (this project's MKL does) gives other last bits, so
    later steps are not compared here. Under the mode they are equal at every step
    (tests/test_batch_invariant.py)."""
    cfg = get_preset("qwen3-tiny")
    model = build_model(cfg).eval()
    ids, mask = left_padded(cfg)
    cached = model.generate(ids, mask, max_new_tokens=3, use_cache=True)
    recomputed = model.generate(ids, mask, max_new_tokens=3, use_cache=False)
    assert_bitwise_equal(cached.logits[0], recomputed.logits[0], "step 0 logits")


def test_generate_refuses_right_padding_and_no_tokens():
    cfg = get_preset("qwen3-tiny")
    model = build_model(cfg).eval()
    ids = torch.ones(2, 4, dtype=torch.long)
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, right, max_new_tokens=1)
    with pytest.raises(ValueError, match="at least 1"):
        model.generate(ids, max_new_tokens=0)


def test_cached_forward_checks_the_mask_covers_the_cache():
    cfg = get_preset("qwen3-tiny")
    model = build_model(cfg).eval()
    cache = KVCache(cfg.num_hidden_layers)
    ids = torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(ValueError, match=r"must cover the 4 cached and 1 new"):
            model(ids[:, :1], torch.ones(1, 1, dtype=torch.long), cache=cache)


# ------------------------------------------------------------------------------------------------
# detbench generate: the experiment's record and command line
# ------------------------------------------------------------------------------------------------

TINY = ["--model", "qwen2.5-tiny", "--near-ties", "2e-7", "--prompt-len", "6", "--new-tokens", "4",
        "--max-batch", "4", "--threads", "1", "--device", "cpu"]


def test_batches_rebuild_from_their_record():
    """Every planned batch holds the prompt in its row, left-padded, companions of the recorded lengths, drawn
    again identically from the recorded seed (what a tool comparing two batches' prompt rows needs)."""
    plan = generate.make_plan(model="qwen3-tiny", prompt_len=5, new_tokens=2, completions=12, max_batch=5,
                              padding="none,left", out=None)
    assert plan.batches[0].batch_size == 1 and plan.batches[0].lengths == [5]
    assert any(b.padded and len(set(b.lengths)) > 1 for b in plan.batches)
    for spec in plan.batches:
        ids, mask = generate.batch_inputs(spec, plan.prompt, 256)
        again, _ = generate.batch_inputs(spec, plan.prompt, 256)
        assert torch.equal(ids, again) and mask.sum(-1).tolist() == spec.lengths
        assert ids[spec.row, -5:].tolist() == plan.prompt and bool(mask[:, -1].all())


def test_hf_model_gives_the_detbench_models_completions():
    """hf:qwen2.5-tiny runs transformers' generate on the same seeded weights (near ties planted the same
    way): every batch's completion and logits are those of detbench's model, so the same distinct set."""
    kw = dict(near_ties=2e-7, prompt_len=6, new_tokens=4, completions=5, max_batch=4, threads=1, out=None)
    ours = generate.run(generate.make_plan(model="qwen2.5-tiny", **kw))
    theirs = generate.run(generate.make_plan(model="hf:qwen2.5-tiny", **kw))
    assert ours.summary[0].distinct_tokens == theirs.summary[0].distinct_tokens
    assert [c.distinct for c in ours.completions] == [c.distinct for c in theirs.completions]
    assert [c.logit_diff_ulp for c in ours.completions] == [c.logit_diff_ulp for c in theirs.completions]


def test_cli_generate_prints_the_counts_and_saves_the_record(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out_dir = tmp_path / "results"
    rc = cli.main(["generate", *TINY, "--completions", "6", "--batch-invariant", "both", "--out", str(out_dir)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    (path,) = out_dir.iterdir()
    rec = generate.load(path)
    assert rec.schema == "detbench.generate/1" and rec.status == "complete"
    assert [m.mode for m in rec.summary] == ["standard", "batch-invariant"]
    assert len(rec.completions) == 12 and len(rec.batches) == 6 and rec.cost is not None
    assert rec.invariant_mode["rows"] == 16 and "aten.mm" in rec.invariant_mode["aten_ops"]
    for m in rec.summary:
        assert f"{m.mode}: 6 completions -> {m.distinct} distinct" in cap.out
    assert "cost of the batch-invariant mode" in cap.out and f"result: {path}" in cap.out


@pytest.mark.parametrize("argv, msg", [
    (["--completions", "1"], "--completions must be an integer >= 2"),
    (["--max-batch", "1"], "--max-batch must be an integer >= 2"),
    (["--new-tokens", "0"], "--new-tokens must be"),
    (["--near-ties", "-1"], "--near-ties must be a relative perturbation"),
    (["--near-ties", "nan"], "--near-ties must be a relative perturbation"),
    (["--padding", "right"], "--padding 'right': choose from none, left"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--attention", "nope"], "--attention 'nope'"),
    (["--model", "hf:qwen3-tiny", "--attention", "sdpa", "--batch-invariant"], "use --attention eager"),
    (["--prompt-len", "300"], "exceeds the model's 512 positions"),
    (["--rows", "0"], "--rows must be"),
    (["--threads", "0"], "--threads must be"),
    (["--seed", str(2 ** 64)], "out of range"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, argv, msg):
    out_dir = tmp_path / "results"
    rc = cli.main(["generate", "--device", "cpu", "--out", str(out_dir), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and msg in err, err
    assert not out_dir.exists()


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["generate", *TINY, "--completions", "2", "--out", str(blocker)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", SIGNALS, ids=SIGNAL_IDS)
def test_interrupted_generate_saves_the_finished_batches(tmp_path, sig, code):
    """The signal arrives once 2 of 5 batches finished (the test hook pauses there): the tables of those are
    printed and a record marked interrupted, holding them in both modes, is saved."""
    out_dir = tmp_path / "results"
    proc = paused_child(tmp_path, "after-batch-2", ["generate", *TINY, "--completions", "5", "--batch-invariant",
                                                    "both", "--out", str(out_dir)], env={"COLUMNS": "200"})
    out, err = interrupt(proc, sig)
    assert proc.returncode == code, err
    (path,) = out_dir.iterdir()
    rec = generate.load(path)
    assert rec.status == "interrupted" and rec.stopped_at == "batch 2" and len(rec.batches) == 2
    assert sorted((c.batch, c.mode) for c in rec.completions) == [
        (0, "batch-invariant"), (0, "standard"), (1, "batch-invariant"), (1, "standard")]
    assert "interrupted (batch 2): 2 of 5 batches finished" in out and out.index(f"result: {path}") > 0


def test_readme_shows_the_committed_generate_results():
    """Every generate result README.md names is committed and reads back under the schema; the one whose tables
    README shows is quoted verbatim (the verdict of each mode, the cost sentence)."""
    readme = (ROOT / "README.md").read_text()
    names = re.findall(r"results/(generate-[0-9a-z-]+\.json)", readme)
    assert names, "README.md names no committed generate result"
    records = {name: generate.load(ROOT / "results" / name) for name in names}
    assert all(r.status == "complete" and r.environment["device_type"] == "cpu" for r in records.values())
    shown = records[names[0]]
    for m in shown.summary:
        assert f"{m.mode}: {m.verdict}" in readme
    cost_text = " ".join(gen_cli.cost_lines(shown)[0].split())
    assert cost_text in " ".join(readme.split())
