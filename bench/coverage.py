"""What a run on this device can and cannot show about nondeterminism.

A CPU run that finds every repeat identical has not tested the sources of run-to-run differences
that exist only in GPU kernels. :func:`device_coverage` says which were exercised and which not, so
that a clean CPU verdict is read for what it is::

    cov = device_coverage(torch.device("cpu"), threads=torch.get_num_threads())
    cov["not_exercised"]   # ["atomic adds ...", "split-K ...", ...]
"""

from __future__ import annotations

from typing import Any

import torch

# The sources of run-to-run differences that only a GPU has (a CPU run exercises none of them).
GPU_ONLY_SOURCES: tuple[str, ...] = (
    "atomic adds (scatter/index_add backwards, the atomic-accumulating backward kernels of Triton and "
    "flash-attention)",
    "split-K and stream-K matmuls (cuBLAS/cuBLASLt choose the split by shape and GPU; Triton split-K)",
    "reductions sized by the GPU's SM count (persistent kernels, cross-block partial sums)",
    "GPU-only backends (SDPA efficient and cuDNN, flash-attn, the compiled Triton kernels)",
)
NCCL_SOURCE = "NCCL collectives (ring or tree all-reduce, channels chosen per GPU count and topology)"


def device_coverage(device: torch.device | str, *, threads: int | None = None,
                    distributed: bool = False) -> dict[str, Any] | None:
    """On a CPU, what a run exercised and what it could not (JSON-ready: ``device``, ``exercised``,
    ``not_exercised``); None on a GPU, where every source listed here runs. ``threads``: the intra-op
    threads the run used (named in the first exercised item); ``distributed``: the run's ranks
    communicated (gloo), so NCCL is named among what was not exercised."""
    device = torch.device(device)
    if device.type != "cpu":
        return None
    at = f" at {threads} intra-op thread{'s' if threads != 1 else ''}" if threads else ""
    exercised = [
        f"the reduction orders of this build's CPU kernels (BLAS matmuls, ATen sums){at}, which depend on the "
        f"shape and the thread count, not on the run",
        "nondeterminism in Python-level code: the model's own modules, RNG use, planted backends",
    ]
    if distributed:
        exercised.append("gloo collectives and the order ranks and micro-batches are summed in")
    not_exercised = list(GPU_ONLY_SOURCES) + ([NCCL_SOURCE] if distributed else [])
    return {"device": "cpu", "exercised": exercised, "not_exercised": not_exercised}
