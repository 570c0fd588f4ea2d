"""Write the rendered sources of tile configs to a directory (``generated/``), or check them.

``generate(configs, out_dir)`` writes ``<config.name>.cu`` per config and ``manifest.json``:
the configs (name, fields, file, sha256 of the source), the sha256 of every file under
``templates/`` and the nvidia-cutlass version. The manifest is deterministic (no timestamps), so
``check(configs, out_dir)`` can compare byte for byte and a stale directory is a diff in review.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .cache import (  # the manifest's template hashes: every file, .j2 included
    sha256_text,
    template_hashes,
)
from .config import TileConfig

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
SOURCE_SUFFIX = ".cu"


def _default_out_dir() -> Path:
    from .paths import GENERATED_DIR

    return Path(GENERATED_DIR)


def _cutlass_version() -> str | None:
    try:
        return importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        return None


def _unique(configs: Iterable[TileConfig]) -> list[TileConfig]:
    seen: dict[str, TileConfig] = {}
    for config in configs:
        config.validate()
        seen.setdefault(config.name, config)
    return list(seen.values())


def render_all(configs: Iterable[TileConfig]) -> dict[str, str]:
    """``{file name: rendered source}`` in selection order."""
    from .render import render

    return {config.name + SOURCE_SUFFIX: render(config) for config in _unique(configs)}


def build_manifest(configs: Iterable[TileConfig], sources: dict[str, str]) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "generator": "python -m codegen generate",
        "nvidia_cutlass": _cutlass_version(),
        "templates": template_hashes(),
        "configs": [
            {
                "name": config.name,
                "file": config.name + SOURCE_SUFFIX,
                "fields": config.as_dict(),
                "sha256": sha256_text(sources[config.name + SOURCE_SUFFIX]),
            }
            for config in _unique(configs)
        ],
    }


def _manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def _expected(configs: Iterable[TileConfig]) -> dict[str, str]:
    """Every file the directory should hold: ``{file name: text}``."""
    configs = _unique(configs)
    sources = render_all(configs)
    return {**sources, MANIFEST: _manifest_text(build_manifest(configs, sources))}


def _write_atomic(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="\n") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _previous_files(out_dir: Path) -> set[str]:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        return {entry["file"] for entry in manifest.get("configs", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def generate(configs: Iterable[TileConfig], out_dir: Path | str | None = None, *, prune: bool = True) -> list[Path]:
    """Write the sources and the manifest; return the files that changed (written or removed).

    Files are only rewritten when their contents change. With ``prune``, sources that the previous
    manifest listed but this selection does not are removed (other files are never touched).
    """
    directory = Path(out_dir) if out_dir is not None else _default_out_dir()
    expected = _expected(configs)
    directory.mkdir(parents=True, exist_ok=True)
    changed: list[Path] = []
    stale_previous = _previous_files(directory) - set(expected) if prune else set()
    for name, text in expected.items():
        path = directory / name
        try:
            if path.read_text() == text:
                continue
        except OSError:
            pass
        _write_atomic(path, text)
        changed.append(path)
    for name in sorted(stale_previous):
        path = directory / name
        if path.suffix == SOURCE_SUFFIX and path.is_file():
            path.unlink()
            changed.append(path)
    return changed


def _manifest_differences(actual_text: str, expected_text: str) -> str:
    try:
        actual = json.loads(actual_text)
    except ValueError:
        return "not valid JSON"
    expected = json.loads(expected_text)
    if not isinstance(actual, dict):
        return "not a JSON object"
    keys = sorted(key for key in set(actual) | set(expected) if actual.get(key) != expected.get(key))
    details = []
    for key in keys:
        if key == "templates":
            old, new = actual.get(key) or {}, expected.get(key) or {}
            files = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
            details.append(f"templates changed: {', '.join(files)}")
        elif key == "nvidia_cutlass":
            details.append(f"nvidia-cutlass {actual.get(key)} -> {expected.get(key)}")
        else:
            details.append(f"{key} differs")
    return "; ".join(details) or "formatting differs"


def check(configs: Iterable[TileConfig], out_dir: Path | str | None = None) -> list[str]:
    """Differences between ``out_dir`` and what ``generate`` would write; empty when up to date.

    Each entry is one sentence: ``missing: X.cu``, ``stale: X.cu (...)``, ``extra: Y.cu (...)``.
    """
    directory = Path(out_dir) if out_dir is not None else _default_out_dir()
    expected = _expected(configs)
    differences: list[str] = []
    for name, text in expected.items():
        path = directory / name
        try:
            actual = path.read_text()
        except FileNotFoundError:
            differences.append(f"missing: {name}")
            continue
        if actual != text:
            if name == MANIFEST:
                differences.append(f"stale: {name} ({_manifest_differences(actual, text)})")
            else:
                differences.append(f"stale: {name} (differs from the rendered source)")
    if directory.is_dir():
        for path in sorted(directory.glob("*" + SOURCE_SUFFIX)):
            if path.name not in expected:
                differences.append(f"extra: {path.name} (not one of the selected configs)")
    return differences
