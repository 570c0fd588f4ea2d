"""``python -m codegen`` and the ``hopper-mxfp4`` console script: the verbs live in :mod:`codegen.cli`."""

from __future__ import annotations

import sys

from .cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
