"""What every Triton kernel wrapper shares: where it can run, and input checks with clear errors."""

from __future__ import annotations

import contextlib
import contextvars
import os
from importlib import metadata
from typing import Iterator

import torch

# Read once when the kernels are defined: @triton.jit decides interpreter-or-compiled at definition
# time, so this is the mode the kernels in this process actually run in.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# True only inside recording_launches(), in the context that opened it: kernels.aot's launch recorder,
# which turns every kernel launch into a record, calls the wrappers on meta and CPU tensors there.
_RECORDING: contextvars.ContextVar[bool] = contextvars.ContextVar("kernels_recording_launches", default=False)


@contextlib.contextmanager
def recording_launches() -> Iterator[None]:
    """Within the block, in this context only, :func:`triton_available` (hence :func:`check_device`)
    accepts meta and CPU tensors. For a launch recorder that launches nothing (``kernels.aot``); around
    a real launch it would hand a kernel pointers it cannot read."""
    token = _RECORDING.set(True)
    try:
        yield
    finally:
        _RECORDING.reset(token)


# The compute capability a launch's config is chosen for: on CUDA the device's own; on other devices (the
# CPU interpreter, kernels.aot recording launches on meta and CPU tensors) the one assume_capability()
# set in this context, by default Hopper's.
_ASSUMED_CAPABILITY: contextvars.ContextVar[tuple[int, int]] = contextvars.ContextVar(
    "kernels_assumed_capability", default=(9, 0))


@contextlib.contextmanager
def assume_capability(capability: tuple[int, int]) -> Iterator[None]:
    """Within the block, in this context only, launches on non-CUDA tensors use the configs of a GPU of
    compute capability ``capability`` (major, minor); kernels.aot records each target's launches so.
    CUDA tensors always use their own device's."""
    token = _ASSUMED_CAPABILITY.set(tuple(capability))
    try:
        yield
    finally:
        _ASSUMED_CAPABILITY.reset(token)


def device_capability(device: torch.device) -> tuple[int, int]:
    """The (major, minor) compute capability a launch on ``device`` chooses its config for."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return _ASSUMED_CAPABILITY.get()


def triton_available(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason."""
    try:
        import triton  # noqa: F401  (in here: triton is optional; this probe says whether it is there)
    except ImportError:
        return "package triton not installed (Linux only: pip install triton)"
    if _RECORDING.get() and device.type in ("meta", "cpu"):
        return None
    if device.type == "cuda":
        if INTERPRET:
            return "kernels were defined under TRITON_INTERPRET=1 (CPU interpreter); unset it to run on CUDA"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device.type == "cpu":
        if INTERPRET:
            return interpreter_conflict(_version("triton"), _version("numpy"))
        return "needs a CUDA device, or TRITON_INTERPRET=1 set before start-up to use the (slow) CPU interpreter"
    return f"no Triton support for device type {device.type!r}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "0"


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit()) if p[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def interpreter_conflict(triton_version: str, numpy_version: str) -> str | None:
    """Triton's CPU interpreter before 3.7 breaks on numpy 2.4 and later (it converts arrays of one
    element to scalars, which numpy 2.4 no longer does): the reason, or None."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s CPU interpreter breaks on numpy {numpy_version}: "
                "pip install 'numpy<2.4', or triton >= 3.7")
    return None


def check_device(*tensors: torch.Tensor, op: str) -> None:
    """Raise a clear error when the tensors cannot be handed to a Triton kernel here."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"{op}: all tensors must be on one device, got {dev} and {t.device}")
    reason = triton_available(dev)
    if reason is not None:
        raise RuntimeError(f"{op} (triton) cannot run on {dev}: {reason}")


def register_twins(registry, op: str, deterministic, atomic, *, det_description: str,
                   atomic_description: str) -> None:
    """Register ``op``/triton (deterministic) and ``op``/triton-atomic, each naming the other as its twin."""
    for name, fn, det, twin, text in (("triton", deterministic, True, "triton-atomic", det_description),
                                      ("triton-atomic", atomic, False, "triton", atomic_description)):
        registry.register(op, name, fn, available=triton_available, deterministic=det, twin=twin,
                          origin="built-in", description=text)
