"""NVRTC compile pipeline (CPU only): toolchain discovery, cubins, the disk cache, SASS checks.

Compiles are kept few: a small CuTe stand-in kernel (warp-specialized, TMA + bulk copy, setmaxnreg,
one register-A WGMMA) proves the pipeline without the real template; trivial kernels (well under a
second each) exercise the cache; the real configs are compiled once per session into the cubin cache
(tests/background_builds.py), and their SASS is read for one config of each family; so are their copy roof builds
(`bench waits`'s diagnostic, -DMXFP4_COPY_ONLY, alone and with the wait probe).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from codegen.build import cache
from codegen.build.compiler import (
    ELF_MAGIC,
    CompiledKernel,
    CompileError,
    Resources,
    compile_kernel,
    compile_many,
    compile_source,
    default_options,
    parse_ptxas_report,
    serialized_wgmma,
)
from codegen.build.config import (
    DEFAULT_CONFIGS,
    TileConfig,
)
from codegen.build.progress import Progress
from codegen.build.sass import dump_sass, sass_unavailable_reason, summarize_sass
from codegen.build.toolchain import _cccl_warnings, _probe, check_toolchain
from codegen.runtime.launch import (
    COPY_ONLY_OPTION,
    NO_DECODE_OPTION,
    NO_EPILOGUE_OPTION,
    WAIT_PROBE_OPTION,
    candidate_stage_bytes,
    diagnostic_build,
)
from codegen.tune.selection import configs_under_test

REPO = Path(__file__).resolve().parent.parent

TOOLCHAIN = check_toolchain()
needs_toolchain = pytest.mark.skipif(not TOOLCHAIN.ok, reason=f"NVRTC toolchain not usable: {TOOLCHAIN.reason}")
SASS_MISSING = sass_unavailable_reason()
needs_sass = pytest.mark.skipif(SASS_MISSING is not None, reason=f"no SASS tools: {SASS_MISSING}")

try:
    import codegen.build.render  # noqa: F401

    RENDER_ERROR = None
except ImportError as error:  # the lead's template layer is not there yet
    RENDER_ERROR = f"codegen.build.render is not importable yet ({error})"
needs_render = pytest.mark.skipif(RENDER_ERROR is not None, reason=RENDER_ERROR or "")

# A stand-in for the real kernel: every SM90 feature the grouped GEMM uses, nothing it computes.
STANDIN = r"""
#include <cuda/std/cstdint>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

using u32 = cuda::std::uint32_t;
using u64 = cuda::std::uint64_t;

struct alignas(64) TensorMapBytes { unsigned char bytes[128]; };

extern "C" __global__ void __launch_bounds__(256, 1)
mxfp4_grouped_mm(const __grid_constant__ TensorMapBytes x_map, const u32* w, float* out) {
  extern __shared__ __align__(1024) unsigned char smem[];
  u64* bar = reinterpret_cast<u64*>(smem + 16384);
  const int warpgroup = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(bar, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (tid == 0) {
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, 8192 + 2048);
      cute::SM90_TMA_LOAD_2D::copy(&x_map, bar, 0, smem, 0, 0);
      cute::SM90_BULK_COPY_G2S::copy(w, bar, smem + 8192, 2048);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<232>();
    cutlass::arch::ClusterBarrier::wait(bar, 0);
    const u32* a = reinterpret_cast<const u32*>(smem + 8192) + tid * 4;
    u64 desc_b = (static_cast<u64>(cute::cast_smem_ptr_to_uint(smem)) >> 4) | (u64(1) << 62);
    float d[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) d[i] = 0.f;
    cute::warpgroup_arrive();
    cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>::fma(
        a[0], a[1], a[2], a[3], desc_b,
        d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15],
        d[16], d[17], d[18], d[19], d[20], d[21], d[22], d[23], d[24], d[25], d[26], d[27], d[28], d[29], d[30], d[31]);
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
#pragma unroll
    for (int i = 0; i < 32; ++i) out[tid * 32 + i] = d[i];
  }
}
"""

# Compiles in a fraction of a second: for the cache tests.
TRIVIAL = r"""
#include "standin_value.cuh"
extern "C" __global__ void mxfp4_grouped_mm(float* out) { out[threadIdx.x] = STANDIN_VALUE * threadIdx.x; }
"""


def _templates(tmp_path: Path, value: str = "1.0f") -> Path:
    templates = tmp_path / "templates"
    templates.mkdir(exist_ok=True)
    (templates / "standin_value.cuh").write_text(f"#pragma once\n#define STANDIN_VALUE {value}\n")
    return templates


# ---------------------------------------------------------------------------------------------
# toolchain
# ---------------------------------------------------------------------------------------------


def test_toolchain_found():
    status = check_toolchain()
    assert status.ok, status.reason
    assert status.nvrtc_version is not None and status.nvrtc_version >= (12, 8)
    assert (status.cutlass_include / "cute" / "tensor.hpp").is_file()
    assert (status.cuda_include / "cuda_bf16.h").is_file()
    assert (status.cccl_include / "cuda" / "std" / "__cccl" / "version.h").is_file()
    assert status.cutlass_version and status.cutlass_version.count(".") == 2
    assert status.cccl_version and status.cccl_version.count(".") == 2
    assert len(status.include_dirs) == 3
    assert check_toolchain() is status  # probed once per process


def test_toolchain_warns_about_newer_cccl():
    assert _cccl_warnings("3.0.1", "13.0.85") == []
    warnings = _cccl_warnings("3.3.0", "13.3.1")
    assert len(warnings) == 2
    assert "CCCL 3.3.0" in warnings[0] and "13.0" in warnings[0]
    assert "nvidia-cuda-cccl 13.3.1" in warnings[1]


def test_toolchain_missing_headers_say_what_to_install(monkeypatch):
    import codegen.build.toolchain as toolchain

    monkeypatch.setattr(toolchain, "find_cutlass_include", lambda: None)
    status = _probe()
    assert not status.ok
    assert "nvidia-cutlass" in status.reason
    assert status.include_dirs == []


# ---------------------------------------------------------------------------------------------
# ptxas report, SASS summary, progress (no compile)
# ---------------------------------------------------------------------------------------------

PTXAS_LOG = """\
ptxas info    : 1879 bytes gmem
ptxas info    : Compiling entry function 'helper_kernel' for 'sm_90a'
ptxas info    : Function properties for helper_kernel
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 20 registers, used 0 barriers, 384 bytes cmem[0]
ptxas info    : Compiling entry function 'mxfp4_grouped_mm' for 'sm_90a'
ptxas info    : Function properties for mxfp4_grouped_mm
ptxas         .     24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 160.500 ms
"""


def test_parse_ptxas_report():
    report = parse_ptxas_report(PTXAS_LOG)
    assert report["mxfp4_grouped_mm"] == Resources(
        registers=168, smem_bytes=1024, spill_stores=8, spill_loads=12, stack_bytes=24, barriers=1, cmem_bytes=400
    )
    assert report["helper_kernel"].registers == 20
    assert report["helper_kernel"].spills == 0


SASS_TEXT = """\
\tcode for sm_90a
\t\tFunction : mxfp4_grouped_mm
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   USETMAXREG.DEALLOC.CTAPOOL 0x28 ;
        /*0020*/              @!P0 UTMALDG.2D [UR8], [UR4] ;
        /*0030*/               @P1 UBLKCP.S.G [UR4], [UR6], UR5 ;
        /*0040*/                   WARPGROUP.ARRIVE ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, R56, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R24, R60, gdesc[UR4], R24, gsb0 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0078*/                   WARPGROUP.DEPBAR.LE gsb0, 0x2 ;
        /*0080*/                   STL.64 [R1], R2 ;
        /*0090*/                   LDL R3, [R1+0x4] ;
        /*00a0*/                   UTMAPF.L2.2D [UR8] ;
        /*00b0*/                   EXIT ;
"""


def test_summarize_sass():
    summary = summarize_sass(SASS_TEXT)
    assert summary.functions == ("mxfp4_grouped_mm",)
    assert summary.hgmma == 2
    assert (summary.utmaldg, summary.ublkcp, summary.tma_other, summary.tma) == (1, 1, 1, 3)
    assert (summary.ldl, summary.stl, summary.local_memory) == (1, 1, 2)
    assert summary.setmaxnreg
    assert summary.warpgroup_arrive == 1
    assert summary.instructions == 13
    assert summary.opcodes["WARPGROUP"] == 3
    assert summary.wgmma_waits == {0: 1, 2: 1}  # wgmma.wait_group N -> count


def test_summarize_sass_leaves_ptxas_wgmma_fences_out_of_the_mma_count():
    fence = "        /*00c0*/                   HGMMA.64x8x16.F16 RZ, gdesc[URZ], RZ, !UPT, gsb0 ;\n"
    summary = summarize_sass(SASS_TEXT + fence)
    assert (summary.hgmma, summary.wgmma_fences, summary.opcodes["HGMMA"]) == (2, 1, 3)
    assert summarize_sass(SASS_TEXT).wgmma_fences == 0


def test_sass_sidecar_of_an_older_summary_is_recomputed(tmp_path, monkeypatch):
    """A sass.json written before a SassSummary field existed must not come back with that field's default."""
    from dataclasses import asdict

    from codegen.build import sass

    cubin = b"\x7fELF not really"
    monkeypatch.setattr(sass, "summarize_cubin", lambda data: summarize_sass(SASS_TEXT))
    fresh = sass.summarize_cubin_cached(cubin, tmp_path)
    assert fresh.wgmma_waits == {0: 1, 2: 1}
    assert sass.summarize_cubin_cached(cubin, tmp_path) == fresh  # read back: int keys again
    old = {k: v for k, v in asdict(fresh).items() if k != "wgmma_waits"}
    (tmp_path / sass.SIDECAR).write_text(json.dumps(dict(old, cubin_sha256=cache.sha256_bytes(cubin))))
    assert sass.summarize_cubin_cached(cubin, tmp_path).wgmma_waits == {0: 1, 2: 1}


def test_progress_plain_lines():
    stream = io.StringIO()
    bar = Progress(2, label="compile", stream=stream)
    bar.working("a")  # not a terminal: nothing drawn until an item finishes
    bar.advance("a", note="1.0 s")
    bar.advance("b", ok=False)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[1/2] compile a ok 1.0 s")
    assert lines[1].startswith("[2/2] compile b FAILED")
    assert bar.failed == 1


def test_compile_error_pickles():
    error = CompileError("NVRTC could not compile x", log="x.cu(1): error: bad", name="x")
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, CompileError)
    assert again.log == error.log and again.name == "x"
    assert "error: bad" in str(again)


# ---------------------------------------------------------------------------------------------
# compiling
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> CompiledKernel:
    return compile_source(STANDIN, "standin", cache_dir=tmp_path_factory.mktemp("cache"))


@needs_toolchain
def test_standin_compiles_to_sm90a_cubin(standin):
    assert standin.cubin.startswith(ELF_MAGIC)
    assert not standin.cache_hit
    assert standin.compile_seconds > 0
    assert standin.entry == "mxfp4_grouped_mm"
    assert "--gpu-architecture=sm_90a" in standin.options
    assert not any("fast-math" in option or "fast_math" in option for option in standin.options)
    assert "Compiling entry function 'mxfp4_grouped_mm' for 'sm_90a'" in standin.log
    resources = standin.resources
    assert 0 < resources.registers <= 255
    assert resources.spills == 0 and resources.stack_bytes == 0
    assert Path(standin.cache_path, cache.CUBIN_FILE).read_bytes() == standin.cubin


@needs_toolchain
@needs_sass
def test_standin_sass_has_hgmma_tma_setmaxnreg(standin):
    summary = standin.sass()
    assert summary.functions == ("mxfp4_grouped_mm",)
    assert summary.hgmma >= 1
    assert summary.utmaldg >= 1 and summary.ublkcp >= 1
    assert summary.setmaxnreg
    assert summary.local_memory == 0
    assert (Path(standin.cache_path) / "sass.json").is_file()  # remembered beside the cubin
    assert standin.sass() == summary


@needs_toolchain
def test_cache_hit_then_miss_after_header_edit(tmp_path):
    templates = _templates(tmp_path, "1.0f")
    store = tmp_path / "cache"
    first = compile_source(TRIVIAL, "trivial", templates_dir=templates, cache_dir=store)
    assert not first.cache_hit
    second = compile_source(TRIVIAL, "trivial", templates_dir=templates, cache_dir=store)
    assert second.cache_hit
    assert second.cubin == first.cubin and second.key == first.key
    assert second.resources == first.resources and second.compile_seconds == first.compile_seconds

    # Same source, edited header: the key changes and the new cubin is built from the new header.
    (templates / "standin_value.cuh").write_text("#pragma once\n#define STANDIN_VALUE 2.0f\n")
    third = compile_source(TRIVIAL, "trivial", templates_dir=templates, cache_dir=store)
    assert not third.cache_hit
    assert third.key != first.key
    assert third.cubin != first.cubin

    # A new header in templates/ (even one not included yet) changes the key too.
    (templates / "unused.cuh").write_text("#pragma once\n")
    assert not compile_source(TRIVIAL, "trivial", templates_dir=templates, cache_dir=store).cache_hit

    # So do the options; and use_cache=False always compiles.
    assert not compile_source(TRIVIAL, "trivial", templates_dir=templates, cache_dir=store, options=["-lineinfo"]).cache_hit
    assert not compile_source(TRIVIAL, "trivial", templates_dir=templates, cache_dir=store, use_cache=False).cache_hit
    assert len(cache.entries(store)) == 4


@needs_toolchain
@needs_toolchain
def test_precompiled_headers_change_neither_the_cubin_nor_the_key(tmp_path):
    from codegen.build.compiler import _pch_options

    if not _pch_options():
        pytest.skip("this NVRTC keeps no precompiled header")
    templates = _templates(tmp_path, "3.0f")
    plain = compile_source(TRIVIAL, "trivial", templates_dir=templates, cache_dir=tmp_path / "plain")
    kept = [compile_source(TRIVIAL.replace("threadIdx.x;", f"threadIdx.x + {i};") if i else TRIVIAL, f"trivial{i}",
                           templates_dir=templates, cache_dir=tmp_path / "pch", precompiled_headers=True)
            for i in range(2)]  # the second one reads the header the first one kept
    assert kept[0].cubin == plain.cubin and kept[0].key == plain.key
    assert "precompiled" not in kept[0].log + kept[1].log  # no temporary path in the log the cache keeps
    assert kept[1].cubin != plain.cubin and kept[1].cubin.startswith(ELF_MAGIC)
    assert not any("pch" in option for option in kept[0].options)  # nor in the options the cache entry records
    assert Path(_pch_options()[1].split("=", 1)[1]).is_dir()  # this process's own directory


def test_compile_many_keeps_precompiled_headers_where_a_process_compiles_enough(monkeypatch):
    import codegen.build.compiler as compiler

    seen = []
    monkeypatch.setattr(compiler, "lookup_kernel", lambda config, **kwargs: None)
    monkeypatch.setattr(compiler, "compile_kernel", lambda config, **kwargs: seen.append(kwargs) or RuntimeError("x"))
    free = compiler.shutil.disk_usage(compiler.tempfile.gettempdir())
    room = 2 * compiler.PCH_FILE_BYTES
    for count, free_bytes, expected in ((compiler.PCH_MIN_COMPILES - 1, room, False),
                                        (compiler.PCH_MIN_COMPILES, room, True),
                                        (compiler.PCH_MIN_COMPILES, room - 1, False)):  # no room for the header
        seen.clear()
        monkeypatch.setattr(compiler.shutil, "disk_usage", lambda path: free._replace(free=free_bytes))
        compile_many(DEFAULT_CONFIGS[:count], jobs=1, progress=False)
        assert [kwargs.get("precompiled_headers", False) for kwargs in seen] == [expected] * count
    seen.clear()
    compile_many(DEFAULT_CONFIGS[:4], jobs=1, progress=False, precompiled_headers=False)  # the caller decides
    assert [kwargs["precompiled_headers"] for kwargs in seen] == [False] * 4


def _include_prefix(source: str) -> list[str]:
    """The #include lines before the first line of code (comments skipped): what a precompiled header keeps."""
    prefix = []
    for line in source.splitlines():
        if line.startswith("#include"):
            prefix.append(line)
        elif line.strip() and not line.startswith("//"):
            break
    return prefix


def _system_headers_of(header: str) -> set[str]:
    """The ``#include <...>`` lines of a project header and of the project headers it includes."""
    pending, seen, system = [header], set(), set()
    while pending:
        name = pending.pop()
        seen.add(name)
        for line in (REPO / "templates" / name).read_text().splitlines():
            if line.startswith("#include <"):
                system.add(line)
            elif line.startswith('#include "') and line.split('"')[1] not in seen:
                pending.append(line.split('"')[1])
    return system


@needs_render
def test_the_kernel_source_starts_with_every_system_header_it_includes():
    """So that one precompiled header serves every config and holds all the header parsing."""
    from codegen.build.render import render

    prefixes = {tuple(_include_prefix(render(config))) for config in CONFIGS_IN_USE}
    assert len(prefixes) == 1, prefixes
    (prefix,) = prefixes
    missing = _system_headers_of("mxfp4_grouped_mm_sm90.cuh") - set(prefix)
    assert not missing, sorted(missing)


def test_cache_key_covers_nvrtc_and_arch():
    parts = dict(source="s", headers={"a.cuh": "0"}, options=default_options(), nvrtc_version=(13, 0), arch="sm_90a")
    key = cache.cache_key(**parts)
    assert cache.cache_key(**parts) == key
    assert cache.cache_key(**{**parts, "nvrtc_version": (13, 5)}) != key
    assert cache.cache_key(**{**parts, "arch": "sm_100a"}) != key
    assert cache.cache_key(**{**parts, "source": "t"}) != key
    assert cache.cache_key(**{**parts, "headers": {"a.cuh": "1"}}) != key


def test_cache_store_is_first_writer_wins(tmp_path):
    key = "ab" * 32
    first = cache.store(key, ELF_MAGIC + b"first", {"note": 1}, tmp_path)
    second = cache.store(key, ELF_MAGIC + b"second", {"note": 2}, tmp_path)
    assert second.cubin == first.cubin == ELF_MAGIC + b"first"
    shard = first.path.parent
    assert [p.name for p in shard.iterdir()] == [key]  # no staging directories left behind
    # A damaged entry reads as absent and is replaced by the next store.
    (first.path / cache.CUBIN_FILE).write_bytes(b"garbage")
    assert cache.load(key, tmp_path) is None
    third = cache.store(key, ELF_MAGIC + b"third", {}, tmp_path)
    assert cache.load(key, tmp_path).cubin == third.cubin == ELF_MAGIC + b"third"
    assert sorted(p.name for p in shard.iterdir()) == [key]


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_unusable_cache_warns_once_and_doctor_shows_it(where, monkeypatch, tmp_path, capsys):
    from codegen.cli.main import main

    (tmp_path / "file").write_text("not a directory")
    root = tmp_path / "file" if where == "a file" else tmp_path / "file" / "cache"
    monkeypatch.setenv("HOPPER_MXFP4_CACHE", str(root))
    monkeypatch.setattr(cache, "_warned_roots", set())
    assert cache.unusable_reason() is not None and str(tmp_path / "file") in cache.unusable_reason()
    with pytest.warns(RuntimeWarning, match="the kernel cache .* is not usable") as caught:
        first = cache.store("cd" * 32, ELF_MAGIC + b"x", {})
        second = cache.store("ef" * 32, ELF_MAGIC + b"y", {})
    assert len([w for w in caught if "kernel cache" in str(w.message)]) == 1  # once per process
    assert str(root) in str(caught[0].message) and "HOPPER_MXFP4_CACHE" in str(caught[0].message)
    assert first.path == second.path == Path() and first.cubin == ELF_MAGIC + b"x"  # the result is still good
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "PROBLEM: not usable" in out and "HOPPER_MXFP4_CACHE" in out


def test_compile_many_warns_once_before_compiling_into_an_unusable_cache(monkeypatch, tmp_path):
    """Once, before the first compile (not once per worker, after the fact); pool workers start quiet."""
    import codegen.build.compiler as compiler

    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(cache, "_warned_roots", set())
    warned_before_each_compile = []
    with pytest.warns(RuntimeWarning, match="kernel cache .* is not usable") as caught:

        def fake_compile(config, **kwargs):
            warned_before_each_compile.append(len([w for w in caught if "kernel cache" in str(w.message)]))
            return cache.store(config.name.ljust(64, "0"), ELF_MAGIC + b"x", {}, kwargs["cache_dir"])

        monkeypatch.setattr(compiler, "compile_kernel", fake_compile)
        monkeypatch.setattr(compiler, "lookup_kernel", lambda config, **kwargs: None)
        compile_many(DEFAULT_CONFIGS[:2], jobs=1, progress=False, cache_dir=str(tmp_path / "file"))  # a str too
    assert warned_before_each_compile == [1, 1]
    assert len([w for w in caught if "kernel cache" in str(w.message)]) == 1
    assert Path(caught[0].filename).name == Path(__file__).name  # attributed to the caller of compile_many
    cache.mark_warned(tmp_path / "file" / "x")  # what a pool worker's initializer does: that root stays quiet there
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.store("ef" * 32, ELF_MAGIC + b"y", {}, tmp_path / "file" / "x")
        assert cache.warn_if_unusable(tmp_path / "fresh")


def test_usable_cache_has_no_problem(tmp_path, recwarn):
    assert cache.unusable_reason(tmp_path / "fresh") is None
    cache.store("ab" * 32, ELF_MAGIC + b"z", {}, tmp_path / "fresh")
    assert not [w for w in recwarn if "kernel cache" in str(w.message)]


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOPPER_MXFP4_CACHE", str(tmp_path / "explicit"))
    assert cache.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("HOPPER_MXFP4_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "hopper-mxfp4"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_dir() == Path.home() / ".cache" / "hopper-mxfp4"


_CONCURRENT = textwrap.dedent(
    """
    import json, os, sys, time
    from codegen.build.compiler import compile_source
    source, cache_dir, go = sys.argv[1], sys.argv[2], sys.argv[3]
    print("ready", flush=True)
    while not os.path.exists(go):  # both processes compile at the same moment
        time.sleep(0.01)
    kernel = compile_source(open(source).read(), "standin", cache_dir=cache_dir)
    print(json.dumps({"hit": kernel.cache_hit, "key": kernel.key, "size": len(kernel.cubin)}), flush=True)
    """
)


@needs_toolchain
def test_concurrent_compiles_of_one_source(tmp_path):
    source = tmp_path / "standin.cu"
    source.write_text(STANDIN)
    store = tmp_path / "cache"
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT, str(source), str(store), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready", process.stderr.read()
        go.touch()
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0]["key"] == results[1]["key"]
    assert results[0]["size"] == results[1]["size"]
    found = cache.entries(store)
    assert len(found) == 1 and found[0].cubin.startswith(ELF_MAGIC)
    shard = found[0].path.parent
    assert [p.name for p in shard.iterdir()] == [found[0].key]  # the loser's staging dir is gone


@needs_toolchain
def test_broken_source_raises_compile_error_with_log(tmp_path):
    broken = 'extern "C" __global__ void mxfp4_grouped_mm(float* out) { out[0] = undefined_thing_xyz; }\n'
    with pytest.raises(CompileError) as caught:
        compile_source(broken, "broken", cache_dir=tmp_path)
    error = caught.value
    assert 'identifier "undefined_thing_xyz" is undefined' in error.log
    assert "undefined_thing_xyz" in str(error)
    assert error.name == "broken"
    assert cache.entries(tmp_path) == []


def test_compile_many_reports_each_failure(tmp_path):
    bad = TileConfig(tile_m=7)  # fails validate(): no compile happens
    results = compile_many([bad], jobs=1, progress=False, cache_dir=tmp_path)
    assert len(results) == 1
    assert isinstance(results[0], ValueError) and "tile_m=7" in str(results[0])


# ---------------------------------------------------------------------------------------------
# the real kernel: every config under test, compiled once per session into the cubin cache
# (tests/background_builds.py: in the background while the other tests run; these tests run last)
# ---------------------------------------------------------------------------------------------


# Every config the op can pick on its own (defaults + shipped tuning tables) and one of each kernel
# family must build cleanly.
CONFIGS_IN_USE = configs_under_test()


def _first_of_each_family(configs: list[TileConfig]) -> list[TileConfig]:
    first: dict[str, TileConfig] = {}
    for config in configs:
        first.setdefault(config.family, config)
    return list(first.values())


# What the SASS shows of a family (WGMMA kind, TMA, setmaxnreg) is the same for all its configs: one config of each.
FAMILY_SAMPLES = _first_of_each_family(CONFIGS_IN_USE)


def _skip_unless_buildable() -> None:
    """Skip when the kernels cannot be rendered or compiled here (the reason is the skip's)."""
    if RENDER_ERROR is not None:
        pytest.skip(RENDER_ERROR)
    if not TOOLCHAIN.ok:
        pytest.skip(TOOLCHAIN.reason)


@pytest.fixture
def default_kernels(compiled_kernels):
    _skip_unless_buildable()
    return compiled_kernels


@needs_render
@pytest.mark.parametrize("config", CONFIGS_IN_USE, ids=lambda config: config.name)
def test_default_config_compiles_without_spills(default_kernels, config):
    """Per config: registers, spills and stack. No spill and no stack frame also means no local memory (LDL/STL):
    local memory lives in the stack frame."""
    kernel = default_kernels[config.name]
    if isinstance(kernel, Exception):
        pytest.fail(f"{config.name} did not compile: {kernel}")
    assert kernel.cubin.startswith(ELF_MAGIC)
    assert kernel.entry == "mxfp4_grouped_mm"
    r = kernel.resources
    assert r.registers > 0
    assert r.spill_stores == 0 and r.spill_loads == 0, kernel.log
    assert r.stack_bytes == 0, kernel.log
    assert config.register_pool_suffices(r.registers), "setmaxnreg would wait for registers forever"
    assert serialized_wgmma(kernel.ptxas_notes) == (), kernel.ptxas_notes


def test_a_family_fixes_what_its_sass_sample_stands_for():
    """The SASS test reads one config per family: within a family, what it checks must not vary."""
    samples = {sample.family: sample for sample in FAMILY_SAMPLES}
    assert len(samples) == len(FAMILY_SAMPLES) < len(CONFIGS_IN_USE)
    for config in CONFIGS_IN_USE:
        sample = samples[config.family]
        assert (config.activations, config.uses_setmaxnreg) == (sample.activations, sample.uses_setmaxnreg), config.name


@needs_render
@needs_sass
@pytest.mark.parametrize("config", FAMILY_SAMPLES, ids=lambda config: config.name)
def test_family_sass(default_kernels, config):
    kernel = default_kernels[config.name]
    if isinstance(kernel, Exception):
        pytest.fail(f"{config.name} did not compile: {kernel}")
    summary = kernel.sass()
    if config.activations == "fp8":  # W4A8: FP8 WGMMA (QGMMA), no bf16 one
        assert summary.qgmma > 0 and summary.hgmma == 0, summary.opcodes
    else:
        assert summary.hgmma > 0 and summary.qgmma == 0, summary.opcodes
    assert summary.utmaldg > 0, "x must arrive by TMA (UTMALDG)"
    assert summary.tma > 0
    assert summary.setmaxnreg == config.uses_setmaxnreg  # a producer warp keeps the launch registers
    assert summary.ldl == 0 and summary.stl == 0, "local memory (LDL/STL) in the kernel"
    # The k loop keeps fragment_buffers - 1 WGMMA groups in flight (wgmma.wait_group N, WARPGROUP.DEPBAR.LE gsb0, N);
    # only waits for 0 would mean that ptxas serialized the WGMMAs.
    assert max(summary.wgmma_waits) == config.fragment_buffers - 1, summary.wgmma_waits


# ---------------------------------------------------------------------------------------------
# The copy roof (templates/mxfp4_copy_only.cuh): a diagnostic build `bench waits` times, never shipped.

COPY_ONLY = diagnostic_build(copy_only=True)[1]
COPY_ONLY_PROBED = diagnostic_build(copy_only=True, wait_probe=True)[1]


def test_diagnostic_builds_have_their_own_options_and_cache_keys():
    assert diagnostic_build() == ([], "")  # the shipped build: no macro
    suffixes = {diagnostic_build(**flags)[1] for flags in ({}, {"wait_probe": True}, {"copy_only": True},
                                                           {"wait_probe": True, "copy_only": True},
                                                           {"no_decode": True}, {"no_epilogue": True},
                                                           {"no_decode": True, "no_epilogue": True},
                                                           {"coalesced_stores": True}, {"paired_stores": True},
                                                           {"swiglu_lines": True})}
    assert len(suffixes) == 10
    assert diagnostic_build(no_decode=True)[0] == [NO_DECODE_OPTION]
    assert diagnostic_build(no_decode=True, no_epilogue=True)[0] == [NO_DECODE_OPTION, NO_EPILOGUE_OPTION]
    options, _ = diagnostic_build(wait_probe=True, copy_only=True)
    assert options == [WAIT_PROBE_OPTION, COPY_ONLY_OPTION]


@pytest.fixture
def copy_roof(copy_roof_kernels):
    _skip_unless_buildable()
    return copy_roof_kernels


@needs_render
@pytest.mark.parametrize("config", CONFIGS_IN_USE, ids=lambda config: config.name)
def test_copy_roof_compiles_alone_and_with_the_wait_probe(copy_roof, config):
    for suffix in (COPY_ONLY, COPY_ONLY_PROBED):
        kernel = copy_roof[(config.name, suffix)]
        if isinstance(kernel, Exception):
            pytest.fail(f"{config.name}{suffix} did not compile: {kernel}")
        r = kernel.resources
        assert r.spills == 0 and r.stack_bytes == 0, kernel.log
        assert config.register_pool_suffices(r.registers), "launch.load would refuse it (setmaxnreg would hang)"


@needs_render
@needs_sass
@pytest.mark.parametrize("config", FAMILY_SAMPLES, ids=lambda config: config.name)
def test_copy_roof_sass_keeps_the_loads_and_drops_the_wgmma(default_kernels, copy_roof, config):
    """No WGMMA at all in the copy-only builds; the same TMA and bulk copies and setmaxnreg as the shipped build,
    which keeps its WGMMAs (its cubin does not change with the diagnostic: `bench waits` times the real kernel)."""
    shipped = default_kernels[config.name].sass()
    assert shipped.hgmma + shipped.qgmma > 0
    for suffix in (COPY_ONLY, COPY_ONLY_PROBED):
        kernel = copy_roof[(config.name, suffix)]
        if isinstance(kernel, Exception):
            pytest.fail(f"{config.name}{suffix} did not compile: {kernel}")
        summary = kernel.sass()
        assert summary.hgmma == 0 and summary.qgmma == 0 and summary.warpgroup_arrive == 0, summary.opcodes
        assert summary.setmaxnreg == shipped.setmaxnreg, suffix
        if suffix == COPY_ONLY:
            assert (summary.utmaldg, summary.ublkcp) == (shipped.utmaldg, shipped.ublkcp), suffix
        else:  # the probe's clock reads can change how far ptxas unrolls the producer's loop, not what one trip loads
            assert summary.ublkcp > 0 and shipped.ublkcp > 0, suffix
            assert summary.utmaldg * shipped.ublkcp == shipped.utmaldg * summary.ublkcp, (suffix, summary.utmaldg,
                                                                                         summary.ublkcp)
        assert summary.ldl == 0 and summary.stl == 0


# The roofs (templates/mxfp4_no_decode.cuh, mxfp4_no_epilogue.cuh): diagnostic builds `bench ncu-case --mma-roof`
# profiles, never shipped.
MMA_ROOF_SAMPLES = [TileConfig.from_name(name) for name in ("n128_m256_k64_s5_wg2", "n128_m256_k128_s5_wg2_fp8")]
ROOF_FLAGS = ({"no_decode": True}, {"no_epilogue": True}, {"no_decode": True, "no_epilogue": True})


@needs_render
@needs_sass
@pytest.mark.parametrize("config", MMA_ROOF_SAMPLES, ids=lambda config: config.name)
@pytest.mark.parametrize("flags", ROOF_FLAGS, ids=lambda flags: "+".join(flags))
def test_roof_sass_keeps_the_pipelined_wgmma_and_drops_its_part(config, flags):
    """The same WGMMAs, waits, loads and setmaxnreg as the shipped build, no serialized WGMMA (ptxas C75xx), fewer
    instructions (the decode's, the epilogue's), no spill; without the epilogue, no global store but the one that
    keeps the accumulators live."""
    _skip_unless_buildable()
    shipped = compile_kernel(config)
    roof = compile_kernel(config, options=diagnostic_build(**flags)[0])
    a, b = shipped.sass(), roof.sass()
    assert (b.hgmma, b.qgmma, b.wgmma_waits, b.utmaldg, b.ublkcp, b.setmaxnreg) == (
        a.hgmma, a.qgmma, a.wgmma_waits, a.utmaldg, a.ublkcp, a.setmaxnreg)
    assert b.instructions < a.instructions
    if flags.get("no_epilogue"):
        assert b.opcodes.get("STG", 0) == 1 < a.opcodes.get("STG", 0), (a.opcodes.get("STG"), b.opcodes.get("STG"))
    assert serialized_wgmma(roof.ptxas_notes) == (), roof.log
    assert roof.resources.spills == 0 and config.register_pool_suffices(roof.resources.registers)


# The epilogue's 16-byte stores. Shipped, by TileConfig.store_path: the line stores through shared memory
# (mxfp4_line_stores.cuh) for tiles of 128 rows or more, the sector stores (mxfp4_sector_stores.cuh) for 64 to 127, each
# one store per 16 tile rows of each 64-row block a thread holds; the paired stores (none) for the decode tiles and
# SwiGLU. Never shipped: the coalesced-stores roof (templates/mxfp4_coalesced_stores.cuh: the Store epilogue's bytes as
# whole 128-byte lines, one store per 8 of a thread's accumulators) and the paired-stores build (every tile paired, as
# before; tests/test_store_paths_gpu.py checks on the GPU that the shipped bits are its bits).
STORE_PATH_SAMPLES = [TileConfig.from_name(name) for name in (
    "n128_m256_k64_s5_wg2", "n128_m256_k128_s5_wg2_fp8", "n128_m64_k128_s8_wg2_fp8_scatter", "n128_m16_k128_s5_wg1_c3",
    "n128_m256_k64_s5_wg2_swiglu")]


def _sixteen_byte_stores(config: TileConfig) -> int:
    """STG.E.128 the shipped build of ``config`` issues per tile, by its store path."""
    return 0 if config.store_path == "paired" else config.tile_n // 64 // config.warpgroups * config.tile_m // 16


# The candidate SwiGLU line stores (-DMXFP4_SWIGLU_LINES): one 16-byte store per 32 staged rows of each 64-row block a
# thread holds; the 16-row tiles keep the paired stores.
SWIGLU_LINES_SAMPLES = [TileConfig.from_name(name) for name in (
    "n128_m256_k64_s5_wg2_swiglu", "n128_m256_k128_s5_wg2_fp8_swiglu", "n128_m64_k128_s8_wg2_fp8_swiglu",
    "n128_m16_k128_s5_wg1_c3_swiglu")]

WIDE_STORE_BUILDS = {  # build: (flags, samples, 16-byte stores expected)
    "shipped": ({}, STORE_PATH_SAMPLES, _sixteen_byte_stores),
    "paired stores": ({"paired_stores": True}, STORE_PATH_SAMPLES, lambda config: 0),
    "coalesced stores": ({"coalesced_stores": True}, MMA_ROOF_SAMPLES,  # beside the shipped path, not reached
                         lambda config: config.tile_m * (config.tile_n // config.warpgroups // 8) // 128
                         + _sixteen_byte_stores(config)),
    "swiglu line stores": ({"swiglu_lines": True}, SWIGLU_LINES_SAMPLES,
                           lambda config: config.tile_n // 64 // config.warpgroups * (config.tile_m // 32)),
}


def _build_options(config: TileConfig, flags: dict[str, bool]) -> list[str]:
    """A diagnostic build's NVRTC options as launch.load compiles it (a candidate's staging area too)."""
    stage = candidate_stage_bytes(config, swiglu_lines=bool(flags.get("swiglu_lines")))
    return diagnostic_build(**flags)[0] + ([f"-DMXFP4_DIAGNOSTIC_STAGE_BYTES={stage}"] if stage else [])


@needs_render
@needs_sass
@pytest.mark.parametrize("config", SWIGLU_LINES_SAMPLES[:2] + SWIGLU_LINES_SAMPLES[3:], ids=lambda config: config.name)
def test_swiglu_sigmoid_has_no_division_branch(config):
    """SwiGLU's sigmoid is MUFU.EX2 and MUFU.RCP alone: no FCHK and no branch around a slow-path call per output (an
    IEEE division's, 1.5-1.8x the Store epilogue's cycles at prefill), no spill."""
    _skip_unless_buildable()
    compiled = compile_kernel(config)
    sass = compiled.sass()
    assert sass.opcodes.get("FCHK", 0) == 0 and sass.opcodes.get("CALL", 0) == 0, sass.opcodes
    assert sass.opcodes.get("MUFU", 0) >= 2
    assert compiled.resources.spills == 0


@needs_render
@needs_sass
@pytest.mark.parametrize("config", SWIGLU_LINES_SAMPLES[1:], ids=lambda config: config.name)
def test_swiglu_has_its_e4m3_output_beside_bf16(config):
    """The FP8 layer's gate_up writes the activated rows as e4m3 (p.out_row_scale set; mxfp4/experts/fused_steps.py):
    a saturating F2FP to e4m3 per two rows on the paired path (one per row group and atom at least), one-byte stores
    on the fallback path, no spill; the bf16 path stays (the same kernel serves the bf16 layer)."""
    from codegen.build.sass import dump_sass

    _skip_unless_buildable()
    compiled = compile_kernel(config)
    text = dump_sass(compiled.cubin)
    converts = len(re.findall(r"F2FP\.SATFINITE\.E4M3\.F32", text))
    assert converts >= config.tile_m // 8 * config.atoms_per_warpgroup, converts
    assert "STG.E.U8" in text and "F2FP.BF16.F32.PACK_AB" in text
    assert compiled.resources.spills == 0


MMA_ROWS_SAMPLES = [config for config in CONFIGS_IN_USE if config.mma_rows]
# Split in two (tile_m = 2 x mma_rows): no sample in use has it, and it once failed to compile (the four-way branch
# was instantiated with a width wider than the tile), so the sweep's --narrow-wgmmas skipped it. Built here only.
MMA_ROWS_HALVES = [TileConfig.from_name("n128_m64_k128_s4_wg1_c2_pw_r32")]


def test_narrow_wgmma_samples_are_under_test():
    assert {config.name for config in MMA_ROWS_SAMPLES} >= {
        "n128_m64_k128_s4_wg1_c2_pw_r16", "n128_m64_k128_s6_wg1_c2_pw_r16_fp8", "n128_m128_k128_s4_wg2_r32"}


@needs_render
@needs_sass
@pytest.mark.parametrize("config", MMA_ROWS_SAMPLES + MMA_ROWS_HALVES, ids=lambda config: config.name)
def test_narrow_wgmmas_issue_every_width_alike(default_kernels, config):
    """mma_rows: the k loop holds each width's WGMMAs (N = mma_rows x 1, 2, 4, ... up to tile_m), as many of each as
    the single-width kernel has of its one (every atom and step of a stage), pipelined (waits of fragment_buffers -
    1, no serialization), and x arrives in boxes of mma_rows rows (the producer's loop over them: one UTMALDG)."""
    try:
        kernel = default_kernels.get(config.name) or compile_kernel(config)
    except CompileError as error:
        kernel = error
    if isinstance(kernel, Exception):
        pytest.fail(f"{config.name} did not compile: {kernel}")
    text = dump_sass(kernel.cubin)
    opcode = "QGMMA" if config.activations == "fp8" else "HGMMA"
    depth = 32 if config.activations == "fp8" else 16
    counts = {n: len(re.findall(rf"{opcode}\.64x{n}x{depth}\.", text)) for n in config.mma_widths}
    per_stage = config.atoms_per_warpgroup * config.k_atoms_per_stage * (64 // depth)
    assert set(counts.values()) == {per_stage}, counts
    summary = kernel.sass()
    assert summary.wgmma_waits.get(config.fragment_buffers - 1, 0) > 0, summary.wgmma_waits
    assert serialized_wgmma(kernel.ptxas_notes) == ()
    assert kernel.resources.spills == 0


def test_narrow_wgmma_configs_name_and_refuse():
    config = TileConfig.from_name("n128_m64_k128_s4_wg1_c2_pw_r16_fp8_swiglu")
    assert (config.mma_rows, config.mma_widths, config.x_box_rows) == (16, (16, 32, 64), 16)
    assert config.name == "n128_m64_k128_s4_wg1_c2_pw_r16_fp8_swiglu"
    plain = TileConfig.from_name("n128_m64_k128_s4_wg1_c2_pw")
    assert (plain.mma_rows, plain.mma_widths, plain.x_box_rows) == (0, (64,), 64)
    assert TileConfig.from_name("n128_m128_k128_s4_wg2_r16").mma_widths == (16, 32, 64, 128)
    for name, reason in (("n128_m64_k128_s4_wg1_c2_pw_r24", "mma_rows=24: a multiple of 8 with tile_m / mma_rows"),
                         ("n128_m64_k128_s4_wg1_c2_pw_r64", "mma_rows=64: a multiple of 8"),
                         ("n128_m128_k128_s4_wg2_r8", "mma_rows=8: a multiple of 8 with tile_m / mma_rows one of"),
                         ("n128_m64_k128_s4_wg2_sk_r16", "not with stream-K or ping-pong"),
                         ("n128_m128_k64_s8_wg2_pp_r32", "not with stream-K or ping-pong")):
        with pytest.raises(ValueError, match=re.escape(reason)):
            TileConfig.from_name(name)
    with pytest.raises(ValueError, match="mma_rows must be 0"):
        TileConfig(mma_rows=-16).validate()


@needs_render
def test_narrow_wgmma_config_renders_its_widths_and_others_render_as_before():
    from codegen.build.render import render

    source = render(TileConfig.from_name("n128_m64_k128_s4_wg1_c2_pw_r16"))
    assert "mxfp4::Epilogue::Store, true, false, false, 2, false, 16>" in source
    assert "template <int Parts>\n  using MmaFor = cute::conditional_t<Parts == 1, cute::SM90::GMMA::MMA_64x16x16" in (
        source)
    assert "cute::conditional_t<Parts == 2, cute::SM90::GMMA::MMA_64x32x16" in source
    plain = render(TileConfig.from_name("n128_m64_k128_s4_wg1_c2_pw"))
    assert "MmaFor" not in plain and "mxfp4::Epilogue::Store, true, false, false> {" in plain


def test_store_paths_follow_the_tile_and_the_shared_memory_left():
    by_name = {config.name: config for config in STORE_PATH_SAMPLES}
    assert [(name, config.store_path, config.line_stage_bytes) for name, config in by_name.items()] == [
        ("n128_m256_k64_s5_wg2", "lines", 9216),  # 2 warpgroups x 32 rows x 144 B
        ("n128_m256_k128_s5_wg2_fp8", "lines", 9216),
        ("n128_m64_k128_s8_wg2_fp8_scatter", "sectors", 0),
        ("n128_m16_k128_s5_wg1_c3", "paired", 0),
        ("n128_m256_k64_s5_wg2_swiglu", "paired", 0)]
    lines = by_name["n128_m256_k64_s5_wg2"]
    assert lines.shared_memory_bytes == by_name["n128_m256_k64_s5_wg2_swiglu"].shared_memory_bytes + 9216
    # A tall tile whose ring leaves no room for the staging area writes sectors instead (and needs no more memory).
    full = TileConfig.from_name("n128_m256_k64_s6_wg2")
    assert full.shared_memory_bytes <= full.max_shared_memory_bytes
    assert full.store_path == "sectors" and full.line_stage_bytes == 0


@needs_render
@needs_sass
@pytest.mark.parametrize(("build", "config"), [(build, config) for build, (_, samples, _) in WIDE_STORE_BUILDS.items()
                                               for config in samples], ids=lambda value: getattr(value, "name", value))
def test_store_builds_keep_the_pipeline_and_store_16_bytes_as_their_path_says(build, config):
    """The paired-stores build's WGMMAs, waits, loads and setmaxnreg, no spill, no serialized WGMMA, and the build's
    16-byte stores (the paired-stores build issues none)."""
    _skip_unless_buildable()
    flags, _, expected = WIDE_STORE_BUILDS[build]
    paired = compile_kernel(config, options=diagnostic_build(paired_stores=True)[0])
    variant = compile_kernel(config, options=_build_options(config, flags))
    a, b = paired.sass(), variant.sass()
    assert (b.hgmma, b.qgmma, b.wgmma_waits, b.utmaldg, b.ublkcp, b.setmaxnreg) == (
        a.hgmma, a.qgmma, a.wgmma_waits, a.utmaldg, a.ublkcp, a.setmaxnreg)
    wide = lambda kernel: len(re.findall(r"\bSTG\.E\.128\b", dump_sass(kernel.cubin)))  # noqa: E731
    assert wide(paired) == 0 and wide(variant) == expected(config)
    assert serialized_wgmma(variant.ptxas_notes) == (), variant.log
    assert variant.resources.spills == 0 and config.register_pool_suffices(variant.resources.registers)


# The epilogue's paired stores (store_tile_paired): one 4-byte store per two output columns of a row, unrolled over
# the tile, beside the plain 2-byte path that covers odd column counts.
PAIRED_STORE_SAMPLES = [TileConfig.from_name(name) for name in (
    "n128_m256_k64_s5_wg2", "n128_m256_k128_s5_wg2_fp8", "n128_m256_k64_s5_wg2_swiglu", "n128_m64_k128_s8_wg2_fp8_scatter")]


@needs_render
@needs_sass
@pytest.mark.parametrize("config", PAIRED_STORE_SAMPLES, ids=lambda config: config.name)
def test_epilogue_stores_column_pairs(config):
    _skip_unless_buildable()
    text = dump_sass(compile_kernel(config).cubin)
    words = len(re.findall(r"\bSTG\.E\s", text))  # 4-byte global stores
    halves = len(re.findall(r"\bSTG\.E\.U16\s", text))
    atoms = config.tile_n // 64 // config.warpgroups
    if config.epilogue == "swiglu":  # a SwiGLU thread holds one output column
        paired = atoms * config.tile_m // 8
        # bf16 pairs, and the e4m3 output's row scales (one loop); 2-byte stores: the plain path's bf16 values and
        # the e4m3 output's column pairs.
        assert (words, halves) == (paired + 1, 2 * paired + paired)
        return
    assert words == atoms * config.tile_m // 8 * 2, (words, halves)
    assert halves == 2 * words  # the plain path: one 2-byte store per value


@needs_render
def test_second_compile_many_is_all_cache_hits(default_kernels):
    first = next(iter(default_kernels.values()))
    if isinstance(first, Exception):
        pytest.skip("the default configs did not compile")
    store = Path(first.cache_path).parent.parent.parent
    again = compile_many(DEFAULT_CONFIGS, jobs=2, progress=False, cache_dir=store)
    assert all(isinstance(k, CompiledKernel) and k.cache_hit for k in again)
    assert [k.cubin for k in again] == [default_kernels[c.name].cubin for c in DEFAULT_CONFIGS]


@needs_toolchain
def test_quantize_kernel_compiles_without_local_memory(tmp_path, monkeypatch):
    """mxfp4.quantize_activations' SM90 kernel: e4m3 conversion with saturation, no spills, no stack."""
    monkeypatch.setenv("HOPPER_MXFP4_CACHE", str(tmp_path))
    from codegen.runtime.quantize import QUANTIZE_ENTRY, render_quantize

    source = render_quantize()
    assert "int32_t const* source_rows;" in source  # the MoE layer's gather, fused (null: row r of x)
    kernel = compile_source(source, "quantize_fp8", entry=QUANTIZE_ENTRY, cache_dir=tmp_path)
    assert kernel.cubin.startswith(ELF_MAGIC)
    assert kernel.resources.spills == 0 and kernel.resources.stack_bytes == 0, kernel.log
    if SASS_MISSING is None:
        summary = kernel.sass()
        assert summary.local_memory == 0
        assert any(name.startswith("F2FP") for name in summary.opcodes), summary.opcodes  # cvt.rn.satfinite.e4m3x2
        # A held row's loads are unrolled (kHeldVectors = 12 per lane, all in flight together), not one per loop trip.
        assert summary.opcodes.get("LDG", 0) >= 12, summary.opcodes


def test_swiglu_line_stores_candidate_is_refused_for_other_epilogues():
    import torch

    from codegen.runtime import launch

    with pytest.raises(ValueError, match="n128_m256_k64_s5_wg2 is not a swiglu config"):
        launch.load(TileConfig.from_name("n128_m256_k64_s5_wg2"), torch.device("cuda"), swiglu_lines=True)


def test_load_refuses_a_device_that_is_not_cuda():
    import torch

    from codegen.runtime import launch

    for device in (torch.device("cpu"), "meta"):
        with pytest.raises(ValueError, match="device: expected a CUDA device, got (cpu|meta)"):
            launch.load(TileConfig.from_name("n128_m256_k64_s5_wg2"), device)
