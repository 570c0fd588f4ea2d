"""Programmatic dependent launch on an SM90 GPU (codegen.runtime.dependent_launch): the same bits with it on as off,
for the op, the FP8 pair (quantizer, then GEMM), the layer launched kernel by kernel, its graph replay and a user's
capture; and a kernel of ours started early never reads what the kernel before it is still writing.

Each case keeps the GPU busy first (torch.cuda._sleep), so the launches queue up and a dependent launch does start
while the kernel before it still runs. Fresh random data every call; outputs poisoned with NaN before the launches.
"""

from __future__ import annotations

import pytest
import torch
from accuracy import relative_error
from test_moe import ACCURACY, make_layer, make_routing

import mxfp4
from codegen.runtime.dependent_launch import set_dependent_launch
from mxfp4.experts import graphs as moe_graphs
from mxfp4.experts import portable_graphs
from mxfp4.experts.layer import reference_moe_float64

pytestmark = pytest.mark.gpu

EXPERTS, HIDDEN, INTER, TOP_K = 8, 2880, 2880, 4  # gpt-oss widths, fewer experts
BUSY_CYCLES = 50_000_000
W4A8_BUDGET = 5e-2  # FP8 activations against float64 (tests/test_gpu_w4a8.py's MOE_BUDGET; DESIGN.md)


@pytest.fixture(autouse=True)
def _plain_afterwards():
    yield
    set_dependent_launch(None)
    mxfp4.set_moe_graphs(None)
    moe_graphs.clear()
    portable_graphs.clear()


def _grouped_inputs(rows_per_expert: list[int], generator: torch.Generator):
    w = mxfp4.quantize(torch.randn(len(rows_per_expert), 2880, HIDDEN, generator=generator) * HIDDEN ** -0.5)
    offsets = torch.tensor([0, *torch.tensor(rows_per_expert).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(int(offsets[-1]), HIDDEN, generator=generator).bfloat16()
    return x.cuda(), w, offsets.cuda()


@pytest.mark.parametrize("activations", ["bf16", "fp8"])
@pytest.mark.parametrize("rows_per_expert", [[1, 0, 1, 1], [16, 3, 0, 16], [300, 17, 256, 1]], ids=["m1", "m16", "m256"])
def test_the_op_is_the_same_bits_and_reads_only_what_the_kernel_before_wrote(activations, rows_per_expert, seed):
    generator = torch.Generator().manual_seed(seed)
    x, w, offsets = _grouped_inputs(rows_per_expert, generator)
    packed = mxfp4.pack(w.to("cuda"), activations=activations)
    outs = {}
    for dependent in (False, True):
        set_dependent_launch(dependent)
        staging = torch.full_like(x, float("nan"))
        torch.cuda._sleep(BUSY_CYCLES)
        # The kernel right before ours writes x (a long copy through a big buffer first): started early, ours would
        # read NaN or stale rows unless it waits for that copy.
        big = torch.empty(64 << 20, device="cuda").normal_()
        big.mul_(1.0)
        staging.copy_(x)
        if activations == "fp8":
            x_fp8, x_scale = mxfp4.quantize_activations(staging)
            out = mxfp4.grouped_mm(x_fp8, packed, offsets, x_scale=x_scale)
        else:
            out = mxfp4.grouped_mm(staging, packed, offsets)
        outs[dependent] = out
        torch.cuda.synchronize()
    assert torch.isfinite(outs[True]).all()
    assert torch.equal(outs[True], outs[False]), f"seed {seed}: PDL changed the bits"
    dense = mxfp4.dequantize(w).double()
    reference = torch.cat([x[a:b].double().cpu() @ dense[e].T for e, (a, b) in
                           enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])
    budget = ACCURACY if activations == "bf16" else W4A8_BUDGET
    assert relative_error(outs[True].cpu(), reference) <= budget, f"seed {seed}"


@pytest.mark.parametrize("activations", ["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_the_layer_is_the_same_bits_launched_replayed_and_captured(activations, tokens, seed):
    torch.manual_seed(seed)
    layer = make_layer(EXPERTS, HIDDEN, INTER, HIDDEN ** -0.5, device="cuda", paired=True)
    if activations == "fp8":
        layer.gate_up = mxfp4.pack_gate_up(mxfp4.unpack_gate_up(layer.gate_up), activations="fp8")
        layer.down = mxfp4.pack(mxfp4.unpack(layer.down), activations="fp8")
    calls = []
    for i in range(3):
        x = torch.randn(tokens, HIDDEN, device="cuda").bfloat16()
        ids, weights = make_routing(tokens, EXPERTS, TOP_K, skew=i == 1, device="cuda")
        calls.append((x, ids, weights))

    def layer_call(x, ids, weights):
        return mxfp4.moe(x, ids, weights, layer.gate_up, layer.down, gate_up_bias=layer.gate_up_bias,
                         down_bias=layer.down_bias, activations=activations)

    def outputs(dependent: bool, replay: bool) -> list[torch.Tensor]:
        set_dependent_launch(dependent)
        mxfp4.set_moe_graphs(replay)
        torch.cuda._sleep(BUSY_CYCLES)
        got = [layer_call(*call) for call in calls + calls]  # the second round replays where replay is on
        torch.cuda.synchronize()
        return got

    expected = outputs(dependent=False, replay=False)
    reference = reference_moe_float64(*calls[0], layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias)
    budget = ACCURACY if activations == "bf16" else W4A8_BUDGET
    assert relative_error(expected[0], reference) <= budget, f"seed {seed}"
    for dependent, replay in ((True, False), (True, True)):
        got = outputs(dependent, replay)
        for i, out in enumerate(got):
            assert torch.equal(out, expected[i]), f"seed {seed}: PDL={dependent} replay={replay} call {i}"

    # A user's capture of the layer with PDL on (programmatic edges made by stream capture), replayed on new data.
    set_dependent_launch(True)
    mxfp4.set_moe_graphs(False)
    static = [t.clone() for t in calls[0]]
    layer_call(*static)  # warm-up: compile and plan outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer_call(*static)
    for i, call in enumerate(calls):
        for target, source in zip(static, call):
            target.copy_(source)
        captured.fill_(float("nan"))
        torch.cuda._sleep(BUSY_CYCLES)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected[i]), f"seed {seed}: captured call {i}"
