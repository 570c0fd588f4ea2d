"""Shared test helpers: the SM90 skip, a fresh random seed, a clean path-selection cache and fallback cache, and the
project built once as a wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mxfp4.ops.dispatch import is_sm90
from background_builds import (  # noqa: F401
    compiled_kernels, copy_roof_kernels, portable_kernels_built, schedule as schedule_builds,
)


def has_sm90() -> bool:
    return is_sm90()


# Use as a decorator (``@requires_sm90_mark``) or request the ``requires_sm90`` fixture.
requires_sm90_mark = pytest.mark.skipif(not has_sm90(), reason="needs an SM90 (Hopper) GPU")


@pytest.fixture
def requires_sm90() -> None:
    """Skip the test unless torch sees a CUDA device of compute capability 9.0."""
    if not has_sm90():
        pytest.skip("needs an SM90 (Hopper) GPU")


@pytest.hookimpl(trylast=True)  # after -k/-m have deselected: only the tests that run count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip (not fail) on machines without an SM90 GPU. The tests that read a kernel build run
    last, the build in the background meanwhile (tests/background_builds.py)."""
    if not config.option.collectonly:
        schedule_builds(items)
    if has_sm90():
        return
    skip = pytest.mark.skip(reason="gpu test: needs an SM90 (Hopper) GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    """Fresh random data every run, reproducible: the seed is in the test's failure messages."""
    value = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    torch.manual_seed(value)
    return value


@pytest.fixture(autouse=True)
def _fresh_path_cache():
    """Each test decides its path anew (tests may monkeypatch capability or toolchain or force the fallback)."""
    from codegen.runtime.dependent_launch import set_dependent_launch
    from mxfp4.experts import graphs as moe_graphs
    from mxfp4.ops import dispatch
    from mxfp4.portable import weight_cache

    dispatch.reset_cache()
    dispatch.choose_config.cache_clear()
    yield
    dispatch._forced = None  # undo dispatch.force_portable(...)
    dispatch.reset_cache()
    dispatch.choose_config.cache_clear()
    weight_cache.set_fallback_memory_budget(None)  # and the fallback's cache: no entry outlives its test
    weight_cache.clear()
    moe_graphs.set_moe_graphs(None)  # and the MoE layer's graphs
    moe_graphs.clear()
    set_dependent_launch(None)  # and programmatic dependent launch (the environment's setting again)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as a wheel, built once for the session from a copy of the sources (setuptools writes build/ and
    *.egg-info in place): the packaging tests read it, and the bench test runs from it outside a checkout."""
    pytest.importorskip("setuptools")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "results")
    for name in ("mxfp4", "codegen", "templates", "generated", "benchmarks"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(work), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = work.glob("hopper_mxfp4-*.whl")
    return wheel
