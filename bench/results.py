"""Results as data: typed records, the environment they were measured in, and atomic JSON files.

Every measurement is a dataclass whose field names are the JSON keys (documented in
``results/README.md``). Numbers are stored as measured, never rounded. Non-finite floats, which
strict JSON cannot hold, are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``
and read back as floats.

Public API (also used by other detbench commands):

* :class:`Environment`, :func:`capture_environment` - device, versions, flags, seeds, commit.
* :func:`to_json` / :func:`from_json` - dataclass <-> JSON-ready value, typed both ways.
* :func:`check_out_dir` - make sure a results directory exists and is writable (raises
  :class:`OutDirError` with a one-line message naming the fix).
* :func:`result_path` - a new, never-existing file name ``<kind>-<date>-<time>-<device>-<id>.json``.
* :func:`write_json_atomic`, :func:`write_text_atomic` - temp file then link/rename: a crash or
  Ctrl-C leaves either the whole file or nothing (never a partial file), and an existing file is
  never overwritten.
* :class:`RunResult` and its record types - the schema of ``detbench run``; :func:`load_run`.
* :func:`load_result` - read a result of one of several kinds (schema -> record class), e.g. run or sft.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import secrets
import subprocess
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch

from bench.errors import InputError, SaveError

# ------------------------------------------------------------------------------------------------
# dataclass <-> JSON
# ------------------------------------------------------------------------------------------------

_NONFINITE_OUT = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def to_json(obj: Any) -> Any:
    """A JSON-ready copy of ``obj``: dataclasses become dicts (field name = key), tuples lists,
    non-finite floats the strings ``"NaN"``/``"Infinity"``/``"-Infinity"``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return _NONFINITE_OUT[repr(obj)]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a result: {obj!r}")


@functools.lru_cache(maxsize=None)
def _type_hints(tp: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a dataclass, evaluated once: evaluated per record it dominated loading
    a result (the committed 1.4 MB run file: 1.4 s, 0.22 s with this cache)."""
    return typing.get_type_hints(tp)


def from_json(tp: Any, data: Any, where: str = "result") -> Any:
    """Rebuild a value of type ``tp`` (a dataclass, list[...], dict[...], Optional, float...) from JSON."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        last_error = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return from_json(arg, data, where)
            except (TypeError, ValueError) as e:
                last_error = e
        raise ValueError(f"{where}: {data!r} matches none of {tp}") from last_error
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object for {tp.__name__}, got {type(data).__name__}")
        hints = _type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in data:
                kwargs[f.name] = from_json(hints[f.name], data[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing field {f.name!r} of {tp.__name__}")
        return tp(**kwargs)
    if origin in (list, tuple):
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list, got {type(data).__name__}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        return [from_json(arg, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        _, arg = typing.get_args(tp) or (str, Any)
        return {k: from_json(arg, v, f"{where}.{k}") for k, v in data.items()}
    if tp is float:
        if isinstance(data, str) and data in _NONFINITE_IN:
            return _NONFINITE_IN[data]
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
        raise ValueError(f"{where}: expected a number, got {data!r}")
    if tp is int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
        raise ValueError(f"{where}: expected an integer, got {data!r}")
    if tp is bool:
        if isinstance(data, bool):
            return data
        raise ValueError(f"{where}: expected true/false, got {data!r}")
    if tp is str:
        if isinstance(data, str):
            return data
        raise ValueError(f"{where}: expected a string, got {data!r}")
    if tp is dict:
        return dict(data)
    raise TypeError(f"{where}: unsupported type {tp!r}")


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


class OutDirError(InputError):
    """The results directory cannot be created or written; the message names the fix."""


def _file_in_the_way(out: Path) -> Path | None:
    """``out`` itself or the nearest of its parents that exists, when that is not a directory."""
    for p in (out, *out.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_out_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it writable by writing and removing a probe file."""
    out = Path(path)
    blocker = _file_in_the_way(out)
    if blocker is not None:
        raise OutDirError(f"{str(blocker)!r} is a file, not a directory; pass --out a directory "
                          f"(a new one is created)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutDirError(f"cannot create results directory {str(out)!r} ({e.strerror or e}); "
                          f"pass --out a writable directory") from None
    if not out.is_dir():
        raise OutDirError(f"{str(out)!r} is not a directory; pass --out a writable directory")
    probe = out / f".detbench-write-probe-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(probe, "x") as f:
            f.write("probe")
    except OSError as e:
        raise OutDirError(f"cannot write to results directory {str(out)!r} ({e.strerror or e}); "
                          f"pass --out a writable directory") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_label(env: "Environment") -> str:
    """Short device tag for file names: ``cpu`` or ``cuda-<gpu model>`` (e.g. ``cuda-h200``)."""
    if env.device_type != "cuda":
        return "cpu"
    name = _slug(env.device_name).replace("nvidia-", "")
    return f"cuda-{name[:24].strip('-')}" if name else "cuda"


def new_run_id() -> str:
    """Six hex characters, random: tells apart two runs started in the same second."""
    return secrets.token_hex(3)


def result_path(out_dir: str | os.PathLike, kind: str, device: str, run_id: str,
                when: _dt.datetime | None = None) -> Path:
    """``out_dir/<kind>-<YYYYmmdd>-<HHMMSS>-<device>-<run_id>.json`` (UTC); never an existing file."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    stem = f"{kind}-{when.strftime('%Y%m%d-%H%M%S')}-{_slug(device) or 'device'}-{run_id}"
    path = Path(out_dir) / f"{stem}.json"
    n = 1
    while path.exists() or path.with_suffix(".md").exists():
        n += 1
        path = Path(out_dir) / f"{stem}-{n}.json"
    return path


def _write_atomic(path: Path, data: bytes, exclusive: bool) -> Path:
    """Write ``data`` to a hidden temporary file next to ``path``, then link or rename it into place.

    A failure (disk full, folder gone, no permission) raises :class:`bench.errors.SaveError` naming the
    file; the temporary file is removed either way, so nothing partial is left under the results folder.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        _write_and_place(path, tmp, data, exclusive)
    except FileExistsError:
        raise
    except OSError as e:
        raise SaveError(f"could not save {path}: {e.strerror or e}; nothing was written there "
                        f"(free some space or choose another folder)") from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass
    return path


def _write_and_place(path: Path, tmp: Path, data: bytes, exclusive: bool) -> None:
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if exclusive:
        try:
            os.link(tmp, path)  # fails if path exists: never overwrites
        except FileExistsError:
            raise FileExistsError(f"{path} already exists; detbench never overwrites a result") from None
        except OSError:  # file system without hard links: check, then rename
            if path.exists():
                raise FileExistsError(f"{path} already exists; detbench never overwrites a result") from None
            os.replace(tmp, path)
    else:
        os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, payload: Any, *, exclusive: bool = True) -> Path:
    """Write ``to_json(payload)`` to ``path`` atomically (strict JSON, indented, trailing newline)."""
    text = json.dumps(to_json(payload), indent=1, allow_nan=False) + "\n"
    return _write_atomic(Path(path), text.encode(), exclusive)


def write_text_atomic(path: str | os.PathLike, text: str, *, exclusive: bool = True) -> Path:
    return _write_atomic(Path(path), text.encode(), exclusive)


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------

# Environment variables that can change what a kernel computes or how it is scheduled.
RELEVANT_ENV = (
    "CUBLAS_WORKSPACE_CONFIG", "CUDA_LAUNCH_BLOCKING", "FLASH_ATTENTION_DETERMINISTIC",
    "ASCEND_LAUNCH_BLOCKING", "HCCL_DETERMINISTIC", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
    "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "PYTORCH_CUDA_ALLOC_CONF",
    "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT", "TRITON_INTERPRET", "TRITON_CACHE_DIR",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_CBWR", "ONEDNN_VERBOSE",
    "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "CUBLASLT_WORKSPACE_SIZE", "CUBLAS_WORKSPACE_SIZE",
)


@dataclass
class Environment:
    """Where and with what a result was measured."""

    device: str                      # "cpu", "cuda:0"
    device_type: str                 # "cpu" | "cuda"
    device_name: str                 # GPU model or CPU model
    sm_count: int | None             # streaming multiprocessors (CUDA)
    compute_capability: str | None   # "9.0"
    gpu_memory_bytes: int | None
    cpu_model: str
    cpu_count: int | None            # logical CPUs in the machine
    cpu_affinity: int | None         # CPUs this process may run on
    torch_threads: int               # torch.get_num_threads()
    torch_interop_threads: int
    python: str
    platform: str
    torch: str
    triton: str | None
    cuda: str | None                 # CUDA version torch was built with
    cudnn: int | None
    driver: str | None               # NVIDIA driver version
    numpy: str | None
    detbench_commit: str | None
    detbench_dirty: bool | None      # uncommitted changes in the detbench checkout
    env: dict[str, str]              # RELEVANT_ENV variables that are set
    torch_flags: dict[str, Any]      # tf32/reduced-precision/determinism flags at capture time
    seeds: dict[str, int]
    captured: str                    # ISO time (UTC)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def torch_flags() -> dict[str, Any]:
    """Flags that change matmul/conv numerics or determinism, as they are right now."""
    flags: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some of these getters are deprecated in newer torch
        probes = {
            "float32_matmul_precision": lambda: torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
            "cuda_matmul_allow_fp16_reduced_precision_reduction":
                lambda: torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            "cuda_matmul_allow_bf16_reduced_precision_reduction":
                lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            "cudnn_allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
            "cudnn_deterministic": lambda: torch.backends.cudnn.deterministic,
            "cudnn_benchmark": lambda: torch.backends.cudnn.benchmark,
            "deterministic_algorithms": lambda: torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": lambda: torch.is_deterministic_algorithms_warn_only_enabled(),
            "fill_uninitialized_memory": lambda: torch.utils.deterministic.fill_uninitialized_memory,
            "mkldnn_available": lambda: torch.backends.mkldnn.is_available(),
        }
        for key, get in probes.items():
            try:
                value = get()
            except Exception:  # absent in this torch version
                continue
            flags[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flags


def capture_environment(device: torch.device | str, seeds: dict[str, int] | None = None) -> Environment:
    """Describe the machine, software and settings a measurement on ``device`` depends on."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    name, sms, cc, mem = _cpu_model(), None, None, None
    if cuda:
        props = torch.cuda.get_device_properties(device)
        name, sms, mem = props.name, int(props.multi_processor_count), int(props.total_memory)
        cc = f"{props.major}.{props.minor}"
    try:
        import triton  # in here: triton is optional (not on every platform)

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return Environment(
        device=str(device) if device.index is not None or not cuda else f"cuda:{torch.cuda.current_device()}",
        device_type=device.type,
        device_name=name,
        sm_count=sms,
        compute_capability=cc,
        gpu_memory_bytes=mem,
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        cpu_affinity=affinity,
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        python=sys.version.split()[0],
        platform=platform.platform(),
        torch=str(torch.__version__),
        triton=triton_version,
        cuda=torch.version.cuda,
        cudnn=int(cudnn) if cudnn is not None else None,
        driver=_driver_version() if cuda else None,
        numpy=numpy_version,
        detbench_commit=commit,
        detbench_dirty=(bool(status) if status is not None else None),
        env={k: os.environ[k] for k in RELEVANT_ENV if k in os.environ},
        torch_flags=torch_flags(),
        seeds=dict(seeds or {}),
        captured=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


# ------------------------------------------------------------------------------------------------
# the records of `detbench run`
# ------------------------------------------------------------------------------------------------

RUN_SCHEMA = "detbench.run/2"
# Every run schema load_run reads; /1 lacks the timing loop, its samples and its load (TimingRecord).
RUN_SCHEMAS = ("detbench.run/1", RUN_SCHEMA)


@dataclass
class BackendInfo:
    """A registry entry as it was when the run started."""

    op: str
    name: str
    deterministic_claim: bool | None
    twin: str | None
    origin: str
    description: str


@dataclass
class SubjectInfo:
    """One subject as run: which op the backend axis routes and the shapes it was fed."""

    subject: str
    primary_op: str
    rowwise: bool                  # batch rows are tokens (True) or whole sequences (False)
    description: str
    preset: str
    shapes: dict[str, list[int]]   # input name -> shape
    rows: int                      # size of the batch dimension
    batch_sizes: list[int]         # sub-batch sizes of the batch-invariance check
    route: dict[str, str]          # backend of every op (the primary op's entry is the axis)
    flops_fwd: int
    flops_bwd: int
    bytes_fwd: dict[str, int]      # dtype -> bytes moved (counted, not measured)
    bytes_bwd: dict[str, int]
    bound: str                     # "flops" or "bytes": which rate the tables print
    notes: str = ""


@dataclass
class CellRecord:
    """One subject x backend x dtype x mode: what happened and the summary verdicts."""

    subject: str
    backend: str
    dtype: str
    mode: str
    status: str                    # ok | refused | error | unsupported
    reason: str | None             # for refused/error/unsupported: the first line of the error
    repeats: int                   # N run-to-run repeats actually compared
    deterministic: bool | None     # every tensor bitwise equal over the N repeats
    missable_fraction: float | None  # differences rarer than this could be missed (5% risk)
    batch_invariant: bool | None   # every sub-batch bitwise equal to the full batch's rows
    verdict: str                   # one sentence for humans, states N
    nonfinite: bool = False        # NaN or inf in some output or gradient
    cuda_initialised_at_mode_entry: bool = False
    seconds: float = 0.0           # wall time of the cell's checks (its timing runs later, in a loop)
    # PyTorch filled the memory torch.empty returned during the cell (deterministic algorithms on and
    # torch.utils.deterministic.fill_uninitialized_memory): its times include those memsets. None: not
    # recorded (files written before this field, or a cell that never entered its mode)
    fill_uninitialized_memory: bool | None = None
    # The generators the call under test advanced although every repeat reseeded them (torch.manual_seed):
    # "cpu", "cuda:0" ...; [] none; None not measured (files written before this field, or no repeat ran).
    # A cell that consumes RNG is deterministic given the seed only (see README, "RNG use").
    rng_consumed: list[str] | None = None
    # The backend is registered deterministic=True and its repeats differ (deterministic is False).
    claim_broken: bool = False


@dataclass
class RepeatRecord:
    """Run-to-run result of one tensor (the output or a gradient) over N repeats."""

    subject: str
    backend: str
    dtype: str
    mode: str
    tensor: str                    # "out", "out.q", "grad.x", "grad.q_proj.weight", ...
    shape: list[int]
    tensor_dtype: str
    repeats: int
    n_equal_to_first: int          # repeats bitwise equal to repeat 0 (including repeat 0)
    n_distinct: int                # distinct bit patterns among the N (bench.pinpoint fingerprints)
    max_n_diff: int                # most elements differing from repeat 0 in any repeat
    n_total: int
    max_abs: float                 # largest |a - b| vs repeat 0 over finite pairs
    max_ulp: int                   # largest ULP distance vs repeat 0 over finite pairs
    nan: int                       # NaN elements in repeat 0
    inf: int
    first_mismatch: dict[str, Any] | None = None  # bench.compare.Mismatch of the first differing repeat


@dataclass
class BatchRecord:
    """Batch invariance of one tensor: the first ``rows`` rows computed alone vs in the full batch."""

    subject: str
    backend: str
    dtype: str
    mode: str
    tensor: str
    rows: int
    full_rows: int
    equal: bool
    n_diff: int
    n_total: int
    max_abs: float
    max_ulp: int


@dataclass
class AccuracyRecord:
    """Error of one tensor against the float64 reference, next to eager PyTorch's in the same dtype."""

    subject: str
    backend: str
    dtype: str
    mode: str
    tensor: str
    rel_l2: float                  # ||x - ref|| / ||ref||, in float64
    max_ulp: float                 # max error in ulps of the tensor's dtype at max(|ref|, rms(ref))
    max_abs: float
    eager_rel_l2: float            # the same for the all-eager route in this dtype (default mode)
    eager_max_ulp: float
    nan: int
    inf: int


@dataclass
class CrossRecord:
    """Two cells of one subject and dtype compared on repeat 0 (backend vs backend, or mode vs mode)."""

    subject: str
    dtype: str
    a_backend: str
    a_mode: str
    b_backend: str
    b_mode: str
    equal: bool                    # every tensor bitwise equal
    differing: list[str]           # tensors that differ
    max_abs: float
    max_ulp: int
    max_rel_l2: float              # worst ||a - b|| / ||b|| over tensors


@dataclass
class TimingRecord:
    """Time of one phase of one cell (seconds; never rounded)."""

    subject: str
    backend: str
    dtype: str
    mode: str
    phase: str                     # "fwd" | "bwd" | "fwd+bwd"
    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    repeats: int
    warmup: int
    clock: str                     # "cuda-events" | "perf_counter"
    flops: int                     # counted work of this phase
    bytes: int
    # Added in detbench.run/2 (absent, so these defaults, in /1 files):
    samples_s: list[float] = field(default_factory=list)  # every timed call, round by round
    loop: str | None = None        # records with the same loop were timed round-robin: sample i in round i
    load1: float | None = None     # highest 1-minute load average read during the loop (None: not recorded)
    cpu_share: float | None = None  # process CPU seconds / wall seconds of the loop / threads
    threads: int | None = None     # torch's intra-op threads during the loop


@dataclass
class RunSettings:
    """What was asked for (after defaults were filled in)."""

    subjects: list[str]
    backends: list[str] | None     # None: every available backend of each subject's primary op
    dtypes: list[str]
    modes: list[str]
    repeats: int
    device: str
    preset: str
    quick: bool
    seed: int
    route: dict[str, str]
    plant: bool
    time_repeats: int
    time_warmup: int
    out: str
    imports: list[str] = field(default_factory=list)  # modules imported to register backends (--import)


@dataclass
class RunResult:
    """Everything one ``detbench run`` measured. ``status`` is complete, interrupted or failed."""

    schema: str
    run_id: str
    started: str
    finished: str | None
    status: str
    stopped_at: str | None         # the cell that was running when an interrupted/failed run stopped
    error: str | None
    command: list[str]
    settings: RunSettings
    environment: Environment
    modes: list[dict[str, Any]]
    backends: list[BackendInfo] = field(default_factory=list)
    subjects: list[SubjectInfo] = field(default_factory=list)
    cells: list[CellRecord] = field(default_factory=list)
    repeats: list[RepeatRecord] = field(default_factory=list)
    batch: list[BatchRecord] = field(default_factory=list)
    accuracy: list[AccuracyRecord] = field(default_factory=list)
    cross: list[CrossRecord] = field(default_factory=list)
    timings: list[TimingRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # combinations not run, with the reason
    # bench.modes.RunEnvironment.to_dict(): the variables read once per process (CUBLAS_WORKSPACE_CONFIG) as
    # they were in force for the whole run; {} in files written before this field
    run_env: dict[str, Any] = field(default_factory=dict)


class ResultFileError(InputError):
    """A results file cannot be read as a detbench result of the expected kind; the message says why."""


def load_result(path: str | os.PathLike, kinds: dict[str, type]) -> Any:
    """Read a result file whose ``schema`` is one of ``kinds`` (schema -> record dataclass) into that record.

    Used by :func:`load_run` and by commands that read several kinds (``detbench compare`` reads run and sft
    results: ``bench.sft`` sits above this module, so it passes its own schema and class)."""
    p = Path(path)
    expected = " or ".join(repr(k) for k in kinds)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ResultFileError(f"no such file: {str(p)!r}; pass a results/*.json written by detbench") from None
    except IsADirectoryError:
        raise ResultFileError(f"{str(p)!r} is a directory; pass a results/*.json written by detbench") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultFileError(f"cannot read {str(p)!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise ResultFileError(f"{str(p)!r} is not JSON ({e}); pass a results/*.json written by detbench") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or schema not in kinds:
        got = schema if isinstance(data, dict) else type(data).__name__
        raise ResultFileError(f"{str(p)!r} is not a detbench {_kind_words(kinds)} result (schema {got!r}, "
                              f"expected {expected})")
    try:
        return from_json(kinds[schema], data, where=p.name)
    except (TypeError, ValueError) as e:
        raise ResultFileError(f"{str(p)!r} does not match schema {schema}: {e}") from None


def _kind_words(kinds: dict[str, type]) -> str:
    """``detbench.run/1`` -> ``run``; several kinds joined with "or"."""
    return " or ".join(dict.fromkeys(k.split(".", 1)[-1].split("/", 1)[0] for k in kinds))


def run_kinds() -> dict[str, type]:
    """Every run schema :func:`load_run` reads, each to :class:`RunResult` (``kinds`` of :func:`load_result`)."""
    return dict.fromkeys(RUN_SCHEMAS, RunResult)


def load_run(path: str | os.PathLike) -> RunResult:
    """Read a ``detbench run`` result file back into typed records."""
    return load_result(path, run_kinds())
