"""The MoE routing kernel (codegen.runtime.routing): renders and compiles on any machine; on the H100 its
output equals the torch routing of mxfp4.experts.layer.route (stable sort by expert)."""

from __future__ import annotations

import pytest
import torch

from codegen.build.sass import dump_sass, sass_unavailable_reason
from codegen.build.toolchain import check_toolchain
from codegen.runtime.routing import (
    ROUTING_ENTRY,
    ROUTING_PARAMS,
    compiled_routing,
    render_routing,
)
from mxfp4.experts.layer import route
from mxfp4.ops.dispatch import is_sm90


def test_routing_source_renders_its_parameter_block() -> None:
    source = render_routing()
    assert f"{ROUTING_ENTRY}(const __grid_constant__ RoutingParams params)" in source
    assert f"sizeof(RoutingParams) == {ROUTING_PARAMS.size}" in source
    for field in ROUTING_PARAMS.fields:
        assert f" {field.name};" in source


@pytest.mark.skipif(not check_toolchain().ok, reason="NVRTC toolchain not usable")
def test_routing_kernel_compiles() -> None:
    compiled = compiled_routing()
    assert compiled.resources.spills == 0 and compiled.resources.stack_bytes == 0
    assert compiled.cubin[:4] == b"\x7fELF"
    if sass_unavailable_reason() is None:
        assert "MATCH.ANY" in dump_sass(compiled.cubin)  # the stable placement ranks lanes with match.any


@pytest.mark.gpu
@pytest.mark.skipif(not is_sm90(), reason="needs an SM90 (Hopper) GPU")
@pytest.mark.parametrize("tokens, experts, top_k", [(1, 32, 4), (7, 8, 3), (128, 32, 4), (4096, 128, 4), (33, 1024, 2)])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_routing_kernel_equals_the_torch_routing(tokens: int, experts: int, top_k: int, ids_dtype: torch.dtype,
                                                 weights_dtype: torch.dtype, seed: int) -> None:
    from codegen.runtime.routing import route_topk

    scores = torch.rand(tokens, experts, device="cuda")
    scores[:, : max(top_k, experts // 8)] += 1.0  # skewed: a few experts take most rows, many get none
    ids = scores.argsort(dim=1, descending=True)[:, :top_k].to(ids_dtype).contiguous()
    weights = torch.rand(tokens, top_k, device="cuda").to(weights_dtype)
    got = route_topk(ids, weights, experts)
    want = route(ids, experts)
    torch.cuda.synchronize()
    assert torch.equal(got.offsets, want.offsets), f"seed {seed}"
    assert torch.equal(got.row_dest.long(), want.order), f"seed {seed}"
    assert torch.equal(got.row_token.long(), want.order // top_k)
    assert torch.equal(got.row_scale, weights.reshape(-1).float()[want.order])
