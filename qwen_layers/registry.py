"""The one table of implementations: every op, every backend.

An *op* is one step of a Qwen block with a fixed calling convention (see ``OPS``). A *backend* is one
implementation of an op under a name (``eager``, ``sdpa-flash``, ``triton`` ...). The model, the
harness, the CLI and the tests all iterate over this table; adding an implementation is one call to
:func:`register`.

Nothing here falls back silently: :func:`resolve` either returns the implementation you named or
raises :class:`BackendUnavailable` with the reason it cannot run on the device you asked for.

Built-in entries are loaded lazily the first time the table is read (no work at import time):
``qwen_layers.backends`` (PyTorch / flash-attn) and ``kernels`` (detbench's Triton kernels, when that
package provides ``register_backends``), then every installed entry point of the group
``detbench.backends`` (:data:`ENTRY_POINT_GROUP`), so a package's kernels appear wherever the table is
read - ``detbench list``, the harness, the model - with nothing to import by hand. An entry point names
a module, whose import registers its backends, or a callable, called with the registry::

    # a kernel package's pyproject.toml
    [project.entry-points."detbench.backends"]
    mykernels = "mykernels.detbench"                   # a module: importing it registers
    more = "mykernels.detbench:register_backends"      # a callable: register_backends(registry)

An entry point that fails to load raises :class:`PluginLoadError` naming it and the package that
installed it, on that read and on every later one (nothing falls back to a table without it).

Observing calls. Tools that need to see every call routed through the table (``detbench pinpoint``
replays each one) do not patch it; they open :func:`observe`::

    def observer(fn, op, name):            # called by resolve(); returns what resolve() hands out
        def call(*args, **kwargs):
            print("calling", op, name)
            return fn(*args, **kwargs)
        return call

    with registry.observe(observer):
        model(ids)                         # every resolve() in this block returns observer(fn, op, name)

The observer lives in a :class:`contextvars.ContextVar`: it applies to :meth:`Registry.resolve` of
every :class:`Registry` (so ``registry.resolve(...)`` and ``REGISTRY.resolve(...)`` alike), only in the
context that opened the block - other threads, and threads started inside the block, resolve
unobserved - and only until the block ends (reset in ``finally``). Blocks nest: an inner observer
receives what the outer one returned. ``Backend.fn`` read directly (``get(op, name).fn``) is the raw
implementation, never observed. The table itself is not changed.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.metadata
import threading
import types
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

# op name -> calling convention, shown by `detbench list --json` and in errors.
OPS: dict[str, str] = {
    "attention": "fn(q, k, v, *, scale, causal=True, attn_mask=None) -> o; q (B,Hq,S,D), k/v (B,Hkv,S,D), "
                 "attn_mask bool (B,1,Sq,Sk) True=attend (already includes causality), o (B,Hq,S,D)",
    "rmsnorm": "fn(x, weight, eps) -> y; normalised over the last dim",
    "rope": "fn(q, k, cos, sin) -> (q_rot, k_rot); q/k (B,H,S,D), cos/sin (B,S,D), rotate-half convention",
    "swiglu": "fn(gate, up) -> silu(gate) * up",
    "linear": "fn(x, weight, bias=None) -> x @ weight.T + bias",
    "embedding": "fn(ids, weight) -> weight[ids]",
    "loss": "fn(logits (N,V), labels (N,), ignore_index=-100) -> mean cross entropy over non-ignored rows",
}

# Providers of built-in entries, imported on first use of the table.
_PROVIDERS = ("qwen_layers.backends", "kernels")

# Installed packages register backends through entry points of this group (loaded after the providers).
ENTRY_POINT_GROUP = "detbench.backends"

# Said after every unknown backend name: a backend registered by the user's own module exists only once that
# module is imported, which the command line does with --import (bench.plugins).
IMPORT_HINT = " (a backend your own module registers exists once that module is imported: --import MODULE)"


class BackendError(ValueError):
    """Base class for registry lookup errors."""


class UnknownBackend(BackendError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class BackendUnavailable(BackendError, RuntimeError):
    """The named backend exists but cannot run here; the message says why."""


class PluginLoadError(BackendError, RuntimeError):
    """An installed ``detbench.backends`` entry point failed to load; the message names it, the package that
    installed it and the fix."""


Availability = Callable[[torch.device], "str | None"]

# observer(fn, op, name) -> the callable resolve() returns instead of fn; see observe().
Observer = Callable[[Callable, str, str], Callable]
_OBSERVER: contextvars.ContextVar[Observer | None] = contextvars.ContextVar("qwen_layers_registry_observer",
                                                                           default=None)


def _always(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``available(device)`` returns ``None`` when it can run on that device, otherwise a short reason
    ("needs a CUDA device", "package flash_attn not installed"). ``deterministic`` is the claim the
    implementation makes (``True``/``False``/``None`` for "depends"); the harness measures it.
    ``twin`` names the backend of the same op that differs only in using atomics, if any.
    """

    op: str
    name: str
    fn: Callable = field(repr=False)
    available: Availability = field(default=_always, repr=False)
    deterministic: bool | None = None
    description: str = ""
    twin: str | None = None
    origin: str = "third-party"

    def why_not(self, device: torch.device | str | None = None) -> str | None:
        device = torch.device("cpu") if device is None else torch.device(device)
        try:
            return self.available(device)
        except Exception as e:  # a broken probe is itself a reason
            return f"availability check failed: {type(e).__name__}: {e}"

    def is_available(self, device: torch.device | str | None = None) -> bool:
        return self.why_not(device) is None


# Characters the command line uses to separate backend names: --backends a,b (comma-separated), --route
# OP=BACKEND, --plant MODULE=op/backend. A name containing one (or whitespace) could never be chosen.
_NAME_SEPARATORS = ",=/"


def check_name(name: object) -> None:
    """Refuse a backend name the command line could never select (``ValueError`` saying why)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    bad = sorted({c for c in name if c in _NAME_SEPARATORS or c.isspace()})
    if bad:
        raise ValueError(
            f"backend name {name!r} contains {' '.join(repr(c) for c in bad)}; names cannot contain ',', '=', '/' "
            f"or whitespace because the command line lists backends comma-separated (--backends a,b), as "
            f"OP=BACKEND (--route) and as op/backend (--plant); choose a name like 'my-kernel'"
        )


class Registry:
    """Mapping (op, name) -> Backend. Use the module-level :data:`REGISTRY`."""

    def __init__(self, providers: Iterable[str] = (), entry_points: str | None = None) -> None:
        """``providers``: modules imported on first use (their ``register_backends(registry)`` is called);
        ``entry_points``: an entry-point group whose entries are loaded after them (see the module docstring)."""
        self._table: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
        self._providers = tuple(providers)
        self._entry_points = entry_points
        self._loaded = False
        self._load_error: PluginLoadError | None = None
        self._lock = threading.RLock()

    # -- loading ------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            if self._load_error is not None:
                raise self._load_error
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True  # set first: providers call register() which re-enters
            for modname in self._providers:
                try:
                    mod = importlib.import_module(modname)
                except ImportError as e:
                    if getattr(e, "name", None) == modname:
                        continue
                    raise
                hook = getattr(mod, "register_backends", None)
                if hook is not None:
                    hook(self)
            if self._entry_points is not None:
                self._load_entry_points(self._entry_points)

    def _load_entry_points(self, group: str) -> None:
        """Load every installed entry point of ``group``, in name order: a module is imported (its import
        registers), a callable is called with this registry. The first failure is kept and raised."""
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda ep: (ep.name, ep.value)):
            try:
                obj = ep.load()
                if not isinstance(obj, types.ModuleType):
                    if not callable(obj):
                        raise TypeError(f"{ep.value} is a {type(obj).__name__}, neither a module nor a callable")
                    obj(self)
            except Exception as e:
                dist = getattr(ep, "dist", None)
                by = f", installed by {dist.name} {dist.version}" if dist is not None else ""
                fix = f"pip uninstall {dist.name}" if dist is not None else "uninstall the package that declares it"
                text = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self._load_error = PluginLoadError(
                    f"entry point {ep.name} = {ep.value} (group {group}{by}) failed to load: "
                    f"{type(e).__name__}{': ' + text if text else ''}; fix that package or remove it ({fix})")
                raise self._load_error from e

    # -- writing ------------------------------------------------------------------------------
    def register(
        self,
        op: str,
        name: str,
        fn: Callable | None = None,
        *,
        available: Availability | None = None,
        deterministic: bool | None = None,
        description: str = "",
        twin: str | None = None,
        origin: str = "third-party",
        replace: bool = False,
    ):
        """Register ``fn`` as backend ``name`` of ``op``. Usable as a decorator when ``fn`` is omitted.

        Re-registering an existing name raises unless ``replace=True``.
        """
        if op not in OPS:
            raise UnknownBackend(f"unknown op {op!r}; ops are: {', '.join(OPS)}")
        check_name(name)

        def add(f: Callable) -> Callable:
            if not callable(f):
                raise TypeError(f"backend {op}/{name}: implementation must be callable, got {type(f).__name__}")
            self._ensure_loaded()
            with self._lock:
                if name in self._table[op] and not replace:
                    raise ValueError(
                        f"backend {op}/{name} is already registered; pass replace=True to override it "
                        f"or choose another name"
                    )
                self._table[op][name] = Backend(
                    op=op, name=name, fn=f, available=available or _always,
                    deterministic=deterministic, description=description, twin=twin, origin=origin,
                )
            return f

        return add if fn is None else add(fn)

    def unregister(self, op: str, name: str) -> None:
        self._ensure_loaded()
        with self._lock:
            self.get(op, name)
            del self._table[op][name]

    @contextlib.contextmanager
    def scoped(self) -> Iterator["Registry"]:
        """Registrations made inside the block are undone when it ends (in ``finally``).

        The table is restored to what it was on entry: backends registered in the block are removed,
        replaced or unregistered ones come back. Scopes nest. Used for the planted negative controls,
        the float64 reference route and tests::

            with REGISTRY.scoped():
                REGISTRY.register("rmsnorm", "mine", my_rmsnorm)
                ...                      # "rmsnorm/mine" exists here
            # and is gone here
        """
        self._ensure_loaded()
        with self._lock:
            saved = {op: dict(entries) for op, entries in self._table.items()}
        try:
            yield self
        finally:
            with self._lock:
                for op, entries in saved.items():
                    self._table[op] = entries

    # -- reading ------------------------------------------------------------------------------
    def ops(self) -> list[str]:
        return list(OPS)

    def names(self, op: str) -> list[str]:
        self._ensure_loaded()
        self._check_op(op)
        return list(self._table[op])

    def backends(self, op: str | None = None) -> list[Backend]:
        self._ensure_loaded()
        if op is None:
            return [b for o in OPS for b in self._table[o].values()]
        self._check_op(op)
        return list(self._table[op].values())

    def get(self, op: str, name: str) -> Backend:
        self._ensure_loaded()
        self._check_op(op)
        try:
            return self._table[op][name]
        except KeyError:
            raise UnknownBackend(
                f"unknown backend {name!r} for op {op!r}; registered: {', '.join(self._table[op]) or '(none)'}"
                f"{IMPORT_HINT}"
            ) from None

    def resolve(self, op: str, name: str, device: torch.device | str | None = None) -> Callable:
        """The implementation of ``op`` called ``name``, or :class:`BackendUnavailable` with the reason.

        Inside an :func:`observe` block, what the observer makes of it.
        """
        b = self.get(op, name)
        reason = b.why_not(device)
        if reason is not None:
            dev = torch.device("cpu") if device is None else torch.device(device)
            raise BackendUnavailable(f"{op} backend {name!r} cannot run on {dev}: {reason}")
        observer = _OBSERVER.get()
        return b.fn if observer is None else observer(b.fn, op, name)

    def available(self, op: str, device: torch.device | str | None = None) -> list[str]:
        return [b.name for b in self.backends(op) if b.is_available(device)]

    def _check_op(self, op: str) -> None:
        if op not in OPS:
            raise UnknownBackend(f"unknown op {op!r}; ops are: {', '.join(OPS)}")


REGISTRY = Registry(_PROVIDERS, entry_points=ENTRY_POINT_GROUP)

# Module-level shorthands.
register = REGISTRY.register
unregister = REGISTRY.unregister
scoped = REGISTRY.scoped
get = REGISTRY.get
resolve = REGISTRY.resolve
backends = REGISTRY.backends
names = REGISTRY.names


@contextlib.contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Within the block, in this context only, :meth:`Registry.resolve` returns ``observer(fn, op, name)``
    instead of the implementation ``fn`` (see the module docstring). Inside another ``observe`` block,
    ``observer`` receives what the outer observer returned."""
    outer = _OBSERVER.get()
    if outer is None:
        current = observer
    else:
        def current(fn: Callable, op: str, name: str) -> Callable:
            return observer(outer(fn, op, name), op, name)
    token = _OBSERVER.set(current)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def check_choice(choice: dict[str, str] | None) -> dict[str, str]:
    """Validate a per-op backend choice ({op: name}); missing ops default to ``eager``."""
    out = {op: "eager" for op in OPS}
    for op, name in (choice or {}).items():
        REGISTRY.get(op, name)  # raises UnknownBackend with the valid names
        out[op] = name
    return out
