"""``detbench generate``: the same prompt, greedy, in many different batches - how many different answers?

One prompt is decoded greedily (temperature 0) many times, each time as one row of a batch of other
prompts: batch sizes 1 to ``max_batch``, the prompt's row anywhere in the batch, companions drawn
afresh for every batch, all of the prompt's length or of other lengths (left padding, as
transformers' ``generate`` pads), prefill then incremental decoding with a KV cache. Mathematically
every one of those completions is the same; the record says how many distinct ones came out, and for
each completion the first new token that differs from the prompt's completion alone (batch 0: the
prompt alone, unpadded) and the logits at that step in ulp (:func:`bench.compare.ulp_distance`).

With ``invariant=("off", "on")`` every batch runs twice, once as is and once inside
:func:`bench.invariant.batch_invariant`, the two in alternating order, so the distinct counts of both
and the price of the mode (generated tokens per second, per-batch time ratio) come from one run.

Models are what ``detbench sft`` takes (:func:`bench.sft.parse_model`): detbench presets and checkpoint
folders, and the same behind ``hf:`` (transformers' ``generate(do_sample=False)``, which
``qwen_layers``' ``generate`` reproduces bit for bit). Seeded random weights are smooth: the best token
usually leads the second by far more than a batch moves the logits (a few ulp), so the greedy tokens
rarely change. ``near_ties`` makes the second half of the vocabulary a copy of the first half, every
weight moved by that relative amount (seeded): each token then has a twin whose logit is within a few
ulp of its own, which is what a real vocabulary's near-synonyms do to a trained model's top logits.

Every batch can be rebuilt from its :class:`BatchSpec` (:func:`batch_inputs`), for a tool that compares
the prompt's rows of two batches op by op: the prompt's row, every row's length (padding is on the
left), and the seed of the companions' tokens; a completion's ``divergence.step`` is the decoding step
(0: the prefill's token) where it first chose another token.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bench.compare import bits, ulp_distance
from bench.dtypes import parse_dtype, torch_name
from bench.errors import InputError
from bench.invariant import BLOCK_ROWS, batch_invariant, describe_mode
from bench.pinpoint.batch import BatchVarianceReport, pinpoint_batch
from bench.results import (
    capture_environment,
    check_out_dir,
    device_label,
    load_result,
    new_run_id,
    result_path,
    write_json_atomic,
)
from bench.sft import SEED_END, ModelSpec, apply_plants, build, check_attention, check_seed, parse_model
from bench.timing import measure, torch_threads
from qwen_layers.model import QwenForCausalLM

SCHEMA = "detbench.generate/1"
MODES = {"off": "standard", "on": "batch-invariant"}  # --batch-invariant value -> mode name in the record
PADDINGS = ("none", "left")


class GenerateError(InputError):
    """A setting ``detbench generate`` cannot use; the message says which and how to fix it (exit 2)."""


# ------------------------------------------------------------------------------------------------
# records (field names are the JSON keys)
# ------------------------------------------------------------------------------------------------


@dataclass
class GenerateSettings:
    model: str
    model_kind: str                 # detbench | transformers
    preset: str | None
    checkpoint: str | None
    attention: str
    dtype: str
    device: str
    seed: int                       # weights
    data_seed: int                  # the prompt, the batch plan and the companions
    near_ties: float                # 0: weights as drawn
    prompt_len: int
    new_tokens: int
    completions: int                # batches planned, the prompt-alone reference included
    max_batch: int
    padding: list[str]              # "none" (companions as long as the prompt), "left" (other lengths)
    modes: list[str]                # "standard", "batch-invariant"
    rows: int                       # the batch-invariant mode's row block
    use_cache: bool                 # incremental decoding (else every step recomputes the sequence)
    threads: int                    # torch intra-op threads during the run
    out: str | None


@dataclass
class BatchSpec:
    """One batch, enough to rebuild it exactly (:func:`batch_inputs`)."""

    index: int
    batch_size: int
    row: int                        # the prompt's row
    padded: bool                    # companions of other lengths than the prompt (left padding)
    lengths: list[int]              # every row's real length, the prompt's included; padding goes left
    companion_seed: int             # torch.Generator seed the companions' tokens are drawn from, row by row


@dataclass
class Divergence:
    """Where a completion first chose another token than the reference (the prompt alone)."""

    step: int                       # 0-based new-token position (0: the token chosen after the prefill)
    token: int
    ref_token: int
    token_ulp: int                  # how far the two tokens' logits moved from the reference's (larger one)
    ref_margin_ulp: int             # in the reference: its token's logit above this completion's token's
    margin_ulp: int                 # here: this token's logit above the reference's token's
    max_ulp: int                    # largest change of any logit of the vocabulary at this step
    n_diff: int                     # logits of the vocabulary whose bits differ at this step


@dataclass
class Completion:
    batch: int                      # index into GenerateResult.batches
    mode: str
    distinct: int                   # which distinct completion of its mode (0: the reference's): the index
    #                                 into its ModeSummary.distinct_tokens
    divergence: Divergence | None   # None: the reference's tokens
    first_logit_diff: int | None    # first step whose logits differ in any bit (steps up to the divergence)
    logit_diff_ulp: int             # largest ulp distance over those steps (0: bitwise equal throughout)
    nonfinite: bool                 # NaN or inf in the compared logits: equal bits prove nothing
    seconds: float                  # the batch's generate call (every row)


@dataclass
class ModeSummary:
    """One mode's completions: the experiment's answer."""

    mode: str
    completions: int
    distinct: int
    counts: list[int]               # completions per distinct completion, the reference's first
    distinct_tokens: list[list[int]]  # the new tokens of each distinct completion, the reference's first
    diverged: int                   # completions whose tokens differ from the reference's
    earliest_divergence: int | None
    logits_differ: int              # completions whose logits differ from the reference's somewhere
    max_logit_ulp: int
    comparable: bool                # no NaN/inf in any compared logits
    tokens: int                     # tokens generated by every row of every batch
    seconds: float
    tokens_per_s: float
    verdict: str


@dataclass
class Cost:
    """The batch-invariant mode's price, from the same batches run both ways in alternating order."""

    batches: int
    standard_tokens_per_s: float
    invariant_tokens_per_s: float
    ratio_median: float             # median over batches of invariant seconds / standard seconds
    ratio_q1: float
    ratio_q3: float
    clock: str


@dataclass
class GenerateResult:
    schema: str
    run_id: str
    started: str
    finished: str | None
    status: str                     # complete | interrupted (completions holds the batches that finished)
    stopped_at: str | None
    command: list[str]
    settings: GenerateSettings
    environment: Any                # bench.results.Environment
    model_config: dict[str, Any]
    prompt: list[int]
    invariant_mode: dict[str, Any]  # bench.invariant.Mode.to_dict() ({} when the mode was not run)
    batches: list[BatchSpec]
    completions: list[Completion]
    summary: list[ModeSummary]
    cost: Cost | None = None


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    spec: ModelSpec
    settings: GenerateSettings
    dtype: torch.dtype
    device: torch.device
    prompt: list[int]
    batches: list[BatchSpec]


def _int(value, option: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GenerateError(f"{option} must be an integer >= {low}, got {value!r}")
    return value


def parse_choices(text: str | Sequence[str], option: str, choices: Sequence[str]) -> list[str]:
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    if not items or any(t not in choices for t in items):
        raise GenerateError(f"{option} {text!r}: choose from {', '.join(choices)} (comma-separated)")
    return list(dict.fromkeys(items))


def plan_batches(*, completions: int, max_batch: int, paddings: Sequence[str], prompt_len: int,
                 data_seed: int) -> list[BatchSpec]:
    """Batch 0 is the prompt alone; batch i >= 1 has size 1 + (i - 1) mod ``max_batch``, cycling through
    ``paddings`` each time the sizes come round, the prompt in a random row, companions' lengths equal to
    the prompt's (no padding) or drawn from 1..2 x the prompt's (left padding). Rows and lengths are drawn
    from seed ``data_seed + 1``, batch i's companions from ``data_seed + 2 + i`` (the prompt from
    ``data_seed``: :func:`draw_prompt`)."""
    g = torch.Generator().manual_seed(data_seed + 1)
    out = [BatchSpec(0, 1, 0, False, [prompt_len], data_seed + 2)]
    for i in range(1, completions):
        size = 1 + (i - 1) % max_batch
        padded = paddings[((i - 1) // max_batch) % len(paddings)] == "left" and size > 1
        row = int(torch.randint(0, size, (1,), generator=g))
        lengths = [prompt_len if (r == row or not padded) else int(torch.randint(1, 2 * prompt_len + 1, (1,),
                                                                                 generator=g))
                   for r in range(size)]
        out.append(BatchSpec(i, size, row, padded, lengths, data_seed + 2 + i))
    return out


def draw_prompt(vocab_size: int, length: int, data_seed: int) -> list[int]:
    g = torch.Generator().manual_seed(data_seed)
    return torch.randint(0, vocab_size, (length,), generator=g).tolist()


def batch_inputs(spec: BatchSpec, prompt: Sequence[int], vocab_size: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of batch ``spec``: the prompt in row ``spec.row``, each companion's tokens
    drawn in row order from ``torch.Generator().manual_seed(spec.companion_seed)``, left padding with id 0."""
    g = torch.Generator().manual_seed(spec.companion_seed)
    width = max(spec.lengths)
    ids = torch.zeros(spec.batch_size, width, dtype=torch.long)
    mask = torch.zeros(spec.batch_size, width, dtype=torch.long)
    for r, n in enumerate(spec.lengths):
        tokens = (torch.tensor(list(prompt), dtype=torch.long) if r == spec.row
                  else torch.randint(0, vocab_size, (n,), generator=g))
        ids[r, width - n:] = tokens
        mask[r, width - n:] = 1
    return ids.to(device), mask.to(device)


def make_plan(*, model: str = "qwen3-tiny", attention: str = "eager", dtype: str = "float32",
              device: torch.device | str = "cpu", seed: int = 0, data_seed: int = 0, near_ties: float = 0.0,
              prompt_len: int = 16, new_tokens: int = 32, completions: int = 100, max_batch: int = 16,
              padding: str | Sequence[str] = "none,left", invariant: str | Sequence[str] = "off",
              rows: int = BLOCK_ROWS, use_cache: bool = True, threads: int | None = None,
              out: str | None = "results") -> Plan:
    """Check every setting (raising :class:`GenerateError` or another ``InputError``) and plan the batches."""
    device = torch.device(device)
    _int(prompt_len, "--prompt-len", 1)
    _int(new_tokens, "--new-tokens", 1)
    _int(completions, "--completions", 2)
    _int(max_batch, "--max-batch", 2)
    _int(rows, "--rows", 1)
    if threads is not None:
        _int(threads, "--threads", 1)
    check_seed(seed, "--seed")
    check_seed(data_seed, "--data-seed")
    # Derived seeds: seed + 1 draws the near-ties noise, data_seed + 1 + completions the last companions.
    if seed + 1 >= SEED_END or data_seed + 1 + completions >= SEED_END:
        raise GenerateError("--seed and --data-seed: seeds derived from them (seed + 1, data seed + 1 + "
                            "--completions) must stay below 2**64; choose smaller seeds, e.g. 0")
    if isinstance(near_ties, bool) or not isinstance(near_ties, (int, float)) or not math.isfinite(near_ties) \
            or not 0 <= near_ties < 1:
        raise GenerateError(f"--near-ties must be a relative perturbation in [0, 1), e.g. 2e-7 (0: the seeded "
                            f"weights as drawn), got {near_ties!r}")
    paddings = parse_choices(padding, "--padding", PADDINGS)
    modes = [MODES[m] for m in parse_choices(invariant, "--batch-invariant", tuple(MODES))]
    spec = parse_model(model)
    torch_dtype = parse_dtype(dtype)
    check_attention(spec, attention, device)
    if spec.transformers and "batch-invariant" in modes and attention != "eager":
        raise GenerateError(f"--batch-invariant with {spec.text}: transformers' {attention!r} attention runs "
                            f"kernels the mode cannot reach; use --attention eager (the mode makes its matmuls "
                            f"and softmax batch-invariant)")
    longest = 2 * prompt_len + new_tokens
    if longest > spec.config.max_position_embeddings:
        raise GenerateError(f"--prompt-len {prompt_len} and --new-tokens {new_tokens}: the longest batch row "
                            f"(2 x prompt + new tokens = {longest}) exceeds the model's "
                            f"{spec.config.max_position_embeddings} positions; shorten one")
    if near_ties and spec.config.vocab_size < 2:
        raise GenerateError("--near-ties needs a vocabulary of at least 2 tokens")
    settings = GenerateSettings(
        model=spec.text, model_kind="transformers" if spec.transformers else "detbench", preset=spec.preset,
        checkpoint=spec.path, attention=attention, dtype=torch_name(torch_dtype), device=str(device), seed=seed,
        data_seed=data_seed, near_ties=float(near_ties), prompt_len=prompt_len, new_tokens=new_tokens,
        completions=completions, max_batch=max_batch, padding=paddings, modes=modes, rows=rows,
        use_cache=use_cache, threads=threads or torch.get_num_threads(), out=out)
    prompt = draw_prompt(spec.config.vocab_size, prompt_len, data_seed)
    batches = plan_batches(completions=completions, max_batch=max_batch, paddings=paddings, prompt_len=prompt_len,
                           data_seed=data_seed)
    return Plan(spec, settings, torch_dtype, device, prompt, batches)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def plant_near_ties(model: nn.Module, eps: float, seed: int) -> None:
    """Rows V/2 + i of the token embedding and of the LM head become row i with each weight moved by a
    relative ``eps`` (``w + eps * |w| * N(0, 1)``, drawn from ``seed``); a tied head is one matrix."""
    if not eps:
        return
    seen: set[int] = set()
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        half = weight.shape[0] // 2
        base = weight[:half].float().cpu()
        noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed))
        weight[half:2 * half] = (base + eps * base.abs() * noise).to(weight.dtype).to(weight.device)


def load_model(plan: Plan) -> nn.Module:
    s = plan.settings
    model = build(plan.spec, attention=s.attention, dtype=plan.dtype, device=plan.device, seed=s.seed).eval()
    plant_near_ties(model, s.near_ties, s.seed + 1)
    return model


def greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
           use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens (B, n), float32 logits (n, B, vocab)) of greedy decoding: ``qwen_layers``' generate for
    detbench models, transformers' ``generate(do_sample=False)`` for theirs."""
    if isinstance(model, QwenForCausalLM):
        out = model.generate(ids, mask, max_new_tokens=new_tokens, use_cache=use_cache)
        return out.sequences[:, ids.shape[1]:], out.logits
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, use_cache=use_cache, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)


# ------------------------------------------------------------------------------------------------
# comparing with the reference
# ------------------------------------------------------------------------------------------------


def compare(tokens: list[int], logits: torch.Tensor, ref_tokens: list[int], ref_logits: torch.Tensor
            ) -> tuple[Divergence | None, int | None, int, bool]:
    """(divergence, first step whose logits differ, largest ulp over the compared steps, non-finite seen).

    Steps up to and including the first divergent token are compared (after it the prefixes differ)."""
    first = next((t for t, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
    last = len(tokens) - 1 if first is None else first
    a, b = logits[:last + 1], ref_logits[:last + 1]
    nonfinite = not bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    differs = (bits(a) != bits(b)).any(-1)
    first_diff = int(differs.nonzero()[0, 0]) if bool(differs.any()) else None
    finite = torch.isfinite(a) & torch.isfinite(b)
    ulps = torch.where(finite, ulp_distance(a, b), torch.zeros((), dtype=torch.int64))
    max_ulp = int(ulps.max()) if ulps.numel() else 0
    if first is None:
        return None, first_diff, max_ulp, nonfinite
    mine, ref = logits[first], ref_logits[first]
    pair = [tokens[first], ref_tokens[first]]
    moved = ulp_distance(mine[pair], ref[pair])
    div = Divergence(step=first, token=pair[0], ref_token=pair[1], token_ulp=int(moved.max()),
                     ref_margin_ulp=int(ulp_distance(ref[pair[1:]], ref[pair[:1]])),
                     margin_ulp=int(ulp_distance(mine[pair[:1]], mine[pair[1:]])),
                     max_ulp=int(ulps[first].max()), n_diff=int((bits(mine) != bits(ref)).sum()))
    return div, first_diff, max_ulp, nonfinite


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------


def _mode(name: str, rows: int):
    return batch_invariant(rows) if name == "batch-invariant" else contextlib.nullcontext()


class _Reference:
    """Per mode: the reference's tokens and logits, and the distinct completions seen so far (tokens -> index
    in order of first appearance, the reference's 0)."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.logits: dict[str, torch.Tensor] = {}
        self.distinct: dict[str, dict[tuple[int, ...], int]] = {}


def run_batch(model: nn.Module, plan: Plan, spec: BatchSpec, mode: str, ref: _Reference) -> Completion:
    """Generate batch ``spec`` under ``mode`` and compare the prompt's row with the reference."""
    s = plan.settings
    ids, mask = batch_inputs(spec, plan.prompt, plan.spec.config.vocab_size, plan.device)
    got: dict[str, Any] = {}

    def call() -> None:
        got["out"] = greedy(model, ids, mask, s.new_tokens, s.use_cache)

    with _mode(mode, s.rows):
        timing = measure(call, plan.device, repeats=1, warmup=0)
    new, logits = got["out"]
    tokens = new[spec.row].tolist()
    row_logits = logits[:, spec.row].cpu()
    if mode not in ref.tokens:  # batch 0, the prompt alone: the reference of its mode
        ref.tokens[mode], ref.logits[mode], ref.distinct[mode] = tokens, row_logits, {}
    seen = ref.distinct[mode]
    distinct = seen.setdefault(tuple(tokens), len(seen))
    div, first_diff, max_ulp, nonfinite = compare(tokens, row_logits, ref.tokens[mode], ref.logits[mode])
    return Completion(batch=spec.index, mode=mode, distinct=distinct, divergence=div,
                      first_logit_diff=first_diff, logit_diff_ulp=max_ulp, nonfinite=nonfinite,
                      seconds=timing.median_s)


def warm_up(model: nn.Module, plan: Plan) -> None:
    """One untimed generate of the reference batch in every mode (first calls allocate and load code)."""
    ids, mask = batch_inputs(plan.batches[0], plan.prompt, plan.spec.config.vocab_size, plan.device)
    for mode in plan.settings.modes:
        with _mode(mode, plan.settings.rows):
            greedy(model, ids, mask, plan.settings.new_tokens, plan.settings.use_cache)


def run_plan(plan: Plan, completions: list[Completion], ref: _Reference,
             on_batch: Callable[[BatchSpec, list[Completion]], None] | None = None,
             stopped: list[str] | None = None) -> None:
    """Run every batch in every mode (modes in alternating order from batch to batch), appending to
    ``completions`` as each finishes and handing each batch's completions to ``on_batch``; ``stopped`` gets
    the batch running when an interrupt arrives."""
    s = plan.settings
    with torch_threads(s.threads):
        model = load_model(plan)
        warm_up(model, plan)
        current = 0  # the batch running, or the next one between batches
        try:
            for spec in plan.batches:
                current = spec.index
                order = s.modes if spec.index % 2 == 0 else s.modes[::-1]
                done = sorted((run_batch(model, plan, spec, mode, ref) for mode in order),
                              key=lambda c: s.modes.index(c.mode))
                completions.extend(done)
                current = spec.index + 1
                if on_batch is not None:
                    on_batch(spec, done)
        except KeyboardInterrupt:
            if stopped is not None:
                stopped.append(f"batch {current}")
            raise


def summarise(plan: Plan, completions: list[Completion], ref: _Reference) -> tuple[list[ModeSummary], Cost | None]:
    s = plan.settings
    sizes = {b.index: b.batch_size for b in plan.batches}
    out = []
    for mode in s.modes:
        mine = [c for c in completions if c.mode == mode]
        if not mine:
            continue
        counts: dict[int, int] = {}
        for c in mine:
            counts[c.distinct] = counts.get(c.distinct, 0) + 1
        diverged = [c for c in mine if c.divergence is not None]
        tokens = sum(sizes[c.batch] * s.new_tokens for c in mine)
        seconds = sum(c.seconds for c in mine)
        comparable = not any(c.nonfinite for c in mine)
        distinct = len(counts)
        earliest = min((c.divergence.step for c in diverged), default=None)
        if not comparable:
            verdict = f"not comparable: NaN or inf in the logits of {sum(c.nonfinite for c in mine)} completion(s)"
        elif distinct == 1:
            verdict = (f"{len(mine):,} completions -> 1 distinct; logits bitwise equal to the prompt alone's in "
                       f"{len(mine) - sum(c.first_logit_diff is not None for c in mine):,}")
        else:
            verdict = (f"{len(mine):,} completions -> {distinct} distinct; {len(diverged):,} differ from the "
                       f"prompt alone's, the earliest at new token {earliest}")
        out.append(ModeSummary(
            mode=mode, completions=len(mine), distinct=distinct,
            counts=[counts[k] for k in sorted(counts)],
            distinct_tokens=[list(t) for t, _ in sorted(ref.distinct[mode].items(), key=lambda kv: kv[1])],
            diverged=len(diverged), earliest_divergence=earliest,
            logits_differ=sum(c.first_logit_diff is not None for c in mine),
            max_logit_ulp=max((c.logit_diff_ulp for c in mine), default=0), comparable=comparable,
            tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
            verdict=verdict))
    return out, _cost(plan, completions)


def _cost(plan: Plan, completions: list[Completion]) -> Cost | None:
    """Invariant over standard time per batch (batch 0 excluded: it runs first in both modes), median."""
    if len(plan.settings.modes) < 2:
        return None
    by = {(c.batch, c.mode): c for c in completions}
    sizes = {b.index: b.batch_size for b in plan.batches}
    pairs = [(by[(i, "standard")], by[(i, "batch-invariant")]) for i in sizes
             if i > 0 and (i, "standard") in by and (i, "batch-invariant") in by]
    if len(pairs) < 2:
        return None
    ratios = sorted(b.seconds / a.seconds for a, b in pairs if a.seconds > 0)
    q = _quartiles(ratios)
    n = plan.settings.new_tokens
    tokens = sum(sizes[a.batch] * n for a, _ in pairs)
    return Cost(batches=len(pairs), standard_tokens_per_s=tokens / sum(a.seconds for a, _ in pairs),
                invariant_tokens_per_s=tokens / sum(b.seconds for _, b in pairs),
                ratio_median=q[1], ratio_q1=q[0], ratio_q3=q[2],
                clock="cuda-events" if plan.device.type == "cuda" else "perf_counter")


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)

    def at(p: float) -> float:
        k = p * (len(v) - 1)
        lo = math.floor(k)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return at(0.25), at(0.5), at(0.75)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run(plan: Plan, *, command: Sequence[str] = (), on_batch=None) -> GenerateResult:
    """Run ``plan``; an interrupt (``KeyboardInterrupt``, which SIGTERM raises under ``bench.cli``) ends it
    early and the record, status ``interrupted``, holds the batches that finished in every mode."""
    started = now()
    completions: list[Completion] = []
    ref = _Reference()
    stopped: list[str] = []
    status = "complete"
    try:
        run_plan(plan, completions, ref, on_batch, stopped)
    except KeyboardInterrupt:
        status = "interrupted"
    with torch_threads(plan.settings.threads):
        env = capture_environment(plan.device, seeds={"model": plan.settings.seed, "data": plan.settings.data_seed})
    summary, cost = summarise(plan, completions, ref)
    mode = describe_mode(plan.settings.rows).to_dict() if "batch-invariant" in plan.settings.modes else {}
    return GenerateResult(
        schema=SCHEMA, run_id=new_run_id(), started=started, finished=now(), status=status,
        stopped_at=stopped[0] if stopped else None, command=list(command), settings=plan.settings, environment=env,
        model_config=dict(plan.spec.config.__dict__), prompt=list(plan.prompt), invariant_mode=mode,
        batches=plan.batches[:1 + max((c.batch for c in completions), default=-1)], completions=completions,
        summary=summary, cost=cost)


def save(result: GenerateResult, out_dir: str | Path) -> Path:
    """Write ``result`` atomically to a new ``generate-<date>-<time>-<device>-<id>.json`` in ``out_dir``."""
    out = check_out_dir(out_dir)
    return write_json_atomic(result_path(out, "generate", device_label(result.environment), result.run_id), result)


def load(path: str | Path) -> GenerateResult:
    """Read a ``detbench generate`` result back into typed records."""
    return load_result(path, {SCHEMA: GenerateResult})


def distinct_groups(result: GenerateResult, mode: str) -> list[dict[str, Any]]:
    """One entry per distinct completion of ``mode``, the reference's first: its tokens, how many completions
    it holds, the batch sizes and paddings that produced it, and its divergences from the reference."""
    summary = next(m for m in result.summary if m.mode == mode)
    batches = {b.index: b for b in result.batches}
    groups = [{"distinct": i, "tokens": tokens, "count": 0, "sizes": set(), "padded": set(), "divergences": []}
              for i, tokens in enumerate(summary.distinct_tokens)]
    for c in result.completions:
        if c.mode != mode:
            continue
        g = groups[c.distinct]
        g["count"] += 1
        b = batches[c.batch]
        g["sizes"].add(b.batch_size)
        g["padded"].add(b.padded)
        if c.divergence is not None:
            g["divergences"].append(c.divergence)
    return groups


# ------------------------------------------------------------------------------------------------
# which op made a completion differ (bench.pinpoint.batch)
# ------------------------------------------------------------------------------------------------


def pick_batch(result: GenerateResult, batch: int | None = None) -> tuple[BatchSpec, Completion]:
    """The batch to pinpoint and its standard-mode completion: ``batch`` (checked), or the batch whose
    completion differed from the prompt alone (a token, else any logit bit) in the smallest batch, unpadded
    before padded, earliest first."""
    batches = {b.index: b for b in result.batches}
    standard = {c.batch: c for c in result.completions if c.mode == MODES["off"]}
    if not standard:
        raise GenerateError("the result has no completion without the batch-invariant mode; pinpoint a result of "
                            "detbench generate --batch-invariant off or both")
    if batch is not None:
        if batch not in batches or batch not in standard:
            raise GenerateError(f"--batch {batch}: the result's batches are 0..{max(standard)}")
        if batches[batch].batch_size < 2:
            raise GenerateError(f"--batch {batch} holds the prompt alone; choose a batch of 2 or more rows")
        return batches[batch], standard[batch]
    differing = [c for c in standard.values() if c.first_logit_diff is not None and batches[c.batch].batch_size > 1]
    if not differing:
        raise GenerateError("no batch of this result changed the prompt's logits in any bit: nothing to pinpoint "
                            "(name one with --batch to compare it anyway)")
    c = min(differing, key=lambda c: (c.divergence is None, batches[c.batch].batch_size, batches[c.batch].padded,
                                      c.batch))
    return batches[c.batch], c


def pinpoint_batch_of(result: GenerateResult, batch: int | None = None, plants: Sequence[Any] = (),
                      device: torch.device | str | None = None
                      ) -> tuple[BatchVarianceReport, BatchSpec, Completion, int]:
    """Rebuild ``result``'s model, prompt and batch ``batch`` (:func:`pick_batch`), then compare the prompt alone
    with the prompt in that batch op by op (:func:`bench.pinpoint.batch.pinpoint_batch`), decoding up to the first
    step whose logits differed. ``plants`` (:class:`bench.sft.Plant`, planted backends registered) route ops of
    the rebuilt model. Returns (report, the batch, its completion, new tokens decoded)."""
    s = result.settings
    spec, completion = pick_batch(result, batch)
    plan = make_plan(model=s.model, attention=s.attention, dtype=s.dtype, device=device or s.device, seed=s.seed,
                     data_seed=s.data_seed, near_ties=s.near_ties, prompt_len=s.prompt_len, new_tokens=s.new_tokens,
                     completions=2, max_batch=2, padding="none", invariant="off", use_cache=s.use_cache,
                     threads=s.threads, out=None)
    if plan.prompt != result.prompt:
        raise GenerateError("the rebuilt prompt differs from the result's (another vocabulary or data seed?): the "
                            "result cannot be reproduced here")
    steps = completion.first_logit_diff
    new_tokens = s.new_tokens if steps is None else steps + 1
    with torch_threads(s.threads):
        model = load_model(plan)
        apply_plants(model, plants, plan.device)
        vocab = plan.spec.config.vocab_size
        reference = batch_inputs(result.batches[0], plan.prompt, vocab, plan.device)
        inputs = batch_inputs(spec, plan.prompt, vocab, plan.device)

        def fn(ids, mask):
            return greedy(model, ids, mask, new_tokens, s.use_cache)

        report = pinpoint_batch(fn, reference, inputs, spec.row, model=model, use_cache=s.use_cache)
    return report, spec, completion, new_tokens
