"""Where the Jinja templates and the generated sources live, in a checkout and in an installed copy.

In a source checkout or an editable install (``pip install -e .``) they are the repository's
top-level ``templates/`` and ``generated/`` beside ``codegen/``. A wheel (``pip install .``) ships
them inside the package as ``codegen/templates`` and ``codegen/generated`` (pyproject's
``package-dir`` maps them there), so the first existing candidate wins.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # codegen/ (this file is codegen/build/paths.py)


def _data_dir(name: str) -> Path:
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    return PACKAGE_DIR.parent / name  # a checkout that has not created it yet


TEMPLATES_DIR: Path = _data_dir("templates")
GENERATED_DIR: Path = _data_dir("generated")
