"""SFT batches: seeded synthetic prompt/response sequences, or a user's file of token ids.

A batch is what a supervised fine-tuning collator hands the model: ``input_ids`` (B, S), an
``attention_mask`` (B, S) with 1 on real tokens and 0 on right padding, and ``labels`` (B, S) equal to
``input_ids`` on the tokens that count in the loss and ``-100`` elsewhere (the prompt and the
padding). The model shifts the labels itself (position t is scored against token t+1), as
transformers' causal LMs do.

Every repeat of an experiment sees the same batches in the same order (:func:`batch_for_step` cycles
through them when there are more steps than batches). A token file is read into a list once, on the
CPU, before any training. Synthetic batches are a :class:`SyntheticBatches` sequence that draws each
batch when it is first asked for, in order from one seeded generator, so a run of a hundred million
steps holds a few batches, not a hundred million; the batches are the same as if the whole list had
been drawn up front.

Token file format (JSON Lines, one sequence per line)::

    [12, 7, 99, 3]                                   # every token counts in the loss
    {"input_ids": [12, 7, 99, 3], "loss_mask": [0, 0, 1, 1]}   # 0 = prompt (not scored), 1 = scored

``"mask"`` is accepted as another name for ``"loss_mask"``. Blank lines are skipped. Every problem is
one :class:`DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.errors import InputError

IGNORE_INDEX = -100


class DataError(InputError):
    """A token file (or a data setting) that cannot be used; the message says where and how to fix it."""


@dataclass
class SFTBatch:
    """One padded batch. All tensors are int64 on the CPU; :meth:`to` moves them."""

    input_ids: torch.Tensor       # (B, S) token ids; padding positions hold ``pad_id``
    attention_mask: torch.Tensor  # (B, S) 1 = real token, 0 = padding (right padding)
    labels: torch.Tensor          # (B, S) token id where scored, -100 where not (prompt, padding)

    def to(self, device: torch.device | str) -> "SFTBatch":
        return SFTBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def n_scored(self) -> int:
        """Tokens that count in the loss (after the model's one-position label shift)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def describe(self) -> dict:
        lengths = self.attention_mask.sum(1).tolist()
        return {"shape": list(self.input_ids.shape), "lengths": [int(n) for n in lengths],
                "scored_tokens": self.n_scored}


def collate(sequences: list[list[int]], loss_masks: list[list[int]], pad_id: int = 0) -> SFTBatch:
    """Right-pad ``sequences`` to the longest one; labels keep the tokens whose loss mask is 1."""
    width = max(len(s) for s in sequences)
    b = len(sequences)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, lm) in enumerate(zip(sequences, loss_masks)):
        n = len(seq)
        row = torch.tensor(seq, dtype=torch.long)
        ids[i, :n] = row
        mask[i, :n] = 1
        keep = torch.tensor(lm, dtype=torch.bool)
        labels[i, :n] = torch.where(keep, row, torch.full_like(row, IGNORE_INDEX))
    return SFTBatch(ids, mask, labels)


# Synthetic batches kept once drawn: the first KEEP_BATCHES (every batch of a run of up to that many
# steps is drawn once); later ones are drawn again, in order, when a repeat asks for them again.
KEEP_BATCHES = 1024


class SyntheticBatches(Sequence):
    """``n_batches`` seeded SFT batches, each drawn when first asked for (see :func:`synthetic_batches`).

    The draws come from one CPU generator seeded with ``seed``, batch after batch, exactly as a list made
    up front would hold them. The first :data:`KEEP_BATCHES` batches are kept once drawn (so
    ``batches[i] is batches[i]`` for them); a later batch is drawn from where the generator stands, or,
    when an earlier one is asked for again (the next repeat), by starting over from the seed. Memory is
    a few batches whatever ``n_batches`` is; a walk through the batches in order draws each once.
    """

    def __init__(self, vocab_size: int, *, n_batches: int, batch_size: int, seq_len: int, seed: int = 0,
                 pad_id: int = 0) -> None:
        if vocab_size < 2:
            raise DataError(f"vocab_size must be at least 2 for synthetic data, got {vocab_size}")
        if n_batches < 1 or batch_size < 1:
            raise DataError(f"need at least one batch of at least one sequence, got n_batches={n_batches}, "
                            f"batch_size={batch_size}")
        if seq_len < 2:
            raise DataError(f"--seq-len must be at least 2 (a prompt token and a response token), got {seq_len}")
        self.vocab_size, self.n_batches, self.batch_size = vocab_size, n_batches, batch_size
        self.seq_len, self.seed, self.pad_id = seq_len, seed, pad_id
        try:  # checks the seed now, before any training
            self._gen = torch.Generator().manual_seed(seed)
        except (RuntimeError, ValueError, TypeError, OverflowError):
            raise DataError(f"--data-seed {seed} is out of range: a seed is an integer in [-2**63, 2**64)") from None
        self._next = 0                                    # the index of the batch self._gen draws next
        self._kept: list[SFTBatch] = []
        self._last: tuple[int, SFTBatch] | None = None

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n_batches))]
        i = operator.index(index)
        if i < 0:
            i += self.n_batches
        if not 0 <= i < self.n_batches:
            raise IndexError(f"batch {index} of {self.n_batches}")
        if i < len(self._kept):
            return self._kept[i]
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        if i < self._next:  # asked again for a batch drawn and not kept: start over from the seed
            self._gen = torch.Generator().manual_seed(self.seed)
            self._next = 0
        while True:
            batch = self._draw()
            k, self._next = self._next, self._next + 1
            if k == len(self._kept) and k < KEEP_BATCHES:
                self._kept.append(batch)
            if k == i:
                self._last = (i, batch)
                return batch

    def _draw(self) -> SFTBatch:
        gen, lo = self._gen, max(2, self.seq_len // 4)
        seqs, masks = [], []
        for _ in range(self.batch_size):
            length = int(torch.randint(lo, self.seq_len + 1, (), generator=gen))
            prompt = int(torch.randint(1, length, (), generator=gen))
            tokens = torch.randint(1, self.vocab_size, (length,), generator=gen).tolist()
            seqs.append(tokens)
            masks.append([0] * prompt + [1] * (length - prompt))
        return collate(seqs, masks, self.pad_id)


def synthetic_batches(
    vocab_size: int,
    *,
    n_batches: int,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    pad_id: int = 0,
) -> SyntheticBatches:
    """``n_batches`` seeded SFT batches of ``batch_size`` prompt + response sequences, drawn as they are
    used (a :class:`SyntheticBatches` sequence: ``len``, indexing, iteration).

    Each sequence has a total length drawn uniformly from [max(2, seq_len // 4), seq_len], split into
    a prompt of 1 .. length-1 tokens (masked from the loss) and the response (scored). Token ids are
    uniform over [1, vocab_size) (0 is the padding id). The draws come from one CPU generator seeded
    with ``seed``, so the batches are the same on every machine and in every repeat.
    """
    return SyntheticBatches(vocab_size, n_batches=n_batches, batch_size=batch_size, seq_len=seq_len, seed=seed,
                            pad_id=pad_id)


def read_token_file(
    path: str | Path,
    *,
    vocab_size: int,
    batch_size: int,
    max_len: int | None = None,
    pad_id: int = 0,
) -> list[SFTBatch]:
    """Batches of ``batch_size`` sequences, in file order (the last batch may be smaller).

    Raises :class:`DataError` for a missing or unreadable file, a line that is not a list of ints (or
    an object with ``input_ids``), ids outside [0, vocab_size), a loss mask of the wrong length or
    with values other than 0/1, a sequence longer than ``max_len``, or a file where no token counts
    in the loss.
    """
    p = Path(path)
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise DataError(f"{p}: no such token file; pass a JSONL file with one list of token ids per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read it ({e}); pass a UTF-8 JSONL file of token id lists") from None
    seqs: list[list[int]] = []
    masks: list[list[int]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p} line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg}); each line must be a list of token ids or "
                            f'{{"input_ids": [...], "loss_mask": [...]}}') from None
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise DataError(f'{where}: object without "input_ids"; write {{"input_ids": [...], "loss_mask": [...]}}')
            ids = item["input_ids"]
            lm = item.get("loss_mask", item.get("mask"))
        else:
            ids, lm = item, None
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise DataError(f"{where}: input_ids must be a non-empty list of integers")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise DataError(f"{where}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size}); "
                            f"tokenize with this model's tokenizer or choose a model with a larger vocabulary")
        if max_len is not None and len(ids) > max_len:
            raise DataError(f"{where}: {len(ids)} tokens, more than the model's {max_len} positions; shorten the "
                            f"sequence")
        if lm is None:
            lm = [1] * len(ids)
        if (not isinstance(lm, list) or len(lm) != len(ids)
                or not all(v in (0, 1) and not isinstance(v, float) for v in lm)):
            raise DataError(f"{where}: loss_mask must be a list of 0/1 of the same length as input_ids ({len(ids)})")
        seqs.append(ids)
        masks.append([int(v) for v in lm])
    if not seqs:
        raise DataError(f"{p}: no sequences; write one JSON list of token ids per line")
    batches = [collate(seqs[i:i + batch_size], masks[i:i + batch_size], pad_id)
               for i in range(0, len(seqs), batch_size)]
    for i, b in enumerate(batches):
        if b.n_scored == 0:
            first, last = i * batch_size + 1, i * batch_size + b.input_ids.shape[0]
            raise DataError(f"{p}: sequences {first}-{last} (batch {i + 1}) have no token that counts "
                            f"in the loss (the first token of a sequence is never scored); mark response tokens with 1 "
                            f"in loss_mask")
    return batches


def batch_for_step(batches: Sequence[SFTBatch], step: int) -> SFTBatch:
    """The batch of training step ``step`` (0-based): the batches are cycled in order."""
    return batches[step % len(batches)]


# Up to this many batches are moved to the device once, up front; more are moved one step at a time.
MOVE_UP_FRONT = 1024


class _OnDevice(Sequence):
    """``batches`` moved to ``device`` as each one is asked for (for sequences too long to move at once)."""

    def __init__(self, batches: Sequence[SFTBatch], device: torch.device | str) -> None:
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [b.to(self.device) for b in self.batches[index]]
        return self.batches[index].to(self.device)


def on_device(batches: Sequence[SFTBatch], device: torch.device | str) -> Sequence[SFTBatch]:
    """``batches`` on ``device``: a list moved once when there are at most :data:`MOVE_UP_FRONT` of them,
    otherwise a sequence that moves each batch when a step asks for it."""
    if len(batches) <= MOVE_UP_FRONT:
        return [b.to(device) for b in batches]
    return _OnDevice(batches, device)
