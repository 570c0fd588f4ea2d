"""mxfp4.moe(..., skip_invalid_ids=True) on the CPU: choices whose id is outside [0, E) (expert parallelism's
sentinel E for another rank's expert, ids past E, negative ids) add exactly zero, whatever their weight and
whatever their token's row holds; against the float64 reference that leaves them out. Ordinary calls keep
rejecting such ids."""

from __future__ import annotations

import pytest
import torch
from test_moe import ACCURACY, make_layer, make_routing, relative_error, run

import mxfp4
from mxfp4.experts.layer import foreign_to_last_expert, reference_moe_float64
from mxfp4.portable import weight_cache

EXPERTS, HIDDEN, INTER, TOKENS, TOP_K = 4, 64, 96, 11, 3
INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)


def foreign_values(kind: str, dtype: torch.dtype, experts: int = EXPERTS) -> list[int]:
    """Ids outside [0, experts) of one kind."""
    huge = 2**40 + 1 if dtype == torch.int64 else INT32_MAX  # 2^40 + 1 narrowed to int32 would be a valid 1
    return {"sentinel": [experts], "beyond": [experts + 1, experts + 7, huge],
            "negative": [-1, -experts, INT32_MIN], "mixed": [experts, -1, experts + 3, huge]}[kind]


def with_foreign(ids: torch.Tensor, kind: str, experts: int = EXPERTS) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` with about 40% of the choices (and every choice of token 0) replaced by ids outside
    [0, experts); the mask."""
    foreign = torch.rand(ids.shape) < 0.4
    foreign[0] = True
    values = torch.tensor(foreign_values(kind, ids.dtype, experts), dtype=ids.dtype)
    picks = values[torch.randint(0, len(values), ids.shape)]
    return torch.where(foreign, picks, ids), foreign


def foreign_weights(weights: torch.Tensor, foreign: torch.Tensor, how: str) -> torch.Tensor:
    """The weight a foreign choice carries: 0 (what transformers' all-reduce passes), random, or NaN."""
    fill = {"zero": torch.zeros_like(weights), "random": torch.rand_like(weights) + 0.5,
            "nan": torch.full_like(weights, float("nan"))}[how]
    return torch.where(foreign, fill, weights)


@pytest.mark.parametrize("kind", ["sentinel", "beyond", "negative", "mixed"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weight", ["zero", "random", "nan"])
@pytest.mark.parametrize("paired", [False, True], ids=["plain", "paired"])
def test_foreign_choices_add_exactly_zero(kind: str, id_dtype: torch.dtype, weight: str, paired: bool, seed: int) -> None:
    layer = make_layer(EXPERTS, HIDDEN, INTER, paired=paired)
    x = torch.randn(TOKENS, HIDDEN).bfloat16()
    x[0] = float("nan")  # token 0 has only foreign choices: nothing of its row may reach the output
    ids, weights = make_routing(TOKENS, EXPERTS, TOP_K)
    ids, foreign = with_foreign(ids.to(id_dtype), kind)
    weights = foreign_weights(weights, foreign, weight)
    out = run(x, ids, weights, layer, skip_invalid_ids=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])), f"seed {seed}"
    assert torch.isfinite(out).all(), f"seed {seed}"
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias,
                                skip_invalid_ids=True)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"


@pytest.mark.parametrize("budget", [None, 0], ids=["cached", "per-call decode"])
def test_foreign_choices_on_both_fallback_modes(budget: int | None, seed: int) -> None:
    """The portable grouped_mm's two modes (decoded-weight cache, per-call decode) under the composition."""
    weight_cache.set_fallback_memory_budget(budget)
    layer = make_layer(EXPERTS, HIDDEN, INTER)
    x = torch.randn(TOKENS, HIDDEN).bfloat16()
    ids, weights = make_routing(TOKENS, EXPERTS, TOP_K, skew=True)
    ids, foreign = with_foreign(ids, "mixed")
    weights = foreign_weights(weights, foreign, "random")
    out = run(x, ids, weights, layer, skip_invalid_ids=True)
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias,
                                skip_invalid_ids=True)
    assert relative_error(out[1:], ref[1:]) <= ACCURACY and torch.equal(out[0], torch.zeros_like(out[0])), f"seed {seed}"


def test_skip_changes_nothing_without_foreign_ids(seed: int) -> None:
    layer = make_layer(EXPERTS, HIDDEN, INTER)
    x = torch.randn(TOKENS, HIDDEN).bfloat16()
    ids, weights = make_routing(TOKENS, EXPERTS, TOP_K)
    assert torch.equal(run(x, ids, weights, layer, skip_invalid_ids=True), run(x, ids, weights, layer)), f"seed {seed}"


def test_all_choices_foreign_gives_zeros(seed: int) -> None:
    layer = make_layer(EXPERTS, HIDDEN, INTER)
    x = torch.randn(5, HIDDEN).bfloat16()
    ids = torch.full((5, 2), EXPERTS)
    out = run(x, ids, torch.rand(5, 2), layer, skip_invalid_ids=True)
    assert torch.equal(out, torch.zeros_like(out))


def test_ordinary_calls_still_reject_foreign_ids() -> None:
    layer = make_layer(EXPERTS, HIDDEN, INTER)
    x = torch.randn(3, HIDDEN).bfloat16()
    ids, weights = make_routing(3, EXPERTS, 2)
    for bad in (EXPERTS, -1):
        with pytest.raises(ValueError, match=f"topk_ids holds expert {bad}, outside"):
            run(x, torch.full_like(ids, bad), weights, layer)
        with pytest.raises(ValueError, match=f"topk_ids holds expert {bad}, outside"):
            mxfp4.explain_moe(x, torch.full_like(ids, bad), layer.gate_up, layer.down)
    with pytest.raises(TypeError, match="skip_invalid_ids must be a bool, got int"):
        run(x, ids, weights, layer, skip_invalid_ids=1)


def test_explain_says_foreign_ids_are_skipped() -> None:
    layer = make_layer(EXPERTS, HIDDEN, INTER)
    x = torch.randn(3, HIDDEN).bfloat16()
    text = mxfp4.explain_moe(x, torch.full((3, 2), EXPERTS), layer.gate_up, layer.down, skip_invalid_ids=True)
    assert f"outside [0, {EXPERTS}) contribute zero" in text


def test_foreign_to_last_expert() -> None:
    ids = torch.tensor([[0, 3, 4], [-1, 2, 9]], dtype=torch.int32)
    mapped, valid = foreign_to_last_expert(ids, 4)
    assert mapped.dtype == torch.int32 and mapped.tolist() == [[0, 3, 3], [3, 2, 3]]
    assert valid.tolist() == [[True, True, False], [False, True, False]]


def test_skip_compiles_fullgraph_and_passes_opcheck(seed: int) -> None:
    layer = make_layer(EXPERTS, HIDDEN, INTER)
    x = torch.randn(6, HIDDEN).bfloat16()
    ids, weights = make_routing(6, EXPERTS, 2)
    ids, _ = with_foreign(ids, "sentinel")

    def layer_fn(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return run(x, ids, weights, layer, skip_invalid_ids=True) * 2

    compiled = torch.compile(layer_fn, fullgraph=True)
    assert torch.equal(compiled(x, ids, weights), layer_fn(x, ids, weights)), f"seed {seed}"
    args = (x, ids, weights, layer.gate_up.data, layer.gate_up.n, layer.gate_up.k, False, layer.down.data,
            layer.down.n, layer.down.k, None, None, "gpt_oss", 1.702, 7.0, "bf16", None, None, True)
    torch.library.opcheck(torch.ops.mxfp4.moe.default, args)


def test_experts_forward_skips_under_expert_parallelism(seed: int) -> None:
    """The "hopper_mxfp4" forward of a module transformers marked expert-parallel adds zero for the sentinel;
    the same module unmarked rejects it."""
    pytest.importorskip("transformers")
    from test_integrations_transformers import experts_modules, tiny_model

    from mxfp4.integrations.gpt_oss_experts import is_expert_parallel
    from mxfp4.integrations.transformers import convert_gpt_oss

    module = experts_modules(convert_gpt_oss(tiny_model()))[0]
    x = torch.randn(4, module.hidden_size)
    ids, weights = torch.tensor([[0, EXPERTS]] * 4), torch.tensor([[0.75, 0.0]] * 4)
    with pytest.raises(ValueError, match=f"topk_ids holds expert {EXPERTS}"):
        module(x, ids, weights)
    module._is_expert_parallel = True
    with torch.no_grad():
        out = module(x, ids, weights)
        alone = module(x, ids[:, :1], weights[:, :1])
    assert torch.equal(out, alone), f"seed {seed}"  # the sentinel's slot added exactly 0
    assert is_expert_parallel(module)
    del module._is_expert_parallel  # transformers < 5.21: no flag, fewer experts than the model's
    module.num_experts = EXPERTS // 2
    assert is_expert_parallel(module)
    module.num_experts = EXPERTS
    assert not is_expert_parallel(module)
