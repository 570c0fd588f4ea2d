"""The in-register portable kernel on the GPU, with the portable path forced (the H200 is the only GPU at hand).

float64 references on fresh random data and shapes no other test uses, N/K tails, empty experts, one row,
skewed routing, both variants; bit-exact decode; no host sync; CUDA-graph capture; the MoE layer on top; the
decoded-weight cache as an opt-in; and the memory of gpt-oss-20b-sized experts (no decoded copy anywhere).
"""

from __future__ import annotations

import pytest
import torch
from test_moe import ACCURACY, make_layer, make_routing, relative_error, run

import mxfp4
from mxfp4.experts.layer import reference_moe_float64
from mxfp4.format.layout import ATOM_CODE_BYTES, PackedMXFP4
from mxfp4.format.reference import (
    reference_grouped_mm_float64,
    reference_grouped_mm_masked_float64,
)
from mxfp4.ops import dispatch
from mxfp4.portable import fallback, weight_cache
from mxfp4.portable import kernel as portable_kernel

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def portable_forced() -> None:
    """The portable path on this SM90 GPU, with the default budget (0 where the kernel runs: no copy)."""
    dispatch.force_portable(True)  # conftest undoes it
    assert dispatch.select_path(torch.device("cuda")).path == dispatch.PORTABLE


def make_packed(experts: int, n: int, k: int) -> PackedMXFP4:
    return mxfp4.pack(mxfp4.quantize(torch.randn(experts, n, k, device="cuda") * k ** -0.5))


def offsets_of(counts: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(dtype).cuda()


def poisoned(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda")


GROUPED = [  # (N, K, rows per expert): tails in N and K, empty experts, one row, skew, decode to prefill tiles
    (720, 2880, [1] * 8),
    (720, 2880, [16, 0, 16, 16, 3, 16, 16, 0]),
    (1000, 352, [0, 33, 5, 0, 64, 1]),
    (2880, 1472, [300, 0, 129, 1]),
    (200, 96, [1100, 0, 900]),
    (96, 64, [0] * 31 + [1]),
    (1, 32, [2, 7]),
]


@pytest.mark.parametrize(("n", "k", "counts"), GROUPED)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_grouped_matches_float64(n: int, k: int, counts: list[int], dtype: torch.dtype, seed: int) -> None:
    packed = make_packed(len(counts), n, k)
    offsets = offsets_of(counts, dtype)
    x = torch.randn(sum(counts), k, device="cuda").bfloat16()
    out = poisoned(sum(counts), n)
    portable_kernel.launch(x, packed.data, n, k, offsets, False, out)
    ref = reference_grouped_mm_float64(x, packed, offsets)
    assert not out.isnan().any(), f"seed {seed}: rows left unwritten"
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"
    through_op = mxfp4.grouped_mm(x, packed, offsets)
    assert torch.equal(through_op, out), f"seed {seed}: the op takes the same kernel"


MASKED = [(1000, 352, [5, 0, 2, 1], 5), (720, 2880, [16, 3, 0, 16, 1, 9, 0, 12], 16), (300, 160, [200, 17, 0], 200)]


@pytest.mark.parametrize(("n", "k", "masked", "max_m"), MASKED)
def test_masked_matches_float64(n: int, k: int, masked: list[int], max_m: int, seed: int) -> None:
    packed = make_packed(len(masked), n, k)
    x = torch.randn(len(masked), max_m, k, device="cuda").bfloat16()
    out = poisoned(len(masked), max_m, n)
    portable_kernel.launch(x, packed.data, n, k, torch.tensor(masked, device="cuda"), True, out)
    ref = reference_grouped_mm_masked_float64(x, packed)
    valid = torch.arange(max_m, device="cuda")[None, :] < torch.tensor(masked, device="cuda")[:, None]
    assert not out[valid].isnan().any(), f"seed {seed}: rows below masked_m left unwritten"  # the rest: undefined
    assert relative_error(out[valid], ref[valid]) <= ACCURACY, f"seed {seed}"


def test_decode_is_bit_exact_for_every_scale(seed: int) -> None:
    """x = identity: out[j, r] = W[r, j], bit for bit, with scale bytes 2..252 (the SM90 test's range: every
    value a normal number through the MMA's fp32 accumulator, no inf; the interpreter test covers 0 and 1)."""
    n, k = 136, 320
    blocks = torch.randint(0, 256, (1, n, k // 32, 16), dtype=torch.uint8, device="cuda")
    scales = torch.randint(2, 253, (1, n, k // 32), dtype=torch.uint8, device="cuda")
    scales.view(-1)[:6] = torch.tensor([2, 126, 127, 128, 129, 252], dtype=torch.uint8)
    weight = mxfp4.MXFP4Tensor(blocks, scales)
    out = poisoned(k, n)
    portable_kernel.launch(torch.eye(k, device="cuda").bfloat16(), mxfp4.pack(weight).data, n, k, offsets_of([k]), False, out)
    want = mxfp4.dequantize(weight, torch.bfloat16)[0].t()
    same = (out.view(torch.int16) == want.view(torch.int16)) | ((out == 0) & (want == 0))  # the sum makes -0 +0
    assert same.all(), f"seed {seed}: {int((~same).sum())} of {same.numel()} values differ"


def test_nan_scale_gives_nan_where_the_reference_has_it(seed: int) -> None:
    packed_weight = mxfp4.quantize(torch.randn(2, 70, 64, device="cuda") * 0.1)
    scales = packed_weight.scales.clone()
    scales[1, 5, 1] = 0xFF
    packed = mxfp4.pack(mxfp4.MXFP4Tensor(packed_weight.blocks, scales))
    offsets = offsets_of([3, 4])
    x = torch.randn(7, 64, device="cuda").bfloat16()
    out, ref = mxfp4.grouped_mm(x, packed, offsets), reference_grouped_mm_float64(x, packed, offsets)
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any()
    assert relative_error(out[~ref.isnan()], ref[~ref.isnan()]) <= ACCURACY


def test_explain_and_no_decoded_copy(seed: int) -> None:
    packed = make_packed(4, 200, 96)
    x, offsets = torch.randn(9, 96, device="cuda").bfloat16(), offsets_of([2, 0, 7, 0])
    text = mxfp4.explain(x, packed, offsets)
    assert "path:      portable" in text and "fallback:  in-register kernel (no decoded copy)" in text
    assert "decoded copy held: 0 B" in text and "offsets read on the device (no host sync" in text
    mxfp4.grouped_mm(x, packed, offsets)
    mxfp4.grouped_mm_masked(x[:8].view(4, 2, 96), packed, torch.tensor([2, 0, 1, 2], device="cuda"))
    stats = weight_cache.stats("cuda")
    assert (stats.entries, stats.nbytes, stats.misses) == (0, 0, 0)


def test_no_host_sync(seed: int) -> None:
    packed = make_packed(8, 720, 2880)
    x, offsets = torch.randn(40, 2880, device="cuda").bfloat16(), offsets_of([5, 0, 9, 1, 0, 20, 3, 2])
    xm, masked = torch.randn(8, 4, 2880, device="cuda").bfloat16(), torch.tensor([4, 0, 1, 2, 3, 4, 0, 1], device="cuda")
    first, first_masked = mxfp4.grouped_mm(x, packed, offsets), mxfp4.grouped_mm_masked(xm, packed, masked)  # warm
    torch.cuda.set_sync_debug_mode("error")  # a host sync raises
    try:
        again, again_masked = mxfp4.grouped_mm(x, packed, offsets), mxfp4.grouped_mm_masked(xm, packed, masked)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    defined = torch.arange(4, device="cuda")[None, :] < masked[:, None]  # rows at or past masked_m are undefined
    assert torch.equal(first, again), f"seed {seed}: not deterministic"
    assert torch.equal(first_masked[defined], again_masked[defined]), f"seed {seed}: not deterministic (masked)"


def test_cuda_graph_replays_new_routing_and_weights(seed: int) -> None:
    packed = make_packed(6, 1000, 352)
    x, offsets = torch.randn(30, 352, device="cuda").bfloat16(), offsets_of([10, 0, 5, 5, 0, 10])
    xm, masked = torch.randn(6, 3, 352, device="cuda").bfloat16(), torch.tensor([3, 0, 1, 2, 3, 0], device="cuda")
    mxfp4.grouped_mm(x, packed, offsets), mxfp4.grouped_mm_masked(xm, packed, masked)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, out_masked = mxfp4.grouped_mm(x, packed, offsets), mxfp4.grouped_mm_masked(xm, packed, masked)
    for counts, rows in (([0, 30, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]), ([1, 2, 3, 4, 5, 15], [0, 3, 0, 3, 0, 3])):
        x.copy_(torch.randn_like(x)), offsets.copy_(offsets_of(counts)), masked.copy_(torch.tensor(rows))
        packed.data.copy_(make_packed(6, 1000, 352).data)  # in place: the replay reads the new bytes
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, reference_grouped_mm_float64(x, packed, offsets)) <= ACCURACY, f"seed {seed}"
        ref = reference_grouped_mm_masked_float64(xm, packed)
        for e, m in enumerate(rows):
            if m:
                assert relative_error(out_masked[e, :m], ref[e, :m]) <= ACCURACY, f"seed {seed}, expert {e}"


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "checkpoint order"])
def test_moe_layer_on_the_kernel(paired: bool, seed: int) -> None:
    """The unfused MoE steps run on the kernel: float64, no host sync, CUDA graph (tails, skewed routing)."""
    layer = make_layer(8, 160, 96, 160 ** -0.5, device="cuda", paired=paired)
    x = torch.randn(13, 160, device="cuda").bfloat16()
    ids, weights = make_routing(13, 8, 3, skew=True, device="cuda")
    assert "portable" in mxfp4.explain_moe(x, ids, layer.gate_up, layer.down)
    first = run(x, ids, weights, layer)
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias)
    assert relative_error(first, ref) <= ACCURACY, f"seed {seed}"
    torch.cuda.set_sync_debug_mode("error")  # a host sync in the layer raises
    try:
        again = run(x, ids, weights, layer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(again, first), f"seed {seed}"  # outside: torch.equal reads its answer on the host (.item())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run(x, ids, weights, layer)
    new_ids, new_weights = make_routing(13, 8, 3, skew=False, device="cuda")
    ids.copy_(new_ids), weights.copy_(new_weights)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, run(x, ids, weights, layer)), f"seed {seed}"
    assert weight_cache.stats("cuda").nbytes == 0


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "checkpoint order"])
def test_moe_layer_replays_as_one_cuda_graph(paired: bool, seed: int) -> None:
    """Plain eager calls at small T replay the layer as one captured graph from their second call
    (mxfp4.experts.portable_graphs): the eager call's bits, new inputs and in-place weight updates followed,
    no host sync in a replayed call, no decoded copy."""
    from mxfp4.experts import portable_graphs
    from mxfp4.experts.layer import moe_composition

    layer = make_layer(8, 160, 96, 160 ** -0.5, device="cuda", paired=paired)
    x = torch.randn(5, 160, device="cuda").bfloat16()
    ids, weights = make_routing(5, 8, 3, skew=True, device="cuda")
    mxfp4.set_moe_graphs(True)  # conftest undoes it and drops the graphs
    first = run(x, ids, weights, layer)  # eager
    second = run(x, ids, weights, layer)  # captured, then replayed
    assert portable_graphs.stats()["graphs"] == 1 and torch.equal(first, second), f"seed {seed}"
    # The graph's copy nodes move to each call's tensors (codegen.runtime.graph_copies), not torch copies.
    assert portable_graphs.stats()["direct"] == 1, portable_graphs.copies_refused()

    def eager(x, ids, weights):
        return moe_composition(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias, 1.702, 7.0)

    x2 = torch.randn_like(x)
    ids2, weights2 = make_routing(5, 8, 3, skew=False, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # a replayed call: copies in, one graph launch, a copy out
    try:
        third = run(x2, ids2, weights2, layer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = reference_moe_float64(x2, ids2, weights2, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias)
    assert relative_error(third, ref) <= ACCURACY and torch.equal(third, eager(x2, ids2, weights2)), f"seed {seed}"
    layer.down.data.copy_(make_layer(8, 160, 96, 160 ** -0.5, device="cuda", paired=paired).down.data)  # in place
    layer.gate_up_bias.mul_(-1)
    assert torch.equal(run(x2, ids2, weights2, layer), eager(x2, ids2, weights2)), f"seed {seed}: stale weights"
    assert portable_graphs.stats()["graphs"] == 1 and weight_cache.stats("cuda").nbytes == 0


@pytest.mark.parametrize("tokens", [1, 8])
def test_replay_moves_its_copy_nodes_to_each_calls_tensors(tokens: int, seed: int) -> None:
    """The replayed graph's copy nodes follow every call's x, topk_ids, topk_weights and output: fresh tensors each
    call (the earlier outputs kept, so no output address comes back), contiguous and strided ids, int32 and int64,
    then inputs rewritten in place at the same addresses; every output is the eager composition's, bit for bit."""
    from mxfp4.experts import portable_graphs
    from mxfp4.experts.layer import moe_composition

    layer = make_layer(8, 160, 96, 160 ** -0.5, device="cuda", paired=True)
    mxfp4.set_moe_graphs(True)

    def eager(x, ids, weights):
        return moe_composition(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias, 1.702, 7.0)

    outs, expected = [], []
    for step in range(8):
        x = torch.randn(tokens, 160, device="cuda").bfloat16()
        ids, weights = make_routing(tokens, 8, 3, skew=step % 2 == 0, device="cuda")  # ids: a strided slice
        ids = ids.contiguous() if step % 3 else ids
        outs.append(run(x, ids, weights, layer))
        expected.append(eager(x, ids, weights))
    assert portable_graphs.stats() == {"graphs": 1, "pools": 1, "direct": 1}, portable_graphs.copies_refused()
    for step, (out, ref) in enumerate(zip(outs, expected)):
        assert torch.equal(out, ref), f"seed {seed}, step {step}"
    x.copy_(torch.randn_like(x))  # the same addresses, new values: the nodes read them when the graph runs
    ids.copy_(make_routing(tokens, 8, 3, device="cuda")[0])
    weights.mul_(0.5)
    assert torch.equal(run(x, ids, weights, layer), eager(x, ids, weights)), f"seed {seed}: in place"
    for id_dtype in (torch.int32, torch.int64):  # another key each: its own graph
        for _ in range(3):
            assert torch.equal(run(x, ids.to(id_dtype), weights, layer), eager(x, ids.to(id_dtype), weights)), f"seed {seed}"
    assert portable_graphs.stats()["direct"] == portable_graphs.stats()["graphs"] == 2


@pytest.mark.parametrize("tokens", [1, 8])
def test_gpt_oss_20b_layer_replay_matches_eager(tokens: int, seed: int) -> None:
    """One gpt-oss-20b-sized layer (E = 32, H = I = 2880, top-4) at decode T: replay and eager give the same bits."""
    from mxfp4.experts import portable_graphs
    from mxfp4.experts.layer import moe_composition

    gate_up, down = _random_packed(32, 5760, 2880), _random_packed(32, 2880, 2880)
    gate_up = mxfp4.PackedGateUp(gate_up.data, gate_up.n, gate_up.k)
    biases = torch.randn(32, 5760, device="cuda").bfloat16(), torch.randn(32, 2880, device="cuda").bfloat16()
    x = torch.randn(tokens, 2880, device="cuda").bfloat16()
    ids, weights = make_routing(tokens, 32, 4, device="cuda")
    mxfp4.set_moe_graphs(True)
    outs = [mxfp4.moe(x, ids, weights, gate_up, down, gate_up_bias=biases[0], down_bias=biases[1]) for _ in range(3)]
    eager = moe_composition(x, ids, weights, gate_up, down, biases[0], biases[1], 1.702, 7.0)
    assert portable_graphs.stats()["graphs"] == 1 and all(torch.equal(o, eager) for o in outs), f"seed {seed}"
    assert torch.isfinite(eager).all(), f"seed {seed}"
    assert portable_graphs.stats()["direct"] == 1, portable_graphs.copies_refused()


def test_cache_is_an_opt_in_for_prefill(seed: int) -> None:
    packed = make_packed(2, 256, 512)
    mxfp4.set_fallback_memory_budget(1 << 30)
    small, large = offsets_of([3, 5]), offsets_of([fallback.CACHE_MIN_ROWS, fallback.CACHE_MIN_ROWS + 4])
    for offsets in (small, large):
        x = torch.randn(int(offsets[-1]), 512, device="cuda").bfloat16()
        assert relative_error(mxfp4.grouped_mm(x, packed, offsets), reference_grouped_mm_float64(x, packed, offsets)) <= ACCURACY
        cached = weight_cache.stats("cuda").entries
        assert cached == (1 if offsets is large else 0), f"seed {seed}: small calls take the kernel, prefill the copy"
    assert "cached decoded weights" in mxfp4.explain(x, packed, large)


def test_gpt_oss_20b_sized_experts_hold_no_copy(seed: int) -> None:
    """24 layers of gpt-oss-20b experts (E = 32, H = I = 2880), packed: decode and a prefill step over every layer
    add activations only; a decoded bf16 copy would be 3.8x the packed bytes (about 38 GB)."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    layers = [(_random_packed(32, 5760, 2880), _random_packed(32, 2880, 2880)) for _ in range(24)]
    packed_bytes = torch.cuda.memory_allocated() - before
    torch.cuda.reset_peak_memory_stats()
    for tokens in (1, 64):
        x = torch.randn(tokens, 2880, device="cuda").bfloat16()
        ids, weights = make_routing(tokens, 32, 4, device="cuda")
        for gate_up, down in layers:
            x = mxfp4.moe(x, ids, weights, gate_up, down)
        assert torch.isfinite(x).all(), f"seed {seed}"
    peak_extra = torch.cuda.max_memory_allocated() - before - packed_bytes
    print(f"\npacked experts {packed_bytes / 2**30:.2f} GiB; peak beyond them {peak_extra / 2**20:.1f} MiB")
    assert packed_bytes < 11 << 30 and peak_extra < 256 << 20 and weight_cache.stats("cuda").nbytes == 0


def _random_packed(experts: int, n: int, k: int) -> PackedMXFP4:
    """Random codes and scales near 2^-6 (weights of about 0.1): a packed weight without a quantize pass."""
    data = torch.randint(0, 256, (experts, n // 64, k // 64, 2176), dtype=torch.uint8, device="cuda")
    data[..., ATOM_CODE_BYTES:] = torch.randint(118, 122, data[..., ATOM_CODE_BYTES:].shape, dtype=torch.uint8, device="cuda")
    return PackedMXFP4(data, n, k)
