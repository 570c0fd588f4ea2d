"""The Triton code of the portable in-register MXFP4 kernel; :mod:`mxfp4.portable.kernel` launches it.

Imported only where the kernel runs (a CUDA GPU with Triton, or Triton's interpreter in the tests), so a
CPU-only install never imports Triton. How the kernel reads the packed layout is documented in
:mod:`mxfp4.portable.kernel`, which derives every constant it passes here (``tl.constexpr`` arguments: the
atom strides in 32-bit words and the decode's shifts and masks) from ``mxfp4/format/layout.py``.
"""

import triton
import triton.language as tl


@triton.jit
def _piece(word, LEFT: tl.constexpr, RIGHT: tl.constexpr, MASK: tl.constexpr):
    """One rotate-and-mask piece of a slot's decode: ``((word << LEFT) | (word >> RIGHT)) & MASK``."""
    if LEFT == 0:
        if RIGHT == 0:
            moved = word
        else:
            moved = word >> RIGHT
    else:
        if RIGHT == 0:
            moved = word << LEFT
        else:
            moved = (word << LEFT) | (word >> RIGHT)
    return moved & MASK


@triton.jit
def _bf16_halves(bits, PTX_SPLIT: tl.constexpr):
    """(low, high) 16-bit halves of uint32 ``bits`` as bf16. On a GPU one PTX ``mov.b32 {lo, hi}``, which the
    compiler then keeps as the bf16 pair it already is; Triton's interpreter runs no PTX: shifts and casts."""
    if PTX_SPLIT:
        low, high = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [bits],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        low = (bits & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        high = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return low, high


@triton.jit
def _decode_register(word, REGS: tl.constexpr, J: tl.constexpr, PTX_SPLIT: tl.constexpr):
    """bf16 code values (times 2^-126, exact) of slots ``J`` and ``J + 4`` of every word: the SM90 decode's
    A-register ``J``, whose low and high halves they are.

    ``REGS`` is ``mxfp4.portable.kernel.register_pieces()`` flattened (Triton takes a flat tuple of ints as a
    constexpr): piece ``p`` of register ``j`` is ``REGS[6 j + 3 p : 6 j + 3 p + 3]`` = (left, right, mask).
    """
    bits = _piece(word, REGS[6 * J], REGS[6 * J + 1], REGS[6 * J + 2])
    if REGS[6 * J + 5] != 0:
        bits = bits | _piece(word, REGS[6 * J + 3], REGS[6 * J + 4], REGS[6 * J + 5])
    return _bf16_halves(bits, PTX_SPLIT)


@triton.jit
def _scale_factors(scale):
    """E8M0 byte s -> bf16 factors 2^(min(s,128) - 1) and 2^(max(s,128) - 128) (NaN for 0xFF), each built by
    shifting the byte into a bf16 exponent field; their product with value * 2^-126 is value * 2^(s - 127)."""
    low = ((tl.minimum(scale, 128) + 126) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)
    high = tl.where(scale == 255, 0x7FC0, (tl.maximum(scale, 128) - 1) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return low, high


@triton.jit
def _per_word(kblock0, kblock1, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COLUMNS: tl.constexpr):
    """Per (row pair, atom) factors of the atom's two 32-blocks -> per word [BLOCK_R, BLOCK_C]: word column
    (atom, t, c) takes block ``c >> 1``."""
    both = tl.join(kblock0, kblock1)  # [BLOCK_R, atoms, block]
    spread = tl.broadcast_to(both[:, :, None, :, None], (BLOCK_R, BLOCK_C // COLUMNS, COLUMNS // 4, 2, 2))
    return tl.reshape(spread, (BLOCK_R, BLOCK_C))


@triton.jit
def _row_factors(scale_word, I0: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 COLUMNS: tl.constexpr):
    """Scale factors (low, high) of rows ``16 w + g + 8 I0`` for every word: byte ``2 block + I0`` of the
    pair's scale word, computed once per atom and spread over its word columns."""
    low0, high0 = _scale_factors((scale_word >> (8 * I0)) & 255)
    low1, high1 = _scale_factors((scale_word >> (8 * I0 + 16)) & 255)
    return (_per_word(low0, low1, BLOCK_R, BLOCK_C, COLUMNS), _per_word(high0, high1, BLOCK_R, BLOCK_C, COLUMNS))


@triton.jit
def _slots_shape(s0, s1, s2, s3, s4, s5, s6, s7):
    """Eight [BLOCK_R, BLOCK_C] tensors (slot = i0 + 2 i1 + 4 i2) -> one [BLOCK_R, BLOCK_C, i0, i1, i2].

    The outermost join becomes a thread's fastest register index: i2 (k and k + 1) there puts a bf16 pair
    in one register, for the paired bf16 multiplies and the MMA operand (no shuffle through shared memory)."""
    return tl.join(tl.join(tl.join(s0, s1), tl.join(s2, s3)), tl.join(tl.join(s4, s5), tl.join(s6, s7)))


@triton.jit
def _natural_order(slots, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COLUMNS: tl.constexpr):
    """[BLOCK_R, BLOCK_C, i0, i1, i2] slot values -> [2 BLOCK_R, 4 BLOCK_C] in weight (row, k) order.

    Word row (aw, g) (aw = 4 atom + w) and column (b, t, c) hold slot (i0, i1, i2) at tile row
    ``16 aw + 8 i0 + g`` and tile k ``64 b + 16 c + 8 i1 + 2 t + i2`` (``mxfp4.portable.kernel.slot_position``).
    """
    parts = tl.reshape(slots, (BLOCK_R // 8, 8, BLOCK_C // COLUMNS, COLUMNS // 4, 4, 2, 2, 2))  # aw g b t c i0 i1 i2
    parts = tl.permute(parts, (0, 5, 1, 2, 4, 6, 3, 7))  # aw i0 g | b c i1 t i2
    return tl.reshape(parts, (2 * BLOCK_R, 4 * BLOCK_C))


@triton.jit
def _decode_tile(word, scale_word, REGS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 COLUMNS: tl.constexpr, PTX_SPLIT: tl.constexpr):
    """Words [BLOCK_R, BLOCK_C] (uint32) and their pairs' scale words [BLOCK_R, atoms] -> bf16 weights
    [2 BLOCK_R, 4 BLOCK_C] in (row, k) order: code values times the two exact power-of-two factors."""
    s0, s4 = _decode_register(word, REGS, 0, PTX_SPLIT)
    s1, s5 = _decode_register(word, REGS, 1, PTX_SPLIT)
    s2, s6 = _decode_register(word, REGS, 2, PTX_SPLIT)
    s3, s7 = _decode_register(word, REGS, 3, PTX_SPLIT)
    codes = _slots_shape(s0, s1, s2, s3, s4, s5, s6, s7)
    low0, high0 = _row_factors(scale_word, 0, BLOCK_R, BLOCK_C, COLUMNS)  # rows of slot bit i0 = 0
    low1, high1 = _row_factors(scale_word, 1, BLOCK_R, BLOCK_C, COLUMNS)
    low = _slots_shape(low0, low1, low0, low1, low0, low1, low0, low1)
    high = _slots_shape(high0, high1, high0, high1, high0, high1, high0, high1)
    return _natural_order(codes * low * high, BLOCK_R, BLOCK_C, COLUMNS)


@triton.jit
def _grouped_tile(offsets_ptr, m_tile, num_experts, total_rows, EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, end row) of grouped m-tile ``m_tile``, found from the offsets on the device: the
    experts' tile counts, summed. Past the last tile (the grid is an upper bound): an empty range."""
    e = tl.arange(0, EXPERTS_POW2)
    valid = e < num_experts
    starts = tl.load(offsets_ptr + e, mask=valid, other=0).to(tl.int32)
    stops = tl.load(offsets_ptr + e + 1, mask=valid, other=0).to(tl.int32)
    tiles = tl.maximum(stops - starts + (BLOCK_M - 1), 0) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    expert = tl.sum((ends <= m_tile).to(tl.int32), 0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, ends - tiles, 0), 0)
    row_start = tl.maximum(tl.sum(tl.where(mine, starts, 0), 0), 0) + (m_tile - first_tile) * BLOCK_M
    row_stop = tl.minimum(tl.sum(tl.where(mine, stops, 0), 0), total_rows)
    return expert, row_start, row_stop


@triton.jit
def _masked_tile(masked_m_ptr, m_tile, max_m, BLOCK_M: tl.constexpr):
    """(expert, first row, end row) of masked m-tile ``m_tile`` in x viewed as [E * max_m, K]."""
    tiles_per_expert = tl.cdiv(max_m, BLOCK_M)
    expert = m_tile // tiles_per_expert
    count = tl.minimum(tl.load(masked_m_ptr + expert).to(tl.int32), max_m)
    row_start = expert * max_m + (m_tile % tiles_per_expert) * BLOCK_M
    return expert, row_start, expert * max_m + count


@triton.jit
def _tile(x_ptr, words_ptr, out_ptr, expert, row_start, row_stop, n_tile, n, k, n_atoms, k_atoms,
          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, REGS: tl.constexpr,
          ATOM_WORDS: tl.constexpr, PAIRS: tl.constexpr, COLUMNS: tl.constexpr, SCALE_AT: tl.constexpr,
          PTX_SPLIT: tl.constexpr):
    """One output tile: ``2 BLOCK_R`` weight rows x ``BLOCK_M`` x rows, over all of K (out^T = W x^T)."""
    pair = n_tile * BLOCK_R + tl.arange(0, BLOCK_R)  # word rows (row pairs) over atoms of N
    pair_ok = pair < n_atoms * PAIRS
    atom_base = (expert * n_atoms + pair // PAIRS).to(tl.int64) * k_atoms * ATOM_WORDS
    code_row = atom_base + (pair % PAIRS) * COLUMNS
    scale_row = atom_base + SCALE_AT + pair % PAIRS
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_stop
    x_row = tl.multiple_of(rows.to(tl.int64) * k, 32)  # K is a multiple of 32
    column = tl.arange(0, BLOCK_C)
    atom_column = tl.arange(0, BLOCK_C // COLUMNS)
    acc = tl.zeros((2 * BLOCK_R, BLOCK_M), dtype=tl.float32)
    for c0 in range(0, k_atoms * COLUMNS, BLOCK_C):
        cc = c0 + column
        word = tl.load(words_ptr + code_row[:, None] + ((cc // COLUMNS) * ATOM_WORDS + cc % COLUMNS)[None, :],
                       mask=pair_ok[:, None] & (cc < k_atoms * COLUMNS)[None, :], other=0)
        atoms = c0 // COLUMNS + atom_column
        scale_word = tl.load(words_ptr + scale_row[:, None] + (atoms * ATOM_WORDS)[None, :],
                             mask=pair_ok[:, None] & (atoms < k_atoms)[None, :], other=0)
        weights = _decode_tile(word.to(tl.uint32, bitcast=True), scale_word, REGS, BLOCK_R, BLOCK_C, COLUMNS,
                               PTX_SPLIT)
        kk = tl.max_contiguous(tl.multiple_of(4 * c0 + tl.arange(0, 4 * BLOCK_C), 4 * BLOCK_C), 4 * BLOCK_C)
        x_t = tl.load(x_ptr + x_row[None, :] + kk[:, None], mask=(kk < k)[:, None] & row_ok[None, :], other=0.0)
        acc = tl.dot(weights, x_t, acc)
    n_index = n_tile * 2 * BLOCK_R + tl.arange(0, 2 * BLOCK_R)
    out_row = rows.to(tl.int64) * n
    tl.store(out_ptr + out_row[None, :] + n_index[:, None], acc.to(tl.bfloat16),
             mask=(n_index < n)[:, None] & row_ok[None, :])


@triton.jit
def mxfp4_grouped_kernel(x_ptr, words_ptr, rows_ptr, out_ptr, total_rows, n, k, n_atoms, k_atoms, num_experts,
                         max_m, n_tiles, MASKED: tl.constexpr, EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, REGS: tl.constexpr,
                         ATOM_WORDS: tl.constexpr, PAIRS: tl.constexpr, COLUMNS: tl.constexpr,
                         SCALE_AT: tl.constexpr, PTX_SPLIT: tl.constexpr):
    """Program ``pid`` = (m-tile, n-tile), n fastest. ``rows_ptr``: offsets [E + 1] (grouped) or masked_m [E]."""
    pid = tl.program_id(0)
    m_tile = pid // n_tiles
    n_tile = pid % n_tiles
    if MASKED:
        expert, row_start, row_stop = _masked_tile(rows_ptr, m_tile, max_m, BLOCK_M)
    else:
        expert, row_start, row_stop = _grouped_tile(rows_ptr, m_tile, num_experts, total_rows, EXPERTS_POW2, BLOCK_M)
    if row_start < row_stop:
        _tile(x_ptr, words_ptr, out_ptr, expert, row_start, row_stop, n_tile, n, k, n_atoms, k_atoms,
              BLOCK_M, BLOCK_R, BLOCK_C, REGS, ATOM_WORDS, PAIRS, COLUMNS, SCALE_AT, PTX_SPLIT)
