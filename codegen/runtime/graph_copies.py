"""The copy nodes of a captured CUDA graph, pointed at each launch's own tensors (ctypes on ``libcuda``).

A graph captured by torch reads and writes fixed addresses. When its first nodes copy the inputs into its
buffers and its last node copies the output out (one-dimensional device-to-device memcpy nodes, what torch's
``copy_`` of contiguous tensors of one dtype captures), the copies can be pointed at a call's own tensors on
the instantiated graph (``cuGraphExecMemcpyNodeSetParams``): a call then costs one graph launch, plus one
driver call per address that changed since the last launch, instead of a torch copy per input and a clone of
the output (mxfp4.experts.portable_graphs). The driver copies the parameters when they are set, and a launch
uses those set before it; launches already enqueued keep theirs (the driver's contract).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

from .fast_driver import DriverError, check_driver, raise_driver_error, typed_driver

GRAPH_NODE_TYPE_MEMCPY = 1  # CU_GRAPH_NODE_TYPE_MEMCPY
_DEVICE_MEMORY = (2, 4)  # CU_MEMORYTYPE_DEVICE, CU_MEMORYTYPE_UNIFIED: the address is in src/dstDevice


class Memcpy3D(ctypes.Structure):
    """CUDA_MEMCPY3D (v2) of cuda.h: 200 bytes, ``srcDevice`` at 48, ``dstDevice`` at 136."""

    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcZ", ctypes.c_size_t),
        ("srcLOD", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int), ("srcHost", ctypes.c_void_p),
        ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p), ("reserved0", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t), ("srcHeight", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstZ", ctypes.c_size_t),
        ("dstLOD", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int), ("dstHost", ctypes.c_void_p),
        ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p), ("reserved1", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t), ("dstHeight", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t), ("Depth", ctypes.c_size_t),
    ]


@lru_cache(maxsize=1)
def _api() -> ctypes.CDLL:
    handle, pointer = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    signatures = {
        "cuCtxGetCurrent": [pointer],
        "cuGraphGetNodes": [handle, pointer, ctypes.POINTER(ctypes.c_size_t)],
        "cuGraphNodeGetType": [handle, ctypes.POINTER(ctypes.c_int)],
        "cuGraphMemcpyNodeGetParams": [handle, ctypes.POINTER(Memcpy3D)],
        "cuGraphExecMemcpyNodeSetParams": [handle, handle, ctypes.POINTER(Memcpy3D), handle],
        "cuGraphLaunch": [handle, handle],
    }
    return typed_driver(signatures)


def memcpy_nodes(graph: int) -> list[tuple[ctypes.c_void_p, Memcpy3D]]:
    """(node, parameters) of every memcpy node of the CUgraph ``graph``."""
    lib = _api()
    count = ctypes.c_size_t()
    check_driver(lib.cuGraphGetNodes(graph, None, ctypes.byref(count)), "cuGraphGetNodes")
    nodes = (ctypes.c_void_p * count.value)()
    check_driver(lib.cuGraphGetNodes(graph, nodes, ctypes.byref(count)), "cuGraphGetNodes")
    found = []
    for node in nodes[:count.value]:
        kind = ctypes.c_int()
        check_driver(lib.cuGraphNodeGetType(node, ctypes.byref(kind)), "cuGraphNodeGetType")
        if kind.value == GRAPH_NODE_TYPE_MEMCPY:
            params = Memcpy3D()
            check_driver(lib.cuGraphMemcpyNodeGetParams(node, ctypes.byref(params)), "cuGraphMemcpyNodeGetParams")
            found.append((ctypes.c_void_p(node), params))
    return found


def _is_flat_copy(params: Memcpy3D, source: int, destination: int, nbytes: int) -> bool:
    """Whether ``params`` copies ``nbytes`` contiguous bytes from device address ``source`` to ``destination``."""
    return (params.srcMemoryType in _DEVICE_MEMORY and params.dstMemoryType in _DEVICE_MEMORY
            and params.srcDevice == source and params.dstDevice == destination
            and params.srcXInBytes == params.srcY == params.srcZ == 0
            and params.dstXInBytes == params.dstY == params.dstZ == 0
            and params.WidthInBytes == nbytes and params.Height == params.Depth == 1)


class CopyNodes:
    """The memcpy nodes ``copies`` ((source, destination, bytes) each, in slot order) of the CUgraph ``graph``
    that the CUgraphExec ``executable`` was instantiated from. Slot i's movable end is its source for the first
    ``sources`` slots (inputs copied in), its destination for the others (outputs copied out).

    Raises LookupError when a copy is not exactly one flat device-to-device memcpy node of the graph, and
    DriverError when the driver refuses; the caller then copies by other means."""

    def __init__(self, graph: int, executable: int, copies: list[tuple[int, int, int]], sources: int) -> None:
        lib = _api()
        context = ctypes.c_void_p()
        check_driver(lib.cuCtxGetCurrent(ctypes.byref(context)), "cuCtxGetCurrent")
        if not context.value:
            raise DriverError("cuCtxGetCurrent: no current CUDA context")
        found = memcpy_nodes(graph)
        self._nodes: list[tuple[ctypes.c_void_p, Memcpy3D]] = []
        for slot, (source, destination, nbytes) in enumerate(copies):
            matches = [(node, params) for node, params in found if _is_flat_copy(params, source, destination, nbytes)]
            if len(matches) != 1:
                raise LookupError(f"copy {slot} ({nbytes} bytes) is {len(matches)} flat memcpy nodes of the graph, "
                                  f"not one ({len(found)} memcpy nodes in all)")
            self._nodes.append(matches[0])
        self._context, self._executable = context, ctypes.c_void_p(executable)
        self._sources = sources
        self._set, self._launch = lib.cuGraphExecMemcpyNodeSetParams, lib.cuGraphLaunch  # per call

    def retarget(self, slot: int, address: int) -> None:
        """Point slot ``slot``'s movable end at ``address`` (launches after this one copy there)."""
        node, params = self._nodes[slot]
        if slot < self._sources:
            params.srcDevice = address
        else:
            params.dstDevice = address
        code = self._set(self._executable, node, ctypes.byref(params), self._context)
        if code:  # not check_driver: the message is formatted only on failure (every replayed call moves nodes)
            raise_driver_error(code, f"cuGraphExecMemcpyNodeSetParams(slot {slot})")

    def launch(self, stream: int) -> None:
        check_driver(self._launch(self._executable, stream), "cuGraphLaunch")
