"""mxfp4.moe on the H100 (SM90 path): float64 reference, no host sync, determinism, CUDA graphs, compile.

Skipped without an SM90 GPU. Fresh random data every run (never zeros); the caching allocator is
filled with NaN before each checked call, so rows the layer forgets to write show up as NaN.
"""

from __future__ import annotations

import pytest
import torch
from test_moe import ACCURACY, Layer, make_layer, make_routing, relative_error, run

import mxfp4
from mxfp4.experts.layer import reference_moe_float64
from mxfp4.ops.dispatch import SM90

pytestmark = pytest.mark.gpu

# gpt-oss-20b experts: E = 32, H = I = 2880, top-4. Weights ~ 1/sqrt(fan-in) keep the layer's gain ~1.
GPT_OSS_20B = dict(experts=32, hidden=2880, inter=2880, top_k=4)
WEIGHT_SCALE = 2880 ** -0.5


@pytest.fixture(scope="module", params=[True, False], ids=["fused", "unfused"])
def layer_20b(request: pytest.FixtureRequest) -> Layer:
    """gate_up paired (the fused SwiGLU / scatter kernels) or in checkpoint order (two grouped_mm + torch glue)."""
    torch.manual_seed(20)
    cfg = GPT_OSS_20B
    return make_layer(cfg["experts"], cfg["hidden"], cfg["inter"], WEIGHT_SCALE, device="cuda", paired=request.param)


def poison_allocator(megabytes: int = 256) -> None:
    """Leave NaN in the blocks the caching allocator hands out next."""
    junk = torch.full((megabytes << 18,), float("nan"), device="cuda")
    del junk


def inputs(tokens: int, skew: bool, cfg: dict = GPT_OSS_20B) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(tokens, cfg["hidden"], device="cuda").bfloat16()
    ids, weights = make_routing(tokens, cfg["experts"], cfg["top_k"], skew, device="cuda")
    return x, ids, weights


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("skew", [False, True])
def test_moe_gpt_oss_20b_matches_float64(layer_20b: Layer, tokens: int, skew: bool, seed: int) -> None:
    x, ids, weights = inputs(tokens, skew)
    assert mxfp4.select_path(x.device).path == SM90
    poison_allocator()
    out = run(x, ids, weights, layer_20b)
    assert torch.isfinite(out).all(), f"seed {seed}: unwritten or non-finite output"
    ref = reference_moe_float64(x, ids, weights, layer_20b.gate_up, layer_20b.down, layer_20b.gate_up_bias, layer_20b.down_bias)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("paired", [True, False], ids=["fused", "unfused"])
def test_moe_gpu_variants_with_tails(id_dtype: torch.dtype, weight_dtype: torch.dtype, bias: bool, paired: bool, seed: int) -> None:
    """H and I not multiples of the 64-wide atom, empty experts (skew), int32/int64 ids, bf16/fp32 weights."""
    layer = make_layer(8, 160, 96, 160 ** -0.5, device="cuda", paired=paired)
    x = torch.randn(13, 160, device="cuda").bfloat16()
    ids, weights = make_routing(13, 8, 3, skew=True, device="cuda")
    ids, weights = ids.to(id_dtype), weights.to(weight_dtype)
    poison_allocator()
    out = run(x, ids, weights, layer, bias=bias)
    biases = (layer.gate_up_bias, layer.down_bias) if bias else (None, None)
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, *biases)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"


def test_moe_gpu_no_host_sync_and_deterministic(layer_20b: Layer, seed: int) -> None:
    x, ids, weights = inputs(32, skew=True)
    first = run(x, ids, weights, layer_20b)  # warm: compiles / loads the kernels
    torch.cuda.set_sync_debug_mode("error")  # any torch host sync now raises
    try:
        again = run(x, ids, weights, layer_20b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first, again), f"seed {seed}"


@pytest.mark.parametrize("tokens", [1, 32])
def test_moe_cuda_graph_replay_equals_eager(layer_20b: Layer, tokens: int, seed: int) -> None:
    """A fixed T captures (the static-shape decode variant); replays with new routing match eager bitwise."""
    x, ids, weights = inputs(tokens, skew=False)
    run(x, ids, weights, layer_20b)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(x, ids, weights, layer_20b)
    for skew in (False, True):
        new_x, new_ids, new_weights = inputs(tokens, skew)
        x.copy_(new_x)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, run(new_x, new_ids, new_weights, layer_20b)), f"seed {seed}"


def test_moe_gpu_compiles_fullgraph(layer_20b: Layer, seed: int) -> None:
    x, ids, weights = inputs(8, skew=False)
    compiled = torch.compile(lambda x, i, w: run(x, i, w, layer_20b), fullgraph=True)
    assert torch.equal(compiled(x, ids, weights), run(x, ids, weights, layer_20b)), f"seed {seed}"


def test_transformers_drop_in_on_gpu(seed: int) -> None:
    """The tiny GptOssForCausalLM of the CPU test, on the GPU through the SM90 path."""
    pytest.importorskip("transformers")
    import copy

    from test_integrations_transformers import (
        experts_modules,
        logits,
        pin_routing,
        round_trip,
        tiny_model,
    )

    from mxfp4.integrations.transformers import convert_gpt_oss

    model = tiny_model().cuda()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for module in experts_modules(reference):
            module.gate_up_proj.copy_(round_trip(module.gate_up_proj))
            module.down_proj.copy_(round_trip(module.down_proj))
    ids = torch.randint(0, 128, (1, 12), device="cuda")
    pin_routing(reference, model)
    ref = logits(reference, ids)
    convert_gpt_oss(model)
    assert relative_error(logits(model, ids), ref) <= ACCURACY, f"seed {seed}"


# ---------------------------------------------------------------------------------------------
# The graph replay of plain eager calls (mxfp4.experts.graphs, issue 15): the same bits as the five launches.


def _launched(calls: list, layer: Layer) -> list[torch.Tensor]:
    """The outputs of the five kernels launched one by one (replay off)."""
    from mxfp4.experts import graphs as moe_graphs

    moe_graphs.set_moe_graphs(False)
    try:
        return [run(*call, layer) for call in calls]
    finally:
        moe_graphs.set_moe_graphs(None)


@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_moe_graph_replay_equals_launches_bitwise(layer_20b: Layer, tokens: int, seed: int) -> None:
    """Fresh x, ids and weights every call (each node rewritten before its launch), many calls in flight
    while the GPU is busy, and the same tensors again (nodes left as they are)."""
    from mxfp4.experts import graphs as moe_graphs

    calls = [inputs(tokens, skew=i % 2 == 1) for i in range(6)]
    expected = _launched(calls, layer_20b)
    ref = reference_moe_float64(*calls[0], layer_20b.gate_up, layer_20b.down, layer_20b.gate_up_bias, layer_20b.down_bias)
    assert relative_error(expected[0], ref) <= ACCURACY, f"seed {seed}"
    moe_graphs.set_moe_graphs(True)
    try:
        poison_allocator()
        torch.cuda._sleep(50_000_000)  # the GPU busy: the replays below are set up while earlier ones wait
        got = [run(*call, layer_20b) for call in calls + calls]
        torch.cuda.synchronize()
        graphs = moe_graphs.stats()["graphs"]
    finally:
        moe_graphs.set_moe_graphs(None)
    assert graphs == (1 if isinstance(layer_20b.gate_up, mxfp4.PackedGateUp) else 0)
    for i, out in enumerate(got):
        assert torch.equal(out, expected[i % len(calls)]), f"seed {seed}, call {i}"


def test_moe_graph_replay_on_two_streams(layer_20b: Layer, seed: int) -> None:
    from mxfp4.experts import graphs as moe_graphs

    call = inputs(8, skew=True)
    expected = _launched([call], layer_20b)[0]
    side, outs = torch.cuda.Stream(), []
    moe_graphs.set_moe_graphs(True)
    try:
        for _ in range(3):
            outs.append(run(*call, layer_20b))
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outs.append(run(*call, layer_20b))
            torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        workspaces = moe_graphs.stats()["workspaces"]
    finally:
        moe_graphs.set_moe_graphs(None)
    assert workspaces == (2 if isinstance(layer_20b.gate_up, mxfp4.PackedGateUp) else 0)  # one per stream
    for i, out in enumerate(outs):
        assert torch.equal(out, expected), f"seed {seed}, call {i}"


def test_moe_user_capture_while_a_graph_is_cached(layer_20b: Layer, seed: int) -> None:
    """A capture of the layer (the static-shape decode variant) when our own graph of it exists: the call
    under capture launches its kernels into the user's graph."""
    x, ids, weights = inputs(4, skew=False)
    for _ in range(3):
        run(x, ids, weights, layer_20b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(x, ids, weights, layer_20b)
    new_x, new_ids, new_weights = inputs(4, skew=True)
    x.copy_(new_x)
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, run(new_x, new_ids, new_weights, layer_20b)), f"seed {seed}"


@pytest.mark.parametrize("tokens", [5, 64])
def test_moe_non_finite_routing_weight_spoils_its_row_only(layer_20b: Layer, tokens: int, seed: int) -> None:
    """What mxfp4.moe's docstring promises on the GPU (the fused scatter epilogue and the combine kernel included):
    a NaN weight makes its token's row non-finite, every other row is bitwise what it is without it; under debug
    checks it is a ValueError naming the weight."""
    x, ids, weights = inputs(tokens, skew=False)
    expected = run(x, ids, weights, layer_20b)
    weights[2, 1] = float("nan")
    out = run(x, ids, weights, layer_20b)
    rest = [t for t in range(tokens) if t != 2]
    assert not torch.isfinite(out[2]).all() and torch.equal(out[rest], expected[rest]), f"seed {seed}"
    mxfp4.set_debug_checks(True)
    try:
        with pytest.raises(ValueError, match=r"topk_weights\[2, 1\] is nan"):
            run(x, ids, weights, layer_20b)
    finally:
        mxfp4.set_debug_checks(False)
