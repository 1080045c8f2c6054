"""Local checkpoint loading, on checkpoints the tests write with transformers' save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

from bench.cli import main
from bench.compare import assert_bitwise_equal
from qwen_layers import CheckpointError, QwenForCausalLM, from_pretrained, get_preset
from qwen_layers.checkpoint import read_config

from .hf_twins import batch, hf_classes, twin_pair


@pytest.fixture(scope="module", params=["qwen3-tiny", "qwen2.5-tiny"])
def saved(request, tmp_path_factory):
    cfg = get_preset(request.param)
    hf, _ = twin_pair(cfg)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return cfg, hf, folder


def _logits(model, cfg):
    ids, mask, _ = batch(cfg)
    with torch.no_grad():
        if isinstance(model, QwenForCausalLM):
            return model(ids, mask).logits
        return model(input_ids=ids, attention_mask=mask).logits


def test_loads_and_matches_transformers(saved):
    cfg, _, folder = saved
    ours = from_pretrained(folder)
    assert ours.config.family == cfg.family
    _, model_cls = hf_classes(cfg)
    theirs = model_cls.from_pretrained(folder, attn_implementation="eager")
    assert_bitwise_equal(_logits(ours, cfg), _logits(theirs, cfg), "logits after loading")
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_sharded_checkpoint(saved, tmp_path):
    cfg, hf, _ = saved
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = from_pretrained(tmp_path)
    ref = from_pretrained(_single(hf, tmp_path.parent / "single"))
    assert_bitwise_equal(_logits(ours, cfg), _logits(ref, cfg), "sharded vs single-file logits")


def _single(hf, path):
    hf.save_pretrained(path)
    return path


def test_dtype_argument(saved):
    _, _, folder = saved
    model = from_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ---- errors: one clear message naming the file and the fix ------------------------------------


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        from_pretrained(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: missing.*save_pretrained"):
        from_pretrained(tmp_path)


def test_missing_weights(saved, tmp_path):
    _, _, folder = saved
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        from_pretrained(tmp_path)


def test_missing_shard(saved, tmp_path):
    _, hf, _ = saved
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: listed in model.safetensors.index.json but missing"):
        from_pretrained(tmp_path)


def _saved_with_config(hf, folder, **changes):
    """Save ``hf`` into ``folder``, then edit its config.json."""
    hf.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update({k: (v(cfg[k]) if callable(v) else v) for k, v in changes.items()})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_unknown_model_type(saved, tmp_path):
    _saved_with_config(saved[1], tmp_path, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'llama' is not supported"):
        from_pretrained(tmp_path)


def test_shape_mismatch(saved, tmp_path):
    _saved_with_config(saved[1], tmp_path, intermediate_size=lambda n: n + 8)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*mlp.*' has shape .* but config.json implies"):
        from_pretrained(tmp_path)


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        from_pretrained(tmp_path)


# ---- damaged files: a CheckpointError naming the file (and the field), never a raw library error ----


@pytest.mark.parametrize("content, needles", [
    ("[1, 2, 3]", ["expected a JSON object", "got list"]),
    ('"qwen3"', ["expected a JSON object", "got str"]),
    (None, ["field 'vocab_size' is null", "must be a positive integer"]),
    ("abc", ["field 'hidden_size'", "must be a positive integer, got 'abc'"]),
    (b"\xff\xfe{", ["cannot read"]),
], ids=["list", "string", "vocab_size-null", "hidden_size-abc", "not-utf8"])
def test_bad_config_names_the_file_and_field(saved, tmp_path, content, needles):
    _, hf, _ = saved
    hf.save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    if content is None:
        _saved_with_config(hf, tmp_path, vocab_size=None)
    elif content == "abc":
        _saved_with_config(hf, tmp_path, hidden_size="abc")
    elif isinstance(content, bytes):
        cfg_file.write_bytes(content)
    else:
        cfg_file.write_text(content)
    for load in (read_config, from_pretrained):
        with pytest.raises(CheckpointError) as e:
            load(tmp_path)
        text = str(e.value)
        assert text.startswith(f"{cfg_file}: ") and len(text.splitlines()) == 1, text
        for needle in needles:
            assert needle in text, (needle, text)


def _truncate(path, how):
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cut = {"empty": 0, "in-length": 4, "in-header": 8 + header_len // 2, "in-data": (8 + header_len + len(data)) // 2,
           "last-byte": len(data) - 1}[how]
    path.write_bytes(data[:cut])


TRUNCATIONS = ["empty", "in-length", "in-header", "in-data", "last-byte"]


@pytest.mark.parametrize("how", TRUNCATIONS)
def test_truncated_safetensors_is_a_checkpoint_error_naming_the_file(saved, tmp_path, how):
    _, hf, _ = saved
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    _truncate(weights, how)
    for load in (read_config, from_pretrained):  # read_config checks the weight files' framing too
        with pytest.raises(CheckpointError) as e:
            load(tmp_path)
        text = str(e.value)
        assert text.startswith(f"{weights}: ") and "truncated or damaged" in text, text
        assert len(text.splitlines()) == 1, text


@pytest.mark.parametrize("how", ["in-header", "in-data"])
def test_truncated_shard_is_a_checkpoint_error_naming_the_shard(saved, tmp_path, how):
    _, hf, _ = saved
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    _truncate(shard, how)
    with pytest.raises(CheckpointError, match=f"^{shard}: .*truncated or damaged"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("how", ["in-header", "in-data"])
def test_truncated_safetensors_for_an_hf_model_is_one_line(saved, tmp_path, capsys, how):
    """``detbench sft --model hf:FOLDER`` reads the folder through qwen_layers.checkpoint first: a truncated
    model.safetensors is one line naming the file (exit 2), not a raw SafetensorError from transformers."""
    pytest.importorskip("transformers")

    cfg, hf, _ = saved
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    _truncate(weights, how)
    capsys.readouterr()  # save_pretrained's progress bar
    rc = main(["sft", "--model", f"hf:{tmp_path}", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(weights) in lines[0] and "truncated or damaged" in lines[0], err
