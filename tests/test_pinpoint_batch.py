"""Batch-variance pinpoint (bench.pinpoint.batch): the prompt alone against the prompt in a batch, op by op on the
prompt's rows; detbench pinpoint --batch-of on a detbench generate result."""

from __future__ import annotations

import json

import pytest
import torch

from bench import cli
from bench.generate import BatchSpec, batch_inputs, draw_prompt
from bench.invariant import batch_invariant
from bench.pinpoint.batch import BatchPinpointError, Layout, pinpoint_batch, prompt_index
from bench.planted import planted_registered
from bench.sft import apply_plants, build, parse_model, parse_plant

PROMPT_LEN = 16


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(plant: str | None = None):
    spec = parse_model("qwen2.5-tiny")
    model = build(spec, attention="eager", dtype=torch.float32, device="cpu", seed=0).eval()
    if plant:
        apply_plants(model, [parse_plant(plant)], torch.device("cpu"))
    prompt = draw_prompt(spec.config.vocab_size, PROMPT_LEN, 0)
    return model, prompt, spec.config.vocab_size


def inputs(prompt, vocab, size, row, lengths=None):
    lengths = lengths or [PROMPT_LEN] * size
    return batch_inputs(BatchSpec(1, size, row, lengths != [PROMPT_LEN] * size, lengths, 7), prompt, vocab)


def alone(prompt, vocab):
    return batch_inputs(BatchSpec(0, 1, 0, False, [PROMPT_LEN], 2), prompt, vocab)


def decoder(model, new_tokens=3):
    return lambda ids, mask: model.generate(ids, mask, max_new_tokens=new_tokens)


def test_prompt_index_maps_batch_positions_and_folded_dimensions():
    lay = Layout(batch_size=4, row=2, pad=0)
    assert prompt_index([1, 16, 64], [4, 16, 64], lay) == (slice(2, 3), slice(None), slice(None))
    assert prompt_index([16, 64], [64, 64], lay) == (slice(32, 48), slice(None))          # (B*S, hidden)
    assert prompt_index([64, 128], [64, 128], lay) == (slice(None), slice(None))          # a weight
    assert prompt_index([16, 64], [16, 64, 1], lay) is None                               # another rank
    assert prompt_index([16, 64], [40, 64], lay) is None                                  # no rule fits
    padded = Layout(batch_size=3, row=1, pad=4)
    assert prompt_index([1, 2, 16, 16], [3, 2, 20, 20], padded) == (slice(1, 2), slice(None), slice(4, 20),
                                                                     slice(4, 20))         # scores (B, h, S, S)
    assert prompt_index([16, 64], [60, 64], padded) == (slice(24, 40), slice(None))       # (B*(S+pad), hidden)
    # 2 -> 6 fits the batch (3 x 2) and the positions (2 + 4): ambiguous, so unmapped
    assert prompt_index([2, 8], [6, 8], padded) is None


def test_bad_layouts_are_refused(one_thread):
    model, prompt, vocab = tiny()
    ref, batch = alone(prompt, vocab), inputs(prompt, vocab, 4, 2)
    with pytest.raises(BatchPinpointError, match="one row"):
        pinpoint_batch(decoder(model), batch, batch, 2, model=model)
    with pytest.raises(BatchPinpointError, match="row 1 of the batch does not end with the prompt"):
        pinpoint_batch(decoder(model), ref, batch, 1, model=model)
    with pytest.raises(BatchPinpointError, match="not a row"):
        pinpoint_batch(decoder(model), ref, batch, 4, model=model)


def _lm_head_rows(model, ids, mask, row):
    """lm_head's input and output rows of the prompt in the prefill, through forward hooks (independent of
    the pinpointer)."""
    got = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: got.append((a[0][row].clone(), out[row].clone())))
    try:
        with torch.no_grad():
            model.generate(ids, mask, max_new_tokens=1)
    finally:
        handle.remove()
    return got[0]


def test_unplanted_cpu_root_cause_is_real(one_thread):
    """On this CPU the prompt's logits depend on the batch (the premise of tests/test_generate.py's counts).
    The pinpointer names the first op; whatever it names, that op's prompt inputs must be equal alone and
    in the batch and its prompt outputs must differ: checked here through module hooks where it is lm_head."""
    model, prompt, vocab = tiny()
    ref, batch = alone(prompt, vocab), inputs(prompt, vocab, 4, 2)
    report = pinpoint_batch(decoder(model), ref, batch, 2, model=model)
    rc = report.root_cause
    assert rc is not None, report.summary()
    assert report.comparable and not report.identical
    assert rc["step"] in ("prefill", "decode step 1", "decode step 2")
    assert rc["module"], "a root cause inside the model has a module path"
    d = report.root_cause_diff
    assert d is not None and 0 < d["n_diff"] <= d["n_total"] and d["max_ulp"] > 0
    assert "root cause" in report.summary() and rc["module"] in report.summary()
    if rc["module"] == "lm_head" and rc["step"] == "prefill":
        (x_a, y_a), (x_b, y_b) = _lm_head_rows(model, *ref, 0), _lm_head_rows(model, *batch, 2)
        assert torch.equal(x_a.view(torch.int32), x_b.view(torch.int32))
        assert not torch.equal(y_a.view(torch.int32), y_b.view(torch.int32))
    # The same with the companions left-padded: the prompt's rows and positions are found in every tensor.
    padded = inputs(prompt, vocab, 3, 1, [PROMPT_LEN + 5, PROMPT_LEN, 3])
    report_padded = pinpoint_batch(decoder(model), ref, padded, 1, model=model)
    assert report_padded.layout == {"batch_size": 3, "row": 1, "pad": 5}
    assert report_padded.root_cause is not None, report_padded.summary()
    assert report_padded.unmapped == 0, report_padded.lines()


def test_planted_batch_variant_linear_is_named_under_the_invariant_mode(one_thread):
    """Under the batch-invariant mode the model's own ops do not depend on the batch: the prompt's elements
    are equal in every op. A linear planted with planted-batch-variant (one K-chunk below 4 rows, four from
    4 rows) is named: the registry call, its module, the first decoding step (1 row alone, 4 in the batch;
    the prefill has 16 and 64 rows, both chunked alike), and its ops, which differ, are reported."""
    with planted_registered(), batch_invariant():
        model, prompt, vocab = tiny()
        ref, batch = alone(prompt, vocab), inputs(prompt, vocab, 4, 2)
        clean = pinpoint_batch(decoder(model), ref, batch, 2, model=model)
        assert clean.identical, clean.summary()
        assert "bitwise equal" in clean.summary() and f"{clean.aligned} ops compared" in clean.summary()

        model, _, _ = tiny("model.layers.0.mlp.gate_proj=linear/planted-batch-variant")
        report = pinpoint_batch(decoder(model), ref, batch, 2, model=model)
    rc = report.root_cause
    assert rc is not None, report.summary()
    assert (rc["op"], rc["module"], rc["step"]) == ("linear/planted-batch-variant", "model.layers.0.mlp.gate_proj",
                                                     "decode step 1")
    assert any("ran other ops in the batch than alone" in n for n in report.notes)
    assert report.root_cause_diff["n_diff"] > 0


@pytest.fixture(scope="module")
def generate_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    assert cli.main(["generate", "--device", "cpu", "--model", "qwen2.5-tiny", "--near-ties", "2e-7", "--prompt-len",
                     "6", "--new-tokens", "3", "--completions", "6", "--max-batch", "4", "--threads", "1",
                     "--no-progress", "--out", str(out)]) == 0
    (path,) = out.glob("generate-*.json")
    return path


def test_cli_batch_of_a_generate_result(generate_result, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["pinpoint", "--batch-of", str(generate_result), "--batch", "4", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "batch-variance pinpoint" in text and "alone vs batch 4 (4 rows" in text
    assert "root cause" in text or "bitwise equal" in text
    (path,) = tmp_path.glob("pinpoint-*.json")
    saved = json.loads(path.read_text())
    assert saved["batch"] == 4 and saved["batch_variance"]["layout"]["batch_size"] == 4


@pytest.mark.parametrize("argv, msg", [
    (["--batch", "99"], "--batch 99: the result's batches are 0..5"),
    (["--batch", "1"], "--batch 1 holds the prompt alone"),
    (["--batch", "3", "--coarse"], "--batch-of compares the prompt alone"),
])
def test_cli_batch_of_bad_input_exits_2(generate_result, capsys, argv, msg):
    capsys.readouterr()
    assert cli.main(["pinpoint", "--batch-of", str(generate_result), *argv]) == 2
    assert msg in capsys.readouterr().err


def test_cli_batch_without_batch_of_exits_2(capsys):
    assert cli.main(["pinpoint", "--batch", "3"]) == 2
    assert "give the result with --batch-of" in capsys.readouterr().err


def test_transformers_model_ops_that_run_only_in_the_batch_are_left_unpaired(one_thread):
    """transformers' generate runs ops for a batch that it does not run for one unpadded prompt (padding
    checks): they are left unpaired, and the ops on either side are still compared."""
    from bench.generate import greedy

    spec = parse_model("hf:qwen2.5-tiny")
    model = build(spec, attention="eager", dtype=torch.float32, device="cpu", seed=0).eval()
    prompt = draw_prompt(spec.config.vocab_size, PROMPT_LEN, 0)
    ref, batch = alone(prompt, spec.config.vocab_size), inputs(prompt, spec.config.vocab_size, 4, 2)
    report = pinpoint_batch(lambda ids, mask: greedy(model, ids, mask, 2, True), ref, batch, 2, model=model)
    assert report.unpaired_batch > 0 and report.aligned > 100, report.lines()
    assert report.root_cause is not None and report.root_cause["module"], report.summary()
