"""The exceptions every layer of ``bench/`` shares, at its bottom: bad input, a failed save, SIGTERM.

Library code raises :class:`InputError` (or a subclass: ``bench.sft.SFTError``,
``bench.data.DataError``, ``bench.results.OutDirError`` ...) when a setting cannot be used; the message
names the problem and the fix. ``bench.cli`` prints it as one line and exits with status 2; Python
callers catch it like any ``ValueError``.
"""

from __future__ import annotations


class InputError(ValueError):
    """A setting or input that cannot be used; the message says which and how to fix it."""


class SaveError(OSError):
    """A finished result could not be written (disk full, folder removed ...). The message names the file
    and the reason; nothing partial is left in its place (the temporary file is removed)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises ``KeyboardInterrupt``: the same code saves finished work,
    marked interrupted. ``bench.cli`` installs the handler for the duration of a command."""
