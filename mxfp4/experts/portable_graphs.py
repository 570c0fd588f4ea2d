"""Replay of a captured MoE layer as one CUDA graph, for plain eager calls at small T: the portable layer, and on
SM90 the layer's launch-by-launch steps.

Why: off SM90 (or with the portable path forced) the layer is a composition of about forty torch ops and two
Triton launches (mxfp4.experts.layer.moe_composition). At decode each costs host time, and the sum (about
0.8 ms per gpt-oss-20b layer on an H100 host) is what an eager decode step waits for, not the GPU. On SM90 the
planned bf16 layer has its own graphs of kernel nodes (mxfp4.experts.graphs); FP8 activations and expert
parallelism's foreign ids run launch by launch (mxfp4.experts.fused_steps: routing, the quantizers, two GEMMs,
torch's allocations and the top-k sum; about 170-200 µs of host time per FP8 layer call measured on an H100 host),
and are captured here the same way (``path`` SM90_STEPS, part of the key).

How: ``torch.cuda.CUDAGraph`` captures, once per key, copies of x, topk_ids and topk_weights into the graph's
own buffers, the composition on those, and a copy of its output (a warm-up run on the capture stream first,
so nothing is compiled or loaded inside the capture). The copies are memcpy nodes: a call points those whose
address changed at its own x, topk_ids, topk_weights and fresh output (codegen.runtime.graph_copies) and
launches the graph: one allocation, one graph launch, and a driver call per moved address (none in a decode
loop whose tensors come back at the same addresses), whatever the composition's length. Where the nodes
cannot be pointed (a HIP build, a torch without ``keep_graph``, copies not captured as flat memcpy nodes),
a call copies its inputs into the buffers the nodes read with torch, replays, and clones the output. The
graph runs the very kernels and ops of an eager call, so it gives the same bits.

Never stale: a graph is keyed by everything it bakes in: the device, the stream, T, k, E, H, I, the ids'
and routing weights' dtypes, gate_up's row order (paired or not), the packed weights' addresses, the
biases' addresses, dtypes and strides, alpha, limit and skip_invalid_ids. The graph reads the weights and
biases when it runs, so an in-place update is seen, and an address reused by another tensor is that call's
tensor: what an eager call reads. A graph goes when one of the tensors it reads in place is freed, so it
holds no reference to them (a freed model's weights are not kept alive).

Safe: the graphs of one (device, stream) share one memory pool and replay one at a time in stream order; the
output is copied out by the graph (or right after it), so the next replay may reuse the pool. A node reads
its address when the graph runs, on the call's stream: the call's tensors (a non-contiguous ids or weights
tensor: a contiguous copy made on that stream) are live there, as for an eager call's kernels. The graph
uses no random numbers, so it is launched without torch's generator bookkeeping. Replay is off
under stream capture, under torch.compile or a torch mode (the op path), with autograd to record, with
debug checks (they read values back), for the portable layer's FP8 activations, on another device than the
current one, and where a portable eager call would not take the in-register kernel
(mxfp4.portable.fallback.kernel_serves).

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

from codegen.runtime.dependent_launch import dependent_launch_enabled
from mxfp4.format.layout import PackedMXFP4
from mxfp4.ops.grouped_gemm import debug_checks_enabled
from mxfp4.portable.fallback import kernel_serves

from . import graphs as moe_graphs
from .deferred_drops import DeferredDrops

MAX_GRAPHS = 256
# The compositions captured: the portable layer (mxfp4.experts.layer.moe_composition) and, on SM90, the layer's
# launch-by-launch steps (mxfp4.experts.fused_steps: FP8 activations, foreign ids). Part of every key.
PORTABLE = "portable"
SM90_STEPS = "sm90 steps"
PATHS = (PORTABLE, SM90_STEPS)
# The layer on given (x, topk_ids, topk_weights), the rest of the call bound: what is captured.
Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_lock = threading.Lock()


@dataclass
class _Graph:
    """One captured layer: the graph, the tensors its copy nodes read and write as captured, the copy nodes a
    call points at its own tensors (None: the call copies through ``staging`` and ``result`` with torch), the
    addresses those nodes hold now, and the pool it allocated from."""

    graph: object  # torch.cuda.CUDAGraph (a stand-in in the CPU tests)
    staging: list[torch.Tensor]  # x, topk_ids, topk_weights: what the graph copies in, as captured
    result: torch.Tensor  # where it copies its output, as captured
    copies: object | None  # codegen.runtime.graph_copies.CopyNodes (a stand-in in the CPU tests)
    pool_key: Hashable
    bound: list[int] = field(default_factory=list)  # the copy nodes' addresses: x, topk_ids, topk_weights, output
    finalizers: list = field(default_factory=list)


_graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
_drops = DeferredDrops(_lock, _graphs, lambda entry: _close(entry))  # graphs whose weights or biases were freed
_seen: OrderedDict[Hashable, int] = OrderedDict()  # calls of keys without a graph yet
_failed: set[Hashable] = set()  # keys whose capture failed (they run eagerly)
_pools: dict[Hashable, list] = {}  # (device, stream) -> [memory pool handle, graphs using it]
_capture_streams: dict[int, object] = {}
_warned = False
_copies_refused: str | None = None  # why the last capture's copy nodes could not be pointed at the calls' tensors


# ---------------------------------------------------------------------------------------------
# torch's CUDA state and graphs, one function each (the CPU tests stand in for them).


def device_index(x: torch.Tensor) -> int | None:
    """x's CUDA device index when it is the current device, else None (no replay)."""
    if not x.is_cuda:
        return None
    index = x.get_device()  # an int: no torch.device built per call
    return index if index == torch._C._cuda_getDevice() else None


def current_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


def capturing() -> bool:
    return torch._C._cuda_isCurrentStreamCapturing()


def capture(run: Run, staging: tuple[torch.Tensor, ...], index: int, pool: object) -> tuple[object, torch.Tensor, object | None]:
    """(graph, result, copy nodes) of ``run``, captured on a side stream of device ``index`` into ``pool``
    after a warm-up run there (compiles, loads and lazy initialisations stay out of the capture): the graph
    copies ``staging`` into buffers of its own, runs ``run`` on them and copies the output into ``result``;
    the copy nodes (or None, see :func:`copy_nodes`) let a call move those copies to its own tensors."""
    side = _capture_streams.get(index)
    if side is None:
        side = _capture_streams[index] = torch.cuda.Stream(index)
    current = torch.cuda.current_stream(index)
    side.wait_stream(current)  # staging was written on the current stream
    try:
        with torch.cuda.stream(side):
            run(*staging)
            graph = _new_cuda_graph()
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                statics = [t.clone() for t in staging]  # contiguous, one dtype: memcpy nodes
                out = run(*statics)
                result = out.clone()
            finally:
                graph.capture_end()
            graph.instantiate()
    except Exception:
        _capture_streams.pop(index, None)  # a failed capture may leave the stream's allocations routed to the pool
        raise
    current.wait_stream(side)  # the next call's writes wait for the warm-up's reads
    copies = [(s.data_ptr(), t.data_ptr(), t.nbytes) for s, t in zip(staging, statics)]
    return graph, result, copy_nodes(graph, copies + [(out.data_ptr(), result.data_ptr(), out.nbytes)])


def _new_cuda_graph() -> torch.cuda.CUDAGraph:
    """A graph that keeps its template after capture (to find its copy nodes), where this torch can."""
    try:
        return torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:  # a torch before keep_graph: the calls copy with torch
        return torch.cuda.CUDAGraph()


def copy_nodes(graph: torch.cuda.CUDAGraph, copies: list[tuple[int, int, int]]) -> object | None:
    """The graph's copy nodes (codegen.runtime.graph_copies.CopyNodes: the inputs' sources and the output's
    destination movable), or None where they cannot be moved: a HIP build, a torch without the graph's raw
    handles, copies not captured as flat memcpy nodes, a driver that refuses (the reason: :func:`stats`)."""
    global _copies_refused
    try:
        if torch.version.hip is not None:
            raise RuntimeError("a HIP build (the copy nodes are moved through the CUDA driver)")
        from codegen.runtime.graph_copies import CopyNodes

        nodes = CopyNodes(graph.raw_cuda_graph(), graph.raw_cuda_graph_exec(), copies, sources=len(copies) - 1)
    except Exception as error:  # what this torch, driver or capture cannot do: the calls copy with torch
        _copies_refused = f"{type(error).__name__}: {error}"
        return None
    _copies_refused = None
    return nodes


def new_pool() -> object:
    return torch.cuda.graph_pool_handle()


def replay_graph(entry: _Graph, run: Run) -> None:
    """Replay ``entry``'s graph as captured on the current stream (``run``: what a stand-in recomputes instead)."""
    entry.graph.replay()


def launch_graph(entry: _Graph, tensors: tuple[torch.Tensor, ...], stream: int, run: Run) -> None:
    """Launch ``entry``'s graph on ``stream``, its copy nodes pointed at ``tensors`` (x, topk_ids, topk_weights,
    output) already (``run``: what a stand-in recomputes instead)."""
    entry.copies.launch(stream)


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
    activations: str, skip_invalid_ids: bool, path: str = PORTABLE,
) -> tuple | None:
    """The key of the graph that may serve this validated plain eager call of ``path``'s composition, or None when
    it runs eagerly. Whether the in-register kernel serves a portable call depends on the key's (device, T, k, E)
    only: :func:`replay` asks on a key's first sights (:func:`_kernel_serves`), not per call. The key carries the
    dependent-launch switch too (codegen.runtime.dependent_launch): a captured graph bakes in how its launches were
    made."""
    tokens, top_k = topk_ids.shape
    if path not in PATHS:
        raise ValueError(f"path={path!r}: one of {PATHS}")
    if (tokens > moe_graphs.GRAPH_MAX_TOKENS or (path == PORTABLE and activations != "bf16")
            or not moe_graphs.moe_graphs_enabled() or debug_checks_enabled()):
        return None
    index = device_index(x)
    if index is None or capturing() or _records_autograd(topk_weights, gate_up_bias, down_bias):
        return None
    # type(gate_up): PackedGateUp (rows paired) or PackedMXFP4 (checkpoint order): the composition splits by it.
    return (index, current_stream(index), tokens, top_k, gate_up.data.shape[0], down.n, down.k, topk_ids.dtype,
            topk_weights.dtype, type(gate_up), gate_up.data.data_ptr(), down.data.data_ptr(), _bias_key(gate_up_bias),
            _bias_key(down_bias), alpha, limit, dependent_launch_enabled(), skip_invalid_ids, activations, path)


def _kernel_serves(key: tuple, x: torch.Tensor) -> bool:
    """Whether every eager call of ``key`` takes the in-register kernel (else an eager call may take the decoded
    copy, and a graph of the kernel would not compute what it does). The SM90 layer's steps always run the SM90
    kernels."""
    if key[-1] == SM90_STEPS:
        return True
    tokens, top_k, experts = key[2:5]
    return kernel_serves(x.device, -(-tokens * top_k // experts))


def explain_replay(x: torch.Tensor, rows_per_expert: int, activations: str, path: str = PORTABLE) -> str:
    """What a plain eager call of ``path``'s layer on ``x`` launches (for ``mxfp4.explain_moe``)."""
    if path == SM90_STEPS:
        one_by_one = "each call launches its kernels one by one"
    else:
        one_by_one = "each call runs the composition's torch ops and two Triton launches"
    if not moe_graphs.moe_graphs_enabled():
        return f"graph replay off (set_moe_graphs(False) or {moe_graphs.ENV_MOE_GRAPHS}=0): {one_by_one}"
    if path == PORTABLE and (x.device.type != "cuda" or activations != "bf16"
                             or not kernel_serves(x.device, rows_per_expert)):
        return f"{one_by_one} (graph replay: on CUDA, bf16 activations, calls the in-register kernel serves)"
    if x.shape[0] > moe_graphs.GRAPH_MAX_TOKENS:
        return f"T > {moe_graphs.GRAPH_MAX_TOKENS}: {one_by_one}"
    return (f"plain eager calls at T <= {moe_graphs.GRAPH_MAX_TOKENS} replay the layer as one CUDA graph from their "
            "second call (its copy nodes moved to each call's x, topk_ids, topk_weights and output)")


def replay_layer(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedMXFP4, down: PackedMXFP4,
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, alpha: float, limit: float,
    activations: str, skip_invalid_ids: bool, composition: Callable[..., torch.Tensor], path: str = PORTABLE,
) -> torch.Tensor | None:
    """The layer's output by a graph replay, or None when the caller must run ``composition`` (``path``'s: the
    portable layer, or the SM90 layer's launch-by-launch steps) eagerly: replay off or not allowed for this call,
    first sight of its key, or a capture that failed."""
    key = call_key(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, alpha, limit, activations,
                   skip_invalid_ids, path)
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
    """The layer's output by a launch of the graph of ``key`` (built on its second call), or None when the call
    must run eagerly. ``owners``: the tensors the graph reads in place (None for an absent bias)."""
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
        if entry.copies is None:  # copy in, replay, copy out with torch
            torch._foreach_copy_(entry.staging, (x, topk_ids, topk_weights))  # one call for the three copies
            replay_graph(entry, run)
            return entry.result.clone()  # before the next replay on this stream may reuse the pool
        return _launch(key, entry, x, topk_ids, topk_weights, run)


def _launch(key: Hashable, entry: _Graph, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            run: Run) -> torch.Tensor | None:
    """Point the copy nodes whose address changed at this call's tensors, launch, return the output (None: the
    driver refused; the graph goes and the key runs eagerly from now on)."""
    out = torch.empty_like(x)  # the layer's output: x's shape and dtype, contiguous as x is
    # A node copies flat bytes: a strided ids or weights tensor goes through a contiguous copy (on this stream).
    tensors = (x, topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous(),
               topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous(), out)
    addresses = [t.data_ptr() for t in tensors]
    try:
        if addresses != entry.bound:  # a decode loop's tensors often come back at the same addresses
            for slot, (address, held) in enumerate(zip(addresses, entry.bound)):
                if address != held:
                    entry.copies.retarget(slot, address)
                    entry.bound[slot] = address
        launch_graph(entry, tensors, key[1], run)
    except RuntimeError as error:  # a driver that will not move these copies (say, to memory of another kind)
        _graphs.pop(key, None)
        _close(entry)
        _mark_failed(key, error)
        return None
    return out


def _build_on_second_sight(key: Hashable, owners: tuple, x: torch.Tensor, topk_ids: torch.Tensor,
                           topk_weights: torch.Tensor, run: Run) -> _Graph | None:
    if key in _failed or not _kernel_serves(key, x):
        return None
    calls = _seen.pop(key, 0) + 1
    if calls < moe_graphs.BUILD_AFTER_CALLS:
        _seen[key] = calls
        while len(_seen) > 4 * MAX_GRAPHS:
            _seen.popitem(last=False)
        return None
    pool_key = key[:2]  # (device, stream)
    pool = _pools.setdefault(pool_key, [new_pool(), 0])
    # Staging tensors are normal ones (not inference tensors), so calls in and out of inference_mode can write them;
    # they hold this call's values, so the warm-up and the capture route real ids.
    with torch.inference_mode(False), torch.no_grad():
        staging = (x.clone(), topk_ids.contiguous().clone(), topk_weights.contiguous().clone())
        try:
            graph, result, copies = capture(run, staging, key[0], pool[0])
        except Exception as error:  # this key runs eagerly from now on
            _capture_failed(key, pool_key, error)
            return None
    while len(_graphs) >= MAX_GRAPHS:
        _evict_oldest()
    pool[1] += 1
    entry = _Graph(graph, list(staging), result, copies, pool_key,
                   [t.data_ptr() for t in staging] + [result.data_ptr()])
    entry.finalizers = [weakref.finalize(t, _drops.forget, key) for t in owners if t is not None]
    _graphs[key] = entry
    return entry


def _layer_name(key: Hashable) -> str:
    """The captured composition, in words, for a warning: "the portable layer" or the SM90 layer's steps."""
    return "the portable layer" if key[-1] == PORTABLE else "the SM90 layer's launch-by-launch steps"


def _capture_failed(key: Hashable, pool_key: Hashable, error: Exception) -> None:
    _drop_pool_if_unused(pool_key)
    _mark_failed(key, error, f"capturing {_layer_name(key)} as a CUDA graph failed")


def _mark_failed(key: Hashable, error: Exception, what: str | None = None) -> None:
    """``key`` runs eagerly from now on; the first such key warns (``what`` failed: by default, launching the
    key's graph)."""
    global _warned
    what = what or f"launching {_layer_name(key)}'s CUDA graph failed"
    if len(_failed) >= MAX_GRAPHS:
        _failed.clear()
    _failed.add(key)
    if not _warned:
        _warned = True
        warnings.warn(f"mxfp4.moe: {what} ({type(error).__name__}: {error}); these calls run their ops one by one",
                      RuntimeWarning, stacklevel=6)


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
    entry.graph = entry.copies = None  # torch frees the graph's memory once no graph of its pool is left


def stats() -> dict[str, int]:
    """How many portable-layer graphs and memory pools are held, and how many of the graphs move their copy nodes
    to each call's tensors ("direct"; the others copy with torch, for the reason :func:`copies_refused` gives)."""
    with _lock:
        _drops.drop()
        return {"graphs": len(_graphs), "pools": len(_pools),
                "direct": sum(entry.copies is not None for entry in _graphs.values())}


def copies_refused() -> str | None:
    """Why the latest capture's copy nodes could not be moved to each call's tensors (None: they could)."""
    return _copies_refused


def clear() -> None:
    """Drop every graph (graphs still running are freed when they finish)."""
    with _lock:
        _drops.drop()
        while _graphs:
            _evict_oldest()
        _seen.clear()
        _failed.clear()


moe_graphs.on_clear(clear)  # set_moe_graphs(False) and graphs.clear() drop these too
