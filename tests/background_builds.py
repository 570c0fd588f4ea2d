"""Kernel builds the CPU tests read, started in the background as soon as collection is over.

A cold machine compiles the SM90 configs under test (NVRTC, a few CPU-seconds each) and the portable Triton kernel
for six GPU generations (about 40 CPU-seconds) before the tests that check them can run. ``schedule`` moves the tests
that request one of the fixtures below to the end of the run and starts each build they need in its own process
group at nice 19: it runs on the cores the other tests leave idle, gives them back whenever a test wants them, and
gets its priority back once the tests wait for it. Each build only fills a cache (the project's cubin cache, Triton's
cache); the fixture then reads through that cache, so whatever a build did not leave there (a failure, a build that
did not run) is built again in the test's own process, with its error. With warm caches a build only looks up.

- ``compiled_kernels``: ``python -m codegen compile`` of ``configs_under_test()`` (the project's parallel
  ``compile_many``), then ``{config name: CompiledKernel or the exception its compile raised}``.
- ``copy_roof_kernels``: :func:`compile_copy_roof_builds`, the copy-only diagnostic builds (alone and with the wait
  probe) of the same configs, ``{(config name, cache-key suffix): CompiledKernel or the exception}``.
- ``portable_kernels_built``: test_portable_kernel.compile_every_kernel() in Triton's cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
WAIT_SECONDS = 900  # far above a cold build on two cores; a hung build must not hang the suite


class _State:
    """The session's background builds (fixture name -> process) and the cubin cache they fill."""

    running: dict[str, subprocess.Popen] = {}
    cubin_cache: Path | None = None


def configs() -> list:
    from codegen.tune.selection import configs_under_test

    return configs_under_test()


def _cubin_cache() -> Path:
    """The cubin cache, or a directory for this session when the cache cannot be written (the results would be lost)."""
    if _State.cubin_cache is None:
        from codegen.build import cache

        if cache.unusable_reason() is None:
            _State.cubin_cache = cache.cache_dir()
        else:
            _State.cubin_cache = Path(tempfile.mkdtemp(prefix="hopper-mxfp4-test-cache-"))
            atexit.register(shutil.rmtree, _State.cubin_cache, ignore_errors=True)
    return _State.cubin_cache


def _sm90_command() -> list[str] | None:
    from codegen.build.toolchain import check_toolchain

    if not check_toolchain().ok:
        return None  # the tests skip
    command = [sys.executable, "-m", "codegen", "compile", "--no-sass", "-q"]
    for config in configs():
        command += ["--config", config.name]
    return command


# The copy roof's builds `bench waits` loads (codegen.runtime.launch.diagnostic_build's flags).
COPY_ROOF_BUILDS = ({"copy_only": True}, {"copy_only": True, "wait_probe": True})


def compile_copy_roof_builds(cache_dir: Path | None = None) -> dict[tuple[str, str], object]:
    """Every config under test in each of COPY_ROOF_BUILDS: ``{(config name, suffix): CompiledKernel or exception}``."""
    from codegen.build.compiler import compile_many
    from codegen.runtime.launch import diagnostic_build

    every, results = configs(), {}
    for flags in COPY_ROOF_BUILDS:
        options, suffix = diagnostic_build(**flags)
        kernels = compile_many(every, progress=False, cache_dir=cache_dir, options=options)
        results.update({(config.name, suffix): kernel for config, kernel in zip(every, kernels)})
    return results


def _copy_roof_command() -> list[str] | None:
    command = _sm90_command()
    return None if command is None else [sys.executable, "-c",
                                         "import background_builds; background_builds.compile_copy_roof_builds()"]


def _triton_command() -> list[str] | None:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return None  # the test skips
    return [sys.executable, "-c", "import test_portable_kernel; test_portable_kernel.compile_every_kernel()"]


BUILDS: dict[str, Callable[[], list[str] | None]] = {
    "compiled_kernels": _sm90_command,
    "copy_roof_kernels": _copy_roof_command,
    "portable_kernels_built": _triton_command,
}


def _in_background() -> None:
    """In the child before exec: its own process group (stop() and wait_for() reach its workers), in the session of
    the tests (a new session would be a scheduling group of its own, where nice means nothing next to the tests),
    at nice 19."""
    os.setpgid(0, 0)
    os.nice(19)


def _start(command: list[str]) -> subprocess.Popen:
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    environment = dict(os.environ, HOPPER_MXFP4_CACHE=str(_cubin_cache()), PYTHONPATH=path.rstrip(os.pathsep))
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=_in_background)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def _stop_all() -> None:
    for process in _State.running.values():
        _stop(process)


def schedule(items: list[pytest.Item]) -> None:
    """Run the tests that read a background build last, and start the builds they need (once per session)."""
    needed = {name for item in items for name in getattr(item, "fixturenames", ()) if name in BUILDS}
    if not needed or _State.running:
        return
    users = [item for item in items if not needed.isdisjoint(getattr(item, "fixturenames", ()))]
    chosen = set(map(id, users))
    items[:] = [item for item in items if id(item) not in chosen] + users
    for name in sorted(needed):
        command = BUILDS[name]()
        if command is not None:
            _State.running[name] = _start(command)
    atexit.register(_stop_all)  # a session stopped early (-x, Ctrl-C) leaves no build behind


def wait_for(name: str) -> None:
    """Wait for the background build ``name`` (if one runs), at the tests' priority from now on."""
    process = _State.running.get(name)
    if process is None:
        return
    try:  # lowering a nice value needs the privilege; without it the build keeps nice 19 (idle cores still run it)
        os.setpriority(os.PRIO_PGRP, process.pid, os.getpriority(os.PRIO_PROCESS, 0))
    except OSError:
        pass
    try:
        process.wait(timeout=WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        _stop(process)


@pytest.fixture(scope="session")
def compiled_kernels() -> dict[str, object]:
    """``{config name: CompiledKernel or the exception its compile raised}`` for every config under test."""
    from codegen.build.compiler import compile_many

    wait_for("compiled_kernels")
    every = configs()
    results = compile_many(every, progress=False, cache_dir=_cubin_cache())
    return dict(zip((config.name for config in every), results))


@pytest.fixture(scope="session")
def copy_roof_kernels() -> dict[tuple[str, str], object]:
    """:func:`compile_copy_roof_builds` through the cubin cache the background build filled."""
    wait_for("copy_roof_kernels")
    return compile_copy_roof_builds(_cubin_cache())


@pytest.fixture(scope="session")
def portable_kernels_built() -> None:
    """Triton's cache holds the portable kernels test_portable_kernel compiles (or they compile in the test)."""
    wait_for("portable_kernels_built")
