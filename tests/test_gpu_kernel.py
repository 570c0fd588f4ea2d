"""The generated SM90 kernels on the H100, against a float64 reference. Skipped without an SM90 GPU.

Every check draws fresh random data (never zeros), poisons the output with NaN before the
launch (so an unwritten element fails), and covers the tails: N and K not multiples of the
tile, empty experts, single rows, ragged routing.
"""

from __future__ import annotations

import accuracy
import pytest
import torch

import mxfp4
from codegen import TileConfig
from codegen.runtime.launch import grouped_mm_sm90
from codegen.tune.selection import configs_under_test
from mxfp4.ops.dispatch import is_sm90

pytestmark = pytest.mark.gpu

ACCURACY = 1e-2


requires_sm90 = pytest.mark.skipif(not is_sm90(), reason="needs an SM90 (Hopper) GPU")
# Every config the op can pick on its own (the defaults and the shipped tuning tables' choices), and
# one of each decode family (codegen.tune.selection.FAMILY_SAMPLES).
# The W4A8 family reads e4m3 x (tests/test_gpu_w4a8.py); these tests feed bf16.
CONFIGS = [config for config in configs_under_test() if config.activations == "bf16"]
CONFIG_IDS = [c.name for c in CONFIGS]
STREAM_K_CONFIGS = [c for c in CONFIGS if c.stream_k]


def random_weight(num_experts: int, n: int, k: int, generator: torch.Generator,
                  scale_range: tuple[int, int] = (118, 132)) -> mxfp4.MXFP4Tensor:
    """Random codes (all 16 values) and E8M0 scales in ``scale_range`` (inclusive)."""
    blocks = torch.randint(0, 256, (num_experts, n, k // 32, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(scale_range[0], scale_range[1] + 1, (num_experts, n, k // 32),
                           generator=generator, dtype=torch.uint8)
    return mxfp4.MXFP4Tensor(blocks, scales)


def random_offsets(counts: list[int], device: torch.device, dtype=torch.int32) -> torch.Tensor:
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    return torch.tensor(offsets, dtype=dtype, device=device)


def make_problem(num_experts: int, n: int, k: int, counts: list[int], seed: int):
    """Random weights (on the GPU, packed), routing offsets for ``counts`` rows per expert, and x."""
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(seed)
    weight = random_weight(num_experts, n, k, generator).to(device)
    offsets = random_offsets(counts, device)
    x = torch.randn(sum(counts), k, generator=generator).to(device, torch.bfloat16)
    return weight, mxfp4.pack(weight), offsets, x


def reference(x: torch.Tensor, weight: mxfp4.MXFP4Tensor, offsets: list[int]) -> torch.Tensor:
    """float64 x @ W_e^T per expert on the dequantized weights."""
    out = torch.zeros(x.shape[0], weight.shape[1], dtype=torch.float64, device=x.device)
    for e in range(weight.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            w_e = mxfp4.dequantize(mxfp4.MXFP4Tensor(weight.blocks[e], weight.scales[e]), torch.float32)
            out[lo:hi] = x[lo:hi].double() @ w_e.double().T
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN elements in the output"
    return accuracy.relative_error(out, ref)


def run_kernel(x: torch.Tensor, packed: mxfp4.PackedMXFP4, rows: torch.Tensor, config: TileConfig,
               masked: bool = False) -> torch.Tensor:
    shape = (*x.shape[:-1], packed.n)
    out = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=x.device)
    grouped_mm_sm90(x, packed.data, packed.n, packed.k, rows, masked, config, out)
    torch.cuda.synchronize()
    return out


CASES = {
    # name: (E, N, K, tokens per expert)
    "tails": (4, 200, 96, [3, 0, 17, 1]),
    "one-row": (1, 64, 32, [1]),
    "gpt-oss-down": (32, 2880, 2880, None),
    "gpt-oss-gate-up": (32, 5760, 2880, None),
}


@requires_sm90
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_float64(config: TileConfig, case: str) -> None:
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(hash((config.name, case)) % 2**31)
    num_experts, n, k, counts = CASES[case]
    if counts is None:  # ragged routing around the config's tile_m, with empty experts
        counts = torch.randint(0, 2 * config.tile_m + 3, (num_experts,), generator=generator).tolist()
        counts[1] = 0
        counts[5] = 1
    weight = random_weight(num_experts, n, k, generator)
    packed = mxfp4.pack(weight.to(device))
    offsets = random_offsets(counts, device)
    x = torch.randn(sum(counts), k, generator=generator).to(device, torch.bfloat16)
    out = run_kernel(x, packed, offsets, config)
    ref = reference(x, weight.to(device), offsets.tolist())
    assert relative_error(out, ref) <= ACCURACY


@requires_sm90
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_decode_is_bit_exact(config: TileConfig) -> None:
    """x = identity makes out[t, n] = W[n, t]: the decoded weights read back through WGMMA. K = 13 atoms: several
    stages and a short last one, so a three-buffer config runs whole rotation periods and the drained stages after
    them (templates/mxfp4_grouped_mm_sm90.cuh, consume)."""
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(7)
    num_experts, n, k = 2, 136, 832
    # Scales 2..252 keep every decoded value a normal fp32 and a finite bf16 (so that a
    # 0 x Inf of the identity's zeros cannot turn a whole row into NaN).
    weight = random_weight(num_experts, n, k, generator, scale_range=(2, 252))
    packed = mxfp4.pack(weight.to(device))
    x = torch.eye(k, dtype=torch.bfloat16, device=device).repeat(num_experts, 1)
    offsets = random_offsets([k] * num_experts, device)
    out = run_kernel(x, packed, offsets, config)
    expected = mxfp4.dequantize(weight.to(device), torch.bfloat16)  # [E, N, K]
    got = out.view(num_experts, k, n).transpose(1, 2)
    # Bit-exact except for the sign of zero: code 8 decodes to -0, and -0 + (+0 products of
    # the identity's zeros) is +0 in the accumulator. bf16 == compares bits otherwise.
    mismatch = (got != expected).nonzero()
    assert mismatch.numel() == 0, (
        f"{len(mismatch)} of {got.numel()} decoded values differ; first (e, n, k, got, expected): "
        + ", ".join(f"({e}, {r}, {c}, {got[e, r, c].item()}, {expected[e, r, c].item()})"
                    for e, r, c in mismatch[:5].tolist())
    )
    assert (got.view(torch.int16)[expected != 0] == expected.view(torch.int16)[expected != 0]).all()


@requires_sm90
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_masked_mode(config: TileConfig) -> None:
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(11)
    num_experts, n, k, max_m = 6, 320, 224, 37
    weight = random_weight(num_experts, n, k, generator)
    packed = mxfp4.pack(weight.to(device))
    masked_m = torch.tensor([0, 37, 5, 1, 36, 20], dtype=torch.int64, device=device)
    x = torch.randn(num_experts, max_m, k, generator=generator).to(device, torch.bfloat16)
    out = run_kernel(x, packed, masked_m, config, masked=True)
    for e, rows in enumerate(masked_m.tolist()):
        if rows:
            ref = reference(x[e, :rows], mxfp4.MXFP4Tensor(weight.blocks[e:e + 1], weight.scales[e:e + 1]).to(device),
                            [0, rows])
            assert relative_error(out[e, :rows], ref) <= ACCURACY


@requires_sm90
def test_int64_offsets_and_empty_input() -> None:
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(3)
    config = CONFIGS[0]
    weight = random_weight(3, 128, 64, generator)
    packed = mxfp4.pack(weight.to(device))
    offsets = random_offsets([5, 0, 9], device, dtype=torch.int64)
    x = torch.randn(14, 64, generator=generator).to(device, torch.bfloat16)
    out = run_kernel(x, packed, offsets, config)
    assert relative_error(out, reference(x, weight.to(device), offsets.tolist())) <= ACCURACY
    empty = mxfp4.grouped_mm(x[:0], packed, torch.zeros(4, dtype=torch.int32, device=device))
    assert empty.shape == (0, 128)


@requires_sm90
def test_op_takes_the_sm90_path_and_explains_it() -> None:
    weight, packed, offsets, x = make_problem(4, 256, 128, [7, 0, 30, 2], seed=5)
    text = mxfp4.explain(x, packed, offsets)
    assert "sm90" in text.lower() and "config:    n" in text
    out = mxfp4.grouped_mm(x, packed, offsets)
    assert relative_error(out, reference(x, weight, offsets.tolist())) <= ACCURACY


@requires_sm90
def test_cuda_graph_capture_and_replay() -> None:
    weight, packed, offsets, x = make_problem(8, 384, 256, [4, 9, 0, 1, 16, 3, 8, 2], seed=9)
    mxfp4.grouped_mm(x, packed, offsets)  # warm up: compile, load, raise the smem limit
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mxfp4.grouped_mm(x, packed, offsets)
    for _ in range(2):  # new inputs in place, then replay
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, reference(x, weight, offsets.tolist())) <= ACCURACY


@requires_sm90
def test_torch_compile_fullgraph() -> None:
    weight, packed, offsets, x = make_problem(4, 192, 128, [3, 12, 0, 6], seed=13)

    @torch.compile(fullgraph=True)
    def layer(x: torch.Tensor, data: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mxfp4.grouped_mm(x * 2, data, offsets, packed.n, packed.k, "")
        return y.float().relu()

    out = layer(x, packed.data, offsets)
    ref = reference(x * 2, weight, offsets.tolist()).relu()
    assert relative_error(out, ref) <= ACCURACY


@requires_sm90
@pytest.mark.parametrize("config", STREAM_K_CONFIGS, ids=[c.name for c in STREAM_K_CONFIGS])
def test_stream_k_is_deterministic_and_splits_tiles(config: TileConfig) -> None:
    """Many tiles cut between CTAs (K of 23 k-steps over the whole grid, ragged experts): the result
    matches float64 and is bitwise the same on every run, whichever CTA finishes a tile."""
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(17)
    counts = [1, 0, 3, 2, 1, 5, 0, 1]
    k = 64 * config.k_atoms_per_stage * 23 // 2  # not a whole number of k-steps: a short last step
    weight = random_weight(len(counts), 200, k, generator)
    packed = mxfp4.pack(weight.to(device))
    offsets = random_offsets(counts, device)
    x = torch.randn(sum(counts), k, generator=generator).to(device, torch.bfloat16)
    first = run_kernel(x, packed, offsets, config)
    assert relative_error(first, reference(x, weight.to(device), offsets.tolist())) <= ACCURACY
    for _ in range(3):
        again = run_kernel(x, packed, offsets, config)
        assert torch.equal(again.view(torch.int16), first.view(torch.int16))
