"""detbench's Triton kernels (deterministic, each with an atomic twin).

``__detbench__`` marks this package as detbench's own: PyPI has an unrelated package also called
``kernels``, and the CLI refuses to run if ``import kernels`` finds that one instead.
"""

__detbench__ = True


def register_backends(registry) -> None:
    """Add the Triton kernels to the registry (none yet)."""
