"""Data-parallel SFT on torch.distributed: does the loss survive a change of setup?

``detbench sft --world-size N`` runs :mod:`bench.sft`'s step (same model builder, data, AdamW and
clipping) on N ranks, gloo on the CPU and NCCL on CUDA, spawned here (one process per rank, a free
loopback port) or under ``torchrun`` (the environment says this process is a rank). ``--vary`` runs
setups that are the same training mathematically and compares each with the first, bit for bit:

    world=1,2,4   the global batch split over 1, 2, 4 ranks
    accum=1,2,4   the same global batch as 1, 2, 4 accumulated micro-batches per rank
    resume=K      train K steps, save model, optimizer, RNG and data position, start fresh processes,
                  load, go on; compared with the uninterrupted run
    threads=1,2   CPU intra-op threads per rank

Every setup splits the step's global batch (padded once, so every micro-batch has the same width in
every setup) into ``world x accum`` micro-batches of equal size; rank r takes micro-batches
``r*accum .. r*accum+accum-1``. The loss is the mean over the global batch's scored (response)
tokens: each micro-batch's mean loss weighted by its share of the global batch's scored tokens.

Two ways to reduce (``--reduce``):

* ``standard``: what training code does. DDP (or FSDP2's ``fully_shard``) all-reduces the averaged
  gradients (ring order, set by the world size); accumulation adds micro-batch gradients into
  ``p.grad`` as they arrive. Changing world size or accumulation changes the order of these sums,
  and the micro-batch size changes the batch shape every op sees.
* ``invariant``: a fixed reduction tree over micro-batches that every split respects. Each
  micro-batch's gradient is computed on its own, summed pairwise in micro-batch order on its rank,
  then the ranks' partial sums are gathered and summed pairwise in rank order: the very tree a single
  process builds over all micro-batches. With the micro-batch size fixed and world and accumulation
  powers of two, loss, gradients and parameters are the same bits for every split.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import signal
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.data import SFTBatch, batch_for_step
from bench.dtypes import torch_name
from bench.errors import InputError
from bench.modes import apply_mode
from bench.pinpoint import compare_runs, phase
from bench.plugins import import_modules
from bench.results import write_json_atomic
from bench.sft import _batches, build, make_optimizer, parse_model, sft_step, value_bits

REDUCTIONS = ("standard", "invariant")
PARALLEL = ("ddp", "fsdp")
AXES = ("world", "accum", "resume", "threads")
RANK_TIMEOUT_S = 120.0  # a collective waits this long for a rank that died before giving up
RANK_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------------------
# setups
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One way of running the same training."""

    world: int = 1
    accum: int = 1
    threads: int | None = None   # CPU intra-op threads per rank; None: 1 (as under torchrun)
    resume: int | None = None    # save after this many steps, go on in fresh processes

    def label(self) -> str:
        text = f"world={self.world} accum={self.accum}"
        if self.threads is not None:
            text += f" threads={self.threads}"
        if self.resume is not None:
            text += f" resume@{self.resume}"
        return text


def parse_vary(items: Sequence[str], base: Setup) -> list[Setup]:
    """``["world=1,2,4"]`` -> the setups, each ``base`` with one axis changed; the first is compared with
    the others. Axes: world, accum, threads (comma-separated values) and resume=K (``base`` itself,
    then ``base`` resumed after step K)."""
    if not items:
        return [base]
    if len(items) > 1:
        raise InputError(f"--vary: give one axis at a time, got {len(items)}: {', '.join(items)}")
    axis, sep, values = items[0].partition("=")
    axis = axis.strip()
    if not sep or axis not in AXES:
        raise InputError(f"--vary {items[0]!r}: expected AXIS=VALUES with AXIS one of {', '.join(AXES)}, "
                         "e.g. world=1,2,4")
    try:
        numbers = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--vary {items[0]!r}: values must be whole numbers, e.g. {axis}=1,2") from None
    if not numbers or any(n < 1 for n in numbers):
        raise InputError(f"--vary {items[0]!r}: values must be whole numbers >= 1")
    if axis == "resume":
        if len(numbers) != 1:
            raise InputError(f"--vary {items[0]!r}: resume takes one step count, e.g. resume=3")
        return [base, replace(base, resume=numbers[0])]
    if len(set(numbers)) != len(numbers) or len(numbers) < 2:
        raise InputError(f"--vary {items[0]!r}: give at least two different values to compare")
    return [replace(base, **{axis: n}) for n in numbers]


def fix_micro_batch(setups: Sequence[Setup], *, batch_size: int, micro_batch: int | None) -> list[Setup]:
    """With a micro-batch size given, each setup's accumulation (or, where accum is what varies, its world
    size) follows from it: world x accum x micro_batch = the global batch."""
    if micro_batch is None:
        return list(setups)
    if micro_batch < 1 or batch_size % micro_batch:
        raise InputError(f"--micro-batch {micro_batch}: must divide --batch-size {batch_size}")
    split = batch_size // micro_batch
    varies_accum = len({s.accum for s in setups}) > 1
    out = []
    for s in setups:
        have = s.accum if varies_accum else s.world
        if split % have:
            raise InputError(f"{s.label()}: {batch_size} sequences in micro-batches of {micro_batch} make {split} "
                             f"micro-batches, which do not split over {'accum' if varies_accum else 'world'}={have}")
        out.append(replace(s, world=split // have) if varies_accum else replace(s, accum=split // have))
    return out


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_setups(setups: Sequence[Setup], *, batch_size: int, steps: int, reduce: Sequence[str], parallel: str,
                 device: torch.device) -> int:
    """Check the setups against the batch; returns the micro-batch size (the same for every setup when
    ``invariant`` is among ``reduce``). Raises :class:`InputError` with the fix."""
    for r in reduce:
        if r not in REDUCTIONS:
            raise InputError(f"--reduce {r!r}: choose from {', '.join(REDUCTIONS)}")
    if parallel not in PARALLEL:
        raise InputError(f"--parallel {parallel!r}: choose from {', '.join(PARALLEL)}")
    if parallel == "fsdp" and "invariant" in reduce:
        raise InputError("--reduce invariant reduces gradients itself; it runs with --parallel ddp, not fsdp")
    if parallel == "fsdp" and _fully_shard() is None:
        raise InputError(f"--parallel fsdp: torch {torch.__version__} has no torch.distributed.fsdp.fully_shard "
                         "(FSDP2); use --parallel ddp or a newer torch")
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if max(s.world for s in setups) > gpus:
            raise InputError(f"world size {max(s.world for s in setups)} needs as many GPUs; {gpus} visible "
                             "(run on the CPU with --device cpu, which uses gloo)")
    micro = set()
    for s in setups:
        split = s.world * s.accum
        if split > batch_size:
            raise InputError(f"{s.label()}: {split} micro-batches but the global batch has {batch_size} sequences; "
                             f"raise --batch-size to at least {split}")
        if batch_size % split:
            raise InputError(f"{s.label()}: --batch-size {batch_size} does not split into world x accum = {split} "
                             f"equal micro-batches; use a multiple of {split}")
        if s.resume is not None and not 0 < s.resume < steps:
            raise InputError(f"--vary resume={s.resume}: resume after a step between 1 and {steps - 1} "
                             f"(--steps {steps})")
        if s.resume is not None and parallel == "fsdp":
            raise InputError("--vary resume saves and loads whole parameters; it runs with --parallel ddp")
        if s.threads is not None and device.type != "cpu":
            raise InputError("--vary threads sets CPU intra-op threads; it applies to --device cpu only")
        micro.add(batch_size // split)
        if "invariant" in reduce and not (_power_of_two(s.world) and _power_of_two(s.accum)):
            raise InputError(f"{s.label()}: --reduce invariant needs world size and accumulation that are powers "
                             "of two (1, 2, 4, ...), so that every split is a subtree of one reduction tree")
    if "invariant" in reduce and len(micro) > 1:
        raise InputError(f"--reduce invariant needs one micro-batch size in every setup, got {sorted(micro)}; "
                         "give --micro-batch M so that each setup's accumulation follows from its world size "
                         "(world x accum x M = --batch-size)")
    return min(micro)


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # in here: FSDP2 is absent from older torch
    except ImportError:
        return None
    return fully_shard


# ------------------------------------------------------------------------------------------------
# what every rank runs
# ------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One setup's training, as each rank receives it (picklable)."""

    model: str
    attention: str
    mode: str
    dtype: str
    device: str
    seed: int
    data_seed: int
    batch_size: int
    seq_len: int
    data: str | None
    n_batches: int | None
    steps: int
    repeats: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    clip: float
    reduce: str
    parallel: str
    setup: Setup
    port: int
    out: str                        # folder: rank 0 writes result.json and params.pt here
    first_step: int = 0             # resume: the step this process starts at
    last_step: int | None = None    # resume: stop (and save) before this step
    checkpoint: str | None = None   # resume: folder to save to (last_step) or load from (first_step)
    timeout_s: float = RANK_TIMEOUT_S
    imports: tuple[str, ...] = ()   # modules the rank imports first: they register backends (bench.plugins)


def _micro_batches(batch: SFTBatch, n: int) -> list[SFTBatch]:
    size = batch.input_ids.shape[0] // n
    return [SFTBatch(batch.input_ids[i * size:(i + 1) * size], batch.attention_mask[i * size:(i + 1) * size],
                     batch.labels[i * size:(i + 1) * size]) for i in range(n)]


def tree_sum(values: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise sum in index order: ((v0+v1)+(v2+v3))+...; an odd one out moves up a level unchanged.
    Summing each aligned power-of-two block first, then the block sums, gives the same bits."""
    level = list(values)
    while len(level) > 1:
        level = [level[i] + level[i + 1] if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    return level[0]


def _flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype,
                                                                                  device=p.device)
                      for p in params])


def _set_grads(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    i = 0
    for p in params:
        p.grad = flat[i:i + p.numel()].view_as(p).clone()
        i += p.numel()


def _micro_loss(model: nn.Module, mb: SFTBatch, n_global: int) -> torch.Tensor:
    """The micro-batch's mean token loss weighted by its share of the global batch's scored tokens."""
    loss = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=mb.labels).loss
    return loss * (mb.n_scored / n_global)


def _standard_step(wrapped: nn.Module, mine: list[SFTBatch], n_global: int, world: int,
                   parallel: str) -> torch.Tensor:
    """Accumulate into p.grad in arrival order; DDP / FSDP averages over ranks (hence the x world)."""
    local = None
    for a, mb in enumerate(mine):
        last = a == len(mine) - 1
        if parallel == "ddp":
            ctx = contextlib.nullcontext() if last else wrapped.no_sync()
        else:
            wrapped.set_requires_gradient_sync(last)
            ctx = contextlib.nullcontext()
        with ctx:
            loss = _micro_loss(wrapped, mb, n_global)
            (loss * world).backward()
        local = loss.detach() if local is None else local + loss.detach()
    total = local.clone()
    if world > 1:
        dist.all_reduce(total)
    return total


def _invariant_step(model: nn.Module, params: list[nn.Parameter], mine: list[SFTBatch], n_global: int,
                    world: int) -> torch.Tensor:
    """Each micro-batch's gradient on its own; one fixed pairwise tree over all micro-batches, for the
    gradients and for the loss."""
    grads, losses = [], []
    for mb in mine:
        model.zero_grad(set_to_none=True)
        loss = _micro_loss(model, mb, n_global)
        loss.backward()
        grads.append(_flat_grads(params))
        losses.append(loss.detach().reshape(1))
    _set_grads(params, tree_sum(_gather(tree_sum(grads), world)))
    return tree_sum(_gather(tree_sum(losses), world)).reshape(())


def _gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    if world == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def _wrap(model: nn.Module, job: Job, device: torch.device) -> nn.Module:
    if job.reduce == "invariant":
        return model
    if job.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel  # noqa: I001  (in here: only standard DDP needs it)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fully_shard = _fully_shard()
    for layer in getattr(getattr(model, "model", model), "layers", []):
        fully_shard(layer)
    fully_shard(model)
    return model


def _full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole (FSDP2's shards gathered), on the CPU."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name.removeprefix("module.")] = t.cpu().clone()
    return out


def _fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


TEST_FAIL_ENV = "DETBENCH_TEST_RANK_FAIL"  # tests only: "RANK:STEP" makes that rank raise at that step


def _die_with_parent() -> None:
    """Linux: this rank gets SIGTERM when the process that started it dies, even by SIGKILL."""
    try:
        import ctypes  # noqa: I001  (in here: Linux-only, and only ranks need it)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def rank_main(rank: int, job: Job) -> None:
    """One rank: join the group, train ``job.repeats`` times, and (rank 0) write the result."""
    _die_with_parent()
    import_modules(job.imports)  # a fresh process: the parent's --import registrations are not in it
    world = job.setup.world
    # One intra-op thread per rank unless the setup says otherwise, as torchrun sets OMP_NUM_THREADS=1:
    # ranks that each take every core starve DDP's communication thread (steps 30x slower measured on
    # 2 cores), and the thread count must be the same in every setup compared, since CPU kernels split
    # their work by it (--vary threads shows which op).
    if job.device == "cpu":
        torch.set_num_threads(job.setup.threads or 1)
    device = torch.device(job.device if job.device == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun gave us the rendezvous
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=job.timeout_s))
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{job.port}", rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=job.timeout_s))
    try:
        result = _train(rank, world, job, device)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(result["rank"], gathered, dst=0)
        if rank == 0:
            result["ranks"] = gathered
            params = result.pop("params")
            torch.save(params, Path(job.out) / "params.pt")
            write_json_atomic(Path(job.out) / "result.json", result, exclusive=False)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train(rank: int, world: int, job: Job, device: torch.device) -> dict:
    spec = parse_model(job.model)
    dtype = getattr(torch, job.dtype)
    batches = _batches(spec.config, data=job.data, n_batches=job.n_batches, steps=job.steps,
                       batch_size=job.batch_size, seq_len=job.seq_len, data_seed=job.data_seed)
    accum = job.setup.accum
    last = job.steps if job.last_step is None else job.last_step
    repeats: list[dict] = []
    params_out: dict[str, torch.Tensor] = {}
    grad_bytes = 0
    for r in range(job.repeats):
        # A fresh model each repeat (the same seeded weights): a DDP or FSDP wrapper stays on its module.
        model = build(spec, attention=job.attention, dtype=dtype, device=device, seed=job.seed)
        params = list(model.parameters())
        grad_bytes = sum(p.numel() * p.element_size() for p in params)
        wrapped = _wrap(model, job, device)
        opt = make_optimizer(wrapped, lr=job.lr, betas=job.betas, weight_decay=job.weight_decay)
        torch.manual_seed(job.seed)
        if job.first_step > 0:
            _load_state(Path(job.checkpoint) / f"rank{rank}-repeat{r}.pt", model, opt, device, job.first_step)
        losses, norms, values, seconds = [], [], [], []
        with apply_mode(job.mode):
            for k in range(job.first_step, last):
                if os.environ.get(TEST_FAIL_ENV) == f"{rank}:{k}":
                    raise RuntimeError(f"planted failure on rank {rank} at step {k + 1} ({TEST_FAIL_ENV})")
                t0 = time.perf_counter()
                batch = batch_for_step(batches, k).to(device)
                mine = _micro_batches(batch, world * accum)[rank * accum:(rank + 1) * accum]
                opt.zero_grad(set_to_none=True)
                if job.reduce == "standard":
                    loss = _standard_step(wrapped, mine, batch.n_scored, world, job.parallel)
                else:
                    loss = _invariant_step(model, params, mine, batch.n_scored, world)
                with phase("optimizer"):
                    grads = [p for p in wrapped.parameters() if p.grad is not None]
                    norm = torch.nn.utils.clip_grad_norm_(grads, job.clip if job.clip > 0 else math.inf)
                    opt.step()
                if hasattr(norm, "full_tensor"):
                    norm = norm.full_tensor()
                losses.append(value_bits(loss))
                norms.append(value_bits(norm))
                values.append(float(loss))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - t0)
        full = _full_params(wrapped)
        if job.last_step is not None:  # resume: save this rank's state and stop
            Path(job.checkpoint).mkdir(parents=True, exist_ok=True)
            torch.save({"model": full, "optimizer": opt.state_dict(), "rng": _rng_state(device), "step": last},
                       Path(job.checkpoint) / f"rank{rank}-repeat{r}.pt")
        repeats.append({"loss_bits": losses, "grad_norm_bits": norms, "losses": values, "step_seconds": seconds,
                        "param_fingerprints": {n: _fingerprint(t) for n, t in full.items()}})
        if r == 0:
            params_out = full
    return {"setup": asdict(job.setup), "reduce": job.reduce, "parallel": job.parallel,
            "first_step": job.first_step, "repeats": repeats, "params": params_out, "grad_bytes": grad_bytes,
            "rank": {"rank": rank, "threads": torch.get_num_threads(), "loss_bits": [rep["loss_bits"] for rep in repeats],
                     "param_fingerprints": repeats[0]["param_fingerprints"]}}


def _load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device, step: int) -> None:
    """Restore what resume saved: parameters, optimizer state, generators; check the data position."""
    state = torch.load(path, weights_only=False, map_location=device)
    if state["step"] != step:
        raise RuntimeError(f"{path}: saved after step {state['step']}, expected {step}")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state["model"][n])
    opt.load_state_dict(state["optimizer"])
    state["rng"]["cpu"] = state["rng"]["cpu"].cpu()
    _set_rng_state(state["rng"], device)


# ------------------------------------------------------------------------------------------------
# the parent: start the ranks, wait, stop them all on the first failure
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise InputError(f"--master-port {port}: cannot listen there ({e.strerror}); choose another port, "
                             "or leave --master-port out to get a free one") from None


class RankFailed(RuntimeError):
    """A rank raised or died; the others were stopped."""


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in RANK_ENV)


def _spawn(job: Job, timeout_s: float) -> dict:
    """Run ``job`` on ``job.setup.world`` fresh processes; the result rank 0 wrote."""
    # forkserver: one server process imports torch and detbench once (preloaded), and each rank is a
    # fork of it, which starts in a fraction of the time a fresh interpreter takes; the server never
    # touches CUDA, so its forks may.
    mp.set_forkserver_preload(["bench.distributed"])
    ctx = mp.start_processes(rank_main, args=(job,), nprocs=job.setup.world, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise RankFailed(f"{job.setup.label()}: the ranks did not finish within {timeout_s:.0f} s")
    except mp.ProcessRaisedException as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise RankFailed(f"{job.setup.label()}: rank {e.error_index} raised "
                         f"{lines[-1].strip() if lines else 'an exception'}; the other ranks were stopped") from None
    except mp.ProcessExitedException as e:
        raise RankFailed(f"{job.setup.label()}: rank {e.error_index} exited with code {e.exit_code}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return _read_result(job)


def _read_result(job: Job) -> dict:
    result = json.loads((Path(job.out) / "result.json").read_text())
    result["params"] = torch.load(Path(job.out) / "params.pt", weights_only=True)
    return result


def run_setup(job: Job, timeout_s: float) -> dict:
    """One setup: spawned ranks, or (resume) two rounds of spawned ranks with a checkpoint between."""
    if job.setup.resume is None:
        return _spawn(job, timeout_s)
    ckpt = str(Path(job.out) / "checkpoint")
    first = _spawn(replace(job, last_step=job.setup.resume, checkpoint=ckpt), timeout_s)
    second = _spawn(replace(job, first_step=job.setup.resume, checkpoint=ckpt, port=free_port()), timeout_s)
    for a, b in zip(first["repeats"], second["repeats"]):
        for key in ("loss_bits", "grad_norm_bits", "losses", "step_seconds"):
            b[key] = a[key] + b[key]
    second["first_step"] = 0
    return second


# ------------------------------------------------------------------------------------------------
# comparing setups
# ------------------------------------------------------------------------------------------------


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Float bits as integers on one monotone line (-0.0 and +0.0 both 0), as float64 to subtract safely."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    i = t.contiguous().view(ints).to(torch.int64)
    low = -(1 << (t.element_size() * 8 - 1))
    return torch.where(i >= 0, i, low - i).double()


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between equal-shaped float tensors in units in the last place."""
    return int((_ordered(a) - _ordered(b)).abs().max().item()) if a.numel() else 0


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(ints),
                                                                      b.contiguous().view(ints))


def compare(ref: dict, other: dict) -> dict:
    """``other`` against ``ref`` (repeat 0 of each): first differing step, differing parameters."""
    ra, ob = ref["repeats"][0], other["repeats"][0]
    first = next((k + 1 for k, (x, y) in enumerate(zip(ra["loss_bits"], ob["loss_bits"])) if x != y), None)
    first_norm = next((k + 1 for k, (x, y) in enumerate(zip(ra["grad_norm_bits"], ob["grad_norm_bits"]))
                       if x != y), None)
    differ, max_abs, max_ulp, worst = 0, 0.0, 0, None
    for name, a in ref["params"].items():
        b = other["params"][name]
        if not same_bits(a, b):
            differ += 1
            d = (a.double() - b.double()).abs().max().item()
            if worst is None or d > max_abs:
                max_abs, worst = d, name
            max_ulp = max(max_ulp, ulp_distance(a, b))
    return {"first_loss_step": first, "first_grad_norm_step": first_norm, "params_differ": differ,
            "params_total": len(ref["params"]), "max_abs": max_abs, "max_ulp": max_ulp, "worst_param": worst,
            "identical": first is None and first_norm is None and differ == 0}


def run_to_run(result: dict) -> bool:
    """Whether the setup's repeats were bitwise equal (loss, gradient norm, every parameter)."""
    reps = result["repeats"]
    return all(r["loss_bits"] == reps[0]["loss_bits"] and r["grad_norm_bits"] == reps[0]["grad_norm_bits"]
               and r["param_fingerprints"] == reps[0]["param_fingerprints"] for r in reps[1:])


def verdict(setup: Setup, ref_setup: Setup, reduce: str, cmp: dict, micro_same: bool) -> str:
    if cmp["identical"]:
        return f"identical to {ref_setup.label()} (every step's loss and gradient norm, every parameter)"
    where = (f"from step {cmp['first_loss_step']}" if cmp["first_loss_step"] else "in the parameters only")
    why = ""
    if reduce == "standard" and setup.world * setup.accum != ref_setup.world * ref_setup.accum and not micro_same:
        why = ("; expected with --reduce standard: the micro-batch size and the order of the gradient sums "
               "change with the split. --reduce invariant (same micro-batch size) removes both")
    elif reduce == "standard" and (setup.world != ref_setup.world or setup.accum != ref_setup.accum):
        why = ("; expected with --reduce standard: the gradient sums (all-reduce, accumulation) add in another "
               "order. --reduce invariant fixes the order")
    elif setup.resume is not None:
        why = "; a resume must be exact: this is a bug in saving or restoring state"
    elif setup.threads != ref_setup.threads:
        why = "; a CPU kernel splits its work by the thread count (a reduction order that depends on threads)"
    return (f"DIFFERS {where}: {cmp['params_differ']}/{cmp['params_total']} parameters, max |diff| "
            f"{cmp['max_abs']:.3g}, max {cmp['max_ulp']} ulp{why}")


# ------------------------------------------------------------------------------------------------
# where two setups part
# ------------------------------------------------------------------------------------------------


def _logits_and_grads(model: nn.Module, batch: SFTBatch, rows: slice, size: int) -> tuple[torch.Tensor, dict]:
    """Logits and parameter gradients of the sequences ``rows`` computed inside a micro-batch of ``size``
    sequences starting at ``rows.start`` (the other sequences present but with no scored token)."""
    sl = slice(rows.start, rows.start + size)
    labels = batch.labels[sl].clone()
    labels[rows.stop - rows.start:] = -100
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch.input_ids[sl], attention_mask=batch.attention_mask[sl], labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach()[: rows.stop - rows.start], grads


def locate(job: Job, ref_job: Job) -> dict:
    """At which point ``job`` parts from ``ref_job``, checked in this process on step 1's batch with the
    initial weights.

    Micro-batches of different sizes: the first micro-batch's sequences computed at both sizes: if
    their logits differ the difference enters in a rank's forward (a batch-variant op); if only their
    gradients differ, in its backward; else at the reduction. The same micro-batch size: every
    micro-batch is the same computation in both setups (and each setup repeats bit for bit), so the
    difference enters where the gradients are summed (the accumulation into p.grad, the all-reduce).
    Thread counts: detbench pinpoint's compare_runs on one step under each thread count names the first op.
    """
    spec = parse_model(job.model)
    dtype = getattr(torch, job.dtype)
    device = torch.device(job.device)
    batches = _batches(spec.config, data=job.data, n_batches=job.n_batches, steps=job.steps,
                       batch_size=job.batch_size, seq_len=job.seq_len, data_seed=job.data_seed)
    batch = batch_for_step(batches, 0).to(device)
    s, r = job.setup, ref_job.setup
    if s.resume is not None:
        return {"where": "resume", "detail": "the resumed run restores parameters, optimizer state, generators and "
                "the data position; a difference here is a bug in what was saved or restored"}
    if s.threads != r.threads:
        return _locate_threads(spec, job, batch, (r.threads, s.threads))
    m, m_ref = job.batch_size // (s.world * s.accum), ref_job.batch_size // (r.world * r.accum)
    if m == m_ref:
        return {"where": "reduction", "detail": f"both setups compute the same micro-batches of {m} sequences (each "
                f"setup repeats bit for bit), so the difference enters where the gradients are summed: "
                f"{s.accum} vs {r.accum} accumulated into p.grad in arrival order, all-reduce over {s.world} vs "
                f"{r.world} ranks"}
    small, large = sorted((m, m_ref))
    model = build(spec, attention=job.attention, dtype=dtype, device=device, seed=job.seed)
    with apply_mode(job.mode):
        la, ga = _logits_and_grads(model, batch, slice(0, small), small)
        lb, gb = _logits_and_grads(model, batch, slice(0, small), large)
    if not same_bits(la, lb):
        n = int((la.view(-1) != lb.view(-1)).sum())
        return {"where": "forward", "detail": f"the same {small} sequences give different logits computed in a "
                f"micro-batch of {small} and of {large} ({n} of {la.numel()} elements): a batch-variant op in the "
                "forward (detbench run's batch-invariance column names which)"}
    differ = sorted(name for name in ga if not same_bits(ga[name], gb[name]))
    if differ:
        return {"where": "backward", "detail": f"the same {small} sequences give the same logits but different "
                f"gradients for {len(differ)} of {len(ga)} parameters (first: {differ[0]}) in a micro-batch of "
                f"{small} and of {large}: a batch-variant op in the backward"}
    return {"where": "reduction", "detail": f"the same {small} sequences give the same logits and gradients in "
            f"micro-batches of {small} and {large}; the difference enters where the gradients are summed "
            "(accumulation into p.grad, all-reduce)"}


def _locate_threads(spec, job: Job, batch: SFTBatch, threads: tuple[int | None, int | None]) -> dict:
    counts = iter(threads)
    before = torch.get_num_threads()
    dtype = getattr(torch, job.dtype)

    def setup():
        n = next(counts)
        torch.set_num_threads(n if n is not None else before)
        model = build(spec, attention=job.attention, dtype=dtype, device=torch.device(job.device), seed=job.seed)
        return model, make_optimizer(model, lr=job.lr, betas=job.betas, weight_decay=job.weight_decay)

    def step(model, opt):
        return sft_step(model, opt, batch, job.clip)[0]

    try:
        with apply_mode(job.mode):
            report = compare_runs(step, setup=setup, runs=2)
    finally:
        torch.set_num_threads(before)
    rc = report.root_cause
    if rc is None:
        return {"where": "threads", "detail": "one step traced under each thread count agrees; the difference "
                "enters in a later step"}
    return {"where": "threads", "detail": f"first op that differs between {threads[0]} and {threads[1]} threads: "
            f"{rc['op']} at {rc['module']} ({rc['phase']})", "root_cause": rc}


@dataclass
class DPResult:
    setups: list[dict] = field(default_factory=list)   # per setup and reduction: summary, comparison, verdict
    cost: list[dict] = field(default_factory=list)     # invariant vs standard, same setup, same run
    status: str = "complete"
    reason: str | None = None


def bytes_per_step(reduce: str, world: int, grad_bytes: int) -> int:
    """Bytes each rank receives per step by the algorithm's volume: ring all-reduce 2(W-1)/W of the
    gradients; the invariant all-gather (W-1) copies of them."""
    if world == 1:
        return 0
    return int(2 * (world - 1) / world * grad_bytes) if reduce == "standard" else (world - 1) * grad_bytes


def _row(job: Job, res: dict, ref_job: Job, ref: dict) -> dict:
    cmp = compare(ref, res)
    micro = job.batch_size // (job.setup.world * job.setup.accum)
    ref_micro = ref_job.batch_size // (ref_job.setup.world * ref_job.setup.accum)
    secs = [s for rep in res["repeats"] for s in rep["step_seconds"][1:]] or res["repeats"][0]["step_seconds"]
    first = res["repeats"][0]
    return {"setup": asdict(job.setup), "label": job.setup.label(), "reduce": job.reduce,
            "parallel": job.parallel if job.reduce == "standard" else "all-gather, fixed tree",
            "micro_batch": micro, "repeats": job.repeats, "run_to_run_identical": run_to_run(res),
            "loss_bits": first["loss_bits"], "losses": first["losses"], "grad_norm_bits": first["grad_norm_bits"],
            "ranks": res["ranks"], "median_step_s": statistics.median(secs),
            "bytes_per_step_per_rank": bytes_per_step(job.reduce, job.setup.world, res["grad_bytes"]),
            "vs": ref_job.setup.label(), "comparison": cmp,
            "verdict": verdict(job.setup, ref_job.setup, job.reduce, cmp, micro == ref_micro)}


def run_setups(jobs: list[Job], timeout_s: float, on_setup=None) -> DPResult:
    """Every job (setup x reduction), then each compared with the first job of its reduction. An
    interrupt or a failed rank ends the run with what finished (status interrupted / failed)."""
    out = DPResult()
    results: dict[tuple, dict] = {}
    try:
        for job in jobs:
            res = run_setup(job, timeout_s)
            results[(job.reduce, job.setup)] = res
            ref_job = next(j for j in jobs if j.reduce == job.reduce)
            row = _row(job, res, ref_job, results[(ref_job.reduce, ref_job.setup)])
            if not row["comparison"]["identical"]:
                row["where"] = locate(job, ref_job)
            out.setups.append(row)
            if on_setup is not None:
                on_setup(row)
    except KeyboardInterrupt:
        out.status = "interrupted"
    except RankFailed as e:
        out.status, out.reason = "failed", str(e)
    out.cost = cost_rows(out.setups)
    return out


def cost_rows(rows: list[dict]) -> list[dict]:
    """--reduce invariant against standard for each setup that ran both, in this run."""
    by = {(r["reduce"], r["label"]): r for r in rows}
    cost = []
    for r in rows:
        s = by.get(("standard", r["label"]))
        if r["reduce"] == "invariant" and s is not None:
            cost.append({"setup": r["label"], "standard_step_s": s["median_step_s"],
                         "invariant_step_s": r["median_step_s"],
                         "ratio": r["median_step_s"] / s["median_step_s"] if s["median_step_s"] else None,
                         "standard_bytes": s["bytes_per_step_per_rank"], "invariant_bytes": r["bytes_per_step_per_rank"]})
    return cost


def make_jobs(*, setups: Sequence[Setup], reduce: Sequence[str], parallel: str, out: str, **common: Any) -> list[Job]:
    """One job per setup x reduction, each with its own folder under ``out`` and its own port."""
    jobs = []
    # setup-major: the reductions of one setup run back to back, so their step times (the cost
    # ratio) are measured close together on a shared, noisy machine
    for i, s in enumerate(setups):
        for red in reduce:
            folder = Path(out) / f"{red}-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append(Job(setup=s, reduce=red, parallel=parallel, port=free_port(), out=str(folder), **common))
    return jobs


def scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="detbench-dp-")


__all__ = ["Setup", "Job", "DPResult", "parse_vary", "check_setups", "make_jobs", "run_setups", "tree_sum",
           "launched_by_torchrun", "check_port", "free_port", "RankFailed"]


# ------------------------------------------------------------------------------------------------
# the sft record
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPSettings:
    world: int = 1
    accum: int = 1
    micro_batch: int | None = None
    parallel: str = "ddp"
    reduce: tuple[str, ...] = ("standard",)
    vary: tuple[str, ...] = ()
    master_port: int | None = None
    timeout_s: float = RANK_TIMEOUT_S
    imports: tuple[str, ...] = ()   # modules registering backends (--import): every rank imports them

    @property
    def requested(self) -> bool:
        """Whether the user asked for anything beyond one process."""
        return (self.world > 1 or self.accum > 1 or self.micro_batch is not None or bool(self.vary)
                or self.reduce != ("standard",) or self.parallel != "ddp" or launched_by_torchrun())


def plan_jobs(plan: Any, dp: DPSettings, out: str) -> list[Job]:
    """Check ``dp`` against an sft plan (one configuration) and make its jobs. :class:`InputError`."""
    if len(plan.attention) * len(plan.modes) * len(plan.dtypes) * len(plan.lrs) != 1:
        raise InputError("with --world-size, --accum, --micro-batch, --reduce or --vary, give one --attention, "
                         "--mode, --dtype and --lr (the setups are what is compared)")
    if plan.plants:
        raise InputError("--plant is not supported with data-parallel runs")
    s = plan.settings
    if dp.world < 1 or dp.accum < 1:
        raise InputError("--world-size and --accum must be at least 1")
    setups = fix_micro_batch(parse_vary(list(dp.vary), Setup(world=dp.world, accum=dp.accum)),
                             batch_size=s.batch_size, micro_batch=dp.micro_batch)
    check_setups(setups, batch_size=s.batch_size, steps=s.steps, reduce=dp.reduce, parallel=dp.parallel,
                 device=plan.device)
    if launched_by_torchrun():
        if len(setups) > 1:
            raise InputError("under torchrun detbench runs the one setup torchrun started; --vary needs detbench to "
                             "start the ranks itself (leave torchrun out)")
        if int(os.environ["WORLD_SIZE"]) != setups[0].world:
            raise InputError(f"torchrun started {os.environ['WORLD_SIZE']} ranks but --world-size is "
                             f"{setups[0].world}; make them the same")
    if dp.master_port is not None:
        check_port(dp.master_port)
    common = dict(model=s.model, attention=plan.attention[0], mode=plan.modes[0], dtype=torch_name(plan.dtypes[0]),
                  device=plan.device.type, seed=s.seed, data_seed=s.data_seed, batch_size=s.batch_size,
                  seq_len=s.seq_len or 64, data=None if s.data == "synthetic" else s.data, n_batches=s.n_batches,
                  steps=s.steps, repeats=s.repeats, lr=plan.lrs[0], betas=tuple(s.betas), weight_decay=s.weight_decay,
                  clip=s.clip, timeout_s=dp.timeout_s, imports=tuple(dp.imports))
    jobs = make_jobs(setups=setups, reduce=dp.reduce, parallel=dp.parallel, out=out, **common)
    if dp.master_port is not None:
        jobs[0] = replace(jobs[0], port=dp.master_port)
    return jobs


def run_torchrun_rank(job: Job) -> DPResult | None:
    """Under torchrun: this process is one rank of ``job``; rank 0 returns the result, the others None."""
    rank = int(os.environ["RANK"])
    rank_main(rank, job)
    if rank != 0:
        return None
    res = _read_result(job)
    out = DPResult()
    out.setups.append(_row(job, res, job, res))
    return out


def _nccl_info() -> dict:
    """NCCL's version and the algorithm/protocol settings in force (unset: NCCL chooses per call)."""
    try:
        version = ".".join(str(v) for v in torch.cuda.nccl.version())
    except (AttributeError, RuntimeError, TypeError):
        version = None
    return {"version": version, **{k: os.environ.get(k) for k in ("NCCL_ALGO", "NCCL_PROTO")}}


def record(out: DPResult, dp: DPSettings, jobs: list[Job]) -> dict:
    """What the sft result stores under ``distributed``."""
    return {"settings": {**asdict(dp), "reduce": list(dp.reduce), "vary": list(dp.vary)},
            "loss_normalisation": "mean over the global batch's scored tokens (each micro-batch's mean loss "
                                  "weighted by its share of them)",
            "launcher": "torchrun" if launched_by_torchrun() else "spawn",
            "backend": "nccl" if jobs and jobs[0].device == "cuda" else "gloo",
            "nccl": _nccl_info() if jobs and jobs[0].device == "cuda" else None,
            "status": out.status, "reason": out.reason, "setups": out.setups, "cost": out.cost}
