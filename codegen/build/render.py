"""Render the grouped GEMM template for a tile config: decisions here, CUDA in templates/."""

from __future__ import annotations

from functools import lru_cache

import jinja2

from mxfp4.format import layout

from .config import (
    DEFAULT_FRAGMENT_BUFFERS,
    LINE_STAGE_PITCH,
    LINE_STAGE_ROWS,
    PRODUCER_REGISTERS,
    TileConfig,
)
from .params import PARAMS_ALIGN, PARAMS_SIZE, ParamBlock, template_fields
from .paths import TEMPLATES_DIR

TEMPLATE_NAME = "grouped_mm.cu.j2"
ENTRY_POINT = "mxfp4_grouped_mm"
# WGMMA N sizes whose register-A bf16 atoms live in cute/arch/mma_sm90_gmma.hpp; the others are
# in the (much larger) _ext header, included only when needed to keep compiles short.
_GMMA_BASE_SIZES = frozenset({8, 16, 32, 64, 96, 128, 192, 256})


# The packed layout's constants as the device code names them; mxfp4/format/layout.py is their one home.
LAYOUT_CONSTANTS: tuple[tuple[str, int, str], ...] = (
    ("kAtomN", layout.ATOM_N, "weight rows per packed atom"),
    ("kAtomK", layout.ATOM_K, "values of K per packed atom"),
    ("kAtomCodeBytes", layout.ATOM_CODE_BYTES, "E2M1 codes of an atom, 16 bytes per consumer thread"),
    ("kAtomBytes", layout.ATOM_BYTES, "codes then E8M0 scales"),
    ("kScaleWordsPerWarp", layout.SCALE_WORDS_PER_WARP, "scale words of one warp's 16 rows"),
    ("kLanesPerScaleWord", layout.LANES_PER_SCALE_WORD, "lanes that share (broadcast) one scale word"),
    # The FP8-ready layout (W4A8 family; mxfp4_decode_fp8.cuh).
    ("kFp8TableLo", layout.FP8_TABLE_LO, "e4m3 bytes of E2M1 0, 0.5, 1, 1.5 x 2^6: PRMT bytes 0..3 at offset 0"),
    ("kFp8TableHi", layout.FP8_TABLE_HI, "e4m3 bytes of E2M1 2, 3, 4, 6 x 2^6: PRMT bytes 4..7 at offset 0"),
    ("kFp8IndexMask", layout.FP8_INDEX_MASK, "the magnitude fields of a code word"),
    ("kFp8SignShift", layout.FP8_SIGN_SHIFT, "register h's signs sit this far below bit 7"),
) + tuple(
    entry
    for register in range(4)
    for piece in range(2)
    for entry in (
        (f"kDecodeRotate{register}{piece}", layout.decode_piece(register, piece)[0],
         f"A-register {register}, piece {piece}: rotate the code word left by this"),
        (f"kDecodeHalfMask{register}{piece}", layout.decode_piece(register, piece)[1],
         f"A-register {register}, piece {piece}: then keep these bits of each 16-bit half (0: no piece)"),
    )
)


# The epilogue's staging geometry as the device code names it; codegen/build/config.py is its one home.
STAGING_CONSTANTS: tuple[tuple[str, int, str], ...] = (
    ("kLineStageRows", LINE_STAGE_ROWS, "line stores: rows of a warpgroup's 64-column block staged at once"),
    ("kLineStagePitch", LINE_STAGE_PITCH, "line stores: bytes per staged row, 128 of values and 16 of pad"),
)


# TileConfig.epilogue -> the mxfp4::Epilogue enumerator (templates/mxfp4_epilogue.cuh).
_EPILOGUE_ENUM = {"store": "Store", "swiglu": "SwiGLU", "scatter": "ScaleScatter"}
# TileConfig.store_path -> mxfp4::StoreMode, rendered only where it is not the default (Paired), so that the
# sources of the configs that keep the paired stores stay what they were.
_STORE_MODE_ENUM = {"paired": None, "sectors": "Sectors", "lines": "Lines"}


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_param_kernel(template: str, params: ParamBlock, threads: int, entry_point: str) -> str:
    """CUDA C++ source of a kernel that takes one parameter block (the routing kernel, the quantizer):
    the block's fields, its size and alignment, the block size and the entry point rendered in."""
    return environment().get_template(template).render(
        params=params.template_fields(), params_size=params.size, params_align=PARAMS_ALIGN, threads=threads,
        entry_point=entry_point,
    )


def render(config: TileConfig) -> str:
    """CUDA C++ source of the kernel for ``config`` (validated first)."""
    config.validate()
    template = environment().get_template(TEMPLATE_NAME)
    return template.render(
        config=config,
        needs_gmma_ext=any(width not in _GMMA_BASE_SIZES for width in config.mma_widths),
        mma=_mma_type(config, config.tile_m),
        mma_for=_mma_for(config),
        layout_constants=LAYOUT_CONSTANTS,
        staging_constants=STAGING_CONSTANTS,
        params=template_fields(),
        params_size=PARAMS_SIZE,
        params_align=PARAMS_ALIGN,
        producer_registers=PRODUCER_REGISTERS,
        consumer_registers=config.consumer_registers,
        epilogue=_EPILOGUE_ENUM[config.epilogue],
        store_mode=_STORE_MODE_ENUM[config.store_path],
        fp8=config.activations == "fp8",
        entry_point=ENTRY_POINT,
        **_optional_fields(config),
    )


def _mma_type(config: TileConfig, n: int) -> str:
    """CuTe's register-A WGMMA of N = ``n`` for ``config``'s family (64 weight rows; K 16 bf16 or 32 e4m3)."""
    if config.activations == "fp8":
        return f"cute::SM90::GMMA::MMA_64x{n}x32_F32E4M3E4M3_RS_TN<>"
    return f"cute::SM90::GMMA::MMA_64x{n}x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>"


def _mma_for(config: TileConfig) -> str:
    """With mma_rows: the WGMMA of N = Parts x mma_rows as one type expression of the template parameter Parts (the
    widest as the fallback); empty otherwise."""
    if not config.mma_rows:
        return ""
    *narrow, widest = config.mma_widths
    expression = _mma_type(config, widest)
    for width in reversed(narrow):
        parts = width // config.mma_rows
        expression = f"cute::conditional_t<Parts == {parts}, {_mma_type(config, width)},\n      {expression}>"
    return expression


def _optional_fields(config: TileConfig) -> dict[str, str]:
    """KernelConfig's trailing arguments (FragmentBuffers, PingPong, MmaRows) and the header's note, empty at their
    defaults (the template's default arguments): the arguments up to the last one that differs from its default, so
    that the sources of the configs without them stay what they were before the fields existed."""
    trailing = ((config.fragment_buffers != DEFAULT_FRAGMENT_BUFFERS, str(config.fragment_buffers),
                 f" fragment_buffers={config.fragment_buffers}"),
                (config.pingpong, "true" if config.pingpong else "false", " pingpong=True"),
                (config.mma_rows != 0, str(config.mma_rows), f" mma_rows={config.mma_rows}"))
    rendered = max((i + 1 for i, (differs, _, _) in enumerate(trailing) if differs), default=0)
    arguments = "".join(f", {value}" for _, value, _ in trailing[:rendered])
    note = "".join(text for differs, _, text in trailing if differs)
    return {"optional_arguments": arguments, "optional_fields_note": note}
