"""Where the compiler and the headers come from, and whether they work together.

Everything is found from installed packages first (so a plain ``pip install`` is enough):

* CuTe / CUTLASS headers: the ``nvidia-cutlass`` wheel's ``cutlass_library/source/include``.
* CUDA headers: the ``nvidia-cuda-runtime`` wheel's ``nvidia/cu13/include``, else
  ``$CUDA_HOME/include`` (or ``$CUDA_PATH``), else ``/usr/local/cuda/include``.
* CCCL (libcu++, CUB, Thrust): the ``nvidia-cuda-cccl`` wheel's ``nvidia/cu13/include/cccl``, else
  ``<CUDA include>/cccl``.
* NVRTC: ``cuda.bindings.nvrtc`` (which loads ``libnvrtc`` from the ``nvidia-cuda-nvrtc`` wheel or
  the system).

``check_toolchain()`` runs these look-ups once per process and says, in one sentence, what is
missing. TOOLCHAIN.md: the CuTe headers of nvidia-cutlass 4.2 need the CCCL of CUDA 13.0 (CCCL
3.0.x, wheel ``nvidia-cuda-cccl`` 13.0.x); a newer CCCL (13.3) breaks them, so the status warns.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# The CCCL release that nvidia-cutlass 4.2's CuTe headers compile with (CUDA 13.0 ships CCCL 3.0).
SUPPORTED_CCCL = (3, 0)
SUPPORTED_CCCL_WHEEL = "13.0"


class ToolchainError(RuntimeError):
    """The compiler or the headers are not usable; the message says what is missing."""


def _package_dirs(package: str) -> list[Path]:
    """Directories of an installed (possibly namespace) package, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    locations = list(spec.submodule_search_locations or [])
    seen: list[Path] = []
    for location in locations:
        path = Path(location).resolve()
        if path not in seen:
            seen.append(path)
    return seen


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_cutlass_include() -> Path | None:
    """``cutlass_library/source/include`` of the nvidia-cutlass wheel (holds ``cute/`` and ``cutlass/``)."""
    for directory in _package_dirs("cutlass_library"):
        include = directory / "source" / "include"
        if (include / "cute" / "tensor.hpp").is_file() and (include / "cutlass" / "version.h").is_file():
            return include
    return None


def _cuda_home_includes() -> list[Path]:
    roots = [os.environ.get(variable) for variable in ("CUDA_HOME", "CUDA_PATH")]
    roots.append("/usr/local/cuda")
    return [Path(root) / "include" for root in roots if root]


def find_cuda_include() -> Path | None:
    """The CUDA runtime headers (``cuda_runtime.h``, ``cuda_bf16.h``, ...)."""
    candidates = [directory / "cu13" / "include" for directory in _package_dirs("nvidia")]
    candidates += _cuda_home_includes()
    for include in candidates:
        if (include / "cuda_runtime.h").is_file() and (include / "cuda_bf16.h").is_file():
            return include
    return None


def find_cccl_include(cuda_include: Path | None = None) -> Path | None:
    """The CCCL headers (``cuda/std/...``): the nvidia-cuda-cccl wheel, else next to the CUDA headers."""
    candidates = [directory / "cu13" / "include" / "cccl" for directory in _package_dirs("nvidia")]
    if cuda_include is not None:
        candidates.append(cuda_include / "cccl")
    candidates += [include / "cccl" for include in _cuda_home_includes()]
    for include in candidates:
        if (include / "cuda" / "std" / "__cccl" / "version.h").is_file():
            return include
    return None


def _read_defines(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    values: dict[str, int] = {}
    for name in names:
        match = re.search(rf"^\s*#\s*define\s+{name}\s+\(?\s*(\d+)\s*\)?", text, re.MULTILINE)
        if match:
            values[name] = int(match.group(1))
    return values


def cutlass_header_version(cutlass_include: Path) -> str | None:
    """``"4.2.0"`` from ``cutlass/version.h``."""
    defines = _read_defines(cutlass_include / "cutlass" / "version.h", ("CUTLASS_MAJOR", "CUTLASS_MINOR", "CUTLASS_PATCH"))
    if len(defines) != 3:
        return None
    return f"{defines['CUTLASS_MAJOR']}.{defines['CUTLASS_MINOR']}.{defines['CUTLASS_PATCH']}"


def cccl_header_version(cccl_include: Path) -> str | None:
    """``"3.0.1"`` from ``cuda/std/__cccl/version.h`` (``CCCL_VERSION`` = major * 1000000 + minor * 1000 + patch)."""
    defines = _read_defines(cccl_include / "cuda" / "std" / "__cccl" / "version.h", ("CCCL_VERSION",))
    if "CCCL_VERSION" not in defines:
        return None
    version = defines["CCCL_VERSION"]
    return f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"


def cuda_header_version(cuda_include: Path) -> str | None:
    """``"13.5"`` from ``CUDA_VERSION`` in ``cuda.h`` (major * 1000 + minor * 10)."""
    defines = _read_defines(cuda_include / "cuda.h", ("CUDA_VERSION",))
    if "CUDA_VERSION" not in defines:
        return None
    version = defines["CUDA_VERSION"]
    return f"{version // 1000}.{version % 1000 // 10}"


def nvrtc_version() -> tuple[int, int]:
    """NVRTC's (major, minor); raises ToolchainError when libnvrtc cannot be loaded."""
    try:
        from cuda.bindings import nvrtc
    except Exception as error:  # ImportError, or a loader error of the bindings
        raise ToolchainError(f"cuda.bindings.nvrtc cannot be imported ({error}); install cuda-python") from error
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as error:  # libnvrtc not found by the bindings
        raise ToolchainError(f"libnvrtc cannot be loaded ({error}); install nvidia-cuda-nvrtc") from error
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise ToolchainError(f"nvrtcVersion failed: {err!r}")
    return int(major), int(minor)


@dataclass(frozen=True)
class ToolchainStatus:
    """What ``check_toolchain`` found. ``ok``: NVRTC loads and all three header sets were found."""

    ok: bool
    reason: str
    nvrtc_version: tuple[int, int] | None = None
    cutlass_include: Path | None = None
    cuda_include: Path | None = None
    cccl_include: Path | None = None
    cutlass_version: str | None = None  # from cutlass/version.h
    cutlass_package_version: str | None = None  # the nvidia-cutlass wheel
    cccl_version: str | None = None  # from cuda/std/__cccl/version.h, e.g. "3.0.1"
    cccl_package_version: str | None = None  # the nvidia-cuda-cccl wheel, e.g. "13.0.85"
    cuda_version: str | None = None  # CUDA_VERSION of the CUDA headers, e.g. "13.5"
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def include_dirs(self) -> list[Path]:
        """In search order: CuTe/CUTLASS, CCCL, CUDA. Empty when a set is missing."""
        if not (self.cutlass_include and self.cccl_include and self.cuda_include):
            return []
        # CUTLASS built for CUDA 13 spells CCCL headers <cccl/cuda/std/...>, so the directory
        # holding cccl/ goes on the path too (it differs from the CUDA headers' directory when
        # the CCCL wheel and the CUDA headers come from different places).
        ordered = [self.cutlass_include, self.cccl_include, self.cccl_include.parent, self.cuda_include]
        return list(dict.fromkeys(ordered))

    @property
    def nvrtc_version_string(self) -> str | None:
        return None if self.nvrtc_version is None else f"{self.nvrtc_version[0]}.{self.nvrtc_version[1]}"

    def require(self) -> "ToolchainStatus":
        """Raise ToolchainError with the reason unless ``ok``."""
        if not self.ok:
            raise ToolchainError(self.reason)
        return self


def _cccl_warnings(cccl_version: str | None, package_version: str | None) -> list[str]:
    warnings = []
    if cccl_version is not None:
        major_minor = tuple(int(part) for part in cccl_version.split(".")[:2])
        if major_minor != SUPPORTED_CCCL:
            warnings.append(
                f"CCCL {cccl_version} found, but the CuTe headers of nvidia-cutlass 4.2 need CCCL "
                f"{SUPPORTED_CCCL[0]}.{SUPPORTED_CCCL[1]}.x (CUDA 13.0; newer CCCL breaks cute/container); "
                f"pip install 'nvidia-cuda-cccl=={SUPPORTED_CCCL_WHEEL}.*'"
            )
    if package_version is not None and not package_version.startswith(SUPPORTED_CCCL_WHEEL + "."):
        warnings.append(
            f"nvidia-cuda-cccl {package_version} is installed; nvidia-cutlass 4.2 needs the "
            f"{SUPPORTED_CCCL_WHEEL}.x series"
        )
    return warnings


def _probe() -> ToolchainStatus:
    problems: list[str] = []
    version = None
    try:
        version = nvrtc_version()
    except ToolchainError as error:
        problems.append(str(error))

    cutlass_include = find_cutlass_include()
    if cutlass_include is None:
        problems.append("CuTe/CUTLASS headers not found (pip install nvidia-cutlass)")
    cuda_include = find_cuda_include()
    if cuda_include is None:
        problems.append("CUDA headers not found (pip install nvidia-cuda-runtime, or set CUDA_HOME)")
    cccl_include = find_cccl_include(cuda_include)
    if cccl_include is None:
        problems.append("CCCL headers not found (pip install 'nvidia-cuda-cccl==13.0.*', or set CUDA_HOME)")

    cccl_version = cccl_header_version(cccl_include) if cccl_include else None
    cccl_package = _distribution_version("nvidia-cuda-cccl")
    # The wheel's version only matters when its headers are the ones used.
    from_wheel = cccl_include is not None and any(
        cccl_include.is_relative_to(directory) for directory in _package_dirs("nvidia")
    )
    warnings = _cccl_warnings(cccl_version, cccl_package if from_wheel else None)

    ok = not problems
    if ok:
        reason = f"NVRTC {version[0]}.{version[1]}, CUTLASS {cutlass_header_version(cutlass_include)}, CCCL {cccl_version}"
        if warnings:
            reason += "; warning: " + "; ".join(warnings)
    else:
        reason = "; ".join(problems + [f"warning: {w}" for w in warnings])
    return ToolchainStatus(
        ok=ok,
        reason=reason,
        nvrtc_version=version,
        cutlass_include=cutlass_include,
        cuda_include=cuda_include,
        cccl_include=cccl_include,
        cutlass_version=cutlass_header_version(cutlass_include) if cutlass_include else None,
        cutlass_package_version=_distribution_version("nvidia-cutlass"),
        cccl_version=cccl_version,
        cccl_package_version=cccl_package,
        cuda_version=cuda_header_version(cuda_include) if cuda_include else None,
        warnings=tuple(warnings),
    )


@functools.lru_cache(maxsize=1)
def check_toolchain() -> ToolchainStatus:
    """Find NVRTC and the headers once per process; never raises (see ``.ok`` and ``.reason``)."""
    return _probe()


def include_dirs() -> list[Path]:
    """The include directories for NVRTC; raises ToolchainError when the toolchain is incomplete."""
    return check_toolchain().require().include_dirs
