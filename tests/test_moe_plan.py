"""The fused MoE layer's plan (codegen.runtime.moe_plan), its gather and top-k sum kernels (codegen.runtime.moe_glue) and the
ctypes graph calls (codegen.runtime.graph_driver): the workspace layout and the driver calls on the CPU, the kernels'
source and compile on any machine with the toolchain, and the kernels themselves on an SM90 GPU."""

from __future__ import annotations

import ctypes

import pytest
import torch

from codegen.build.toolchain import check_toolchain
from codegen.runtime import fast_driver, graph_driver
from codegen.runtime.fast_driver import DriverError
from codegen.runtime.moe_glue import (
    GATHER_ENTRY,
    GATHER_PARAMS,
    GLUE_KERNELS,
    TOPK_SUM_ENTRY,
    TOPK_SUM_PARAMS,
    compiled_glue,
    render_glue,
)
from codegen.runtime.moe_plan import WORKSPACE_ALIGN, LayerShape, workspace_layout
from mxfp4.ops.dispatch import is_sm90


@pytest.mark.parametrize("shape", [LayerShape(1, 4, 32, 2880, 2880), LayerShape(13, 3, 8, 160, 96),
                                   LayerShape(64, 4, 128, 2880, 2880), LayerShape(1, 1, 1, 32, 32)])
@pytest.mark.parametrize("stream_k", [((0, 0), (0, 0)), ((512, 4096), (256, 8192)), ((0, 0), (768, 1000))])
def test_workspace_regions_are_aligned_disjoint_and_large_enough(shape: LayerShape, stream_k) -> None:
    at = workspace_layout(shape, *stream_k)
    routed = shape.routed
    needs = {
        "offsets": 4 * (shape.num_experts + 1), "row_dest": 4 * routed, "row_token": 4 * routed, "row_scale": 4 * routed,
        "rows": 2 * routed * shape.hidden, "activated": 2 * routed * shape.inter, "slots": 2 * routed * shape.hidden,
        "gate_up_counters": stream_k[0][0], "down_counters": stream_k[1][0],
        "gate_up_partials": stream_k[0][1], "down_partials": stream_k[1][1],
    }
    spans = sorted((getattr(at, name), getattr(at, name) + size) for name, size in needs.items())
    for (start, end), (next_start, _) in zip(spans, spans[1:]):
        assert start % WORKSPACE_ALIGN == 0 and end <= next_start
    assert spans[-1][1] <= at.nbytes and at.nbytes % WORKSPACE_ALIGN == 0
    # One zeroing covers both GEMMs' tile counters (they sit side by side).
    zeroed = range(at.counters, at.counters + 4 * at.counter_words)
    for name in ("gate_up_counters", "down_counters"):
        assert needs[name] == 0 or (getattr(at, name) in zeroed and getattr(at, name) + needs[name] <= zeroed.stop)


def test_kernel_node_params_match_cuda_h() -> None:
    """CUDA_KERNEL_NODE_PARAMS_v2: sizeof 72; gridDimX at 8, sharedMemBytes at 32, kernelParams at 40, extra
    at 48, kern at 56, ctx at 64 (offsetof on cuda.h of CUDA 13.0, x86-64)."""
    params = graph_driver.KernelNodeParams
    assert ctypes.sizeof(params) == 72
    offsets = {name: getattr(params, name).offset for name in ("gridDimX", "sharedMemBytes", "kernelParams", "extra", "kern", "ctx")}
    assert offsets == {"gridDimX": 8, "sharedMemBytes": 32, "kernelParams": 40, "extra": 48, "kern": 56, "ctx": 64}


class FakeDriver:
    """The graph calls of libcuda, recorded; ``fail`` names a call that returns an error."""

    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple] = []
        self.fail, self.next_handle = fail, 100

    def _handle(self, out) -> None:
        self.next_handle += 1
        out._obj.value = self.next_handle

    def __getattr__(self, name: str):
        def call(*args):
            code = 1 if name == self.fail else 0
            if name == "cuGraphAddKernelNode_v2":
                node_out, graph, dependencies, count, params = args
                p = params._obj
                self.calls.append((name, dependencies._obj.value if dependencies else None, count, p.func, p.gridDimX,
                                   p.blockDimX, p.sharedMemBytes, ctypes.string_at(ctypes.c_void_p.from_address(p.kernelParams).value, 8)))
                self._handle(node_out)
            elif name in ("cuGraphCreate", "cuGraphInstantiateWithFlags"):
                self.calls.append((name,))
                self._handle(args[0])
            else:
                self.calls.append((name, *(getattr(a, "value", a) for a in args[:2])))
            return code

        return call


def _nodes() -> list[graph_driver.KernelNode]:
    nodes = [graph_driver.KernelNode(f"k{i}", 0x10 + i, 1 + i, 128, 1024 * i, 64) for i in range(3)]
    for i, node in enumerate(nodes):
        node.buffer[:8] = bytes([i + 1] * 8)
    return nodes


def test_kernel_graph_is_a_chain_and_updates_and_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDriver()
    monkeypatch.setattr(graph_driver, "_graph_api", lambda: fake)
    nodes = _nodes()
    graph = graph_driver.KernelGraph(nodes)
    added = [c for c in fake.calls if c[0] == "cuGraphAddKernelNode_v2"]
    handles = [node.handle.value for node in nodes]
    assert [c[1:3] for c in added] == [(None, 0), (handles[0], 1), (handles[1], 1)]  # each after the one before
    assert [c[3:] for c in added] == [(0x10 + i, 1 + i, 128, 1024 * i, bytes([i + 1] * 8)) for i in range(3)]
    nodes[1].buffer[:8] = b"\x09" * 8
    graph.set_node_params(nodes[1])
    graph.launch(0x77)
    graph.close()
    graph.close()  # twice: nothing more to free
    names = [c[0] for c in fake.calls]
    assert names[-4:] == ["cuGraphExecKernelNodeSetParams_v2", "cuGraphLaunch", "cuGraphExecDestroy", "cuGraphDestroy"]
    assert fake.calls[-4][2] == handles[1] and fake.calls[-3][2] == 0x77


def test_a_failed_build_frees_the_graph_and_names_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDriver(fail="cuGraphInstantiateWithFlags")
    monkeypatch.setattr(graph_driver, "_graph_api", lambda: fake)
    monkeypatch.setattr(fast_driver, "_raise", lambda code, what: (_ for _ in ()).throw(DriverError(what)))
    with pytest.raises(DriverError, match="cuGraphInstantiate"):
        graph_driver.KernelGraph(_nodes())
    assert [c[0] for c in fake.calls][-1] == "cuGraphDestroy"


def test_glue_source_renders_both_parameter_blocks() -> None:
    source = render_glue()
    for kernel in GLUE_KERNELS:
        assert f"{kernel.entry}(const __grid_constant__ {kernel.struct} params)" in source
        assert f"sizeof({kernel.struct}) == {kernel.params.size}" in source
        for field in kernel.params.fields:
            assert f" {field.name};" in source


@pytest.mark.skipif(not check_toolchain().ok, reason="NVRTC toolchain not usable")
def test_glue_kernels_compile_without_spills() -> None:
    from codegen.build.sass import dump_sass, sass_unavailable_reason

    compiled = compiled_glue()
    assert compiled.resources.spills == 0 and compiled.resources.stack_bytes == 0
    if sass_unavailable_reason() is None:
        sass = dump_sass(compiled.cubin)
        assert sass.count("LDG.E.128") >= 2  # 16-byte loads in the gather and in the sum


# ---------------------------------------------------------------------------------------------
# On the GPU.

requires_sm90 = pytest.mark.skipif(not is_sm90(), reason="needs an SM90 (Hopper) GPU")


def _launch(entry: str, block, values: tuple, grid: int, threads: int) -> None:
    from codegen.runtime.fast_driver import launch, params_buffer
    from codegen.runtime.moe_glue import glue_function

    device = torch.device("cuda", torch.cuda.current_device())
    block.struct.pack_into(params_buffer(block.size), 0, *values)
    launch(glue_function(device, entry), grid, threads, 0, torch.cuda.current_stream().cuda_stream, entry)


@pytest.mark.gpu
@requires_sm90
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("tokens, hidden, routed, placed", [(1, 2880, 4, 4), (13, 160, 39, 30), (64, 2880, 256, 256)])
def test_gather_kernel_copies_the_placed_rows_and_zeroes(aligned: bool, tokens: int, hidden: int, routed: int,
                                                         placed: int, seed: int) -> None:
    from codegen.runtime.moe_glue import GATHER_THREADS, gather_grid

    storage = torch.randn(tokens * hidden + 1, device="cuda").bfloat16()
    x = (storage[:-1] if aligned else storage[1:]).view(tokens, hidden)  # 2-byte aligned: the 2-byte copy
    token = torch.randint(0, tokens, (routed,), device="cuda", dtype=torch.int32)
    offsets = torch.tensor([0, placed // 2, placed], device="cuda", dtype=torch.int32)
    rows = torch.full((routed, hidden), float("nan"), device="cuda", dtype=torch.bfloat16)
    zero = torch.full((1000,), 7, device="cuda", dtype=torch.int32)
    _launch(GATHER_ENTRY, GATHER_PARAMS, (x.data_ptr(), rows.data_ptr(), token.data_ptr(), offsets.data_ptr(),
                                          zero.data_ptr(), 999, 2, 2 * hidden, int(aligned)),
            gather_grid(routed), GATHER_THREADS)
    torch.cuda.synchronize()
    assert torch.equal(rows[:placed], x[token[:placed].long()]), f"seed {seed}"
    assert torch.isnan(rows[placed:]).all()  # rows the routing did not place stay untouched
    assert (zero[:999] == 0).all() and zero[999] == 7


@pytest.mark.gpu
@requires_sm90
@pytest.mark.parametrize("tokens, top_k, hidden", [(1, 4, 2880), (7, 3, 160), (64, 4, 2880), (5, 1, 32)])
def test_topk_sum_kernel_adds_in_slot_order(tokens: int, top_k: int, hidden: int, seed: int) -> None:
    from codegen.runtime.moe_glue import TOPK_SUM_THREADS, topk_sum_grid

    slots = (torch.randn(tokens, top_k, hidden, device="cuda") * torch.logspace(-3, 3, hidden, device="cuda")).bfloat16()
    slots[:, -1] = -slots[:, 0]  # cancellations: the order shows in the bits
    out = torch.full((tokens, hidden), float("nan"), device="cuda", dtype=torch.bfloat16)
    _launch(TOPK_SUM_ENTRY, TOPK_SUM_PARAMS, (slots.data_ptr(), out.data_ptr(), tokens, top_k, hidden),
            topk_sum_grid(tokens, hidden), TOPK_SUM_THREADS)
    expected = torch.zeros(tokens, hidden, device="cuda")
    for j in range(top_k):  # fp32, slot order, one rounding at the end
        expected = expected + slots[:, j].float()
    assert torch.equal(out, expected.bfloat16()), f"seed {seed}"
