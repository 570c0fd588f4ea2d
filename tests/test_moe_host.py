"""mxfp4.moe's SM90 host path on the CPU (issue 15): the device stubbed by benchmarks.fake_sm90 and the five
kernels emulated from their parameter blocks (tests/moe_emulator.py). So these check what each launch and
each graph replay is given (the output must match the float64 reference), the graph cache's keys, bounds
and staleness rules, and how little torch work a call does."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from moe_emulator import Emulator
from test_moe import ACCURACY, Layer, make_layer, make_routing, relative_error

import mxfp4
from benchmarks.fake_sm90 import FakeGraph, Recorder, fake_sm90
from benchmarks.host_cpu import torch_ops_per_call
from codegen.runtime.fast_driver import DriverError
from mxfp4.experts import graphs as moe_graphs
from mxfp4.experts.layer import reference_moe_float64

FUSED_KERNELS = ["moe_routing", "moe_gather", "swiglu", "scatter", "moe_topk_sum"]


@pytest.fixture()
def layer(seed: int) -> Layer:
    """Tails: H = 160 and I = 96 are not multiples of the 64-wide atom."""
    return make_layer(8, 160, 96, 160 ** -0.5, paired=True)


@pytest.fixture()
def device(layer: Layer):
    """The fake SM90 device, every launch run by the emulator; replay on, whatever the environment says."""
    with fake_sm90(Recorder(on_launch=Emulator(layer.gate_up, layer.down))) as recorder:
        moe_graphs.set_moe_graphs(True)
        try:
            yield recorder
        finally:
            moe_graphs.set_moe_graphs(None)


def inputs(tokens: int, skew: bool = True, hidden: int = 160) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, weights = make_routing(tokens, 8, 3, skew=skew)
    return torch.randn(tokens, hidden).bfloat16(), ids.contiguous(), weights  # contiguous, as torch.topk gives


def call(layer: Layer, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, **kwargs) -> torch.Tensor:
    biases = dict(gate_up_bias=layer.gate_up_bias, down_bias=layer.down_bias)
    return mxfp4.moe(x, ids, weights, layer.gate_up, layer.down, **{**biases, **kwargs})


def checked(layer: Layer, x, ids, weights, seed: int, **kwargs) -> torch.Tensor:
    out = call(layer, x, ids, weights, **kwargs)
    biases = kwargs.get("gate_up_bias", layer.gate_up_bias), kwargs.get("down_bias", layer.down_bias)
    options = {k: v for k, v in kwargs.items() if k in ("alpha", "limit")}
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, *biases, **options)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"
    return out


def kinds(launches) -> list[str]:
    return [next((k for k in FUSED_KERNELS if k in launch.name), launch.name) for launch in launches]


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_launches_match_float64(layer: Layer, device: Recorder, id_dtype, weight_dtype, seed: int) -> None:
    moe_graphs.set_moe_graphs(False)
    for tokens in (1, 13):
        x, ids, weights = inputs(tokens)
        device.launches.clear()
        checked(layer, x, ids.to(id_dtype), weights.to(weight_dtype), seed)
        assert kinds(device.launches) == FUSED_KERNELS
        assert {launch.stream for launch in device.launches} == {device.stream}
    assert device.graphs == []


def test_no_bias_and_clamps(layer: Layer, device: Recorder, seed: int) -> None:
    x, ids, weights = inputs(9)
    for _ in range(3):  # launches, then a graph built, then replayed
        checked(layer, x, ids, weights, seed, gate_up_bias=None, down_bias=None, alpha=1.0, limit=0.5)
    assert len(device.graphs) == 1


def test_graph_from_the_second_call_follows_every_input(layer: Layer, device: Recorder, seed: int) -> None:
    x, ids, weights = inputs(7)
    first = checked(layer, x, ids, weights, seed)
    assert device.graphs == [] and kinds(device.launches) == FUSED_KERNELS
    again = checked(layer, x, ids, weights, seed)
    assert len(device.graphs) == 1 and len(device.graph_launches) == 1
    assert torch.equal(first, again)  # the same kernels with the same parameters: the same bits
    for skew in (False, True, False):
        checked(layer, *inputs(7, skew), seed)  # fresh x, ids and weights: the nodes must follow
    assert len(device.graphs) == 1 and len(device.graph_launches) == 4


def test_nodes_are_rewritten_only_when_their_address_changes(layer: Layer, device: Recorder, seed: int) -> None:
    x, ids, weights = inputs(5)
    kept = [call(layer, x, ids, weights), call(layer, x, ids, weights)]  # launches; graph built
    device.node_updates.clear()
    kept.append(checked(layer, x, ids, weights, seed))  # only the output is new
    assert device.node_updates == ["moe_topk_sum"]
    x2 = torch.randn_like(x)
    device.node_updates.clear()
    kept.append(checked(layer, x2, ids, weights, seed))
    assert device.node_updates == ["moe_gather", "moe_topk_sum"]
    _, ids2, weights2 = inputs(5)
    device.node_updates.clear()
    kept.append(checked(layer, x2, ids2, weights2, seed))
    assert device.node_updates == ["moe_routing", "moe_topk_sum"]


def test_in_place_updates_of_weights_and_biases_are_seen(layer: Layer, device: Recorder, seed: int) -> None:
    x, ids, weights = inputs(6)
    for _ in range(2):
        call(layer, x, ids, weights)
    with torch.no_grad():
        layer.gate_up_bias.add_(0.5)
        layer.down_bias.mul_(-1.0)
    checked(layer, x, ids, weights, seed)  # the graph reads the biases where they are, when it runs
    assert len(device.graphs) == 1


def test_what_a_graph_bakes_in_is_in_its_key(layer: Layer, device: Recorder, seed: int) -> None:
    x, ids, weights = inputs(6)
    variants = [
        {},
        {"gate_up_bias": layer.gate_up_bias.clone() + 1},  # another bias tensor (another address)
        {"down_bias": layer.down_bias.clone() * 2},
        {"alpha": 1.0},
        {"limit": 3.0},
    ]
    for kwargs in variants:
        for _ in range(2):
            checked(layer, x, ids, weights, seed, **kwargs)
    ids32 = ids.int()  # int32 ids: another routing parameter block
    checked(layer, x, ids32, weights, seed)
    checked(layer, x, ids32, weights, seed)
    assert len(device.graphs) == len(variants) + 1
    device.stream += 1  # another stream: its own graph and workspace
    for _ in range(2):
        checked(layer, x, ids, weights, seed)
    assert len(device.graphs) == len(variants) + 2 and moe_graphs.stats()["workspaces"] == 2


def test_layers_on_one_stream_share_one_workspace(device: Recorder, seed: int) -> None:
    layers = [make_layer(8, 160, 96, 160 ** -0.5, paired=True) for _ in range(3)]
    device.on_launch = Emulator(*(w for layer in layers for w in (layer.gate_up, layer.down)))
    x, ids, weights = inputs(4)
    for _ in range(2):
        for layer in layers:
            checked(layer, x, ids, weights, seed)
    assert moe_graphs.stats()["graphs"] == 3 and moe_graphs.stats()["workspaces"] == 1


@pytest.mark.parametrize("reason", ["fp32 bias", "non-contiguous bias", "large T", "capturing", "replay off",
                                    "autograd", "environment"])
def test_when_calls_launch_their_kernels(layer: Layer, device: Recorder, reason: str, seed: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    x, ids, weights = inputs(5)
    kwargs = {}
    if reason == "fp32 bias":  # converted per call: a graph would read a freed copy
        kwargs = {"gate_up_bias": layer.gate_up_bias.float()}
    elif reason == "non-contiguous bias":
        kwargs = {"down_bias": layer.down_bias.t().contiguous().t()}
    elif reason == "large T":
        monkeypatch.setattr(moe_graphs, "GRAPH_MAX_TOKENS", 4)
    elif reason == "capturing":
        device.capturing = True
    elif reason == "replay off":
        moe_graphs.set_moe_graphs(False)
    elif reason == "autograd":  # the op path (the dispatcher sees the call)
        x = x.clone().requires_grad_()
    else:
        monkeypatch.setenv(moe_graphs.ENV_MOE_GRAPHS, "0")
        moe_graphs.set_moe_graphs(None)
    for _ in range(3):
        device.launches.clear()
        with torch.no_grad() if reason != "autograd" else torch.enable_grad():
            out = call(layer, x, ids, weights, **kwargs)
        biases = kwargs.get("gate_up_bias", layer.gate_up_bias), kwargs.get("down_bias", layer.down_bias)
        ref = reference_moe_float64(x.detach(), ids, weights, layer.gate_up, layer.down, *biases)
        assert relative_error(out.detach(), ref) <= ACCURACY, f"seed {seed}"
        assert kinds(device.launches) == FUSED_KERNELS
    assert device.graphs == []


def test_graph_count_is_bounded(layer: Layer, device: Recorder, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    monkeypatch.setattr(moe_graphs, "MAX_GRAPHS", 2)
    x, ids, weights = inputs(3)
    biases = [layer.down_bias.clone() + i for i in range(3)]
    for bias in biases:
        for _ in range(2):
            checked(layer, x, ids, weights, seed, down_bias=bias)
    first, *rest = device.graphs
    assert first.closed and not any(g.closed for g in rest) and moe_graphs.stats()["graphs"] == 2
    checked(layer, x, ids, weights, seed, down_bias=biases[0])  # evicted: launches again, then rebuilt
    moe_graphs.clear()
    assert all(g.closed for g in device.graphs) and moe_graphs.stats() == {"graphs": 0, "workspaces": 0, "workspace_bytes": 0}


def test_a_graph_goes_with_the_tensors_it_reads_in_place(layer: Layer, device: Recorder, seed: int) -> None:
    x, ids, weights = inputs(3)
    bias = layer.down_bias.clone()
    for _ in range(2):
        checked(layer, x, ids, weights, seed, down_bias=bias)
        checked(layer, x, ids, weights, seed)
    assert moe_graphs.stats()["graphs"] == 2
    del bias  # the first graph read it in place: it goes (its workspace stays for the second)
    assert device.graphs[0].closed and moe_graphs.stats() == {**moe_graphs.stats(), "graphs": 1, "workspaces": 1}
    with moe_graphs._lock:  # freed while the cache is busy (perhaps by this thread): dropped by the next look
        layer.down_bias = layer.down_bias.clone()
        assert not device.graphs[1].closed
    assert moe_graphs.stats()["graphs"] == 0 and moe_graphs.stats()["workspaces"] == 0 and device.graphs[1].closed


def test_workspace_budget(layer: Layer, device: Recorder, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    x, ids, weights = inputs(3)
    monkeypatch.setattr(moe_graphs, "WORKSPACE_BUDGET", 1024)  # less than one workspace: no graph
    for _ in range(3):
        checked(layer, x, ids, weights, seed)
    assert device.graphs == [] and moe_graphs.stats()["workspaces"] == 0
    monkeypatch.setattr(moe_graphs, "WORKSPACE_BUDGET", 1 << 20)
    checked(layer, x, ids, weights, seed)
    room_for_one = moe_graphs.stats()["workspace_bytes"]
    monkeypatch.setattr(moe_graphs, "WORKSPACE_BUDGET", room_for_one)
    x2, ids2, weights2 = inputs(2)  # another T: another workspace, so the first one's graph goes
    for _ in range(2):
        checked(layer, x2, ids2, weights2, seed)
    assert moe_graphs.stats()["workspaces"] == 1 and device.graphs[0].closed


def test_a_graph_that_cannot_be_built_warns_once(layer: Layer, device: Recorder, monkeypatch: pytest.MonkeyPatch,
                                                seed: int) -> None:
    def refuse(self, nodes, dependent=False):
        raise DriverError("cuGraphInstantiate failed: CUDA_ERROR_NOT_SUPPORTED")

    monkeypatch.setattr(FakeGraph, "__init__", refuse)
    monkeypatch.setattr(moe_graphs, "_warned", False)
    x, ids, weights = inputs(4)
    with pytest.warns(RuntimeWarning, match="building the layer's CUDA graph failed.*CUDA_ERROR_NOT_SUPPORTED"):
        for _ in range(4):
            checked(layer, x, ids, weights, seed)
    assert moe_graphs.stats()["workspaces"] == 0


def test_a_call_allocates_and_does_nothing_else_in_torch(layer: Layer, seed: int) -> None:
    """Launches: the workspace and the output; a replay: the output. No other torch op either way."""
    x, ids, weights = inputs(6)
    with fake_sm90(Recorder(count_only=True)):
        moe_graphs.set_moe_graphs(False)
        assert torch_ops_per_call(lambda: call(layer, x, ids, weights)) == Counter({"aten::empty_like": 1, "aten::new_empty": 1})
        moe_graphs.set_moe_graphs(True)
        call(layer, x, ids, weights)
        call(layer, x, ids, weights)
        assert torch_ops_per_call(lambda: call(layer, x, ids, weights)) == Counter({"aten::empty_like": 1})
        moe_graphs.set_moe_graphs(None)


def test_explain_moe_names_the_five_kernels_and_the_replay(layer: Layer, device: Recorder) -> None:
    x, ids, _ = inputs(2)
    text = mxfp4.explain_moe(x, ids, layer.gate_up, layer.down)
    assert "five kernels" in text and "replay the five as one CUDA graph" in text
    moe_graphs.set_moe_graphs(False)
    assert "five launches per call" in mxfp4.explain_moe(x, ids, layer.gate_up, layer.down)


@pytest.mark.parametrize("value", ["false", 0, 1.0])
def test_set_moe_graphs_takes_a_bool(value: object) -> None:
    with pytest.raises(TypeError, match=r"set_moe_graphs: enabled must be a bool or None"):
        mxfp4.set_moe_graphs(value)
