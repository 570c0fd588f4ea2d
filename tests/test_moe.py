"""mxfp4.moe on the CPU: against the float64 reference, routing, determinism, torch.compile, bad input."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from accuracy import relative_error

import mxfp4
from mxfp4.experts.layer import reference_moe_float64, route
from mxfp4.format.layout import PackedMXFP4

ACCURACY = 1e-2


@dataclass
class Layer:
    gate_up: PackedMXFP4
    down: PackedMXFP4
    gate_up_bias: torch.Tensor
    down_bias: torch.Tensor


def make_layer(experts: int, hidden: int, inter: int, scale: float = 0.15, device: str = "cpu", paired: bool = False) -> Layer:
    """Random weights (never zeros); scale sets how often the activation's clamps engage. ``paired``
    packs gate_up with its gate/up rows paired (mxfp4.pack_gate_up: the fused SM90 kernels)."""
    pack_gate_up = mxfp4.pack_gate_up if paired else mxfp4.pack
    gate_up = pack_gate_up(mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, device=device) * scale))
    down = mxfp4.pack(mxfp4.quantize(torch.randn(experts, hidden, inter, device=device) * scale))
    return Layer(gate_up, down, torch.randn(experts, 2 * inter, device=device).bfloat16(), torch.randn(experts, hidden, device=device).bfloat16())


def make_routing(tokens: int, experts: int, top_k: int, skew: bool = False, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (like torch.topk); skew draws from a few experts, leaving others empty."""
    scores = torch.rand(tokens, experts, device=device)
    if skew:
        scores[:, : max(top_k, experts // 4)] += 1.0  # the first quarter takes every token
    ids = scores.argsort(dim=1, descending=True)[:, :top_k]
    weights = torch.softmax(torch.randn(tokens, top_k, device=device), dim=1)
    return ids, weights


def run(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, layer: Layer, bias: bool = True, **kwargs) -> torch.Tensor:
    biases = dict(gate_up_bias=layer.gate_up_bias, down_bias=layer.down_bias) if bias else {}
    return mxfp4.moe(x, ids, weights, layer.gate_up, layer.down, **biases, **kwargs)


@pytest.mark.parametrize(
    "experts, tokens, top_k, hidden, inter",
    [(4, 1, 1, 64, 96), (4, 7, 2, 64, 96), (8, 16, 4, 96, 64), (32, 3, 4, 64, 32), (2, 9, 2, 160, 96)],
)
@pytest.mark.parametrize("skew", [False, True])
def test_moe_matches_float64(experts: int, tokens: int, top_k: int, hidden: int, inter: int, skew: bool, seed: int) -> None:
    layer = make_layer(experts, hidden, inter)
    x = torch.randn(tokens, hidden).bfloat16()
    ids, weights = make_routing(tokens, experts, top_k, skew)
    out = run(x, ids, weights, layer)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, hidden)
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_moe_input_variants(bias: bool, id_dtype: torch.dtype, weight_dtype: torch.dtype, seed: int) -> None:
    layer = make_layer(6, 64, 64)
    x = torch.randn(11, 64).bfloat16()
    ids, weights = make_routing(11, 6, 3)
    ids, weights = ids.to(id_dtype), weights.to(weight_dtype)
    out = run(x, ids, weights, layer, bias=bias)
    biases = (layer.gate_up_bias, layer.down_bias) if bias else (None, None)
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, *biases)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"


@pytest.mark.parametrize("alpha, limit", [(1.702, 7.0), (1.0, 0.5)])
def test_moe_clamps_engage(alpha: float, limit: float, seed: int) -> None:
    """Large weights push gate/up well past the limit, so the clamps decide most outputs."""
    layer = make_layer(4, 64, 64, scale=1.0)
    x = torch.randn(8, 64).bfloat16()
    ids, weights = make_routing(8, 4, 2)
    out = run(x, ids, weights, layer, alpha=alpha, limit=limit)
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias, alpha, limit)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"
    # Without the clamp the answer is far off: the test would see a missing clamp.
    unclamped = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias, alpha, 1e9)
    assert relative_error(out, unclamped) > 10 * ACCURACY


def test_route_groups_by_expert_stably(seed: int) -> None:
    ids, _ = make_routing(20, 8, 3, skew=True)
    routing = route(ids, 8)
    flat = ids.reshape(-1)
    assert routing.offsets.dtype == torch.int32 and routing.offsets.shape == (9,)
    counts = torch.bincount(flat, minlength=8)
    assert torch.equal(routing.offsets[1:].long(), counts.cumsum(0)) and int(routing.offsets[0]) == 0
    assert torch.equal(flat[routing.order], routing.sorted_ids)
    for e in range(8):  # stable: within one expert, choices stay in token order
        rows = routing.order[routing.offsets[e] : routing.offsets[e + 1]]
        assert torch.equal(rows, rows.sort().values)
    assert (counts == 0).any(), "the skewed routing should leave some experts empty"


def test_moe_single_expert_and_repeated_choice(seed: int) -> None:
    """Every token on expert 0 twice: other experts empty, repeated ids summed."""
    layer = make_layer(3, 64, 32)
    x = torch.randn(5, 64).bfloat16()
    ids = torch.zeros(5, 2, dtype=torch.int64)
    weights = torch.rand(5, 2)
    out = run(x, ids, weights, layer)
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"


def test_moe_empty_batch() -> None:
    layer = make_layer(2, 64, 32)
    out = run(torch.empty(0, 64, dtype=torch.bfloat16), torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2), layer)
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16


def test_moe_is_deterministic(seed: int) -> None:
    layer = make_layer(8, 96, 64)
    x = torch.randn(33, 96).bfloat16()
    ids, weights = make_routing(33, 8, 4, skew=True)
    assert torch.equal(run(x, ids, weights, layer), run(x, ids, weights, layer))


def test_moe_compiles_fullgraph(seed: int) -> None:
    layer = make_layer(4, 64, 64)
    x = torch.randn(6, 64).bfloat16()
    ids, weights = make_routing(6, 4, 2)

    def layer_fn(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return run(x, ids, weights, layer) * 2  # something around the op for the graph to hold

    compiled = torch.compile(layer_fn, fullgraph=True)
    assert torch.equal(compiled(x, ids, weights), layer_fn(x, ids, weights))


def test_moe_op_schema() -> None:
    layer = make_layer(2, 64, 32)
    x = torch.randn(3, 64).bfloat16()
    ids, weights = make_routing(3, 2, 1)
    for paired in (False, True):
        gate_up = mxfp4.pack_gate_up(mxfp4.unpack(layer.gate_up)) if paired else layer.gate_up
        args = (x, ids, weights, gate_up.data, gate_up.n, gate_up.k, paired, layer.down.data, layer.down.n,
                layer.down.k, None, None, "gpt_oss", 1.702, 7.0)
        torch.library.opcheck(torch.ops.mxfp4.moe.default, args)


# ---------------------------------------------------------------------------------------------
# Bad input: each raises naming the argument, before any compute.


def _bad_cases(layer: Layer, other: Layer, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
    e = layer.gate_up.num_experts
    return [
        (TypeError, "x must be bfloat16", dict(x=x.float())),
        (ValueError, r"x must be \[T, H\]", dict(x=x[None])),
        (ValueError, "x must be contiguous", dict(x=torch.randn(64, 5).bfloat16().t())),
        (TypeError, "x must be a torch.Tensor", dict(x=x.tolist())),
        (ValueError, "topk_ids must be", dict(ids=ids[:-1])),
        (ValueError, "topk_ids must be", dict(ids=ids.reshape(-1))),
        (TypeError, "topk_ids must be int32 or int64", dict(ids=ids.float())),
        (ValueError, f"topk_ids holds expert {e}, outside", dict(ids=torch.full_like(ids, e))),
        (ValueError, "topk_ids holds expert -1, outside", dict(ids=torch.full_like(ids, -1))),
        (TypeError, "topk_weights must be float32 or bfloat16", dict(w=w.double())),
        (ValueError, r"topk_weights must have shape \[T, k\]", dict(w=w[:, :1])),
        (TypeError, "gate_up is an unpacked MXFP4Tensor", dict(gate_up=mxfp4.unpack(layer.gate_up))),
        (TypeError, "down must be a PackedMXFP4", dict(down=torch.zeros(3))),
        (ValueError, "gate_up has 4 experts but down has 3", dict(down=other.down)),
        (ValueError, r"down is \[4, 64, 32\] but gate_up is \[4, 128, 64\]", dict(down=make_layer(4, 64, 32).down)),
        (ValueError, r"gate_up is \[4, 192, 96\] but x has H = 64", dict(gate_up=make_layer(4, 96, 96).gate_up)),
        (ValueError, r"down is \[4, 96, 96\] but x has H = 64", dict(down=make_layer(4, 96, 96).down)),
        (ValueError, r"gate_up_bias must have shape \[E, 2I\]", dict(gate_up_bias=layer.gate_up_bias[:, :-1])),
        (ValueError, r"down_bias must have shape \[E, H\]", dict(down_bias=layer.down_bias[:-1])),
        (TypeError, "down_bias must be a floating-point tensor", dict(down_bias=layer.down_bias.int())),
        (TypeError, "gate_up_bias must be a torch.Tensor or None", dict(gate_up_bias=1.0)),
        (ValueError, "activation must be one of", dict(activation="silu")),
        (TypeError, "alpha must be a float", dict(alpha="1.7")),
        (ValueError, "limit must be finite", dict(limit=float("inf"))),
        (ValueError, r"limit must be positive \(the SwiGLU clamp, gpt-oss: 7.0\), got 0", dict(limit=0)),
        (ValueError, "limit must be positive", dict(limit=-7.0)),
        (ValueError, "limit must be positive", dict(limit=-0.0)),
        (ValueError, "down_bias is on meta but x is on cpu", dict(down_bias=layer.down_bias.to("meta"))),
    ]


def test_moe_bad_input(seed: int) -> None:
    layer, other = make_layer(4, 64, 64), make_layer(3, 64, 64)
    x = torch.randn(5, 64).bfloat16()
    ids, w = make_routing(5, 4, 2)
    for error, message, change in _bad_cases(layer, other, x, ids, w):
        args = dict(x=x, ids=ids, w=w, gate_up=layer.gate_up, down=layer.down,
                    gate_up_bias=layer.gate_up_bias, down_bias=layer.down_bias, activation="gpt_oss", alpha=1.702, limit=7.0)
        args.update(change)
        with pytest.raises(error, match=message):
            mxfp4.moe(args.pop("x"), args.pop("ids"), args.pop("w"), args.pop("gate_up"), args.pop("down"), **args)


def test_moe_ids_on_device_are_not_read() -> None:
    """The id range check would sync on a device, so it runs only on the CPU (or with debug checks on)."""
    from mxfp4.experts.layer import _check_ids_values

    _check_ids_values(torch.full((1, 1), 5, dtype=torch.int64, device="meta"), 2)  # not read: no error
    with pytest.raises(ValueError, match="topk_ids holds expert 5"):
        _check_ids_values(torch.full((1, 1), 5), 2)


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_routing_weight_spoils_its_own_row_only(paired: bool, bad: float, seed: int) -> None:
    """Documented (mxfp4.moe's docstring, the README): not read on the host, so no error by default; the token's
    row is not finite and every other row is what it is without that weight's token."""
    layer = make_layer(4, 64, 64, paired=paired)
    x = torch.randn(6, 64).bfloat16()
    ids, w = make_routing(6, 4, 2)
    expected = run(x, ids, w, layer)
    w[3, 1] = bad
    out = run(x, ids, w, layer)
    assert not out[3].isfinite().all()
    rest = [t for t in range(6) if t != 3]
    assert torch.equal(out[rest], expected[rest]), f"seed {seed}"


def test_a_non_finite_routing_weight_is_an_error_under_debug_checks(seed: int) -> None:
    layer = make_layer(4, 64, 64)
    x = torch.randn(6, 64).bfloat16()
    ids, w = make_routing(6, 4, 2)
    w[4, 0] = float("nan")
    mxfp4.set_debug_checks(True)
    try:
        with pytest.raises(ValueError, match=r"moe: topk_weights\[4, 0\] is nan; routing weights must be finite"):
            run(x, ids, w, layer)
        foreign = ids.clone()
        foreign[4, 0] = 4  # the sentinel of another rank's expert: its weight does not count
        out = run(x, foreign, w, layer, skip_invalid_ids=True)
        assert out.isfinite().all(), f"seed {seed}"
    finally:
        mxfp4.set_debug_checks(False)
