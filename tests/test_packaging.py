"""Packaging: the data dirs are found, pyproject lists every package, a wheel ships the templates."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from codegen import paths

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


def test_wheel_ships_templates_inside_codegen(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info in place
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("mxfp4", "codegen", "templates", "generated", "benchmarks"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("hopper_mxfp4-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "codegen/paths.py" in names and "mxfp4/ops.py" in names
    templates = {path for path in (ROOT / "templates").rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    for template in templates:
        assert "codegen/templates/" + template.relative_to(ROOT / "templates").as_posix() in names
    # The shipped tuning table sits one folder down in generated/: the op reads it at call time.
    assert "codegen/generated/tuning/h100.json" in names and "codegen/generated/manifest.json" in names
