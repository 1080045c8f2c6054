"""Planted-nondeterminism helpers shared by tests/test_pinpoint.py and tests/test_sft.py: the places
a planted backend goes in the tiny model, token files that feed it, and how likely a test is to miss.

How sure the planted tests are. A planted backend sums n = 4 partial results in an order drawn from
the OS on every call; two evaluations of one call agree only if their orders give the same bits.
:class:`OrderSpy` records every call's partial results and computes, by evaluating all n! orders,
the exact probability q that two independent evaluations of that call agree. A method misses only
if every compared call agreed, so the chance that a test misses is the product of its calls' q. Each
test asserts that product is below 1e-6 *before* asserting the finding (a test that could not fail
the finding would prove nothing). On the unpadded token files used here every vector-valued call has
q = 1/12 (only swapping the first two parts commutes), so 6 calls give 12^-6 = 3.4e-7. The loss is
one float32 number and different orders often round alike (q ~ 0.5 per call): its tests use 24 calls
(computed products ~ 1e-7, asserted below 1e-6).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math

import numpy as np
import torch

from bench import planted
from bench.compare import bits
from qwen_layers.config import PRESETS
from qwen_layers.model import build_model

MAX_MISS = 1e-6


class OrderSpy:
    """Records the partial results of every planted shuffled sum, and how likely two orders agree."""

    def __init__(self) -> None:
        self.calls: list[list[torch.Tensor]] = []

    @contextlib.contextmanager
    def installed(self):
        original = planted.shuffled_sum

        def spy(parts):
            self.calls.append([p.detach().clone() for p in parts])
            return original(parts)

        planted.shuffled_sum = spy
        try:
            yield self
        finally:
            planted.shuffled_sum = original

    @staticmethod
    def coincidence(parts: list[torch.Tensor]) -> float:
        """P(two uniformly random left-to-right summation orders of ``parts`` give the same bits).

        Exactly-zero scalar parts are dropped first: adding +0.0 changes nothing, and the order of the
        remaining parts induced by a uniform permutation is uniform.
        """
        if all(p.dim() == 0 for p in parts):
            vals = np.array([p.item() for p in parts if p.item() != 0.0 or math.copysign(1, p.item()) < 0],
                            dtype=np.float32)
            if len(vals) <= 1:
                return 1.0
            perms = np.array(list(itertools.permutations(range(len(vals)))))
            sums = np.add.accumulate(vals[perms], axis=1, dtype=np.float32)[:, -1]
            keys = sums.view(np.int32).tolist()
        else:
            keys = []
            for perm in itertools.permutations(range(len(parts))):
                total = parts[perm[0]]
                for i in perm[1:]:
                    total = total + parts[i]
                keys.append(bits(total).numpy().tobytes())
        counts: dict = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        return sum((c / len(keys)) ** 2 for c in counts.values())

    def miss_probability(self, calls: list[list[torch.Tensor]] | None = None) -> float:
        """Product of the calls' coincidence probabilities (consecutive identical calls - a replay of
        the call before - count once)."""
        calls = self.calls if calls is None else calls
        prob, last = 1.0, None
        for parts in calls:
            if last is not None and len(parts) == len(last) and all(
                    torch.equal(bits(a), bits(b)) for a, b in zip(parts, last)):
                last = None
                continue
            prob *= self.coincidence(parts)
            last = parts
        return prob


def token_file(path, *, n_seqs: int, length: int, prompt: int, seed: int = 0):
    """Equal-length sequences (no padding, so no all-zero partial results) with a masked prompt."""
    gen = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n_seqs):
            ids = torch.randint(1, 256, (length,), generator=gen).tolist()
            f.write(json.dumps({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt)}) + "\n")
    return path


# The four planted places of the issue: plant, expected (level, op name, module path, phase), and the
# data: (batch size, sequence length, prompt length, steps).
PLACES = {
    "linear-fwd": ("model.layers.1.mlp.down_proj=linear/planted-nondet",
                   ("registry", "linear/planted-nondet", "model.layers.1.mlp.down_proj", "forward"), (2, 16, 4, 6)),
    "attention-bwd": ("model.layers.0.self_attn=attention/planted-nondet-bwd",
                      ("autograd.Function", "_PVNondetDVBackward", "model.layers.0.self_attn", "backward"),
                      (2, 16, 4, 6)),
    "rmsnorm-dw": ("model.layers.0.post_attention_layernorm=rmsnorm/planted-nondet-dw",
                   ("autograd.Function", "_RMSNormNondetDWBackward", "model.layers.0.post_attention_layernorm",
                    "backward"), (2, 16, 4, 6)),
    "loss": ("=loss/planted-nondet", ("registry", "loss/planted-nondet", "", "forward"), (1, 9, 1, 24)),
}


def nan_checkpoint(folder, *, param: str = "model.layers.0.mlp.down_proj.weight", index: int = 5,
                   preset: str = "qwen3-tiny"):
    """A local checkpoint folder (config.json + model.safetensors, as save_pretrained writes them) of
    ``preset`` with detbench's seeded weights, except one NaN at flat ``index`` of ``param``."""
    from pathlib import Path

    from safetensors.torch import save_file


    config = PRESETS[preset]
    model = build_model(config, seed=0)
    tensors = {n: t.detach().clone().contiguous() for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # stored once, as save_pretrained does for tied weights
    tensors[param].view(-1)[index] = float("nan")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return folder
