"""detbench's Triton kernels: deterministic by construction, each with a nondeterministic twin.

``__detbench__`` marks this package as detbench's own: PyPI has an unrelated package also called
``kernels``, and the CLI refuses to run if ``import kernels`` finds that one instead.

One file per op. Each module's ``register(registry)`` adds its ``triton`` / ``triton-atomic``
entries to the backend registry; :func:`register_backends` is called by the registry on first use.
"""

import importlib

__detbench__ = True

KERNEL_MODULES = ("attention", "rmsnorm", "swiglu", "rope", "matmul", "cross_entropy")


def register_backends(registry) -> None:
    for name in KERNEL_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(registry)
