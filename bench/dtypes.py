"""The one dtype-name table of ``bench/``.

Two spellings appear in results and on the command line: the short one (``fp32``, ``bf16``, ``fp16``,
``fp64``: ``detbench run``'s cells) and torch's own (``float32``, ``bfloat16`` ...: ``detbench sft``'s
configurations and dtype-tagged values). Both, and the aliases ``float``, ``half`` and ``double``, are
accepted wherever a dtype is named.
"""

from __future__ import annotations

import torch

from bench.errors import InputError

# Short name -> dtype, in the order menus list them.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64,
}
_ALIASES: dict[str, str] = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "float64": "fp64", "double": "fp64",
}
_SHORT: dict[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}


def short_name(name: str | torch.dtype, choices=tuple(DTYPES)) -> str:
    """``"bfloat16"``, ``"BF16"`` or ``torch.bfloat16`` -> ``"bf16"``; :class:`InputError` unless in ``choices``."""
    if isinstance(name, torch.dtype):
        key = _SHORT.get(name, torch_name(name))
    else:
        key = name.strip().lower()
        key = _ALIASES.get(key, key)
    if key not in choices:
        raise InputError(f"unknown dtype {name!r}; choose from: {', '.join(choices)}")
    return key


def parse_dtype(name: str) -> torch.dtype:
    """A dtype from any accepted spelling: ``float32``/``fp32``, ``bfloat16``/``bf16`` ..."""
    try:
        return DTYPES[short_name(name)]
    except InputError:
        raise InputError(f"unknown dtype {name!r}; choose from: float32 (fp32), bfloat16 (bf16), float16 (fp16), "
                         f"float64 (fp64)") from None


def torch_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (torch's own spelling)."""
    return str(dtype).removeprefix("torch.")
