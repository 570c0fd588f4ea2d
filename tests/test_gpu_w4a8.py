"""The W4A8 kernels (FP8 e4m3 activations) and the quantizer on an SM90 GPU. Skipped without one.

Every check draws fresh random data, poisons the output with NaN first, covers tails (N, K not multiples of
the tile, empty experts, one row) and, on failure, prints the first mismatching rows / columns and the error
magnitudes. References: float64 on the same fp8-rounded x and the weights the FP8-ready layout holds (<= 1e-2);
the bf16-activation kernel for the accuracy traded (Gaussian x <= 4e-2; heavy-tailed x reported); the MoE
layer with activations="fp8" against float64 with bf16 activations (<= 5e-2).
"""

from __future__ import annotations

import accuracy
import pytest
import torch

import mxfp4
from codegen import TileConfig
from codegen.runtime.launch import EpilogueArgs, grouped_mm_sm90
from codegen.tune.selection import configs_under_test
from mxfp4.ops.dispatch import is_sm90

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not is_sm90(), reason="needs an SM90 (Hopper) GPU")]

ACCURACY = 1e-2
GAUSSIAN_BUDGET = 4e-2
MOE_BUDGET = 5e-2
# Every fp8 config the op can pick on its own, and the fp8 family samples (codegen.tune.selection.FAMILY_SAMPLES).
FP8_CONFIGS = [c for c in configs_under_test() if c.activations == "fp8"]
FP8_IDS = [c.name for c in FP8_CONFIGS]


def random_weight(e: int, n: int, k: int, generator: torch.Generator, scale_range: tuple[int, int] = (118, 132)):
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(scale_range[0], scale_range[1] + 1, (e, n, k // 32), generator=generator, dtype=torch.uint8)
    return mxfp4.MXFP4Tensor(blocks, scales)


def offsets_of(counts: list[int], device: str = "cuda", dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(device=device, dtype=dtype)


def mismatch_report(out: torch.Tensor, ref: torch.Tensor, limit: int = 5) -> str:
    """The worst elements and the rows / columns with the largest errors, for a failure message."""
    out, ref = out.double().reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
    error = (out - ref).abs()
    error = torch.where(torch.isnan(out), torch.full_like(error, float("inf")), error)
    flat = error.flatten().topk(min(limit, error.numel())).indices.tolist()
    worst = [(i // ref.shape[1], i % ref.shape[1]) for i in flat]
    rows = error.amax(dim=1).topk(min(limit, error.shape[0])).indices.tolist()
    cols = error.amax(dim=0).topk(min(limit, error.shape[1])).indices.tolist()
    cells = ", ".join(f"({r}, {c}): got {out[r, c].item():.6g} want {ref[r, c].item():.6g}" for r, c in worst)
    return f"worst {cells}; worst rows {rows}; worst cols {cols}; max |ref| {ref.abs().max().item():.3g}"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), f"unwritten (NaN-poisoned) or NaN outputs: {mismatch_report(out, ref)}"
    return accuracy.relative_error(out, ref)


def assert_close(out: torch.Tensor, ref: torch.Tensor, budget: float, what: str) -> None:
    error = relative_error(out, ref)
    assert error <= budget, f"{what}: relative error {error:.3e} > {budget:g}; {mismatch_report(out, ref)}"


def fp8_reference(x_fp8: torch.Tensor, x_scale: torch.Tensor, packed: object, counts: list[int]) -> torch.Tensor:
    """float64 (x_fp8 * x_scale) @ W_e^T per expert, W what the packed layout holds."""
    x = x_fp8.double() * x_scale.double().unsqueeze(-1)
    w = mxfp4.dequantize(mxfp4.unpack(packed), torch.float64).to(x.device)
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    for e in range(w.shape[0]):
        if counts[e]:
            out[bounds[e]:bounds[e + 1]] = x[bounds[e]:bounds[e + 1]] @ w[e].T
    return out


def run_w4a8(x_fp8: torch.Tensor, x_scale: torch.Tensor, packed: mxfp4.PackedMXFP4FP8, rows: torch.Tensor,
             config: TileConfig, masked: bool = False) -> torch.Tensor:
    out = torch.full((*x_fp8.shape[:-1], packed.n), float("nan"), dtype=torch.bfloat16, device=x_fp8.device)
    grouped_mm_sm90(x_fp8, packed.data, packed.n, packed.k, rows, masked, config, out,
                    EpilogueArgs(x_scale=x_scale, w_scale=packed.row_scale))
    torch.cuda.synchronize()
    return out


CASES = {
    # name: (E, N, K, rows per expert; None: ragged around the config's tile_m with empty experts)
    "tails": (4, 200, 96, [3, 0, 17, 1]),
    "k-tail-160": (3, 136, 160, [9, 1, 0]),
    "one-row": (1, 64, 32, [1]),
    "gpt-oss-down": (32, 2880, 2880, None),
    "gpt-oss-gate-up": (32, 5760, 2880, None),
}


@pytest.mark.parametrize("config", FP8_CONFIGS, ids=FP8_IDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_w4a8_kernel_matches_float64(config: TileConfig, case: str) -> None:
    generator = torch.Generator().manual_seed(hash((config.name, case)) % 2**31)
    e, n, k, counts = CASES[case]
    if counts is None:
        counts = torch.randint(0, 2 * config.tile_m + 3, (e,), generator=generator).tolist()
        counts[1], counts[5] = 0, 1
    packed = mxfp4.pack(random_weight(e, n, k, generator).to("cuda"), activations="fp8")
    x = torch.randn(sum(counts), k, generator=generator).to("cuda", torch.bfloat16)
    x_fp8, x_scale = mxfp4.quantize_activations(x)
    out = run_w4a8(x_fp8, x_scale, packed, offsets_of(counts), config)
    assert_close(out, fp8_reference(x_fp8, x_scale, packed, counts), ACCURACY, f"{config.name} {case} counts {counts}")


@pytest.mark.parametrize("config", FP8_CONFIGS, ids=FP8_IDS)
def test_w4a8_decode_is_bit_exact(config: TileConfig) -> None:
    """x = identity (e4m3 1.0, scale 1) makes out[t, n] = W[n, t]: the decoded weights read back through QGMMA.
    Block offsets 0..11 below each row's largest (every table), scales 2..252 (every value a finite bf16)."""
    generator = torch.Generator().manual_seed(7)
    e, n, k = 2, 136, 384
    w = random_weight(e, n, k, generator, scale_range=(2, 252))
    reference = torch.randint(13, 253, (e, n, 1), generator=generator)
    w = mxfp4.MXFP4Tensor(w.blocks, (reference - torch.arange(12).repeat(k // 32 // 12 + 1)[: k // 32]).to(torch.uint8))
    packed = mxfp4.pack(w.to("cuda"), activations="fp8")
    assert packed.rerounded_blocks == 0
    x_fp8 = torch.eye(k, device="cuda").to(torch.float8_e4m3fn).repeat(e, 1)
    x_scale = torch.ones(e * k, device="cuda")
    out = run_w4a8(x_fp8, x_scale, packed, offsets_of([k] * e), config)
    expected = mxfp4.dequantize(w.to("cuda"), torch.bfloat16)
    got = out.view(e, k, n).transpose(1, 2)
    mismatch = (got != expected).nonzero()  # bf16 == : -0 and +0 compare equal (code 8 sums to +0)
    assert mismatch.numel() == 0, (
        f"{len(mismatch)} of {got.numel()} decoded values differ; first (e, n, k, got, expected): "
        + ", ".join(f"({a}, {b}, {c}, {got[a, b, c].item()}, {expected[a, b, c].item()})" for a, b, c in mismatch[:5].tolist()))


@pytest.mark.parametrize("config", FP8_CONFIGS, ids=FP8_IDS)
def test_w4a8_masked(config: TileConfig) -> None:
    generator = torch.Generator().manual_seed(11)
    e, n, k, max_m = 6, 320, 224, 37
    packed = mxfp4.pack(random_weight(e, n, k, generator).to("cuda"), activations="fp8")
    masked_m = torch.tensor([0, 37, 5, 1, 36, 20], dtype=torch.int64, device="cuda")
    x_fp8, x_scale = mxfp4.quantize_activations(torch.randn(e, max_m, k, generator=generator).to("cuda", torch.bfloat16))
    out = run_w4a8(x_fp8, x_scale, packed, masked_m, config, masked=True)
    w = mxfp4.dequantize(mxfp4.unpack(packed), torch.float64)
    for expert, rows in enumerate(masked_m.tolist()):
        if rows:
            ref = (x_fp8[expert, :rows].double() * x_scale[expert, :rows, None].double()) @ w[expert].T
            assert_close(out[expert, :rows], ref, ACCURACY, f"{config.name} expert {expert}")


def test_quantize_kernel_is_the_torch_composition_bit_for_bit() -> None:
    """The SM90 quantizer against mxfp4.ops.activations.quantize_activations_reference: vector (K % 8 == 0: rows
    held in registers up to K = 3072, two passes beyond) and scalar (K = 100) paths, rows of every magnitude, a zero
    row, one huge channel."""
    from mxfp4.ops.activations import quantize_activations_reference

    for k in (2880, 3072, 3080, 8192, 100, 8):
        x = (torch.randn(257, k, device="cuda") * torch.logspace(-20, 20, 257, device="cuda").unsqueeze(1)).bfloat16()
        x[3] = 0
        x[5, k // 2] = 3e38
        got_fp8, got_scale = mxfp4.quantize_activations(x)
        want_fp8, want_scale = quantize_activations_reference(x)
        assert torch.equal(got_scale, want_scale), f"K={k}: scales differ at {(got_scale != want_scale).nonzero()[:5].tolist()}"
        differ = got_fp8.view(torch.uint8) != want_fp8.view(torch.uint8)
        assert not differ.any(), f"K={k}: {int(differ.sum())} e4m3 bytes differ, first at {differ.nonzero()[:5].tolist()}"


def test_quantize_kernel_gathers_rows_bit_for_bit() -> None:
    """The quantizer's gather (the FP8 MoE layer's rows: token of each routed row, repeated, out of order): row r of
    the output is row token[r] of x quantized, the same bits as quantizing x and then gathering; the kernel's
    output is poisoned first, so a row it skipped would show."""
    from codegen.runtime.quantize import quantize_fp8_sm90
    from mxfp4.ops.activations import quantize_activations_reference, quantize_gathered_rows

    generator = torch.Generator(device="cuda").manual_seed(11)
    for k, tokens, routed in ((2880, 37, 148), (3080, 5, 20), (100, 3, 1), (2880, 1, 4)):
        x = (torch.randn(tokens, k, device="cuda", generator=generator) * 10).bfloat16()
        token = torch.randint(0, tokens, (routed,), device="cuda", generator=generator)
        want_fp8, want_scale = quantize_activations_reference(x)
        want = want_fp8.view(torch.uint8)[token], want_scale[token]
        out = torch.full((routed, k), 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)  # NaN poison
        scale = torch.full((routed,), float("nan"), device="cuda")
        quantize_fp8_sm90(x, out, scale, source_rows=token.int())
        got_fp8, got_scale = quantize_gathered_rows(x, token)  # the layer's entry point: the same kernel
        for label, (rows, scales) in {"kernel": (out, scale), "quantize_gathered_rows": (got_fp8, got_scale)}.items():
            assert torch.equal(scales, want[1]), f"K={k} {label}: scales differ"
            assert torch.equal(rows.view(torch.uint8), want[0]), f"K={k} {label}: bytes differ"


def test_plain_weights_take_fp8_x_on_the_w4a16_kernel(seed: int) -> None:
    counts = [5, 0, 33, 2]
    w = mxfp4.quantize(torch.randn(4, 200, 160, device="cuda") * 0.05)
    packed = mxfp4.pack(w)
    x_fp8, x_scale = mxfp4.quantize_activations(torch.randn(sum(counts), 160, device="cuda").bfloat16())
    out = mxfp4.grouped_mm(x_fp8, packed, offsets_of(counts), x_scale=x_scale)
    assert "W4A16 on x widened" in mxfp4.explain(x_fp8, packed, offsets_of(counts), x_scale=x_scale)
    assert_close(out, fp8_reference(x_fp8, x_scale, packed, counts), ACCURACY, f"seed {seed}")


def test_op_picks_w4a8_and_explains_it(seed: int) -> None:
    counts = [7, 0, 30, 2]
    packed = mxfp4.pack(mxfp4.quantize(torch.randn(4, 256, 256, device="cuda") * 0.05), activations="fp8")
    x_fp8, x_scale = mxfp4.quantize_activations(torch.randn(sum(counts), 256, device="cuda").bfloat16())
    text = mxfp4.explain(x_fp8, packed, offsets_of(counts), x_scale=x_scale)  # explain takes what the op takes
    assert "sm90" in text and "family:    W4A8" in text, text
    out = mxfp4.grouped_mm(x_fp8, packed, offsets_of(counts), x_scale=x_scale)
    assert_close(out, fp8_reference(x_fp8, x_scale, packed, counts), ACCURACY, f"seed {seed}")
    empty = mxfp4.grouped_mm(x_fp8[:0], packed, torch.zeros(5, dtype=torch.int32, device="cuda"), x_scale=x_scale[:0])
    assert empty.shape == (0, 256)


def test_cuda_graph_quantize_and_w4a8(seed: int) -> None:
    counts = [4, 9, 0, 1, 16, 3, 8, 2]
    packed = mxfp4.pack(mxfp4.quantize(torch.randn(8, 384, 256, device="cuda") * 0.05), activations="fp8")
    offsets = offsets_of(counts)
    x = torch.randn(sum(counts), 256, device="cuda").bfloat16()

    def step() -> torch.Tensor:
        x_fp8, x_scale = mxfp4.quantize_activations(x)
        return mxfp4.grouped_mm(x_fp8, packed, offsets, x_scale=x_scale)

    step()  # warm up: compile, load, raise the smem limit
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        x_fp8, x_scale = mxfp4.quantize_activations(x)
        assert_close(out, fp8_reference(x_fp8, x_scale, packed, counts), ACCURACY, f"graph replay, seed {seed}")


def test_torch_compile_fullgraph_w4a8(seed: int) -> None:
    counts = [3, 12, 0, 6]
    packed = mxfp4.pack(mxfp4.quantize(torch.randn(4, 192, 128, device="cuda") * 0.05), activations="fp8")
    offsets = offsets_of(counts)

    @torch.compile(fullgraph=True)
    def layer(x: torch.Tensor) -> torch.Tensor:
        x_fp8, x_scale = mxfp4.quantize_activations(x * 2)
        return mxfp4.grouped_mm(x_fp8, packed, offsets, x_scale=x_scale).float().relu()

    x = torch.randn(sum(counts), 128, device="cuda").bfloat16()
    x_fp8, x_scale = mxfp4.quantize_activations(x * 2)
    assert_close(layer(x), fp8_reference(x_fp8, x_scale, packed, counts).relu(), ACCURACY, f"seed {seed}")


# ---------------------------------------------------------------------------------------------
# what the user trades: FP8 against bf16 activations, per gpt-oss shape


def activations_for(kind: str, rows: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian, or heavy-tailed: a few channels (1 in 64) 30x larger, as LLM activations have."""
    x = torch.randn(rows, k, generator=generator, device="cuda")
    if kind == "heavy-tailed":
        x[:, torch.randperm(k, generator=generator, device="cuda")[: k // 64]] *= 30.0
    return x.bfloat16()


@pytest.mark.parametrize("kind", ["gaussian", "heavy-tailed"])
@pytest.mark.parametrize(("e", "n", "k"), [(32, 5760, 2880), (32, 2880, 2880)], ids=["gate_up", "down"])
def test_fp8_against_bf16_activations(kind: str, e: int, n: int, k: int) -> None:
    """gpt-oss gate_up and down (the -120b shapes differ in E only; `bench fp8` measures both models)."""
    generator = torch.Generator(device="cuda").manual_seed(17)
    w = mxfp4.quantize(torch.randn(e, n, k, generator=generator, device="cuda") * k**-0.5)
    plain, ready = mxfp4.pack(w), mxfp4.pack(w, activations="fp8")
    counts = [16] * e
    x = activations_for(kind, sum(counts), k, generator)
    bf16 = mxfp4.grouped_mm(x, plain, offsets_of(counts))
    x_fp8, x_scale = mxfp4.quantize_activations(x)
    fp8 = mxfp4.grouped_mm(x_fp8, ready, offsets_of(counts), x_scale=x_scale)
    error = relative_error(fp8, bf16.double())
    share = ready.rerounded_blocks / ready.total_blocks
    print(f"\naccuracy E={e} N={n} K={k} {kind}: fp8 vs bf16 activations {error:.3e}; "
          f"re-rounded blocks {ready.rerounded_blocks} / {ready.total_blocks} ({100 * share:.4f}%)")
    assert error <= (GAUSSIAN_BUDGET if kind == "gaussian" else 2 * GAUSSIAN_BUDGET), mismatch_report(fp8, bf16.double())


# ---------------------------------------------------------------------------------------------
# the MoE layer


@pytest.mark.parametrize("paired", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("tokens", [1, 64, 512])
def test_moe_fp8_gpt_oss_20b(paired: bool, tokens: int, seed: int) -> None:
    from test_moe import make_routing

    from mxfp4.experts.layer import reference_moe_float64

    experts, hidden, inter, top_k = 32, 2880, 2880, 4
    gate_up_w = mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, device="cuda") * hidden**-0.5)
    down_w = mxfp4.quantize(torch.randn(experts, hidden, inter, device="cuda") * inter**-0.5)
    gate_up = (mxfp4.pack_gate_up if paired else mxfp4.pack)(gate_up_w, activations="fp8")
    down = mxfp4.pack(down_w, activations="fp8")
    biases = (torch.randn(experts, 2 * inter, device="cuda").bfloat16(), torch.randn(experts, hidden, device="cuda").bfloat16())
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    ids, weights = make_routing(tokens, experts, top_k, skew=True, device="cuda")
    out = mxfp4.moe(x, ids, weights, gate_up, down, gate_up_bias=biases[0], down_bias=biases[1], activations="fp8")
    assert torch.isfinite(out).all(), f"seed {seed}: non-finite output"
    if tokens <= 64:  # the float64 reference loops over tokens
        ref = reference_moe_float64(x, ids, weights, gate_up_w, down_w, *biases)
        assert_close(out, ref, MOE_BUDGET, f"moe fp8 ({'fused' if paired else 'unfused'}) T={tokens}, seed {seed}")
    again = mxfp4.moe(x, ids, weights, gate_up, down, gate_up_bias=biases[0], down_bias=biases[1], activations="fp8")
    assert torch.equal(out, again), "deterministic"
    if paired:
        assert "activations: fp8" in mxfp4.explain_moe(x, ids, gate_up, down, activations="fp8")


@pytest.mark.parametrize("alpha", [1.702, -0.5], ids=["static e4m3 scale", "unbounded: per-row quantizer"])
def test_moe_fp8_activated_rows_with_tails(alpha: float, seed: int) -> None:
    # The fused FP8 layer writes the activated rows as e4m3 from gate_up's epilogue with SwiGLU's static scale; with
    # alpha <= 0 nothing bounds SwiGLU below and they take the per-row quantizer (mxfp4/experts/fused_steps.py).
    from test_moe import make_routing

    from mxfp4.experts.layer import reference_moe_float64

    experts, hidden, inter, top_k, tokens = 8, 160, 96, 3, 29  # tails: H, I not multiples of 64
    gate_up_w = mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, device="cuda") * hidden**-0.5)
    down_w = mxfp4.quantize(torch.randn(experts, hidden, inter, device="cuda") * inter**-0.5)
    gate_up = mxfp4.pack_gate_up(gate_up_w, activations="fp8")
    down = mxfp4.pack(down_w, activations="fp8")
    biases = (torch.randn(experts, 2 * inter, device="cuda").bfloat16(), torch.randn(experts, hidden, device="cuda").bfloat16())
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    ids, weights = make_routing(tokens, experts, top_k, skew=True, device="cuda")
    out = mxfp4.moe(x, ids, weights, gate_up, down, gate_up_bias=biases[0], down_bias=biases[1], alpha=alpha,
                    activations="fp8")
    ref = reference_moe_float64(x, ids, weights, gate_up_w, down_w, *biases, alpha=alpha)
    assert_close(out, ref, MOE_BUDGET, f"moe fp8 alpha={alpha}, seed {seed}")


def test_moe_fp8_cuda_graph(seed: int) -> None:
    from test_moe import make_routing

    experts, hidden, inter, top_k, tokens = 8, 160, 96, 3, 13  # tails: H, I not multiples of 64
    gate_up = mxfp4.pack_gate_up(mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, device="cuda") * 0.1), activations="fp8")
    down = mxfp4.pack(mxfp4.quantize(torch.randn(experts, hidden, inter, device="cuda") * 0.1), activations="fp8")
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    ids, weights = make_routing(tokens, experts, top_k, skew=True, device="cuda")
    eager = mxfp4.moe(x, ids, weights, gate_up, down, activations="fp8")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mxfp4.moe(x, ids, weights, gate_up, down, activations="fp8")
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), f"seed {seed}: graph replay differs from the eager call"


@pytest.mark.parametrize("activations, skip", [("fp8", False), ("bf16", True)], ids=["fp8", "foreign ids"])
def test_moe_steps_eager_replay_is_the_launches_bitwise(activations: str, skip: bool, seed: int) -> None:
    """A plain eager call of the SM90 layer's launch-by-launch steps (FP8 activations; foreign ids) at T <= 64 is
    replayed as one captured CUDA graph from the second call of its key (mxfp4.experts.portable_graphs, path
    SM90_STEPS). Every call, replayed or not, equals the steps launched one by one bit for bit, with fresh x, ids
    and routing weights at new addresses each call (the graph's copy nodes follow them)."""
    from test_moe import make_routing

    from mxfp4.experts import layer as moe_layer
    from mxfp4.experts import portable_graphs

    experts, hidden, inter, top_k = 8, 160, 96, 3  # tails: H, I not multiples of 64
    generator = torch.Generator().manual_seed(seed)
    gate_up = mxfp4.pack_gate_up(mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.1)
                                 .to("cuda"), activations=activations)
    down = mxfp4.pack(mxfp4.quantize(torch.randn(experts, hidden, inter, generator=generator) * 0.1).to("cuda"),
                      activations=activations)
    mxfp4.set_moe_graphs(True)
    portable_graphs.clear()
    try:
        for tokens in (1, 13):
            for call in range(4):
                x = torch.randn(tokens, hidden, generator=generator).to("cuda", torch.bfloat16)
                ids, weights = make_routing(tokens, experts, top_k, skew=True, device="cuda")
                if skip:
                    ids = ids.masked_fill(ids == 2, experts)  # expert 2 lives on another rank
                out = mxfp4.moe(x, ids, weights, gate_up, down, activations=activations, skip_invalid_ids=skip)
                launched = moe_layer._moe_checked(x, ids, weights, gate_up, down, None, None, 1.702, 7.0,
                                                  activations, direct=False, skip_invalid_ids=skip)
                torch.cuda.synchronize()
                assert torch.equal(out, launched), f"T={tokens} call {call}: the replay differs from the launches"
        assert portable_graphs.stats()["graphs"] == 2, portable_graphs.stats()  # one per T, from the second call
    finally:
        portable_graphs.clear()
        mxfp4.set_moe_graphs(None)
