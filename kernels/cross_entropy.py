"""Triton cross_entropy kernel (deterministic) and its atomic twin. Not written yet."""


def register(registry) -> None:
    """Add this op's triton / triton-atomic entries to the registry (none yet)."""
