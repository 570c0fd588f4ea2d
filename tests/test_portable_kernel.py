"""The portable in-register kernel on the CPU: its reading of the packed layout, its grid, its configs, the
kernel itself under Triton's interpreter (a subprocess, see tests/portable_interpreter.py), and the portable
path's choice between the kernel and the decoded-weight cache."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mxfp4
from mxfp4.format.layout import CODE_BITS, code_position
from mxfp4.format.tensor import E2M1_VALUES
from mxfp4.portable import fallback, weight_cache
from mxfp4.portable import kernel as portable_kernel

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-2


def _bf16_value(bits: int) -> float:
    return torch.tensor([bits << 16], dtype=torch.int64).to(torch.int32).view(torch.float32).double().item()


def test_register_pieces_decode_every_code_of_a_word(seed: int) -> None:
    """For random words, register j's pieces give bf16 bits of slot j (low half) and slot j + 4 (high half),
    each the slot's E2M1 value times 2^-126 exactly (the codes read through layout.CODE_BITS)."""
    rng = random.Random(seed)
    for _ in range(200):
        word = rng.getrandbits(32)
        for register in range(4):
            bits = portable_kernel.decode_register_bits(word, register)
            for slot, half in ((register, bits & 0xFFFF), (register + 4, bits >> 16)):
                code = sum(((word >> position) & 1) << bit for bit, position in enumerate(CODE_BITS[slot]))
                assert _bf16_value(half) * 2.0**126 == E2M1_VALUES[code] and (half >> 15) == (code >> 3), (seed, hex(word), slot)
    assert [sum(1 for piece in pieces if piece[2]) for pieces in portable_kernel.register_pieces()] == [1, 1, 1, 2]
    assert len(portable_kernel.REGS) == 24


def test_word_tile_reading_matches_layout() -> None:
    """Word (pair, column) slot s lands where layout.code_position puts it: the kernel's permute, in Python."""
    seen = set()
    for pair in range(portable_kernel.PAIRS_PER_ATOM):
        for column in range(portable_kernel.WORD_COLUMNS):
            tid, word = portable_kernel.word_of(pair, column)
            assert 16 * tid + 4 * word == 4 * (portable_kernel.WORD_COLUMNS * pair + column)  # byte of the word
            for slot in range(8):
                position = portable_kernel.slot_position(pair, column, slot)
                assert position == code_position(tid, word, slot)
                seen.add(position)
    assert len(seen) == 64 * 64


def test_grouped_grid_bounds_the_tiles(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        experts, block_m = rng.randint(1, 40), rng.choice([16, 32, 64, 128, 256])
        counts = [rng.choice([0, 0, 1, rng.randint(0, 3 * block_m)]) for _ in range(experts)]
        needed = sum(-(-c // block_m) for c in counts)
        assert needed <= portable_kernel.m_tiles(sum(counts), experts, 0, False, block_m), (seed, counts, block_m)
    assert portable_kernel.m_tiles(0, 8, 0, False, 16) == 0
    assert portable_kernel.m_tiles(7, 3, 5, True, 16) == 3


def test_configs_are_valid_and_named() -> None:
    for table in (portable_kernel.HOPPER_CONFIGS, portable_kernel.OTHER_CONFIGS):
        bounds = [bound for bound, _ in table]
        assert bounds == sorted(bounds) and bounds[-1] >= 1 << 40
        for _, config in table:
            assert portable_kernel.KernelConfig.from_name(config.name) == config
            assert config.block_r % 16 == 0 and config.block_c % portable_kernel.WORD_COLUMNS == 0
            assert config.block_m >= 16 and config.num_warps in (4, 8)
    assert portable_kernel.choose_config(1).block_m == 16 and portable_kernel.choose_config(1, (8, 6)).block_m == 16
    assert portable_kernel.choose_config(4096).block_m == 256 and portable_kernel.choose_config(4096, (8, 0)).block_m == 64
    for bad in ("m16_n64", "m8_n64_k256_w4_s3", "m16_n64_k200_w4_s3", "x16_n64_k256_w4_s3"):
        with pytest.raises(ValueError, match="portable kernel config"):
            portable_kernel.KernelConfig.from_name(bad)


# ------------------------------------------------------------------------------------------------
# The kernel under Triton's interpreter.


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed here (it ships with torch's Linux CUDA wheels; pip install triton)")
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(HERE / "portable_interpreter.py"), str(seed)], capture_output=True,
                         text=True, env=env, timeout=600, cwd=HERE.parent)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("done"), f"seed {seed}:\n{run.stdout}\n{run.stderr[-3000:]}"
    results = {}
    for line in run.stdout.splitlines()[:-1]:
        result = json.loads(line)
        results[result.pop("case")] = {**result, "seed": seed}
    return results


def _interpreter_cases() -> list[str]:
    sys.path.insert(0, str(HERE))
    try:
        from portable_interpreter import CASES
    finally:
        sys.path.remove(str(HERE))
    return list(CASES)


@pytest.mark.parametrize("case", _interpreter_cases())
def test_kernel_under_the_interpreter(case: str, interpreter_results: dict[str, dict]) -> None:
    result = interpreter_results[case]
    assert "exception" not in result, result
    if "rel_error" in result:
        assert result["rel_error"] <= TOLERANCE, result
    assert result.get("nan_rows", 0) == 0, result  # every row the kernel owns was written (outputs NaN-poisoned)
    assert result.get("written_past_masked_m", 0) == 0, result
    assert result.get("mismatches", 0) == 0, result  # decode bit-exact against mxfp4.dequantize
    assert result.get("nan_pattern_differs", 0) == 0, result
    assert {"rel_error", "mismatches"} & set(result), result  # every case measured something


# ------------------------------------------------------------------------------------------------
# Which mode the portable path takes (the kernel's availability simulated on the CPU).


@pytest.fixture
def kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the in-register kernel runs on this device (for the choice only: nothing is launched)."""
    monkeypatch.setattr(portable_kernel, "unavailable_reason", lambda device_type, index: None)


def _packed(experts: int = 2, n: int = 64, k: int = 64) -> mxfp4.PackedMXFP4:
    return mxfp4.pack(mxfp4.quantize(torch.randn(experts, n, k) * 0.05))


def test_budget_decides_between_kernel_and_copy(kernel_runs: None) -> None:
    packed = _packed()
    mxfp4.set_fallback_memory_budget(0)
    mode, why = fallback.choose_mode(packed.data, 64, 64, 4096)
    assert mode == fallback.KERNEL and "budget is 0" in why
    mxfp4.set_fallback_memory_budget(1 << 30)
    mode, why = fallback.choose_mode(packed.data, 64, 64, 16)
    assert mode == fallback.KERNEL and f"below {fallback.CACHE_MIN_ROWS}" in why
    assert fallback.choose_mode(packed.data, 64, 64, fallback.CACHE_MIN_ROWS)[0] == fallback.CACHED
    mxfp4.set_fallback_memory_budget(100)  # the copy does not fit
    mode, why = fallback.choose_mode(packed.data, 64, 64, 4096)
    assert mode == fallback.KERNEL and "larger than the fallback memory budget" in why


def test_without_the_kernel_the_cpu_path_is_unchanged() -> None:
    packed = _packed()
    assert portable_kernel.unavailable_reason("cpu", None) is not None
    assert fallback.choose_mode(packed.data, 64, 64, 1)[0] == fallback.CACHED
    mxfp4.set_fallback_memory_budget(0)
    assert fallback.choose_mode(packed.data, 64, 64, 1)[0] == fallback.PER_CALL


def test_default_budget_is_zero_where_the_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(weight_cache, "_kernel_runs", lambda device: True)
    assert weight_cache.default_budget(gpu) == 0
    budget, source = weight_cache.fallback_memory_budget(gpu)
    assert budget == 0 and "in-register kernel runs" in source

    class Properties:
        total_memory = 24 << 30

    monkeypatch.setattr(weight_cache, "_kernel_runs", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    assert weight_cache.fallback_memory_budget(gpu) == (12 << 30, "default: half the GPU's memory (the in-register kernel cannot run here)")
    monkeypatch.setenv(weight_cache.ENV_BUDGET, "2G")
    assert weight_cache.fallback_memory_budget(gpu)[0] == 2 << 30  # the user's budget wins


def test_explain_names_the_kernel_and_its_memory(kernel_runs: None) -> None:
    packed = _packed(4, 200, 96)
    x, offsets = torch.zeros(8, 96, dtype=torch.bfloat16), torch.tensor([0, 2, 2, 5, 8], dtype=torch.int32)
    mxfp4.set_fallback_memory_budget(0)
    text = mxfp4.explain(x, packed, offsets)
    assert "fallback:  in-register kernel (no decoded copy): no decoded copy is kept" in text
    assert "decoded copy held: 0 B" in text and "Triton kernel m16_n64_k256_w4_s3" in text
    assert "offsets read on the device (no host sync" in text
    masked = mxfp4.explain(torch.zeros(4, 300, 96, dtype=torch.bfloat16), packed, masked_m=torch.ones(4, dtype=torch.int32))
    assert "Triton kernel m64_n64_k128_w8_s3" in masked and "masked_m read on the device" in masked
    mxfp4.set_fallback_memory_budget(1 << 30)
    prefill = mxfp4.explain(torch.zeros(4 * 256, 96, dtype=torch.bfloat16), packed, torch.tensor([0, 256, 512, 768, 1024]))
    assert "fallback:  cached decoded weights: 256 rows per expert" in prefill
    assert "decoded copy bf16 [E, N, K] = 150.00 KiB (decoded on the next call)" in prefill


# ------------------------------------------------------------------------------------------------
# The kernel compiles (no GPU needed: Triton + its bundled ptxas) for the GPUs it is meant for.

KERNEL_INTS = ("total_rows", "n", "k", "n_atoms", "k_atoms", "num_experts", "max_m", "n_tiles")
SHARED_LIMIT = {80: 163 << 10, 86: 99 << 10, 89: 99 << 10, 90: 227 << 10, 100: 227 << 10, 120: 99 << 10}


def compile_kernel(capability: int, config: portable_kernel.KernelConfig, masked: bool):
    """The kernel for ``sm_<capability>`` (Triton's offline compile), as a launch on that GPU would build it."""
    import triton
    from triton.backends.compiler import GPUTarget

    from mxfp4.portable.triton_kernel import mxfp4_grouped_kernel

    signature = {"x_ptr": "*bf16", "words_ptr": "*i32", "rows_ptr": "*i32", "out_ptr": "*bf16"}
    signature.update({name: "i32" for name in KERNEL_INTS})
    constants = dict(MASKED=masked, EXPERTS_POW2=32, BLOCK_M=config.block_m, BLOCK_R=config.block_r,
                     BLOCK_C=config.block_c, REGS=portable_kernel.REGS, ATOM_WORDS=portable_kernel.ATOM_WORDS,
                     PAIRS=portable_kernel.PAIRS_PER_ATOM, COLUMNS=portable_kernel.WORD_COLUMNS,
                     SCALE_AT=portable_kernel.SCALE_WORD_AT, PTX_SPLIT=True)
    signature.update({name: "constexpr" for name in constants})
    aligned = {(index,): [["tt.divisibility", 16]] for index in (0, 1, 2, 3, 6)}  # pointers and K, as launched
    source = triton.compiler.ASTSource(fn=mxfp4_grouped_kernel, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def kernels_of(capability: int) -> list[tuple[portable_kernel.KernelConfig, bool]]:
    """(config, masked) of every kernel a GPU of ``sm_<capability>`` may launch."""
    table = portable_kernel.HOPPER_CONFIGS if capability == 90 else portable_kernel.OTHER_CONFIGS
    return [(config, masked) for config in dict.fromkeys(config for _, config in table) for masked in (False, True)]


def compile_every_kernel() -> None:
    """Fill Triton's cache with every kernel the test below compiles (tests/background_builds.py runs it early)."""
    for capability in sorted(SHARED_LIMIT):
        for config, masked in kernels_of(capability):
            compile_kernel(capability, config, masked)


@pytest.mark.parametrize("capability", sorted(SHARED_LIMIT))
def test_kernel_compiles_without_spills(capability: int, tmp_path: Path, portable_kernels_built: None) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed here")
    from codegen.build.sass import find_cuobjdump

    cuobjdump = find_cuobjdump()
    for config, masked in kernels_of(capability):
        kernel = compile_kernel(capability, config, masked)
        assert kernel.metadata.shared <= SHARED_LIMIT[capability], (config.name, kernel.metadata.shared)
        if cuobjdump is None:
            continue
        cubin = tmp_path / f"{config.name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
        assert "STACK:0 " in usage and "LOCAL:0" in usage, f"sm_{capability} {config.name}: spills\n{usage}"
    if cuobjdump is None:
        pytest.skip("compiled; cuobjdump not found for the spill check (pip install nvidia-cuda-cuobjdump)")
