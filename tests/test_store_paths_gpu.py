"""The epilogue's store paths on an SM90 GPU (TileConfig.store_path): the line stores through shared memory
(templates/mxfp4_line_stores.cuh) and the sector stores (mxfp4_sector_stores.cuh) write bit for bit what the paired
stores write (the paired-stores build, -DMXFP4_PAIRED_STORES), for the Store and ScaleScatter epilogues, both
activation families, with tails (N not a multiple of the tile, partial row tiles, an empty expert, one row), outputs
poisoned with NaN first. Their speed: `bench ncu-case --prefill --configs ... --mma-roof` ("paired stores (before)").
The candidate SwiGLU line stores (-DMXFP4_SWIGLU_LINES, not shipped) are checked the same way against the shipped
SwiGLU epilogue; SwiGLU's e4m3 output (the FP8 layer's gate_up) against its own bf16 output quantized in torch."""

from __future__ import annotations

import pytest
import torch
from test_gpu_kernel import random_offsets, random_weight

import mxfp4
from codegen import TileConfig
from codegen.runtime import launch
from codegen.runtime.launch import EpilogueArgs, grouped_mm_sm90

pytestmark = pytest.mark.gpu

# Lines (m256, and m128 with ping-pong), sectors (m64, one with stream-K), scatter variants of both.
CONFIGS = ["n128_m256_k64_s5_wg2", "n128_m256_k128_s5_wg2_fp8", "n128_m128_k128_s8_wg2_pp_fp8", "n128_m64_k128_s7_wg2",
           "n128_m64_k128_s7_wg2_pw_sk_f3", "n128_m256_k64_s5_wg2_scatter", "n128_m64_k128_s8_wg2_fp8_scatter"]
SWIGLU_CONFIGS = ["n128_m256_k64_s5_wg2_swiglu", "n128_m256_k128_s5_wg2_fp8_swiglu", "n128_m64_k128_s8_wg2_fp8_swiglu"]
CASES = {  # (E, N, K, rows per expert)
    "tails": (4, 200, 160, [300, 0, 17, 1]),
    "tails-16": (4, 208, 160, [300, 0, 17, 1]),  # a partial N tile that SwiGLU's paired rows (blocks of 16) fit
    "gpt-oss-down": (8, 2880, 2880, [256, 129, 0, 640, 1, 77, 300, 512]),
}
# SwiGLU's weight rows come paired in blocks of 16 (mxfp4/format/gate_up.py), so N = 200 is not a SwiGLU problem:
# the launcher refuses it (tests/test_kernel_contract.py).
SWIGLU_CASES = [case for case, (_, n, _, _) in CASES.items() if n % 16 == 0]


def _packed(config: TileConfig, weight: mxfp4.MXFP4Tensor, x: torch.Tensor):
    """(x, packed weight, epilogue) for ``config``'s family: W4A8 quantizes x and carries both row scales."""
    if config.activations == "fp8":
        packed = mxfp4.pack(weight, activations="fp8")
        x, x_scale = mxfp4.quantize_activations(x)
        return x, packed, EpilogueArgs(x_scale=x_scale, w_scale=packed.row_scale)
    return x, mxfp4.pack(weight), EpilogueArgs()


def _operands(config: TileConfig, case: str, seed: int):
    num_experts, n, k, counts = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    weight = random_weight(num_experts, n, k, generator).to("cuda")
    offsets = random_offsets(counts, torch.device("cuda"))
    x = torch.randn(sum(counts), k, generator=generator).to("cuda", torch.bfloat16)
    x, packed, epilogue = _packed(config, weight, x)
    rows_out = x.shape[0]
    if config.epilogue == "swiglu":  # gate/up interleaved: N / 2 output channels
        bias = torch.randn(num_experts, n, generator=generator).to("cuda", torch.bfloat16)
        epilogue = EpilogueArgs(bias=bias, x_scale=epilogue.x_scale, w_scale=epilogue.w_scale)
        return x, packed, offsets, epilogue, (rows_out, n // 2)
    if config.epilogue == "scatter":  # rows to token slots in a shuffled order, with routing weights and a bias
        dest = torch.randperm(x.shape[0], generator=generator).to("cuda", torch.int32)
        scale = torch.rand(x.shape[0], generator=generator).to("cuda")
        bias = torch.randn(num_experts, n, generator=generator).to("cuda", torch.bfloat16)
        epilogue = EpilogueArgs(bias=bias, row_scale=scale, row_dest=dest, x_scale=epilogue.x_scale,
                                w_scale=epilogue.w_scale)
    return x, packed, offsets, epilogue, (rows_out, n)


def test_the_configs_cover_both_sixteen_byte_store_paths() -> None:
    assert {TileConfig.from_name(name).store_path for name in CONFIGS} == {"lines", "sectors"}


def _outputs(config: TileConfig, case: str, seed: int, builds: list[dict[str, bool]]) -> list[torch.Tensor]:
    """The output of each build of ``config`` on the same operands, each into a NaN-poisoned tensor."""
    x, packed, offsets, epilogue, out_shape = _operands(config, case, seed)
    return _run_builds(config, builds, x, packed, offsets, False, epilogue, out_shape)


def _run_builds(config: TileConfig, builds: list[dict[str, bool]], x, packed, rows: torch.Tensor, masked: bool,
                epilogue: EpilogueArgs, out_shape: tuple[int, ...]) -> list[torch.Tensor]:
    outs = []
    for flags in builds:
        out = torch.full(out_shape, float("nan"), dtype=torch.bfloat16, device="cuda")
        kernel = launch.load(config, x.device, **flags)
        grouped_mm_sm90(x, packed.data, packed.n, packed.k, rows, masked, config, out, epilogue, kernel=kernel)
        torch.cuda.synchronize()
        outs.append(out)
    return outs


def _assert_same_bits(reference: torch.Tensor, other: torch.Tensor, what: str, seed: int) -> None:
    assert not torch.isnan(reference).any(), f"seed {seed}: the reference build left rows unwritten"
    assert torch.equal(other, reference), (
        f"seed {seed}: {what}: {int((other != reference).sum())} of {reference.numel()} values differ "
        f"(NaN left: {int(torch.isnan(other).sum())})")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", CONFIGS)
def test_store_paths_write_the_paired_stores_bits(name: str, case: str, seed: int) -> None:
    config = TileConfig.from_name(name)
    paired, shipped = _outputs(config, case, seed, [{"paired_stores": True}, {}])
    _assert_same_bits(paired, shipped, config.store_path, seed)


@pytest.mark.parametrize("case", SWIGLU_CASES)
@pytest.mark.parametrize("name", SWIGLU_CONFIGS)
def test_swiglu_line_stores_candidate_writes_the_shipped_bits(name: str, case: str, seed: int) -> None:
    config = TileConfig.from_name(name)
    shipped, candidate = _outputs(config, case, seed, [{}, {"swiglu_lines": True}])
    _assert_same_bits(shipped, candidate, "swiglu line stores", seed)


def _e4m3_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many e4m3 values apart a and b are, elementwise (+0 and -0 the same value)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.uint8).to(torch.int32)
        return torch.where(bits >= 128, -(bits & 0x7F), bits)

    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("aligned", [True, False], ids=["paired", "unaligned"])
@pytest.mark.parametrize("case", SWIGLU_CASES)
@pytest.mark.parametrize("name", [*SWIGLU_CONFIGS, "n128_m16_k128_s5_wg1_c3_swiglu"])
def test_swiglu_e4m3_output_is_the_bf16_output_quantized(name: str, case: str, aligned: bool, seed: int) -> None:
    # The FP8 layer's gate_up (mxfp4/experts/fused_steps.py): the same kernel writes e4m3(value / s), and s into every
    # row's scale. Against its own bf16 output quantized in torch: the two round the same fp32 value, once to e4m3
    # and once through bf16, so a value sitting next to an e4m3 rounding boundary may land one step apart.
    # "unaligned": out starts one byte in, so the kernel takes its one-byte-store fallback.
    import dataclasses

    from mxfp4.ops.activations import FP8_MAX, swiglu_e4m3_scale

    config = TileConfig.from_name(name)
    x, packed, offsets, epilogue, out_shape = _operands(config, case, seed)
    (bf16,) = _run_builds(config, [{}], x, packed, offsets, False, epilogue, out_shape)
    assert not torch.isnan(bf16).any(), f"seed {seed}: the bf16 build left rows unwritten"
    scale = swiglu_e4m3_scale(epilogue.alpha, epilogue.limit)
    rows, cols = out_shape
    skip = 0 if aligned else 1
    storage = torch.full((rows * cols + skip,), 0x7F, dtype=torch.uint8, device="cuda")  # 0x7F: e4m3 NaN
    out = storage[skip:].view(torch.float8_e4m3fn).view(rows, cols)
    row_scale = torch.full((rows + 8,), float("nan"), device="cuda")
    grouped_mm_sm90(x, packed.data, packed.n, packed.k, offsets, False, config, out,
                    dataclasses.replace(epilogue, out_row_scale=row_scale, out_scale=scale))
    torch.cuda.synchronize()
    assert not torch.isnan(out.float()).any(), f"seed {seed}: {int(torch.isnan(out.float()).sum())} values unwritten"
    assert torch.equal(row_scale[:rows], torch.full((rows,), scale, device="cuda")), f"seed {seed}: row scales"
    assert torch.isnan(row_scale[rows:]).all(), f"seed {seed}: a scale written past the rows"
    expected = (bf16.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    steps = _e4m3_steps(out, expected)
    assert int(steps.max()) <= 1, f"seed {seed}: a value {int(steps.max())} e4m3 steps from the bf16 output's"
    assert int((steps > 0).sum()) <= max(8, expected.numel() // 25), (
        f"seed {seed}: {int((steps > 0).sum())} of {expected.numel()} values one step apart")


def test_candidates_from_the_environment_are_the_flagged_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    # HOPPER_MXFP4_CANDIDATES makes a plain launch.load (what the op and the layer call) take the candidate build.
    from codegen.runtime.candidates import ENV_CANDIDATES, environment_candidates

    config = TileConfig.from_name(SWIGLU_CONFIGS[0])
    store = TileConfig.from_name(CONFIGS[0])
    monkeypatch.delenv(ENV_CANDIDATES, raising=False)  # the suite may run under the variable itself
    environment_candidates.cache_clear()
    shipped, store_shipped = launch.load(config, torch.device("cuda")), launch.load(store, torch.device("cuda"))
    monkeypatch.setenv(ENV_CANDIDATES, "swiglu_lines")
    environment_candidates.cache_clear()
    try:
        assert launch.load(config, torch.device("cuda")) is launch.load(config, torch.device("cuda"), swiglu_lines=True)
        assert launch.load(config, torch.device("cuda")) is not shipped
        assert launch.load(store, torch.device("cuda")) is store_shipped  # a Store config has no SwiGLU candidate
    finally:
        monkeypatch.delenv(ENV_CANDIDATES)
        environment_candidates.cache_clear()
    assert launch.load(config, torch.device("cuda")) is shipped
