"""Load compiled kernels with the CUDA driver API and launch them on torch's current stream.

Nothing here synchronizes with the device or allocates: the caller passes the output, the tensor
map is encoded on the host, and the launch is captured by CUDA graphs like any other.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch
from cuda.bindings import driver

from .config import TileConfig
from .cuda_result import as_text, unwrap
from .params import PARAMS_SIZE, TENSOR_MAP_BYTES, pack_params
from .render import ENTRY_POINT

_X_BOX_K = 64  # one 128-byte swizzled row of bf16


class DriverError(RuntimeError):
    """A CUDA driver call failed."""


def check(result: tuple, what: str):
    """Unwrap a cuda.bindings ``(CUresult, *values)`` tuple, raising with the driver's error name."""

    def error(status) -> DriverError:
        _, name = driver.cuGetErrorName(status)
        _, text = driver.cuGetErrorString(status)
        return DriverError(f"{what} failed: {as_text(name)} ({as_text(text)})")

    return unwrap(result, driver.CUresult.CUDA_SUCCESS, error)


@dataclass(frozen=True)
class LoadedKernel:
    config: TileConfig
    module: driver.CUmodule
    function: driver.CUfunction
    shared_memory: int
    multiprocessors: int


_loaded: dict[tuple[int, str], LoadedKernel] = {}
_lock = threading.Lock()


def _make_context_current(device: torch.device) -> None:
    """Make the device's primary context (the one torch uses) current on this thread."""
    torch.cuda.init()
    check(driver.cuInit(0), "cuInit")
    current = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    cu_device = check(driver.cuDeviceGet(device.index), "cuDeviceGet")
    primary = check(driver.cuDevicePrimaryCtxRetain(cu_device), "cuDevicePrimaryCtxRetain")
    if int(current) != int(primary):
        check(driver.cuCtxSetCurrent(primary), "cuCtxSetCurrent")


def load(config: TileConfig, device: torch.device) -> LoadedKernel:
    """The kernel for ``config`` loaded on ``device``: compiled (disk-cached) on first use, then cached."""
    key = (device.index, config.name)
    kernel = _loaded.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _loaded.get(key)
        if kernel is None:
            from .compiler import compile_kernel

            compiled = compile_kernel(config)
            if not config.register_pool_suffices(compiled.resources.registers):
                raise RuntimeError(
                    f"{config.name}: compiled with {compiled.resources.registers} registers per thread, too few "
                    f"for setmaxnreg to give {config.warpgroups} consumer warpgroups {config.consumer_registers} "
                    "each; refusing to launch a kernel that would hang"
                )
            with torch.cuda.device(device):
                _make_context_current(device)
                module = check(driver.cuModuleLoadData(compiled.cubin), f"cuModuleLoadData({config.name})")
                function = check(driver.cuModuleGetFunction(module, ENTRY_POINT.encode()), "cuModuleGetFunction")
                check(
                    driver.cuFuncSetAttribute(
                        function,
                        driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        config.shared_memory_bytes,
                    ),
                    f"raising the shared-memory limit of {config.name} to {config.shared_memory_bytes} bytes",
                )
            multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
            kernel = LoadedKernel(config, module, function, config.shared_memory_bytes, multiprocessors)
            _loaded[key] = kernel
    return kernel


def encode_x_map(x2d: torch.Tensor, tile_m: int) -> bytes:
    """TMA descriptor of x as [rows, K] bf16, boxes of tile_m rows x 64 K, 128-byte swizzle."""
    rows, k = x2d.shape
    tensor_map = check(
        driver.cuTensorMapEncodeTiled(
            driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            driver.cuuint32_t(2),
            x2d.data_ptr(),
            [driver.cuuint64_t(k), driver.cuuint64_t(rows)],
            [driver.cuuint64_t(k * x2d.element_size())],
            [driver.cuuint32_t(_X_BOX_K), driver.cuuint32_t(tile_m)],
            [driver.cuuint32_t(1), driver.cuuint32_t(1)],
            driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
            driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
            driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        ),
        "cuTensorMapEncodeTiled(x)",
    )
    return ctypes.string_at(tensor_map.getPtr(), TENSOR_MAP_BYTES)


def grid_size(config: TileConfig, kernel: LoadedKernel, *, rows: int, num_experts: int, n: int,
              masked: bool, max_m: int) -> int:
    """CTAs to launch: one per SM, fewer when the routing cannot produce that many tiles."""
    n_tiles = -(-n // config.tile_n)
    if masked:
        m_tiles = num_experts * -(-max_m // config.tile_m)
    else:  # each expert adds at most one partial tile to rows / tile_m
        m_tiles = rows // config.tile_m + num_experts
    return max(1, min(kernel.multiprocessors, m_tiles * n_tiles))


def grouped_mm_sm90(x: torch.Tensor, w_data: torch.Tensor, n: int, k: int, rows: torch.Tensor,
                    masked: bool, config: TileConfig, out: torch.Tensor) -> None:
    """Launch the SM90 kernel: ``out[rows of e] = x[rows of e] @ W_e^T`` for every expert e.

    x: bf16 contiguous ``[T, K]`` (contiguous mode) or ``[E, max_m, K]`` (masked mode);
    w_data: ``PackedMXFP4.data``; rows: ``offsets`` [E+1] or ``masked_m`` [E], int32 or int64;
    out: bf16 ``[T, N]`` or ``[E, max_m, N]``. Inputs are validated by the op (mxfp4.ops).
    """
    x2d = x.reshape(-1, k)
    total_rows = x2d.shape[0]
    if total_rows == 0 or n == 0:
        return
    if x2d.data_ptr() % 16 or (k * 2) % 16:
        raise ValueError("x: the TMA engine needs a 16-byte aligned base address and row pitch")
    num_experts, n_atoms, k_atoms, _ = w_data.shape
    max_m = x.shape[1] if masked else 0
    kernel = load(config, x.device)
    params = pack_params(
        encode_x_map(x2d, config.tile_m),
        w=w_data.data_ptr(),
        out=out.data_ptr(),
        rows=rows.data_ptr(),
        num_experts=num_experts,
        n=n,
        n_atoms=n_atoms,
        k_atoms=k_atoms,
        max_m=max_m,
        total_rows=total_rows,
        masked=int(masked),
        rows_int64=int(rows.dtype == torch.int64),
    )
    block = (ctypes.c_char * PARAMS_SIZE).from_buffer(params)
    argument_pointers = (ctypes.c_void_p * 1)(ctypes.addressof(block))
    grid = grid_size(config, kernel, rows=total_rows, num_experts=num_experts, n=n, masked=masked, max_m=max_m)
    stream = driver.CUstream(torch.cuda.current_stream(x.device).cuda_stream)
    check(
        driver.cuLaunchKernel(
            kernel.function, grid, 1, 1, config.threads, 1, 1, kernel.shared_memory, stream,
            ctypes.addressof(argument_pointers), 0,
        ),
        f"cuLaunchKernel({config.name})",
    )
