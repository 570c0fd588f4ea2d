"""codegen.runtime.graph_copies on the CPU: the CUDA_MEMCPY3D layout against cuda.h, and CopyNodes over a stand-in
driver (which nodes it takes, which end of each copy it moves, what it hands the driver, what it refuses). The
moves on a real graph are checked on the GPU (tests/test_portable_gpu.py)."""

from __future__ import annotations

import ctypes

import pytest

from codegen.runtime import fast_driver, graph_copies
from codegen.runtime.fast_driver import DriverError
from codegen.runtime.graph_copies import GRAPH_NODE_TYPE_MEMCPY, CopyNodes, Memcpy3D

KERNEL_NODE = 0  # CU_GRAPH_NODE_TYPE_KERNEL
FIRST_NODE = 0x1000
CONTEXT, EXECUTABLE, GRAPH, STREAM = 0xC0, 0xE0, 0x90, 0x5EED


def test_memcpy3d_matches_cuda_h() -> None:
    """sizeof and offsets of CUDA_MEMCPY3D_v2 as cuda.h (CUDA 12 and 13) lays it out on x86-64 and aarch64."""
    assert ctypes.sizeof(Memcpy3D) == 200
    offsets = {name: getattr(Memcpy3D, name).offset for name in ("srcMemoryType", "srcDevice", "dstMemoryType",
                                                                  "dstDevice", "WidthInBytes", "Depth")}
    assert offsets == {"srcMemoryType": 32, "srcDevice": 48, "dstMemoryType": 120, "dstDevice": 136,
                       "WidthInBytes": 176, "Depth": 192}


def flat_copy(source: int, destination: int, nbytes: int, memory_type: int = 2) -> Memcpy3D:
    """What a captured cudaMemcpyAsync(destination, source, nbytes, DeviceToDevice) node holds."""
    return Memcpy3D(srcMemoryType=memory_type, srcDevice=source, srcPitch=nbytes, srcHeight=1,
                    dstMemoryType=memory_type, dstDevice=destination, dstPitch=nbytes, dstHeight=1,
                    WidthInBytes=nbytes, Height=1, Depth=1)


class FakeDriver:
    """libcuda's calls that CopyNodes makes, over a table of (node type, memcpy parameters) nodes."""

    def __init__(self, nodes: list[tuple[int, Memcpy3D | None]], refuse: int = 0) -> None:
        self.nodes, self.refuse = nodes, refuse
        self.sets: list[tuple[int, int, int, int, int]] = []  # (executable, node, src, dst, context)
        self.launches: list[tuple[int, int]] = []

    def cuCtxGetCurrent(self, context) -> int:
        context._obj.value = CONTEXT
        return 0

    def cuGraphGetNodes(self, graph: int, nodes, count) -> int:
        assert graph == GRAPH
        if nodes is not None:
            for i in range(len(self.nodes)):
                nodes[i] = FIRST_NODE + i
        count._obj.value = len(self.nodes)
        return 0

    def cuGraphNodeGetType(self, node: int, kind) -> int:
        kind._obj.value = self.nodes[node - FIRST_NODE][0]
        return 0

    def cuGraphMemcpyNodeGetParams(self, node: int, params) -> int:
        ctypes.memmove(ctypes.byref(params._obj), ctypes.byref(self.nodes[node - FIRST_NODE][1]), ctypes.sizeof(Memcpy3D))
        return 0

    def cuGraphExecMemcpyNodeSetParams(self, executable, node, params, context) -> int:
        p = params._obj
        self.sets.append((executable.value, node.value, p.srcDevice, p.dstDevice, context.value))
        return self.refuse

    def cuGraphLaunch(self, executable, stream: int) -> int:
        self.launches.append((executable.value, stream))
        return 0


COPIES = [(0x100, 0x200, 5760), (0x300, 0x400, 16), (0x500, 0x600, 16), (0x700, 0x800, 5760)]  # x, ids, weights, out


def nodes_of(copies: list[tuple[int, int, int]]) -> list[tuple[int, Memcpy3D | None]]:
    """A captured layer: kernels, the copies, and a memcpy of its own between two of its buffers."""
    inputs, out = copies[:-1], copies[-1]
    return [*((GRAPH_NODE_TYPE_MEMCPY, flat_copy(*c)) for c in inputs), (KERNEL_NODE, None),
            (GRAPH_NODE_TYPE_MEMCPY, flat_copy(0x900, 0xA00, 64)), (KERNEL_NODE, None),
            (GRAPH_NODE_TYPE_MEMCPY, flat_copy(*out))]


@pytest.fixture()
def driver(monkeypatch: pytest.MonkeyPatch):
    def install(nodes: list, refuse: int = 0) -> FakeDriver:
        fake = FakeDriver(nodes, refuse)
        monkeypatch.setattr(graph_copies, "_api", lambda: fake)
        monkeypatch.setattr(fast_driver, "_raise",  # no libcuda here to name the code
                            lambda code, what: (_ for _ in ()).throw(DriverError(f"{what} failed: code {code}")))
        return fake
    return install


def test_moves_the_inputs_sources_and_the_outputs_destination(driver) -> None:
    fake = driver(nodes_of(COPIES))
    nodes = CopyNodes(GRAPH, EXECUTABLE, COPIES, sources=3)
    nodes.retarget(0, 0xAAA0)  # x: the copy's source moves, its destination (the graph's buffer) stays
    nodes.retarget(2, 0xBBB0)
    nodes.retarget(3, 0xCCC0)  # the output: its destination moves
    nodes.retarget(0, 0xDDD0)  # moved again: only the source changes, from the node's own parameters
    nodes.launch(STREAM)
    node = {slot: FIRST_NODE + index for slot, index in enumerate((0, 1, 2, 6))}
    assert fake.sets == [(EXECUTABLE, node[0], 0xAAA0, 0x200, CONTEXT), (EXECUTABLE, node[2], 0xBBB0, 0x600, CONTEXT),
                         (EXECUTABLE, node[3], 0x700, 0xCCC0, CONTEXT), (EXECUTABLE, node[0], 0xDDD0, 0x200, CONTEXT)]
    assert fake.launches == [(EXECUTABLE, STREAM)]


@pytest.mark.parametrize("case", ["missing", "twice", "2-D", "host memory", "other size"])
def test_refuses_copies_it_cannot_move(driver, case: str) -> None:
    """Each copy must be exactly one flat device-to-device memcpy node of the graph: else LookupError (the caller
    then copies with torch), before any parameter is set."""
    nodes = nodes_of(COPIES)
    if case == "missing":
        del nodes[1]
    elif case == "twice":
        nodes.append((GRAPH_NODE_TYPE_MEMCPY, flat_copy(*COPIES[1])))
    elif case == "2-D":
        nodes[2][1].Height = 2
    elif case == "host memory":
        nodes[0] = (GRAPH_NODE_TYPE_MEMCPY, flat_copy(*COPIES[0], memory_type=1))
    else:
        nodes[6] = (GRAPH_NODE_TYPE_MEMCPY, flat_copy(0x700, 0x800, 5761))
    fake = driver(nodes)
    with pytest.raises(LookupError, match="flat memcpy nodes of the graph, not one"):
        CopyNodes(GRAPH, EXECUTABLE, COPIES, sources=3)
    assert fake.sets == []


def test_a_refused_move_raises_driver_error(driver) -> None:
    driver(nodes_of(COPIES), refuse=1)  # CUDA_ERROR_INVALID_VALUE
    nodes = CopyNodes(GRAPH, EXECUTABLE, COPIES, sources=3)
    with pytest.raises(DriverError, match=r"cuGraphExecMemcpyNodeSetParams\(slot 1\) failed"):
        nodes.retarget(1, 0x1230)
    assert issubclass(DriverError, RuntimeError)  # what mxfp4.experts.portable_graphs catches
