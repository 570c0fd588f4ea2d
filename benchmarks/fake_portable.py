"""A stand-in on the CPU for a GPU where the portable in-register kernel runs: ``mxfp4.moe`` on the portable path
(the layer's composition and its CUDA-graph replay, mxfp4.experts.portable_graphs) runs on CPU tensors with
each Triton launch and each graph capture and replay recorded instead of made.

A launch computes the kernel's product from the packed bytes (the float64 reference, rounded to bf16) unless
``count_only``; a captured graph is the layer re-run at each launch on what its copy nodes read, written where
its output copy node writes (what a launch of the captured kernels computes), or nothing with ``count_only``.
Copy nodes hold addresses, as the driver's do: a launch whose nodes do not hold the call's tensors' addresses
(a stale node: on a GPU, the graph would read or write another tensor's memory) raises AssertionError.

For the CPU micro-benchmark of the host path (benchmarks.host_cpu) and the CPU tests of the replay's logic
(tests/test_portable_host.py).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator
from unittest import mock

import torch

FAKE_STREAM = 0x5EED


@dataclass
class PortableRecorder:
    """What the portable host path asked of the device. ``launches``: (N, K, rows) of each kernel launch made
    eagerly; counts: "kernel launches", "graph kernel launches" (at capture), "graph captures", "graph launches",
    "node updates" (a copy node moved to a call's tensor). ``copy_nodes``: captures give movable copy nodes (else
    the calls copy through the graph's buffers with torch, as where the driver cannot move them)."""

    stream: int = FAKE_STREAM
    capturing: bool = False
    count_only: bool = False
    copy_nodes: bool = True
    launches: list[tuple[int, int, int]] = field(default_factory=list)
    graphs: list["FakeCapturedGraph"] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


class FakeCopyNodes:
    """Stand-in for codegen.runtime.graph_copies.CopyNodes: the address each copy node holds (x, topk_ids,
    topk_weights, output), each move counted."""

    def __init__(self, recorder: PortableRecorder, addresses: list[int]) -> None:
        self.recorder, self.addresses = recorder, addresses
        self.moves: Counter = Counter()  # slot -> times moved

    def retarget(self, slot: int, address: int) -> None:
        self.recorder.counts["node updates"] += 1
        self.moves[slot] += 1
        self.addresses[slot] = address


class FakeCapturedGraph:
    """A captured layer: a launch re-runs the layer on what its copy nodes read, into what its output node writes."""

    def __init__(self, recorder: PortableRecorder, launches: int) -> None:
        self.recorder, self.launches = recorder, launches
        recorder.graphs.append(self)

    def replay(self, run: Callable[..., torch.Tensor], staging: list[torch.Tensor], result: torch.Tensor) -> None:
        """The nodes as captured: from the staging tensors, into the result."""
        self.recorder.counts["graph launches"] += 1
        if not self.recorder.count_only:
            self._compute(run, staging, result)

    def launch(self, run: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], copies: FakeCopyNodes) -> None:
        """The nodes moved to ``tensors`` (x, topk_ids, topk_weights, output): they must hold those addresses."""
        self.recorder.counts["graph launches"] += 1
        held = [t.data_ptr() for t in tensors]
        if copies.addresses != held:
            raise AssertionError(f"stale copy node: the nodes hold {copies.addresses}, the call's tensors are at {held}")
        if not self.recorder.count_only:
            self._compute(run, tensors[:3], tensors[3])

    def _compute(self, run: Callable[..., torch.Tensor], inputs, out: torch.Tensor) -> None:
        with _in_graph(self.recorder):
            out.copy_(run(*(t.clone() for t in inputs)))  # the graph's own buffers


@contextlib.contextmanager
def _in_graph(recorder: PortableRecorder) -> Iterator[None]:
    """Launches made here are a graph's (captured, or replayed by the stand-in), not eager ones."""
    recorder.capturing = True
    try:
        yield
    finally:
        recorder.capturing = False


def _launch(recorder: PortableRecorder) -> Callable[..., torch.Tensor]:
    def launch(x: torch.Tensor, w_data: torch.Tensor, n: int, k: int, rows: torch.Tensor, masked: bool,
               out: torch.Tensor, config: object = None) -> torch.Tensor:
        if recorder.capturing:
            recorder.counts["graph kernel launches"] += 1
        else:
            recorder.counts["kernel launches"] += 1
            if not recorder.count_only:
                recorder.launches.append((n, k, x.numel() // k))
        if recorder.count_only:
            return out
        from mxfp4.format.layout import PackedMXFP4
        from mxfp4.format.reference import (
            reference_grouped_mm_float64,
            reference_grouped_mm_masked_float64,
        )

        packed = PackedMXFP4(w_data, n, k)
        if masked:
            return out.copy_(reference_grouped_mm_masked_float64(x, packed))
        return out.copy_(reference_grouped_mm_float64(x, packed, rows))
    return launch


def _capture(recorder: PortableRecorder) -> Callable[..., tuple[object, torch.Tensor, object | None]]:
    def capture(run: Callable[..., torch.Tensor], staging: tuple[torch.Tensor, ...], index: int,
                pool: object) -> tuple[object, torch.Tensor, object | None]:
        recorder.counts["graph captures"] += 1
        before = recorder.counts["graph kernel launches"]
        with _in_graph(recorder):
            result = run(*(t.clone() for t in staging)).clone()
        graph = FakeCapturedGraph(recorder, recorder.counts["graph kernel launches"] - before)
        nodes = FakeCopyNodes(recorder, [t.data_ptr() for t in (*staging, result)]) if recorder.copy_nodes else None
        return graph, result, nodes
    return capture


@contextlib.contextmanager
def fake_portable(recorder: PortableRecorder) -> Iterator[PortableRecorder]:
    """Run the portable path on CPU tensors as on a GPU where the in-register kernel runs: device 0, the
    recorder's stream, its launches and graphs, and no host read of a value for a check (ids, offsets) unless
    debug checks are on, as for device tensors."""
    from mxfp4.experts import layer, portable_graphs
    from mxfp4.ops import grouped_gemm
    from mxfp4.portable import fallback
    from mxfp4.portable import kernel as portable_kernel

    check_ids = layer._check_ids_values

    def check_ids_on_device(topk_ids: torch.Tensor, num_experts: int) -> None:
        if grouped_gemm.debug_checks_enabled():  # values of device tensors are read only with debug checks
            check_ids(topk_ids, num_experts)

    patches = [
        mock.patch.object(layer, "_check_ids_values", check_ids_on_device),
        mock.patch.object(grouped_gemm, "_values_checkable", lambda value: grouped_gemm.debug_checks_enabled()),
        mock.patch.object(portable_kernel, "unavailable_reason", lambda device_type, index: None),
        mock.patch.object(portable_kernel, "launch", _launch(recorder)),
        mock.patch.object(fallback, "_capturing", lambda device: recorder.capturing),
        mock.patch.object(portable_graphs, "device_index", lambda x: 0),
        mock.patch.object(portable_graphs, "current_stream", lambda index: recorder.stream),
        mock.patch.object(portable_graphs, "capturing", lambda: recorder.capturing),
        mock.patch.object(portable_graphs, "capture", _capture(recorder)),
        mock.patch.object(portable_graphs, "new_pool", object),
        mock.patch.object(portable_graphs, "replay_graph", lambda entry, run: entry.graph.replay(run, entry.staging, entry.result)),
        mock.patch.object(portable_graphs, "launch_graph",
                          lambda entry, tensors, stream, run: entry.graph.launch(run, tensors, entry.copies)),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        try:
            yield recorder
        finally:
            portable_graphs.clear()  # no stand-in graph outlives the stand-in
