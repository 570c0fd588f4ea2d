"""Staged stores (TileConfig.staged_stores, templates/mxfp4_staged_store.cuh) on an SM90 GPU: every output bit the
same as the direct stores of the same config without them (whose accuracy against float64 tests/test_gpu_kernel.py
and tests/test_gpu_w4a8.py check), for the three epilogues (the plain grouped GEMM; the MoE layer's SwiGLU and
scatter), bf16 and FP8 activations, with tails: N not a multiple of the tile nor of 16, rows of out that are not
16-byte aligned (N % 8 != 0: the value-by-value path), partial and empty experts, one row. Outputs are poisoned with
NaN first. Skipped without an SM90 GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mxfp4
from codegen import TileConfig
from codegen.runtime.launch import EpilogueArgs, grouped_mm_sm90
from codegen.tune.selection import configs_under_test
from mxfp4.ops.dispatch import is_sm90

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not is_sm90(), reason="needs an SM90 (Hopper) GPU")]

STAGED = [config for config in configs_under_test() if config.staged_stores]
STAGED_IDS = [config.name for config in STAGED]

CASES = {
    # name: (E, N, K, rows per expert)
    "tails": (4, 200, 96, [3, 0, 17, 1]),
    "unaligned-rows": (3, 100, 160, [40, 0, 9]),  # out rows of 200 bytes: no 16-byte stores
    "one-row": (1, 64, 32, [1]),
    "full-and-partial-tiles": (2, 272, 256, [300, 257]),
}


def direct_twin(config: TileConfig) -> TileConfig:
    return dataclasses.replace(config, staged_stores=False)


def random_weight(e: int, n: int, k: int, generator: torch.Generator) -> mxfp4.MXFP4Tensor:
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(118, 133, (e, n, k // 32), generator=generator, dtype=torch.uint8)
    return mxfp4.MXFP4Tensor(blocks, scales)


def grouped(config: TileConfig, x: torch.Tensor, packed: object, rows: torch.Tensor,
            x_scale: torch.Tensor | None) -> torch.Tensor:
    out = torch.full((x.shape[0], packed.n), float("nan"), dtype=torch.bfloat16, device=x.device)
    epilogue = EpilogueArgs(x_scale=x_scale, w_scale=packed.row_scale) if x_scale is not None else EpilogueArgs()
    grouped_mm_sm90(x, packed.data, packed.n, packed.k, rows, False, config, out, epilogue)
    torch.cuda.synchronize()
    return out


def assert_same_bits(staged: torch.Tensor, direct: torch.Tensor, what: str) -> None:
    assert not torch.isnan(direct).any(), f"{what}: the direct stores left NaN-poisoned outputs"
    differ = (staged.view(torch.int16) != direct.view(torch.int16)).nonzero()
    assert differ.numel() == 0, (f"{what}: {len(differ)} of {staged.numel()} outputs differ; first (row, column, "
                                 "staged, direct): " + ", ".join(
                                     f"({r}, {c}, {staged[r, c].item()}, {direct[r, c].item()})"
                                     for r, c in differ[:5].tolist()))


@pytest.mark.parametrize("config", STAGED, ids=STAGED_IDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_staged_grouped_mm_is_the_direct_bits(config: TileConfig, case: str) -> None:
    generator = torch.Generator().manual_seed(hash((config.name, case)) % 2**31)
    e, n, k, counts = CASES[case]
    packed = mxfp4.pack(random_weight(e, n, k, generator).to("cuda"), activations=config.activations)
    rows = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to("cuda", torch.int32)
    x = torch.randn(sum(counts), k, generator=generator).to("cuda", torch.bfloat16)
    x_scale = None
    if config.activations == "fp8":
        x, x_scale = mxfp4.quantize_activations(x)
    direct = grouped(direct_twin(config), x, packed, rows, x_scale)
    staged = grouped(config, x, packed, rows, x_scale)
    assert_same_bits(staged, direct, f"{config.name} {case} counts {counts}")


def moe_layer(config: TileConfig, tokens: int, seed: int) -> torch.Tensor:
    """mxfp4.moe with ``config`` forced on both GEMMs (its SwiGLU and scatter epilogues), launched one by one:
    hidden 200 and intermediate 104 (N tails for both GEMMs), top-2 of 5 experts, expert 4 never picked."""
    from mxfp4.experts import fused

    generator = torch.Generator().manual_seed(seed)
    experts, hidden, inter = 5, 200, 104
    gate_up_w = mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.1).to("cuda")
    down_w = mxfp4.quantize(torch.randn(experts, hidden, inter, generator=generator) * 0.1).to("cuda")
    gate_up_bias, down_bias = (torch.randn(experts, size, generator=generator).to("cuda", torch.bfloat16)
                               for size in (2 * inter, hidden))
    x = torch.randn(tokens, hidden, generator=generator).to("cuda", torch.bfloat16)
    ids = torch.randint(0, experts - 1, (tokens, 2), generator=generator).to("cuda")
    weights = torch.rand(tokens, 2, generator=generator).to("cuda")
    gate_up = mxfp4.pack_gate_up(gate_up_w, activations=config.activations)
    down = mxfp4.pack(down_w, activations=config.activations)

    with fused.forced_tile_config(config):
        out = mxfp4.moe(x, ids, weights, gate_up, down, gate_up_bias=gate_up_bias, down_bias=down_bias,
                        activations=config.activations)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("config", STAGED, ids=STAGED_IDS)
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_staged_moe_epilogues_are_the_direct_bits(config: TileConfig, tokens: int) -> None:
    seed = hash((config.name, tokens)) % 2**31
    direct = moe_layer(direct_twin(config), tokens, seed)
    staged = moe_layer(config, tokens, seed)
    assert_same_bits(staged, direct, f"{config.name} moe T={tokens}")
