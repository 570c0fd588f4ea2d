"""CUDA graphs of our own kernels, built and launched through ctypes on ``libcuda`` (no stream capture).

A graph here is a chain of kernel nodes whose functions and parameter blocks are all ours, so a node's
parameters can be rewritten on the instantiated graph (``set_node_params``) before a launch: what the
fused MoE layer does with each call's input and output addresses (mxfp4.experts.graphs). The driver copies
a node's parameter bytes when they are set, and a launch uses the parameters set before it; launches
of one executable graph run one at a time, in launch order (cuGraphLaunch's contract).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from .fast_driver import check_driver, raise_driver_error, typed_driver

# cuda.h: CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC, CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC.
_DEPENDENCY_PROGRAMMATIC = 1
_PORT_PROGRAMMATIC = 1


class EdgeData(ctypes.Structure):
    """CUgraphEdgeData (cuda.h): from_port, to_port, type, 5 reserved bytes (zero)."""

    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


class KernelNodeParams(ctypes.Structure):
    """CUDA_KERNEL_NODE_PARAMS (v2) of cuda.h."""

    _fields_ = [
        ("func", ctypes.c_void_p),
        ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint),
        ("kernelParams", ctypes.c_void_p),
        ("extra", ctypes.c_void_p),
        ("kern", ctypes.c_void_p),
        ("ctx", ctypes.c_void_p),
    ]


@lru_cache(maxsize=1)
def _graph_api() -> ctypes.CDLL:
    handle, pointer = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    signatures = {
        "cuGraphCreate": [pointer, ctypes.c_uint],
        "cuGraphAddKernelNode_v2": [pointer, handle, pointer, ctypes.c_size_t, ctypes.POINTER(KernelNodeParams)],
        "cuGraphInstantiateWithFlags": [pointer, handle, ctypes.c_ulonglong],
        "cuGraphExecKernelNodeSetParams_v2": [handle, handle, ctypes.POINTER(KernelNodeParams)],
        "cuGraphLaunch": [handle, handle],
        "cuGraphExecDestroy": [handle],
        "cuGraphDestroy": [handle],
    }
    return typed_driver(signatures)


@lru_cache(maxsize=1)
def _add_dependencies() -> Callable[..., int]:
    """cuGraphAddDependencies_v2 (CUDA >= 12.3 drivers): declared only when a graph asks for programmatic edges, so
    that an older driver still builds the plain chains."""
    handle, pointer = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    signature = [handle, pointer, pointer, ctypes.POINTER(EdgeData), ctypes.c_size_t]
    return typed_driver({"cuGraphAddDependencies_v2": signature}).cuGraphAddDependencies_v2


@dataclass
class KernelNode:
    """One kernel node: its launch shape and a parameter buffer the node's struct is packed into."""

    name: str
    function: int
    grid: int
    threads: int
    shared_memory: int
    params_size: int
    buffer: ctypes.Array = field(init=False)
    launch: KernelNodeParams = field(init=False)
    handle: ctypes.c_void_p = field(init=False, default_factory=ctypes.c_void_p)

    def __post_init__(self) -> None:
        self.buffer = ctypes.create_string_buffer(self.params_size)
        self._argument = (ctypes.c_void_p * 1)(ctypes.addressof(self.buffer))
        self.launch = KernelNodeParams(
            self.function, self.grid, 1, 1, self.threads, 1, 1, self.shared_memory,
            ctypes.addressof(self._argument), None, None, None,
        )


class KernelGraph:
    """An instantiated chain of kernel nodes (in list order). ``close`` frees it; a graph still running
    on the device is freed when it completes (cuGraphExecDestroy's contract). With ``dependent`` the chain's
    edges are programmatic (codegen.runtime.dependent_launch): a node may start before the one before it ends,
    and waits for it (griddepcontrol.wait) before touching memory."""

    def __init__(self, nodes: list[KernelNode], dependent: bool = False) -> None:
        lib = _graph_api()
        self._set_params, self._launch = lib.cuGraphExecKernelNodeSetParams_v2, lib.cuGraphLaunch  # per call
        self.nodes = nodes
        self._graph, self._exec = ctypes.c_void_p(), ctypes.c_void_p()
        check_driver(lib.cuGraphCreate(ctypes.byref(self._graph), 0), "cuGraphCreate")
        try:
            add_dependencies = _add_dependencies() if dependent and len(nodes) > 1 else None
            previous = None
            for node in nodes:
                plain_edge = previous is not None and not dependent
                dependencies = ctypes.byref(previous.handle) if plain_edge else None
                check_driver(lib.cuGraphAddKernelNode_v2(ctypes.byref(node.handle), self._graph, dependencies,
                                                   int(plain_edge), ctypes.byref(node.launch)),
                       f"cuGraphAddKernelNode({node.name})")
                if previous is not None and dependent:
                    edge = EdgeData(from_port=_PORT_PROGRAMMATIC, type=_DEPENDENCY_PROGRAMMATIC)
                    check_driver(add_dependencies(self._graph, ctypes.byref(previous.handle),
                                                  ctypes.byref(node.handle), ctypes.byref(edge), 1),
                                 f"cuGraphAddDependencies({previous.name} -> {node.name}, programmatic)")
                previous = node
            check_driver(lib.cuGraphInstantiateWithFlags(ctypes.byref(self._exec), self._graph, 0), "cuGraphInstantiate")
        except BaseException:
            self.close()
            raise

    def set_node_params(self, node: KernelNode) -> None:
        """Give the instantiated graph ``node``'s current buffer (launches after this one use it)."""
        code = self._set_params(self._exec, node.handle, ctypes.byref(node.launch))
        if code:  # not check_driver: the message is formatted only on failure (a hot path of replay)
            raise_driver_error(code, f"cuGraphExecKernelNodeSetParams({node.name})")

    def launch(self, stream: int) -> None:
        check_driver(self._launch(self._exec, stream), "cuGraphLaunch")

    def close(self) -> None:
        lib = _graph_api()
        if self._exec:
            lib.cuGraphExecDestroy(self._exec)
            self._exec = ctypes.c_void_p()
        if self._graph:
            lib.cuGraphDestroy(self._graph)
            self._graph = ctypes.c_void_p()
