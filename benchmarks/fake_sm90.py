"""An SM90 stand-in on the CPU: ``mxfp4.moe``'s SM90 host path runs on CPU tensors with every driver call
(kernel loads, tensor-map encodes, launches, CUDA graphs) recorded instead of made.

For the CPU micro-benchmark of the host path (benchmarks.host_cpu) and the CPU tests of its logic
(tests/test_moe_host.py, which also runs the recorded launches through an emulator of the kernels).
"""

from __future__ import annotations

import contextlib
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator
from unittest import mock

FAKE_SMS = 132  # the H200's
FAKE_STREAM = 0x5EED


@dataclass
class Launch:
    name: str
    grid: int
    threads: int
    shared_memory: int
    stream: int
    params: bytes


@dataclass
class Recorder:
    """What the host path asked of the driver; ``on_launch`` sees each kernel launch as it is made.
    ``count_only``: keep counts, not records (a benchmark's many calls; the fake then costs next to nothing)."""

    stream: int = FAKE_STREAM
    capturing: bool = False
    device_name: str = "NVIDIA H200"
    on_launch: Callable[[Launch], None] | None = None
    count_only: bool = False
    launches: list[Launch] = field(default_factory=list)
    graphs: list["FakeGraph"] = field(default_factory=list)
    node_updates: list[str] = field(default_factory=list)
    graph_launches: list[tuple["FakeGraph", int]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # kernel launches, graph launches, node updates

    def launch(self, record: Launch) -> None:
        self.launches.append(record)
        if self.on_launch is not None:
            self.on_launch(record)


class FakeGraph:
    """codegen.runtime.graph_driver.KernelGraph's interface: a launch replays the nodes' current parameters."""

    recorder: Recorder  # set by fake_sm90

    def __init__(self, nodes: list, dependent: bool = False) -> None:  # dependent: the CPU runs the chain in order
        self.nodes = nodes
        self.params = [bytes(node.buffer) for node in nodes]
        self.closed = False
        self.recorder.graphs.append(self)

    def set_node_params(self, node) -> None:
        assert not self.closed, "a closed graph was updated"
        self.recorder.counts["node updates"] += 1
        if self.recorder.count_only:
            return
        self.params[self.nodes.index(node)] = bytes(node.buffer)
        self.recorder.node_updates.append(node.name)

    def launch(self, stream: int) -> None:
        assert not self.closed, "a closed graph was launched"
        self.recorder.counts["graph launches"] += 1
        if self.recorder.count_only:
            return
        self.recorder.graph_launches.append((self, stream))
        for node, params in zip(self.nodes, self.params):
            self.recorder.launch(Launch(node.name, node.grid, node.threads, node.shared_memory, stream, params))

    def close(self) -> None:
        self.closed = True


def fake_tensor_map(address: int, rows: int, k: int, tile_m: int, *_: int) -> bytes:
    """128 bytes that say what a real descriptor would describe (the emulator reads them back)."""
    return struct.pack("<4Q", address, rows, k, tile_m).ljust(128, b"\0")


def _fake_load(config, device):
    from codegen.runtime.launch import LoadedKernel

    handle = 0x1000 + hash(config.name) % 0x1000
    return LoadedKernel(config, None, None, config.shared_memory_bytes, FAKE_SMS * config.ctas_per_sm, handle,
                        config.threads, config.name)


@contextlib.contextmanager
def fake_sm90(recorder: Recorder | None = None) -> Iterator[Recorder]:
    """Within: CPU tensors take mxfp4.moe's SM90 path, recorded in the yielded Recorder. Plans and graphs
    made inside are dropped on the way in and out (they hold fake kernels)."""
    from codegen.runtime import moe_glue, moe_plan, routing
    from mxfp4.experts import fused as moe_fused
    from mxfp4.experts import graphs as moe_graphs
    from mxfp4.experts import layer as moe_layer
    from mxfp4.ops.dispatch import SM90, PathChoice

    rec = recorder or Recorder()
    choice = PathChoice(SM90, "fake SM90 on the CPU (benchmarks.fake_sm90)", "cpu", (9, 0), rec.device_name)

    def launch(function: int, grid: int, threads: int, shared: int, stream: int, name: str,
               dependent: bool = False) -> None:
        from codegen.runtime.fast_driver import params_buffer

        rec.counts["kernel launches"] += 1
        if not rec.count_only:
            rec.launch(Launch(name, grid, threads, shared, stream, bytes(params_buffer(1024))))

    FakeGraph.recorder = rec
    real_check_ids = moe_layer._check_ids_values

    def check_ids(topk_ids, num_experts: int) -> None:  # as on a CUDA device: values only with debug checks
        if moe_layer.debug_checks_enabled():
            real_check_ids(topk_ids, num_experts)

    patches = [
        mock.patch.object(moe_layer, "select_path", lambda device: choice),
        mock.patch.object(moe_layer, "_check_ids_values", check_ids),
        mock.patch.object(moe_fused, "current_device", lambda: None),
        mock.patch.object(moe_fused, "current_stream", lambda index: rec.stream),
        mock.patch.object(moe_fused, "capturing", lambda: rec.capturing),
        mock.patch.object(moe_plan, "load", _fake_load),
        mock.patch.object(moe_plan, "routing_kernel",
                          lambda device, e: (0x2001, routing.ROUTING_THREADS, routing._shared_memory(e))),
        mock.patch.object(moe_glue, "glue_function", lambda device, entry: 0x3000 + len(entry)),
        mock.patch.object(moe_plan, "encode_x_map", fake_tensor_map),
        mock.patch.object(moe_plan, "launch", launch),
        mock.patch("codegen.runtime.graph_driver.KernelGraph", FakeGraph),
    ]
    with contextlib.ExitStack() as stack:
        moe_fused.clear_plans()
        moe_graphs.clear()
        for patch in patches:
            stack.enter_context(patch)
        try:
            yield rec
        finally:
            moe_graphs.clear()
            moe_fused.clear_plans()
