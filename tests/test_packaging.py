"""Packaging: the data dirs are found, pyproject lists every package, a wheel ships the templates."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from codegen.build import paths

ROOT = Path(__file__).resolve().parents[1]


def test_templates_dir_is_found() -> None:
    assert paths.TEMPLATES_DIR.is_dir(), paths.TEMPLATES_DIR
    assert (paths.TEMPLATES_DIR / "grouped_mm.cu.j2").is_file()
    assert paths.GENERATED_DIR.name == "generated" and paths.GENERATED_DIR.parent.is_dir()


def test_pyproject_lists_every_package() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("mxfp4", "codegen")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages"
    assert config["project"]["scripts"]["hopper-mxfp4"] == "codegen.__main__:main"
    assert {"gpu"} <= {marker.split(":")[0] for marker in config["tool"]["pytest"]["ini_options"]["markers"]}


def test_wheel_ships_templates_inside_codegen(built_wheel: Path) -> None:
    wheel = built_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "codegen/build/paths.py" in names and "mxfp4/ops/grouped_gemm.py" in names
    templates = {path for path in (ROOT / "templates").rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    for template in templates:
        assert "codegen/templates/" + template.relative_to(ROOT / "templates").as_posix() in names
    # The shipped tuning table sits one folder down in generated/: the op reads it at call time.
    assert "codegen/generated/tuning/h100.json" in names and "codegen/generated/manifest.json" in names
