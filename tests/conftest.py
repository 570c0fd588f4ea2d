"""Shared test helpers: the SM90 skip, a fresh random seed, a clean path-selection cache and fallback cache."""

from __future__ import annotations

import os

import pytest
import torch

from mxfp4.dispatch import is_sm90


def has_sm90() -> bool:
    return is_sm90()


# Use as a decorator (``@requires_sm90_mark``) or request the ``requires_sm90`` fixture.
requires_sm90_mark = pytest.mark.skipif(not has_sm90(), reason="needs an SM90 (Hopper) GPU")


@pytest.fixture
def requires_sm90() -> None:
    """Skip the test unless torch sees a CUDA device of compute capability 9.0."""
    if not has_sm90():
        pytest.skip("needs an SM90 (Hopper) GPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip (not fail) on machines without an SM90 GPU."""
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
    from mxfp4 import dispatch, moe_graphs, weight_cache

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
