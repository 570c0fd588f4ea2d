"""The torch ops on the portable path against float64, bad inputs, torch.compile, path selection."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

import mxfp4
from mxfp4.format.layout import PackedMXFP4
from mxfp4.format.reference import (
    reference_grouped_mm_float64,
    reference_grouped_mm_masked_float64,
)
from mxfp4.ops import dispatch
from mxfp4.ops import grouped_gemm as ops

TOLERANCE = 1e-2  # ||out - ref|| / ||ref|| against float64 on the dequantized weights


def make_weight(e: int, n: int, k: int) -> tuple[mxfp4.MXFP4Tensor, PackedMXFP4]:
    w = mxfp4.quantize(torch.randn(e, n, k) * 0.05)
    return w, mxfp4.pack(w)


def random_offsets(counts: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    ("n", "k", "counts"),
    [
        (200, 96, [3, 0, 7, 1]),  # tails in N and K, an empty expert
        (64, 64, [0, 0, 5, 0]),  # only one expert has rows
        (1, 32, [2, 3]),  # N = 1
        (130, 160, [1]),  # one row, one expert
        (96, 128, [17, 0, 0, 9, 30, 2]),
    ],
)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_grouped_mm_matches_float64(n: int, k: int, counts: list[int], index_dtype: torch.dtype, seed: int) -> None:
    w, packed = make_weight(len(counts), n, k)
    offsets = random_offsets(counts, index_dtype)
    x = torch.randn(sum(counts), k).bfloat16()
    out = mxfp4.grouped_mm(x, packed, offsets)
    assert out.dtype == torch.bfloat16 and out.shape == (sum(counts), n)
    ref = reference_grouped_mm_float64(x, w, offsets)
    assert relative_error(out, ref) <= TOLERANCE, f"seed {seed}"


def test_grouped_mm_random_routing(seed: int) -> None:
    e, n, k = 8, 72, 224
    counts = torch.randint(0, 6, (e,)).tolist()
    counts[int(torch.randint(0, e, ()))] = 0
    if sum(counts) == 0:
        counts[0] = 1
    w, packed = make_weight(e, n, k)
    offsets = random_offsets(counts)
    x = torch.randn(sum(counts), k).bfloat16()
    ref = reference_grouped_mm_float64(x, w, offsets)
    assert relative_error(mxfp4.grouped_mm(x, packed, offsets), ref) <= TOLERANCE, f"seed {seed}, counts {counts}"


def test_grouped_mm_no_rows() -> None:
    _, packed = make_weight(3, 64, 64)
    out = mxfp4.grouped_mm(torch.empty(0, 64, dtype=torch.bfloat16), packed, torch.zeros(4, dtype=torch.int32))
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16


def test_grouped_mm_masked_matches_float64(seed: int) -> None:
    e, max_m, n, k = 4, 6, 130, 96
    w, packed = make_weight(e, n, k)
    masked_m = torch.tensor([6, 0, 2, 5], dtype=torch.int32)
    x = torch.randn(e, max_m, k).bfloat16()
    out = mxfp4.grouped_mm_masked(x, packed, masked_m)
    assert out.shape == (e, max_m, n) and out.dtype == torch.bfloat16
    ref = reference_grouped_mm_masked_float64(x, w)
    rows = torch.arange(max_m).unsqueeze(0) < masked_m.unsqueeze(1)  # only defined rows count
    assert relative_error(out[rows], ref[rows]) <= TOLERANCE, f"seed {seed}"


def test_grouped_mm_masked_zero_max_m() -> None:
    _, packed = make_weight(2, 64, 32)
    out = mxfp4.grouped_mm_masked(torch.empty(2, 0, 32, dtype=torch.bfloat16), packed, torch.zeros(2, dtype=torch.int64))
    assert out.shape == (2, 0, 64)


def test_forced_config_is_accepted_and_a_bad_one_named(seed: int) -> None:
    from codegen.build.config import DEFAULT_CONFIGS

    w, packed = make_weight(2, 64, 64)
    x, offsets = torch.randn(5, 64).bfloat16(), random_offsets([2, 3])
    plain = mxfp4.grouped_mm(x, packed, offsets)
    assert torch.equal(mxfp4.grouped_mm(x, packed, offsets, config=DEFAULT_CONFIGS[0]), plain)
    assert torch.equal(mxfp4.grouped_mm(x, packed, offsets, config=DEFAULT_CONFIGS[0].name), plain)
    with pytest.raises(ValueError, match="config"):
        mxfp4.grouped_mm(x, packed, offsets, config="n128_fast")
    with pytest.raises(TypeError, match="config"):
        mxfp4.grouped_mm(x, packed, offsets, config=3)


# ------------------------------------------------------------------------------------------------
# Bad input: every check raises before any work, naming the argument.


@pytest.fixture
def problem() -> tuple[torch.Tensor, mxfp4.MXFP4Tensor, PackedMXFP4, torch.Tensor]:
    w, packed = make_weight(3, 64, 96)
    return torch.randn(6, 96).bfloat16(), w, packed, random_offsets([1, 2, 3])


def test_unpacked_weight_says_call_pack(problem) -> None:
    x, w, _, offsets = problem
    with pytest.raises(TypeError, match=r"w is an unpacked MXFP4Tensor; call w = mxfp4\.pack\(w\) once"):
        mxfp4.grouped_mm(x, w, offsets)
    with pytest.raises(TypeError, match=r"mxfp4\.pack"):
        mxfp4.grouped_mm_masked(x.view(3, 2, 96), w, torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="w must be a PackedMXFP4"):
        mxfp4.grouped_mm(x, torch.zeros(3, 64, 96), offsets)


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda x, o: (x.float(), o), TypeError, "x must be bfloat16"),
        (lambda x, o: (x.view(2, 3, 96), o), ValueError, r"x must be \[T, K\]"),
        (lambda x, o: (x.t().contiguous().t(), o), ValueError, "x must be contiguous"),
        (lambda x, o: (x[:, :64].contiguous(), o), ValueError, r"x.shape\[-1\] = 64 but w.k = 96"),
        (lambda x, o: (x.tolist(), o), TypeError, "x must be a torch.Tensor"),
        (lambda x, o: (x, o.float()), TypeError, "offsets must be int32 or int64"),
        (lambda x, o: (x, o[:-1]), ValueError, r"offsets must have shape \[E \+ 1\] = \[4\]"),
        (lambda x, o: (x, o + 1), ValueError, "offsets must start at 0"),
        (lambda x, o: (x, torch.tensor([0, 3, 2, 6], dtype=torch.int32)), ValueError, r"offsets must not decrease.*offsets\[1\] = 3 > offsets\[2\] = 2"),
        (lambda x, o: (x, torch.tensor([0, 1, 2, 5], dtype=torch.int32)), ValueError, r"offsets must end at T = x.shape\[0\] = 6"),
        (lambda x, o: (x, o.tolist()), TypeError, "offsets must be a torch.Tensor"),
        (lambda x, o: (x, torch.stack((o, o), 1)[:, 0]), ValueError, "offsets must be contiguous"),
        (lambda x, o: (x.to("meta"), o), ValueError, "w is on cpu but x is on meta"),
    ],
)
def test_grouped_mm_bad_input(problem, mutate, error, message) -> None:
    x, _, packed, offsets = problem
    bad_x, bad_offsets = mutate(x, offsets)
    with pytest.raises(error, match=message):
        mxfp4.grouped_mm(bad_x, packed, bad_offsets)


def test_offsets_on_another_device(problem) -> None:
    x, _, packed, offsets = problem
    meta = packed.to("meta")
    with pytest.raises(ValueError, match="offsets is on cpu but x is on meta"):
        mxfp4.grouped_mm(x.to("meta"), meta, offsets)


def test_weight_checks(problem) -> None:
    x, _, _, offsets = problem
    too_many = PackedMXFP4(torch.zeros(1025, 1, 2, 2176, dtype=torch.uint8), 64, 96)
    with pytest.raises(ValueError, match="w has 1025 experts; 1 to 1024 are supported"):
        mxfp4.grouped_mm(x, too_many, torch.zeros(1026, dtype=torch.int32))
    odd_k = PackedMXFP4(torch.zeros(3, 1, 1, 2176, dtype=torch.uint8), 64, 48)
    with pytest.raises(ValueError, match="w.k = 48: K must be a positive multiple of 32"):
        mxfp4.grouped_mm(x[:, :48].contiguous(), odd_k, offsets)


def test_direct_op_call_is_validated_too(problem) -> None:
    x, _, packed, offsets = problem
    with pytest.raises(ValueError, match=r"w.data has shape \(3, 1, 2, 2176\), expected \[E, 2, 2, 2176\]"):
        torch.ops.mxfp4.grouped_mm(x, packed.data, offsets, 100, 96, "")


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda x, m: (x, m + 10), ValueError, r"masked_m\[0\] = 11 is outside \[0, max_m = x.shape\[1\] = 2\]"),
        (lambda x, m: (x, m - 2), ValueError, r"masked_m\[0\] = -1 is outside"),
        (lambda x, m: (x, m[:2]), ValueError, r"masked_m must have shape \[E\] = \[3\]"),
        (lambda x, m: (x, m.bool()), TypeError, "masked_m must be int32 or int64"),
        (lambda x, m: (x, m.tolist()), TypeError, "masked_m must be a torch.Tensor"),
        (lambda x, m: (x.view(6, 96), m), ValueError, r"x must be \[E, max_m, K\]"),
        (lambda x, m: (x.view(1, 6, 96), m), ValueError, r"x.shape\[0\] = 1 but w has 3 experts"),
        (lambda x, m: (x.half(), m), TypeError, "x must be bfloat16"),
    ],
)
def test_grouped_mm_masked_bad_input(problem, mutate, error, message) -> None:
    x, _, packed, _ = problem
    bad_x, bad_m = mutate(x.view(3, 2, 96), torch.ones(3, dtype=torch.int32))
    with pytest.raises(error, match=message):
        mxfp4.grouped_mm_masked(bad_x, packed, bad_m)


def test_debug_checks_switch() -> None:
    meta = torch.zeros(4, dtype=torch.int32, device="meta")
    assert not ops.debug_checks_enabled() and not ops._values_checkable(meta)
    mxfp4.set_debug_checks(True)
    try:
        assert ops._values_checkable(meta)  # device-resident offsets are now read back and checked
    finally:
        mxfp4.set_debug_checks(False)
    assert ops._values_checkable(torch.zeros(4, dtype=torch.int32))  # CPU values: always


@pytest.mark.parametrize("value", ["false", "False", 0, 1, None, "yes"])
def test_debug_checks_switch_takes_a_bool_only(value: object) -> None:
    with pytest.raises(TypeError, match=r"set_debug_checks: enabled must be a bool"):
        mxfp4.set_debug_checks(value)
    assert not ops.debug_checks_enabled()  # left off


# ------------------------------------------------------------------------------------------------
# torch.compile: the fake kernels let fullgraph tracing through the op.


def test_torch_compile_fullgraph(seed: int) -> None:
    torch._dynamo.reset()
    w, packed = make_weight(3, 80, 64)
    offsets = random_offsets([2, 0, 4])
    x = torch.randn(6, 64).bfloat16()
    masked_m = torch.tensor([2, 0, 1], dtype=torch.int32)

    def layer(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(mxfp4.grouped_mm(x, packed, offsets)).sum(-1)

    def masked(x: torch.Tensor, masked_m: torch.Tensor) -> torch.Tensor:
        return mxfp4.grouped_mm_masked(x, packed, masked_m) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, offsets), layer(x, offsets))
    compiled_masked = torch.compile(masked, fullgraph=True, backend="aot_eager")
    xm = x.view(3, 2, 64)
    got, expected = compiled_masked(xm, masked_m), masked(xm, masked_m)
    assert torch.equal(got[0, :2], expected[0, :2]) and torch.equal(got[2, :1], expected[2, :1])


def test_fake_kernel_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, packed = make_weight(2, 100, 64)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(5, 64).bfloat16())
        data = mode.from_tensor(packed.data)
        offsets = mode.from_tensor(random_offsets([2, 3]))
        out = torch.ops.mxfp4.grouped_mm(x, data, offsets, 100, 64, "")
        assert out.shape == (5, 100) and out.dtype == torch.bfloat16
        xm = mode.from_tensor(torch.randn(2, 4, 64).bfloat16())
        m = mode.from_tensor(torch.ones(2, dtype=torch.int32))
        assert torch.ops.mxfp4.grouped_mm_masked(xm, data, m, 100, 64, "").shape == (2, 4, 100)


# ------------------------------------------------------------------------------------------------
# Path selection and explain.


def fake_cuda(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)


def test_cpu_is_portable() -> None:
    choice = dispatch.select_path("cpu")
    assert (choice.path, choice.reason) == ("portable", "device is cpu")


def test_non_hopper_gpu_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, (8, 9), "NVIDIA L4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = dispatch.select_path("cuda:0")
        dispatch.select_path("cuda:0")
        dispatch.select_path("cuda:1")
    assert first.path == "portable"
    assert "sm_89 (NVIDIA L4) is not SM90 (Hopper); using the portable path" in first.reason
    assert len(caught) == 1 and str(caught[0].message).startswith("mxfp4: GPU sm_89 (NVIDIA L4) is not SM90")


def test_hopper_without_toolchain_is_portable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dispatch, "check_toolchain", lambda: (False, "NVRTC not found"))
    with pytest.warns(RuntimeWarning, match="NVRTC not found"):
        choice = dispatch.select_path("cuda:0")
    assert choice.path == "portable" and choice.toolchain == "NVRTC not found"


def test_hopper_with_toolchain_is_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dispatch, "check_toolchain", lambda: (True, "NVRTC 13.0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the good path
        choice = dispatch.select_path("cuda:0")
    assert choice.path == "sm90" and choice.capability == (9, 0)


def test_explain_on_cpu(problem) -> None:
    x, w, packed, offsets = problem
    text = mxfp4.explain(x, packed, offsets)
    assert "E = 3 experts, N = 64, K = 96" in text and "T = 6 rows" in text
    assert "path:      portable: device is cpu" in text
    masked_text = mxfp4.explain(x.view(3, 2, 96), packed, masked_m=torch.ones(3, dtype=torch.int32))
    assert "grouped_mm_masked" in masked_text and "max_m = 2" in masked_text
    with pytest.raises(TypeError, match=r"mxfp4\.pack"):
        mxfp4.explain(x, w, offsets)


def test_explain_checks_what_the_op_checks(problem) -> None:
    """Inputs the op rejects get the op's own error from explain, not a report of a call that cannot run."""
    x, _, packed, offsets = problem
    cases = [
        (TypeError, r"grouped_mm: x must be bfloat16 \(or float8_e4m3fn with x_scale\), got torch.float32", (x.float(), packed, offsets), {}),
        (ValueError, r"grouped_mm: offsets must have shape \[E \+ 1\] = \[4\], got \(3,\)", (x, packed, offsets[:-1]), {}),
        (ValueError, "grouped_mm: offsets must end at T", (x, packed, offsets.clone().fill_(0)), {}),
        (TypeError, "grouped_mm: offsets must be int32 or int64", (x, packed, offsets.float()), {}),
        (ValueError, r"grouped_mm: x.shape\[-1\] = 64 but w.k = 96", (x[:, :64].contiguous(), packed, offsets), {}),
        (ValueError, "grouped_mm_masked: masked_m must have shape", (x.view(3, 2, 96), packed, None),
         dict(masked_m=torch.ones(2, dtype=torch.int32))),
        (ValueError, "grouped_mm_masked: x must be contiguous", (x.view(3, 2, 96).transpose(0, 1), packed, None), {}),
        (ValueError, "grouped_mm: config: ", (x, packed, offsets), dict(config="not_a_config")),
        (ValueError, "not both", (x, packed, offsets), dict(masked_m=torch.ones(3, dtype=torch.int32))),
    ]
    for error, message, args, kwargs in cases:
        with pytest.raises(error, match=message):
            mxfp4.explain(*args, **kwargs)
        if "not both" not in message:  # and the op says the same
            call = mxfp4.grouped_mm_masked if "masked" in message else mxfp4.grouped_mm
            rows = kwargs.pop("masked_m", None) if "masked" in message else args[2]
            with pytest.raises(error, match=message):
                call(args[0], args[1], rows if rows is not None else torch.ones(3, dtype=torch.int32), **kwargs)


def fake_sm90(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Route the ops to the SM90 branch with a recording stand-in for codegen.runtime.launch."""
    sm90 = dispatch.PathChoice("sm90", "test", "cuda:0", (9, 0), "NVIDIA H100", "ok")
    monkeypatch.setattr(ops, "select_path", lambda device: sm90)
    monkeypatch.setattr(dispatch, "select_path", lambda device: sm90)
    calls: list[tuple] = []

    def grouped_mm_sm90(x, w_data, n, k, rows, masked, config, out):
        calls.append((x, w_data, n, k, rows, masked, config, out))
        out.fill_(1)

    monkeypatch.setitem(sys.modules, "codegen.runtime.launch", types.SimpleNamespace(grouped_mm_sm90=grouped_mm_sm90))
    return calls


def test_sm90_launch_contract(monkeypatch: pytest.MonkeyPatch, problem) -> None:
    from codegen.build.config import TileConfig

    x, _, packed, offsets = problem
    calls = fake_sm90(monkeypatch)
    chosen = TileConfig.from_name("n128_m8_k256_s8_wg1")
    selection = types.SimpleNamespace(config=chosen, reason="tuned")
    import codegen.tune.selection

    monkeypatch.setattr(codegen.tune.selection, "select_config", lambda e, n, k, hint, device_name=None, activations="bf16", rows=None: selection)
    out = mxfp4.grouped_mm(x, packed, offsets.long())
    assert bool((out == 1).all())
    (cx, w_data, n, k, rows, masked, config, cout), = calls
    assert cx is x and w_data is packed.data and (n, k, masked) == (64, 96, False)
    assert rows.dtype == torch.int64 and torch.equal(rows, offsets.long())  # passed through uncast
    assert config == chosen and cout.shape == (6, 64) and cout.dtype == torch.bfloat16
    mxfp4.grouped_mm_masked(x.view(3, 2, 96), packed, torch.ones(3, dtype=torch.int32), config="n128_m64_k128_s7_wg2")
    assert calls[-1][5] is True and calls[-1][6] == TileConfig.from_name("n128_m64_k128_s7_wg2")
    assert calls[-1][7].shape == (3, 2, 64)
    text = mxfp4.explain(x, packed, offsets)
    assert "path:      sm90" in text and "config:    n128_m8_k256_s8_wg1: tuned" in text


def test_explain_with_real_config_selection(monkeypatch: pytest.MonkeyPatch, problem) -> None:
    x, _, packed, offsets = problem
    fake_sm90(monkeypatch)
    text = mxfp4.explain(x, packed, offsets)
    line = next(line for line in text.splitlines() if line.lstrip().startswith("config:"))
    assert "_wg" in line, text  # a real config name and its reason



def test_the_op_tells_the_selection_its_rows_in_offsets_mode_only(monkeypatch: pytest.MonkeyPatch, problem) -> None:
    """grouped_mm's x holds all the rows, so few rows reach few experts (the few-experts table entries);
    grouped_mm_masked's experts may each have rows. The launch and mxfp4.explain ask the same."""
    from codegen.build.config import TileConfig

    x, _, packed, offsets = problem
    fake_sm90(monkeypatch)
    asked = []
    selection = types.SimpleNamespace(config=TileConfig.from_name("n128_m8_k256_s8_wg1"), reason="tuned")

    def select(e, n, k, hint, device_name=None, activations="bf16", rows=None):
        asked.append((e, hint, rows))
        return selection

    import codegen.tune.selection

    monkeypatch.setattr(codegen.tune.selection, "select_config", select)
    from mxfp4.ops import dispatch

    mxfp4.grouped_mm(x, packed, offsets)
    dispatch.choose_config.cache_clear()  # else explain is served the launch's choice: ask again
    mxfp4.explain(x, packed, offsets)
    mxfp4.grouped_mm_masked(x.view(3, 2, 96), packed, torch.ones(3, dtype=torch.int32))
    experts = packed.num_experts
    assert asked == [(experts, -(-6 // experts), 6)] * 2 + [(experts, 2, None)]
