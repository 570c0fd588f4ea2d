"""The SM90 layer's launch-by-launch steps (FP8 activations, foreign ids) under the captured replay of
mxfp4.experts.portable_graphs, on the CPU: which calls may replay, that their keys keep the two captured paths and
the two activation families apart, and that a plain eager call on the SM90 path asks the replay first while the op
path (a call under capture or torch.compile) never does. What a replay computes is the GPU tests' part
(tests/test_gpu_w4a8.py, tests/test_foreign_ids_gpu.py: bitwise equal to the launches)."""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch
from test_moe import make_routing

import mxfp4
from benchmarks.fake_portable import PortableRecorder, fake_portable
from benchmarks.fake_sm90 import fake_sm90
from mxfp4.experts import graphs as moe_graphs
from mxfp4.experts import layer as moe_layer
from mxfp4.experts import portable_graphs


@pytest.fixture()
def replay_on():
    moe_graphs.set_moe_graphs(True)
    try:
        yield
    finally:
        moe_graphs.set_moe_graphs(None)


def small_layer(activations: str) -> tuple:
    generator = torch.Generator().manual_seed(3)
    gate_up = mxfp4.pack_gate_up(mxfp4.quantize(torch.randn(4, 192, 160, generator=generator) * 0.1),
                                 activations=activations)
    down = mxfp4.pack(mxfp4.quantize(torch.randn(4, 160, 96, generator=generator) * 0.1), activations=activations)
    x = torch.randn(5, 160, generator=generator).bfloat16()
    ids, weights = make_routing(5, 4, 2)
    return x, ids, weights, gate_up, down


def key(path: str, activations: str, skip_invalid_ids: bool = False, tokens: int = 5) -> tuple | None:
    _, _, _, gate_up, down = small_layer("bf16")
    x = torch.randn(tokens, 160).bfloat16()
    ids, weights = make_routing(tokens, 4, 2)
    return portable_graphs.call_key(x, ids, weights, gate_up, down, None, None, 1.702, 7.0, activations,
                                    skip_invalid_ids, path)


def test_keys_keep_the_paths_and_the_families_apart(replay_on: None) -> None:
    with fake_portable(PortableRecorder()):
        assert key(portable_graphs.PORTABLE, "fp8") is None  # the portable layer's FP8 activations run eagerly
        steps_fp8 = key(portable_graphs.SM90_STEPS, "fp8")
        assert steps_fp8 is not None and steps_fp8[-2:] == ("fp8", portable_graphs.SM90_STEPS)
        steps_foreign = key(portable_graphs.SM90_STEPS, "bf16", skip_invalid_ids=True)
        portable = key(portable_graphs.PORTABLE, "bf16", skip_invalid_ids=True)
        assert len({steps_fp8, steps_foreign, portable}) == 3
        assert portable_graphs._kernel_serves(steps_fp8, torch.empty(0))  # the SM90 kernels serve any T
        assert key(portable_graphs.SM90_STEPS, "fp8", tokens=moe_graphs.GRAPH_MAX_TOKENS + 1) is None
        with pytest.raises(ValueError, match="path='triton': one of"):
            key("triton", "bf16")
    moe_graphs.set_moe_graphs(False)
    with fake_portable(PortableRecorder()):
        assert key(portable_graphs.SM90_STEPS, "fp8") is None  # replay off


def test_keys_follow_the_dependent_launch_switch(replay_on: None) -> None:
    from codegen.runtime.dependent_launch import set_dependent_launch

    try:
        with fake_portable(PortableRecorder()):
            set_dependent_launch(False)
            plain = key(portable_graphs.SM90_STEPS, "fp8")
            set_dependent_launch(True)
            dependent = key(portable_graphs.SM90_STEPS, "fp8")
        assert plain is not None and dependent is not None and plain != dependent
        assert dependent[-2:] == ("fp8", portable_graphs.SM90_STEPS)  # the path stays last (replay reads it there)
    finally:
        set_dependent_launch(None)


@pytest.mark.parametrize("activations, skip", [("fp8", False), ("bf16", True)], ids=["fp8", "foreign ids"])
def test_an_eager_sm90_steps_call_asks_the_replay_first(activations: str, skip: bool) -> None:
    x, ids, weights, gate_up, down = small_layer(activations)
    replayed = torch.full_like(x, 7.0)
    asked = []

    def replay_layer(*args, **kwargs) -> torch.Tensor:
        asked.append(args)
        return replayed

    with fake_sm90(), mock.patch.object(portable_graphs, "replay_layer", replay_layer):
        out = mxfp4.moe(x, ids, weights, gate_up, down, activations=activations, skip_invalid_ids=skip)
    assert out is replayed and len(asked) == 1
    composition, path = asked[0][-2:]
    assert path == portable_graphs.SM90_STEPS
    assert isinstance(composition, functools.partial) and composition.func is moe_layer._sm90_steps
    assert asked[0][9:11] == (activations, skip)


def test_steps_run_when_the_replay_declines_and_the_op_path_never_asks() -> None:
    x, ids, weights, gate_up, down = small_layer("fp8")
    launched = torch.full_like(x, 3.0)
    with fake_sm90(), mock.patch.object(portable_graphs, "replay_layer", lambda *args, **kwargs: None), \
            mock.patch("mxfp4.experts.fused_steps.moe_sm90_steps", return_value=launched) as steps:
        assert mxfp4.moe(x, ids, weights, gate_up, down, activations="fp8") is launched
    assert steps.call_count == 1 and steps.call_args.args[10:] == ("fp8", False)  # (..., device, activations, skip)
    with fake_sm90(), mock.patch.object(portable_graphs, "replay_layer") as replay, \
            mock.patch("mxfp4.experts.fused_steps.moe_sm90_steps", return_value=launched):
        moe_layer._moe_checked(x, ids, weights, gate_up, down, None, None, 1.702, 7.0, "fp8", direct=False)
    replay.assert_not_called()


def test_explain_moe_names_the_steps_and_their_replay(replay_on: None) -> None:
    x, ids, _, gate_up, down = small_layer("fp8")
    with fake_sm90():
        text = mxfp4.explain_moe(x, ids, gate_up, down, activations="fp8")
    assert "launch by launch" in text and "the quantizer gathering x's rows to e4m3" in text
    assert "replay the layer as one CUDA graph from their second call" in text
    assert "five kernels" not in text
