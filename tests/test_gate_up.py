"""gate_up pairing for the fused SwiGLU epilogue: the permutation, its inverse, the kernel's channel
arithmetic, and mxfp4.moe on paired weights (CPU; the GPU runs are in test_moe_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from test_moe import ACCURACY, make_layer, make_routing, relative_error, run

import mxfp4
from mxfp4.experts.layer import reference_moe_float64
from mxfp4.format.gate_up import (
    pack_for_moe,
    paired_row_source,
    split_gate_up,
    unpack_gate_up,
)


def test_pairing_is_a_permutation_inside_16_row_blocks() -> None:
    source = paired_row_source(64)
    assert sorted(source.tolist()) == list(range(64))
    assert torch.equal(source // 16, torch.arange(64) // 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        paired_row_source(40)


def test_kernel_channel_arithmetic_matches_the_pairing() -> None:
    # templates/mxfp4_epilogue.cuh: a thread's gate row n (n % 16 < 8) and up row n + 8 are channel
    # (n >> 4) * 8 + (n & 7), i.e. interleaved rows 2c and 2c + 1.
    source = paired_row_source(5760)
    for n in range(0, 5760):
        if n % 16 < 8:
            channel = (n >> 4) * 8 + (n & 7)
            assert (source[n].item(), source[n + 8].item()) == (2 * channel, 2 * channel + 1)


def test_pack_gate_up_round_trip_is_exact(seed: int) -> None:
    w = mxfp4.quantize(torch.randn(3, 48, 96))
    packed = mxfp4.pack_gate_up(w)
    assert isinstance(packed, mxfp4.PackedGateUp) and packed.shape == (3, 48, 96)
    back = unpack_gate_up(packed)
    assert torch.equal(back.blocks, w.blocks) and torch.equal(back.scales, w.scales)
    assert isinstance(packed.to("cpu"), mxfp4.PackedGateUp)
    assert isinstance(pack_for_moe(w), mxfp4.PackedGateUp)
    assert not isinstance(pack_for_moe(mxfp4.quantize(torch.randn(2, 40, 64))), mxfp4.PackedGateUp)


def test_split_gate_up_reads_either_order(seed: int) -> None:
    h = torch.randn(5, 32)
    gate, up = split_gate_up(h, paired=False)
    paired_h = h[:, paired_row_source(32)]
    gate_p, up_p = split_gate_up(paired_h, paired=True)
    assert torch.equal(gate, gate_p) and torch.equal(up, up_p)


@pytest.mark.parametrize("skew", [False, True])
def test_moe_on_paired_weights_matches_float64(skew: bool, seed: int) -> None:
    layer = make_layer(6, 64, 96, paired=True)
    x = torch.randn(9, 64).bfloat16()
    ids, weights = make_routing(9, 6, 2, skew)
    out = run(x, ids, weights, layer)
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"


def test_explain_moe_names_the_layer_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from mxfp4.experts import layer as moe_layer
    from mxfp4.ops import dispatch

    paired, plain = make_layer(4, 64, 64, paired=True), make_layer(4, 64, 64)
    x, ids = torch.randn(3, 64).bfloat16(), torch.zeros(3, 2, dtype=torch.int32)
    assert "layer:     portable" in mxfp4.explain_moe(x, ids, paired.gate_up, paired.down)
    sm90 = dispatch.PathChoice("sm90", "test", "cuda:0", (9, 0), "NVIDIA H100", "ok")
    monkeypatch.setattr(moe_layer, "select_path", lambda device: sm90)
    text = mxfp4.explain_moe(x, ids, paired.gate_up, paired.down)
    assert "layer:     fused" in text and "_swiglu (" in text and "_scatter (" in text and "epilogue" in text
    assert "not paired" in mxfp4.explain_moe(x, ids, plain.gate_up, plain.down)



def test_explain_moe_checks_what_the_op_checks() -> None:
    layer = make_layer(4, 64, 64, paired=True)
    x, ids = torch.randn(3, 64).bfloat16(), torch.zeros(3, 2, dtype=torch.int32)
    weights = torch.full((3, 2), 0.5)
    cases = [
        (TypeError, "moe: x must be bfloat16, got torch.float32", dict(x=x.float())),
        (ValueError, r"moe: topk_ids must be \[T, k\] with T = x.shape\[0\] = 3", dict(ids=ids[:2])),
        (TypeError, "moe: topk_ids must be int32 or int64", dict(ids=ids.float())),
        (ValueError, "moe: topk_ids holds expert 4, outside", dict(ids=ids + 4)),
        (ValueError, r"moe: gate_up is \[4, 128, 64\] but x has H = 32", dict(x=x[:, :32].contiguous())),
        (TypeError, "moe: x must be a torch.Tensor", dict(x=x.tolist())),
    ]
    for error, message, change in cases:
        args = {"x": x, "ids": ids, **change}
        with pytest.raises(error, match=message):
            mxfp4.explain_moe(args["x"], args["ids"], layer.gate_up, layer.down)
        with pytest.raises(error, match=message):  # the op raises the same
            mxfp4.moe(args["x"], args["ids"], weights, layer.gate_up, layer.down)
