"""The one exception type for bad input, at the bottom of ``bench/``.

Library code raises :class:`InputError` (or a subclass: ``bench.sft.SFTError``,
``bench.data.DataError``, ``bench.results.OutDirError`` ...) when a setting cannot be used; the message
names the problem and the fix. ``bench.cli`` prints it as one line and exits with status 2; Python
callers catch it like any ``ValueError``.
"""

from __future__ import annotations


class InputError(ValueError):
    """A setting or input that cannot be used; the message says which and how to fix it."""
