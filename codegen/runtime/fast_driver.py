"""The driver calls of the hot path, made through ctypes on ``libcuda`` directly.

cuda-bindings wraps every argument in a Python object (``cuuint64_t`` lists, ``CUstream``,
``CUtensorMap``), which costs tens of microseconds per launch; these two calls take plain integers
and preallocated buffers instead. Loading modules, setting attributes and everything else that runs
once stays on cuda-bindings (codegen.runtime.launch).
"""

from __future__ import annotations

import ctypes
import threading
from functools import lru_cache

from codegen.build.params import TENSOR_MAP_BYTES

# CUtensorMapDataType / Interleave / Swizzle / L2promotion / FloatOOBfill values (cuda.h).
TMA_UINT8 = 0
TMA_BFLOAT16 = 9
TMA_INTERLEAVE_NONE = 0
TMA_SWIZZLE_128B = 3
TMA_L2_PROMOTION_256B = 3
TMA_OOB_FILL_NONE = 0
_TENSOR_MAP_ALIGN = 64  # CUtensorMap is alignas(64)
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID (cuda.h)


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute (cuda.h): the id, 4 bytes of padding, a 64-byte value union (8-byte aligned); only the
    union's first int is used here (programmaticStreamSerializationAllowed)."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int), ("value_pad", ctypes.c_int),
                ("value_rest", ctypes.c_uint64 * 7)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h)."""

    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


class DriverError(RuntimeError):
    """A CUDA driver call failed."""


@lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernel.argtypes = [
        ctypes.c_void_p, *(ctypes.c_uint,) * 7, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
    ]
    lib.cuLaunchKernel.restype = ctypes.c_int
    if hasattr(lib, "cuLaunchKernelEx"):  # CUDA >= 11.8 drivers; only dependent launches need it
        lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuTensorMapEncodeTiled.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]
    lib.cuTensorMapEncodeTiled.restype = ctypes.c_int
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuMemsetD32Async.argtypes = [ctypes.c_uint64, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p]
    lib.cuMemsetD32Async.restype = ctypes.c_int
    return lib


def _raise(code: int, what: str) -> None:
    name = ctypes.c_char_p()
    _libcuda().cuGetErrorName(code, ctypes.byref(name))
    raise DriverError(f"{what} failed: {(name.value or b'CUDA error %d' % code).decode()}")


def libcuda() -> ctypes.CDLL:
    """The driver library, for the other hot-path callers (codegen.runtime.graph_driver)."""
    return _libcuda()


def raise_driver_error(code: int, what: str) -> None:
    """Raise DriverError for a failed driver call, with the driver's name of ``code``."""
    _raise(code, what)


def check_driver(code: int, what: str) -> None:
    """Raise DriverError (naming ``what``) unless ``code`` is CUDA_SUCCESS."""
    if code:
        _raise(code, what)


def typed_driver(signatures: dict[str, list]) -> ctypes.CDLL:
    """The driver library with each function of ``signatures`` (name: argument types) declared, returning CUresult."""
    lib = _libcuda()
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return lib


class _Scratch(threading.local):
    """Per-thread argument buffers, reused call to call (the driver copies what it reads)."""

    def __init__(self) -> None:
        self.dims = (ctypes.c_uint64 * 2)()
        self.strides = (ctypes.c_uint64 * 1)()
        self.box = (ctypes.c_uint32 * 2)()
        self.element_strides = (ctypes.c_uint32 * 2)(1, 1)
        self.map_raw = ctypes.create_string_buffer(TENSOR_MAP_BYTES + _TENSOR_MAP_ALIGN)
        base = ctypes.addressof(self.map_raw)
        self.map_address = base + (-base) % _TENSOR_MAP_ALIGN
        self.params = ctypes.create_string_buffer(1024)
        self.argument = (ctypes.c_void_p * 1)(ctypes.addressof(self.params))
        # cuLaunchKernelEx's configuration, with the one attribute a programmatic dependent launch sets.
        self.dependent = LaunchAttribute(id=CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        self.config = LaunchConfig(gridDimY=1, gridDimZ=1, blockDimY=1, blockDimZ=1,
                                   attrs=ctypes.pointer(self.dependent), numAttrs=1)


_scratch = _Scratch()


def encode_2d_map(address: int, rows: int, cols: int, row_pitch_bytes: int, box_cols: int, box_rows: int,
                       data_type: int = TMA_BFLOAT16) -> bytes:
    """cuTensorMapEncodeTiled of a row-major bf16 (or ``data_type``: TMA_UINT8 for e4m3) [rows, cols] matrix,
    128-byte swizzle, as 128 bytes."""
    s = _scratch
    s.dims[0], s.dims[1] = cols, rows
    s.strides[0] = row_pitch_bytes
    s.box[0], s.box[1] = box_cols, box_rows
    code = _libcuda().cuTensorMapEncodeTiled(
        s.map_address, data_type, 2, address, s.dims, s.strides, s.box, s.element_strides,
        TMA_INTERLEAVE_NONE, TMA_SWIZZLE_128B, TMA_L2_PROMOTION_256B, TMA_OOB_FILL_NONE,
    )
    if code:
        _raise(code, f"cuTensorMapEncodeTiled(rows={rows}, cols={cols}, box={box_rows}x{box_cols})")
    return ctypes.string_at(s.map_address, TENSOR_MAP_BYTES)


def params_buffer(size: int) -> ctypes.Array:
    """This thread's kernel-parameter buffer (at least ``size`` bytes), to fill before ``launch``."""
    if size > len(_scratch.params):
        raise ValueError(f"a {size}-byte parameter block exceeds the {len(_scratch.params)}-byte buffer")
    return _scratch.params


def launch(function: int, grid: int, threads: int, shared_memory: int, stream: int, name: str,
           dependent: bool = False) -> None:
    """Launch kernel ``name`` with this thread's parameter buffer as its single (struct) argument: cuLaunchKernel,
    or with ``dependent`` cuLaunchKernelEx with programmatic stream serialization (codegen.runtime.dependent_launch:
    the kernel may start before the previous kernel on ``stream`` ends; ours wait for it before touching memory)."""
    if dependent:
        if not hasattr(_libcuda(), "cuLaunchKernelEx"):
            raise DriverError(f"{name}: programmatic dependent launch (HOPPER_MXFP4_PDL) needs cuLaunchKernelEx, "
                              "which this CUDA driver (older than 11.8) lacks; unset HOPPER_MXFP4_PDL")
        config = _scratch.config
        config.gridDimX, config.blockDimX, config.sharedMemBytes, config.hStream = grid, threads, shared_memory, stream
        code = _libcuda().cuLaunchKernelEx(ctypes.byref(config), function, _scratch.argument, None)
        what = "cuLaunchKernelEx"
    else:
        code = _libcuda().cuLaunchKernel(
            function, grid, 1, 1, threads, 1, 1, shared_memory, stream, _scratch.argument, None
        )
        what = "cuLaunchKernel"
    if code:
        _raise(code, f"{what}({name}, grid={grid}, threads={threads}, shared memory={shared_memory})")


def memset_d32(address: int, value: int, count: int, stream: int) -> None:
    """cuMemsetD32Async: ``count`` 32-bit words at ``address`` set to ``value``, on ``stream``."""
    code = _libcuda().cuMemsetD32Async(address, value, count, stream)
    if code:
        _raise(code, f"cuMemsetD32Async(count={count})")
