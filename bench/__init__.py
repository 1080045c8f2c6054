"""detbench's harness: the measurement library (inputs, checks, timing, results, pinpoint) under ``bench.cli``.

``bench.batch_invariant`` is :func:`bench.invariant.batch_invariant`, the batch-invariant mode::

    import bench
    with bench.batch_invariant():
        ...
"""


def __getattr__(name: str):
    # Loaded on first use, not at ``import bench``: the command line imports this package before it can turn
    # a Ctrl-C during ``import torch`` into one line (bench.cli.common), and the mode imports torch.
    if name == "batch_invariant":
        from bench.invariant import batch_invariant  # in here: see above

        return batch_invariant
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
