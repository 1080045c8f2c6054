"""Load a local Hugging Face Qwen checkpoint folder without touching the network.

A folder holds ``config.json`` and either ``model.safetensors`` or a sharded set described by
``model.safetensors.index.json``. Every problem is reported as one :class:`CheckpointError` whose
message names the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from .config import QwenConfig
from .model import QwenForCausalLM

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says which file and what to do."""


def read_config(path: str | Path) -> QwenConfig:
    """The :class:`QwenConfig` a checkpoint folder's ``config.json`` describes.

    The weight files present are checked too, without reading their tensors (their framing: header
    length, header, data size; see :func:`check_weights`), so a truncated download is reported here,
    naming the file, before anything (detbench's loader or transformers') tries to load it.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory; pass the folder that holds config.json")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{cfg_file}: missing; a Hugging Face checkpoint folder needs config.json "
            f"(write one with model.save_pretrained(folder))"
        )
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read it ({_reason(e)})") from None
    try:
        config = QwenConfig.from_hf_dict(raw, where=str(cfg_file))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    check_weights(folder)
    return config


def _reason(e: BaseException) -> str:
    text = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: truncated or damaged safetensors file ({what}); copy or download it again")


def check_safetensors(path: str | Path) -> list[str]:
    """Check the framing of one ``.safetensors`` file without reading its tensors; return the tensor names.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte range,
    then the data. A file cut short (an interrupted download or copy) fails one of these checks, and the
    :class:`CheckpointError` names the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(path, f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise _damaged(path, f"the header says it is {n} bytes but only {size - 8} follow")
            header_bytes = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({_reason(e)})") from None
    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("not an object")
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise _damaged(path, f"its header is not a safetensors header: {_reason(e)}") from None
    data = size - 8 - n
    need = max(ends, default=0)
    if data != need:
        raise _damaged(path, f"the header describes {need} bytes of tensor data, the file holds {data}")
    return [k for k in header if k != "__metadata__"]


def check_weights(folder: str | Path) -> None:
    """Check the framing of every safetensors file in ``folder`` (:func:`check_safetensors`); a missing
    file is not an error here (:func:`weight_files` reports it)."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


def weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"'weight_map' is a {type(weight_map).__name__}, not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        out = {}
        for name, fname in weight_map.items():
            shard = folder / str(fname)
            if not shard.is_file():
                raise CheckpointError(f"{shard}: listed in {INDEX} but missing; copy the complete checkpoint")
            out[name] = shard
        for shard in sorted(set(out.values())):
            check_safetensors(shard)
        return out
    single = folder / SINGLE
    if single.is_file():
        return {name: single for name in check_safetensors(single)}
    found = sorted(p.name for p in folder.iterdir())
    hint = " (PyTorch .bin weights are not read: re-save with save_pretrained(..., safe_serialization=True))" \
        if any(n.endswith(".bin") for n in found) else ""
    raise CheckpointError(f"{folder}: neither {SINGLE} nor {INDEX} found{hint}; files present: {found}")


def load_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    where = weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in where.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as h:
                present = set(h.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"{f}: tensor {name!r} listed in {INDEX} is not in this file")
                    tensors[name] = h.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({_reason(e)})") from None
    return tensors, where


def from_pretrained(
    path: str | Path,
    *,
    backends: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> QwenForCausalLM:
    """Build a :class:`QwenForCausalLM` from a local checkpoint folder.

    ``dtype`` defaults to the dtype stored in the checkpoint. Raises :class:`CheckpointError`.
    """
    folder = Path(path)
    config = read_config(folder)
    tensors, where = load_state_dict(folder)
    with torch.device("meta"):
        model = QwenForCausalLM(config, backends)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(
            f"{folder}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} in all); config.json and the safetensors files describe different models"
        )
    if unexpected:
        raise CheckpointError(
            f"{where[unexpected[0]]}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
            f"this is not a {config.family} checkpoint matching config.json"
        )
    for name, t in tensors.items():
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{where[name]}: tensor {name!r} has shape {tuple(t.shape)} but config.json implies {want}; "
                f"fix config.json or use the weights saved with it"
            )
    stored_dtype = next(iter(tensors.values())).dtype
    model = model.to_empty(device=device).to(dtype or stored_dtype)
    if config.tie_word_embeddings:  # to_empty breaks the tie; restore it before loading
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, t in tensors.items():
            params[name].copy_(t)
    return model
