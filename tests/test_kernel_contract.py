"""The contracts Python renders into the kernel: layout constants, the parameter block, CTAs per SM."""

from __future__ import annotations

import re
import struct

import pytest

from codegen.build.config import (
    DEFAULT_CONFIGS,
    LINE_STAGE_BYTES_PER_WARPGROUP,
    LINE_STAGE_PITCH,
    LINE_STAGE_ROWS,
    TileConfig,
)
from codegen.build.params import (
    PARAM_FIELDS,
    PARAM_OFFSETS,
    PARAMS_SIZE,
    PARAMS_STRUCT,
    pack_params,
)
from codegen.build.paths import TEMPLATES_DIR
from codegen.build.render import LAYOUT_CONSTANTS, STAGING_CONSTANTS, render
from mxfp4.format import layout


def test_layout_constants_are_rendered_from_layout_py() -> None:
    source = render(DEFAULT_CONFIGS[0])
    expected = {
        "kAtomN": layout.ATOM_N, "kAtomK": layout.ATOM_K, "kAtomCodeBytes": layout.ATOM_CODE_BYTES,
        "kAtomBytes": layout.ATOM_BYTES, "kScaleWordsPerWarp": layout.SCALE_WORDS_PER_WARP,
        "kLanesPerScaleWord": layout.LANES_PER_SCALE_WORD,
        # the FP8-ready layout's decode (mxfp4_decode_fp8.cuh)
        "kFp8TableLo": layout.FP8_TABLE_LO, "kFp8TableHi": layout.FP8_TABLE_HI,
        "kFp8IndexMask": layout.FP8_INDEX_MASK, "kFp8SignShift": layout.FP8_SIGN_SHIFT,
    }
    for register in range(4):  # the decode's rotates and masks (layout.DECODE_PIECES)
        for piece in range(2):
            rotate, half_mask = layout.decode_piece(register, piece)
            expected[f"kDecodeRotate{register}{piece}"] = rotate
            expected[f"kDecodeHalfMask{register}{piece}"] = half_mask
    assert {name: value for name, value, _ in LAYOUT_CONSTANTS} == expected
    for name, value in expected.items():
        assert re.search(rf"constexpr int {name} = {value};", source), name


def test_staging_constants_are_rendered_from_config_py() -> None:
    source = render(DEFAULT_CONFIGS[0])
    assert {name: value for name, value, _ in STAGING_CONSTANTS} == {
        "kLineStageRows": LINE_STAGE_ROWS, "kLineStagePitch": LINE_STAGE_PITCH}
    assert LINE_STAGE_BYTES_PER_WARPGROUP == LINE_STAGE_ROWS * LINE_STAGE_PITCH
    for name, value, _ in STAGING_CONSTANTS:
        assert re.search(rf"constexpr int {name} = {value};", source), name


def test_headers_define_no_layout_constant_of_their_own() -> None:
    names = [name for name, _, _ in LAYOUT_CONSTANTS + STAGING_CONSTANTS]
    for header in TEMPLATES_DIR.glob("*.cuh"):
        text = header.read_text()
        for name in names:
            assert not re.search(rf"\b{name}\s*=(?!=)", text), f"{header.name} defines {name}; it is rendered"


def test_scale_word_formula_matches_scale_position() -> None:
    # The kernel's thread -> scale word formula (rendered constants) picks the word holding its rows.
    for tid in range(128):
        word = layout.scale_word_of_thread(tid)
        rows = {layout.scale_position(word, byte)[0] for byte in range(4)}
        row_g = 16 * (tid // 32) + (tid % 32) // 4
        assert rows == {row_g, row_g + 8}


def test_params_struct_matches_the_field_offsets() -> None:
    values: dict[str, int | bytes] = {f.name: i + 1 for i, f in enumerate(PARAM_FIELDS) if f.fmt}
    maps = {f.name: bytes((i + j) % 256 for j in range(128)) for i, f in enumerate(PARAM_FIELDS) if not f.fmt}
    assert set(maps) == {"x_map"}
    block = pack_params(**values, **maps)
    assert len(block) == PARAMS_SIZE == PARAMS_STRUCT.size
    for field in PARAM_FIELDS:
        offset = PARAM_OFFSETS[field.name]
        if field.fmt:
            assert struct.unpack_from("<" + field.fmt, block, offset)[0] == values[field.name]
        else:
            assert offset % 64 == 0 and bytes(block[offset:offset + 128]) == maps[field.name]
    assert PARAM_OFFSETS["x_map"] == 0  # first: the TMA unit reads the descriptor in place (64-byte aligned)


def test_ctas_per_sm_name_round_trip_and_defaults() -> None:
    config = TileConfig(tile_n=128, tile_m=8, tile_k=128, stages=4, warpgroups=1, ctas_per_sm=3)
    assert config.name == "n128_m8_k128_s4_wg1_c3"
    assert TileConfig.from_name(config.name) == config
    assert TileConfig.from_name("n128_m64_k128_s4_wg2").ctas_per_sm == 1  # old names keep their meaning
    assert "_c" not in TileConfig().name


def test_ctas_per_sm_sizes_shared_memory_and_registers() -> None:
    one = TileConfig(tile_n=128, tile_m=8, tile_k=128, stages=4, warpgroups=1)
    three = TileConfig(tile_n=128, tile_m=8, tile_k=128, stages=4, warpgroups=1, ctas_per_sm=3)
    assert three.max_shared_memory_bytes == 228 * 1024 // 3 - 1024 < one.max_shared_memory_bytes
    assert three.launch_registers == 65536 // (256 * 3) // 8 * 8
    assert three.register_pool_suffices(three.launch_registers)
    assert "__launch_bounds__(Config::Threads, 3)" in render(three.validate())
    with pytest.raises(ValueError, match="shared memory per CTA"):
        TileConfig(tile_n=128, tile_m=8, tile_k=256, stages=8, warpgroups=1, ctas_per_sm=2).validate()
    with pytest.raises(ValueError, match="ctas_per_sm=7"):
        TileConfig(ctas_per_sm=7).validate()
    with pytest.raises(ValueError, match="2048 threads"):
        TileConfig(tile_n=256, tile_m=8, tile_k=64, stages=2, warpgroups=4, ctas_per_sm=4).validate()


def test_producer_warp_sizes_threads_and_registers() -> None:
    warp = TileConfig(tile_n=64, tile_m=8, tile_k=128, stages=6, warpgroups=1, ctas_per_sm=5, producer="warp").validate()
    assert warp.name == "n64_m8_k128_s6_wg1_c5_pw" and TileConfig.from_name(warp.name) == warp
    assert warp.threads == 128 + 32 and not warp.uses_setmaxnreg
    assert warp.consumer_registers == warp.launch_registers == 65536 // (160 * 5) // 8 * 8
    assert warp.register_pool_suffices(1)  # nothing to hand over: no setmaxnreg request can hang
    source = render(warp)
    assert "__launch_bounds__(Config::Threads, 5)" in source and "Epilogue::Store, true, false, false>" in source
    with pytest.raises(ValueError, match="producer='thread'"):
        TileConfig(producer="thread").validate()
    with pytest.raises(ValueError, match="registers"):  # four CTAs of 160 threads: 96 registers, too few for n128
        TileConfig(tile_n=128, tile_m=8, tile_k=128, stages=4, warpgroups=1, ctas_per_sm=4, producer="warp").validate()


def test_stream_k_is_a_name_suffix_and_a_template_flag() -> None:
    config = TileConfig.from_name("n128_m8_k128_s6_wg1_c3_pw_sk_swiglu")
    assert (config.producer, config.stream_k, config.epilogue) == ("warp", True, "swiglu")
    assert config.name == "n128_m8_k128_s6_wg1_c3_pw_sk_swiglu"
    assert "stream-K" in config.family and "producer warp" in config.family
    assert "Epilogue::SwiGLU, true, true, false>" in render(config)
    with pytest.raises(ValueError, match="stream_k must be a bool"):
        TileConfig(stream_k=1).validate()
    with pytest.raises(ValueError, match="not of the form"):
        TileConfig.from_name("n128_m8_k128_s6_wg1_sk_pw")  # suffixes in their fixed order


def test_family_names_the_kernel_shape() -> None:
    assert TileConfig.from_name("n128_m8_k128_s6_wg1_c3").family.startswith("decode: 3 light CTAs per SM")
    assert TileConfig.from_name("n128_m64_k128_s7_wg2").family.startswith("warp-specialized: one CTA per SM")
    assert TileConfig.from_name("n128_m8_k128_s6_wg1_c3_swiglu").family.endswith("swiglu epilogue")


def test_fragment_buffers_name_round_trip_and_validation() -> None:
    deep = TileConfig(tile_n=128, tile_m=256, tile_k=128, stages=5, warpgroups=2, activations="fp8", fragment_buffers=3)
    assert deep.name == "n128_m256_k128_s5_wg2_f3_fp8" and TileConfig.from_name(deep.name) == deep.validate()
    swiglu = TileConfig.from_name("n128_m64_k128_s7_wg2_pw_sk_f3_swiglu")  # after _sk, before _fp8 and the epilogue
    assert (swiglu.producer, swiglu.stream_k, swiglu.fragment_buffers, swiglu.epilogue) == ("warp", True, 3, "swiglu")
    assert TileConfig.from_name("n128_m256_k64_s5_wg2").fragment_buffers == 2  # old names keep their meaning
    assert "_f" not in TileConfig().name and TileConfig(fragment_buffers=2) == TileConfig()
    assert "3 fragment buffers" in deep.family and "fragment" not in TileConfig().family
    with pytest.raises(ValueError, match="not of the form"):
        TileConfig.from_name("n128_m256_k128_s5_wg2_fp8_f3")  # suffixes in their fixed order
    with pytest.raises(ValueError, match=r"fragment_buffers=4: one of \(2, 3\)"):
        TileConfig(fragment_buffers=4).validate()
    with pytest.raises(ValueError, match="fragment_buffers must be a positive int"):
        TileConfig(fragment_buffers=0).validate()
    with pytest.raises(ValueError, match=r"fragment_buffers=3: needs tile_k >= 128 \(got tile_k=64\)"):
        TileConfig.from_name("n128_m256_k64_s5_wg2_f3")  # the previous slot is released after a stage's chunk 1
    with pytest.raises(ValueError, match="fragment_buffers=3: tile_n=256 x tile_k=256 is 16 weight atoms per stage"):
        TileConfig(tile_n=256, tile_m=64, tile_k=256, stages=3, warpgroups=2, fragment_buffers=3).validate()


def test_fragment_buffers_cost_registers() -> None:
    """bf16: 16 A-fragment registers per buffer and 64-row block (four k16 steps of four), fp8: 8 (two k32 steps)."""
    for activations, per_buffer in (("bf16", 16), ("fp8", 8)):
        for buffers in (2, 3):
            config = TileConfig(tile_k=128, activations=activations, fragment_buffers=buffers)
            assert config.fragment_registers == buffers * per_buffer
    # One consumer warpgroup of four CTAs per SM keeps 104 registers: two buffers fit beside 32 accumulators,
    # three do not (32 + 48 + 40 > 104).
    two = TileConfig(tile_n=256, tile_m=64, tile_k=128, stages=6, warpgroups=4).validate()
    assert two.consumer_registers == 104
    with pytest.raises(ValueError, match=r"32 accumulators and 48 A-fragment registers \(3 buffers\)"):
        TileConfig(tile_n=256, tile_m=64, tile_k=128, stages=6, warpgroups=4, fragment_buffers=3).validate()


def test_fragment_buffers_render_only_when_not_two() -> None:
    """Two buffers render what the kernel rendered before the field existed (the generated sources and cubins of
    every existing config stay the same); three add KernelConfig's last argument and say so in the header."""
    for config in DEFAULT_CONFIGS:
        source = render(config)
        assert "fragment" not in source.lower(), config.name
        assert re.search(r"mxfp4::KernelConfig<[^>]*, (true|false)> \{", source), config.name  # no 12th argument
    deep = TileConfig.from_name("n128_m256_k128_s3_wg2_f3")
    source = render(deep)
    assert "activations=bf16 fragment_buffers=3\n" in source
    assert "mxfp4::Epilogue::Store, false, false, false, 3> {" in source
    twin = render(TileConfig.from_name("n128_m256_k128_s3_wg2"))
    assert twin == source.replace(" fragment_buffers=3", "").replace(", 3> {", "> {").replace("_f3", "")


def test_pingpong_name_round_trip_validation_and_rendering() -> None:
    """`_pp` after `_f<n>`, before `_fp8`; each warpgroup holds the whole tile; rendered as KernelConfig's last
    argument (after FragmentBuffers, which it then spells out) and only when on."""
    pp = TileConfig(tile_n=128, tile_m=128, tile_k=128, stages=8, warpgroups=2, activations="fp8", pingpong=True)
    assert pp.name == "n128_m128_k128_s8_wg2_pp_fp8" and TileConfig.from_name(pp.name) == pp.validate()
    swiglu = TileConfig.from_name("n128_m64_k128_s8_wg2_f3_pp_swiglu")
    assert (swiglu.fragment_buffers, swiglu.pingpong, swiglu.epilogue) == (3, True, "swiglu")
    assert pp.atoms_per_warpgroup == 2 and pp.accumulators_per_thread == 128  # the 128 x 128 tile per warpgroup
    assert "ping-pong" in pp.family and "ping-pong" not in TileConfig().family
    source = render(pp)
    assert "pingpong=True" in source and "mxfp4::Epilogue::Store, false, false, true, 2, true> {" in source
    with pytest.raises(ValueError, match="not of the form"):
        TileConfig.from_name("n128_m128_k128_s8_wg2_fp8_pp")  # suffixes in their fixed order
    with pytest.raises(ValueError, match="pingpong: needs warpgroups=2 and no stream-K"):
        TileConfig(tile_n=128, tile_m=64, warpgroups=1, pingpong=True).validate()
    with pytest.raises(ValueError, match="pingpong: needs warpgroups=2 and no stream-K"):
        TileConfig(tile_n=128, tile_m=64, warpgroups=2, stream_k=True, pingpong=True).validate()
    with pytest.raises(ValueError, match="pingpong must be a bool"):
        TileConfig(pingpong=1).validate()
    with pytest.raises(ValueError, match="128 x 256 rows per warpgroup needs 256 fp32 accumulators"):
        TileConfig(tile_n=128, tile_m=256, tile_k=64, stages=4, warpgroups=2, pingpong=True).validate()


def test_the_launcher_refuses_swiglu_rows_that_are_not_paired() -> None:
    # SwiGLU's gate/up rows are paired in blocks of 16 (mxfp4/format/gate_up.py); with a partial block the kernel
    # would write a channel past the end of its output row. Refused before any device work (CPU tensors here).
    import torch

    from codegen.runtime.launch import grouped_mm_sm90

    config = TileConfig.from_name("n128_m64_k128_s7_wg2_swiglu")
    x = torch.zeros(4, 160, dtype=torch.bfloat16)
    w_data = torch.zeros(1, 4, 3, 2176, dtype=torch.uint8)
    out = torch.zeros(4, 100, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="n: the swiglu epilogue needs paired gate_up rows, a multiple of 16; got 200"):
        grouped_mm_sm90(x, w_data, 200, 160, offsets, False, config, out)


def _swiglu_e4m3_call(config_name: str = "n128_m64_k128_s7_wg2_swiglu", **overrides):
    """(args of grouped_mm_sm90 for a SwiGLU launch with e4m3 output, on CPU tensors) with ``overrides``."""
    import torch

    from codegen.runtime.launch import EpilogueArgs

    rows, n, k = 6, 32, 64
    call = {"x": torch.zeros(rows, k, dtype=torch.bfloat16), "w_data": torch.zeros(1, 1, 1, 2176, dtype=torch.uint8),
            "n": n, "k": k, "rows": torch.tensor([0, rows], dtype=torch.int32), "masked": False,
            "config": TileConfig.from_name(config_name), "out": torch.zeros(rows, n // 2, dtype=torch.float8_e4m3fn),
            "epilogue": EpilogueArgs(out_row_scale=torch.zeros(rows), out_scale=0.125)}
    call.update(overrides)
    return call


def test_the_launcher_packs_the_swiglu_e4m3_output(monkeypatch: pytest.MonkeyPatch) -> None:
    # The parameter block is packed positionally: read back by field name, the e4m3 output's three fields are there.
    import types

    from codegen.runtime import launch
    from codegen.runtime.fast_driver import params_buffer

    blocks: list[bytes] = []
    kernel = types.SimpleNamespace(function_handle=1, threads=384, shared_memory=0, name="fake", max_ctas=132)
    monkeypatch.setattr(launch, "load", lambda config, device: kernel)
    monkeypatch.setattr(launch, "encode_x_map", lambda *args: bytes(128))
    monkeypatch.setattr(launch, "launch_on", lambda *args: blocks.append(bytes(params_buffer(PARAMS_SIZE))))
    e4m3 = _swiglu_e4m3_call()
    launch.grouped_mm_sm90(**e4m3)
    launch.grouped_mm_sm90(**_swiglu_e4m3_call(out=_bf16_zeros(6, 16), epilogue=launch.EpilogueArgs()))
    e4m3_fields, bf16_fields = (dict(zip((f.name for f in PARAM_FIELDS), PARAMS_STRUCT.unpack_from(block)))
                                for block in blocks)
    assert e4m3_fields["out_row_scale"] == e4m3["epilogue"].out_row_scale.data_ptr()
    assert (e4m3_fields["out_scale"], e4m3_fields["out_scale_inverse"]) == (0.125, 8.0)
    assert (bf16_fields["out_row_scale"], bf16_fields["out_scale"], bf16_fields["out_scale_inverse"]) == (0, 0.0, 0.0)
    for fields in (e4m3_fields, bf16_fields):  # the neighbours in place
        assert (fields["alpha"], fields["limit"], fields["out_cols"], fields["x_scale"]) == (
            pytest.approx(1.702), 7.0, 16, 0)


def _bf16_zeros(*shape: int):
    import torch

    return torch.zeros(*shape, dtype=torch.bfloat16)


@pytest.mark.parametrize("case, message", [
    ("store config", "out_row_scale: only the swiglu epilogue writes e4m3, n128_m64_k128_s7_wg2 is store"),
    ("bf16 out", "out: the swiglu epilogue with out_row_scale writes float8_e4m3fn, out is torch.bfloat16"),
    ("short scale", r"out_row_scale: expected a contiguous float32 tensor of at least 6 rows, got torch.float32 \(5,\)"),
    ("fp16 scale", r"out_row_scale: expected a contiguous float32 tensor of at least 6 rows, got torch.float16"),
    ("scale 0.1", "out_scale: expected a positive power of two, got 0.1"),
    ("scale 0", "out_scale: expected a positive power of two, got 0.0"),
    ("scale inf", "out_scale: expected a positive power of two, got inf"),
])
def test_the_launcher_refuses_a_wrong_e4m3_output(case: str, message: str) -> None:
    # Refused before any device work (CPU tensors): a wrong dtype or a short scale tensor would be written past.
    import math

    import torch

    from codegen.runtime.launch import EpilogueArgs, grouped_mm_sm90

    scale = torch.zeros(6)
    overrides = {
        "store config": {"config": TileConfig.from_name("n128_m64_k128_s7_wg2")},
        "bf16 out": {"out": _bf16_zeros(6, 16)},
        "short scale": {"epilogue": EpilogueArgs(out_row_scale=torch.zeros(5), out_scale=0.125)},
        "fp16 scale": {"epilogue": EpilogueArgs(out_row_scale=torch.zeros(6, dtype=torch.float16), out_scale=0.125)},
        "scale 0.1": {"epilogue": EpilogueArgs(out_row_scale=scale, out_scale=0.1)},
        "scale 0": {"epilogue": EpilogueArgs(out_row_scale=scale, out_scale=0.0)},
        "scale inf": {"epilogue": EpilogueArgs(out_row_scale=scale, out_scale=math.inf)},
    }[case]
    with pytest.raises(ValueError, match=message):
        grouped_mm_sm90(**_swiglu_e4m3_call(**overrides))
