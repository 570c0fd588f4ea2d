"""Programmatic dependent launch (codegen.runtime.dependent_launch), on the CPU: the switch, the driver structs and
calls it makes (a fake driver records them), the graph keys that follow it, and every kernel of ours waiting for
the previous grid before its first global access (its SASS). tests/test_dependent_launch_gpu.py runs it."""

from __future__ import annotations

import ctypes
import re

import pytest

from codegen.build.compiler import compile_source
from codegen.build.config import TileConfig
from codegen.build.sass import dump_sass, sass_unavailable_reason
from codegen.build.toolchain import check_toolchain
from codegen.runtime import fast_driver, graph_driver
from codegen.runtime.dependent_launch import (
    ENV_PDL,
    dependent_launch_enabled,
    set_dependent_launch,
)

TOOLCHAIN = check_toolchain()
SASS_MISSING = sass_unavailable_reason()
needs_sass = pytest.mark.skipif(not TOOLCHAIN.ok or SASS_MISSING is not None,
                                reason=f"NVRTC or SASS tools missing: {TOOLCHAIN.reason or SASS_MISSING}")


@pytest.fixture(autouse=True)
def _follow_the_environment():
    set_dependent_launch(None)
    yield
    set_dependent_launch(None)


# ---------------------------------------------------------------------------------------------
# the switch


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("0", False), ("", False), ("1", True), ("on", True),
                                                 ("False", False), ("yes", True)])
def test_the_environment_decides_until_set(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(ENV_PDL, raising=False)
    else:
        monkeypatch.setenv(ENV_PDL, value)
    assert dependent_launch_enabled() is expected
    set_dependent_launch(not expected)
    assert dependent_launch_enabled() is (not expected)
    set_dependent_launch(None)  # back to the environment
    assert dependent_launch_enabled() is expected


def test_bad_values_are_clear_errors(monkeypatch):
    monkeypatch.setenv(ENV_PDL, "maybe")
    with pytest.raises(ValueError, match=f"{ENV_PDL}='maybe'"):
        dependent_launch_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool or None"):
        set_dependent_launch(1)


# ---------------------------------------------------------------------------------------------
# the driver structs and calls


def test_structs_have_cuda_h_layouts():
    # cuda.h: CUlaunchAttribute {id; pad[4]; union (64 bytes, 8-aligned)}; CUlaunchConfig {7 uints; CUstream;
    # CUlaunchAttribute*; unsigned}; CUgraphEdgeData {3 chars; 5 reserved}.
    attribute, config, edge = fast_driver.LaunchAttribute, fast_driver.LaunchConfig, graph_driver.EdgeData
    assert (ctypes.sizeof(attribute), ctypes.alignment(attribute), attribute.value.offset) == (72, 8, 8)
    assert ctypes.sizeof(config) == 56
    assert (config.hStream.offset, config.attrs.offset, config.numAttrs.offset) == (32, 40, 48)
    assert ctypes.sizeof(edge) == 8 and (edge.from_port.offset, edge.to_port.offset, edge.type.offset) == (0, 1, 2)


class FakeLaunchDriver:
    """Records cuLaunchKernel / cuLaunchKernelEx calls (what the driver would read from the pointers)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        self.calls.append(("cuLaunchKernel", function, gx, bx, shared, stream))
        return 0

    def cuLaunchKernelEx(self, config_ref, function, params, extra):
        config = config_ref._obj
        attribute = config.attrs[0]
        self.calls.append(("cuLaunchKernelEx", function, config.gridDimX, config.blockDimX, config.sharedMemBytes,
                           config.hStream, config.numAttrs, attribute.id, attribute.value,
                           (config.gridDimY, config.gridDimZ, config.blockDimY, config.blockDimZ)))
        return 0


def test_a_dependent_launch_asks_for_programmatic_stream_serialization(monkeypatch):
    fake = FakeLaunchDriver()
    monkeypatch.setattr(fast_driver, "_libcuda", lambda: fake)
    fast_driver.launch(0x1234, 132, 384, 200_000, 0x99, "k")
    fast_driver.launch(0x1234, 132, 384, 200_000, 0x99, "k", dependent=True)
    fast_driver.launch(0x5678, 7, 128, 0, 0x98, "q", dependent=True)  # the reused config takes the new shape
    assert fake.calls == [
        ("cuLaunchKernel", 0x1234, 132, 384, 200_000, 0x99),
        ("cuLaunchKernelEx", 0x1234, 132, 384, 200_000, 0x99, 1,
         fast_driver.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 1, (1, 1, 1, 1)),
        ("cuLaunchKernelEx", 0x5678, 7, 128, 0, 0x98, 1,
         fast_driver.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 1, (1, 1, 1, 1)),
    ]


def test_a_failed_dependent_launch_names_the_call(monkeypatch):
    fake = FakeLaunchDriver()
    fake.cuLaunchKernelEx = lambda *args: 1  # CUDA_ERROR_INVALID_VALUE
    monkeypatch.setattr(fast_driver, "_libcuda", lambda: fake)
    monkeypatch.setattr(fast_driver, "_raise", lambda code, what: (_ for _ in ()).throw(fast_driver.DriverError(what)))
    with pytest.raises(fast_driver.DriverError, match=r"cuLaunchKernelEx\(k, grid=2"):
        fast_driver.launch(1, 2, 128, 0, 0, "k", dependent=True)


class OldLaunchDriver:
    """A driver older than CUDA 11.8: cuLaunchKernel only."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.cuLaunchKernel = FakeLaunchDriver.cuLaunchKernel.__get__(self)


def test_a_driver_without_cuLaunchKernelEx_is_a_clear_error(monkeypatch):
    old = OldLaunchDriver()
    monkeypatch.setattr(fast_driver, "_libcuda", lambda: old)
    with pytest.raises(fast_driver.DriverError, match="needs cuLaunchKernelEx.*unset HOPPER_MXFP4_PDL"):
        fast_driver.launch(1, 2, 128, 0, 0, "k", dependent=True)
    fast_driver.launch(1, 2, 128, 0, 0, "k")  # plain launches still work
    assert old.calls == [("cuLaunchKernel", 1, 2, 128, 0, 0)]


class FakeGraphDriver:
    """Records the graph calls: nodes with their plain dependencies, and edges added afterwards."""

    def __init__(self):
        self.nodes: list[tuple[int, int]] = []  # (node, plain dependencies)
        self.edges: list[tuple[int, int, int, int]] = []  # (from, to, from_port, type)

    def cuGraphCreate(self, graph_ref, flags):
        graph_ref._obj.value = 1
        return 0

    def cuGraphAddKernelNode_v2(self, node_ref, graph, dependencies, count, params):
        node_ref._obj.value = 100 + len(self.nodes)
        self.nodes.append((node_ref._obj.value, count))
        return 0

    def cuGraphAddDependencies_v2(self, graph, from_ref, to_ref, edge_ref, count):
        edge = edge_ref._obj
        assert count == 1 and list(edge.reserved) == [0] * 5 and edge.to_port == 0
        self.edges.append((from_ref._obj.value, to_ref._obj.value, edge.from_port, edge.type))
        return 0

    def cuGraphInstantiateWithFlags(self, exec_ref, graph, flags):
        exec_ref._obj.value = 2
        return 0

    cuGraphExecKernelNodeSetParams_v2 = cuGraphLaunch = None

    def cuGraphExecDestroy(self, handle):
        return 0

    def cuGraphDestroy(self, handle):
        return 0


def _chain(fake: FakeGraphDriver, dependent: bool) -> FakeGraphDriver:
    nodes = [graph_driver.KernelNode(name, 0x10 + i, 1, 128, 0, 64) for i, name in enumerate(("a", "b", "c"))]
    graph_driver.KernelGraph(nodes, dependent).close()
    return fake


def test_graph_chain_edges_are_plain_or_programmatic(monkeypatch):
    fake = FakeGraphDriver()
    monkeypatch.setattr(graph_driver, "_graph_api", lambda: fake)
    asked = []  # cuGraphAddDependencies_v2 is looked up only for programmatic edges (CUDA >= 12.3 drivers)
    monkeypatch.setattr(graph_driver, "_add_dependencies", lambda: asked.append(1) or fake.cuGraphAddDependencies_v2)
    _chain(fake, dependent=False)
    assert asked == []
    assert fake.nodes == [(100, 0), (101, 1), (102, 1)] and fake.edges == []
    fake.__init__()
    _chain(fake, dependent=True)
    assert fake.nodes == [(100, 0), (101, 0), (102, 0)]  # no plain edge: each comes as a programmatic one
    programmatic = (graph_driver._PORT_PROGRAMMATIC, graph_driver._DEPENDENCY_PROGRAMMATIC)
    assert programmatic == (1, 1)  # cuda.h: CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC, CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
    assert fake.edges == [(100, 101, *programmatic), (101, 102, *programmatic)] and asked == [1]


def test_the_layer_graphs_are_keyed_by_the_switch():
    from types import SimpleNamespace

    from mxfp4.experts import graphs

    call = SimpleNamespace(ids_int64=True, weights_bf16=True, gate_up=1, gate_up_bias=2, down=3, down_bias=4,
                           alpha=1.702, limit=7.0)
    set_dependent_launch(False)
    plain = graphs.graph_key(0, "plan", call)
    set_dependent_launch(True)
    assert graphs.graph_key(0, "plan", call) != plain  # a graph built one way is never replayed the other


# ---------------------------------------------------------------------------------------------
# every kernel waits before its first global access

# SASS instructions that read or write global memory (generic LD/ST may too), or the TMA unit on its behalf.
_GLOBAL_ACCESS = re.compile(r"^\s*(?:@!?U?P\w+\s+)?(LDG|STG|LD|ST|RED|REDG|ATOM|ATOMG|LDGSTS|UTMALDG|UTMASTG|UTMAPF|"
                            r"UBLKCP|UBLKRED|CCTL)\b")


def _functions(sass: str) -> dict[str, list[str]]:
    """Each function's instructions (the text after the address), in order."""
    functions: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in sass.splitlines():
        name = re.search(r"Function : (\S+)", line)
        if name:
            current = functions.setdefault(name.group(1), [])
            continue
        instruction = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if instruction and current is not None:
            current.append(instruction.group(1))
    return functions


def _assert_waits_first(sass: str, expected_functions: int) -> None:
    functions = _functions(sass)
    assert len(functions) == expected_functions, list(functions)
    for name, instructions in functions.items():
        opcodes = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for text in instructions]
        assert opcodes.count("ACQBULK") == 1 and opcodes.count("PREEXIT") == 1, (name, opcodes[:12])  # wait, signal
        wait, signal = opcodes.index("ACQBULK"), opcodes.index("PREEXIT")
        first_access = next((i for i, text in enumerate(instructions) if _GLOBAL_ACCESS.match(text)), None)
        assert first_access is not None, name
        assert wait < signal < first_access, (name, instructions[: first_access + 1])


@needs_sass
@pytest.mark.parametrize("name", ["n128_m8_k128_s6_wg1_c3", "n128_m256_k128_s5_wg2_fp8", "n128_m16_k128_s5_wg1_c3_sk",
                                  "n64_m8_k128_s6_wg1_c5_pw"])
def test_every_gemm_waits_for_the_previous_grid_first(name, tmp_path, monkeypatch):
    from codegen.build.compiler import compile_kernel

    monkeypatch.setenv("HOPPER_MXFP4_CACHE", str(tmp_path))
    _assert_waits_first(dump_sass(compile_kernel(TileConfig.from_name(name)).cubin), 1)


@needs_sass
def test_the_layer_kernels_wait_for_the_previous_grid_first(tmp_path):
    from codegen.runtime.moe_glue import GATHER_ENTRY, GLUE_KERNELS, render_glue
    from codegen.runtime.quantize import QUANTIZE_ENTRY, render_quantize
    from codegen.runtime.routing import ROUTING_ENTRY, render_routing

    sources = {"quantize_fp8": (render_quantize(), QUANTIZE_ENTRY, 1), "moe_routing": (render_routing(), ROUTING_ENTRY, 1),
               "moe_glue": (render_glue(), GATHER_ENTRY, len(GLUE_KERNELS))}
    for what, (source, entry, functions) in sources.items():
        kernel = compile_source(source, what, entry=entry, cache_dir=tmp_path)
        _assert_waits_first(dump_sass(kernel.cubin), functions)
