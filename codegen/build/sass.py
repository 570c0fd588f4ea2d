"""SASS of a cubin (``cuobjdump -sass``) and a summary of the instructions that matter here.

The grouped GEMM must show ``HGMMA`` (bf16 wgmma.mma_async; ``QGMMA`` for the FP8 W4A8 family), TMA (``UTMALDG`` for a tensor-map load,
``UBLKCP`` for a plain bulk copy), ``USETMAXREG`` (setmaxnreg) and no local memory (``LDL`` /
``STL``: spills or a stack array).

``cuobjdump -sass`` needs ``nvdisasm`` beside it or on PATH. Both are found on PATH, in the
``nvidia-cuda-cuobjdump`` / ``nvidia-cuda-nvdisasm`` wheels (``<site-packages>/nvidia/cu13/bin``),
under ``$CUDA_HOME/bin`` or ``/usr/local/cuda/bin``; ``$NVDISASM_PATH`` (cuobjdump's own variable,
a directory) is honoured too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .toolchain import _package_dirs


class SassUnavailable(RuntimeError):
    """cuobjdump or nvdisasm is not installed."""


class SassError(RuntimeError):
    """cuobjdump failed on the cubin."""


def _tool_dirs() -> list[Path]:
    dirs = [directory / "cu13" / "bin" for directory in _package_dirs("nvidia")]
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            dirs.append(Path(os.environ[variable]) / "bin")
    dirs.append(Path("/usr/local/cuda/bin"))
    return dirs


def _find_tool(name: str, extra_dirs: list[Path] = ()) -> Path | None:
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    for directory in list(extra_dirs) + _tool_dirs():
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_cuobjdump() -> Path | None:
    """cuobjdump: PATH, then the nvidia-cuda-cuobjdump wheel, then $CUDA_HOME/bin, /usr/local/cuda/bin."""
    return _find_tool("cuobjdump")


def find_nvdisasm() -> Path | None:
    """nvdisasm (which ``cuobjdump -sass`` runs): $NVDISASM_PATH, PATH, the wheels, the CUDA toolkit."""
    extra = [Path(os.environ["NVDISASM_PATH"])] if os.environ.get("NVDISASM_PATH") else []
    for directory in extra:
        candidate = directory / "nvdisasm"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return _find_tool("nvdisasm")


def sass_unavailable_reason() -> str | None:
    """None when SASS can be dumped, else a sentence saying what to install."""
    if find_cuobjdump() is None:
        return "cuobjdump not found (pip install nvidia-cuda-cuobjdump, or put the CUDA toolkit's bin on PATH)"
    if find_nvdisasm() is None:
        return "nvdisasm not found; cuobjdump -sass needs it (pip install nvidia-cuda-nvdisasm)"
    return None


def dump_sass(cubin: bytes) -> str:
    """The text of ``cuobjdump -sass`` for a cubin."""
    reason = sass_unavailable_reason()
    if reason:
        raise SassUnavailable(reason)
    cuobjdump = find_cuobjdump()
    nvdisasm = find_nvdisasm()
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(nvdisasm.parent), env.get("PATH", "")])
    with tempfile.TemporaryDirectory(prefix="hopper-mxfp4-sass-") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run(
            [str(cuobjdump), "-sass", str(path)], capture_output=True, text=True, env=env, timeout=300
        )
    if result.returncode != 0:
        raise SassError(f"cuobjdump -sass failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


# An instruction line: "/*0170*/   @!P0 HGMMA.64x64x16.F32.BF16 R24, ... ;"
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.MULTILINE)
# wgmma.wait_group N: "WARPGROUP.DEPBAR.LE gsb0, 0x1 ;" (N WGMMA groups may stay in flight).
_WGMMA_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*0x([0-9a-fA-F]+)")
# ptxas's no-op WGMMA where paths with WGMMAs of other widths meet (TileConfig.mma_rows): no operands, so no product.
_WGMMA_FENCE = re.compile(r"HGMMA\.64x8x16\.F16\s+RZ\s*,\s*gdesc\[URZ\]\s*,\s*RZ")
TMA_OPCODES = ("UTMALDG", "UTMASTG", "UTMAPF", "UTMACCTL", "UTMAREDG", "UBLKCP", "UBLKPF", "UBLKRED")


@dataclass(frozen=True)
class SassSummary:
    """Instruction counts of one cubin (all functions together)."""

    functions: tuple[str, ...]
    instructions: int
    hgmma: int  # wgmma.mma_async (bf16), not counting wgmma_fences
    utmaldg: int  # TMA tensor loads (cp.async.bulk.tensor)
    ublkcp: int  # bulk copies (cp.async.bulk, no tensor map)
    tma_other: int  # other TMA / bulk opcodes (stores, prefetch, reductions, descriptor control)
    ldl: int  # local memory loads
    stl: int  # local memory stores
    setmaxnreg: bool  # USETMAXREG present
    warpgroup_arrive: int
    opcodes: dict[str, int] = field(default_factory=dict)  # base opcode -> count
    qgmma: int = 0  # FP8 wgmma.mma_async (e4m3/e5m2): the W4A8 family
    # wgmma.wait_group N -> how many: a pipelined kernel waits with N = fragment buffers - 1 in its k loop; ptxas
    # serializing the WGMMAs shows as waits with N = 0 only.
    wgmma_waits: dict[int, int] = field(default_factory=dict)
    # ptxas's operand-less HGMMAs where branches with WGMMAs of other widths join (narrow WGMMAs, TileConfig.mma_rows).
    wgmma_fences: int = 0

    @property
    def tma(self) -> int:
        """Every TMA / bulk-copy instruction."""
        return self.utmaldg + self.ublkcp + self.tma_other

    @property
    def local_memory(self) -> int:
        return self.ldl + self.stl


def summarize_sass(text: str) -> SassSummary:
    """Count the opcodes of ``cuobjdump -sass`` output."""
    opcodes: Counter[str] = Counter()
    variants: Counter[str] = Counter()
    for match in _INSTRUCTION.finditer(text):
        opcode = match.group(1)
        opcodes[opcode] += 1
        variants[opcode + match.group(2)] += 1
    warpgroup_arrive = sum(count for name, count in variants.items() if name.startswith("WARPGROUP.ARRIVE"))
    fences = len(_WGMMA_FENCE.findall(text))
    return SassSummary(
        functions=tuple(_FUNCTION.findall(text)),
        instructions=sum(opcodes.values()),
        hgmma=opcodes["HGMMA"] - fences,
        utmaldg=opcodes["UTMALDG"],
        ublkcp=opcodes["UBLKCP"],
        tma_other=sum(opcodes[name] for name in TMA_OPCODES if name not in ("UTMALDG", "UBLKCP")),
        ldl=opcodes["LDL"],
        stl=opcodes["STL"],
        setmaxnreg=opcodes["USETMAXREG"] > 0,
        warpgroup_arrive=warpgroup_arrive,
        opcodes=dict(sorted(opcodes.items())),
        qgmma=opcodes["QGMMA"],
        wgmma_waits=dict(sorted(Counter(int(n, 16) for n in _WGMMA_WAIT.findall(text)).items())),
        wgmma_fences=fences,
    )


def summarize_cubin(cubin: bytes) -> SassSummary:
    """``summarize_sass(dump_sass(cubin))``."""
    return summarize_sass(dump_sass(cubin))


SIDECAR = "sass.json"


def summarize_cubin_cached(cubin: bytes, entry_dir: Path | None) -> SassSummary:
    """``summarize_cubin``, remembered in ``entry_dir/sass.json`` (a cache entry's directory)."""
    from .cache import sha256_bytes

    digest = sha256_bytes(cubin)
    sidecar = entry_dir / SIDECAR if entry_dir is not None else None
    if sidecar is not None:
        try:
            data = json.loads(sidecar.read_text())
            # A sidecar written before a field existed is recomputed rather than read with that field's default.
            if data.pop("cubin_sha256") == digest and set(data) == {f.name for f in fields(SassSummary)}:
                data["functions"] = tuple(data["functions"])
                data["wgmma_waits"] = {int(n): count for n, count in data["wgmma_waits"].items()}
                return SassSummary(**data)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    summary = summarize_cubin(cubin)
    if sidecar is not None and entry_dir.is_dir():
        try:
            fd, temporary = tempfile.mkstemp(prefix=".sass.", dir=entry_dir)
            with os.fdopen(fd, "w") as handle:
                json.dump(dict(asdict(summary), cubin_sha256=digest), handle)
            os.replace(temporary, sidecar)
        except OSError:
            pass
    return summary
