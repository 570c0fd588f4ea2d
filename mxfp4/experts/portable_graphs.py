"""Replay of the portable MoE layer as one CUDA graph, for plain eager calls at small T.

Why: off SM90 (or with the portable path forced) the layer is a composition of about forty torch ops and two
Triton launches (mxfp4.experts.layer.moe_composition). At decode each costs host time, and the sum (about
0.8 ms per gpt-oss-20b layer on an H100 host) is what an eager decode step waits for, not the GPU.

How: ``torch.cuda.CUDAGraph`` captures the composition once per key, on static copies of x, topk_ids and
topk_weights (a warm-up run on the capture stream first, so nothing is compiled or loaded inside the
capture). A call copies its three inputs in, replays the graph on the current stream and returns a copy of
the static output: three copies, one graph launch and one copy out, whatever the composition's length.
The graph runs the very kernels and ops of an eager call, so it gives the same bits.

Never stale: a graph is keyed by everything it bakes in: the device, the stream, T, k, E, H, I, the ids'
and routing weights' dtypes, gate_up's row order (paired or not), the packed weights' addresses, the
biases' addresses, dtypes and strides, alpha, limit and skip_invalid_ids. The graph reads the weights and
biases when it runs, so an in-place update is seen, and an address reused by another tensor is that call's
tensor: what an eager call reads. A graph goes when one of the tensors it reads in place is freed, so it
holds no reference to them (a freed model's weights are not kept alive).

Safe: the graphs of one (device, stream) share one memory pool and replay one at a time in stream order; the
static output is copied out before the call returns, so the next replay may reuse the pool. Replay is off
under stream capture, under torch.compile or a torch mode (the op path), with autograd to record, with
debug checks (they read values back), for FP8 activations, on another device than the current one, and
where an eager call would not take the in-register kernel (mxfp4.portable.fallback.kernel_serves).

Bounded: only T <= ``GRAPH_MAX_TOKENS`` (the SM90 replay's), at most ``MAX_GRAPHS`` graphs (least recently
used dropped first), a graph built on the second call of its key (a one-off shape costs no graph).
``mxfp4.set_moe_graphs(False)`` (or ``HOPPER_MXFP4_MOE_GRAPHS=0``) turns replay off and drops them all.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from mxfp4.format.layout import PackedMXFP4
from mxfp4.ops.grouped_gemm import debug_checks_enabled
from mxfp4.portable.fallback import kernel_serves

from . import graphs as moe_graphs
from .deferred_drops import DeferredDrops

MAX_GRAPHS = 256
# The layer on given (x, topk_ids, topk_weights), the rest of the call bound: what is captured.
Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_lock = threading.Lock()


@dataclass
class _Graph:
    """One captured layer: the graph, its static inputs and output, and the pool it allocated from."""

    graph: object  # torch.cuda.CUDAGraph (a stand-in in the CPU tests)
    statics: list[torch.Tensor]  # x, topk_ids, topk_weights: what the graph reads
    out: torch.Tensor
    pool_key: Hashable
    finalizers: list = field(default_factory=list)


_graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
_drops = DeferredDrops(_lock, _graphs, lambda entry: _close(entry))  # graphs whose weights or biases were freed
_seen: OrderedDict[Hashable, int] = OrderedDict()  # calls of keys without a graph yet
_failed: set[Hashable] = set()  # keys whose capture failed (they run eagerly)
_pools: dict[Hashable, list] = {}  # (device, stream) -> [memory pool handle, graphs using it]
_capture_streams: dict[int, object] = {}
_warned = False


# ---------------------------------------------------------------------------------------------
# torch's CUDA state and graphs, one function each (the CPU tests stand in for them).


def device_index(x: torch.Tensor) -> int | None:
    """x's CUDA device index when it is the current device, else None (no replay)."""
    if x.device.type != "cuda":
        return None
    index = x.device.index
    return index if index == torch._C._cuda_getDevice() else None


def current_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


def capturing() -> bool:
    return torch._C._cuda_isCurrentStreamCapturing()


def capture(run: Run, statics: tuple[torch.Tensor, ...], index: int, pool: object) -> tuple[object, torch.Tensor]:
    """(graph, static output) of ``run`` on ``statics``, captured on a side stream of device ``index`` into
    ``pool``, after a warm-up run there (compiles, loads and lazy initialisations stay out of the capture)."""
    side = _capture_streams.get(index)
    if side is None:
        side = _capture_streams[index] = torch.cuda.Stream(index)
    current = torch.cuda.current_stream(index)
    side.wait_stream(current)  # the static inputs were written on the current stream
    try:
        with torch.cuda.stream(side):
            run(*statics)
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = run(*statics)
            finally:
                graph.capture_end()
    except Exception:
        _capture_streams.pop(index, None)  # a failed capture may leave the stream's allocations routed to the pool
        raise
    current.wait_stream(side)  # the next call's copies wait for the warm-up's reads
    return graph, out


def new_pool() -> object:
    return torch.cuda.graph_pool_handle()


def replay_graph(entry: _Graph, run: Run) -> None:
    """Launch ``entry``'s graph on the current stream (``run``: what a stand-in recomputes instead)."""
    entry.graph.replay()


# ---------------------------------------------------------------------------------------------
# Which calls replay, and their keys.


def _bias_key(bias: torch.Tensor | None) -> tuple | None:
    return None if bias is None else (bias.data_ptr(), bias.dtype, bias.stride())


def _records_autograd(topk_weights: torch.Tensor, gate_up_bias: torch.Tensor | None,
                      down_bias: torch.Tensor | None) -> bool:
    """Whether an eager call would record autograd (x's own requires_grad sends the call to the op path)."""
    return torch.is_grad_enabled() and (topk_weights.requires_grad or (gate_up_bias is not None and gate_up_bias.requires_grad)
                                        or (down_bias is not None and down_bias.requires_grad))


def call_key(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedMXFP4, down: PackedMXFP4,
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, alpha: float, limit: float,
    activations: str, skip_invalid_ids: bool,
) -> tuple | None:
    """The key of the graph that serves this validated plain eager call, or None when it runs eagerly."""
    tokens, top_k = topk_ids.shape
    if (tokens > moe_graphs.GRAPH_MAX_TOKENS or activations != "bf16" or not moe_graphs.moe_graphs_enabled()
            or debug_checks_enabled()):
        return None
    index = device_index(x)
    if index is None or capturing() or _records_autograd(topk_weights, gate_up_bias, down_bias):
        return None
    experts = gate_up.data.shape[0]
    if not kernel_serves(x.device, -(-tokens * top_k // experts)):
        return None
    # type(gate_up): PackedGateUp (rows paired) or PackedMXFP4 (checkpoint order): the composition splits by it.
    return (index, current_stream(index), tokens, top_k, experts, down.n, down.k, topk_ids.dtype, topk_weights.dtype,
            type(gate_up), gate_up.data.data_ptr(), down.data.data_ptr(), _bias_key(gate_up_bias),
            _bias_key(down_bias), alpha, limit, skip_invalid_ids)


def explain_replay(x: torch.Tensor, rows_per_expert: int, activations: str) -> str:
    """What a plain eager call of the portable layer on ``x`` launches (for ``mxfp4.explain_moe``)."""
    one_by_one = "each call runs the composition's torch ops and two Triton launches"
    if not moe_graphs.moe_graphs_enabled():
        return f"graph replay off (set_moe_graphs(False) or {moe_graphs.ENV_MOE_GRAPHS}=0): {one_by_one}"
    if x.device.type != "cuda" or activations != "bf16" or not kernel_serves(x.device, rows_per_expert):
        return f"{one_by_one} (graph replay: on CUDA, bf16 activations, calls the in-register kernel serves)"
    if x.shape[0] > moe_graphs.GRAPH_MAX_TOKENS:
        return f"T > {moe_graphs.GRAPH_MAX_TOKENS}: {one_by_one}"
    return (f"plain eager calls at T <= {moe_graphs.GRAPH_MAX_TOKENS} replay the layer as one CUDA graph from their "
            "second call (x, topk_ids, topk_weights copied in, the output copied out)")


def replay_layer(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedMXFP4, down: PackedMXFP4,
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, alpha: float, limit: float,
    activations: str, skip_invalid_ids: bool, composition: Callable[..., torch.Tensor],
) -> torch.Tensor | None:
    """The layer's output by a graph replay, or None when the caller must run ``composition`` eagerly (replay
    off or not allowed for this call, first sight of its key, or a capture that failed)."""
    key = call_key(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, alpha, limit, activations,
                   skip_invalid_ids)
    if key is None:
        return None

    def run(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return composition(x, ids, weights, gate_up, down, gate_up_bias, down_bias, alpha, limit, activations,
                           skip_invalid_ids)

    return replay(key, (gate_up.data, down.data, gate_up_bias, down_bias), x, topk_ids, topk_weights, run)


# ---------------------------------------------------------------------------------------------
# The graphs.


def replay(key: Hashable, owners: tuple, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
           run: Run) -> torch.Tensor | None:
    """Copy the inputs in, replay the graph of ``key`` (built on its second call), copy the output out.
    ``owners``: the tensors the graph reads in place (None for an absent bias)."""
    with _lock:
        if _drops:
            _drops.drop()
        entry = _graphs.get(key)
        if entry is None:
            entry = _build_on_second_sight(key, owners, x, topk_ids, topk_weights, run)
            if entry is None:
                return None
        else:
            _graphs.move_to_end(key)
        torch._foreach_copy_(entry.statics, (x, topk_ids, topk_weights))  # one call for the three copies
        replay_graph(entry, run)
        return entry.out.clone()  # before the next replay on this stream may reuse the pool


def _build_on_second_sight(key: Hashable, owners: tuple, x: torch.Tensor, topk_ids: torch.Tensor,
                           topk_weights: torch.Tensor, run: Run) -> _Graph | None:
    if key in _failed:
        return None
    calls = _seen.pop(key, 0) + 1
    if calls < moe_graphs.BUILD_AFTER_CALLS:
        _seen[key] = calls
        while len(_seen) > 4 * MAX_GRAPHS:
            _seen.popitem(last=False)
        return None
    pool_key = key[:2]  # (device, stream)
    pool = _pools.setdefault(pool_key, [new_pool(), 0])
    # Static tensors are normal ones (not inference tensors), so calls in and out of inference_mode can write them;
    # they hold this call's values, so the warm-up and the capture route real ids.
    with torch.inference_mode(False), torch.no_grad():
        statics = (x.clone(), topk_ids.contiguous().clone(), topk_weights.contiguous().clone())
        try:
            graph, out = capture(run, statics, key[0], pool[0])
        except Exception as error:  # this key runs eagerly from now on
            _capture_failed(key, pool_key, error)
            return None
    while len(_graphs) >= MAX_GRAPHS:
        _evict_oldest()
    pool[1] += 1
    entry = _Graph(graph, list(statics), out, pool_key)
    entry.finalizers = [weakref.finalize(t, _drops.forget, key) for t in owners if t is not None]
    _graphs[key] = entry
    return entry


def _capture_failed(key: Hashable, pool_key: Hashable, error: Exception) -> None:
    global _warned
    if len(_failed) >= MAX_GRAPHS:
        _failed.clear()
    _failed.add(key)
    _drop_pool_if_unused(pool_key)
    if not _warned:
        _warned = True
        warnings.warn(f"mxfp4.moe: capturing the portable layer as a CUDA graph failed ({type(error).__name__}: "
                      f"{error}); these calls run their ops one by one", RuntimeWarning, stacklevel=5)


def _drop_pool_if_unused(pool_key: Hashable) -> None:
    pool = _pools.get(pool_key)
    if pool is not None and pool[1] == 0:
        del _pools[pool_key]  # a later capture starts a fresh pool


def _evict_oldest() -> None:
    _close(_graphs.popitem(last=False)[1])


def _close(entry: _Graph) -> None:
    for finalizer in entry.finalizers:
        finalizer.detach()
    pool = _pools.get(entry.pool_key)
    if pool is not None:
        pool[1] -= 1
        _drop_pool_if_unused(entry.pool_key)
    entry.graph = None  # torch frees the graph's memory once no graph of its pool is left


def stats() -> dict[str, int]:
    """How many portable-layer graphs and memory pools are held."""
    with _lock:
        _drops.drop()
        return {"graphs": len(_graphs), "pools": len(_pools)}


def clear() -> None:
    """Drop every graph (graphs still running are freed when they finish)."""
    with _lock:
        _drops.drop()
        while _graphs:
            _evict_oldest()
        _seen.clear()
        _failed.clear()


moe_graphs.on_clear(clear)  # set_moe_graphs(False) and graphs.clear() drop these too
