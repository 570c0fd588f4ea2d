"""Replay of the fused MoE layer's five kernels as one CUDA graph, for plain eager calls at small T.

Why: an eager ``mxfp4.moe`` call enqueues five kernels, and on a busy host each launch costs about as
much as the GPU work of a decode step; one graph launch enqueues all five (issue 15: <= 60 µs per call).

How: the graph is built from our own kernel nodes (codegen.runtime.graph_driver), not captured, so each call's
addresses are written into the instantiated graph before its launch: x (the gather node), topk_ids and
topk_weights (the routing node) and the fresh output (the top-k sum node); a node is rewritten only when
its address changed since that graph's last launch. Everything else a node reads is fixed by its key.

Never stale: a graph is keyed by everything it bakes in: the stream, the plan (T, k, E, H, I, device and
the tile configs), the id and weight dtypes, the addresses of the packed weights and of the biases (which
must be bf16 and contiguous, so the graph reads the caller's tensors, never a converted copy), alpha and
limit. The kernels read the weights when they run, so an in-place update of a weight or a bias is seen,
and an address reused by another tensor is that call's tensor: what an eager launch would read.

Safe: launches of one graph run one at a time in launch order (cuGraphLaunch's contract), and every
graph of a workspace is keyed to the stream the workspace was allocated on, so the caching allocator
reuses that memory only after the stream's graphs are done. Never used under stream capture, under
torch.compile or a torch mode (the op path), nor from another device than the current one.

Bounded: only T <= ``GRAPH_MAX_TOKENS``, at most ``MAX_GRAPHS`` graphs (least recently used dropped
first), workspaces (one per stream and plan, shared by its graphs) within ``WORKSPACE_BUDGET`` bytes, and
a graph is built on the second call of its key, so a one-off shape costs no graph. A graph goes when one
of the tensors it reads in place (the packed weights, the biases) is freed, and its workspace with the
last graph that uses it. ``set_moe_graphs(False)`` (or ``HOPPER_MXFP4_MOE_GRAPHS=0``) turns replay off
and drops them all.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from codegen.runtime.dependent_launch import dependent_launch_enabled

from .deferred_drops import DeferredDrops

ENV_MOE_GRAPHS = "HOPPER_MXFP4_MOE_GRAPHS"
GRAPH_MAX_TOKENS = 64
MAX_GRAPHS = 256
WORKSPACE_BUDGET = 64 << 20
BUILD_AFTER_CALLS = 2

_lock = threading.Lock()
_enabled: bool | None = None  # set_moe_graphs(), else the environment variable (read once)


def set_moe_graphs(enabled: bool | None) -> None:
    """Replay small-T eager ``mxfp4.moe`` calls as CUDA graphs (True, the default), launch the kernels one
    by one (False), or follow ``HOPPER_MXFP4_MOE_GRAPHS`` again (None). Turning replay off drops the graphs."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_moe_graphs: enabled must be a bool or None, got {type(enabled).__name__} {enabled!r}")
    _enabled = enabled
    if not moe_graphs_enabled():
        clear()


def moe_graphs_enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV_MOE_GRAPHS, "1").strip().lower() not in ("0", "false", "no", "off")
    return _enabled


@dataclass
class _Workspace:
    tensor: torch.Tensor
    users: int = 0


@dataclass
class _Graph:
    """One instantiated graph, its node buffers, its workspace and the per-call addresses it last had."""

    graph: object  # codegen.runtime.graph_driver.KernelGraph
    plan: object  # codegen.runtime.moe_plan.MoePlan
    workspace: _Workspace
    workspace_key: Hashable
    base: int  # the workspace's address
    routed_inputs: tuple[int, int] = (0, 0)
    x: int = 0
    out: int = 0
    nodes: list = field(default_factory=list)
    finalizers: list = field(default_factory=list)  # drop the graph when a tensor it reads in place is freed


_graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
_drops = DeferredDrops(_lock, _graphs, lambda entry: _close(entry))  # graphs whose weights or biases were freed
_workspaces: dict[Hashable, _Workspace] = {}
_seen: OrderedDict[Hashable, int] = OrderedDict()  # calls of keys without a graph yet
_failed: set[Hashable] = set()  # keys whose graph could not be built (they run eagerly)
_warned = False


def stats() -> dict[str, int]:
    """How many graphs and workspaces are held, and the workspaces' bytes."""
    with _lock:
        _drops.drop()
        return {"graphs": len(_graphs), "workspaces": len(_workspaces), "workspace_bytes": _workspace_bytes()}


def _workspace_bytes() -> int:
    return sum(w.tensor.numel() * w.tensor.element_size() for w in _workspaces.values())


def clear() -> None:
    """Drop every graph and workspace (graphs still running are freed when they finish), and the other layer
    replays' graphs (those registered with :func:`on_clear`: the portable path's)."""
    with _lock:
        _drops.drop()
        while _graphs:
            _evict_oldest()
        _seen.clear()
        _failed.clear()
    for hook in _clear_hooks:
        hook()


_clear_hooks: list[Callable[[], None]] = []


def on_clear(hook: Callable[[], None]) -> None:
    """Call ``hook`` whenever :func:`clear` runs (set_moe_graphs(False) too): another replay's cache follows this switch."""
    if hook not in _clear_hooks:
        _clear_hooks.append(hook)


def graph_key(stream: int, plan_key: Hashable, call) -> tuple:
    """What a graph bakes in besides the plan: the stream, the call's fixed addresses and numbers, and whether its
    edges are programmatic (codegen.runtime.dependent_launch)."""
    return (stream, plan_key, call.ids_int64, call.weights_bf16, call.gate_up, call.gate_up_bias, call.down,
            call.down_bias, call.alpha, call.limit, dependent_launch_enabled())


def replay(plan, plan_key: Hashable, call, stream: int, x: torch.Tensor, owners: tuple) -> bool:
    """Run the layer for ``call`` as a graph launch on ``stream``; False when the caller must launch eagerly
    (replay off, first sight of the key, no room, or the graph could not be built). ``owners``: the tensors
    whose addresses the call's graph reads in place (weights' data, biases; None for an absent bias)."""
    key = graph_key(stream, plan_key, call)
    with _lock:
        if _drops:
            _drops.drop()
        entry = _graphs.get(key)
        if entry is None:
            entry = _build_on_second_sight(key, plan, plan_key, call, stream, x, owners)
            if entry is None:
                return False
        else:
            _graphs.move_to_end(key)
        _launch(entry, call, stream)
    return True


def _launch(entry: _Graph, call, stream: int) -> None:
    """Rewrite the nodes whose per-call address changed, then launch."""
    plan, graph, nodes, base = entry.plan, entry.graph, entry.nodes, entry.base
    routed_inputs = (call.topk_ids, call.topk_weights)
    if routed_inputs != entry.routed_inputs:
        plan.pack_routing(nodes[0].buffer, base, call)
        graph.set_node_params(nodes[0])
        entry.routed_inputs = routed_inputs
    if call.x != entry.x:
        plan.pack_gather(nodes[1].buffer, base, call)
        graph.set_node_params(nodes[1])
        entry.x = call.x
    if call.out != entry.out:
        plan.pack_topk_sum(nodes[4].buffer, base, call)
        graph.set_node_params(nodes[4])
        entry.out = call.out
    graph.launch(stream)


def _build_on_second_sight(key: Hashable, plan, plan_key: Hashable, call, stream: int, x: torch.Tensor,
                           owners: tuple) -> _Graph | None:
    if key in _failed:
        return None
    calls = _seen.pop(key, 0) + 1
    if calls < BUILD_AFTER_CALLS:
        _seen[key] = calls
        while len(_seen) > 4 * MAX_GRAPHS:
            _seen.popitem(last=False)
        return None
    workspace_key = (stream, plan_key)
    workspace = _workspace(workspace_key, plan.layout.nbytes, x)
    if workspace is None:
        return None
    try:
        entry = _new_graph(plan, workspace, workspace_key, call)
    except Exception as error:  # a driver that cannot build graphs here: this key runs eagerly
        if len(_failed) >= MAX_GRAPHS:
            _failed.clear()
        _failed.add(key)
        _drop_if_unused(workspace_key)
        _warn_once(f"mxfp4.moe: building the layer's CUDA graph failed ({type(error).__name__}: {error}); "
                   "these calls launch their kernels one by one")
        return None
    while len(_graphs) >= MAX_GRAPHS:
        _evict_oldest()
    entry.finalizers = [weakref.finalize(t, _drops.forget, key) for t in owners if t is not None]
    _graphs[key] = entry
    return entry


def _new_graph(plan, workspace: _Workspace, workspace_key: Hashable, call) -> _Graph:
    from codegen.runtime.graph_driver import KernelGraph

    nodes = plan.nodes()
    base = workspace.tensor.data_ptr()
    for node, pack in zip(nodes, plan.packers()):
        pack(node.buffer, base, call)
    graph = KernelGraph(nodes, dependent_launch_enabled())
    workspace.users += 1
    return _Graph(graph, plan, workspace, workspace_key, base, (call.topk_ids, call.topk_weights), call.x, call.out, nodes)


def _workspace(workspace_key: Hashable, nbytes: int, x: torch.Tensor) -> _Workspace | None:
    """The workspace of (stream, plan), allocated on the current stream (the key's) within the budget."""
    workspace = _workspaces.get(workspace_key)
    if workspace is not None:
        return workspace
    if nbytes > WORKSPACE_BUDGET:
        return None
    while _graphs and _workspace_bytes() + nbytes > WORKSPACE_BUDGET:
        _evict_oldest()
    workspace = _workspaces[workspace_key] = _Workspace(x.new_empty(nbytes // 2))
    return workspace


def _evict_oldest() -> None:
    _close(_graphs.popitem(last=False)[1])


def _close(entry: _Graph) -> None:
    for finalizer in entry.finalizers:
        finalizer.detach()
    entry.graph.close()
    entry.workspace.users -= 1
    _drop_if_unused(entry.workspace_key)


def _drop_if_unused(workspace_key: Hashable) -> None:
    workspace = _workspaces.get(workspace_key)
    if workspace is not None and workspace.users == 0:
        del _workspaces[workspace_key]  # freed on its stream: reused only after that stream's graphs ran


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=4)
