"""The verbs generate, compile and doctor, and ``main`` (``python -m codegen``, ``hopper-mxfp4``).

Exit codes: 0 success, 1 a failure or a difference (a compile error, ``generate --check`` found a
stale directory), 2 a bad command line or an invalid config.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from mxfp4.format.layout import ATOM_K, ATOM_N

from ..build import config as limits
from ..build.config import DEFAULT_CONFIGS, TileConfig
from .common import UsageError, add_verb, parse_each, positive_int

# The help states the limits that TileConfig.validate() enforces, read from where they are declared.
_FIELD_FLAGS = (
    ("tile_n", "--tile-n", f"weight rows (N) per CTA, a multiple of {ATOM_N} x warpgroups, "
     f"at most {limits.MAX_ATOMS_PER_WARPGROUP} x {ATOM_N} rows per warpgroup"),
    ("tile_m", "--tile-m", "tokens per CTA (WGMMA's N), a multiple of 8 in {}..{}".format(*limits.TILE_M_RANGE)),
    ("tile_k", "--tile-k", f"K per pipeline stage, a multiple of {ATOM_K} up to {limits.MAX_TILE_K}"),
    ("stages", "--stages", f"pipeline depth, at least {limits.MIN_STAGES} (shared memory bounds it)"),
    ("warpgroups", "--warpgroups", f"consumer warpgroups, one of {', '.join(map(str, limits.WARPGROUP_CHOICES))}"),
    ("fragment_buffers", "--fragment-buffers",
     f"register buffers of decoded weights per consumer warpgroup, one of "
     f"{', '.join(map(str, limits.FRAGMENT_BUFFER_CHOICES))} (more than 2 needs tile_k >= 128)"),
)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "config selection",
        "Default: the shipped DEFAULT_CONFIGS. --config NAME (repeatable) names configs; the field "
        "flags build one more config, unset fields taking TileConfig's defaults "
        f"({TileConfig().name}).",
    )
    group.add_argument(
        "--config", action="append", default=[], metavar="NAME", help="a config name, e.g. n128_m64_k128_s4_wg2"
    )
    for field_name, flag, text in _FIELD_FLAGS:
        group.add_argument(flag, dest=field_name, type=int, default=None, metavar="INT", help=text)


def select_configs(args: argparse.Namespace) -> list[TileConfig]:
    """The configs a command line selects; raises UsageError with validate()'s sentence."""
    configs = parse_each(args.config, TileConfig.from_name, "invalid config {text!r}")
    fields = {name: getattr(args, name) for name, _, _ in _FIELD_FLAGS if getattr(args, name) is not None}
    if fields:
        config = TileConfig(**fields)
        try:
            config.validate()
        except ValueError as error:
            raise UsageError(f"invalid config {config.name}: {error}") from None
        configs.append(config)
    if not configs:
        configs = list(DEFAULT_CONFIGS)
    unique: dict[str, TileConfig] = {}
    for config in configs:
        unique.setdefault(config.name, config)
    return list(unique.values())


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from ..build.generate import check, generate

    configs = select_configs(args)
    out = Path(args.out) if args.out else None
    where = str(out) if out else "generated/"
    if args.check:
        differences = check(configs, out)
        if differences:
            print(f"{where} is stale ({len(differences)} difference(s)); run: python -m codegen generate", file=sys.stderr)
            for difference in differences:
                print(f"  {difference}")
            return 1
        print(f"{where} is up to date ({len(configs)} config(s))")
        return 0
    try:
        changed = generate(configs, out)
    except OSError as error:  # --out under a file, a read-only directory, a full disk: say so, no traceback
        print(f"generate: error: cannot write {where}: {error.strerror or error} ({error.filename or where})", file=sys.stderr)
        return 1
    for path in changed:
        print(f"{'removed' if not path.exists() else 'wrote'} {path}")
    print(f"{len(configs)} config(s) in {where}: {len(changed)} file(s) changed")
    return 0


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(width) if i else str(cell).ljust(width) for i, (cell, width) in enumerate(zip(row, widths))) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


_COMPILE_COLUMNS = ["config", "regs", "dyn smem B", "spill st/ld", "stack", "compile s", "cache"]
# "in flight": the deepest wgmma.wait_group N in the SASS, the WGMMA groups a consumer keeps in flight while it
# decodes (fragment_buffers - 1); 0 where ptxas serialized the WGMMAs.
_SASS_COLUMNS = ["HGMMA", "QGMMA", "TMA", "LDL/STL", "setmaxnreg", "in flight"]


@dataclass
class _CompileReport:
    """The compile verb's output: table rows, JSON records, warnings and the configs that failed."""

    with_sass: bool
    rows: list[list[str]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    failures: list[tuple[TileConfig, BaseException]] = field(default_factory=list)

    @property
    def header(self) -> list[str]:
        return _COMPILE_COLUMNS + (_SASS_COLUMNS if self.with_sass else [])

    def add(self, config: TileConfig, result) -> None:
        from ..build.compiler import CompiledKernel

        if not isinstance(result, CompiledKernel):
            self.failures.append((config, result))
            self.rows.append([config.name, "FAILED"] + [""] * (len(self.header) - 2))
            self.records.append({"config": config.name, "ok": False, "error": str(result)})
            return
        r = result.resources
        # The shared memory a launch asks for is the config's dynamic size (ptxas reports static only).
        kept = bool(result.cache_path)  # empty when the cache could not take the cubin
        row = [config.name, str(r.registers), str(config.shared_memory_bytes), f"{r.spill_stores}/{r.spill_loads}",
               str(r.stack_bytes), f"{result.compile_seconds:.1f}",
               "hit" if result.cache_hit else "miss" if kept else "not kept"]
        record = {
            "config": config.name, "ok": True, "resources": asdict(r), "dynamic_smem_bytes": config.shared_memory_bytes,
            "store_path": config.store_path,
            "compile_seconds": result.compile_seconds, "cache_hit": result.cache_hit, "cached": kept,
            "cubin_bytes": len(result.cubin), "ptxas_notes": list(result.ptxas_notes),
        }
        if r.spills or r.stack_bytes:
            self.problems.append(f"{config.name}: {r.spill_stores} B spill stores, {r.spill_loads} B spill loads, {r.stack_bytes} B stack")
        if self.with_sass:
            row += self._sass_cells(config, result, record)
        self.rows.append(row)
        self.records.append(record)

    def _sass_cells(self, config: TileConfig, result, record: dict) -> list[str]:
        from ..build.sass import SassUnavailable

        try:
            sass = result.sass()
        except (SassUnavailable, RuntimeError, OSError) as error:
            record["sass_error"] = str(error)
            return ["?"] * len(_SASS_COLUMNS)
        record["sass"] = {k: v for k, v in asdict(sass).items() if k != "opcodes"}
        if sass.local_memory:
            self.problems.append(f"{config.name}: {sass.ldl} LDL / {sass.stl} STL (local memory)")
        in_flight = str(max(sass.wgmma_waits)) if sass.wgmma_waits else "-"
        return [str(sass.hgmma), str(sass.qgmma), str(sass.tma), f"{sass.ldl}/{sass.stl}", "yes" if sass.setmaxnreg else "no",
                in_flight]


def _print_failure(config: TileConfig, error: BaseException, verbose: bool) -> None:
    text = str(error)
    if not verbose:
        lines = text.splitlines()
        text = "\n".join(lines[:25] + ([f"... ({len(lines) - 25} more lines; --verbose shows all)"] if len(lines) > 25 else []))
    print(f"error: {config.name}: {type(error).__name__}: {text}", file=sys.stderr)


def _say_if_nothing_is_kept() -> None:
    """Before compiling: a cache that cannot be written keeps none of the cubins (the table says "not kept")."""
    from ..build import cache

    problem = cache.unusable_reason()
    if problem is None:
        return
    print(f"warning: the kernel cache {cache.cache_dir()} is not usable ({problem}): the kernels are compiled but "
          "NOT cached, so every process compiles them again. Point HOPPER_MXFP4_CACHE at a writable directory "
          "('python -m codegen doctor' checks it).", file=sys.stderr)
    cache.mark_warned()  # said here, in full: the library's RuntimeWarning would only repeat it


def cmd_compile(args: argparse.Namespace) -> int:
    from ..build.compiler import CompiledKernel, compile_many
    from ..build.sass import sass_unavailable_reason
    from ..build.toolchain import check_toolchain

    configs = select_configs(args)
    status = check_toolchain()
    if not status.ok:
        print(f"error: the toolchain is not usable: {status.reason}", file=sys.stderr)
        return 1
    for warning in status.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _say_if_nothing_is_kept()
    options = {"use_cache": not args.no_cache, **({"options": ["-lineinfo"]} if args.lineinfo else {})}
    results = compile_many(configs, jobs=args.jobs, progress=not args.quiet, **options)
    no_sass = None if args.no_sass else sass_unavailable_reason()
    report = _CompileReport(with_sass=not args.no_sass and no_sass is None)
    for config, result in zip(configs, results):
        report.add(config, result)
    if args.json:
        print(json.dumps(report.records, indent=2))
    else:
        print(_table(report.rows, report.header))
        if no_sass and not args.no_sass:
            print(f"(no SASS columns: {no_sass})")
        for config, result in zip(configs, results):
            for note in result.ptxas_notes if isinstance(result, CompiledKernel) else ():
                print(f"{config.name}: {note}")
    for message in report.problems:
        print(f"warning: {message}", file=sys.stderr)
    for config, error in report.failures:
        _print_failure(config, error, args.verbose)
    return 1 if report.failures or (args.strict and report.problems) else 0


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------


def _gpu_lines() -> tuple[list[str], bool]:
    try:
        import torch
    except ImportError:
        return ["GPU:          unknown (torch is not installed)"], False
    lines = [f"torch:        {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})"]
    try:
        available = torch.cuda.is_available()
    except Exception as error:  # a broken driver
        return lines + [f"GPU:          no CUDA device ({error})"], False
    if not available:
        return lines + ["GPU:          no CUDA device"], False
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        hopper = " (Hopper, SM90)" if (major, minor) == (9, 0) else ""
        lines.append(f"GPU {index}:        {name}, compute capability {major}.{minor}{hopper}")
    return lines, True


def _path_lines(has_cuda: bool, toolchain_ok: bool, toolchain_reason: str) -> list[str]:
    try:
        from mxfp4.ops import dispatch
    except Exception as error:
        dispatch = None
        import_error = error
    if dispatch is not None and hasattr(dispatch, "describe_machine"):
        try:
            described = dispatch.describe_machine()
        except Exception as error:
            return [f"path:         mxfp4.ops.dispatch.describe_machine() failed: {type(error).__name__}: {error}"]
        if isinstance(described, dict):
            return [f"{key + ':':<13} {value}" for key, value in described.items()]
        return ["path:         " + line if i == 0 else "              " + line for i, line in enumerate(str(described).splitlines())]
    if dispatch is not None and hasattr(dispatch, "select_path"):
        try:
            choice = dispatch.select_path("cuda" if has_cuda else "cpu")
            return [f"path:         {choice.path}: {choice.reason}"]
        except Exception as error:
            return [f"path:         mxfp4.ops.dispatch.select_path failed: {type(error).__name__}: {error}"]
    # Our own summary when mxfp4.ops.dispatch is not there.
    note = "" if dispatch is not None else f" (mxfp4.ops.dispatch unavailable: {import_error})"
    if not has_cuda:
        return [f"path:         portable (decode in torch + bf16 matmul): no CUDA device{note}"]
    if not toolchain_ok:
        return [f"path:         portable: the toolchain is not usable: {toolchain_reason}{note}"]
    return [f"path:         sm90 kernel if the GPU is SM90, else portable{note}"]


def _fallback_budget_line(has_cuda: bool) -> str:
    """The portable path's memory budget and where it comes from, or why every portable call would fail."""
    try:
        from mxfp4.portable import weight_cache
    except Exception as error:
        return f"fallback:     unknown (mxfp4.portable.weight_cache unavailable: {type(error).__name__}: {error})"
    try:
        budget, source = weight_cache.fallback_memory_budget("cuda" if has_cuda else "cpu")
    except ValueError as error:  # a bad HOPPER_MXFP4_FALLBACK_BUDGET: every portable-path call raises it
        return f"fallback:     PROBLEM: {error}; every call on the portable path fails until it is fixed or unset"
    return f"fallback:     decoded-weight budget {weight_cache.format_bytes(budget)} ({source})"


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..build import cache
    from ..build.sass import find_cuobjdump, find_nvdisasm
    from ..build.toolchain import check_toolchain

    lines, has_cuda = _gpu_lines()
    status = check_toolchain()
    lines.append(f"NVRTC:        {status.nvrtc_version_string or 'not loadable'}")
    cutlass = status.cutlass_version or "not found"
    if status.cutlass_package_version:
        cutlass += f" (nvidia-cutlass {status.cutlass_package_version})"
    lines.append(f"CUTLASS:      {cutlass}{'  ' + str(status.cutlass_include) if status.cutlass_include else ''}")
    cccl = status.cccl_version or "not found"
    if status.cccl_package_version:
        cccl += f" (nvidia-cuda-cccl {status.cccl_package_version})"
    lines.append(f"CCCL:         {cccl}{'  ' + str(status.cccl_include) if status.cccl_include else ''}")
    lines.append(
        f"CUDA headers: {status.cuda_version or 'not found'}{'  ' + str(status.cuda_include) if status.cuda_include else ''}"
    )
    lines.append(f"toolchain:    {'ok' if status.ok else 'NOT USABLE'}: {status.reason}")
    lines.append(f"cuobjdump:    {find_cuobjdump() or 'not found (SASS checks skipped)'}")
    lines.append(f"nvdisasm:     {find_nvdisasm() or 'not found (cuobjdump -sass needs it)'}")
    root = cache.cache_dir()
    found = cache.entries()
    size = sum(len(entry.cubin) for entry in found)
    lines.append(f"cache:        {root}  ({len(found)} cubin(s), {size / 1e6:.1f} MB)")
    problem = cache.unusable_reason()
    if problem:
        lines.append(f"              PROBLEM: not usable ({problem}): kernels are compiled again in every process; "
                     "set HOPPER_MXFP4_CACHE to a writable directory")
    lines += _path_lines(has_cuda, status.ok, status.reason)
    lines.append(_fallback_budget_line(has_cuda))
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------


# Each verb's help, description and examples.
_GENERATE_TEXT = dict(
    help="write the rendered .cu sources and manifest.json to generated/",
    description="Render the selected configs to <out>/<config>.cu plus manifest.json (sha256 of every "
    "source and template file, nvidia-cutlass version). --check compares instead of writing and exits 1 "
    "when the directory is stale.",
    epilog="examples:\n  python -m codegen generate\n  python -m codegen generate --check\n"
    "  python -m codegen generate --config n128_m64_k128_s4_wg2 --out /tmp/kernels\n"
    "  python -m codegen generate --tile-n 256 --tile-m 32 --stages 6 --out /tmp/kernels",
)
_COMPILE_TEXT = dict(
    help="compile configs to sm_90a cubins (cached) and report their resources",
    description="Compile the selected configs with NVRTC into the disk cache (no GPU needed) and print, per "
    "config: registers, the dynamic shared memory it launches with (dyn smem B: TileConfig.shared_memory_bytes; "
    "ptxas's static figure stays in --json's resources), spill stores/loads, stack, compile seconds, cache hit "
    "and, where cuobjdump + nvdisasm are installed, SASS counts (HGMMA: bf16 WGMMA, QGMMA: FP8 WGMMA, TMA, LDL/STL, setmaxnreg). "
    "Exits 1 if any config fails to compile.",
    epilog="examples:\n  python -m codegen compile\n  python -m codegen compile --config n128_m64_k128_s4_wg2 --jobs 1\n"
    "  python -m codegen compile --tile-m 128 --stages 5 --strict\n  python -m codegen compile --json > resources.json",
)
_DOCTOR_TEXT = dict(
    help="describe the machine: GPU, NVRTC, headers, cache, the path mxfp4.grouped_mm takes",
    description="Print the GPU and its compute capability, the NVRTC version, the include directories and "
    "header versions found (CUTLASS, CCCL, CUDA), cuobjdump/nvdisasm, the cache directory and the path "
    "mxfp4.grouped_mm will take (the SM90 kernel or the portable torch path) and why.",
    epilog="example:\n  python -m codegen doctor",
)


def _add_generate(commands) -> None:
    generate = add_verb(commands, "generate", cmd_generate, **_GENERATE_TEXT)
    _add_selection(generate)
    generate.add_argument("--out", metavar="DIR", help="output directory (default: the repository's generated/)")
    generate.add_argument("--check", action="store_true", help="compare with DIR instead of writing; exit 1 if stale")


def _add_compile(commands) -> None:
    compile_ = add_verb(commands, "compile", cmd_compile, **_COMPILE_TEXT)
    _add_selection(compile_)
    compile_.add_argument("--jobs", "-j", type=positive_int, default=None, metavar="N", help="parallel compiles (default: CPUs)")
    compile_.add_argument("--no-cache", action="store_true", help="recompile even when the cache has the cubin")
    compile_.add_argument("--lineinfo", action="store_true", help="compile with -lineinfo (for profilers)")
    compile_.add_argument("--no-sass", action="store_true", help="skip the SASS columns")
    compile_.add_argument("--strict", action="store_true", help="also exit 1 on spills, stack or local memory")
    compile_.add_argument("--json", action="store_true", help="print JSON records instead of the table")
    compile_.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    compile_.add_argument("--verbose", "-v", action="store_true", help="print NVRTC's whole log on failure")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m codegen",
        description="hopper-mxfp4 kernel generator: render, compile and inspect the SM90 MXFP4 grouped GEMM.",
        epilog="examples:\n  python -m codegen doctor\n  python -m codegen generate --check\n"
        "  python -m codegen compile --config n128_m64_k128_s4_wg2\n"
        "  python -m codegen tune --model gpt-oss-20b --m 1,16,256\n  python -m codegen bench --quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_generate(commands)
    _add_compile(commands)
    add_verb(commands, "doctor", cmd_doctor, **_DOCTOR_TEXT)
    from .tune import register as register_tune

    register_tune(commands)
    _register_bench(commands)
    return parser


def _register_bench(commands) -> None:
    """The bench verb: ``benchmarks`` in a checkout, ``hopper_mxfp4_bench`` in an installed wheel."""
    for module in ("benchmarks.cli", "hopper_mxfp4_bench.cli"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ImportError as error:
            reason = f"{module}: {error}"
            continue
        register(commands)
        return
    bench = commands.add_parser("bench", help="side-by-side benchmarks (unavailable: see `bench --help`)",
                                description=f"The benchmarks could not be imported ({reason}).")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    bench.set_defaults(handler=lambda args: _bench_unavailable(reason))


def _bench_unavailable(reason: str) -> int:
    print(f"bench: the benchmarks are not importable ({reason}); reinstall hopper-mxfp4 "
          "(they ship as hopper_mxfp4_bench) or run from a checkout", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UsageError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

