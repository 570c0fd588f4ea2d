"""Load compiled kernels with the CUDA driver API and launch them on torch's current stream.

Nothing here synchronizes with the device or allocates: the caller passes the output, the tensor
map is encoded on the host, and the launch is captured by CUDA graphs like any other. Loading runs
once per (device, config) through cuda-bindings; the per-call encode and launch go through
codegen.runtime.fast_driver, whose plain-integer calls cost a few microseconds.
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass

import torch
from cuda.bindings import driver

from codegen.build.config import TileConfig
from codegen.build.cuda_result import as_text, unwrap
from codegen.build.params import PARAMS_SIZE, PARAMS_STRUCT, TENSOR_MAP_BYTES
from codegen.build.render import ENTRY_POINT

from .candidates import candidate_flags, line_stage_room
from .dependent_launch import dependent_launch_enabled
from .fast_driver import (
    TMA_BFLOAT16,
    TMA_UINT8,
    DriverError,
    encode_2d_map,
    launch,
    memset_d32,
    params_buffer,
)

_X_ROW_BYTES = 128  # one 128-byte swizzled row of x: 64 bf16 or 128 e4m3 values


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
    max_ctas: int  # SMs x ctas_per_sm: the persistent grid's size
    function_handle: int  # the CUfunction as an integer, for the ctypes launch
    threads: int
    name: str


_loaded: dict[tuple[int, str, str | None], LoadedKernel] = {}
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


def load_function(cubin: bytes, entry: str, device: torch.device, shared_memory: int,
                  name: str) -> tuple[driver.CUmodule, driver.CUfunction]:
    """Load ``cubin`` into ``device``'s primary context and return its ``entry`` function, with the
    dynamic shared-memory limit raised to ``shared_memory`` bytes."""
    with torch.cuda.device(device):
        _make_context_current(device)
        module = check(driver.cuModuleLoadData(cubin), f"cuModuleLoadData({name})")
        function = check(driver.cuModuleGetFunction(module, entry.encode()), f"cuModuleGetFunction({name})")
        check(
            driver.cuFuncSetAttribute(
                function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_memory
            ),
            f"raising the shared-memory limit of {name} to {shared_memory} bytes",
        )
    return module, function


def load(config: TileConfig, device: torch.device | str, *, wait_probe: bool = False, copy_only: bool = False,
         no_decode: bool = False, no_epilogue: bool = False, coalesced_stores: bool = False,
         paired_stores: bool = False, swiglu_lines: bool = False, templates_dir: str | None = None) -> LoadedKernel:
    """The kernel for ``config`` loaded on ``device``: compiled (disk-cached) on first use, then cached.

    Diagnostics only, never what the op launches (any combination): ``wait_probe``, the build that times its barrier
    waits (templates/mxfp4_wait_probe.cuh; `bench waits` reads it with :func:`read_wait_probe`); ``copy_only``, the
    copy roof: the loads as shipped, consumers that neither decode nor multiply (templates/mxfp4_copy_only.cuh; its
    output is not the product); ``no_decode``, the MMA roof: the kernel as shipped but for the decode, the code words
    fed to the WGMMAs as they are (templates/mxfp4_no_decode.cuh; its output is not the product); ``no_epilogue``, the
    epilogue's price: the kernel as shipped but for a tile's row scales and stores (templates/mxfp4_no_epilogue.cuh;
    its output is not the product); ``coalesced_stores``, the price of the epilogue's store pattern: the same bytes
    written as whole 128-byte lines (templates/mxfp4_coalesced_stores.cuh; its output is not the product);
    ``paired_stores``, the epilogue as it was before the sector and line stores: every tile written with the
    paired 4-byte stores, whatever the config's store path (the same output); ``swiglu_lines``, a candidate for a
    swiglu config: its stores through the line stores' staging area, as 64-byte rows (templates/mxfp4_line_stores.cuh;
    the launch reserves the area; the same output); ``templates_dir``, the device headers from another directory (an
    earlier version of the kernel, timed beside this one). The candidates that ``HOPPER_MXFP4_CANDIDATES`` lists are
    taken wherever they apply (codegen/runtime/candidates.py)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {device}")
    environment = candidate_flags(config)
    swiglu_lines = swiglu_lines or environment.get("swiglu_lines", False)
    options, suffix = diagnostic_build(wait_probe=wait_probe, copy_only=copy_only, no_decode=no_decode,
                                       no_epilogue=no_epilogue, coalesced_stores=coalesced_stores,
                                       paired_stores=paired_stores, swiglu_lines=swiglu_lines)
    shared_memory = config.shared_memory_bytes
    extra_stage = candidate_stage_bytes(config, swiglu_lines=swiglu_lines)
    if extra_stage:
        options, shared_memory = [*options, f"-DMXFP4_DIAGNOSTIC_STAGE_BYTES={extra_stage}"], shared_memory + extra_stage
    if device.index is None:  # torch.device("cuda"): the current device, as torch takes it
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.index, config.name + suffix, templates_dir)
    kernel = _loaded.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _loaded.get(key)
        if kernel is None:
            from codegen.build.compiler import compile_kernel

            compiled = compile_kernel(config, options=options, templates_dir=templates_dir)
            if not config.register_pool_suffices(compiled.resources.registers):
                raise RuntimeError(
                    f"{config.name}: compiled with {compiled.resources.registers} registers per thread, too few "
                    f"for setmaxnreg to give {config.warpgroups} consumer warpgroups {config.consumer_registers} "
                    "each; refusing to launch a kernel that would hang"
                )
            module, function = load_function(compiled.cubin, ENTRY_POINT, device, shared_memory, config.name)
            multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
            kernel = LoadedKernel(config, module, function, shared_memory,
                                  multiprocessors * config.ctas_per_sm, int(function), config.threads, config.name)
            _loaded[key] = kernel
    return kernel


def candidate_stage_bytes(config: TileConfig, *, swiglu_lines: bool = False) -> int:
    """Shared memory a candidate build reserves beyond ``config``'s own (0 for every other build), after checking that
    the candidate applies (a SwiGLU config) and fits: ValueError naming the candidate otherwise."""
    if not swiglu_lines:
        return 0
    if config.epilogue != "swiglu":
        raise ValueError(f"swiglu_lines: {config.name} is not a swiglu config")
    if not line_stage_room(config):
        raise ValueError(f"swiglu_lines: {config.name} would need {config.shared_memory_bytes + config.line_stage_area} "
                         f"bytes of shared memory, more than the {config.max_shared_memory_bytes} a CTA may use")
    return config.line_stage_area


# The diagnostic builds (never shipped): their NVRTC option and the suffix of their cache key, in one place.
# The wait probe's sums are named in templates/mxfp4_wait_probe.cuh's WaitProbeSlot order.
WAIT_PROBE_OPTION = "-DMXFP4_WAIT_PROBE=1"
WAIT_PROBE_SUFFIX = "+wait_probe"
COPY_ONLY_OPTION = "-DMXFP4_COPY_ONLY=1"
COPY_ONLY_SUFFIX = "+copy_only"
NO_DECODE_OPTION = "-DMXFP4_NO_DECODE=1"
NO_DECODE_SUFFIX = "+no_decode"
NO_EPILOGUE_OPTION = "-DMXFP4_NO_EPILOGUE=1"
NO_EPILOGUE_SUFFIX = "+no_epilogue"
COALESCED_STORES_OPTION = "-DMXFP4_COALESCED_STORES=1"
COALESCED_STORES_SUFFIX = "+coalesced_stores"
PAIRED_STORES_OPTION = "-DMXFP4_PAIRED_STORES=1"
PAIRED_STORES_SUFFIX = "+paired_stores"
SWIGLU_LINES_OPTION = "-DMXFP4_SWIGLU_LINES=1"
SWIGLU_LINES_SUFFIX = "+swiglu_lines"


def diagnostic_build(*, wait_probe: bool = False, copy_only: bool = False, no_decode: bool = False,
                     no_epilogue: bool = False, coalesced_stores: bool = False,
                     paired_stores: bool = False, swiglu_lines: bool = False) -> tuple[list[str], str]:
    """(NVRTC options, cache-key suffix) of a diagnostic build; ([], "") is the shipped one."""
    chosen = [(option, suffix) for on, option, suffix in ((wait_probe, WAIT_PROBE_OPTION, WAIT_PROBE_SUFFIX),
                                                          (copy_only, COPY_ONLY_OPTION, COPY_ONLY_SUFFIX),
                                                          (no_decode, NO_DECODE_OPTION, NO_DECODE_SUFFIX),
                                                          (no_epilogue, NO_EPILOGUE_OPTION, NO_EPILOGUE_SUFFIX),
                                                          (coalesced_stores, COALESCED_STORES_OPTION,
                                                           COALESCED_STORES_SUFFIX),
                                                          (paired_stores, PAIRED_STORES_OPTION, PAIRED_STORES_SUFFIX),
                                                          (swiglu_lines, SWIGLU_LINES_OPTION, SWIGLU_LINES_SUFFIX))
              if on]
    return [option for option, _ in chosen], "".join(suffix for _, suffix in chosen)


PROBE_GLOBALS = (b"mxfp4_wait_probe", b"mxfp4_timeline")  # the wait-probe build's device globals


def _probe_global(kernel: LoadedKernel, name: bytes) -> tuple[int, int]:
    address, size = check(driver.cuModuleGetGlobal(kernel.module, name), f"cuModuleGetGlobal({name.decode()})")
    return int(address), int(size)


def _read_probe_global(kernel: LoadedKernel, name: bytes, slots: tuple[str, ...]) -> dict[str, int]:
    torch.cuda.synchronize()
    address, size = _probe_global(kernel, name)
    values = (ctypes.c_uint64 * (size // 8))()
    check(driver.cuMemcpyDtoH(ctypes.addressof(values), address, size), f"cuMemcpyDtoH({name.decode()})")
    return dict(zip(slots, (int(v) for v in values)))


def reset_wait_probe(kernel: LoadedKernel) -> None:
    """Zero a wait-probe kernel's sums and timeline (after the device finished what it had queued)."""
    torch.cuda.synchronize()
    for name in PROBE_GLOBALS:
        address, size = _probe_global(kernel, name)
        check(driver.cuMemsetD8(address, 0, size), f"cuMemsetD8({name.decode()})")


def read_wait_probe(kernel: LoadedKernel) -> dict[str, int]:
    """A wait-probe kernel's sums since :func:`reset_wait_probe`, by WAIT_PROBE_SLOTS name (syncs the device)."""
    return _read_probe_global(kernel, PROBE_GLOBALS[0], WAIT_PROBE_SLOTS)


def read_timeline(kernel: LoadedKernel) -> dict[str, int]:
    """A wait-probe kernel's timeline since :func:`reset_wait_probe`, by TIMELINE_SLOTS name (syncs the device):
    meaningful after exactly one launch (its minima and maxima span every launch since the reset)."""
    return _read_probe_global(kernel, PROBE_GLOBALS[1], TIMELINE_SLOTS)


@dataclass(frozen=True)
class EpilogueArgs:
    """The tensors and numbers an epilogue other than "store" reads (validated by the caller).

    bias: bf16 [E, C] or None (SwiGLU: C = N in the original interleaved gate/up order; ScaleScatter:
    C = N); row_scale: fp32 [rows of x]; row_dest: int32 [rows of x] (ScaleScatter); alpha, limit (SwiGLU).
    x_scale: fp32 [rows of x] or None (FP8 activations, any epilogue: every accumulator is first multiplied
    by its row's x_scale and, with w_scale (fp32 [E, N padded to 64]: the FP8-ready weights' row scales), by
    its weight row's). out_row_scale: fp32 [rows of x] or None (SwiGLU only: the output is e4m3, each value
    ``e4m3(swiglu / out_scale)``, and the kernel writes ``out_scale`` into every row's out_row_scale: the activated
    rows quantized for a W4A8 down projection; out_scale a power of two, mxfp4.ops.activations.swiglu_e4m3_scale).
    """

    bias: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None
    row_dest: torch.Tensor | None = None
    alpha: float = 1.702
    limit: float = 7.0
    x_scale: torch.Tensor | None = None
    w_scale: torch.Tensor | None = None
    out_row_scale: torch.Tensor | None = None
    out_scale: float = 1.0

    def pointers(self) -> tuple[int, int, int, int]:
        """(bias, row_scale, row_dest, bias_stride) as the parameter block takes them."""
        address = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
        stride = self.bias.shape[-1] if self.bias is not None else 0
        return address(self.bias), address(self.row_scale), address(self.row_dest), stride

    def output_scale(self) -> tuple[int, float, float]:
        """(out_row_scale, out_scale, out_scale_inverse) as the parameter block takes them."""
        if self.out_row_scale is None:
            return 0, 0.0, 0.0
        return self.out_row_scale.data_ptr(), self.out_scale, 1.0 / self.out_scale

    def scale_pointers(self) -> tuple[int, int, int]:
        """(x_scale, w_scale, w_scale_stride) as the parameter block takes them."""
        address = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
        stride = self.w_scale.shape[-1] if self.w_scale is not None else 0
        return address(self.x_scale), address(self.w_scale), stride


_NO_EPILOGUE = EpilogueArgs()


# Descriptors of recent x tensors: a pure function of (address, rows, K, box rows, element size), so an entry
# can never be stale; steady-state loops reuse the caching allocator's addresses and skip the encode.
_X_MAPS: dict[tuple[int, int, int, int, int], bytes] = {}
_X_MAPS_LIMIT = 256


def encode_x_map(address: int, rows: int, k: int, box_rows: int, element_bytes: int = 2) -> bytes:
    """TMA descriptor of x as [rows, K] bf16 (``element_bytes`` 2) or e4m3 (1, as uint8), boxes of ``box_rows`` rows
    (TileConfig.x_box_rows) x 128 bytes, 128-byte swizzle."""
    key = (address, rows, k, box_rows, element_bytes)
    tensor_map = _X_MAPS.get(key)
    if tensor_map is None:
        data_type = TMA_BFLOAT16 if element_bytes == 2 else TMA_UINT8
        tensor_map = encode_2d_map(address, rows, k, k * element_bytes, _X_ROW_BYTES // element_bytes, box_rows,
                                   data_type)
        with _lock:
            while len(_X_MAPS) >= _X_MAPS_LIMIT:
                _X_MAPS.pop(next(iter(_X_MAPS)))  # oldest first (dicts keep insertion order)
            _X_MAPS[key] = tensor_map
    return tensor_map


def tile_bound(config: TileConfig, *, rows: int, num_experts: int, n: int, masked: bool, max_m: int) -> int:
    """The most tiles the routing can produce (the device counts the real number)."""
    n_tiles = -(-n // config.tile_n)
    if masked:
        m_tiles = num_experts * -(-max_m // config.tile_m)
    else:  # each expert adds at most one partial tile to rows / tile_m
        m_tiles = rows // config.tile_m + num_experts
    return m_tiles * n_tiles


def grid_size(config: TileConfig, kernel: LoadedKernel, tiles: int, k_atoms: int) -> int:
    """CTAs to launch: ctas_per_sm per SM, fewer when the work cannot keep that many busy (a tile each,
    or with stream-K a k-step each)."""
    work = tiles * config.k_steps(k_atoms) if config.stream_k else tiles
    return max(1, min(kernel.max_ctas, work))


# The stream-K split runs in 32-bit arithmetic (templates/mxfp4_scheduler.cuh, StreamKSplit).
STREAM_K_MAX_STEPS = 2**31 - 2**20


def stream_k_sizes(config: TileConfig, grid: int, tiles: int, k_atoms: int) -> tuple[int, int, int]:
    """(tile counters, their bytes rounded up to 256, bytes of the fp32 partials) of a stream-K launch
    (mxfp4_stream_k.cuh has the layout); ValueError when the split would overflow its 32-bit arithmetic."""
    steps = tiles * config.k_steps(k_atoms)
    if steps + grid > STREAM_K_MAX_STEPS:
        raise ValueError(
            f"config {config.name}: stream-K splits at most {STREAM_K_MAX_STEPS} k-steps, and this problem can have "
            f"{steps}; pick a config without _sk (stream-K is for decode-sized problems)"
        )
    counters = tiles * config.warpgroups
    partial_bytes = 2 * grid * config.warpgroups * config.accumulators_per_thread * 128 * 4
    return counters, -(-counters * 4 // 256) * 256, partial_bytes


def stream_k_workspace(config: TileConfig, grid: int, tiles: int, k_atoms: int,
                       device: torch.device) -> tuple[torch.Tensor, int, int]:
    """(buffer, workspace address, counters address) for a stream-K launch, the counters zeroed on the
    current stream. A fresh buffer from torch's stream-ordered allocator per call, so concurrent
    streams and CUDA graphs never share one (mxfp4_stream_k.cuh has the layout)."""
    counters, counter_bytes, partial_bytes = stream_k_sizes(config, grid, tiles, k_atoms)
    buffer = torch.empty(counter_bytes + partial_bytes, dtype=torch.uint8, device=device)
    address = buffer.data_ptr()
    memset_d32(address, 0, counters, torch._C._cuda_getCurrentRawStream(device.index))
    return buffer, address + counter_bytes, address


def grouped_mm_sm90(x: torch.Tensor, w_data: torch.Tensor, n: int, k: int, rows: torch.Tensor,
                    masked: bool, config: TileConfig, out: torch.Tensor,
                    epilogue: EpilogueArgs = _NO_EPILOGUE, kernel: LoadedKernel | None = None) -> None:
    """Launch the SM90 kernel: ``out[rows of e] = x[rows of e] @ W_e^T`` for every expert e.

    x: bf16 contiguous ``[T, K]`` (contiguous mode) or ``[E, max_m, K]`` (masked mode); float8_e4m3fn for a
    W4A8 config (``config.activations == "fp8"``, with ``epilogue.x_scale`` and ``epilogue.w_scale``);
    w_data: ``PackedMXFP4.data``; rows: ``offsets`` [E+1] or ``masked_m`` [E], int32 or int64;
    out: bf16 ``[T, N]`` or ``[E, max_m, N]`` (``[T, N / 2]`` for the SwiGLU epilogue, float8_e4m3fn with
    ``epilogue.out_row_scale``; scattered rows for ScaleScatter). ``epilogue`` carries what ``config.epilogue``
    reads. Inputs are validated by the caller (mxfp4.ops.grouped_gemm, mxfp4.experts.layer). ``kernel``: a loaded
    build of ``config`` to launch instead of the shipped one (a diagnostic build: the wait probe's, the copy roof's,
    the MMA roof's).
    """
    total_rows = x.numel() // k
    if total_rows == 0 or n == 0:
        return
    x_address = x.data_ptr()
    element_bytes = config.x_element_bytes
    if x.element_size() != element_bytes:
        raise ValueError(f"x: {config.name} reads {element_bytes}-byte values, x is {x.dtype}")
    if (config.activations == "fp8") != (epilogue.w_scale is not None and epilogue.x_scale is not None):
        raise ValueError(f"{config.name}: the W4A8 family needs x_scale and w_scale, and only it takes w_scale")
    if x_address % 16 or (k * element_bytes) % 16:
        raise ValueError("x: the TMA engine needs a 16-byte aligned base address and row pitch")
    if epilogue.out_row_scale is not None:
        _check_e4m3_output(config, out, epilogue, total_rows)
    if config.epilogue == "swiglu" and n % 16:
        # Paired gate_up rows come in blocks of 16 (mxfp4/format/gate_up.py); a partial block would put a channel's
        # output past the end of its row.
        raise ValueError(f"n: the swiglu epilogue needs paired gate_up rows, a multiple of 16; got {n}")
    num_experts, n_atoms, k_atoms, _ = w_data.shape
    max_m = x.shape[1] if masked else 0
    device = x.device.index
    if kernel is None:
        kernel = load(config, x.device)  # a dict hit after the first call
    x_map = encode_x_map(x_address, total_rows, k, config.x_box_rows, element_bytes)
    bias, row_scale, row_dest, bias_stride = epilogue.pointers()
    tiles = tile_bound(config, rows=total_rows, num_experts=num_experts, n=n, masked=masked, max_m=max_m)
    grid = grid_size(config, kernel, tiles, k_atoms)
    workspace = counters = 0
    if config.stream_k:  # `buffer` lives until the launch is enqueued; the allocator orders its reuse
        buffer, workspace, counters = stream_k_workspace(config, grid, tiles, k_atoms, x.device)
    PARAMS_STRUCT.pack_into(
        params_buffer(PARAMS_SIZE), 0, x_map, w_data.data_ptr(), out.data_ptr(), rows.data_ptr(),
        num_experts, n, n_atoms, k_atoms, max_m, total_rows, int(masked), int(rows.dtype == torch.int64),
        bias, row_scale, row_dest, n // 2 if config.epilogue == "swiglu" else n, bias_stride,
        epilogue.alpha, epilogue.limit, *epilogue.output_scale(), *epilogue.scale_pointers(), workspace, counters,
    )
    launch_on(device, kernel.function_handle, grid, kernel.threads, kernel.shared_memory, kernel.name)


def _check_e4m3_output(config: TileConfig, out: torch.Tensor, epilogue: EpilogueArgs, rows: int) -> None:
    """SwiGLU's e4m3 output: a swiglu config, a float8_e4m3fn out, a float32 row scale per row of x and a power-of-two
    scale (so that dividing by it is exact); ValueError naming what is wrong."""
    if config.epilogue != "swiglu":
        raise ValueError(f"out_row_scale: only the swiglu epilogue writes e4m3, {config.name} is {config.epilogue}")
    if out.dtype != torch.float8_e4m3fn:
        raise ValueError(f"out: the swiglu epilogue with out_row_scale writes float8_e4m3fn, out is {out.dtype}")
    scale = epilogue.out_row_scale
    if scale.dtype != torch.float32 or scale.numel() < rows or not scale.is_contiguous():
        raise ValueError(f"out_row_scale: expected a contiguous float32 tensor of at least {rows} rows, got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    mantissa, _ = math.frexp(epilogue.out_scale)
    if not (math.isfinite(epilogue.out_scale) and epilogue.out_scale > 0 and mantissa == 0.5):
        raise ValueError(f"out_scale: expected a positive power of two, got {epilogue.out_scale}")


def launch_on(device: int, function: int, grid: int, threads: int, shared_memory: int, name: str) -> None:
    """Launch ``function`` (its parameters already in this thread's buffer) on torch's current stream
    of ``device``, making that device current for the call if it is not (its module lives there)."""
    dependent = dependent_launch_enabled()
    if torch._C._cuda_getDevice() == device:
        launch(function, grid, threads, shared_memory, torch._C._cuda_getCurrentRawStream(device), name, dependent)
        return
    with torch.cuda.device(device):
        launch(function, grid, threads, shared_memory, torch._C._cuda_getCurrentRawStream(device), name, dependent)
