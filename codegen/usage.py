"""The command line's one error type, shared by every verb (``codegen.__main__``, ``codegen.tune_cli``)."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad command line or config selection: the verb prints the message and exits 2."""
