"""FP8 activations on the CPU: ``mxfp4.quantize_activations``, the ops with ``x_scale`` on the portable path
(both weight layouts) against float64, the MoE layer with ``activations="fp8"``, bad inputs, fake kernels,
torch.compile, explain and the SM90 launch contract (recorded, no GPU)."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from test_moe import make_routing

import mxfp4
from mxfp4.experts.layer import reference_moe_float64
from mxfp4.ops import dispatch
from mxfp4.ops import grouped_gemm as ops

TOLERANCE = 1e-2  # against float64 on the same fp8-rounded x (bf16 rounding of the output dominates)
MOE_TOLERANCE = 5e-2  # the layer with activations="fp8" against float64 with bf16 activations
E4M3 = torch.float8_e4m3fn


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def offsets_of(counts: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(dtype)


def weights(e: int, n: int, k: int, fp8_layout: bool) -> tuple[mxfp4.MXFP4Tensor, object]:
    w = mxfp4.quantize(torch.randn(e, n, k) * 0.05)
    return w, mxfp4.pack(w, activations="fp8" if fp8_layout else "bf16")


def kernel_weights(packed: object) -> torch.Tensor:
    """float64 [E, N, K]: the weight the kernel multiplies (the FP8-ready layout's after any re-rounding)."""
    return mxfp4.dequantize(mxfp4.unpack(packed), torch.float64)


def reference(x_fp8: torch.Tensor, x_scale: torch.Tensor, packed: object, counts: list[int]) -> torch.Tensor:
    """float64 per expert on the same fp8-rounded x: (x_fp8 * x_scale) @ W_e^T."""
    x = x_fp8.double() * x_scale.double().unsqueeze(-1)
    w = kernel_weights(packed)
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    bounds = offsets_of(counts).tolist()
    for e in range(w.shape[0]):
        out[bounds[e]:bounds[e + 1]] = x[bounds[e]:bounds[e + 1]] @ w[e].T
    return out


def _absolute(packed: object) -> object:
    """The same packed weight with every code's sign cleared (|W|, in the same layout), for error bounds."""
    weight = mxfp4.unpack(packed)
    absolute = mxfp4.MXFP4Tensor(weight.blocks & 0x77, weight.scales)  # bit 3 of both nibbles: the signs
    return mxfp4.pack(absolute, activations="fp8" if isinstance(packed, mxfp4.PackedMXFP4FP8) else "bf16")


def describe_mismatch(out: torch.Tensor, ref: torch.Tensor) -> str:
    worst = (out.double() - ref).abs().flatten().argmax()
    row, col = divmod(int(worst), ref.shape[-1])
    return f"worst at (row {row}, col {col}): got {float(out.flatten()[worst]):.6g}, float64 {float(ref.flatten()[worst]):.6g}"


# ---------------------------------------------------------------------------------------------
# quantize_activations


def test_quantize_rows_scale_to_448_and_round_trip(seed: int) -> None:
    x = (torch.randn(9, 200) * torch.logspace(-3, 3, 9).unsqueeze(1)).bfloat16()
    x[4] = 0  # an all-zero row: scale 1, zeros
    x[5, 7] = -1e4  # one large channel
    x_fp8, x_scale = mxfp4.quantize_activations(x)
    assert x_fp8.dtype == E4M3 and x_fp8.shape == x.shape and x_scale.dtype == torch.float32 and x_scale.shape == (9,)
    amax = x.float().abs().amax(dim=1)
    assert torch.equal(x_scale, torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)))
    assert torch.equal(x_fp8[4].float(), torch.zeros(200)) and float(x_scale[4]) == 1.0
    live = [r for r in range(9) if r != 4]
    assert torch.equal(x_fp8.float().abs().amax(dim=1)[live], torch.full((8,), 448.0)), "each row's amax lands on 448"
    back = x_fp8.float() * x_scale.unsqueeze(1)
    normal = x.float().abs() >= 2.0**-6 * x_scale.unsqueeze(1)  # e4m3 normals: 3 mantissa bits, error <= 2^-4
    assert bool(((back - x.float()).abs() <= 2.0**-4 * x.float().abs() + 1e-30)[normal].all()), f"seed {seed}"


def test_quantize_is_the_documented_rounding(seed: int) -> None:
    """e4m3(fp32(x / scale)): against a float64 search of the e4m3 grid (nearest, ties to the even code)."""
    x = torch.randn(4, 96).bfloat16()
    x_fp8, x_scale = mxfp4.quantize_activations(x)
    quotient = (x.float() / x_scale.unsqueeze(1)).double()  # one fp32 rounding, as documented
    grid = torch.arange(0x7F, dtype=torch.uint8).view(E4M3).double()  # codes 0x00 .. 0x7E: every finite magnitude
    distance = (quotient.abs().unsqueeze(-1) - grid).abs()
    tied = distance == distance.min(dim=-1, keepdim=True).values
    even_first = tied * (1 + (torch.arange(0x7F) % 2 == 0))  # on a tie, the even code
    nearest = grid[even_first.argmax(dim=-1)] * quotient.sign()
    assert torch.equal(x_fp8.double(), nearest), f"seed {seed}"


def test_gathered_rows_are_the_quantized_rows_gathered() -> None:
    """quantize_gathered_rows (the MoE layer's routed rows; off SM90 the composition): repeated and unordered
    tokens, one row, none."""
    from mxfp4.ops.activations import quantize_gathered_rows

    x = (torch.randn(6, 64, generator=torch.Generator().manual_seed(5)) * 3).bfloat16()
    x_fp8, x_scale = mxfp4.quantize_activations(x)
    for token in ([5, 0, 5, 2, 2, 2, 1], [3], []):
        index = torch.tensor(token, dtype=torch.long)
        rows, scale = quantize_gathered_rows(x, index)
        assert rows.shape == (len(token), 64) and rows.dtype == torch.float8_e4m3fn and scale.shape == (len(token),)
        assert torch.equal(rows.view(torch.uint8), x_fp8.view(torch.uint8)[index]) and torch.equal(scale, x_scale[index])


def test_quantize_three_dims_and_empty() -> None:
    x = torch.randn(3, 5, 64).bfloat16()
    x_fp8, x_scale = mxfp4.quantize_activations(x)
    assert x_fp8.shape == (3, 5, 64) and x_scale.shape == (3, 5)
    flat_fp8, flat_scale = mxfp4.quantize_activations(x.view(15, 64))
    assert torch.equal(x_fp8.view(15, 64).view(torch.uint8), flat_fp8.view(torch.uint8))
    assert torch.equal(x_scale.view(15), flat_scale)
    empty_fp8, empty_scale = mxfp4.quantize_activations(torch.empty(0, 64, dtype=torch.bfloat16))
    assert empty_fp8.shape == (0, 64) and empty_scale.shape == (0,)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (torch.randn(4, 32), TypeError, "x must be bfloat16, got torch.float32"),
        (torch.randn(32).bfloat16(), ValueError, r"x must be \[T, K\] or \[E, max_m, K\]"),
        (torch.randn(32, 4).bfloat16().t(), ValueError, "x must be contiguous"),
        ([1.0, 2.0], TypeError, "x must be a torch.Tensor"),
    ],
)
def test_quantize_bad_input(bad: object, error: type, message: str) -> None:
    with pytest.raises(error, match=f"quantize_activations: {message}"):
        mxfp4.quantize_activations(bad)


def test_quantize_compiles_fullgraph_and_fakes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch._dynamo.reset()
    x = torch.randn(6, 64).bfloat16()

    def step(x: torch.Tensor) -> torch.Tensor:
        x_fp8, x_scale = mxfp4.quantize_activations(x * 2)
        return x_fp8.float() * x_scale.unsqueeze(1)

    assert torch.equal(torch.compile(step, fullgraph=True, backend="aot_eager")(x), step(x))
    with FakeTensorMode() as mode:
        fake_fp8, fake_scale = torch.ops.mxfp4.quantize_activations(mode.from_tensor(x))
        assert fake_fp8.dtype == E4M3 and fake_fp8.shape == (6, 64) and fake_scale.shape == (6,)


# ---------------------------------------------------------------------------------------------
# grouped_mm with e4m3 x: the portable path (the W4A8 kernel's math) against float64


@pytest.mark.parametrize("fp8_layout", [True, False], ids=["fp8-layout", "plain-layout"])
@pytest.mark.parametrize(
    ("n", "k", "counts"),
    [((200, 96, [3, 0, 7, 1])), (64, 64, [0, 0, 5, 0]), (1, 32, [2, 3]), (130, 160, [1]), (96, 128, [17, 0, 0, 9, 30, 2])],
)
def test_grouped_mm_fp8_matches_float64(fp8_layout: bool, n: int, k: int, counts: list[int], seed: int) -> None:
    _, packed = weights(len(counts), n, k, fp8_layout)
    x_fp8, x_scale = mxfp4.quantize_activations(torch.randn(sum(counts), k).bfloat16())
    out = mxfp4.grouped_mm(x_fp8, packed, offsets_of(counts, torch.int64), x_scale=x_scale)
    assert out.dtype == torch.bfloat16 and out.shape == (sum(counts), n)
    ref = reference(x_fp8, x_scale, packed, counts)
    assert relative_error(out, ref) <= TOLERANCE, f"seed {seed}: {describe_mismatch(out, ref)}"
    # The same rounding points as the kernel: one bf16 rounding (at most half a bf16 ulp, 2^-8 relative) of a
    # float32 sum (whose error is bounded by the sum of the magnitudes it adds); a second rounding would not fit.
    magnitudes = reference(x_fp8.float().abs().to(E4M3), x_scale, _absolute(packed), counts)
    bound = 2.0**-8 * (1 + 2.0**-8) * ref.abs() + 2.0**-18 * magnitudes
    assert bool(((out.double() - ref).abs() <= bound).all()), describe_mismatch(out, ref)


@pytest.mark.parametrize("fp8_layout", [True, False], ids=["fp8-layout", "plain-layout"])
def test_grouped_mm_masked_fp8_matches_float64(fp8_layout: bool, seed: int) -> None:
    e, max_m, n, k = 4, 6, 130, 96
    _, packed = weights(e, n, k, fp8_layout)
    masked_m = torch.tensor([6, 0, 2, 5], dtype=torch.int32)
    x_fp8, x_scale = mxfp4.quantize_activations(torch.randn(e, max_m, k).bfloat16())
    out = mxfp4.grouped_mm_masked(x_fp8, packed, masked_m, x_scale=x_scale)
    assert out.shape == (e, max_m, n) and out.dtype == torch.bfloat16
    ref = torch.einsum("emk,enk->emn", x_fp8.double() * x_scale.double().unsqueeze(-1), kernel_weights(packed))
    rows = torch.arange(max_m).unsqueeze(0) < masked_m.unsqueeze(1)
    assert relative_error(out[rows], ref[rows]) <= TOLERANCE, f"seed {seed}"


def test_fp8_against_bf16_activations_is_within_the_quantization_budget(seed: int) -> None:
    """What the user trades, on the CPU: e4m3 x against bf16 x on the same weights (Gaussian x)."""
    w, packed = weights(4, 256, 512, fp8_layout=True)
    counts = [40, 10, 0, 30]
    x = torch.randn(sum(counts), 512).bfloat16()
    offsets = offsets_of(counts)
    x_fp8, x_scale = mxfp4.quantize_activations(x)
    fp8 = mxfp4.grouped_mm(x_fp8, packed, offsets, x_scale=x_scale)
    bf16 = mxfp4.grouped_mm(x, mxfp4.pack(w), offsets)
    assert relative_error(fp8, bf16.double()) <= 4e-2, f"seed {seed}"


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def fp8_problem() -> tuple[torch.Tensor, torch.Tensor, object, object, torch.Tensor]:
    _, plain = weights(3, 64, 96, fp8_layout=False)
    _, ready = weights(3, 64, 96, fp8_layout=True)
    x_fp8, x_scale = mxfp4.quantize_activations(torch.randn(6, 96).bfloat16())
    return x_fp8, x_scale, plain, ready, offsets_of([1, 2, 3])


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("no x_scale", ValueError, "x is float8_e4m3fn but x_scale is missing"),
        ("x_scale with bf16 x", ValueError, "x_scale is given but x is torch.bfloat16"),
        ("x_scale float64", TypeError, "x_scale must be float32, got torch.float64"),
        ("x_scale shape", ValueError, r"x_scale must have shape x.shape\[:-1\] = \[6\], got \(5,\)"),
        ("x_scale not a tensor", TypeError, "x_scale must be a torch.Tensor, got list"),
        ("x_scale strided", ValueError, "x_scale must be contiguous"),
        ("fp8 weights with bf16 x", TypeError, "w was packed for FP8 activations"),
        ("x float16", TypeError, r"x must be bfloat16 \(or float8_e4m3fn with x_scale\), got torch.float16"),
        ("e5m2 x", TypeError, r"x must be bfloat16 \(or float8_e4m3fn with x_scale\), got torch.float8_e5m2"),
        ("bf16 config on fp8 weights", ValueError, "config n128_m64_k128_s7_wg2 is a bf16-activation kernel"),
        ("fp8 config on plain weights", ValueError, "config n128_m64_k128_s8_wg2_fp8 is a fp8-activation kernel"),
    ],
)
def test_grouped_mm_fp8_bad_input(fp8_problem, case: str, error: type, message: str) -> None:
    x_fp8, x_scale, plain, ready, offsets = fp8_problem
    x, w, scale, config = x_fp8, ready, x_scale, None
    if case == "no x_scale":
        scale = None
    elif case == "x_scale with bf16 x":
        x = x_fp8.bfloat16()
    elif case == "x_scale float64":
        scale = x_scale.double()
    elif case == "x_scale shape":
        scale = x_scale[:5]
    elif case == "x_scale not a tensor":
        scale = x_scale.tolist()
    elif case == "x_scale strided":
        scale = torch.stack((x_scale, x_scale), 1)[:, 0]
    elif case == "fp8 weights with bf16 x":
        x, scale = x_fp8.bfloat16(), None
    elif case == "x float16":
        x, scale = x_fp8.half(), None
    elif case == "e5m2 x":
        x = x_fp8.float().to(torch.float8_e5m2)
    elif case == "bf16 config on fp8 weights":
        config = "n128_m64_k128_s7_wg2"
    elif case == "fp8 config on plain weights":
        w, config = plain, "n128_m64_k128_s8_wg2_fp8"
    with pytest.raises(error, match=f"grouped_mm: {message}"):
        mxfp4.grouped_mm(x, w, offsets, x_scale=scale, config=config)


def test_masked_fp8_bad_input(fp8_problem) -> None:
    x_fp8, x_scale, _, ready, _ = fp8_problem
    masked_m = torch.ones(3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"grouped_mm_masked: x_scale must have shape x.shape\[:-1\] = \[3, 2\]"):
        mxfp4.grouped_mm_masked(x_fp8.view(3, 2, 96), ready, masked_m, x_scale=x_scale)
    with pytest.raises(ValueError, match="grouped_mm_masked: x is float8_e4m3fn but x_scale is missing"):
        mxfp4.grouped_mm_masked(x_fp8.view(3, 2, 96), ready, masked_m)


def test_direct_op_call_checks_the_weight_scales(fp8_problem) -> None:
    x_fp8, x_scale, _, ready, offsets = fp8_problem
    with pytest.raises(ValueError, match=r"w.row_scale must have shape \[E, N padded to 64\] = \[3, 64\]"):
        torch.ops.mxfp4.grouped_mm(x_fp8, ready.data, offsets, 64, 96, "", x_scale, ready.row_scale[:, :32].contiguous())


# ---------------------------------------------------------------------------------------------
# fake kernels, torch.compile, explain


def test_fp8_fake_kernels_and_compile(fp8_problem) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch._dynamo.reset()
    x_fp8, x_scale, plain, ready, offsets = fp8_problem
    with FakeTensorMode() as mode:
        fx, fs, fo = mode.from_tensor(x_fp8), mode.from_tensor(x_scale), mode.from_tensor(offsets)
        out = torch.ops.mxfp4.grouped_mm(fx, mode.from_tensor(ready.data), fo, 64, 96, "", fs,
                                         mode.from_tensor(ready.row_scale))
        assert out.shape == (6, 64) and out.dtype == torch.bfloat16
        masked = torch.ops.mxfp4.grouped_mm_masked(fx.view(3, 2, 96), mode.from_tensor(plain.data),
                                                   mode.from_tensor(torch.ones(3, dtype=torch.int32)), 64, 96, "",
                                                   fs.view(3, 2))
        assert masked.shape == (3, 2, 64) and masked.dtype == torch.bfloat16

    def layer(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        x_fp8, x_scale = mxfp4.quantize_activations(x)
        return torch.nn.functional.silu(mxfp4.grouped_mm(x_fp8, ready, offsets, x_scale=x_scale)).sum(-1)

    x = torch.randn(6, 96).bfloat16()
    assert torch.equal(torch.compile(layer, fullgraph=True, backend="aot_eager")(x, offsets), layer(x, offsets))


def test_explain_names_how_fp8_x_meets_the_weights(fp8_problem) -> None:
    x_fp8, x_scale, plain, ready, offsets = fp8_problem
    text = mxfp4.explain(x_fp8, ready, offsets, x_scale=x_scale)
    assert "(FP8-ready layout)" in text and "W4A8: e4m3 x" in text and "torch.float8_e4m3fn" in text
    assert "row scales applied and rounded once" in text
    assert "W4A16 on x widened to bf16" in mxfp4.explain(x_fp8, plain, offsets, x_scale=x_scale)
    # explain checks what the call checks: FP8-ready weights with bf16 x, or float8 x without its scale
    with pytest.raises(TypeError, match="quantize_activations"):
        mxfp4.explain(x_fp8.bfloat16(), ready, offsets)
    with pytest.raises(ValueError, match="x_scale is missing"):
        mxfp4.explain(x_fp8, ready, offsets)


# (x, x_scale) of a call, from the problem's e4m3 x [T, K] and its row scales [T] (or their [E, max_m] views)
EXPLAIN_CALLS = {
    "e4m3 x with x_scale": lambda x, s: (x, s),
    "e4m3 x without x_scale": lambda x, s: (x, None),
    "bf16 x": lambda x, s: (x.bfloat16(), None),
    "bf16 x with x_scale": lambda x, s: (x.bfloat16(), s),
    "x_scale float64": lambda x, s: (x, s.double()),
    "x_scale of one row less": lambda x, s: (x, s.flatten()[:-1]),
    "x_scale not a tensor": lambda x, s: (x, 1.0),
}


def _outcome(call) -> tuple:
    """("ok", result) or the (type, message) of the TypeError / ValueError ``call`` raises."""
    try:
        return "ok", call()
    except (TypeError, ValueError) as error:
        return type(error), str(error)


@pytest.mark.parametrize("call", list(EXPLAIN_CALLS))
@pytest.mark.parametrize("layout", ["plain", "fp8-ready"])
@pytest.mark.parametrize("masked", [False, True], ids=["grouped_mm", "grouped_mm_masked"])
def test_explain_accepts_exactly_what_the_op_accepts(fp8_problem, call: str, layout: str, masked: bool) -> None:
    """explain runs where the op runs (e4m3 x goes through the portable composition on the CPU) and raises the
    op's own error where the op refuses (e4m3 x without x_scale among them): it never explains a call that
    cannot run, nor refuses one that can."""
    x_fp8, x_scale, plain, ready, offsets = fp8_problem
    w = ready if layout == "fp8-ready" else plain
    if masked:
        x_fp8, x_scale, rows = x_fp8.view(3, 2, 96), x_scale.view(3, 2), torch.tensor([2, 0, 1], dtype=torch.int32)
    x, scale = EXPLAIN_CALLS[call](x_fp8, x_scale)
    op = mxfp4.grouped_mm_masked if masked else mxfp4.grouped_mm
    op_kind, op_result = _outcome(lambda: op(x, w, rows if masked else offsets, x_scale=scale))
    rows_argument = {"masked_m": rows} if masked else {"offsets": offsets}
    explain_kind, text = _outcome(lambda: mxfp4.explain(x, w, x_scale=scale, **rows_argument))
    assert (explain_kind, text if explain_kind != "ok" else None) == (op_kind, op_result if op_kind != "ok" else None)
    runs = call in ("e4m3 x with x_scale", "bf16 x") and not (call == "bf16 x" and layout == "fp8-ready")
    assert (op_kind == "ok") == runs, (call, layout, op_kind, op_result)
    if not runs:
        return
    assert "path:      portable: device is cpu" in text and f"({x.dtype})" in text
    if x.dtype == E4M3:
        assert ("W4A8: e4m3 x" if layout == "fp8-ready" else "W4A16 on x widened to bf16") in text, text
        assert "FP8 activations: decoded weights" in text
    assert op_result.shape == (*x.shape[:-1], 64) and op_result.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# the SM90 branch, recorded (no GPU)


def fake_sm90(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    from codegen.runtime.launch import EpilogueArgs

    sm90 = dispatch.PathChoice("sm90", "test", "cuda:0", (9, 0), "NVIDIA H200", "ok")
    monkeypatch.setattr(ops, "select_path", lambda device: sm90)
    monkeypatch.setattr(dispatch, "select_path", lambda device: sm90)
    calls: list[tuple] = []

    def grouped_mm_sm90(x, w_data, n, k, rows, masked, config, out, epilogue=None):
        calls.append((x, w_data, config, out, epilogue))
        out.fill_(1)

    namespace = types.SimpleNamespace(grouped_mm_sm90=grouped_mm_sm90, EpilogueArgs=EpilogueArgs)
    monkeypatch.setitem(sys.modules, "codegen.runtime.launch", namespace)
    return calls


def test_sm90_launch_contract_fp8(monkeypatch: pytest.MonkeyPatch, fp8_problem) -> None:
    x_fp8, x_scale, plain, ready, offsets = fp8_problem
    calls = fake_sm90(monkeypatch)
    mxfp4.grouped_mm(x_fp8, ready, offsets, x_scale=x_scale)
    x, w_data, config, out, epilogue = calls[-1]
    assert x is x_fp8 and w_data is ready.data and config.activations == "fp8" and out.dtype == torch.bfloat16
    assert epilogue.x_scale is x_scale and epilogue.w_scale is ready.row_scale
    mxfp4.grouped_mm(x_fp8, plain, offsets, x_scale=x_scale)  # plain weights: W4A16 on x widened, x_scale kept
    x, w_data, config, _, epilogue = calls[-1]
    assert x.dtype == torch.bfloat16 and torch.equal(x.float(), x_fp8.float()) and config.activations == "bf16"
    assert epilogue.x_scale is x_scale and epilogue.w_scale is None
    text = mxfp4.explain(x_fp8, ready, offsets, x_scale=x_scale)
    assert "family:    W4A8" in text and "_fp8" in text


# ---------------------------------------------------------------------------------------------
# the MoE layer


@pytest.mark.parametrize("paired", [False, True], ids=["mxfp4.pack", "pack_gate_up"])
@pytest.mark.parametrize("fp8_layout", [True, False], ids=["fp8-layout", "plain-layout"])
def test_moe_fp8_matches_float64_with_bf16_activations(paired: bool, fp8_layout: bool, seed: int) -> None:
    experts, hidden, inter, tokens, top_k = 8, 96, 64, 13, 3
    activations = "fp8" if fp8_layout else "bf16"
    gate_up_w = mxfp4.quantize(torch.randn(experts, 2 * inter, hidden) * hidden**-0.5)
    down_w = mxfp4.quantize(torch.randn(experts, hidden, inter) * inter**-0.5)
    gate_up = (mxfp4.pack_gate_up(gate_up_w, activations=activations) if paired
               else mxfp4.pack(gate_up_w, activations=activations))
    down = mxfp4.pack(down_w, activations=activations)
    biases = (torch.randn(experts, 2 * inter).bfloat16(), torch.randn(experts, hidden).bfloat16())
    x = torch.randn(tokens, hidden).bfloat16()
    ids, routing_weights = make_routing(tokens, experts, top_k, skew=True)
    out = mxfp4.moe(x, ids, routing_weights, gate_up, down, gate_up_bias=biases[0], down_bias=biases[1],
                    activations="fp8")
    ref = reference_moe_float64(x, ids, routing_weights, gate_up_w, down_w, *biases)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert relative_error(out, ref) <= MOE_TOLERANCE, f"seed {seed}"
    bf16 = mxfp4.moe(x, ids, routing_weights, mxfp4.pack(gate_up_w), mxfp4.pack(down_w), gate_up_bias=biases[0],
                     down_bias=biases[1])
    assert relative_error(out, bf16.double()) <= MOE_TOLERANCE, "fp8 against the bf16-activation layer"


def test_moe_fp8_checks_and_compiles() -> None:
    torch._dynamo.reset()
    experts, hidden, inter = 4, 64, 32
    gate_up = mxfp4.pack(mxfp4.quantize(torch.randn(experts, 2 * inter, hidden) * 0.1), activations="fp8")
    down = mxfp4.pack(mxfp4.quantize(torch.randn(experts, hidden, inter) * 0.1), activations="fp8")
    x = torch.randn(5, hidden).bfloat16()
    ids, routing_weights = make_routing(5, experts, 2)
    with pytest.raises(TypeError, match="moe: gate_up was packed for FP8 activations"):
        mxfp4.moe(x, ids, routing_weights, gate_up, down)
    with pytest.raises(ValueError, match=r"moe: activations must be one of \('bf16', 'fp8'\)"):
        mxfp4.moe(x, ids, routing_weights, gate_up, down, activations="int8")

    def layer(x: torch.Tensor, ids: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        return mxfp4.moe(x, ids, routing_weights, gate_up, down, activations="fp8") * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, ids, routing_weights), layer(x, ids, routing_weights))
    assert "activations: fp8" in mxfp4.explain_moe(x, ids, gate_up, down, activations="fp8")


# ---------------------------------------------------------------------------------------------
# the FP8 layer's activated rows: e4m3 from the gate_up epilogue with the static scale of SwiGLU's clamp


def _clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)


@pytest.mark.parametrize("alpha, limit", [(1.702, 7.0), (1.0, 1.0), (0.1, 1.0), (4.0, 0.25), (1.702, 100.0)])
def test_swiglu_e4m3_scale_is_the_smallest_power_of_two_that_holds_every_value(alpha: float, limit: float) -> None:
    from mxfp4.ops.activations import FP8_MAX, swiglu_e4m3_scale

    scale = swiglu_e4m3_scale(alpha, limit)
    assert scale is not None and scale > 0 and math.frexp(scale)[0] == 0.5, scale
    # Every gate (far past the clamp on both sides) against the up values at both clamps, in float64.
    gate = torch.cat([torch.linspace(-1e4, 1e4, 200_001, dtype=torch.float64),
                      torch.linspace(-40 / alpha, 40 / alpha, 200_001, dtype=torch.float64)])
    peak = max(float(_clamped_swiglu(gate, torch.full_like(gate, up), alpha, limit).abs().max())
               for up in (-limit, limit, 1e9, -1e9))
    assert peak / scale <= FP8_MAX, "the scale lets a value past e4m3's largest"
    assert peak / (scale / 2) > FP8_MAX, "half the scale would hold every value too: not the smallest"


def test_swiglu_e4m3_scale_of_gpt_oss_and_of_an_unbounded_swiglu() -> None:
    from mxfp4.ops.activations import SILU_MIN_MAGNITUDE, swiglu_e4m3_scale

    assert swiglu_e4m3_scale(1.702, 7.0) == 0.125  # |SwiGLU| <= 8 x 7 sigmoid(11.9) = 55.9996 <= 448 / 8
    u = torch.linspace(-10, 0, 1_000_001, dtype=torch.float64)
    assert 0 <= SILU_MIN_MAGNITUDE + float((u * torch.sigmoid(u)).min()) < 1e-5  # the bound, rounded up
    for alpha, limit in ((0.0, 7.0), (-1.0, 7.0), (1.702, math.inf), (1.702, -1.0), (1.702, math.nan)):
        assert swiglu_e4m3_scale(alpha, limit) is None, (alpha, limit)


def test_sm90_fp8_layer_quantizes_the_activated_rows_in_gate_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # The launch-by-launch FP8 layer (mxfp4/experts/fused_steps.py), recorded: gate_up writes e4m3 rows and their
    # scales (the static scale), down reads exactly those; no quantizer between them. With alpha <= 0 (SwiGLU
    # unbounded) gate_up writes bf16 and the per-row quantizer runs.
    from codegen.runtime import routing as routing_module
    from mxfp4.experts import fused_steps

    experts, hidden, inter, tokens, top_k = 4, 64, 32, 5, 2
    gate_up = mxfp4.pack_gate_up(mxfp4.quantize(torch.randn(experts, 2 * inter, hidden) * 0.1), activations="fp8")
    down = mxfp4.pack(mxfp4.quantize(torch.randn(experts, hidden, inter) * 0.1), activations="fp8")
    x = torch.randn(tokens, hidden).bfloat16()
    ids, routing_weights = make_routing(tokens, experts, top_k)
    routed = tokens * top_k
    rows = routing_module.RoutedRows(torch.tensor([0, 4, 6, 8, routed], dtype=torch.int32),
                                     torch.arange(routed, dtype=torch.int32),
                                     torch.arange(routed, dtype=torch.int32) // top_k, torch.ones(routed))
    monkeypatch.setattr(routing_module, "route_topk", lambda *args: rows)
    quantized: list[torch.Tensor] = []

    def quantize(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized.append(a)
        return mxfp4.ops.activations.quantize_activations_reference(a)

    monkeypatch.setattr(fused_steps, "quantize_activations", quantize)
    monkeypatch.setattr(fused_steps, "quantize_gathered_rows",
                        lambda x, token: mxfp4.ops.activations.quantize_activations_reference(x[token]))
    calls = fake_sm90(monkeypatch)

    fused_steps.moe_sm90_steps(x, ids, routing_weights, gate_up, down, None, None, 1.702, 7.0, "NVIDIA H200",
                               activations="fp8")
    (_, _, up_config, activated, up_epilogue), (down_x, _, down_config, _, down_epilogue) = calls
    assert up_config.epilogue == "swiglu" and down_config.epilogue == "scatter" and quantized == []
    assert activated.dtype == torch.float8_e4m3fn and activated.shape == (routed, inter)
    assert up_epilogue.out_scale == 0.125 and up_epilogue.out_row_scale.dtype == torch.float32
    assert up_epilogue.out_row_scale.shape == (routed,)
    assert down_x is activated and down_epilogue.x_scale is up_epilogue.out_row_scale
    assert down_epilogue.w_scale is down.row_scale and down_epilogue.out_row_scale is None

    calls.clear()
    fused_steps.moe_sm90_steps(x, ids, routing_weights, gate_up, down, None, None, -1.0, 7.0, "NVIDIA H200",
                               activations="fp8")
    (_, _, _, activated, up_epilogue), (down_x, _, _, _, down_epilogue) = calls
    assert activated.dtype == torch.bfloat16 and up_epilogue.out_row_scale is None
    assert len(quantized) == 1 and quantized[0] is activated and down_x.dtype == torch.float8_e4m3fn
