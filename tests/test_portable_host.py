"""mxfp4.moe's portable host path on the CPU (issue 22): no host read of a device value anywhere in the layer's
composition (run on fake CUDA tensors, where any such read raises), and the layer's CUDA-graph replay
(mxfp4.experts.portable_graphs) with the GPU stood in for by benchmarks.fake_portable: what a replay computes
(the float64 reference, the eager call's bits), its keys, bounds and staleness rules, when it is off, and how
little torch work a replayed call does."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_moe import ACCURACY, Layer, make_layer, make_routing, relative_error
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import mxfp4
from benchmarks.fake_portable import PortableRecorder, fake_portable
from benchmarks.host_cpu import torch_ops_per_call
from mxfp4.experts import graphs as moe_graphs
from mxfp4.experts import layer as moe_layer
from mxfp4.experts import portable_graphs
from mxfp4.experts.layer import reference_moe_float64
from mxfp4.ops import dispatch, grouped_gemm
from mxfp4.portable import fallback
from mxfp4.portable import kernel as portable_kernel

aten = torch.ops.aten
DEVICE_INDEX = portable_graphs.device_index  # the real one (fake_portable stands in for it)

# ------------------------------------------------------------------------------------------------
# No host read: the composition on fake CUDA tensors (shapes and dtypes only, no values).

# Ops that read a device tensor's values on the host, or size their output from them (a device sync on a GPU).
HOST_READS = {aten._local_scalar_dense, aten.item, aten.nonzero, aten.unique_dim, aten._unique, aten._unique2,
              aten.unique_consecutive, aten.bincount, aten.masked_select, aten.repeat_interleave, aten.equal,
              aten.is_nonzero, aten.histc}


class NoHostRead(TorchDispatchMode):
    """Raises on an op that reads device values back to the host, or copies between the host and a device
    (torch waits for a blocking copy: a sync)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in HOST_READS and not (packet is aten.repeat_interleave and kwargs.get("output_size") is not None):
            raise AssertionError(f"host read of a device value: {func}")
        if packet in (aten._to_copy, aten.copy_):
            devices = {t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
            if kwargs.get("device") is not None:
                devices.add(torch.device(kwargs["device"]).type)
            if len(devices) > 1:
                raise AssertionError(f"a copy between the host and the device: {func} ({sorted(devices)})")
        return func(*args, **kwargs)


@pytest.fixture()
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """A CUDA device where the portable path and its in-register kernel run, for fake tensors: the path choice,
    the kernel's availability and its launch stood in for; the composition's own code runs as on a GPU."""
    launches: list[tuple[int, int]] = []
    monkeypatch.setitem(dispatch._cache, ("cuda", 0), dispatch.PathChoice(dispatch.PORTABLE, "test", "cuda:0", (8, 0)))
    monkeypatch.setattr(portable_kernel, "unavailable_reason", lambda device_type, index: None)
    monkeypatch.setattr(portable_kernel, "launch", lambda x, w_data, n, k, rows, masked, out, config=None:
                        launches.append((n, k)) or out)
    monkeypatch.setattr(fallback, "_capturing", lambda device: False)
    monkeypatch.setattr(portable_graphs, "device_index", lambda x: None)  # replay: tested below
    # The plain eager path (not the op's fake kernel) under the modes, so the kernel wrapper runs too.
    monkeypatch.setattr(grouped_gemm, "runs_directly", lambda x: True)
    return launches


def _fake_layer(mode: FakeTensorMode, paired: bool, bias: bool) -> tuple:
    experts, hidden, inter = 8, 160, 96
    with mode:
        kind = mxfp4.PackedGateUp if paired else mxfp4.PackedMXFP4
        atoms = lambda n: -(-n // 64)  # noqa: E731
        gate_up = kind(torch.empty(experts, atoms(2 * inter), atoms(hidden), 2176, dtype=torch.uint8, device="cuda"),
                       2 * inter, hidden)
        down = mxfp4.PackedMXFP4(torch.empty(experts, atoms(hidden), atoms(inter), 2176, dtype=torch.uint8,
                                             device="cuda"), hidden, inter)
        biases = (torch.empty(experts, 2 * inter, device="cuda", dtype=torch.bfloat16) if bias else None,
                  torch.empty(experts, hidden, device="cuda") if bias else None)  # a float32 bias too
    return gate_up, down, *biases


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "checkpoint order"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("skip", [False, True], ids=["", "skip_invalid_ids"])
@pytest.mark.parametrize(("id_dtype", "weight_dtype"), [(torch.int64, torch.float32), (torch.int32, torch.bfloat16)])
def test_the_portable_layer_reads_no_device_value(fake_cuda: list, paired: bool, bias: bool, skip: bool,
                                                  id_dtype: torch.dtype, weight_dtype: torch.dtype) -> None:
    """Checks, routing, both GEMM wrappers, bias, activation, combine: every op on fake CUDA tensors, where a
    value read (.item, .tolist, bool, nonzero, bincount...) or a host/device copy raises. T = 1 and small T."""
    mode = FakeTensorMode()
    gate_up, down, gate_up_bias, down_bias = _fake_layer(mode, paired, bias)
    for tokens in (1, 5):
        with mode:
            x = torch.empty(tokens, 160, dtype=torch.bfloat16, device="cuda")
            ids = torch.empty(tokens, 4, dtype=id_dtype, device="cuda").narrow(1, 0, 3)  # non-contiguous, as argsort gives
            weights = torch.empty(tokens, 3, dtype=weight_dtype, device="cuda")
            with NoHostRead():
                out = moe_layer._moe_validated(x, ids, weights, gate_up, down, gate_up_bias, down_bias, "gpt_oss",
                                               1.702, 7.0, direct=True, skip_invalid_ids=skip)
        assert out.shape == (tokens, 160) and out.dtype == torch.bfloat16 and out.device.type == "cuda"
    assert fake_cuda == [(192, 160), (160, 96)] * 2  # both GEMMs on the kernel, each call


@pytest.mark.parametrize("read", ["item", "tolist", "bool", "nonzero", "bincount", "cpu", "to host", "from host"])
def test_the_detector_catches_host_reads(read: str) -> None:
    """The test above means something: each kind of host read raises under it."""
    reads = {
        "item": lambda t: t.sum().item(), "tolist": lambda t: t.tolist(), "bool": lambda t: bool(t.any()),
        "nonzero": lambda t: torch.ops.aten.nonzero(t),  # t.nonzero() needs a CUDA device guard: it raises anyway
        "bincount": lambda t: torch.bincount(t), "cpu": lambda t: t.cpu(),
        "to host": lambda t: t.to("cpu", non_blocking=True),
        "from host": lambda t: torch.tensor([1, 2], device="cuda"),
    }
    with FakeTensorMode():
        t = torch.empty(4, dtype=torch.int64, device="cuda")
        with NoHostRead(), pytest.raises(AssertionError, match="host read|between the host and the device"):
            reads[read](t)


# ------------------------------------------------------------------------------------------------
# The graph replay, on the stand-in.


@pytest.fixture()
def layer(seed: int) -> Layer:
    """Tails: H = 160 and I = 96 are not multiples of the 64-wide atom."""
    return make_layer(8, 160, 96, 160 ** -0.5, paired=True)


@pytest.fixture()
def device():
    """The stand-in GPU, every launch computed; replay on, whatever the environment says."""
    with fake_portable(PortableRecorder()) as recorder:
        moe_graphs.set_moe_graphs(True)
        try:
            yield recorder
        finally:
            moe_graphs.set_moe_graphs(None)


def inputs(tokens: int, skew: bool = True, hidden: int = 160) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, weights = make_routing(tokens, 8, 3, skew=skew)
    return torch.randn(tokens, hidden).bfloat16(), ids, weights  # ids a non-contiguous slice, as argsort gives


def call(layer: Layer, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, **kwargs) -> torch.Tensor:
    biases = dict(gate_up_bias=layer.gate_up_bias, down_bias=layer.down_bias)
    return mxfp4.moe(x, ids, weights, layer.gate_up, layer.down, **{**biases, **kwargs})


def checked(layer: Layer, x, ids, weights, seed: int, **kwargs) -> torch.Tensor:
    out = call(layer, x, ids, weights, **kwargs)
    biases = kwargs.get("gate_up_bias", layer.gate_up_bias), kwargs.get("down_bias", layer.down_bias)
    options = {k: v for k, v in kwargs.items() if k in ("alpha", "limit", "skip_invalid_ids")}
    ref = reference_moe_float64(x, ids, weights, layer.gate_up, layer.down, *biases, **options)
    assert relative_error(out, ref) <= ACCURACY, f"seed {seed}"
    return out


def four_checked_calls_warn_once(layer: Layer, seed: int, match: str) -> None:
    """Four calls of one key (each checked against float64), under a refused graph step: one RuntimeWarning."""
    x, ids, weights = inputs(4)
    with pytest.warns(RuntimeWarning, match=match) as warned:
        for _ in range(4):
            checked(layer, x, ids, weights, seed)
    assert len([w for w in warned if w.category is RuntimeWarning]) == 1, [str(w.message) for w in warned]


@pytest.mark.parametrize("direct", [True, False], ids=["copy nodes", "torch copies"])
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "checkpoint order"])
def test_replay_from_the_second_call_follows_every_input(device: PortableRecorder, paired: bool, direct: bool,
                                                         seed: int) -> None:
    """Fresh inputs each call, at new addresses: the copy nodes follow them (the stand-in raises on a stale node),
    or (where the nodes cannot move) torch copies them into the graph's buffers."""
    device.copy_nodes = direct
    layer = make_layer(8, 160, 96, 160 ** -0.5, paired=paired)
    x, ids, weights = inputs(7)
    first = checked(layer, x, ids, weights, seed)
    assert device.graphs == [] and device.counts["kernel launches"] == 2
    again = checked(layer, x, ids, weights, seed)  # the capture, then its first replay
    assert len(device.graphs) == 1 and device.counts["graph launches"] == 1 and device.graphs[0].launches == 2
    assert torch.equal(first, again)  # the same ops and kernels on the same values: the same bits
    for skew in (False, True, False):
        x, ids, weights = inputs(7, skew)  # fresh inputs each call: copied into the graph's
        eager = moe_layer.moe_composition(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias,
                                          layer.down_bias, 1.702, 7.0)
        assert torch.equal(checked(layer, x, ids, weights, seed), eager)
    assert len(device.graphs) == 1 and device.counts["graph launches"] == 4 and device.counts["kernel launches"] == 2 + 6
    assert portable_graphs.stats()["direct"] == int(direct) and device.counts["node updates"] >= (9 if direct else 0)


def test_replay_options_and_dtypes(layer: Layer, device: PortableRecorder, seed: int) -> None:
    x, ids, weights = inputs(6)
    variants = [
        {},
        {"gate_up_bias": None, "down_bias": None},
        {"gate_up_bias": layer.gate_up_bias.float()},  # another bias tensor, another dtype: read as it is
        {"down_bias": layer.down_bias.t().contiguous().t()},  # non-contiguous: strides are in the key
        {"alpha": 1.0, "limit": 0.5},
        {"skip_invalid_ids": True},
    ]
    for kwargs in variants:  # the list keeps the biases alive: their graphs stay
        for _ in range(3):
            checked(layer, x, ids, weights, seed, **kwargs)
    for id_dtype, weight_dtype in ((torch.int32, torch.float32), (torch.int64, torch.bfloat16)):
        for _ in range(3):
            checked(layer, x, ids.to(id_dtype), weights.to(weight_dtype), seed)
    assert len(device.graphs) == len(variants) + 2 == portable_graphs.stats()["graphs"]
    device.stream += 1  # another stream: its own graph and memory pool
    for _ in range(2):
        checked(layer, x, ids, weights, seed)
    assert len(device.graphs) == len(variants) + 3 and portable_graphs.stats()["pools"] == 2


def test_foreign_ids_replay(layer: Layer, device: PortableRecorder, seed: int) -> None:
    """skip_invalid_ids: the sentinel id E (another rank's expert) adds exactly zero, replayed too."""
    x, ids, weights = inputs(5)
    ids = ids.clone()
    ids[0, 1] = 8
    ids[3, 0] = 8
    outs = [checked(layer, x, ids, weights, seed, skip_invalid_ids=True) for _ in range(3)]
    assert torch.equal(outs[0], outs[2]) and device.counts["graph launches"] == 2


def test_in_place_updates_of_weights_and_biases_are_seen(layer: Layer, device: PortableRecorder, seed: int) -> None:
    x, ids, weights = inputs(6)
    for _ in range(2):
        call(layer, x, ids, weights)
    with torch.no_grad():
        layer.gate_up_bias.add_(0.5)
        layer.down_bias.mul_(-1.0)
        layer.down.data.copy_(make_layer(8, 160, 96, 160 ** -0.5, paired=True).down.data)
    checked(layer, x, ids, weights, seed)  # the graph reads them where they are, when it runs
    assert len(device.graphs) == 1 and device.counts["graph launches"] == 2


@pytest.mark.parametrize("reason", ["large T", "capturing", "replay off", "environment", "autograd on x",
                                    "autograd on a bias", "debug checks", "prefill-sized with a budget", "cpu"])
def test_when_calls_run_eagerly(layer: Layer, device: PortableRecorder, reason: str, seed: int,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    x, ids, weights = inputs(5)
    grad = torch.no_grad()
    if reason == "large T":
        monkeypatch.setattr(moe_graphs, "GRAPH_MAX_TOKENS", 4)
    elif reason == "capturing":  # the user's capture: the layer's ops go into it
        device.capturing = True
    elif reason == "replay off":
        moe_graphs.set_moe_graphs(False)
    elif reason == "environment":
        monkeypatch.setenv(moe_graphs.ENV_MOE_GRAPHS, "0")
        moe_graphs.set_moe_graphs(None)
    elif reason == "autograd on x":  # the op path (the dispatcher sees the call)
        x, grad = x.clone().requires_grad_(), torch.enable_grad()
    elif reason == "autograd on a bias":  # an eager call records it: no graph may swallow that
        layer.down_bias.requires_grad_()
        grad = torch.enable_grad()
    elif reason == "debug checks":  # they read values back: never inside a capture
        monkeypatch.setattr(grouped_gemm, "_debug_checks", True)
    elif reason == "prefill-sized with a budget":  # an eager call may take the decoded copy: no graph of the kernel
        monkeypatch.setattr(fallback, "CACHE_MIN_ROWS", 1)
    else:  # the real device_index: a CPU tensor has none
        monkeypatch.setattr(portable_graphs, "device_index", DEVICE_INDEX)
    for _ in range(3):
        with grad:
            out = call(layer, x, ids, weights)
        ref = reference_moe_float64(x.detach(), ids, weights, layer.gate_up, layer.down, layer.gate_up_bias.detach(),
                                    layer.down_bias.detach())
        assert relative_error(out.detach(), ref) <= ACCURACY, f"seed {seed}"
    assert device.graphs == [] and device.counts["graph launches"] == 0


def test_graph_count_is_bounded(layer: Layer, device: PortableRecorder, monkeypatch: pytest.MonkeyPatch,
                                seed: int) -> None:
    monkeypatch.setattr(portable_graphs, "MAX_GRAPHS", 2)
    x, ids, weights = inputs(3)
    biases = [layer.down_bias.clone() + i for i in range(3)]
    for bias in biases:
        for _ in range(2):
            checked(layer, x, ids, weights, seed, down_bias=bias)
    assert portable_graphs.stats() == {"graphs": 2, "pools": 1, "direct": 2} and len(device.graphs) == 3
    launched = device.counts["kernel launches"]
    checked(layer, x, ids, weights, seed, down_bias=biases[0])  # evicted: eager again...
    assert len(device.graphs) == 3 and device.counts["kernel launches"] == launched + 2
    checked(layer, x, ids, weights, seed, down_bias=biases[0])  # ...then rebuilt on its second sight
    assert len(device.graphs) == 4 and portable_graphs.stats()["graphs"] == 2
    moe_graphs.clear()  # the SM90 replay's switch and clear drop these too
    assert portable_graphs.stats() == {"graphs": 0, "pools": 0, "direct": 0}


def test_a_graph_goes_with_the_tensors_it_reads_in_place(layer: Layer, device: PortableRecorder, seed: int) -> None:
    x, ids, weights = inputs(3)
    bias = layer.down_bias.clone()
    for _ in range(2):
        checked(layer, x, ids, weights, seed, down_bias=bias)
        checked(layer, x, ids, weights, seed)
    assert portable_graphs.stats()["graphs"] == 2
    del bias  # the first graph read it in place: it goes (the pool stays for the second)
    assert portable_graphs.stats() == {"graphs": 1, "pools": 1, "direct": 1}
    with portable_graphs._lock:  # freed while the cache is busy (perhaps by this thread): dropped by the next look
        layer.down_bias = layer.down_bias.clone()
        assert len(portable_graphs._graphs) == 1
    assert portable_graphs.stats() == {"graphs": 0, "pools": 0, "direct": 0}


def test_a_graph_holds_no_weight_alive(device: PortableRecorder, seed: int) -> None:
    """A freed model's packed weights go, and so does its graph (the graph reads them, it does not own them)."""
    import gc
    import weakref

    layer = make_layer(8, 160, 96, 160 ** -0.5, paired=True)
    x, ids, weights = inputs(2)
    for _ in range(3):
        call(layer, x, ids, weights)
    data = weakref.ref(layer.gate_up.data)
    del layer
    gc.collect()
    assert data() is None and portable_graphs.stats()["graphs"] == 0


def test_a_failed_capture_warns_once_and_runs_eagerly(layer: Layer, device: PortableRecorder,
                                                      monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    def refuse(run, statics, index, pool):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(portable_graphs, "capture", refuse)
    monkeypatch.setattr(portable_graphs, "_warned", False)
    four_checked_calls_warn_once(layer, seed, "capturing the portable layer as a CUDA graph failed.*not permitted")
    assert portable_graphs.stats() == {"graphs": 0, "pools": 0, "direct": 0} and device.counts["kernel launches"] == 8


def test_inference_mode_in_and_out(layer: Layer, device: PortableRecorder, seed: int) -> None:
    """Static buffers are normal tensors: a graph built under inference_mode serves calls outside it, and back;
    the output is an inference tensor exactly when an eager call's would be."""
    x, ids, weights = inputs(4)
    with torch.inference_mode():
        first = [checked(layer, x, ids, weights, seed) for _ in range(2)]
    outside = checked(layer, x, ids, weights, seed)
    with torch.inference_mode():
        inside = checked(layer, x.clone(), ids.clone(), weights.clone(), seed)
    assert device.counts["graph launches"] == 3 and torch.equal(first[0], outside) and torch.equal(outside, inside)
    assert first[1].is_inference() and inside.is_inference() and not outside.is_inference()


@pytest.mark.parametrize("direct", [True, False], ids=["copy nodes", "torch copies"])
def test_a_replayed_call_allocates_its_output_and_launches(layer: Layer, direct: bool, seed: int) -> None:
    """The host work of a replayed call (contiguous inputs, as torch.topk gives): its output's allocation and one
    graph launch, a copy node moved only for an address that changed (none for the same x, ids and weights);
    where the nodes cannot move: torch copies in and a clone out."""
    x, ids, weights = inputs(6)
    ids = ids.contiguous()
    with fake_portable(PortableRecorder(count_only=True, copy_nodes=direct)) as recorder:
        moe_graphs.set_moe_graphs(True)
        for _ in range(3):
            call(layer, x, ids, weights)
        launches, updates = recorder.counts["graph launches"], recorder.counts["node updates"]
        ops = torch_ops_per_call(lambda: call(layer, x, ids, weights))
        expected = {"aten::empty_like": 1} if direct else {"aten::_foreach_copy_": 1, "aten::clone": 1}
        assert ops == Counter(expected)
        assert recorder.counts["graph launches"] == launches + 1 and recorder.counts["kernel launches"] == 2
        if direct:  # slots x, ids, weights: moved once, at the first launch; the output where the allocator moved it
            (entry,) = portable_graphs._graphs.values()
            assert [entry.copies.moves[slot] for slot in range(3)] == [1, 1, 1], entry.copies.moves
            assert recorder.counts["node updates"] - updates <= 1
            strided = ids.t().contiguous().t()  # the same values, strided: one contiguous copy more
            assert torch_ops_per_call(lambda: call(layer, x, strided, weights)) == Counter({**expected, "aten::contiguous": 1})
        else:
            assert recorder.counts["node updates"] == 0
        moe_graphs.set_moe_graphs(None)


class RecordedNoHostRead(NoHostRead):
    """NoHostRead that also lists the ops it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket)
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("direct", [True, False], ids=["copy nodes", "torch copies"])
def test_a_replayed_call_reads_no_device_value(layer: Layer, direct: bool, seed: int) -> None:
    """Every torch op of a replayed call, seen by a dispatch mode where a value read or a host/device copy raises:
    the output's allocation (copy nodes), or the copies in and the clone out (torch copies); nothing else."""
    x, ids, weights = inputs(5)
    ids = ids.contiguous()
    args = (x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias, layer.down_bias, "gpt_oss", 1.702, 7.0)
    with fake_portable(PortableRecorder(count_only=True, copy_nodes=direct)) as recorder:
        moe_graphs.set_moe_graphs(True)
        try:
            for _ in range(2):
                moe_layer._moe_validated(*args, direct=True)
            launches = recorder.counts["graph launches"]
            with RecordedNoHostRead() as mode:
                out = moe_layer._moe_validated(*args, direct=True)
        finally:
            moe_graphs.set_moe_graphs(None)
    assert recorder.counts["graph launches"] == launches + 1 and out.shape == x.shape
    expected = [aten.empty_like] if direct else [aten._foreach_copy_, aten.clone]
    assert mode.ops == expected, mode.ops


def test_new_values_at_the_same_addresses_are_read(layer: Layer, device: PortableRecorder, seed: int) -> None:
    """A copy node reads its address when the graph runs: inputs rewritten in place (no node moves) give the new
    values' result."""
    x, ids, weights = inputs(5)
    ids = ids.contiguous()
    for _ in range(2):
        checked(layer, x, ids, weights, seed)
    updates = device.counts["node updates"]
    fresh = inputs(5, skew=False)
    x.copy_(fresh[0])
    ids.copy_(fresh[1])
    weights.copy_(fresh[2])
    out = checked(layer, x, ids, weights, seed)
    eager = moe_layer.moe_composition(x, ids, weights, layer.gate_up, layer.down, layer.gate_up_bias,
                                      layer.down_bias, 1.702, 7.0)
    (entry,) = portable_graphs._graphs.values()
    assert torch.equal(out, eager) and [entry.copies.moves[slot] for slot in range(3)] == [1, 1, 1]
    assert device.counts["node updates"] - updates <= 1 and device.counts["graph launches"] == 2


def test_another_weight_or_shape_gets_its_own_graph(layer: Layer, device: PortableRecorder, seed: int) -> None:
    """Two layers of one shape alternate (as a model's layers do), and T changes: each call replays the graph of
    its own weights and shape, never another's."""
    other = make_layer(8, 160, 96, 160 ** -0.5, paired=True)
    for tokens in (3, 5):
        x, ids, weights = inputs(tokens)
        for _ in range(3):
            for which in (layer, other):
                out = checked(which, x, ids, weights, seed)
                eager = moe_layer.moe_composition(x, ids, weights, which.gate_up, which.down, which.gate_up_bias,
                                                  which.down_bias, 1.702, 7.0)
                assert torch.equal(out, eager), f"seed {seed}: T = {tokens}"
    assert portable_graphs.stats()["graphs"] == 4 and len(device.graphs) == 4


def test_a_refused_node_move_warns_once_and_runs_eagerly(layer: Layer, device: PortableRecorder,
                                                         monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """A driver that will not move a copy node (say, to memory of another kind): the graph goes, the call and
    the key's later calls run eagerly, with the right result."""
    from benchmarks.fake_portable import FakeCopyNodes

    def refuse(self, slot: int, address: int) -> None:
        raise RuntimeError("cuGraphExecMemcpyNodeSetParams(slot 0) failed: CUDA_ERROR_INVALID_VALUE")

    monkeypatch.setattr(FakeCopyNodes, "retarget", refuse)
    monkeypatch.setattr(portable_graphs, "_warned", False)
    four_checked_calls_warn_once(layer, seed, "launching the portable layer's CUDA graph failed.*INVALID_VALUE")
    assert portable_graphs.stats() == {"graphs": 0, "pools": 0, "direct": 0}
    assert len(device.graphs) == 1 and device.counts["graph launches"] == 0 and device.counts["kernel launches"] == 8


def test_explain_moe_names_the_replay(layer: Layer, device: PortableRecorder) -> None:
    x, ids, _ = inputs(2)
    text = mxfp4.explain_moe(x, ids, layer.gate_up, layer.down)
    assert "portable" in text and "launches:  each call runs" in text and "(graph replay: on CUDA" in text  # CPU x
    with FakeTensorMode():
        on_gpu = torch.empty(2, 160, dtype=torch.bfloat16, device="cuda")  # where the kernel runs (the stand-in's)
        assert portable_graphs.explain_replay(on_gpu, 1, "bf16").startswith("plain eager calls at T <= 64 replay")
        assert "graph replay: on CUDA, bf16 activations" in portable_graphs.explain_replay(on_gpu, 1, "fp8")
        assert portable_graphs.explain_replay(torch.empty(65, 160, device="cuda"), 1, "bf16").startswith("T > 64")
    moe_graphs.set_moe_graphs(False)
    assert "graph replay off" in mxfp4.explain_moe(x, ids, layer.gate_up, layer.down)


def test_takes_kernel_is_choose_modes_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-call decision (no reasons composed) agrees with choose_mode everywhere; kernel_serves (what the
    replay asks) implies it, whatever the budget and the capture state."""
    packed = mxfp4.pack(mxfp4.quantize(torch.randn(2, 64, 64) * 0.05))
    for runs in (False, True):
        monkeypatch.setattr(portable_kernel, "unavailable_reason", lambda t, i, runs=runs: None if runs else "no Triton")
        for budget in (0, 100, 1 << 30, None):
            mxfp4.set_fallback_memory_budget(budget)
            for capturing in (False, True):
                monkeypatch.setattr(fallback, "_capturing", lambda device, capturing=capturing: capturing)
                for rows in (1, fallback.CACHE_MIN_ROWS - 1, fallback.CACHE_MIN_ROWS, 4096):
                    verdict = fallback.choose_mode(packed.data, 64, 64, rows)[0] == fallback.KERNEL
                    assert fallback.takes_kernel(packed.data, 64, 64, rows) == verdict, (runs, budget, capturing, rows)
                    if fallback.kernel_serves(packed.data.device, rows):
                        assert verdict, (runs, budget, capturing, rows)
