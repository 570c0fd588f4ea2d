"""Narrow WGMMAs (TileConfig.mma_rows) on an SM90 GPU: a tile issues WGMMAs only as wide as its valid rows need and
loads only those rows of x, so its output must be the single-width kernel's bit for bit (the same tiles, the same k
order; a WGMMA's width does not change how an element's products are summed). Rows per expert cover every width
(1 .. tile_m valid rows in a tile, several tiles per expert, empty experts), N and K with tails; outputs are
poisoned with NaN first. Against float64 the samples also run in test_gpu_kernel.py and test_gpu_w4a8.py
(codegen.tune.selection.FAMILY_SAMPLES)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_gpu_kernel import random_offsets, random_weight

import mxfp4
from codegen import TileConfig
from codegen.runtime.launch import EpilogueArgs, grouped_mm_sm90
from codegen.tune.selection import configs_under_test
from mxfp4.ops.dispatch import is_sm90

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not is_sm90(), reason="needs an SM90 (Hopper) GPU")]

SAMPLES = [config for config in configs_under_test() if config.mma_rows]


def _counts(config: TileConfig) -> list[int]:
    """Rows per expert: every part count's edges (1 row, one narrow WGMMA's rows and one more, ...), a full tile,
    a tile and a row, several tiles, and empty experts."""
    step, tile = config.mma_rows, config.tile_m
    return [1, step, step + 1, 0, 2 * step + 1, tile - 1, tile, tile + 1, 0, 3 * tile + step // 2]


def _run(config: TileConfig, x: torch.Tensor, weight: mxfp4.MXFP4Tensor, offsets: torch.Tensor,
         n: int, k: int) -> torch.Tensor:
    out = torch.full((x.shape[0], n), float("nan"), dtype=torch.bfloat16, device=x.device)
    if config.activations == "fp8":
        packed = mxfp4.pack(weight, activations="fp8")
        x_fp8, x_scale = mxfp4.quantize_activations(x)
        grouped_mm_sm90(x_fp8, packed.data, n, k, offsets, False, config, out,
                        EpilogueArgs(x_scale=x_scale, w_scale=packed.row_scale))
    else:
        packed = mxfp4.pack(weight)
        grouped_mm_sm90(x, packed.data, n, k, offsets, False, config, out)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("config", SAMPLES, ids=lambda config: config.name)
@pytest.mark.parametrize("n, k", [(200, 160), (2880, 2880)])
def test_narrow_wgmmas_write_the_single_width_bits(config: TileConfig, n: int, k: int) -> None:
    generator = torch.Generator().manual_seed(hash((config.name, n, k)) % 2**31)
    counts = _counts(config)
    weight = random_weight(len(counts), n, k, generator).to("cuda")
    offsets = random_offsets(counts, torch.device("cuda"))
    x = torch.randn(sum(counts), k, generator=generator).to("cuda", torch.bfloat16)
    narrow = _run(config, x, weight, offsets, n, k)
    single = _run(dataclasses.replace(config, mma_rows=0), x, weight, offsets, n, k)
    assert not torch.isnan(single).any(), "the single-width kernel left rows unwritten"
    differ = narrow.view(torch.int16) != single.view(torch.int16)
    assert not differ.any(), (
        f"{int(differ.sum())} of {differ.numel()} values differ (NaN left: {int(torch.isnan(narrow).sum())}); "
        f"rows with differences: {sorted(set(differ.nonzero()[:, 0].tolist()))[:20]}")
