"""CUDA C++ source -> sm_90a cubin with NVRTC, through the disk cache.

``compile_source`` compiles any source; ``compile_kernel`` renders a TileConfig first
(``codegen.build.render.render``) and compiles that; ``compile_many`` does many configs in a process
pool. Compiling needs no GPU.

Options: ``default_options(arch)`` (``--gpu-architecture=sm_90a -std=c++17 -default-device
-DNDEBUG``, no fast math so the kernel stays exact, ``--ptxas-options=-v`` for the resource
report), then the caller's extra options, then ``-I`` for the project's ``templates/`` and the
CuTe/CUTLASS, CCCL and CUDA headers found by ``codegen.build.toolchain``.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from . import cache
from .cuda_result import as_text, unwrap
from .render import ENTRY_POINT, render
from .toolchain import ToolchainError, check_toolchain

if TYPE_CHECKING:
    from .config import TileConfig
    from .sass import SassSummary

DEFAULT_ARCH = "sm_90a"
ELF_MAGIC = b"\x7fELF"


class CompileError(RuntimeError):
    """NVRTC rejected the source (or could not run). ``log`` is NVRTC's program log."""

    def __init__(self, message: str, log: str = "", name: str = ""):
        super().__init__(message, log, name)
        self.message = message
        self.log = log
        self.name = name

    def __str__(self) -> str:
        if not self.log:
            return self.message
        return f"{self.message}\n{self.log.rstrip()}"


@dataclass(frozen=True)
class Resources:
    """ptxas's report for the entry function. ``smem_bytes`` is *static* shared memory only
    (the grouped GEMM's pipeline is dynamic shared memory, sized by the launcher)."""

    registers: int = 0
    """Registers per thread (``Used N registers``)."""
    smem_bytes: int = 0
    """Static shared memory (``N bytes smem``); the pipeline's dynamic part is not in it."""
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    """The stack frame; with the spills, from ``N bytes stack frame, N bytes spill stores, ...``."""
    barriers: int = 0
    cmem_bytes: int = 0
    """Constant bank 0 (``N bytes cmem[0]``): the kernel's parameters among it."""

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclass(frozen=True)
class CompiledKernel:
    """A cubin and what is known about it.

    ``compile_seconds`` is the time NVRTC took when the cubin was built (also on a cache hit, where
    it was read from the cache entry); ``cache_hit`` says whether this call compiled at all.
    ``ptxas_notes`` are ptxas's warnings and performance notes (for example serialized wgmma).
    """

    name: str
    cubin: bytes
    resources: Resources
    compile_seconds: float
    log: str
    cache_hit: bool
    entry: str = ENTRY_POINT
    arch: str = DEFAULT_ARCH
    key: str = ""
    options: tuple[str, ...] = ()
    ptxas_notes: tuple[str, ...] = ()
    cache_path: str = ""

    def sass(self) -> "SassSummary":
        """SASS summary (needs cuobjdump + nvdisasm; raises codegen.build.sass.SassUnavailable otherwise).

        Kept beside the cubin in its cache entry, so it is computed once per cubin.
        """
        from .sass import summarize_cubin_cached

        return summarize_cubin_cached(self.cubin, Path(self.cache_path) if self.cache_path else None)

    def __repr__(self) -> str:
        return (
            f"CompiledKernel(name={self.name!r}, entry={self.entry!r}, cubin={len(self.cubin)} bytes, "
            f"resources={self.resources}, compile_seconds={self.compile_seconds:.2f}, cache_hit={self.cache_hit})"
        )


def default_options(arch: str = DEFAULT_ARCH) -> list[str]:
    """The NVRTC options every compile gets (before the caller's extra ones and the -I dirs)."""
    return [
        f"--gpu-architecture={arch}",
        "-std=c++17",
        "-default-device",
        "-DNDEBUG",
        "--ptxas-options=-v",
    ]


# ---------------------------------------------------------------------------------------------
# ptxas -v report
# ---------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM = re.compile(r"(\d+) bytes cmem\[0\]")


def parse_ptxas_report(log: str) -> dict[str, Resources]:
    """``{entry function: Resources}`` from an NVRTC log compiled with ``--ptxas-options=-v``."""
    found: dict[str, dict[str, int]] = {}
    entry = None  # the entry function whose "Used ..." line comes next
    properties = None  # the function whose stack/spill line comes next
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            entry = match.group(1)
            found.setdefault(entry, {})
            continue
        if match := _PROPERTIES.search(line):
            properties = match.group(1)
            continue
        if match := _FRAME.search(line):
            if properties is not None and properties in found:
                found[properties].update(
                    stack_bytes=int(match.group(1)),
                    spill_stores=int(match.group(2)),
                    spill_loads=int(match.group(3)),
                )
            properties = None
            continue
        if (match := _USED.search(line)) and entry is not None:
            values = found[entry]
            values["registers"] = int(match.group(1))
            if barriers := _BARRIERS.search(line):
                values["barriers"] = int(barriers.group(1))
            if smem := _SMEM.search(line):
                values["smem_bytes"] = int(smem.group(1))
            if cmem := _CMEM.search(line):
                values["cmem_bytes"] = int(cmem.group(1))
    return {name: Resources(**values) for name, values in found.items()}


def _pick_resources(report: dict[str, Resources], entry: str) -> Resources:
    if entry in report:
        return report[entry]
    if len(report) == 1:
        return next(iter(report.values()))
    if not report:
        return Resources()
    # Several entries, none named ``entry``: the worst of each figure.
    return Resources(
        **{name: max(getattr(r, name) for r in report.values()) for name in Resources.__dataclass_fields__}
    )


def _ptxas_notes(log: str) -> tuple[str, ...]:
    notes = []
    for line in log.splitlines():
        lowered = line.lower()
        if "ptxas" in lowered and ("warning" in lowered or "performance" in lowered or "error" in lowered):
            notes.append(line.strip())
    return tuple(notes)


def serialized_wgmma(notes: tuple[str, ...]) -> tuple[str, ...]:
    """The ptxas notes (``CompiledKernel.ptxas_notes``) saying it serialized the kernel's WGMMAs (C751x: each one
    waited for before the next issues), a kernel no table should pick."""
    return tuple(note for note in notes if "serialized" in note)


# ---------------------------------------------------------------------------------------------
# NVRTC
# ---------------------------------------------------------------------------------------------


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except Exception as error:
        raise CompileError(f"cuda.bindings.nvrtc cannot be imported: {error}") from error
    return nvrtc


def _error_string(nvrtc, err) -> str:
    try:
        result = nvrtc.nvrtcGetErrorString(err)
        return as_text(result[1] if isinstance(result, tuple) else result)
    except Exception:
        return repr(err)


def _check(nvrtc, result, what: str, name: str, log: str = ""):
    """The values of an NVRTC call's ``(err, *values)``; CompileError (with ``log``) on err."""

    def error(status) -> CompileError:
        return CompileError(f"{what} failed for {name}: {_error_string(nvrtc, status)}", log=log, name=name)

    return unwrap(result, nvrtc.nvrtcResult.NVRTC_SUCCESS, error)


def _program_log(nvrtc, program, name: str) -> str:
    size = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize", name)
    if size <= 1:
        return ""
    buffer = b" " * size
    _check(nvrtc, nvrtc.nvrtcGetProgramLog(program, buffer), "nvrtcGetProgramLog", name)
    return buffer.rstrip(b"\x00").decode(errors="replace")


def _nvrtc_compile(source: str, name: str, options: list[str]) -> tuple[bytes, str, float]:
    """(cubin, log, seconds). Raises CompileError with the log when NVRTC rejects the source."""
    nvrtc = _nvrtc()
    file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", name or "kernel") + ".cu"
    program = _check(
        nvrtc,
        nvrtc.nvrtcCreateProgram(source.encode(), file_name.encode(), 0, [], []),
        "nvrtcCreateProgram",
        name,
    )
    try:
        encoded = [option.encode() for option in options]
        start = time.perf_counter()
        result = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        seconds = time.perf_counter() - start
        err = result[0] if isinstance(result, tuple) else result
        log = _program_log(nvrtc, program, name)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(
                f"NVRTC could not compile {name} ({_error_string(nvrtc, err)})", log=log, name=name
            )
        size = _check(nvrtc, nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize", name, log)
        if size == 0:
            raise CompileError(
                f"NVRTC produced no cubin for {name} (is --gpu-architecture a real sm_ arch?)", log=log, name=name
            )
        cubin = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN", name, log)
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    if not cubin.startswith(ELF_MAGIC):
        raise CompileError(f"NVRTC's output for {name} is not an ELF cubin", log=log, name=name)
    return bytes(cubin), log, seconds


# Precompiled headers (NVRTC --pch): a compile parses its #include prefix (the CuTe/CUTLASS/CCCL headers, most
# of a kernel's compile time) into a precompiled header, and later compiles in the same process whose prefix is the
# same load it instead. The first such compile costs about 1.7x, each later one about 0.4x; the cubin is the same
# byte for byte. A header of the CuTe prefix takes about 420 MB of disk, so each process keeps its own, in a
# temporary directory removed at exit, and only where it compiles several kernels (compile_many decides).
PCH_HEAP_BYTES = 1 << 30  # NVRTC's default (256 MiB) is too small for the CuTe prefix: it would warn and not keep it
PCH_MIN_COMPILES = 3  # per process: from three compiles on, the precompiled header pays for itself
PCH_FILE_BYTES = 512 << 20  # room left per process for its header (the CuTe prefix's is about 420 MB)


def _precompiled_headers_pay(compiles: int, processes: int) -> bool:
    """Whether each of ``processes`` compiles enough of the ``compiles`` to pay for a precompiled header, and the
    temporary directory has room for theirs, twice over (a tmpfs there is memory)."""
    if compiles < PCH_MIN_COMPILES * processes:
        return False
    try:
        free = shutil.disk_usage(tempfile.gettempdir()).free
    except OSError:
        return False
    return free >= 2 * processes * PCH_FILE_BYTES


@lru_cache(maxsize=1)
def _pch_options() -> tuple[str, ...]:
    """This process's NVRTC options for a precompiled header, or () where this NVRTC cannot keep one."""
    nvrtc = _nvrtc()
    if not hasattr(nvrtc, "nvrtcSetPCHHeapSize"):  # NVRTC before 12.4
        return ()
    result = nvrtc.nvrtcSetPCHHeapSize(PCH_HEAP_BYTES)
    if (result[0] if isinstance(result, tuple) else result) != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return ()
    directory = tempfile.mkdtemp(prefix="hopper-mxfp4-pch-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return ("--pch", f"--pch-dir={directory}", "--pch-messages=false")  # no temporary path in the cached log


def _templates_dir(templates_dir: Path | str | None) -> Path | None:
    if templates_dir is not None:
        return Path(templates_dir)
    try:
        from .paths import TEMPLATES_DIR
    except ImportError:
        return None
    return Path(TEMPLATES_DIR)


@dataclass(frozen=True)
class _Plan:
    """Everything a compile needs, and its cache key."""

    options: list[str]  # full NVRTC options, -I included
    key: str
    templates_dir: Path | None
    arch: str
    entry: str
    source_sha256: str
    extra_options: tuple[str, ...] = field(default_factory=tuple)


def _plan(
    source: str,
    *,
    options: Sequence[str] | None = None,
    arch: str = DEFAULT_ARCH,
    entry: str = ENTRY_POINT,
    include_dirs: Sequence[Path | str] | None = None,
    templates_dir: Path | str | None = None,
) -> _Plan:
    status = check_toolchain()
    if not status.ok:
        raise ToolchainError(status.reason)
    templates = _templates_dir(templates_dir)
    extra = list(options or ())
    user_includes = [str(Path(d)) for d in include_dirs or ()]
    includes = ([str(templates)] if templates is not None and templates.is_dir() else []) + user_includes
    includes += [str(d) for d in status.include_dirs]
    compile_options = default_options(arch) + extra + [f"-I{d}" for d in includes]
    key = cache.cache_key(
        source=source,
        headers=cache.template_hashes(templates, cache.HEADER_SUFFIXES) if templates is not None else {},
        # Include paths differ between machines and venvs; the header *versions* stand in for
        # the system headers, the hashed contents for the project's, the paths for the user's.
        options=default_options(arch) + extra + [f"-I{d}" for d in user_includes],
        nvrtc_version=status.nvrtc_version,
        arch=arch,
        extra={
            "entry": entry,
            "cutlass": status.cutlass_version,
            "cccl": status.cccl_version,
            "cuda": status.cuda_version,
        },
    )
    return _Plan(
        options=compile_options,
        key=key,
        templates_dir=templates,
        arch=arch,
        entry=entry,
        source_sha256=cache.sha256_text(source),
        extra_options=tuple(extra),
    )


def _from_entry(entry: cache.CacheEntry, name: str, plan: _Plan, cache_hit: bool) -> CompiledKernel:
    meta = entry.meta
    return CompiledKernel(
        name=name,
        cubin=entry.cubin,
        resources=Resources(**meta.get("resources", {})),
        compile_seconds=float(meta.get("compile_seconds", 0.0)),
        log=meta.get("log", ""),
        cache_hit=cache_hit,
        entry=plan.entry,
        arch=plan.arch,
        key=plan.key,
        options=tuple(plan.options),
        ptxas_notes=tuple(meta.get("ptxas_notes", ())),
        cache_path=str(entry.path) if str(entry.path) != "." else "",
    )


def lookup(source: str, name: str, *, cache_dir: Path | str | None = None, **options: Any) -> CompiledKernel | None:
    """The cached kernel for this source, or None (never compiles). ``options``: compile_source's
    ``options``, ``arch``, ``entry``, ``include_dirs`` and ``templates_dir``."""
    plan = _plan(source, **options)
    hit = cache.load(plan.key, Path(cache_dir) if cache_dir is not None else None)
    return None if hit is None else _from_entry(hit, name, plan, cache_hit=True)


def compile_source(
    source: str, name: str, *, use_cache: bool = True, cache_dir: Path | str | None = None,
    precompiled_headers: bool = False, **options: Any,
) -> CompiledKernel:
    """Compile CUDA C++ ``source`` to a cubin for ``arch`` (sm_90a), or take it from the cache.

    ``options`` (keywords, with their defaults in one place, ``_plan``):
    ``options``: extra NVRTC options, appended to ``default_options(arch)`` (e.g. ``["-lineinfo"]``);
    ``arch``: default ``DEFAULT_ARCH``;
    ``entry``: the ``extern "C" __global__`` function whose ptxas report fills ``.resources``
    (default ``ENTRY_POINT``);
    ``include_dirs``: extra include directories, searched after ``templates_dir``;
    ``templates_dir``: the project headers (default ``codegen.build.paths.TEMPLATES_DIR``): on the include
    path, and the contents of every header in it are part of the cache key.
    ``use_cache=False`` always compiles (and still stores the result).
    ``precompiled_headers=True`` keeps the parsed #include prefix in a precompiled header for the later compiles
    of this process (see ``PCH_MIN_COMPILES``); it changes neither the cubin nor the cache key.
    Raises CompileError (with NVRTC's log) or codegen.build.toolchain.ToolchainError.
    """
    plan = _plan(source, **options)
    directory = Path(cache_dir) if cache_dir is not None else None
    if use_cache:
        hit = cache.load(plan.key, directory)
        if hit is not None:
            return _from_entry(hit, name, plan, cache_hit=True)

    nvrtc_options = plan.options + list(_pch_options() if precompiled_headers else ())
    cubin, log, seconds = _nvrtc_compile(source, name, nvrtc_options)
    resources = _pick_resources(parse_ptxas_report(log), plan.entry)
    meta: dict[str, Any] = {
        "name": name,
        "entry": plan.entry,
        "arch": plan.arch,
        "resources": asdict(resources),
        "compile_seconds": round(seconds, 3),
        "log": log,
        "ptxas_notes": list(_ptxas_notes(log)),
        "source_sha256": plan.source_sha256,
        "options": plan.options,
        "created": time.time(),
    }
    stored = cache.store(plan.key, cubin, meta, directory)
    return _from_entry(stored, name, plan, cache_hit=False)


def compile_kernel(config: "TileConfig", **kwargs: Any) -> CompiledKernel:
    """Render ``config`` with ``codegen.build.render.render`` and compile it (keyword args as compile_source)."""
    config.validate()
    source = render(config)
    kwargs.setdefault("entry", ENTRY_POINT)
    return compile_source(source, config.name, **kwargs)


def lookup_kernel(config: "TileConfig", **kwargs: Any) -> CompiledKernel | None:
    """The cached kernel of ``config``, or None (renders, never compiles)."""
    config.validate()
    return lookup(render(config), config.name, **kwargs)


# ---------------------------------------------------------------------------------------------
# Many configs at once
# ---------------------------------------------------------------------------------------------


def _worker_compile(config: "TileConfig", kwargs: dict[str, Any]) -> CompiledKernel:
    return compile_kernel(config, **kwargs)


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _from_cache(configs: list["TileConfig"], results: list, bar: Any, kwargs: dict[str, Any]) -> list[int]:
    """Fill ``results`` with the cache hits (and the configs that cannot even render); return the
    indices still to compile."""
    pending: list[int] = []
    use_cache = kwargs.get("use_cache", True)
    lookup_kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "precompiled_headers")}
    for index, config in enumerate(configs):
        try:
            hit = lookup_kernel(config, **lookup_kwargs) if use_cache else None
        except Exception as error:  # invalid config, render failure, missing toolchain
            results[index] = error
            bar.advance(config.name, ok=False)
            continue
        if hit is not None:
            results[index] = hit
            bar.advance(config.name, ok=True, note="cached")
        else:
            pending.append(index)
    return pending


def _settle(results: list, index: int, name: str, bar: Any, compile: Any) -> None:
    """``results[index]`` = ``compile()``, or the exception it raised; one progress step either way."""
    try:
        kernel = results[index] = compile()
        bar.advance(name, ok=True, note=f"{kernel.compile_seconds:.1f} s")
    except Exception as error:  # CompileError, BrokenProcessPool, ...
        results[index] = error
        bar.advance(name, ok=False)


def _compile_in_pool(configs: list["TileConfig"], pending: list[int], jobs: int, results: list, bar: Any,
                     kwargs: dict[str, Any], cache_usable: bool) -> None:
    context = multiprocessing.get_context("spawn")
    # An unusable cache was reported here, once: the workers do not say it again, each in turn.
    quiet = {} if cache_usable else dict(initializer=cache.mark_warned, initargs=(kwargs.get("cache_dir"),))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, **quiet) as pool:
        futures = {pool.submit(_worker_compile, configs[i], kwargs): i for i in pending}
        bar.working(f"{len(pending)} in {jobs} processes")
        try:
            for future in as_completed(futures):
                _settle(results, futures[future], configs[futures[future]].name, bar, future.result)
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def compile_many(
    configs: Iterable["TileConfig"],
    jobs: int | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> list[CompiledKernel | Exception]:
    """Compile every config; result i is config i's CompiledKernel or the exception it raised.

    Cache hits are answered in this process; the rest are compiled in a pool of ``jobs`` spawned
    processes (default: the CPUs this process may use; 1 compiles here, one after another), with a
    precompiled header per process where each compiles at least ``PCH_MIN_COMPILES`` configs and the
    temporary directory has room for them.
    ``progress`` shows a one-line counter on stderr. Keyword args go to compile_source.
    """
    from .progress import Progress

    configs = list(configs)
    results: list[CompiledKernel | Exception | None] = [None] * len(configs)
    bar = Progress(len(configs), label="compile", enabled=progress)
    pending = _from_cache(configs, results, bar, kwargs)
    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    jobs = min(jobs, len(pending)) if pending else 1
    if _precompiled_headers_pay(len(pending), jobs):
        kwargs = {"precompiled_headers": True, **kwargs}
    # Said before the compiles, and once (not once per worker) when the cache cannot keep them.
    cache_usable = cache.warn_if_unusable(kwargs.get("cache_dir"), stacklevel=2) if pending else True
    try:
        if jobs <= 1:
            for index in pending:
                bar.working(configs[index].name)
                _settle(results, index, configs[index].name, bar, lambda: compile_kernel(configs[index], **kwargs))
        elif pending:
            _compile_in_pool(configs, pending, jobs, results, bar, kwargs, cache_usable)
    finally:
        bar.close()
    return list(results)  # type: ignore[arg-type]
