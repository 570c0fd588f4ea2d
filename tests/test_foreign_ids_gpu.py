"""Foreign expert ids on the SM90 path (expert parallelism): the routing kernel's tail, and mxfp4.moe with
skip_invalid_ids=True (fused and unfused) against the float64 reference, with the caching allocator poisoned
with NaN first, under CUDA-graph capture, without a host sync. Skipped without an SM90 GPU."""

from __future__ import annotations

import pytest
import torch
from test_foreign_ids import foreign_weights, with_foreign
from test_moe import ACCURACY, make_layer, make_routing, relative_error, run
from test_moe_gpu import GPT_OSS_20B, WEIGHT_SCALE, poison_allocator

from mxfp4.experts.layer import reference_moe_float64, route
from mxfp4.ops.dispatch import SM90, select_path

pytestmark = pytest.mark.gpu


def foreign_on_device(ids: torch.Tensor, kind: str, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """with_foreign on the device, the foreign ids outside [0, experts) (the test's own expert count)."""
    mixed, foreign = with_foreign(ids.cpu(), kind, experts)
    return mixed.to(ids.device), foreign.to(ids.device)


@pytest.mark.parametrize("tokens, experts, top_k", [(1, 8, 2), (7, 8, 3), (300, 32, 4), (33, 1024, 2)])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("kind", ["sentinel", "mixed"])
def test_routing_kernel_puts_foreign_choices_in_a_written_tail(tokens: int, experts: int, top_k: int,
                                                               ids_dtype: torch.dtype, kind: str, seed: int) -> None:
    """Offsets count the valid choices only; rows past offsets[E] are the foreign choices in flat order, with
    their tokens and weight 0 (every row written: the allocator was poisoned)."""
    from codegen.runtime.routing import route_topk

    ids, weights = make_routing(tokens, experts, top_k, skew=True, device="cuda")
    ids, foreign = foreign_on_device(ids.to(ids_dtype), kind, experts)
    poison_allocator()
    got = route_topk(ids.contiguous(), weights.contiguous(), experts)
    want = route(torch.where(foreign, experts, ids), experts)  # every foreign id as the sentinel: last, stably
    torch.cuda.synchronize()
    assert torch.equal(got.offsets, want.offsets) and int(got.offsets[-1]) == int((~foreign).sum()), f"seed {seed}"
    assert torch.equal(got.row_dest.long(), want.order), f"seed {seed}"
    assert torch.equal(got.row_token.long(), want.order // top_k)
    scale = torch.where(foreign, 0.0, weights).reshape(-1)[want.order]
    assert torch.equal(got.row_scale, scale), f"seed {seed}"


@pytest.mark.parametrize("paired", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("kind", ["sentinel", "beyond", "negative", "mixed"])
@pytest.mark.parametrize("weight", ["zero", "nan"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_foreign_choices_add_exactly_zero_on_sm90(paired: bool, kind: str, weight: str, id_dtype: torch.dtype, seed: int) -> None:
    """H and I off the atom (tails), skewed routing; token 0 is NaN and has only foreign choices."""
    layer = make_layer(8, 160, 96, 160 ** -0.5, device="cuda", paired=paired)
    x = torch.randn(13, 160, device="cuda").bfloat16()
    x[0] = float("nan")
    ids, weights = make_routing(13, 8, 3, skew=True, device="cuda")
    ids, foreign = foreign_on_device(ids.to(id_dtype), kind, 8)
    weights = foreign_weights(weights, foreign, weight)
    assert select_path(x.device).path == SM90
    poison_allocator()
    out = run(x, ids, weights, layer, skip_invalid_ids=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])), f"seed {seed}"
    assert torch.isfinite(out).all(), f"seed {seed}: a skipped slot or row leaked into the sum"
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias,
                                skip_invalid_ids=True)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"


@pytest.fixture(scope="module")
def layer_20b():
    torch.manual_seed(20)
    cfg = GPT_OSS_20B
    return make_layer(cfg["experts"], cfg["hidden"], cfg["inter"], WEIGHT_SCALE, device="cuda", paired=True)


def ep_inputs(tokens: int, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What transformers' all-reduce hands a rank holding half of the 20b's experts: sentinel 32, weight 0."""
    x = torch.randn(tokens, GPT_OSS_20B["hidden"], device="cuda").bfloat16()
    ids, weights = make_routing(tokens, 2 * layer.gate_up.num_experts, GPT_OSS_20B["top_k"], device="cuda")
    off_rank = ids >= layer.gate_up.num_experts
    return x, torch.where(off_rank, layer.gate_up.num_experts, ids), weights.masked_fill(off_rank, 0.0)


@pytest.mark.parametrize("tokens", [1, 64])
def test_half_of_the_20b_experts_matches_float64(layer_20b, tokens: int, seed: int) -> None:
    """A token whose every choice is another rank's (about 1 in 18 here; at T = 1 the whole output, so
    the reference is all zero) gets an exactly-zero row; the rest match float64."""
    x, ids, weights = ep_inputs(tokens, layer_20b)
    poison_allocator()
    out = run(x, ids, weights, layer_20b, skip_invalid_ids=True)
    ref = reference_moe_float64(x, ids, weights, layer_20b.gate_up, layer_20b.down, layer_20b.gate_up_bias,
                                layer_20b.down_bias, skip_invalid_ids=True)
    off_rank = (ids == layer_20b.gate_up.num_experts).all(dim=1)
    assert torch.isfinite(out).all(), f"seed {seed}"
    assert torch.equal(out[off_rank], torch.zeros_like(out[off_rank])), f"seed {seed}: a token with no choice here"
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"  # 0.0 when both are all zero (accuracy.py)


def test_skip_adds_no_host_sync_and_is_deterministic(layer_20b, seed: int) -> None:
    x, ids, weights = ep_inputs(32, layer_20b)
    first = run(x, ids, weights, layer_20b, skip_invalid_ids=True)  # warm: compiles / loads the kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = run(x, ids, weights, layer_20b, skip_invalid_ids=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first, again), f"seed {seed}"


@pytest.mark.parametrize("tokens", [1, 32])
def test_skip_captures_into_a_cuda_graph(layer_20b, tokens: int, seed: int) -> None:
    """Captured once; replays with new routing (other foreign choices) equal eager calls bitwise."""
    x, ids, weights = ep_inputs(tokens, layer_20b)
    run(x, ids, weights, layer_20b, skip_invalid_ids=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(x, ids, weights, layer_20b, skip_invalid_ids=True)
    for _ in range(3):
        new_x, new_ids, new_weights = ep_inputs(tokens, layer_20b)
        x.copy_(new_x)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        poison_allocator()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(static_out).all(), f"seed {seed}"
        assert torch.equal(static_out, run(new_x, new_ids, new_weights, layer_20b, skip_invalid_ids=True)), f"seed {seed}"
